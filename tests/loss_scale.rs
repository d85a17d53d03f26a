//! Dynamic loss scaling across AMP's passes (mixed precision): each pass's
//! gradients are unscaled before they are used, one overflow verdict skips
//! the whole step with θ and the base state untouched, and the scale moves
//! as PyTorch's `GradScaler` moves it.

use std::cell::Cell;

use amp::backend::ndarray::NdStore;
use amp::checkpoint;
use amp::{
    AdamConfig, Amp, AmpConfig, AmpError, BaseOptimizer, HostTensor, LossScale, LossScaleConfig,
    ParamStore, Pass, SgdConfig, Slot, StateOptions,
};
use ndarray::array;

type Nd = NdStore<f32>;

fn store() -> Nd {
    NdStore::from_arrays([
        array![[0.5f32, -1.0], [2.0, 0.25]].into_dyn(),
        array![1.5f32, -0.75, 0.1].into_dyn(),
    ])
}

/// `L = Σ ½ (θ − 0.3)²` over every element; the gradient `θ − 0.3` is
/// written multiplied by `scale` (what a backward pass of the scaled loss
/// gives), with an infinity in it on closure call `overflow_at` (1-based).
struct Quadratic<'a> {
    scale: f64,
    calls: &'a Cell<usize>,
    overflow_at: Option<usize>,
}

impl Quadratic<'_> {
    fn call<S: ParamStore>(&self, s: &mut S) -> Result<((), f64), AmpError> {
        let call = self.calls.get() + 1;
        self.calls.set(call);
        let mut loss = 0.0;
        for i in 0..s.num_tensors() {
            let theta = s.read(Slot::Params, i)?;
            let mut grad = theta.clone();
            for g in grad.data_mut() {
                let d = *g - 0.3;
                loss += 0.5 * d * d;
                *g = d * self.scale;
            }
            if self.overflow_at == Some(call) && i == 1 {
                grad.data_mut()[0] = f64::INFINITY;
            }
            s.write_grad(i, &grad)?;
        }
        Ok(((), loss))
    }
}

fn config(inner_iter: usize) -> AmpConfig {
    AmpConfig::new(0.1, 0.05)
        .inner_lr(1.0)
        .inner_iter(inner_iter)
        .loss_scale(LossScaleConfig::default())
}

fn params<S: ParamStore>(s: &S) -> Vec<HostTensor> {
    (0..s.num_tensors())
        .map(|i| s.read(Slot::Params, i).unwrap())
        .collect()
}

fn bits(tensors: &[HostTensor]) -> Vec<u64> {
    tensors
        .iter()
        .flat_map(|t| t.data().iter().map(|x| x.to_bits()))
        .collect()
}

/// Steps `amp` once, its closure scaling by the current scale.
fn step<O: BaseOptimizer<Nd>>(
    amp: &mut Amp<Nd, O>,
    calls: &Cell<usize>,
    overflow_at: Option<usize>,
) -> amp::StepReport<()> {
    let scale = amp.loss_scale().expect("a loss scale");
    let f = Quadratic {
        scale: scale.scale(),
        calls,
        overflow_at,
    };
    amp.step(|s: &mut Nd, _pass: Pass| f.call(s)).expect("step")
}

#[test]
fn an_overflow_at_any_pass_skips_the_step_restores_everything_and_backs_off() {
    for adam in [false, true] {
        for inner_iter in [1, 2] {
            // Overflow on the clean pass and on each perturbed pass of the
            // third step, after two steps that built the base state.
            for pass in 0..=inner_iter {
                let calls = Cell::new(0);
                let what = format!("adam {adam}, K {inner_iter}, pass {pass}");
                if adam {
                    let mut amp =
                        Amp::adam(store(), config(inner_iter), AdamConfig::adamw()).unwrap();
                    check_overflow(&mut amp, &calls, inner_iter, pass, &what);
                } else {
                    let mut amp =
                        Amp::sgd(store(), config(inner_iter), SgdConfig::nesterov(0.9)).unwrap();
                    check_overflow(&mut amp, &calls, inner_iter, pass, &what);
                }
            }
        }
    }
}

fn check_overflow<O: BaseOptimizer<Nd>>(
    amp: &mut Amp<Nd, O>,
    calls: &Cell<usize>,
    inner_iter: usize,
    pass: usize,
    what: &str,
) {
    for _ in 0..2 {
        assert!(step(amp, calls, None).skipped.is_none(), "{what}");
    }
    let theta = params(amp.store());
    let state = amp.state().unwrap();
    let scale = amp.loss_scale().unwrap().scale();
    let at = calls.get() + 1 + pass;
    let report = step(amp, calls, Some(at));
    assert!(
        matches!(report.skipped, Some(AmpError::NonFiniteGradient { .. })),
        "{what}: {:?}",
        report.skipped
    );
    // Every pass up to the overflow ran, none after it.
    assert_eq!(report.closure_calls, pass + 1, "{what}");
    assert!(pass <= inner_iter);
    assert_eq!(bits(&params(amp.store())), bits(&theta), "{what}: θ moved");
    let after = amp.state().unwrap();
    assert_eq!(after.base, state.base, "{what}: the base state changed");
    assert_eq!(amp.steps(), 2, "{what}");
    assert_eq!(amp.skipped_steps(), 1, "{what}");
    assert_eq!(amp.loss_scale().unwrap().scale(), scale / 2.0, "{what}");
    assert_eq!(after.loss_scale.unwrap().growth_tracker, 0, "{what}");
}

#[test]
fn the_scale_doubles_after_2000_steps_without_overflow_and_only_then() {
    let mut amp = Amp::sgd(store(), config(1), SgdConfig::nesterov(0.9)).unwrap();
    let calls = Cell::new(0);
    for _ in 0..1999 {
        step(&mut amp, &calls, None);
    }
    assert_eq!(amp.loss_scale().unwrap().scale(), 65536.0);
    assert_eq!(
        amp.state().unwrap().loss_scale.unwrap().growth_tracker,
        1999
    );
    step(&mut amp, &calls, None);
    assert_eq!(amp.loss_scale().unwrap().scale(), 131072.0);
    assert_eq!(amp.state().unwrap().loss_scale.unwrap().growth_tracker, 0);
    // An overflow resets the count: 1999 more steps do not grow it again.
    step(&mut amp, &calls, Some(calls.get() + 1));
    assert_eq!(amp.loss_scale().unwrap().scale(), 65536.0);
    for _ in 0..1999 {
        step(&mut amp, &calls, None);
    }
    assert_eq!(amp.loss_scale().unwrap().scale(), 65536.0);
}

#[test]
fn the_ascent_sees_unscaled_gradients_and_scaled_ones_would_break_it() {
    // Without a scale, the closure writes plain gradients.
    let unscaled = |scale_grads: f64| {
        let config = AmpConfig::new(0.1, 0.05).inner_lr(0.01).inner_iter(2);
        let mut amp = Amp::sgd(store(), config, SgdConfig::nesterov(0.9)).unwrap();
        let calls = Cell::new(0);
        let f = Quadratic {
            scale: scale_grads,
            calls: &calls,
            overflow_at: None,
        };
        let mut norms = Vec::new();
        for _ in 0..3 {
            let report = amp.step(|s: &mut Nd, _pass: Pass| f.call(s)).unwrap();
            norms.push(report.perturbation_norms);
        }
        (params(amp.store()), norms)
    };
    let (theta_plain, norms_plain) = unscaled(1.0);
    // With the scale, the closure writes gradients × 65536: the step
    // divides them back (exactly: the scale is a power of two), so the run
    // is the unscaled one bit for bit, ‖δ‖ included.
    let config = AmpConfig::new(0.1, 0.05)
        .inner_lr(0.01)
        .inner_iter(2)
        .loss_scale(LossScaleConfig::default());
    let mut amp = Amp::sgd(store(), config, SgdConfig::nesterov(0.9)).unwrap();
    let calls = Cell::new(0);
    let mut norms = Vec::new();
    for _ in 0..3 {
        norms.push(step(&mut amp, &calls, None).perturbation_norms);
    }
    assert_eq!(bits(&params(amp.store())), bits(&theta_plain));
    assert_eq!(norms, norms_plain);
    // ζ‖g‖ < ε here, so δ stays inside its ball ...
    assert!(norms_plain.iter().flatten().all(|&n| n < 0.05 * 0.99));
    // ... but fed the scaled gradients (the loss scale left in), every δ is
    // pushed to the edge of the ball and training takes another path.
    let (theta_bug, norms_bug) = unscaled(65536.0);
    assert!(norms_bug.iter().flatten().all(|&n| (n - 0.05).abs() < 1e-6));
    assert_ne!(bits(&theta_bug), bits(&theta_plain));
}

#[test]
fn a_closure_that_clips_unscales_first_and_the_step_does_not_unscale_twice() {
    // Clipping the gradient's global norm at 0.5 inside the closure: with
    // the scale, after `unscale_grads`; without, directly. Same bits.
    let run = |with_scale: bool| {
        let mut config = AmpConfig::new(0.1, 0.05).inner_iter(1);
        if with_scale {
            config = config.loss_scale(LossScaleConfig::default());
        }
        let mut amp = Amp::sgd(store(), config, SgdConfig::default()).unwrap();
        let calls = Cell::new(0);
        for _ in 0..3 {
            let scale = amp.loss_scale();
            let f = Quadratic {
                scale: scale.as_ref().map_or(1.0, LossScale::scale),
                calls: &calls,
                overflow_at: None,
            };
            amp.step(|s: &mut Nd, _pass: Pass| {
                let out = f.call(s)?;
                if let Some(scale) = &scale {
                    scale.unscale_grads(s)?;
                    scale.unscale_grads(s)?; // the second call does nothing
                }
                let mask = s.grad_mask()?;
                s.clip_grad_norm(0.5, &mask)?;
                Ok::<_, AmpError>(out)
            })
            .unwrap();
        }
        bits(&params(amp.store()))
    };
    assert_eq!(run(true), run(false));
}

#[test]
fn the_scale_round_trips_through_a_checkpoint_and_a_resumed_run_is_bit_exact() {
    let calls = Cell::new(0);
    let mut amp = Amp::sgd(store(), config(2), SgdConfig::nesterov(0.9)).unwrap();
    for n in 0..6 {
        // An overflow on the third step: the saved scale is not the initial one.
        let overflow = (n == 2).then(|| calls.get() + 2);
        step(&mut amp, &calls, overflow);
    }
    let bytes = checkpoint::to_bytes(&amp).unwrap();
    let saved = amp.state().unwrap().loss_scale.unwrap();
    assert_eq!((saved.scale, saved.growth_tracker), (32768.0, 3));

    let mut resumed = Amp::sgd(store(), config(2), SgdConfig::nesterov(0.9)).unwrap();
    checkpoint::from_bytes(&mut resumed, &bytes).unwrap();
    assert_eq!(resumed.state().unwrap(), amp.state().unwrap());
    let calls_resumed = Cell::new(calls.get());
    for n in 0..4 {
        let overflow = (n == 1).then(|| calls.get() + 1);
        step(&mut amp, &calls, overflow);
        let overflow = (n == 1).then(|| calls_resumed.get() + 1);
        step(&mut resumed, &calls_resumed, overflow);
    }
    assert_eq!(bits(&params(resumed.store())), bits(&params(amp.store())));
    assert_eq!(resumed.state().unwrap(), amp.state().unwrap());
}

#[test]
fn states_with_and_without_a_scale_do_not_mix_unless_asked() {
    let calls = Cell::new(0);
    let mut scaled = Amp::sgd(store(), config(1), SgdConfig::default()).unwrap();
    step(&mut scaled, &calls, None);
    let mut plain = Amp::sgd(store(), AmpConfig::new(0.1, 0.05), SgdConfig::default()).unwrap();
    let refused = plain.load_state(&scaled.state().unwrap()).unwrap_err();
    assert!(matches!(refused, AmpError::InvalidState(_)), "{refused}");
    let refused = scaled.load_state(&plain.state().unwrap()).unwrap_err();
    assert!(matches!(refused, AmpError::InvalidState(_)), "{refused}");
    // Keeping the optimiser's hyper-parameters: a plain state starts the
    // scale where the optimiser has it.
    let keep = StateOptions::default().keep_hyperparameters(true);
    scaled
        .load_state_with(&plain.state().unwrap(), &keep)
        .unwrap();
    assert_eq!(scaled.loss_scale().unwrap().scale(), 65536.0);
    // A scale outside [MIN_SCALE, MAX_SCALE] is refused.
    let mut state = scaled.state().unwrap();
    state.loss_scale.as_mut().unwrap().scale = f64::INFINITY;
    assert!(scaled.load_state(&state).is_err());
}

#[test]
fn bad_settings_and_the_split_step_are_refused() {
    for bad in [
        LossScaleConfig::default().init_scale(0.0),
        LossScaleConfig::default().init_scale(f64::NAN),
        LossScaleConfig::default().growth_factor(1.0),
        LossScaleConfig::default().backoff_factor(1.0),
        LossScaleConfig::default().backoff_factor(0.0),
        LossScaleConfig::default().growth_interval(0),
    ] {
        let config = AmpConfig::new(0.1, 0.05).loss_scale(bad);
        let error = Amp::sgd(store(), config, SgdConfig::default()).err();
        assert!(
            matches!(error, Some(AmpError::InvalidConfig { .. })),
            "{bad:?}: {error:?}"
        );
    }
    let mut split = Amp::external(store(), config(1)).unwrap();
    let error = split.perturb().err();
    assert!(
        matches!(
            error,
            Some(AmpError::InvalidConfig {
                field: "loss_scale",
                ..
            })
        ),
        "{error:?}"
    );
}
