//! The same checks on a CUDA device. They run when this build has the
//! `cuda` feature and a GPU is usable; otherwise each test prints that it was
//! skipped, and why, on stderr (`--nocapture` shows it) and returns.
//!
//! On the GPU, reductions run in a different order than on the CPU, so the
//! oracle comparison uses the CPU suite's tolerances (see `oracle.rs`), which
//! do not depend on summation order beyond a few ulps.
mod common;

use amp_candle::candle_core::{DType as CDType, Device};
use amp_candle::CandleStore;
use amp_core::{
    Adam, AdamConfig, Amp, AmpConfig, BaseOptimizer, DType, HostTensor, ParamStore, RestoreMode,
    Sgd, SgdConfig, Slot,
};
use common::{cases, gpu, run_against_oracle, stores, Tol};

#[test]
fn cuda_device_matches_oracle() {
    let Some(device) = gpu("cuda_device_matches_oracle") else {
        return;
    };
    for (dtype, tol) in [
        (DType::F64, Tol::elementwise(1e-12)),
        (DType::F32, Tol::elementwise(1e-5)),
        (DType::F16, Tol::per_tensor(5e-3)),
        (DType::BF16, Tol::per_tensor(4e-2)),
    ] {
        let mut worst = 0.0f64;
        for case in cases() {
            let (candle, oracle) = stores(dtype, &device);
            assert!(candle.device().is_cuda());
            worst = worst.max(run_against_oracle(&case, candle, oracle, 4, tol));
        }
        eprintln!("cuda {dtype}: largest error {worst:.3} of the tolerance {tol:?}");
    }
}

/// bf16 and f16 vars with f32 master weights on the GPU: the step works in
/// f32 on the master copy, so it meets the f32 tolerance against the oracle
/// started from the same (half-precision) values.
#[test]
fn cuda_device_master_weights_match_oracle() {
    let Some(device) = gpu("cuda_device_master_weights_match_oracle") else {
        return;
    };
    let tol = Tol::elementwise(1e-5);
    for half in [DType::BF16, DType::F16] {
        let mut worst = 0.0f64;
        for case in cases() {
            let (candle, oracle) = stores(half, &device);
            let candle = candle.with_master_weights().unwrap();
            assert!(candle.has_master_weights() && candle.device().is_cuda());
            worst = worst.max(run_against_oracle(&case, candle, oracle, 4, tol));
        }
        eprintln!(
            "cuda {half} with master weights: largest error {worst:.3} of the tolerance {tol:?}"
        );
    }
}

#[test]
fn cuda_device_mlp_trains() {
    let Some(device) = gpu("cuda_device_mlp_trains") else {
        return;
    };
    for dtype in [CDType::F32, CDType::BF16] {
        let (first, last, accuracy) = common::train_mlp(&device, dtype, 60);
        assert!(last < 0.7 * first, "{dtype:?}: loss {first} -> {last}");
        assert!(accuracy > 0.85, "{dtype:?}: accuracy {accuracy}");
    }
}

#[test]
fn cuda_device_store_round_trip() {
    let Some(device) = gpu("cuda_device_store_round_trip") else {
        return;
    };
    let (mut store, _) = stores(DType::F32, &device);
    let theta = store.read(Slot::Params, 0).unwrap();
    store.write(Slot::Grads, 0, &theta).unwrap();
    assert_eq!(store.read(Slot::Grads, 0).unwrap(), theta);
    let mask = vec![true; store.num_tensors()];
    let norms = store.norms(Slot::Params, &mask).unwrap();
    assert!(norms.as_tensor().device().is_cuda());
    assert!(store.all_finite(Slot::Params, &mask).unwrap());
    let _: &CandleStore = &store;
}

/// `device(true)` gives the GPU when there is one and, explicitly, the CPU
/// when there is none; it never panics.
#[test]
fn cuda_device_preference_falls_back_explicitly() {
    let preferred = amp_candle::device(true).unwrap();
    match gpu("cuda_device_preference_falls_back_explicitly (GPU half)") {
        Some(_) => assert!(preferred.is_cuda()),
        None => assert!(preferred.is_cpu()),
    }
}

/// A CUDA store writing in place through amp-candle's kernels
/// ([`CandleStore::in_place_on_cuda`]) meets the oracle at the same
/// tolerances as candle's allocating operations.
#[test]
fn cuda_in_place_matches_oracle() {
    let Some(device) = gpu("cuda_in_place_matches_oracle") else {
        return;
    };
    for (dtype, tol) in [
        (DType::F64, Tol::elementwise(1e-12)),
        (DType::F32, Tol::elementwise(1e-5)),
    ] {
        let mut worst = 0.0f64;
        for case in cases() {
            let (candle, oracle) = stores(dtype, &device);
            let candle = candle.in_place_on_cuda();
            worst = worst.max(run_against_oracle(&case, candle, oracle, 4, tol));
        }
        eprintln!("cuda in place {dtype}: largest error {worst:.3} of the tolerance {tol:?}");
    }
}

/// θ and the base optimiser's buffers after `steps` steps of `config` on
/// the quartic loss (gradients computed on the host), as bits.
fn bits_after<O: BaseOptimizer<CandleStore>>(
    store: CandleStore,
    config: &AmpConfig,
    base: O,
    steps: usize,
) -> Vec<Vec<u64>> {
    let mut amp = Amp::new(store, config.clone(), base).unwrap();
    for _ in 0..steps {
        amp.step(|s: &mut CandleStore, p| common::quartic(s, p))
            .unwrap();
    }
    let state = amp.base().save_state(amp.store()).unwrap();
    let store = amp.store();
    let mut out: Vec<_> = (0..store.num_tensors())
        .map(|i| store.read(Slot::Params, i).unwrap())
        .collect();
    for (_, tensors) in state.buffers {
        out.extend(tensors.into_iter().flatten());
    }
    out.iter()
        .map(|t| t.data().iter().map(|x| x.to_bits()).collect())
        .collect()
}

/// The kernels compute each element with the CPU loops' sequence of IEEE
/// operations, so where no norm enters the step (the base optimiser alone,
/// K = 0, and AMP steps whose perturbation stays inside a large ε, c = 1)
/// the CUDA store writing in place gives the CPU store's bits: SGD in
/// every form of its coefficients (the kernels branch on ±1, 0 and the
/// first step), Adam with AMSGrad and decoupled decay, Adam with L2 decay,
/// both restore modes.
#[test]
fn cuda_in_place_gives_the_bits_of_the_cpu_store() {
    let Some(device) = gpu("cuda_in_place_gives_the_bits_of_the_cpu_store") else {
        return;
    };
    let mut configs = Vec::new();
    for restore in [RestoreMode::Copy, RestoreMode::Subtract] {
        for (lr, weight_decay) in [(1.0, 1.0), (0.1, 0.0), (0.1, 1e-2)] {
            let amp = AmpConfig::new(lr, 50.0)
                .inner_iter(2)
                .inner_lr(0.5)
                .weight_decay(weight_decay)
                .restore(restore);
            configs.push(amp.clone().inner_iter(0));
            configs.push(amp);
        }
    }
    let sgds = [
        SgdConfig::nesterov(0.9),
        SgdConfig {
            momentum: 0.9,
            dampening: 0.5,
            nesterov: false,
        },
        SgdConfig {
            momentum: 0.0,
            dampening: 0.0,
            nesterov: false,
        },
    ];
    for (dtype, long) in [(DType::F32, false), (DType::F64, false), (DType::F32, true)] {
        // A long tensor (many blocks of threads) beside the grid's: there
        // the perturbation's norm exceeds ε, so its steps are K = 0 only.
        let mut init = common::initial_weights(dtype);
        if long {
            let n = (1 << 18) + 12_345;
            init.push(HostTensor::new(vec![n], dtype, common::values(7, n)).unwrap());
        }
        let on = |device: &Device| CandleStore::from_host(&init, device).unwrap();
        for config in configs.iter().filter(|c| !long || c.inner_iter == 0) {
            for sgd in sgds {
                let what = format!("{dtype:?} {config:?} {sgd:?}");
                let gpu = bits_after(
                    on(&device).in_place_on_cuda(),
                    config,
                    Sgd::new(sgd).unwrap(),
                    3,
                );
                let cpu = bits_after(on(&Device::Cpu), config, Sgd::new(sgd).unwrap(), 3);
                assert!(gpu == cpu, "SGD, {what}");
            }
            for adam in [
                AdamConfig::adamw().amsgrad(true),
                AdamConfig::adam().eps(1e-3),
            ] {
                let what = format!("{dtype:?} {config:?} {adam:?}");
                let gpu = bits_after(
                    on(&device).in_place_on_cuda(),
                    config,
                    Adam::new(adam).unwrap(),
                    3,
                );
                let cpu = bits_after(on(&Device::Cpu), config, Adam::new(adam).unwrap(), 3);
                assert!(gpu == cpu, "Adam, {what}");
            }
        }
    }
}
