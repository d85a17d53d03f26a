//! The same checks on a CUDA device. They run when this build has the
//! `cuda` feature and a GPU is usable; otherwise each test prints that it was
//! skipped, and why, on stderr (`--nocapture` shows it) and returns.
//!
//! On the GPU, reductions run in a different order than on the CPU, so the
//! oracle comparison uses the CPU suite's tolerances (see `oracle.rs`), which
//! do not depend on summation order beyond a few ulps.
mod common;

use amp_candle::candle_core::DType as CDType;
use amp_candle::CandleStore;
use amp_core::{DType, ParamStore, Slot};
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
