//! The loss scale ([`amp_core::AmpConfig::loss_scale`]) on a backend: the
//! store's own gradient operations unscale exactly, and an overflow skips
//! the step with everything as it was.

use std::cell::Cell;

use amp_core::{DType, HostTensor, LossScaleConfig, ParamStore, Pass, Slot};

use crate::properties::{fail, unchanged, Check};
use crate::{base_state, read_slot, run_case, run_case_with, Case, Fault, StoreFactory};

/// A run whose closure writes its gradients multiplied by the loss scale
/// (2¹⁶, a power of two) gives the unscaled run's outcome bit for bit: the
/// step divides each pass's gradients by the scale before it uses them.
pub fn loss_scale_is_exact<F: StoreFactory>(factory: &F, case: &Case, dtype: DType) -> Check {
    let want = run_case(factory, case, dtype).map_err(fail("unscaled run"))?;
    let mut scaled_case = case.clone();
    scaled_case.config = case.config.clone().loss_scale(LossScaleConfig::default());
    let scale = LossScaleConfig::default().init_scale;
    let calls = Cell::new(0);
    let mut inner = case.objective.grad_fn::<F::Store>(&calls, Fault::None);
    let got = run_case_with(
        factory,
        &scaled_case,
        dtype,
        |store: &mut F::Store, pass: Pass| {
            let out = inner(store, pass)?;
            // What a backward pass of the scaled loss leaves.
            let mask = store.grad_mask()?;
            for (i, &present) in mask.iter().enumerate() {
                if present {
                    let g = store.read(Slot::Grads, i)?;
                    let scaled: Vec<f64> = g.data().iter().map(|x| x * scale).collect();
                    let g = HostTensor::new(g.shape().to_vec(), g.dtype(), scaled)?;
                    store.write_grad(i, &g)?;
                }
            }
            Ok(out)
        },
        |_: &mut F::Store, _| Ok(()),
    )
    .map_err(fail("scaled run"))?;
    let bits = |t: &[HostTensor]| -> Vec<u64> {
        t.iter()
            .flat_map(|t| t.data().iter().map(|x| x.to_bits()))
            .collect()
    };
    if bits(&got.params) != bits(&want.params) {
        return Err(format!(
            "{} {dtype}: the run with a loss scale ended at other weights than the unscaled one",
            factory.name()
        ));
    }
    if got.base_state != want.base_state {
        return Err(format!(
            "{} {dtype}: the run with a loss scale left another base state",
            factory.name()
        ));
    }
    if got.perturbation_norms != want.perturbation_norms {
        return Err(format!(
            "{} {dtype}: ‖δ‖ with a loss scale {:?}, unscaled {:?}",
            factory.name(),
            got.perturbation_norms,
            want.perturbation_norms
        ));
    }
    Ok(())
}

/// With a loss scale, a NaN gradient at any pass of the last step skips it
/// whatever the non-finite policy: θ and the base state as before, the
/// skip counted, the scale halved; the next step runs.
pub fn overflow_skips_the_step<F: StoreFactory>(factory: &F, case: &Case, dtype: DType) -> Check {
    let has_element = case
        .init
        .iter()
        .zip(&case.objective.frozen)
        .any(|(t, &frozen)| !frozen && !t.data().is_empty());
    if !has_element {
        return Ok(());
    }
    let mut case = case.clone();
    case.config = case.config.clone().loss_scale(LossScaleConfig::default());
    let warmup = case.steps.saturating_sub(1);
    let before_calls: usize = (0..warmup).map(|s| case.calls_at(s)).sum();
    for n in 1..=case.calls_at(warmup) {
        let fault = Fault::NanGradient(before_calls + n);
        let store = factory.make(&case.init, dtype).map_err(fail("make"))?;
        let mut amp = case.build(store).map_err(fail("build"))?;
        let calls = Cell::new(0);
        for _ in 0..warmup {
            amp.step(case.objective.grad_fn(&calls, fault))
                .map_err(fail("warm-up step"))?;
        }
        let theta = read_slot(amp.store(), Slot::Params).map_err(fail("read"))?;
        let state = base_state(&amp).map_err(fail("state"))?;
        let scale = amp.loss_scale().map(|s| s.scale());
        let skipped = amp.skipped_steps();
        let report = amp
            .step(case.objective.grad_fn(&calls, fault))
            .map_err(|e| format!("{fault:?}: the step returned {e} instead of skipping"))?;
        if report.skipped.is_none() {
            return Err(format!("{fault:?}: the step was not skipped"));
        }
        let after = read_slot(amp.store(), Slot::Params).map_err(fail("read"))?;
        unchanged(&case, dtype, &theta, &after).map_err(|e| format!("{fault:?}: {e}"))?;
        if base_state(&amp).map_err(fail("state"))? != state {
            return Err(format!("{fault:?}: the base state changed"));
        }
        if amp.skipped_steps() != skipped + 1 {
            return Err(format!("{fault:?}: the skip was not counted"));
        }
        let halved = scale.map(|s| s / 2.0);
        if amp.loss_scale().map(|s| s.scale()) != halved {
            return Err(format!("{fault:?}: the scale did not back off"));
        }
        amp.step(case.objective.grad_fn(&calls, Fault::None))
            .map_err(fail("step after the skip"))?;
    }
    Ok(())
}
