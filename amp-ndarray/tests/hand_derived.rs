//! Steps on tiny quadratics whose results are derived by hand (derivations in
//! the comments), for SGD and for AMP, plus configuration errors, frozen
//! tensors, groups and failure safety on the reference backend.

use std::cell::Cell;

use amp_core::{Amp, AmpConfig, AmpError, ParamGroup, Pass, RestoreMode, Sgd, SgdConfig, Slot};
use amp_ndarray::NdStore;
use ndarray::{arr1, ArrayD};

/// L = ½ Σ aⱼ θⱼ² on every tensor, so ∇L = a ⊙ θ; `calls` counts closure
/// calls.
fn quadratic<'a>(
    a: &'a [Vec<f64>],
    calls: &'a Cell<usize>,
) -> impl FnMut(&mut NdStore<f64>, Pass) -> Result<((), f64), AmpError> + 'a {
    move |s, _pass| {
        calls.set(calls.get() + 1);
        let mut loss = 0.0;
        for (i, a) in a.iter().enumerate() {
            let theta = s.params()[i].clone();
            let g: ArrayD<f64> = &theta * &arr1(a).into_dyn();
            loss += 0.5 * (&g * &theta).sum();
            s.set_grad(i, g)?;
        }
        Ok(((), loss))
    }
}

fn store(tensors: &[&[f64]]) -> NdStore<f64> {
    NdStore::from_arrays(tensors.iter().map(|t| arr1(t).into_dyn()))
}

fn assert_close(got: &ArrayD<f64>, want: &[f64]) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-12, "got {got}, want {want:?}");
    }
}

fn params(amp: &Amp<NdStore<f64>, Sgd>, i: usize) -> &ArrayD<f64> {
    &amp.store().params()[i]
}

#[test]
fn sgd_heavy_ball_two_steps() {
    // θ₀ = (1, −2), a = (1, 2), lr 0.1, momentum 0.9, K = 0 (plain SGD).
    // Step 1: g = (1, −4); buf = g; θ₁ = θ₀ − 0.1·buf = (0.9, −1.6).
    // Step 2: g = (0.9, −3.2); buf = 0.9·(1, −4) + g = (1.8, −6.8);
    //         θ₂ = θ₁ − 0.1·buf = (0.72, −0.92).
    let a = vec![vec![1.0, 2.0]];
    let calls = Cell::new(0);
    let config = AmpConfig::new(0.1, 0.5).inner_iter(0);
    let mut amp = Amp::sgd(store(&[&[1.0, -2.0]]), config, SgdConfig::momentum(0.9)).unwrap();
    amp.step(quadratic(&a, &calls)).unwrap();
    assert_close(params(&amp, 0), &[0.9, -1.6]);
    amp.step(quadratic(&a, &calls)).unwrap();
    assert_close(params(&amp, 0), &[0.72, -0.92]);
    assert_eq!(calls.get(), 2);
}

#[test]
fn sgd_nesterov_dampening_and_weight_decay() {
    // Nesterov, lr 0.1, m 0.9, θ₀ = 1, a = 1:
    // 1: g = 1, buf = 1, d = g + 0.9·buf = 1.9, θ₁ = 1 − 0.19 = 0.81.
    // 2: g = 0.81, buf = 0.9 + 0.81 = 1.71, d = 0.81 + 0.9·1.71 = 2.349,
    //    θ₂ = 0.81 − 0.2349 = 0.5751.
    let a = vec![vec![1.0]];
    let calls = Cell::new(0);
    let erm = AmpConfig::new(0.1, 0.5).inner_iter(0);
    let mut amp = Amp::sgd(store(&[&[1.0]]), erm.clone(), SgdConfig::nesterov(0.9)).unwrap();
    amp.step(quadratic(&a, &calls)).unwrap();
    assert_close(params(&amp, 0), &[0.81]);
    amp.step(quadratic(&a, &calls)).unwrap();
    assert_close(params(&amp, 0), &[0.5751]);

    // Dampening 0.5, m 0.9: the first step takes buf = g undamped:
    // 1: buf = 1, θ₁ = 0.9.  2: g = 0.9, buf = 0.9·1 + 0.5·0.9 = 1.35,
    //    θ₂ = 0.9 − 0.135 = 0.765.
    let damped = SgdConfig {
        momentum: 0.9,
        dampening: 0.5,
        nesterov: false,
    };
    let mut amp = Amp::sgd(store(&[&[1.0]]), erm.clone(), damped).unwrap();
    amp.step(quadratic(&a, &calls)).unwrap();
    amp.step(quadratic(&a, &calls)).unwrap();
    assert_close(params(&amp, 0), &[0.765]);

    // Weight decay 0.1: d = g + 0.1·θ = 1.1, θ₁ = 1 − 0.11 = 0.89.
    let mut amp = Amp::sgd(
        store(&[&[1.0]]),
        erm.weight_decay(0.1),
        SgdConfig::default(),
    )
    .unwrap();
    amp.step(quadratic(&a, &calls)).unwrap();
    assert_close(params(&amp, 0), &[0.89]);
}

#[test]
fn amp_k1_unclipped() {
    // a = (1, 2), ζ = 1, ε = 10 (never reached), lr 0.1, no momentum.
    // δ = ζ·aθ, so g(θ + δ) = a(θ + aθ) = a(1 + a)θ and
    // θ ← θ(1 − lr·a(1 + a)): factor 0.8 for a = 1, 0.4 for a = 2.
    // θ₀ = (1, −2) → θ₁ = (0.8, −0.8) → θ₂ = (0.64, −0.32).
    let a = vec![vec![1.0, 2.0]];
    let calls = Cell::new(0);
    let config = AmpConfig::new(0.1, 10.0).inner_lr(1.0);
    let mut amp = Amp::sgd(store(&[&[1.0, -2.0]]), config, SgdConfig::default()).unwrap();
    let r = amp.step(quadratic(&a, &calls)).unwrap();
    assert_close(params(&amp, 0), &[0.8, -0.8]);
    // Clean loss ½(1·1 + 2·4) = 4.5; perturbed at (2, −6): ½(4 + 72) = 38.
    assert_eq!(r.loss, 4.5);
    assert_eq!(r.perturbed_losses, vec![38.0]);
    assert_eq!(r.clipped, 0);
    assert!((r.perturbation_norms[0] - 17f64.sqrt()).abs() < 1e-12);
    amp.step(quadratic(&a, &calls)).unwrap();
    assert_close(params(&amp, 0), &[0.64, -0.32]);
    assert_eq!(calls.get(), 4);
}

#[test]
fn amp_k1_clipped_both_restore_modes() {
    // a = 1, θ₀ = (3, −4), ‖g‖ = ‖θ‖ = 5 > ε = 0.5, so δ = 0.5·θ/‖θ‖ and
    // θ ← θ(1 − lr(1 + ε/‖θ‖)).
    // Step 1: θ₁ = θ₀·(1 − 0.1·1.1) = (2.67, −3.56), ‖θ₁‖ = 4.45.
    // Step 2: θ₂ = θ₁·(1 − 0.1·(1 + 0.5/4.45)).
    let a = vec![vec![1.0, 1.0]];
    for restore in [RestoreMode::Copy, RestoreMode::Subtract] {
        let calls = Cell::new(0);
        let config = AmpConfig::new(0.1, 0.5).restore(restore);
        let mut amp = Amp::sgd(store(&[&[3.0, -4.0]]), config, SgdConfig::default()).unwrap();
        let r = amp.step(quadratic(&a, &calls)).unwrap();
        assert_close(params(&amp, 0), &[2.67, -3.56]);
        assert_eq!(r.clipped, 1);
        assert!((r.perturbation_norms[0] - 0.5).abs() < 1e-12);
        amp.step(quadratic(&a, &calls)).unwrap();
        let f = 1.0 - 0.1 * (1.0 + 0.5 / 4.45);
        assert_close(params(&amp, 0), &[2.67 * f, -3.56 * f]);
    }
}

#[test]
fn amp_k2_unclipped_and_clipped() {
    // Unclipped: a = (1, 2), θ₀ = (1, −2), ζ = 1, ε = 100, lr 0.1.
    // g₀ = (1, −4); δ₁ = (1, −4); g₁ = g(2, −6) = (2, −12);
    // δ₂ = δ₁ + g₁ = (3, −16) (‖·‖ ≈ 16.3 < 100); g₂ = g(4, −18) = (4, −36);
    // θ₁ = θ₀ − 0.1·g₂ = (0.6, 1.6).
    let calls = Cell::new(0);
    let a = vec![vec![1.0, 2.0]];
    let config = AmpConfig::new(0.1, 100.0).inner_iter(2);
    let mut amp = Amp::sgd(store(&[&[1.0, -2.0]]), config, SgdConfig::default()).unwrap();
    let r = amp.step(quadratic(&a, &calls)).unwrap();
    assert_close(params(&amp, 0), &[0.6, 1.6]);
    assert_eq!(r.closure_calls, 3);
    assert_eq!(calls.get(), 3);
    assert_eq!(r.perturbed_losses.len(), 2);

    // Clipped: a = 1, θ₀ = (3, −4), ε = 0.5.
    // δ₁ = 0.1·θ₀ = (0.3, −0.4); g₁ = θ₀ + δ₁ = (3.3, −4.4);
    // δ₂ = δ₁ + g₁ = (3.6, −4.8), ‖·‖ = 6 → δ₂ = (0.3, −0.4);
    // g₂ = (3.3, −4.4); θ₁ = θ₀ − 0.1·g₂ = (2.67, −3.56).
    let a = vec![vec![1.0, 1.0]];
    for restore in [RestoreMode::Copy, RestoreMode::Subtract] {
        let config = AmpConfig::new(0.1, 0.5).inner_iter(2).restore(restore);
        let mut amp = Amp::sgd(store(&[&[3.0, -4.0]]), config, SgdConfig::default()).unwrap();
        let r = amp.step(quadratic(&a, &calls)).unwrap();
        assert_close(params(&amp, 0), &[2.67, -3.56]);
        assert_eq!(r.clipped, 1);
        // Copy mode holds the snapshot and δ for K = 2; subtract mode only δ.
        let held = if restore == RestoreMode::Copy { 2 } else { 1 };
        assert_eq!(amp.amp_buffers_held(), held);
    }
}

#[test]
fn amp_weight_decay_is_applied_at_restored_theta() {
    // As amp_k1_clipped: g(θ + δ) = (3.3, −4.4); with weight decay 0.1 at θ:
    // d = (3.3, −4.4) + 0.1·(3, −4) = (3.6, −4.8); θ₁ = (2.64, −3.52).
    let a = vec![vec![1.0, 1.0]];
    let calls = Cell::new(0);
    let config = AmpConfig::new(0.1, 0.5).weight_decay(0.1);
    let mut amp = Amp::sgd(store(&[&[3.0, -4.0]]), config, SgdConfig::default()).unwrap();
    amp.step(quadratic(&a, &calls)).unwrap();
    assert_close(params(&amp, 0), &[2.64, -3.52]);
    // K = 1 with copy-restore holds one buffer (the snapshot); δ is never
    // stored.
    assert_eq!(amp.amp_buffers_held(), 1);
}

#[test]
fn groups_have_their_own_hyper_parameters() {
    // Tensor 0 (group 0: lr 0.1, ε 0.5): as amp_k1_clipped → (2.67, −3.56).
    // Tensor 1 (group 1: lr 0.2, ε 100, a = 1): δ = θ, g(2θ) = 2θ,
    // θ₁ = θ − 0.4θ = 0.6θ = (0.6, −1.2).
    let a = vec![vec![1.0, 1.0], vec![1.0, 1.0]];
    let calls = Cell::new(0);
    let config = AmpConfig::new(0.1, 0.5)
        .group(ParamGroup::new([0]).lr(0.1).epsilon(0.5))
        .group(ParamGroup::new([1]).lr(0.2).epsilon(100.0));
    let s = store(&[&[3.0, -4.0], &[1.0, -2.0]]);
    let mut amp = Amp::sgd(s, config, SgdConfig::default()).unwrap();
    let r = amp.step(quadratic(&a, &calls)).unwrap();
    assert_close(params(&amp, 0), &[2.67, -3.56]);
    assert_close(params(&amp, 1), &[0.6, -1.2]);
    assert_eq!(r.clipped, 1);
    assert_eq!(amp.group_lr(1).unwrap(), 0.2);
    amp.set_group_lr(1, 0.0).unwrap();
    let before = params(&amp, 1).clone();
    amp.step(quadratic(&a, &calls)).unwrap();
    assert_eq!(params(&amp, 1), &before);
}

#[test]
fn tensors_without_gradient_are_neither_perturbed_nor_stepped() {
    let config = AmpConfig::new(0.1, 0.5).weight_decay(0.1);
    let s = store(&[&[3.0, -4.0], &[7.0]]);
    let mut amp = Amp::sgd(s, config, SgdConfig::nesterov(0.9)).unwrap();
    let seen = std::cell::RefCell::new(Vec::new());
    for _ in 0..3 {
        amp.step(|s: &mut NdStore<f64>, _pass| {
            seen.borrow_mut().push(s.params()[1][0]);
            let g = s.params()[0].clone();
            s.set_grad(0, g)?;
            Ok::<_, AmpError>(((), 0.0))
        })
        .unwrap();
    }
    assert_eq!(seen.borrow().len(), 6);
    assert!(seen.borrow().iter().all(|&x| x == 7.0));
    assert_eq!(amp.store().params()[1][0], 7.0);
    assert_eq!(amp.base().initialized(), &[true, false]);
}

type Built = Result<Amp<NdStore<f64>>, AmpError>;

fn field(r: Built) -> &'static str {
    match r {
        Err(AmpError::InvalidConfig { field, .. }) => field,
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("accepted"),
    }
}

#[test]
fn invalid_configuration_names_the_field() {
    let s = || store(&[&[1.0], &[2.0]]);
    let sgd = SgdConfig::default();
    let base = || AmpConfig::new(0.1, 0.5);
    assert_eq!(field(Amp::sgd(s(), base().epsilon(-1.0), sgd)), "epsilon");
    assert_eq!(
        field(Amp::sgd(s(), base().epsilon(f64::NAN), sgd)),
        "epsilon"
    );
    assert_eq!(
        field(Amp::sgd(s(), base().inner_lr(f64::INFINITY), sgd)),
        "inner_lr"
    );
    assert_eq!(field(Amp::sgd(s(), base().lr(-0.1), sgd)), "lr");
    assert_eq!(
        field(Amp::sgd(s(), base().weight_decay(-1e-4), sgd)),
        "weight_decay"
    );
    assert_eq!(
        field(Amp::sgd(s(), base(), SgdConfig::momentum(1.0))),
        "momentum"
    );
    assert_eq!(
        field(Amp::sgd(s(), base(), SgdConfig::momentum(-0.1))),
        "momentum"
    );
    let nesterov_without_momentum = SgdConfig {
        momentum: 0.0,
        dampening: 0.0,
        nesterov: true,
    };
    assert_eq!(
        field(Amp::sgd(s(), base(), nesterov_without_momentum)),
        "nesterov"
    );
    let nesterov_with_dampening = SgdConfig {
        momentum: 0.9,
        dampening: 0.1,
        nesterov: true,
    };
    assert_eq!(
        field(Amp::sgd(s(), base(), nesterov_with_dampening)),
        "nesterov"
    );
}

#[test]
fn invalid_groups_and_empty_store_are_rejected() {
    let s = || store(&[&[1.0], &[2.0]]);
    let sgd = SgdConfig::default();
    let g = |groups: Vec<ParamGroup>| AmpConfig {
        groups,
        ..AmpConfig::new(0.1, 0.5)
    };
    let twice = vec![ParamGroup::new([0, 1]), ParamGroup::new([1])];
    assert_eq!(field(Amp::sgd(s(), g(twice), sgd)), "groups");
    assert_eq!(
        field(Amp::sgd(s(), g(vec![ParamGroup::new([0])]), sgd)),
        "groups"
    );
    assert_eq!(
        field(Amp::sgd(s(), g(vec![ParamGroup::new([0, 1, 2])]), sgd)),
        "groups"
    );
    let bad = vec![ParamGroup::new([0, 1]).epsilon(-2.0)];
    assert_eq!(field(Amp::sgd(s(), g(bad), sgd)), "groups.epsilon");
    assert!(matches!(
        Amp::sgd(NdStore::<f64>::new(vec![]), AmpConfig::new(0.1, 0.5), sgd),
        Err(AmpError::EmptyStore)
    ));
}

#[test]
fn closure_failure_at_every_call_leaves_weights_and_momentum_bit_identical() {
    let a = vec![vec![1.0, 2.0]];
    for restore in [RestoreMode::Copy, RestoreMode::Subtract] {
        for fail_at in 1..=3 {
            let calls = Cell::new(0);
            let config = AmpConfig::new(0.1, 0.3).inner_iter(2).restore(restore);
            let mut amp =
                Amp::sgd(store(&[&[1.0, -2.0]]), config, SgdConfig::nesterov(0.9)).unwrap();
            amp.step(quadratic(&a, &calls)).unwrap();
            let before = amp.store().clone();
            let momentum_before = amp.state().unwrap().base.state;
            let mut inner = quadratic(&a, &calls);
            let mut n = 0;
            let err = amp
                .step(|s: &mut NdStore<f64>, pass| {
                    n += 1;
                    if n == fail_at {
                        return Err(AmpError::backend("boom"));
                    }
                    inner(s, pass)
                })
                .unwrap_err();
            let expected = if fail_at == 1 {
                Pass::Clean
            } else {
                Pass::Perturbed {
                    k: fail_at - 1,
                    of: 2,
                }
            };
            assert!(
                matches!(err, AmpError::Closure { pass, .. } if pass == expected),
                "{err}"
            );
            assert_eq!(amp.state().unwrap().base.state, momentum_before);
            let drift = (&amp.store().params()[0] - &before.params()[0])
                .iter()
                .fold(0.0f64, |m, x| m.max(x.abs()));
            match restore {
                RestoreMode::Copy => assert_eq!(amp.store().params(), before.params()),
                RestoreMode::Subtract => assert!(drift < 1e-15, "drift {drift}"),
            }
        }
    }
}

#[test]
fn nan_gradient_and_missing_gradient_are_typed_errors() {
    let config = AmpConfig::new(0.1, 0.3);
    let s = store(&[&[1.0, -2.0], &[0.5]]);
    let mut amp = Amp::sgd(s, config, SgdConfig::momentum(0.9)).unwrap();
    let err = amp
        .step(|s: &mut NdStore<f64>, _| {
            s.set_grad(0, arr1(&[f64::NAN, 1.0]).into_dyn())?;
            Ok::<_, AmpError>(((), 1.0))
        })
        .unwrap_err();
    assert!(matches!(
        err,
        AmpError::NonFiniteGradient { pass: Pass::Clean }
    ));
    assert_eq!(amp.store().params()[0], arr1(&[1.0, -2.0]).into_dyn());
    // Tensor 1 has a gradient only in the clean pass.
    let err = amp
        .step(|s: &mut NdStore<f64>, pass: Pass| {
            s.set_grad(0, arr1(&[1.0, 1.0]).into_dyn())?;
            if pass.is_clean() {
                s.set_grad(1, arr1(&[1.0]).into_dyn())?;
            }
            Ok::<_, AmpError>(((), 1.0))
        })
        .unwrap_err();
    assert!(
        matches!(err, AmpError::MissingGradient { index: 1, .. }),
        "{err}"
    );
    assert_eq!(amp.store().params()[0], arr1(&[1.0, -2.0]).into_dyn());
    assert_eq!(amp.store().params()[1], arr1(&[0.5]).into_dyn());
    // A gradient of the wrong shape is refused by the store.
    let err = amp
        .step(|s: &mut NdStore<f64>, _| {
            s.set_grad(0, arr1(&[1.0]).into_dyn())?;
            Ok::<_, AmpError>(((), 1.0))
        })
        .unwrap_err();
    assert!(matches!(err, AmpError::Closure { .. }), "{err}");
    // No gradient at all.
    let err = amp
        .step(|_: &mut NdStore<f64>, _| Ok::<_, AmpError>(((), 1.0)))
        .unwrap_err();
    assert!(matches!(err, AmpError::NoGradient));
    assert_eq!(amp.steps(), 0);
}

#[test]
fn store_rejects_bad_masks_buffers_and_aliasing() {
    use amp_core::{BufferId, ParamStore};
    let mut s = store(&[&[1.0, 2.0]]);
    assert!(matches!(
        s.scale(Slot::Params, &[2.0], &[true, false]),
        Err(AmpError::CountMismatch { .. })
    ));
    assert!(matches!(
        s.copy(Slot::Buffer(BufferId::new(3)), Slot::Params, &[true]),
        Err(AmpError::UnknownBuffer(3))
    ));
    assert!(s.axpy(Slot::Params, &[1.0], Slot::Params, &[true]).is_err());
    let b = s.alloc_buffer().unwrap();
    let c = s.alloc_buffer().unwrap();
    s.copy(Slot::Buffer(b), Slot::Params, &[true]).unwrap();
    s.axpy(Slot::Buffer(c), &[2.0], Slot::Buffer(b), &[true])
        .unwrap();
    assert_eq!(s.read(Slot::Buffer(c), 0).unwrap().data(), vec![2.0, 4.0]);
    s.free_buffer(b).unwrap();
    assert!(matches!(s.free_buffer(b), Err(AmpError::UnknownBuffer(_))));
    assert!(matches!(
        s.shape(5),
        Err(AmpError::IndexOutOfRange { index: 5, len: 1 })
    ));
}

#[test]
fn a_rest_group_takes_every_unlisted_tensor() {
    // Three tensors; tensor 1 in a group with lr 0, the rest (0 and 2) at
    // lr 0.5. K = 0, a = 1: θ ← θ − lr·θ, so 0 and 2 halve and 1 stays.
    let a = vec![vec![1.0], vec![1.0], vec![1.0]];
    let calls = Cell::new(0);
    let config = AmpConfig::new(0.5, 0.5)
        .inner_iter(0)
        .group(ParamGroup::new([1]).lr(0.0))
        .group(ParamGroup::rest());
    let mut amp = Amp::sgd(
        store(&[&[2.0], &[2.0], &[2.0]]),
        config,
        SgdConfig::default(),
    )
    .unwrap();
    assert_eq!(amp.groups()[1].tensors, [0, 2]);
    amp.step(quadratic(&a, &calls)).unwrap();
    assert_close(params(&amp, 0), &[1.0]);
    assert_close(params(&amp, 1), &[2.0]);
    assert_close(params(&amp, 2), &[1.0]);

    // Two rests, and a rest with nothing left, are configuration errors.
    for config in [
        AmpConfig::new(0.1, 0.5)
            .group(ParamGroup::rest())
            .group(ParamGroup::rest()),
        AmpConfig::new(0.1, 0.5)
            .group(ParamGroup::new([0, 1, 2]))
            .group(ParamGroup::rest()),
    ] {
        let error = Amp::sgd(
            store(&[&[1.0], &[1.0], &[1.0]]),
            config,
            SgdConfig::default(),
        )
        .err()
        .expect("refused");
        assert!(
            matches!(
                error,
                AmpError::InvalidConfig {
                    field: "groups",
                    ..
                }
            ),
            "{error}"
        );
    }
}
