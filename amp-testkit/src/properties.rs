//! The invariants of the algorithm, as checks that any backend's proptest
//! calls with its [`StoreFactory`]. Each returns `Err(message)` on violation,
//! so that proptest can shrink the case and print it.

use std::cell::{Cell, RefCell};

use amp_core::{Amp, AmpError, DType, HostTensor, ParamStore, Pass, RestoreMode, Slot};

use crate::faulty::FaultyStore;
use crate::{
    base_state, compare_outcomes, compare_with_oracle, host_values, read_slot, reference, run_case,
    Case, CaseBase, Conditioning, Fault, NdFactory, StoreFactory, Tolerance,
};

pub use crate::contract::gradient_presence;
pub use crate::scaling::{loss_scale_is_exact, overflow_skips_the_step};
pub use crate::split::{adam_update_matches_composed, split_step_matches_step};

/// What a property returns: `Err` with a message saying what broke.
pub type Check = std::result::Result<(), String>;

pub(crate) fn fail<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// Unit roundoff of a dtype.
pub fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => f64::EPSILON / 2.0,
        DType::F32 => f32::EPSILON as f64 / 2.0,
        DType::BF16 => 2f64.powi(-8),
        _ => 2f64.powi(-11),
    }
}

/// Per-tensor ε after group resolution.
fn epsilons(case: &Case) -> Vec<f64> {
    reference::PerTensor::resolve(&case.config, case.init.len()).epsilon
}

/// The ndarray `f64` store agrees with the plain transcription of the
/// algorithm ([`reference::step`]) to 1e-12 relative.
pub fn oracle_matches_reference(case: &Case) -> Check {
    let got = run_case(&NdFactory, case, DType::F64).map_err(fail("ndarray f64 run"))?;
    let mut state = reference::State::new(host_values(&case.init));
    let mut want = crate::Outcome {
        params: Vec::new(),
        base_state: amp_core::OptimizerState::default(),
        losses: Vec::new(),
        perturbed_losses: Vec::new(),
        perturbation_norms: Vec::new(),
        clipped: got.clipped.clone(),
        closure_calls: 0,
    };
    for _ in 0..case.steps {
        let r = reference::step(
            &mut state,
            &case.objective,
            &case.config,
            &case.sgd,
            case.adam.as_ref(),
        );
        want.losses.push(r.loss);
        want.perturbed_losses.push(r.perturbed_losses);
        want.perturbation_norms.push(r.perturbation_norms);
        want.closure_calls += r.calls;
    }
    let as_host = |v: &[f64], like: &HostTensor| {
        let mut t = like.clone().with_dtype(DType::F64);
        t.data_mut().copy_from_slice(v);
        t
    };
    want.params = state
        .params
        .iter()
        .zip(&case.init)
        .map(|(v, like)| as_host(v, like))
        .collect();
    let as_buffer = |b: &[Option<Vec<f64>>]| -> Vec<Option<HostTensor>> {
        b.iter()
            .zip(&case.init)
            .map(|(v, like)| v.as_ref().map(|v| as_host(v, like)))
            .collect()
    };
    let buffers = &mut want.base_state.buffers;
    match &case.adam {
        Some(adam) => {
            buffers.push(("exp_avg".into(), as_buffer(&state.exp_avg)));
            buffers.push(("exp_avg_sq".into(), as_buffer(&state.exp_avg_sq)));
            if adam.amsgrad {
                buffers.push(("max_exp_avg_sq".into(), as_buffer(&state.max_exp_avg_sq)));
            }
            let steps = state.adam_steps.iter().map(|&t| t as f64).collect();
            want.base_state.scalars.push(("step".into(), steps));
        }
        None if case.sgd.momentum != 0.0 && case.steps > 0 => {
            buffers.push(("momentum_buffer".into(), as_buffer(&state.momentum)));
        }
        None => {}
    }
    compare_outcomes(case, &got, &want, Tolerance { relative: 1e-12 }, None)
}

/// The backend agrees with the ndarray `f64` oracle at the dtype's
/// [`Tolerance`] (widened where the case magnifies rounding: see
/// [`Conditioning`]): weights, momentum, losses and perturbation norms after
/// every step of the case.
pub fn matches_oracle<F: StoreFactory>(factory: &F, case: &Case, dtype: DType) -> Check {
    let got = run_case(factory, case, dtype).map_err(fail("backend run"))?;
    compare_with_oracle(case, case, &got, dtype)
        .map_err(|e| format!("{} {dtype}: {e}", factory.name()))
}

/// After every inner iteration, ‖(θ + δ) − θ‖ ≤ εᵢ for every tensor (up to
/// the rounding of θ + δ), and the reported ‖δ_K‖ ≤ εᵢ.
pub fn projection_bound<F: StoreFactory>(factory: &F, case: &Case, dtype: DType) -> Check {
    let store = factory.make(&case.init, dtype).map_err(fail("make"))?;
    let mut amp = case.build(store).map_err(fail("build"))?;
    let eps = epsilons(case);
    let u = unit_roundoff(dtype);
    let calls = Cell::new(0);
    let clean: RefCell<Vec<HostTensor>> = RefCell::new(Vec::new());
    let violation: RefCell<Option<String>> = RefCell::new(None);
    for _ in 0..case.steps {
        let mut inner = case.objective.grad_fn(&calls, Fault::None);
        let report = amp
            .step(|s: &mut F::Store, pass: Pass| {
                let now = read_slot(s, Slot::Params)?;
                if pass.is_clean() {
                    *clean.borrow_mut() = now;
                } else {
                    for (i, (p, t)) in now.iter().zip(clean.borrow().iter()).enumerate() {
                        let delta: f64 = p
                            .data()
                            .iter()
                            .zip(t.data())
                            .map(|(a, b)| (a - b) * (a - b))
                            .sum::<f64>()
                            .sqrt();
                        let max_abs = t.data().iter().fold(0.0f64, |m, x| m.max(x.abs()));
                        let slack = eps[i] * 8.0 * u
                            + (p.data().len() as f64).sqrt() * (max_abs + eps[i]) * 4.0 * u;
                        if delta > eps[i] + slack {
                            *violation.borrow_mut() = Some(format!(
                                "{pass}: ‖δ[{i}]‖ = {delta:e} > ε = {:e} (+ slack {slack:e})",
                                eps[i]
                            ));
                        }
                    }
                }
                inner(s, pass)
            })
            .map_err(fail("step"))?;
        if let Some(v) = violation.borrow_mut().take() {
            return Err(v);
        }
        for (i, &norm) in report.perturbation_norms.iter().enumerate() {
            if norm > eps[i] * (1.0 + 16.0 * u) {
                return Err(format!("reported ‖δ[{i}]‖ = {norm:e} > ε = {:e}", eps[i]));
            }
        }
    }
    Ok(())
}

/// With every learning rate and weight decay 0, a step leaves θ unchanged:
/// bit for bit with copy-restore, within a few ulps with subtract-restore.
pub fn restore<F: StoreFactory>(factory: &F, case: &Case, dtype: DType) -> Check {
    let mut case = case.clone();
    case.config.lr = 0.0;
    case.config.weight_decay = 0.0;
    for g in &mut case.config.groups {
        g.lr = Some(0.0);
        g.weight_decay = Some(0.0);
    }
    let initial = read_slot(
        &factory.make(&case.init, dtype).map_err(fail("make"))?,
        Slot::Params,
    )
    .map_err(fail("read"))?;
    let out = run_case(factory, &case, dtype).map_err(fail("run"))?;
    match case.config.restore {
        RestoreMode::Copy => {
            for (i, (a, b)) in out.params.iter().zip(&initial).enumerate() {
                let same = a
                    .data()
                    .iter()
                    .zip(b.data())
                    .all(|(x, y)| x.to_bits() == y.to_bits());
                if !same {
                    return Err(format!("copy-restore changed tensor {i}"));
                }
            }
            Ok(())
        }
        RestoreMode::Subtract => {
            let eps = epsilons(&case);
            let u = unit_roundoff(dtype);
            let k = case.config.inner_iter as f64;
            for (i, (a, b)) in out.params.iter().zip(&initial).enumerate() {
                for (x, y) in a.data().iter().zip(b.data()) {
                    // Each θ + δ − δ rounds twice per inner iteration.
                    let bound = 4.0 * (k + 1.0) * case.steps as f64 * u * (y.abs() + eps[i]);
                    if (x - y).abs() > bound {
                        return Err(format!(
                            "subtract-restore drifted tensor {i}: {x:e} vs {y:e} (bound {bound:e})"
                        ));
                    }
                }
            }
            Ok(())
        }
    }
}

/// `inner_iter = 0` and `ε = 0` both reproduce the plain base optimiser
/// (SGD or Adam), bit for bit with each other (δ = 0 exactly, so the
/// perturbed passes see θ itself): weights and the optimiser's state.
pub fn k0_and_eps0_equal_base<F: StoreFactory>(factory: &F, case: &Case, dtype: DType) -> Check {
    let mut erm = case.clone();
    erm.config.inner_iter = 0;
    let mut eps0 = case.clone();
    eps0.config.epsilon = 0.0;
    eps0.config.inner_iter = eps0.config.inner_iter.max(1);
    for g in &mut eps0.config.groups {
        g.epsilon = Some(0.0);
    }
    let a = run_case(factory, &erm, dtype).map_err(fail("K = 0 run"))?;
    let b = run_case(factory, &eps0, dtype).map_err(fail("ε = 0 run"))?;
    let bits = |t: &[HostTensor]| -> Vec<Vec<u64>> {
        t.iter()
            .map(|t| t.data().iter().map(|x| x.to_bits()).collect())
            .collect()
    };
    if bits(&a.params) != bits(&b.params) {
        return Err("K = 0 and ε = 0 give different weights".into());
    }
    let flat = |s: &amp_core::OptimizerState| -> Vec<(String, Vec<Option<Vec<u64>>>)> {
        s.buffers
            .iter()
            .map(|(name, tensors)| {
                let tensors = tensors
                    .iter()
                    .map(|t| {
                        t.as_ref()
                            .map(|t| t.data().iter().map(|x| x.to_bits()).collect())
                    })
                    .collect();
                (name.clone(), tensors)
            })
            .collect()
    };
    if flat(&a.base_state) != flat(&b.base_state) || a.base_state.scalars != b.base_state.scalars {
        return Err("K = 0 and ε = 0 give different optimiser states".into());
    }
    // And K = 0 is the plain optimiser: compare with the oracle at the
    // dtype tolerance.
    matches_oracle(factory, &erm, dtype)
}

/// The closure is called exactly K + 1 times per step.
pub fn closure_calls<F: StoreFactory>(factory: &F, case: &Case, dtype: DType) -> Check {
    let out = run_case(factory, case, dtype).map_err(fail("run"))?;
    let want: usize = (0..case.steps).map(|s| case.calls_at(s)).sum();
    if out.closure_calls == want {
        Ok(())
    } else {
        Err(format!(
            "{} closure calls, expected {want}",
            out.closure_calls
        ))
    }
}

/// The base optimiser receives the gradient taken at θ + δ_K: with plain SGD
/// (no momentum, no weight decay), one step gives θ − lr·g(θ + δ_K), where
/// g(θ + δ_K) is what the closure wrote on its last call.
pub fn base_step_uses_perturbed_gradient<F: StoreFactory>(
    factory: &F,
    case: &Case,
    dtype: DType,
) -> Check {
    let mut case = case.clone();
    case.sgd = amp_core::SgdConfig::default();
    case.adam = None;
    case.config.weight_decay = 0.0;
    for g in &mut case.config.groups {
        g.weight_decay = Some(0.0);
    }
    let store = factory.make(&case.init, dtype).map_err(fail("make"))?;
    let mut amp = case.build(store).map_err(fail("build"))?;
    let theta = read_slot(amp.store(), Slot::Params).map_err(fail("read"))?;
    let calls = Cell::new(0);
    let last_grads: RefCell<Vec<HostTensor>> = RefCell::new(Vec::new());
    let mut inner = case.objective.grad_fn(&calls, Fault::None);
    amp.step(|s: &mut F::Store, pass: Pass| {
        let r = inner(s, pass)?;
        *last_grads.borrow_mut() = read_slot(s, Slot::Grads)?;
        Ok::<_, AmpError>(r)
    })
    .map_err(fail("step"))?;
    let lr = reference::PerTensor::resolve(&case.config, case.init.len()).lr;
    let got = read_slot(amp.store(), Slot::Params).map_err(fail("read"))?;
    let want: Vec<HostTensor> = theta
        .iter()
        .zip(last_grads.borrow().iter())
        .enumerate()
        .map(|(i, (t, g))| {
            let mut stepped = t.clone();
            for (p, g) in stepped.data_mut().iter_mut().zip(g.data()) {
                *p -= lr[i] * g;
            }
            stepped
        })
        .collect();
    crate::compare_tensors(
        "θ − lr·g(θ + δ_K)",
        &got,
        &want,
        &theta,
        Tolerance::for_dtype(dtype),
        1,
    )
}

/// A failure injected at every closure call of a step — an error, a NaN
/// loss, a NaN gradient, a panic — ends the step with the matching error
/// (or lets the panic through) and leaves weights and momentum as they were:
/// bit for bit with copy-restore, within rounding with subtract-restore. The
/// optimiser then keeps working. Every step runs under `catch_unwind`, so a
/// panic where none was injected is reported as a failure of the property.
pub fn failure_leaves_state<F: StoreFactory>(factory: &F, case: &Case, dtype: DType) -> Check {
    crate::quiet_injected_panics();
    // Fail in the last step, after the earlier ones built momentum.
    let warmup = case.steps.saturating_sub(1);
    let per_step = case.calls_at(warmup);
    let before: usize = (0..warmup).map(|s| case.calls_at(s)).sum();
    for n in 1..=per_step {
        for fault_kind in 0..4 {
            let call = before + n;
            let fault = match fault_kind {
                0 => Fault::Error(call),
                1 => Fault::NanLoss(call),
                2 => Fault::NanGradient(call),
                _ => Fault::Panic(call),
            };
            let has_element = case
                .init
                .iter()
                .zip(&case.objective.frozen)
                .any(|(t, &frozen)| !frozen && !t.data().is_empty());
            if matches!(fault, Fault::NanGradient(_)) && !has_element {
                continue;
            }
            let store = factory.make(&case.init, dtype).map_err(fail("make"))?;
            let mut amp = case.build(store).map_err(fail("build"))?;
            let calls = Cell::new(0);
            for _ in 0..warmup {
                guarded(|| amp.step(case.objective.grad_fn(&calls, fault)))
                    .map_err(fail("warm-up step"))?;
            }
            let before = read_slot(amp.store(), Slot::Params).map_err(fail("read"))?;
            let state_before = base_state(&amp).map_err(fail("state"))?;
            let result = guarded(|| amp.step(case.objective.grad_fn(&calls, fault)));
            let expected_kind = matches!(
                (&result, fault),
                (Err(Ended::Error(AmpError::Closure { .. })), Fault::Error(_))
                    | (
                        Err(Ended::Error(AmpError::NonFiniteLoss { .. })),
                        Fault::NanLoss(_)
                    )
                    | (
                        Err(Ended::Error(AmpError::NonFiniteGradient { .. })),
                        Fault::NanGradient(_)
                    )
                    | (Err(Ended::Panic), Fault::Panic(_))
            );
            if !expected_kind {
                return Err(format!("{fault:?}: step returned {:?}", result.map(|_| ())));
            }
            let after = read_slot(amp.store(), Slot::Params).map_err(fail("read"))?;
            let state_after = base_state(&amp).map_err(fail("state"))?;
            if state_after != state_before {
                return Err(format!("{fault:?}: the optimiser's state changed"));
            }
            unchanged(case, dtype, &before, &after).map_err(|e| format!("{fault:?}: {e}"))?;
            // The next step succeeds and closes the gap to the oracle's step.
            guarded(|| amp.step(case.objective.grad_fn(&calls, Fault::None)))
                .map_err(fail("step after failure"))?;
        }
    }
    Ok(())
}

/// How a step guarded by [`guarded`] ended, when it did not succeed.
#[derive(Debug)]
enum Ended {
    Error(AmpError),
    Panic,
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::Error(error) => write!(f, "{error}"),
            Ended::Panic => write!(f, "panicked"),
        }
    }
}

/// Runs `step` under `catch_unwind`.
fn guarded<T>(step: impl FnOnce() -> amp_core::Result<T>) -> Result<T, Ended> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(step)) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(Ended::Error(error)),
        Err(_) => Err(Ended::Panic),
    }
}

/// θ after a failed step against θ before it: bit for bit with
/// copy-restore, within rounding with subtract-restore.
pub(crate) fn unchanged(
    case: &Case,
    dtype: DType,
    before: &[HostTensor],
    after: &[HostTensor],
) -> Check {
    let per_step = case.config.inner_iter + 1;
    let u = unit_roundoff(dtype);
    let eps = epsilons(case);
    for (i, (a, b)) in after.iter().zip(before).enumerate() {
        for (x, y) in a.data().iter().zip(b.data()) {
            let ok = match case.config.restore {
                RestoreMode::Copy => x.to_bits() == y.to_bits(),
                RestoreMode::Subtract => {
                    (x - y).abs() <= 4.0 * (per_step as f64 + 1.0) * u * (y.abs() + eps[i])
                }
            };
            if !ok {
                return Err(format!("tensor {i} changed: {x:e} vs {y:e}"));
            }
        }
    }
    Ok(())
}

/// An optimiser over a [`FaultyStore`], warmed up, with its closure-call
/// counter.
type Armed<S> = (Amp<FaultyStore<S>, CaseBase>, Cell<usize>);

/// A named optimiser buffer, one optional tensor per parameter.
type NamedBuffer = (String, Vec<Option<HostTensor>>);

/// The state an optimiser holds; buffers allocated but not yet written for
/// any tensor hold none.
fn held_state<S: ParamStore>(amp: &Amp<S, CaseBase>) -> Result<Vec<NamedBuffer>, String> {
    let held = base_state(amp).map_err(fail("state"))?;
    Ok(held
        .buffers
        .into_iter()
        .filter(|(_, tensors)| tensors.iter().any(Option::is_some))
        .collect())
}

/// A panic or an error inside any store operation of a perturbing step
/// (copy-restore, K ≥ 1) — each operation in turn — leaves θ bit for bit as it was, and the
/// momentum as it was unless an operation that completed before the fault
/// had written the momentum buffer (SGD updates it in place; see [`Amp`]'s
/// docs). The optimiser then keeps working.
pub fn store_panic_leaves_state<F: StoreFactory>(factory: &F, case: &Case, dtype: DType) -> Check {
    let warmup = case.steps.saturating_sub(1);
    // A step that does not perturb (K = 0, or a plain step of the recipes)
    // has no snapshot of θ to come back to; see `Amp`.
    if case.config.restore != RestoreMode::Copy || !case.perturbs_at(warmup) {
        return Ok(());
    }
    crate::quiet_injected_panics();
    let build = || -> Result<Armed<F::Store>, String> {
        let store = FaultyStore::new(factory.make(&case.init, dtype).map_err(fail("make"))?);
        let mut amp = case.build(store).map_err(fail("build"))?;
        let calls = Cell::new(0);
        for _ in 0..warmup {
            amp.step(case.objective.grad_fn(&calls, Fault::None))
                .map_err(fail("warm-up step"))?;
        }
        Ok((amp, calls))
    };
    // How many store operations the last step makes.
    let (mut amp, calls) = build()?;
    amp.store().count();
    amp.step(case.objective.grad_fn(&calls, Fault::None))
        .map_err(fail("counted step"))?;
    let operations = amp.store().seen();
    for n in 0..operations {
        for panics in [true, false] {
            let at = format!(
                "{} in operation {n} of {operations}",
                if panics { "panic" } else { "error" }
            );
            let (mut amp, calls) = build()?;
            let before = read_slot(amp.store(), Slot::Params).map_err(fail("read"))?;
            let state_before = held_state(&amp)?;
            if panics {
                amp.store().arm(n);
            } else {
                amp.store().arm_error(n);
            }
            let result = guarded(|| amp.step(case.objective.grad_fn(&calls, Fault::None)));
            let expected = match &result {
                Err(Ended::Panic) => panics,
                Err(Ended::Error(_)) => !panics,
                Ok(_) => false,
            };
            if !expected {
                return Err(format!("{at}: the step returned {:?}", result.map(|_| ())));
            }
            let after = read_slot(amp.store(), Slot::Params).map_err(fail("read"))?;
            unchanged(case, dtype, &before, &after).map_err(|e| format!("{at}: {e}"))?;
            // Read after the step: the first step allocates the buffers.
            let written = amp
                .base()
                .buffers()
                .into_iter()
                .any(|id| amp.store().wrote(Slot::Buffer(id)));
            if !written && held_state(&amp)? != state_before {
                return Err(format!("{at}: the optimiser's state changed"));
            }
            amp.step(case.objective.grad_fn(&calls, Fault::None))
                .map_err(fail("step after the fault"))?;
        }
    }
    Ok(())
}

/// The store's own [`ParamStore::perturb_from_grads`] and
/// [`ParamStore::axpy_from`] (fused on some backends) give bit for bit what
/// the unfused sequences of [`amp_core::composed`] give on a second store
/// with the same values: weights, snapshot, δ and norms; and its
/// [`ParamStore::addcmul`], [`ParamStore::maximum`] and
/// [`ParamStore::addcdiv_sqrt`] give the bits of the host defaults, whose
/// formulas are [`amp_core::elementwise`]; its [`ParamStore::sgd_update`]
/// gives the bits of [`amp_core::composed::sgd_update`] (weights and
/// momentum buffer, with and without Nesterov, dampening, weight decay and
/// first steps).
pub fn fused_ops_match_composed<F: StoreFactory>(factory: &F, case: &Case, dtype: DType) -> Check {
    let n = case.init.len();
    let per = reference::PerTensor::resolve(&case.config, n);
    let scalars = |v: &[f64]| -> Vec<<F::Store as ParamStore>::Scalar> {
        v.iter()
            .map(|&x| amp_core::Scalar::from_f64_rounded(x))
            .collect()
    };
    let (inner_lr, epsilon) = (scalars(&per.inner_lr), scalars(&per.epsilon));
    // A snapshot when restoring by copy, δ kept when more than one inner
    // iteration or subtract-restore needs it: the shapes Amp asks for.
    let copy = case.config.restore == RestoreMode::Copy;
    let keep_delta = !copy || case.config.inner_iter > 1;
    let alpha = scalars(&per.lr.iter().map(|lr| -lr).collect::<Vec<_>>());
    let coefficient = scalars(&vec![0.3; n]);
    let divisor = scalars(&vec![0.7; n]);
    let adam_eps = scalars(&vec![1e-8; n]);
    let run = |fused: bool| -> amp_core::Result<(Vec<Vec<HostTensor>>, Vec<f64>)> {
        let mut store = factory.make(&case.init, dtype)?;
        let calls = Cell::new(0);
        let mut grad_fn = case.objective.grad_fn::<F::Store>(&calls, Fault::None);
        store.zero_grads()?;
        grad_fn(&mut store, Pass::Clean)?;
        let mask = store.grad_mask()?;
        let snapshot = store.alloc_buffer()?;
        let delta = store.alloc_buffer()?;
        let snapshot_slot = copy.then_some(Slot::Buffer(snapshot));
        let delta_slot = keep_delta.then_some(Slot::Buffer(delta));
        let norms = if fused {
            store.perturb_from_grads(snapshot_slot, delta_slot, &inner_lr, &epsilon, &mask)?
        } else {
            amp_core::composed::perturb_from_grads(
                &mut store,
                snapshot_slot,
                delta_slot,
                &inner_lr,
                &epsilon,
                &mask,
            )?
        };
        let norms = store.norms_to_host(&norms)?;
        let mut slots = vec![
            read_slot(&store, Slot::Params)?,
            read_slot(&store, Slot::Buffer(snapshot))?,
            read_slot(&store, Slot::Buffer(delta))?,
        ];
        // θ_new = snapshot − lr · g at the perturbed weights, as SGD's last
        // operation computes it after AMP's inner loop.
        store.zero_grads()?;
        grad_fn(&mut store, Pass::Perturbed { k: 1, of: 1 })?;
        let base = snapshot_slot.unwrap_or(Slot::Params);
        if fused {
            store.axpy_from(Slot::Params, base, &alpha, Slot::Grads, &mask)?;
        } else {
            amp_core::composed::axpy_from(
                &mut store,
                Slot::Params,
                base,
                &alpha,
                Slot::Grads,
                &mask,
            )?;
        }
        slots.push(read_slot(&store, Slot::Params)?);
        // Adam's element-wise operations: on values of both signs, and a
        // square root of squares.
        let (snap, del, sq) = (
            Slot::Buffer(snapshot),
            Slot::Buffer(delta),
            Slot::Buffer(store.alloc_buffer()?),
        );
        if fused {
            store.addcmul(sq, &coefficient, Slot::Grads, Slot::Grads, &mask)?;
            store.addcmul(del, &coefficient, Slot::Grads, snap, &mask)?;
            store.maximum(sq, del, &mask)?;
            store.addcdiv_sqrt(Slot::Params, &alpha, snap, sq, &divisor, &adam_eps, &mask)?;
        } else {
            use amp_core::composed;
            composed::addcmul(
                &mut store,
                sq,
                &coefficient,
                Slot::Grads,
                Slot::Grads,
                &mask,
            )?;
            composed::addcmul(&mut store, del, &coefficient, Slot::Grads, snap, &mask)?;
            composed::maximum(&mut store, sq, del, &mask)?;
            composed::addcdiv_sqrt(
                &mut store,
                Slot::Params,
                &alpha,
                snap,
                sq,
                &divisor,
                &adam_eps,
                &mask,
            )?;
        }
        for slot in [del, sq, Slot::Params] {
            slots.push(read_slot(&store, slot)?);
        }
        // SGD's fused step three ways: Nesterov momentum reading θ from the
        // snapshot, dampened momentum on θ itself with some tensors on their
        // first step, no momentum; weight decay on every other tensor. The
        // gradient slot is left unspecified by each, so it is taken afresh.
        // (From θ as the snapshot holds it: libtorch's Adam step above may
        // differ from the default by an ulp.)
        store.copy(Slot::Params, snap, &mask)?;
        let buffer = Slot::Buffer(store.alloc_buffer()?);
        let momenta = [Some((0.9, 1.0, true)), Some((0.9, 0.75, false)), None];
        for (round, momentum) in momenta.into_iter().enumerate() {
            if round > 0 {
                store.zero_grads()?;
                grad_fn(&mut store, Pass::Clean)?;
            }
            let momentum = momentum.map(|(mu, keep, nesterov)| amp_core::SgdMomentum {
                buffer,
                momentum: amp_core::Scalar::from_f64_rounded(mu),
                keep: amp_core::Scalar::from_f64_rounded(keep),
                nesterov,
            });
            let coefficients: Vec<_> = (0..n)
                .map(|i| amp_core::SgdCoefficients {
                    weight_decay: amp_core::Scalar::from_f64_rounded(if i % 2 == 0 {
                        0.05
                    } else {
                        0.0
                    }),
                    step: alpha[i],
                    first: round == 0 || i % 3 == 0,
                })
                .collect();
            let weights = if round == 0 { snap } else { Slot::Params };
            if fused {
                store.sgd_update(weights, momentum.as_ref(), &coefficients, &mask)?;
            } else {
                amp_core::composed::sgd_update(
                    &mut store,
                    weights,
                    momentum.as_ref(),
                    &coefficients,
                    &mask,
                )?;
            }
            slots.push(read_slot(&store, Slot::Params)?);
            slots.push(read_slot(&store, buffer)?);
        }
        Ok((slots, norms))
    };
    let (got, got_norms) = run(true).map_err(fail("fused"))?;
    let (want, want_norms) = run(false).map_err(fail("composed"))?;
    let same = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
    if !same(&got_norms, &want_norms) {
        return Err(format!(
            "{} {dtype}: norms differ: {got_norms:?} vs {want_norms:?}",
            factory.name()
        ));
    }
    let names = [
        "θ + δ",
        "snapshot",
        "δ",
        "θ after axpy_from",
        "addcmul(δ, c, g, snapshot)",
        "maximum(addcmul(0, c, g, g), δ)",
        "θ after addcdiv_sqrt",
        "θ after sgd_update (Nesterov, from the snapshot)",
        "momentum after sgd_update (Nesterov)",
        "θ after sgd_update (dampened momentum)",
        "momentum after sgd_update (dampened)",
        "θ after sgd_update (no momentum)",
        "momentum buffer after sgd_update (no momentum: untouched)",
    ];
    let u = unit_roundoff(dtype);
    for (k, (a, b)) in got.iter().zip(&want).enumerate() {
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            for (j, (p, q)) in x.data().iter().zip(y.data()).enumerate() {
                if p.to_bits() == q.to_bits() {
                    continue;
                }
                // Adam's update takes a square root and two divisions,
                // which a framework's kernels may round differently from
                // the correctly rounded formula (ATen's do, by an ulp, where
                // amp-tch's CPU loop path does not run): a few ulps of the
                // quotient and of θ are allowed there, and only there.
                if k == 6 {
                    let (theta, num, den) = (
                        want[3][i].data()[j],
                        want[1][i].data()[j],
                        want[5][i].data()[j],
                    );
                    let quotient = per.lr[i] * num / (den.sqrt() / 0.7 + 1e-8);
                    if (p - q).abs() <= 8.0 * u * (theta.abs() + quotient.abs()) {
                        continue;
                    }
                }
                return Err(format!(
                    "{} {dtype}: {} of tensor {i} differs at element {j}: {p:e} vs {q:e}",
                    factory.name(),
                    names[k],
                ));
            }
        }
    }
    Ok(())
}

/// Runs every property above on one case and dtype; the first violation is
/// returned.
pub fn all<F: StoreFactory>(factory: &F, case: &Case, dtype: DType) -> Check {
    matches_oracle(factory, case, dtype)?;
    projection_bound(factory, case, dtype)?;
    restore(factory, case, dtype)?;
    k0_and_eps0_equal_base(factory, case, dtype)?;
    closure_calls(factory, case, dtype)?;
    base_step_uses_perturbed_gradient(factory, case, dtype)?;
    fused_ops_match_composed(factory, case, dtype)?;
    failure_leaves_state(factory, case, dtype)?;
    store_panic_leaves_state(factory, case, dtype)?;
    split_step_matches_step(factory, case, dtype)?;
    adam_update_matches_composed(factory, case, dtype)?;
    gradient_presence(factory, case, dtype)?;
    loss_scale_is_exact(factory, case, dtype)?;
    overflow_skips_the_step(factory, case, dtype)
}

/// The store's gradients as the host sees them (for tests of backends).
pub fn grads<S: ParamStore>(store: &S) -> amp_core::Result<Vec<HostTensor>> {
    read_slot(store, Slot::Grads)
}

/// Two stores of the same backend on different devices (a GPU and the CPU)
/// agree at the dtype's tolerance, step for step.
pub fn devices_agree<A: StoreFactory, B: StoreFactory>(
    device: &A,
    cpu: &B,
    case: &Case,
    dtype: DType,
) -> Check {
    let got = run_case(device, case, dtype).map_err(fail("device run"))?;
    let want = run_case(cpu, case, dtype).map_err(fail("CPU run"))?;
    let (_, conditioning) = Conditioning::oracle(case, dtype).map_err(fail("oracle run"))?;
    conditioning
        .compare(case, &got, &want, dtype)
        .map_err(|e| format!("{} against {}: {e}", device.name(), cpu.name()))
}

/// Runs [`all`] and [`devices_agree`] over `AMP_PROPTEST_CASES` generated
/// cases for a device factory, panicking with the shrunk case on failure.
/// For use in a plain `#[test]` once the test has found the device.
pub fn device_suite<A: StoreFactory, B: StoreFactory>(device: &A, cpu: &B, dtype: DType) {
    let mut runner = proptest::test_runner::TestRunner::new(crate::proptest_config());
    let result = runner.run(&crate::strategies::case(5, 4), |case| {
        let case = case.fitted_to(device);
        all(device, &case, dtype)
            .and_then(|()| devices_agree(device, cpu, &case, dtype))
            .map_err(proptest::test_runner::TestCaseError::fail)
    });
    if let Err(e) = result {
        panic!("{} {dtype}: {e}", device.name());
    }
}
