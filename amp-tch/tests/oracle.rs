//! AMP steps on tch compared with the amp-ndarray f64 oracle: same initial
//! weights, same analytic gradient (computed on the host and written through
//! `write(Slot::Grads)`), several steps, over a grid of configurations.
//!
//! Tolerances, relative to max(1, |oracle|):
//! - f64: 1e-12. Both stores compute in f64; they differ only in rounding
//!   order (libtorch's `add_(alpha)` is a fused multiply-add on FMA CPUs where
//!   the oracle rounds twice, and norms are summed in a different order), a
//!   few ulps (~1e-16) per operation, over ~10 operations per step and 4 steps
//!   with gradients whose Lipschitz constant is below 2: ~1e-14 expected, so
//!   1e-12 leaves a margin of 100 while still catching any algorithmic slip.
//! - f32: 1e-5. The tch store rounds weights, gradients, hyper-parameters and
//!   every intermediate to f32 (unit roundoff 6e-8) and accumulates norms in
//!   f32, against an f64 oracle: ~10 roundings per step over 4 steps, amplified
//!   by at most a small factor, stays below ~2e-6; 1e-5 leaves a margin of 5.

mod common;

use amp_core::{Amp, AmpConfig, DType, ParamGroup, ParamStore, RestoreMode, SgdConfig, Slot};
use amp_tch::TchStore;
use common::{host_loss, initial_values, max_relative_difference, oracle};
use tch::Device;

const STEPS: usize = 4;

fn configs() -> Vec<(String, AmpConfig, SgdConfig)> {
    let sgds = [
        ("sgd", SgdConfig::default()),
        (
            "momentum",
            SgdConfig {
                momentum: 0.9,
                dampening: 0.1,
                nesterov: false,
            },
        ),
        ("nesterov", SgdConfig::nesterov(0.9)),
    ];
    let mut out = Vec::new();
    let mut n = 0usize;
    for (sgd_name, sgd) in sgds {
        for weight_decay in [0.0, 1e-2] {
            for inner_iter in [0usize, 1, 2] {
                // ε = 100 never clips (‖ζg‖ < 20 here); ε = 0.05 always does.
                for epsilon in [100.0, 0.05] {
                    for restore in [RestoreMode::Copy, RestoreMode::Subtract] {
                        n += 1;
                        let inner_lr = if n % 2 == 0 { 1.0 } else { 0.5 };
                        let config = AmpConfig::new(0.1, epsilon)
                            .inner_lr(inner_lr)
                            .inner_iter(inner_iter)
                            .weight_decay(weight_decay)
                            .restore(restore);
                        out.push((
                            format!(
                                "{sgd_name} wd={weight_decay} K={inner_iter} eps={epsilon} \
                                 zeta={inner_lr} {restore:?}"
                            ),
                            config,
                            sgd,
                        ));
                    }
                }
            }
        }
    }
    // Parameter groups with their own lr, ε, ζ and weight decay: axpy then
    // sees several distinct coefficients in one call.
    for (k, restore) in [
        (1, RestoreMode::Copy),
        (2, RestoreMode::Subtract),
        (2, RestoreMode::Copy),
    ] {
        let config = AmpConfig::new(0.05, 0.2)
            .inner_iter(k)
            .restore(restore)
            .group(ParamGroup::new([0, 5]).weight_decay(1e-3))
            .group(ParamGroup::new([1, 2]).lr(0.2).epsilon(0.01).inner_lr(0.7))
            .group(ParamGroup::new([3]).lr(0.01).epsilon(50.0).inner_lr(2.0))
            .group(ParamGroup::new([4]).lr(0.3).weight_decay(0.1));
        out.push((
            format!("groups K={k} {restore:?}"),
            config,
            SgdConfig::nesterov(0.8),
        ));
    }
    out
}

fn compare(device: Device, dtype: DType, tolerance: f64) {
    let values = initial_values(dtype);
    let mut worst = 0.0f64;
    for (name, config, sgd) in configs() {
        let mut expected = Amp::sgd(oracle(&values), config.clone(), sgd).unwrap();
        let store = TchStore::from_host(&values, device).unwrap();
        assert_eq!(store.dtype(), dtype);
        let mut actual = Amp::sgd(store, config.clone(), sgd).unwrap();
        for step in 0..STEPS {
            let e = expected.step(|s, _| host_loss(s)).unwrap();
            let a = actual.step(|s, _| host_loss(s)).unwrap();
            let context = format!("{name}, {device:?} {dtype}, step {step}");
            assert_eq!(a.closure_calls, config.inner_iter + 1, "{context}");
            assert_eq!(a.closure_calls, e.closure_calls, "{context}");
            assert_eq!(a.clipped, e.clipped, "{context}");
            let close = |x: f64, y: f64| (x - y).abs() <= tolerance * y.abs().max(1.0);
            assert!(
                close(a.loss, e.loss),
                "{context}: loss {} vs {}",
                a.loss,
                e.loss
            );
            for (x, y) in a.perturbed_losses.iter().zip(&e.perturbed_losses) {
                assert!(close(*x, *y), "{context}: perturbed loss {x} vs {y}");
            }
            for (x, y) in a.perturbation_norms.iter().zip(&e.perturbation_norms) {
                assert!(close(*x, *y), "{context}: ‖δ‖ {x} vs {y}");
            }
            let difference =
                max_relative_difference(actual.store(), expected.store(), Slot::Params);
            assert!(
                difference <= tolerance,
                "{context}: weights differ by {difference:e} (tolerance {tolerance:e})"
            );
            worst = worst.max(difference);
        }
        // The frozen tensor (no gradient) never moves, even with weight decay.
        assert_eq!(
            actual.store().read(Slot::Params, 5).unwrap(),
            values[5],
            "{name}"
        );
        // Momentum buffers agree too.
        if let (Some(a), Some(e)) = (
            actual.base().momentum_buffer(),
            expected.base().momentum_buffer(),
        ) {
            for i in 0..values.len() {
                if !common::HAS_GRAD[i] {
                    continue;
                }
                let x = actual.store().read(Slot::Buffer(a), i).unwrap();
                let y = expected.store().read(Slot::Buffer(e), i).unwrap();
                for (p, q) in x.data().iter().zip(y.data()) {
                    assert!(
                        (p - q).abs() <= tolerance * q.abs().max(1.0),
                        "{name}: momentum"
                    );
                }
            }
        }
    }
    eprintln!("{device:?} {dtype}: worst relative difference to the oracle {worst:e}");
}

#[test]
fn cpu_f64_matches_oracle() {
    compare(Device::Cpu, DType::F64, 1e-12);
}

#[test]
fn cpu_f32_matches_oracle() {
    compare(Device::Cpu, DType::F32, 1e-5);
}

#[test]
fn cuda_matches_oracle() {
    let Some(device) = common::cuda_or_skip("cuda_matches_oracle") else {
        return;
    };
    compare(device, DType::F64, 1e-12);
    compare(device, DType::F32, 1e-5);
}

/// With lr = 0 and no weight decay a step leaves θ bit-exactly unchanged
/// under copy-restore, on both dtypes.
#[test]
fn copy_restore_is_bit_exact() {
    for dtype in [DType::F32, DType::F64] {
        let values = initial_values(dtype);
        let store = TchStore::from_host(&values, Device::Cpu).unwrap();
        let config = AmpConfig::new(0.0, 0.3).inner_iter(2);
        let mut amp = Amp::sgd(store, config, SgdConfig::nesterov(0.9)).unwrap();
        for _ in 0..3 {
            amp.step(|s, _| host_loss(s)).unwrap();
        }
        for (i, v) in values.iter().enumerate() {
            assert_eq!(
                &amp.store().read(Slot::Params, i).unwrap(),
                v,
                "{dtype} tensor {i}"
            );
        }
    }
}
