//! The split step ([`Amp::perturb`]) against [`Amp::step`].

use std::cell::Cell;

use amp_core::{Amp, BaseOptimizer, DType, ParamStore, Pass, Scalar, Slot, StepContext};

use crate::{base_state, read_slot, reference, Case, CaseBase, Fault, StoreFactory};

type Check = std::result::Result<(), String>;

/// The split step — [`Amp::perturb_with`], the last perturbed pass run by
/// the caller, [`Perturbed::restore`](amp_core::Perturbed::restore), then
/// the base optimiser stepped by the caller as a foreign one — gives bit
/// for bit what [`Amp::step`] gives: weights and optimiser state after
/// every step of the case.
pub fn split_step_matches_step<F: StoreFactory>(factory: &F, case: &Case, dtype: DType) -> Check {
    let fail = |what: &'static str| move |e: amp_core::AmpError| format!("{what}: {e}");
    let store = factory.make(&case.init, dtype).map_err(fail("make"))?;
    let mut whole = case.build(store).map_err(fail("build"))?;
    let store = factory.make(&case.init, dtype).map_err(fail("make"))?;
    let mut split = Amp::external(store, case.config.clone()).map_err(fail("build split"))?;
    let mut foreign = CaseBase::new(case.sgd, case.adam).map_err(fail("base"))?;

    let n = case.init.len();
    let per = reference::PerTensor::resolve(&case.config, n);
    let scalars = |v: &[f64]| -> Vec<<F::Store as ParamStore>::Scalar> {
        v.iter().map(|&x| Scalar::from_f64_rounded(x)).collect()
    };
    let (lr, weight_decay) = (scalars(&per.lr), scalars(&per.weight_decay));
    let calls = Cell::new(0);
    for step in 0..case.steps {
        let report = whole
            .step(case.objective.grad_fn(&calls, Fault::None))
            .map_err(fail("step"))?;

        // The split step, driven from outside.
        let mut grad_fn = case.objective.grad_fn::<F::Store>(&calls, Fault::None);
        let taken = split.steps();
        let store = split.store_mut();
        store.zero_grads().map_err(fail("zero"))?;
        grad_fn(store, Pass::Clean).map_err(fail("clean pass"))?;
        let mut guard = split.perturb_with(&mut grad_fn).map_err(fail("perturb"))?;
        if guard.perturbed() != report.perturbed {
            return Err(format!(
                "step {step}: perturb moved the weights: {}, step: {}",
                guard.perturbed(),
                report.perturbed
            ));
        }
        if guard.perturbed() {
            let pass = guard.pass();
            grad_fn(guard.store_mut(), pass).map_err(fail("last pass"))?;
        }
        guard.restore().map_err(fail("restore"))?;
        let mask = split.store().grad_mask().map_err(fail("mask"))?;
        let ctx = StepContext {
            lr: &lr,
            weight_decay: &weight_decay,
            mask: &mask,
            step: taken,
        };
        foreign
            .step(split.store_mut(), &ctx)
            .map_err(fail("foreign step"))?;

        let bits = |s: &F::Store| -> Result<Vec<Vec<u64>>, String> {
            Ok(read_slot(s, Slot::Params)
                .map_err(fail("read"))?
                .iter()
                .map(|t| t.data().iter().map(|x| x.to_bits()).collect())
                .collect())
        };
        if bits(whole.store())? != bits(split.store())? {
            return Err(format!("step {step}: the split step gives other weights"));
        }
        let theirs = foreign.save_state(split.store()).map_err(fail("state"))?;
        if base_state(&whole).map_err(fail("state"))? != theirs {
            return Err(format!(
                "step {step}: the split step gives another optimiser state"
            ));
        }
    }
    if split.steps() != whole.steps() {
        return Err(format!(
            "{} split steps counted, {} steps",
            split.steps(),
            whole.steps()
        ));
    }
    Ok(())
}

/// The store's own [`ParamStore::adam_update`] (fused on some backends)
/// gives bit for bit what [`amp_core::composed::adam_update`] gives on a
/// second store with the same values: θ and the three moments, with
/// decoupled decay on some tensors and L2 decay on the others.
pub fn adam_update_matches_composed<F: StoreFactory>(
    factory: &F,
    case: &Case,
    dtype: DType,
) -> Check {
    let n = case.init.len();
    let round = <F::Store as ParamStore>::Scalar::from_f64_rounded;
    let coefficients: Vec<amp_core::AdamCoefficients<_>> = (0..n)
        .map(|i| amp_core::AdamCoefficients {
            shrink: round(if i % 2 == 0 { 0.99 } else { 1.0 }),
            l2: round(if i % 2 == 0 { 0.0 } else { 0.01 }),
            beta1: (round(0.9), round(0.1)),
            beta2: (round(0.999), round(0.001)),
            step: round(-0.01 / 0.19),
            divisor: round(0.7),
            eps: round(1e-8),
        })
        .collect();
    let run = |fused: bool| -> amp_core::Result<Vec<Vec<Vec<u64>>>> {
        let mut store = factory.make(&case.init, dtype)?;
        let calls = Cell::new(0);
        let mut grad_fn = case.objective.grad_fn::<F::Store>(&calls, Fault::None);
        store.zero_grads()?;
        grad_fn(&mut store, Pass::Clean)?;
        let mask = store.grad_mask()?;
        let ones = vec![round(1.0); n];
        let (m, v, max) = (
            Slot::Buffer(store.alloc_buffer()?),
            Slot::Buffer(store.alloc_buffer()?),
            Slot::Buffer(store.alloc_buffer()?),
        );
        // m = θ (both signs), v = g², max = v / 2 (so that v wins).
        store.copy(m, Slot::Params, &mask)?;
        store.addcmul(v, &ones, Slot::Grads, Slot::Grads, &mask)?;
        store.copy(max, v, &mask)?;
        store.scale(max, &vec![round(0.5); n], &mask)?;
        let slots = amp_core::AdamSlots {
            exp_avg: m,
            exp_avg_sq: v,
            max_exp_avg_sq: Some(max),
        };
        for amsgrad in [true, false] {
            // The gradient slot is unspecified after an update: a fresh one.
            store.zero_grads()?;
            grad_fn(&mut store, Pass::Clean)?;
            let slots = amp_core::AdamSlots {
                max_exp_avg_sq: slots.max_exp_avg_sq.filter(|_| amsgrad),
                ..slots
            };
            if fused {
                store.adam_update(slots, &coefficients, &mask)?;
            } else {
                amp_core::composed::adam_update(&mut store, slots, &coefficients, &mask)?;
            }
        }
        [Slot::Params, m, v, max]
            .iter()
            .map(|&slot| {
                Ok(read_slot(&store, slot)?
                    .iter()
                    .flat_map(|t| t.data().iter().map(|x| x.to_bits()))
                    .collect())
            })
            .map(|r: amp_core::Result<Vec<u64>>| r.map(|v| vec![v]))
            .collect()
    };
    let fail = |what: &'static str| move |e: amp_core::AmpError| format!("{what}: {e}");
    let got = run(true).map_err(fail("fused"))?;
    let want = run(false).map_err(fail("composed"))?;
    for (name, (a, b)) in ["θ", "m", "v", "max"].iter().zip(got.iter().zip(&want)) {
        if a != b {
            return Err(format!(
                "{} {dtype}: adam_update gives another {name}",
                factory.name()
            ));
        }
    }
    Ok(())
}
