//! Helpers shared by the amp-tch integration tests.
#![allow(dead_code)]

use amp_core::{DType, HostTensor, ParamStore, Result, Slot};
use amp_ndarray::NdStore;
use ndarray::{ArrayD, IxDyn};
use tch::Device;

/// The devices to run device-parametrised tests on: the CPU, and CUDA when
/// libtorch sees a GPU. Prints a notice when CUDA is skipped.
pub fn cuda_or_skip(test: &str) -> Option<Device> {
    if tch::Cuda::is_available() {
        Some(Device::Cuda(0))
    } else {
        // Written to the process's stderr directly, past libtest's output
        // capture, so that the skip shows even when the test passes.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "NOTICE: {test}: CUDA is not available, CUDA part SKIPPED"
        );
        None
    }
}

/// Deterministic initial values of the test problem: shapes with 2-d, 1-d,
/// 0-d and empty tensors, values in [-1.5, 1.5], rounded to `dtype`.
pub fn initial_values(dtype: DType) -> Vec<HostTensor> {
    let shapes: [&[usize]; 6] = [&[3, 4], &[4], &[], &[2, 3], &[0], &[5]];
    shapes
        .iter()
        .enumerate()
        .map(|(t, shape)| {
            let numel: usize = shape.iter().product();
            let data = (0..numel)
                .map(|k| {
                    let v = 1.5 * (1.7 * k as f64 + 0.3 * t as f64 + 0.2).sin();
                    if dtype == DType::F32 {
                        v as f32 as f64
                    } else {
                        v
                    }
                })
                .collect();
            HostTensor::new(shape.to_vec(), dtype, data).unwrap()
        })
        .collect()
}

/// Which tensors of [`initial_values`] receive a gradient: the last one
/// never does (a frozen parameter, which must be neither perturbed nor
/// stepped).
pub const HAS_GRAD: [bool; 6] = [true, true, true, true, true, false];

/// The analytic test loss and its gradient, computed on the host from the
/// store's current weights and written through `write(Slot::Grads)`:
/// L(θ) = Σ_t Σ_j a_tj θ_tj² / 2 + s_tj cos θ_tj, so
/// ∂L/∂θ_tj = a_tj θ_tj − s_tj sin θ_tj (non-linear, so that the perturbed
/// gradient differs from the clean one).
pub fn host_loss<S: ParamStore>(store: &mut S) -> Result<((), f64)> {
    let mut loss = 0.0;
    for (t, &has) in HAS_GRAD.iter().enumerate() {
        let mut value = store.read(Slot::Params, t)?;
        for (j, x) in value.data_mut().iter_mut().enumerate() {
            let a = 0.5 + 0.25 * (j % 3) as f64 + 0.1 * t as f64;
            let s = 0.3 + 0.05 * j as f64;
            loss += a * *x * *x / 2.0 + s * x.cos();
            *x = a * *x - s * x.sin();
        }
        if has {
            store.write(Slot::Grads, t, &value)?;
        }
    }
    Ok(((), loss))
}

/// The f64 reference store holding `values`.
pub fn oracle(values: &[HostTensor]) -> NdStore<f64> {
    NdStore::new(
        values
            .iter()
            .map(|v| ArrayD::from_shape_vec(IxDyn(v.shape()), v.data().to_vec()).unwrap())
            .collect(),
    )
}

/// Largest |a − b| / max(1, |b|) over all tensors of a slot of two stores.
pub fn max_relative_difference<A: ParamStore, B: ParamStore>(a: &A, b: &B, slot: Slot) -> f64 {
    assert_eq!(a.num_tensors(), b.num_tensors());
    let mut worst = 0.0f64;
    for i in 0..a.num_tensors() {
        let x = a.read(slot, i).unwrap();
        let y = b.read(slot, i).unwrap();
        assert_eq!(x.shape(), y.shape(), "tensor {i}");
        for (p, q) in x.data().iter().zip(y.data()) {
            let d = (p - q).abs() / q.abs().max(1.0);
            assert!(!d.is_nan(), "tensor {i}: {p} vs {q}");
            worst = worst.max(d);
        }
    }
    worst
}
