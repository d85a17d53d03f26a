//! Adam, AdamW and AMSGrad on tiny quadratics, two steps each, against
//! values derived by hand (derivations in the comments). eps = 0 keeps the
//! numbers clean; PyTorch's formulas are in `amp_core::Adam`'s docs.

use amp_core::{Adam, AdamConfig, Amp, AmpConfig, AmpError, Pass};
use amp_ndarray::NdStore;
use ndarray::{arr1, ArrayD};

/// L = ½ Σ aⱼ θⱼ², so ∇L = a ⊙ θ.
fn quadratic(a: &[f64]) -> impl FnMut(&mut NdStore<f64>, Pass) -> Result<((), f64), AmpError> + '_ {
    move |s, _pass| {
        let theta = s.params()[0].clone();
        let g: ArrayD<f64> = &theta * &arr1(a).into_dyn();
        let loss = 0.5 * (&g * &theta).sum();
        s.set_grad(0, g)?;
        Ok(((), loss))
    }
}

fn run(theta: &[f64], a: &[f64], config: AmpConfig, adam: AdamConfig) -> Vec<Vec<f64>> {
    let store = NdStore::from_arrays([arr1(theta)]);
    let mut amp = Amp::new(store, config, Adam::new(adam).unwrap()).unwrap();
    (0..2)
        .map(|_| {
            amp.step(quadratic(a)).unwrap();
            amp.store().params()[0].iter().copied().collect()
        })
        .collect()
}

fn assert_close(got: &[f64], want: &[f64]) {
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-12, "got {got:?}, want {want:?}");
    }
}

#[test]
fn adamw_two_steps() {
    // θ₀ = (1, −2), a = (1, 2), lr 0.1, λ 0.5 (decoupled), β = (0.9, 0.999).
    // Step 1: g = (1, −4); θ ← 0.95·θ₀ = (0.95, −1.9);
    //   m = 0.1·g = (0.1, −0.4); v = 0.001·g² = (0.001, 0.016);
    //   bias corrections 0.1 and 0.001: m̂ = g, √v̂ = |g|, so each weight
    //   moves by lr against the sign of its gradient: θ₁ = (0.85, −1.8).
    // Step 2: g = (0.85, −3.6); θ ← 0.95·θ₁ = (0.8075, −1.71);
    //   m = 0.9·m + 0.1·g = (0.175, −0.72);
    //   v = 0.999·v + 0.001·g² = (0.0017215, 0.028944);
    //   corrections 1 − 0.9² = 0.19 and 1 − 0.999² = 0.001999;
    //   θ₂ = θ − (0.1/0.19)·m / √(v/0.001999)
    //      = (0.8075 − 0.526316·0.175/0.928001, −1.71 + 0.526316·0.72/3.805199)
    //      = (0.708248442353838, −1.610412227671247).
    let config = AmpConfig::new(0.1, 0.5).inner_iter(0).weight_decay(0.5);
    let got = run(
        &[1.0, -2.0],
        &[1.0, 2.0],
        config,
        AdamConfig::adamw().eps(0.0),
    );
    assert_close(&got[0], &[0.85, -1.8]);
    assert_close(&got[1], &[0.708248442353838, -1.610412227671247]);
}

#[test]
fn adam_with_l2_weight_decay_two_steps() {
    // As above with λ 0.5 added to the gradient instead: g = (a + λ)·θ.
    // Step 1: g = (1.5, −5); m̂ = g, √v̂ = |g|: θ₁ = θ₀ − 0.1·sign(g)
    //   = (0.9, −1.9).
    // Step 2: g = (1.35, −4.75); m = 0.9·(0.15, −0.5) + 0.1·g
    //   = (0.27, −0.925); v = 0.999·(0.00225, 0.025) + 0.001·g²
    //   = (0.00407025, 0.0475375);
    //   θ₂ = θ₁ − (0.1/0.19)·m / √(v/0.001999)
    //      = (0.9 − 0.526316·0.27/1.426941, −1.9 + 0.526316·0.925/4.876523)
    //      = (0.800412227671248, −1.800166485610309).
    let config = AmpConfig::new(0.1, 0.5).inner_iter(0).weight_decay(0.5);
    let got = run(
        &[1.0, -2.0],
        &[1.0, 2.0],
        config,
        AdamConfig::adam().eps(0.0),
    );
    assert_close(&got[0], &[0.9, -1.9]);
    assert_close(&got[1], &[0.800412227671248, -1.800166485610309]);
}

#[test]
fn amsgrad_divides_by_the_running_maximum() {
    // θ₀ = 1, a = 1, lr 0.5, β = (0.9, 0.5), no weight decay.
    // Step 1: g = 1; m = 0.1, v = 0.5, v̂max = 0.5; corrections 0.1, 0.5:
    //   θ₁ = 1 − (0.5/0.1)·0.1/(√0.5/√0.5) = 0.5.
    // Step 2: g = 0.5; m = 0.09 + 0.05 = 0.14; v = 0.25 + 0.125 = 0.375,
    //   which is below v̂max = 0.5, so the maximum stays 0.5;
    //   corrections 0.19, 0.75:
    //   θ₂ = 0.5 − (0.5/0.19)·0.14/√(0.5/0.75) = 0.048778205276783.
    //   (Without AMSGrad: 0.5 − (0.5/0.19)·0.14/√(0.375/0.75)
    //   = −0.021026049295351.)
    let config = AmpConfig::new(0.5, 0.5).inner_iter(0);
    let adam = AdamConfig::adam().betas(0.9, 0.5).eps(0.0);
    let got = run(&[1.0], &[1.0], config.clone(), adam.amsgrad(true));
    assert_close(&got[0], &[0.5]);
    assert_close(&got[1], &[0.048778205276783]);
    let plain = run(&[1.0], &[1.0], config, adam);
    assert_close(&plain[1], &[-0.021026049295351]);
}

#[test]
fn adam_state_round_trips_and_refuses_what_does_not_fit() {
    let config = AmpConfig::new(0.1, 0.5);
    let build = |adam: AdamConfig| {
        let store = NdStore::from_arrays([arr1(&[1.0, -2.0])]);
        Amp::new(store, config.clone(), Adam::new(adam).unwrap()).unwrap()
    };
    let a = [1.0, 2.0];
    let mut first = build(AdamConfig::adamw());
    first.step(quadratic(&a)).unwrap();
    let state = first.state().unwrap();
    assert_eq!(state.base.kind, "adamw");
    let names: Vec<&str> = state
        .base
        .state
        .buffers
        .iter()
        .map(|b| b.0.as_str())
        .collect();
    assert_eq!(names, ["exp_avg", "exp_avg_sq"]);
    assert_eq!(state.base.state.scalars, [("step".to_string(), vec![1.0])]);

    // A resumed run equals an uninterrupted one bit for bit.
    let mut resumed = build(AdamConfig::adamw());
    resumed
        .store_mut()
        .param_mut(0)
        .unwrap()
        .assign(&first.store().params()[0]);
    resumed.load_state(&state).unwrap();
    first.step(quadratic(&a)).unwrap();
    resumed.step(quadratic(&a)).unwrap();
    assert_eq!(first.store().params()[0], resumed.store().params()[0]);
    assert_eq!(resumed.base().steps(), [2]);

    // Adam's state does not load into AdamW, nor AMSGrad's without its
    // maximum; a fractional step count is refused; nothing changes.
    let mut adam = build(AdamConfig::adam());
    assert!(matches!(
        adam.load_state(&state),
        Err(AmpError::InvalidState(_))
    ));
    let mut ams = build(AdamConfig::adamw().amsgrad(true));
    let mut lenient = state.clone();
    lenient.base.settings.retain(|(name, _)| name != "amsgrad");
    lenient.base.settings.push(("amsgrad".into(), 1.0));
    assert!(ams.load_state(&lenient).is_err());
    assert_eq!(ams.base().steps(), &[] as &[u64]);
    let mut bad = state.clone();
    bad.base.state.scalars[0].1[0] = 1.5;
    let mut fresh = build(AdamConfig::adamw());
    assert!(matches!(
        fresh.load_state(&bad),
        Err(AmpError::InvalidState(_))
    ));
    assert_eq!(fresh.buffers_held(), 1, "only AMP's snapshot, no moments");
}

#[test]
fn the_threaded_update_of_large_tensors_matches_the_composed_one() {
    use amp_core::{composed, AdamCoefficients, AdamSlots, ParamStore, Slot};
    // 300 000 elements (past the size from which the fused update is split
    // over threads), in two tensors, one of them not in standard layout.
    let n = 300_000;
    let wave = |k: f64| (0..n).map(move |i| ((i as f64) * k).sin());
    let theta = ndarray::Array1::from_iter(wave(0.37)).into_dyn();
    let square = ndarray::Array2::from_shape_vec((600, 500), wave(0.11).collect()).unwrap();
    let transposed = square.reversed_axes().into_dyn();
    assert!(!transposed.is_standard_layout());
    let build = || -> NdStore<f64> {
        let mut s = NdStore::new(vec![theta.clone(), transposed.clone()]);
        s.set_grad(0, ndarray::Array1::from_iter(wave(0.53)).into_dyn())
            .unwrap();
        s.set_grad(1, ndarray::ArrayD::from_elem(vec![500, 600], 0.25))
            .unwrap();
        s
    };
    let c = AdamCoefficients {
        shrink: 0.999,
        l2: 0.0,
        beta1: (0.9, 0.1),
        beta2: (0.999, 0.001),
        step: -0.01,
        divisor: 0.05,
        eps: 1e-8,
    };
    let run = |fused: bool, amsgrad: bool| {
        let mut s = build();
        let mask = [true, true];
        let (m, v, max) = (
            Slot::Buffer(s.alloc_buffer().unwrap()),
            Slot::Buffer(s.alloc_buffer().unwrap()),
            Slot::Buffer(s.alloc_buffer().unwrap()),
        );
        s.copy(m, Slot::Params, &mask).unwrap();
        let slots = AdamSlots {
            exp_avg: m,
            exp_avg_sq: v,
            max_exp_avg_sq: amsgrad.then_some(max),
        };
        if fused {
            s.adam_update(slots, &[c, c], &mask).unwrap();
        } else {
            composed::adam_update(&mut s, slots, &[c, c], &mask).unwrap();
        }
        [Slot::Params, m, v, max].map(|slot| {
            (0..2)
                .map(|i| s.read(slot, i).unwrap().into_data())
                .collect::<Vec<_>>()
        })
    };
    for amsgrad in [false, true] {
        assert!(
            run(true, amsgrad) == run(false, amsgrad),
            "threaded and composed updates differ (amsgrad {amsgrad})"
        );
    }
}
