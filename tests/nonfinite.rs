//! Non-finite losses and gradients under `NonFinitePolicy::{Skip, Error}`:
//! weights and momentum stay bit-identical, skipped steps are counted, and
//! errors are typed.
//!
//! Written once over `ParamStore` and instantiated per backend by
//! `nonfinite_suite!` with a factory, as in `tests/checkpoint.rs`.

use amp::backend::ndarray::NdStore;
use amp::{
    checkpoint, Amp, AmpConfig, AmpError, HostTensor, NonFinitePolicy, ParamStore, Pass,
    RestoreMode, Result, SgdConfig, Slot, StepReport,
};

/// Where a fault is injected and what it is.
#[derive(Clone, Copy, Debug)]
struct Fault {
    /// `None`: the clean pass; `Some(k)`: perturbed pass k.
    pass: Option<usize>,
    kind: Kind,
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    /// The closure reports this loss.
    Loss(f64),
    /// Element 0 of tensor 1's gradient is this value.
    Gradient(f64),
}

impl Fault {
    fn hits(&self, pass: Pass) -> bool {
        match (self.pass, pass) {
            (None, Pass::Clean) => true,
            (Some(k), Pass::Perturbed { k: at, .. }) => k == at,
            _ => false,
        }
    }

    /// The error the step must report.
    fn matches(&self, error: &AmpError) -> bool {
        let pass = match self.pass {
            None => Pass::Clean,
            Some(k) => Pass::Perturbed { k, of: INNER_ITER },
        };
        match (self.kind, error) {
            (
                Kind::Loss(value),
                AmpError::NonFiniteLoss {
                    pass: at,
                    value: got,
                },
            ) => {
                *at == pass
                    && (got.to_bits() == value.to_bits() || (got.is_nan() && value.is_nan()))
            }
            (Kind::Gradient(_), AmpError::NonFiniteGradient { pass: at }) => *at == pass,
            _ => false,
        }
    }
}

const INNER_ITER: usize = 2;

/// Every fault this suite injects: NaN and ±∞, in the loss and in a
/// gradient, in the clean pass and in each perturbed pass.
fn faults() -> Vec<Fault> {
    let mut faults = Vec::new();
    for pass in [None, Some(1), Some(INNER_ITER)] {
        for kind in [
            Kind::Loss(f64::NAN),
            Kind::Loss(f64::INFINITY),
            Kind::Gradient(f64::NAN),
            Kind::Gradient(f64::NEG_INFINITY),
        ] {
            faults.push(Fault { pass, kind });
        }
    }
    faults
}

fn build<S: ParamStore>(store: S, policy: NonFinitePolicy, restore: RestoreMode) -> Amp<S> {
    let config = AmpConfig::new(0.1, 0.2)
        .weight_decay(1e-3)
        .inner_iter(INNER_ITER)
        .restore(restore)
        .non_finite(policy);
    Amp::sgd(store, config, SgdConfig::nesterov(0.9)).expect("valid")
}

/// One step at index `t` of the loss `Σ ½·a·θ² + c_t·θ` (gradient
/// `a·θ + c_t`), computed on the host, with an optional fault.
fn step<S: ParamStore>(amp: &mut Amp<S>, t: u64, fault: Option<Fault>) -> Result<StepReport<()>> {
    amp.step(|store: &mut S, pass| -> Result<((), f64)> {
        let mut loss = 0.0;
        for i in 0..store.num_tensors() {
            let theta = store.read(Slot::Params, i)?;
            let a = 1.0 + i as f64;
            let mut grad = Vec::with_capacity(theta.numel());
            for (j, &x) in theta.data().iter().enumerate() {
                let c = 0.3 * (t as f64 + i as f64 * 0.7 + j as f64 * 0.3).cos();
                loss += 0.5 * a * x * x + c * x;
                grad.push(a * x + c);
            }
            if let Some(Fault {
                kind: Kind::Gradient(value),
                ..
            }) = fault.filter(|f| f.hits(pass))
            {
                if i == 1 {
                    grad[0] = value;
                }
            }
            store.write(
                Slot::Grads,
                i,
                &HostTensor::new(theta.shape().to_vec(), theta.dtype(), grad)?,
            )?;
        }
        if let Some(Fault {
            kind: Kind::Loss(value),
            ..
        }) = fault.filter(|f| f.hits(pass))
        {
            loss = value;
        }
        Ok(((), loss))
    })
}

/// Weights, momentum and counters, as bits.
#[derive(Debug, PartialEq)]
struct Fingerprint {
    params: Vec<Vec<u64>>,
    momentum: Vec<Option<Vec<u64>>>,
    steps: u64,
    skipped_steps: u64,
}

fn fingerprint<S: ParamStore>(amp: &Amp<S>) -> Fingerprint {
    let bits = |t: &HostTensor| t.data().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let state = amp.state().expect("state reads").base.state;
    let momentum = state
        .buffers
        .iter()
        .find(|(name, _)| name == "momentum_buffer")
        .map(|(_, list)| list.iter().map(|t| t.as_ref().map(bits)).collect())
        .unwrap_or_default();
    Fingerprint {
        params: (0..amp.store().num_tensors())
            .map(|i| bits(&amp.store().read(Slot::Params, i).expect("read")))
            .collect(),
        momentum,
        steps: amp.steps(),
        skipped_steps: amp.skipped_steps(),
    }
}

/// An optimiser that has taken three good steps, so that momentum exists.
fn warmed_up<S: ParamStore>(
    make: &dyn Fn() -> S,
    policy: NonFinitePolicy,
    restore: RestoreMode,
) -> Amp<S> {
    let mut amp = build(make(), policy, restore);
    for t in 0..3 {
        step(&mut amp, t, None).expect("good step");
    }
    assert!(fingerprint(&amp).momentum.iter().all(Option::is_some));
    amp
}

fn skip_leaves_state_bit_identical_and_counts<S: ParamStore>(make: &dyn Fn() -> S) {
    for fault in faults() {
        let mut amp = warmed_up(make, NonFinitePolicy::Skip, RestoreMode::Copy);
        let before = fingerprint(&amp);
        let report = step(&mut amp, 3, Some(fault)).expect("skipped, not an error");
        let reason = report.skipped.as_ref().expect("the step reports the skip");
        assert!(fault.matches(reason), "{fault:?}: {reason}");
        let after = fingerprint(&amp);
        assert_eq!(after.params, before.params, "{fault:?}: weights");
        assert_eq!(after.momentum, before.momentum, "{fault:?}: momentum");
        assert_eq!(after.steps, before.steps, "{fault:?}: steps");
        assert_eq!(after.skipped_steps, before.skipped_steps + 1, "{fault:?}");
    }
}

fn error_leaves_everything_bit_identical<S: ParamStore>(make: &dyn Fn() -> S) {
    for fault in faults() {
        let mut amp = warmed_up(make, NonFinitePolicy::Error, RestoreMode::Copy);
        let before = fingerprint(&amp);
        let error = step(&mut amp, 3, Some(fault)).expect_err("must fail");
        assert!(fault.matches(&error), "{fault:?}: {error}");
        assert_eq!(fingerprint(&amp), before, "{fault:?}");
    }
}

/// With subtract-restore the weights only ever move in a perturbed pass; a
/// fault in the clean pass leaves them bit-identical under either policy.
fn clean_pass_faults_are_exact_with_subtract_restore<S: ParamStore>(make: &dyn Fn() -> S) {
    for fault in faults().into_iter().filter(|f| f.pass.is_none()) {
        for policy in [NonFinitePolicy::Skip, NonFinitePolicy::Error] {
            let mut amp = warmed_up(make, policy, RestoreMode::Subtract);
            let before = fingerprint(&amp);
            let result = step(&mut amp, 3, Some(fault));
            let after = fingerprint(&amp);
            assert_eq!(after.params, before.params, "{fault:?} {policy:?}");
            assert_eq!(after.momentum, before.momentum, "{fault:?} {policy:?}");
            assert_eq!(result.is_ok(), policy == NonFinitePolicy::Skip);
        }
    }
}

/// Skipped steps are invisible to training: a run that skips bad steps ends
/// bit-identical to one that never saw them (apart from the counter), and
/// the counter survives a checkpoint.
fn skipped_steps_are_invisible_and_checkpointed<S: ParamStore>(make: &dyn Fn() -> S) {
    let mut clean = build(make(), NonFinitePolicy::Skip, RestoreMode::Copy);
    let mut faulty = build(make(), NonFinitePolicy::Skip, RestoreMode::Copy);
    let faults = faults();
    for t in 0..8 {
        step(&mut clean, t, None).expect("good step");
        if let Some(&fault) = faults
            .get(t as usize * 3 % faults.len())
            .filter(|_| t % 2 == 1)
        {
            let report = step(&mut faulty, t, Some(fault)).expect("skipped");
            assert!(report.skipped.is_some());
        }
        step(&mut faulty, t, None).expect("good step");
    }
    let (clean_print, faulty_print) = (fingerprint(&clean), fingerprint(&faulty));
    assert_eq!(faulty_print.params, clean_print.params);
    assert_eq!(faulty_print.momentum, clean_print.momentum);
    assert_eq!(faulty_print.steps, 8);
    assert_eq!(faulty_print.skipped_steps, 4);
    assert_eq!(clean_print.skipped_steps, 0);

    let mut resumed = build(make(), NonFinitePolicy::Skip, RestoreMode::Copy);
    checkpoint::from_bytes(&mut resumed, &checkpoint::to_bytes(&faulty).expect("save"))
        .expect("load");
    assert_eq!(fingerprint(&resumed), faulty_print);
}

macro_rules! nonfinite_suite {
    ($name:ident, $make:expr) => {
        mod $name {
            use super::*;

            #[test]
            fn skip_leaves_state_bit_identical_and_counts() {
                super::skip_leaves_state_bit_identical_and_counts(&$make);
            }

            #[test]
            fn error_leaves_everything_bit_identical() {
                super::error_leaves_everything_bit_identical(&$make);
            }

            #[test]
            fn clean_pass_faults_are_exact_with_subtract_restore() {
                super::clean_pass_faults_are_exact_with_subtract_restore(&$make);
            }

            #[test]
            fn skipped_steps_are_invisible_and_checkpointed() {
                super::skipped_steps_are_invisible_and_checkpointed(&$make);
            }
        }
    };
}

fn nd<T: amp::backend::ndarray::Element>() -> NdStore<T> {
    let value = |x: f64| T::from_f64_rounded(x);
    NdStore::from_arrays([
        ndarray::Array::from_shape_fn(ndarray::IxDyn(&[3, 2]), |ix| {
            value(0.5 - 0.3 * (ix[0] * 2 + ix[1]) as f64)
        }),
        ndarray::Array::from_shape_fn(ndarray::IxDyn(&[4]), |ix| value(1.0 + 0.25 * ix[0] as f64)),
    ])
}

nonfinite_suite!(ndarray_f32, nd::<f32>);
nonfinite_suite!(ndarray_f64, nd::<f64>);
