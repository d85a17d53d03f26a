//! # amp-candle
//!
//! The [candle](https://github.com/huggingface/candle) backend of [`amp_core`]:
//! a [`ParamStore`](amp_core::ParamStore) over `candle_core::Var`s, on the CPU or (with the `cuda`
//! cargo feature) on an NVIDIA GPU. AMP here is *adversarial model
//! perturbation* (Zheng, Zhang & Mao, CVPR 2021) — a regulariser that trains
//! toward flat minima — not automatic mixed precision.
//!
//! [`CandleStore`] holds the model's `Var`s (from a `VarMap` with
//! [`CandleStore::from_varmap`], or from a list with
//! [`CandleStore::from_vars`]) and updates them in place with `Var::set`, so
//! every layer built from those vars sees the new weights. candle returns
//! gradients from `backward()` as a `GradStore` instead of accumulating them
//! into the tensors; inside the AMP closure, hand them over with
//! [`CandleStore::backward`] (runs backward on the loss and captures the
//! gradients of the store's vars) or [`CandleStore::absorb_grads`].
//!
//! Weights may be `f32`, `f64`, `bf16` or `f16`; half-precision weights are
//! stored as such but every operation computes in `f32`. See [`CandleStore`]
//! for how per-tensor scalars stay on the device.
//!
//! A two-layer `candle_nn` MLP trained with AMP on generated data (the same
//! program is `examples/candle_mlp.rs`):
//! ```
//! use amp_candle::candle_core::{DType, Device, Module, Tensor, D};
//! use amp_candle::candle_nn::{self, VarBuilder, VarMap};
//! use amp_candle::CandleStore;
//! use amp_core::{Amp, AmpConfig, BoxError, SgdConfig};
//!
//! let device = amp_candle::device(false)?; // the CPU; `true` prefers CUDA
//! // Two classes: is the sum of the 4 inputs positive? 64 points from a
//! // fixed-seed generator, so the doctest is deterministic.
//! let mut seed = 7u64;
//! let mut uniform = move || {
//!     seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
//!     (seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
//! };
//! let xs: Vec<f32> = (0..64 * 4).map(|_| uniform()).collect();
//! let ys: Vec<u32> = xs.chunks(4).map(|r| u32::from(r.iter().sum::<f32>() > 0.0)).collect();
//! let x = Tensor::from_vec(xs, (64, 4), &device)?;
//! let y = Tensor::from_vec(ys, 64, &device)?;
//!
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
//! let hidden = candle_nn::linear(4, 16, vb.pp("hidden"))?;
//! let output = candle_nn::linear(16, 2, vb.pp("output"))?;
//! let model = candle_nn::seq().add(hidden).add(candle_nn::Activation::Relu).add(output);
//!
//! let store = CandleStore::from_varmap(&varmap)?;
//! // Deterministic initial weights: candle's CPU generator cannot be seeded.
//! for var in store.vars() {
//!     let w: Vec<f32> = (0..var.elem_count()).map(|_| 0.5 * uniform()).collect();
//!     var.set(&Tensor::from_vec(w, var.shape(), &device)?)?;
//! }
//! let config = AmpConfig::new(0.1, 0.1).inner_iter(1);
//! let mut amp = Amp::sgd(store, config, SgdConfig::nesterov(0.9))?;
//! let mut first = None;
//! let mut last = 0.0;
//! for _ in 0..60 {
//!     let report = amp.step(|store: &mut CandleStore, _pass| {
//!         let logits = model.forward(&x)?;
//!         let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
//!         let loss = store.backward(&loss)?; // gradients into the store
//!         Ok::<_, BoxError>((logits, loss))
//!     })?;
//!     first.get_or_insert(report.loss);
//!     last = report.loss;
//! }
//! let logits = model.forward(&x)?;
//! let hits = logits.argmax(D::Minus1)?.eq(&y)?.to_dtype(DType::F32)?.sum_all()?;
//! let accuracy = hits.to_scalar::<f32>()? / 64.0;
//! assert!(last < 0.5 * first.unwrap(), "loss {first:?} -> {last}");
//! assert!(accuracy > 0.9, "accuracy {accuracy}");
//! # Ok::<(), BoxError>(())
//! ```
//!
//! # CUDA
//! With the `cuda` feature candle is built with CUDA. [`device`] picks the
//! first GPU when asked to and one is usable, and falls back to the CPU
//! otherwise; [`cuda_device`] returns a clear error instead. Neither panics.
//! A `cuda` build links against the CUDA driver and libraries, so it only
//! starts on a machine that has them; keep the feature opt-in.
#![warn(missing_docs)]

use std::collections::HashSet;

use amp_core::{AmpError, Buffers, DType, Result};
use candle_core::{DType as CDType, Device, Tensor, Var};

mod fused;
mod grads;
mod in_place;
mod master;
#[cfg(feature = "nccl")]
pub mod nccl;
mod param_store;
mod slots;
mod steps;
mod targets;
mod vars;
mod views;

pub use candle_core;
pub use candle_nn;

/// Converts a candle dtype to the backend-neutral [`DType`]; `None` for
/// non-float dtypes, which cannot hold parameters.
pub fn amp_dtype(dtype: CDType) -> Option<DType> {
    match dtype {
        CDType::F16 => Some(DType::F16),
        CDType::BF16 => Some(DType::BF16),
        CDType::F32 => Some(DType::F32),
        CDType::F64 => Some(DType::F64),
        _ => None,
    }
}

/// Converts a [`DType`] to candle's; `None` for a dtype candle lacks.
pub fn candle_dtype(dtype: DType) -> Option<CDType> {
    match dtype {
        DType::F16 => Some(CDType::F16),
        DType::BF16 => Some(CDType::BF16),
        DType::F32 => Some(CDType::F32),
        DType::F64 => Some(CDType::F64),
        _ => None,
    }
}

/// The dtype operations compute in: `f32` for half-precision storage, the
/// storage dtype otherwise.
fn compute_dtype(storage: CDType) -> CDType {
    match storage {
        CDType::F16 | CDType::BF16 => CDType::F32,
        other => other,
    }
}

/// `tensor` converted to `dtype`. An empty tensor is made anew instead:
/// candle's CUDA conversion launches a kernel even for zero elements, which
/// the driver refuses (`CUDA_ERROR_INVALID_VALUE`), while the element-wise
/// ops return empty inputs unchanged.
fn cast(tensor: &Tensor, dtype: CDType) -> candle_core::Result<Tensor> {
    if tensor.elem_count() == 0 && tensor.dtype() != dtype {
        Tensor::zeros(tensor.shape(), dtype, tensor.device())
    } else {
        tensor.to_dtype(dtype)
    }
}

fn backend(error: candle_core::Error) -> AmpError {
    AmpError::backend(error)
}

/// Whether two tensors share one storage (a gradient that *is* a parameter's
/// storage would silently change when the parameter is updated in place).
fn same_storage(a: &Tensor, b: &Tensor) -> bool {
    storage_address(a) == storage_address(b)
}

/// The address of a tensor's storage: equal for two live tensors exactly
/// when they share it (views included).
fn storage_address(tensor: &Tensor) -> usize {
    let (storage, _) = tensor.storage_and_layout();
    std::ptr::from_ref(&*storage) as usize
}

fn device_name(device: &Device) -> String {
    format!("{:?}", device.location())
}

/// The number of CUDA kernels amp-candle's in-place operations
/// ([`CandleStore::in_place_on_cuda`]) have launched in this process, on
/// every device and thread: one per tensor and operation. Read it before
/// and after a step to count the step's launches. Always 0 without the
/// `cuda` feature.
pub fn cuda_kernel_launches() -> u64 {
    #[cfg(feature = "cuda")]
    return in_place::launches();
    #[cfg(not(feature = "cuda"))]
    0
}

/// The device to run on: CUDA device 0 when `prefer_cuda` is set and a GPU is
/// usable, the CPU otherwise.
///
/// **Fallback:** when `prefer_cuda` is `true` but CUDA cannot be used — this
/// build lacks the `cuda` feature, the driver reports no device, or creating
/// the device fails (including a panic inside candle or cudarc, which is
/// caught) — the CPU is returned. Check [`Device::is_cuda`] on the result to
/// learn which one you got, or call [`cuda_device`] to get the reason as an
/// error instead of a fallback. The `Result` is kept for devices whose
/// creation can fail; today every error on the CUDA path becomes the CPU
/// fallback.
pub fn device(prefer_cuda: bool) -> Result<Device> {
    if prefer_cuda {
        if let Ok(device) = cuda_device(0) {
            return Ok(device);
        }
    }
    Ok(Device::Cpu)
}

/// CUDA device `ordinal`, or an [`AmpError::Backend`] that says why it cannot
/// be had (built without the `cuda` feature, no driver or no device, ordinal
/// out of range). Never falls back and never panics.
pub fn cuda_device(ordinal: usize) -> Result<Device> {
    if !cfg!(feature = "cuda") {
        return Err(AmpError::backend(
            "CUDA requested, but amp-candle was built without its `cuda` feature",
        ));
    }
    // cudarc may panic on unusual driver states; a missing GPU must come back
    // as an error, so the attempt is isolated.
    match std::panic::catch_unwind(|| Device::new_cuda(ordinal)) {
        Ok(Ok(device)) => Ok(device),
        Ok(Err(error)) => Err(AmpError::backend(format!(
            "CUDA device {ordinal} is not usable: {error}"
        ))),
        Err(_) => Err(AmpError::backend(format!(
            "CUDA device {ordinal} is not usable: device creation panicked"
        ))),
    }
}

/// Per-tensor L2 norms, kept on the store's device as one 1-D tensor.
///
/// One tensor of length `num_tensors` (in the compute dtype: `f32` for
/// `f32`/`f16`/`bf16` stores, `f64` for `f64` stores) rather than one 0-d
/// tensor per parameter: the projection computes every clip coefficient
/// `min(1, ε / (‖δ‖ + 1e-12))` with three whole-vector ops instead of three
/// per tensor, and [`ParamStore::norms_to_host`](amp_core::ParamStore::norms_to_host) is a single device read.
/// Concatenating costs one small copy per tensor (a few bytes each), far
/// cheaper than the per-tensor launches and host syncs it saves.
#[derive(Clone, Debug)]
pub struct CandleNorms {
    norms: Tensor,
}

impl CandleNorms {
    /// The norms as a 1-D device tensor, one entry per parameter tensor
    /// (0 for masked-out tensors).
    pub fn as_tensor(&self) -> &Tensor {
        &self.norms
    }

    /// Number of entries (the store's number of tensors).
    pub fn len(&self) -> usize {
        self.norms.elem_count()
    }

    /// `true` for a store without tensors.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The parameters of a candle model (`Var`s), their gradients and AMP's
/// parameter-shaped buffers.
///
/// * **Parameters** are the `Var`s themselves; writes go through `Var::set`,
///   which copies into the existing storage, so the model's layers (which
///   hold clones of the same vars) see every update. Vars must all be on
///   one device and of one float dtype.
/// * **Gradients** are candle tensors handed over from a `GradStore`
///   ([`CandleStore::backward`], [`CandleStore::absorb_grads`]), set one by
///   one ([`CandleStore::set_grad`]) or written from the host
///   ([`ParamStore::write`](amp_core::ParamStore::write) on [`Slot::Grads`](amp_core::Slot::Grads)).
/// * **Buffers** (momentum, δ, the snapshot of θ) are tensors of the
///   parameters' dtype and device.
/// * **Master weights** ([`CandleStore::with_master_weights`], for f16 and
///   bf16 vars): the store steps an f32 copy of θ and writes it, rounded,
///   into the vars; gradients and buffers are f32.
///
/// On the CPU with `f32` or `f64` storage, operations write into the
/// existing storage of the vars, the buffers and the gradients the store
/// made itself, one loop per tensor (candle's in-place custom operations;
/// the arithmetic is that of the candle operations they replace, bit for
/// bit), and norms and the finiteness check read the tensors' memory
/// directly. A gradient the caller handed over (from `backward()` or
/// [`CandleStore::set_grad`]) is never written into: its first update
/// writes into the storage of a gradient the store made in an earlier step
/// (its first step allocates it), so that a step allocates no
/// parameter-sized memory once the first is done; the store holds one
/// gradient-sized tensor per parameter between steps for this.
/// `axpy_from` and AMP's ascent step (`perturb_from_grads`) are fused, one
/// pass per tensor. [`CandleStore::allocating`] turns all of this off.
/// On CUDA, [`CandleStore::in_place_on_cuda`] writes in place the same way
/// through amp-candle's own kernels, one launch per tensor and operation
/// (counted by [`cuda_kernel_launches`]); norms and the finiteness check
/// stay candle's reductions there.
///
/// Elsewhere (CUDA by default, half precision) every operation is a handful of candle
/// ops per tensor (candle has no multi-tensor kernels): `axpy` is a scale
/// and an add, `scale` one multiply, the norm a square and a sum. Per-tensor
/// scalars never leave the device inside a step: norms live in one
/// [`CandleNorms`] vector, clip coefficients are computed from it with
/// tensor ops and applied by broadcasting a 0-d view, and
/// [`ParamStore::all_finite`](amp_core::ParamStore::all_finite) reduces the whole slot to one scalar before
/// its single read. Half-precision tensors are widened to `f32` for each
/// operation and rounded back when stored.
///
/// The scalar type is `f64` whatever the dtype: candle takes scalar operands
/// as `f64` and rounds them to the tensor's dtype inside each kernel, as
/// `amp-ndarray`'s `f32` store rounds its hyper-parameters.
#[derive(Debug)]
pub struct CandleStore {
    vars: Vec<Var>,
    /// The vars' element counts (their shapes never change), read without
    /// touching each var.
    numel: Vec<usize>,
    /// The addresses of the vars' storage ([`storage_address`]), to tell
    /// in one lookup whether a gradient shares a var's storage. Stable:
    /// the store holds the vars, and `Var::set` writes into their storage.
    var_storage: HashSet<usize>,
    names: Option<Vec<String>>,
    device: Device,
    dtype: CDType,
    compute: CDType,
    /// Gradient values; `None` reads as zeros.
    grads: Vec<Option<Tensor>>,
    /// Which tensors received a gradient since the last `zero_grads`.
    has_grad: Vec<bool>,
    /// Which gradients the store made itself (results of its operations,
    /// host writes), as opposed to tensors taken from the caller or from
    /// candle's backward pass, which others may share: only the former are
    /// written in place.
    grad_owned: Vec<bool>,
    /// Per tensor, a gradient the store made itself and holds no longer
    /// (dropped by `zero_grads` or replaced), kept for the next write to a
    /// gradient taken from the caller: on the CPU, that write goes into
    /// this already mapped memory instead of a fresh allocation (see
    /// [`CandleStore::grad`]). In-place stores only.
    spare: Vec<Option<Tensor>>,
    /// Whether operations may write into existing storage
    /// ([`CandleStore::allocating`] turns it off).
    in_place: bool,
    /// Whether they may on CUDA too ([`CandleStore::in_place_on_cuda`]).
    in_place_cuda: bool,
    buffers: Buffers<Vec<Tensor>>,
    /// With master weights ([`CandleStore::with_master_weights`]): the f32
    /// copy of θ the optimiser steps; the vars hold it rounded to their
    /// half dtype.
    master: Option<Vec<Tensor>>,
}
