//! The cost-cutting recipes (`interval`, `start_step`, ε following the lr)
//! and the split step's guard, on the reference backend.

use amp_core::{Amp, AmpConfig, AmpError, EpsilonSchedule, Pass, SgdConfig, StateOptions};
use amp_ndarray::NdStore;
use ndarray::{arr1, ArrayD};

/// L = ½‖θ‖², ∇L = θ.
fn half_square(s: &mut NdStore<f64>, _pass: Pass) -> Result<((), f64), AmpError> {
    let theta: ArrayD<f64> = s.params()[0].clone();
    let loss = 0.5 * theta.iter().map(|x| x * x).sum::<f64>();
    s.set_grad(0, theta)?;
    Ok(((), loss))
}

fn store() -> NdStore<f64> {
    NdStore::from_arrays([arr1(&[3.0, -4.0])])
}

/// (perturbed, closure calls) of `steps` steps.
fn pattern(config: AmpConfig, steps: usize) -> Vec<(bool, usize)> {
    let mut amp = Amp::sgd(store(), config, SgdConfig::momentum(0.9)).unwrap();
    (0..steps)
        .map(|_| {
            let r = amp.step(half_square).unwrap();
            (r.perturbed, r.closure_calls)
        })
        .collect()
}

#[test]
fn interval_perturbs_every_kth_step() {
    let got = pattern(AmpConfig::new(0.1, 0.5).interval(3), 7);
    let p = (true, 2);
    let e = (false, 1);
    assert_eq!(got, [p, e, e, p, e, e, p]);
}

#[test]
fn start_step_perturbs_from_that_step_on() {
    let got = pattern(AmpConfig::new(0.1, 0.5).start_step(2).interval(2), 6);
    let p = (true, 2);
    let e = (false, 1);
    assert_eq!(got, [e, e, p, e, p, e]);
    // And K = 0 never perturbs, whatever the recipes say.
    let erm = pattern(AmpConfig::new(0.1, 0.5).inner_iter(0), 2);
    assert_eq!(erm, [e, e]);
}

#[test]
fn recipes_are_validated_and_part_of_the_state() {
    let bad = Amp::sgd(
        store(),
        AmpConfig::new(0.1, 0.5).interval(0),
        SgdConfig::default(),
    );
    assert!(matches!(
        bad,
        Err(AmpError::InvalidConfig {
            field: "interval",
            ..
        })
    ));
    let zero_lr = AmpConfig::new(0.0, 0.5).epsilon_schedule(EpsilonSchedule::FollowLr);
    assert!(matches!(
        Amp::sgd(store(), zero_lr, SgdConfig::default()),
        Err(AmpError::InvalidConfig {
            field: "epsilon_schedule",
            ..
        })
    ));

    let mut every_second = Amp::sgd(
        store(),
        AmpConfig::new(0.1, 0.5).interval(2),
        SgdConfig::default(),
    )
    .unwrap();
    every_second.step(half_square).unwrap();
    let state = every_second.state().unwrap();
    let mut every_step = Amp::sgd(store(), AmpConfig::new(0.1, 0.5), SgdConfig::default()).unwrap();
    assert!(matches!(
        every_step.load_state(&state),
        Err(AmpError::InvalidState(_))
    ));
    let keep = StateOptions {
        keep_hyperparameters: true,
    };
    every_step.load_state_with(&state, &keep).unwrap();
    assert_eq!(every_step.steps(), 1);
}

#[test]
fn epsilon_follows_the_learning_rate() {
    // ‖∇L‖ = 5 ≫ ε, so δ is always clipped to the current ε.
    let config = AmpConfig::new(0.1, 0.5).epsilon_schedule(EpsilonSchedule::FollowLr);
    let mut amp = Amp::sgd(store(), config, SgdConfig::default()).unwrap();
    let r = amp.step(half_square).unwrap();
    assert!((r.perturbation_norms[0] - 0.5).abs() < 1e-12);
    amp.set_lr(0.025).unwrap();
    let r = amp.step(half_square).unwrap();
    assert!(
        (r.perturbation_norms[0] - 0.125).abs() < 1e-12,
        "{:?}",
        r.perturbation_norms
    );
    // A constant schedule keeps ε.
    let mut constant = Amp::sgd(store(), AmpConfig::new(0.1, 0.5), SgdConfig::default()).unwrap();
    constant.set_lr(0.025).unwrap();
    let r = constant.step(half_square).unwrap();
    assert!((r.perturbation_norms[0] - 0.5).abs() < 1e-12);
}

#[test]
fn a_dropped_guard_brings_theta_back() {
    for config in [
        AmpConfig::new(0.1, 0.5),
        AmpConfig::new(0.1, 0.5).restore(amp_core::RestoreMode::Subtract),
    ] {
        let mut amp = Amp::external(store(), config).unwrap();
        let theta = amp.store().params()[0].clone();
        half_square(amp.store_mut(), Pass::Clean).unwrap();
        {
            let guard = amp.perturb().unwrap();
            assert!(guard.perturbed());
            assert_ne!(guard.store().params()[0], theta);
            // The gradients were cleared for the caller's pass at θ + δ.
            assert!(guard.store().grad(0).is_none());
        }
        for (a, b) in amp.store().params()[0].iter().zip(&theta) {
            assert!((a - b).abs() < 1e-15);
        }
        assert_eq!(amp.steps(), 0, "a dropped guard counts no step");
    }
}

#[test]
fn a_panic_with_the_guard_alive_brings_theta_back() {
    let mut amp = Amp::external(store(), AmpConfig::new(0.1, 0.5)).unwrap();
    let theta = amp.store().params()[0].clone();
    half_square(amp.store_mut(), Pass::Clean).unwrap();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _guard = amp.perturb().unwrap();
        panic!("the model panicked at θ + δ");
    }));
    assert!(caught.is_err());
    assert_eq!(amp.store().params()[0], theta);
}

#[test]
fn the_split_step_needs_a_closure_for_several_inner_steps() {
    let config = AmpConfig::new(0.1, 0.5).inner_iter(3);
    let mut amp = Amp::external(store(), config).unwrap();
    half_square(amp.store_mut(), Pass::Clean).unwrap();
    assert!(matches!(
        amp.perturb(),
        Err(AmpError::InvalidConfig {
            field: "inner_iter",
            ..
        })
    ));
    let mut passes = Vec::new();
    let mut closure = |s: &mut NdStore<f64>, pass: Pass| {
        passes.push(pass);
        half_square(s, pass)
    };
    let guard = amp.perturb_with(&mut closure).unwrap();
    assert_eq!(guard.pass(), Pass::Perturbed { k: 3, of: 3 });
    guard.restore().unwrap();
    assert_eq!(
        passes,
        [
            Pass::Perturbed { k: 1, of: 3 },
            Pass::Perturbed { k: 2, of: 3 }
        ]
    );
    assert_eq!(amp.steps(), 1);
    // Without a base optimiser, `step` refuses to run and changes nothing.
    let theta = amp.store().params()[0].clone();
    assert!(matches!(
        amp.step(half_square),
        Err(AmpError::InvalidConfig { field: "base", .. })
    ));
    assert_eq!(amp.store().params()[0], theta);
}
