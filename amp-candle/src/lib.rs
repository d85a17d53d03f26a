//! # amp-candle
//!
//! The [candle](https://github.com/huggingface/candle) backend of [`amp_core`]:
//! a [`ParamStore`] over `candle_core::Var`s, on the CPU or (with the `cuda`
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
use std::fmt;

use amp_core::{
    check_len, check_shape, AmpError, BufferId, Buffers, DType, HostTensor, ParamStore, Result,
    Slot, PROJECTION_GUARD,
};
use candle_core::backprop::GradStore;
use candle_core::{DType as CDType, Device, Tensor, Var};
use candle_nn::VarMap;

mod fused;
mod in_place;
mod master;
mod targets;

use targets::Batch;

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
/// per tensor, and [`ParamStore::norms_to_host`] is a single device read.
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
///   ([`ParamStore::write`] on [`Slot::Grads`]).
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
///
/// Elsewhere (CUDA, half precision) every operation is a handful of candle
/// ops per tensor (candle has no multi-tensor kernels): `axpy` is a scale
/// and an add, `scale` one multiply, the norm a square and a sum. Per-tensor
/// scalars never leave the device inside a step: norms live in one
/// [`CandleNorms`] vector, clip coefficients are computed from it with
/// tensor ops and applied by broadcasting a 0-d view, and
/// [`ParamStore::all_finite`] reduces the whole slot to one scalar before
/// its single read. Half-precision tensors are widened to `f32` for each
/// operation and rounded back when stored.
///
/// The scalar type is `f64` whatever the dtype: candle takes scalar operands
/// as `f64` and rounds them to the tensor's dtype inside each kernel, as
/// `amp-ndarray`'s `f32` store rounds its hyper-parameters.
#[derive(Debug)]
pub struct CandleStore {
    vars: Vec<Var>,
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
    /// Whether CPU operations may write into existing storage
    /// ([`CandleStore::allocating`] turns it off).
    in_place: bool,
    buffers: Buffers<Vec<Tensor>>,
    /// With master weights ([`CandleStore::with_master_weights`]): the f32
    /// copy of θ the optimiser steps; the vars hold it rounded to their
    /// half dtype.
    master: Option<Vec<Tensor>>,
}

impl CandleStore {
    /// A store over `vars`, in the given order. They must share one device
    /// and one float dtype (f16, bf16, f32, f64) and be contiguous (every
    /// `Var` that candle creates is).
    pub fn from_vars(vars: Vec<Var>) -> Result<Self> {
        Self::build(vars, None)
    }

    /// A store over every var of `varmap`, sorted by name (a `VarMap` is a
    /// hash map, so its own order changes from run to run; sorting keeps
    /// tensor indices, parameter groups and checkpoints stable). The names
    /// are kept: see [`CandleStore::names`] and [`CandleStore::index_of`].
    pub fn from_varmap(varmap: &VarMap) -> Result<Self> {
        let data = varmap
            .data()
            .lock()
            .map_err(|_| AmpError::backend("the VarMap's lock is poisoned"))?;
        let mut named: Vec<(String, Var)> = data
            .iter()
            .map(|(name, var)| (name.clone(), var.clone()))
            .collect();
        drop(data);
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let (names, vars) = named.into_iter().unzip();
        Self::build(vars, Some(names))
    }

    /// A store of new vars on `device` holding `values` (each in its own
    /// dtype; all must have the same one). This is the factory the
    /// cross-backend suite uses to start every backend from the same weights.
    pub fn from_host(values: &[HostTensor], device: &Device) -> Result<Self> {
        let vars = values
            .iter()
            .enumerate()
            .map(|(index, value)| {
                let dtype = candle_dtype(value.dtype()).ok_or_else(|| AmpError::DTypeMismatch {
                    index,
                    expected: "a dtype candle supports".into(),
                    found: value.dtype().to_string(),
                })?;
                let tensor = host_to_tensor(value, dtype, device)?;
                Var::from_tensor(&tensor).map_err(backend)
            })
            .collect::<Result<Vec<_>>>()?;
        Self::build(vars, None)
    }

    fn build(vars: Vec<Var>, names: Option<Vec<String>>) -> Result<Self> {
        let (device, dtype) = match vars.first() {
            Some(first) => (first.device().clone(), first.dtype()),
            None => (Device::Cpu, CDType::F32),
        };
        if amp_dtype(dtype).is_none() {
            return Err(AmpError::DTypeMismatch {
                index: 0,
                expected: "a float dtype (f16, bf16, f32 or f64)".into(),
                found: format!("{dtype:?}"),
            });
        }
        for (index, var) in vars.iter().enumerate() {
            if var.dtype() != dtype {
                return Err(AmpError::DTypeMismatch {
                    index,
                    expected: format!("{dtype:?} (the dtype of tensor 0)"),
                    found: format!("{:?}", var.dtype()),
                });
            }
            if !var.device().same_device(&device) {
                return Err(AmpError::DeviceMismatch {
                    index,
                    expected: device_name(&device),
                    found: device_name(var.device()),
                });
            }
            if !var.is_contiguous() {
                return Err(AmpError::backend(format!(
                    "tensor {index} is not contiguous; Var::set needs contiguous vars"
                )));
            }
        }
        // The same var twice would be perturbed and stepped twice: ε
        // exceeded, the step doubled.
        let mut seen = std::collections::HashMap::new();
        for (index, var) in vars.iter().enumerate() {
            if let Some(first) = seen.insert(var.id(), index) {
                return Err(AmpError::config(
                    "vars",
                    format!("tensors {first} and {index} are the same var"),
                ));
            }
        }
        let n = vars.len();
        let var_storage = vars.iter().map(|v| storage_address(v)).collect();
        Ok(CandleStore {
            vars,
            var_storage,
            names,
            device,
            dtype,
            compute: compute_dtype(dtype),
            grads: vec![None; n],
            has_grad: vec![false; n],
            grad_owned: vec![false; n],
            spare: vec![None; n],
            in_place: true,
            buffers: Buffers::new(),
            master: None,
        })
    }

    /// The vars, in store order.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// Var `index`.
    pub fn var(&self, index: usize) -> Result<&Var> {
        self.check_index(index)?;
        Ok(&self.vars[index])
    }

    /// The vars' names, in store order, when the store was built from a
    /// `VarMap`.
    pub fn names(&self) -> Option<&[String]> {
        self.names.as_deref()
    }

    /// The index of the var called `name` (stores built from a `VarMap`).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.names.as_ref()?.iter().position(|n| n == name)
    }

    /// The device every var lives on (the CPU for an empty store).
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype the store steps its parameters in, as candle names it:
    /// the vars' dtype, or `F32` with master weights.
    pub fn candle_dtype(&self) -> CDType {
        self.dtype
    }

    /// The vars' own dtype (the model's): the same as
    /// [`CandleStore::candle_dtype`] unless the store keeps master weights.
    pub fn model_dtype(&self) -> CDType {
        self.vars.first().map_or(self.dtype, |v| v.dtype())
    }

    /// Gives the vars back.
    pub fn into_vars(self) -> Vec<Var> {
        self.vars
    }

    /// The gradient of tensor `index` from the last closure call, if any.
    ///
    /// On the CPU (`f32` and `f64` stores, unless
    /// [`CandleStore::allocating`]) the store updates the gradients it made
    /// itself in place, and reuses their storage for later steps'
    /// gradients, as PyTorch reuses `.grad` across steps: a clone of the
    /// tensor returned here shares that storage. `copy()` it to keep its
    /// values past the next step. Tensors handed to the store
    /// ([`CandleStore::set_grad`], [`CandleStore::absorb_grads`]) are never
    /// written.
    pub fn grad(&self, index: usize) -> Option<&Tensor> {
        match self.has_grad.get(index) {
            Some(true) => self.grads[index].as_ref(),
            _ => None,
        }
    }

    /// Sets the gradient of tensor `index`; it must have the var's shape,
    /// dtype and device.
    pub fn set_grad(&mut self, index: usize, grad: &Tensor) -> Result<()> {
        self.check_index(index)?;
        let grad = self.accept_grad(index, grad)?;
        self.replace_grad(index, Some(grad), false);
        self.has_grad[index] = true;
        Ok(())
    }

    /// Takes the gradients of the store's vars from `grads` (what candle's
    /// `backward()` returns), replacing those already held for the same
    /// vars. Vars absent from `grads` keep their state (after
    /// [`ParamStore::zero_grads`]: no gradient). Returns how many vars got a
    /// gradient. Everything is checked before anything is taken.
    pub fn absorb_grads(&mut self, grads: &GradStore) -> Result<usize> {
        let taken = self.grads_from(grads)?;
        let count = taken.len();
        for (index, grad) in taken {
            self.replace_grad(index, Some(grad), false);
            self.has_grad[index] = true;
        }
        Ok(count)
    }

    /// Like [`CandleStore::absorb_grads`], but adds to gradients already
    /// held since the last [`ParamStore::zero_grads`] (for gradient
    /// accumulation over micro-batches inside one closure call).
    pub fn accumulate_grads(&mut self, grads: &GradStore) -> Result<usize> {
        let taken = self.grads_from(grads)?;
        let mut sums = Vec::with_capacity(taken.len());
        for (index, grad) in taken {
            let sum = match (self.has_grad[index], &self.grads[index]) {
                (true, Some(held)) => {
                    let sum = self.up(held)?.add(&self.up(&grad)?).map_err(backend)?;
                    (self.down(sum)?, true)
                }
                _ => (grad, false),
            };
            sums.push((index, sum));
        }
        let count = sums.len();
        for (index, (sum, owned)) in sums {
            self.replace_grad(index, Some(sum), owned);
            self.has_grad[index] = true;
        }
        Ok(count)
    }

    /// Runs `loss.backward()`, takes the gradients of the store's vars
    /// (as [`CandleStore::absorb_grads`]) and returns the loss as `f64` —
    /// what an AMP closure returns. `loss` must be a 0-d tensor.
    pub fn backward(&mut self, loss: &Tensor) -> Result<f64> {
        if loss.rank() != 0 {
            return Err(AmpError::backend(format!(
                "the loss must be a 0-d tensor, got shape {:?}",
                loss.dims()
            )));
        }
        let grads = loss.backward().map_err(backend)?;
        let value = loss
            .to_dtype(CDType::F64)
            .and_then(|l| l.to_scalar::<f64>())
            .map_err(backend)?;
        self.absorb_grads(&grads)?;
        Ok(value)
    }

    fn grads_from(&self, grads: &GradStore) -> Result<Vec<(usize, Tensor)>> {
        let mut taken = Vec::new();
        for (index, var) in self.vars.iter().enumerate() {
            if let Some(grad) = grads.get(var.as_tensor()) {
                taken.push((index, self.accept_grad(index, grad)?));
            }
        }
        Ok(taken)
    }

    /// Checks a gradient for tensor `index` and detaches it from any graph;
    /// one that shares the storage of a var is copied, since vars are
    /// updated in place.
    fn accept_grad(&self, index: usize, grad: &Tensor) -> Result<Tensor> {
        let var = &self.vars[index];
        check_shape(index, var.dims(), grad.dims())?;
        // With master weights the model's gradients come in its half dtype
        // and are widened to the master weights' f32.
        let widen = self.master.is_some() && grad.dtype() == var.dtype();
        if grad.dtype() != self.dtype && !widen {
            return Err(AmpError::DTypeMismatch {
                index,
                expected: format!("{:?}", self.dtype),
                found: format!("{:?}", grad.dtype()),
            });
        }
        if !grad.device().same_device(&self.device) {
            return Err(AmpError::DeviceMismatch {
                index,
                expected: device_name(&self.device),
                found: device_name(grad.device()),
            });
        }
        let grad = grad.detach();
        if widen && grad.dtype() != self.dtype {
            // A new tensor: it shares no storage with a var.
            cast(&grad, self.dtype).map_err(backend)
        } else if self.var_storage.contains(&storage_address(&grad)) {
            grad.copy().map_err(backend)
        } else {
            Ok(grad)
        }
    }

    fn check_index(&self, index: usize) -> Result<()> {
        amp_core::check_index(index, self.vars.len())
    }

    fn check_mask(&self, mask: &[bool]) -> Result<()> {
        check_len("mask", self.vars.len(), mask.len())
    }

    /// Fails for a buffer that is not live, before anything is written.
    fn check_slot(&self, slot: Slot) -> Result<()> {
        match slot {
            Slot::Buffer(id) => self.buffers.get(id).map(drop),
            _ => Ok(()),
        }
    }

    fn check_pair(&self, dst: Slot, src: Slot) -> Result<()> {
        self.check_slot(dst)?;
        self.check_slot(src)?;
        if dst == src {
            return Err(AmpError::backend(format!(
                "source and destination must be different slots, got {dst:?} twice"
            )));
        }
        Ok(())
    }

    /// Tensor `index` of `slot`, for reading only: a parameter comes back
    /// detached but sharing the var's storage, a missing gradient as zeros.
    fn value(&self, slot: Slot, index: usize) -> Result<Tensor> {
        match slot {
            Slot::Params => match &self.master {
                Some(master) => Ok(master[index].clone()),
                None => Ok(self.vars[index].as_tensor().detach()),
            },
            Slot::Grads => match &self.grads[index] {
                Some(grad) => Ok(grad.clone()),
                None => Tensor::zeros(self.vars[index].shape(), self.dtype, &self.device)
                    .map_err(backend),
            },
            Slot::Buffer(id) => Ok(self.buffers.get(id)?[index].clone()),
        }
    }

    /// Tensor `index` of `slot` as the source of an in-place kernel or a
    /// scan of host memory, which record no autograd graph: as
    /// [`CandleStore::value`], without detaching a var (which allocates).
    fn source(&self, slot: Slot, index: usize) -> Result<Tensor> {
        match (slot, &self.master) {
            (Slot::Params, None) => Ok(self.vars[index].as_tensor().clone()),
            _ => self.value(slot, index),
        }
    }

    /// Stores `value` (of the storage dtype, and never sharing a var's
    /// storage) as tensor `index` of `slot`. Writing a gradient does not
    /// change [`ParamStore::grad_mask`].
    fn put(&mut self, slot: Slot, index: usize, value: Tensor) -> Result<()> {
        match slot {
            Slot::Params => {
                // `Var::set` copies into the var's storage; an empty tensor
                // has nothing to copy (and candle's ops return empty inputs
                // unchanged, which `set` would reject as self-derived).
                // With master weights the var gets θ rounded to its dtype,
                // and the master copy the value itself.
                if value.elem_count() > 0 {
                    let var = &self.vars[index];
                    let rounded = cast(&value, var.dtype()).map_err(backend)?;
                    var.set(&rounded).map_err(backend)?;
                }
                if let Some(master) = &mut self.master {
                    master[index] = value;
                }
                Ok(())
            }
            Slot::Grads => {
                self.replace_grad(index, Some(value), true);
                Ok(())
            }
            Slot::Buffer(id) => {
                self.buffers.get_mut(id)?[index] = value;
                Ok(())
            }
        }
    }

    /// Widens to the compute dtype (a no-op unless half precision).
    fn up(&self, tensor: &Tensor) -> Result<Tensor> {
        cast(tensor, self.compute).map_err(backend)
    }

    /// Rounds back to the storage dtype.
    fn down(&self, tensor: Tensor) -> Result<Tensor> {
        cast(&tensor, self.dtype).map_err(backend)
    }

    /// The projection's coefficients `min(1, max_norm / (norm + 1e-12))`,
    /// all tensors at once, on the device, in the compute dtype.
    fn coefficients(&self, norms: &CandleNorms, max_norm: &[f64]) -> Result<Tensor> {
        let max_norm = Tensor::from_slice(max_norm, max_norm.len(), &self.device)
            .and_then(|t| t.to_dtype(self.compute))
            .map_err(backend)?;
        let norms = cast(&norms.norms, self.compute).map_err(backend)?;
        norms
            .affine(1.0, PROJECTION_GUARD)
            .and_then(|guarded| max_norm.div(&guarded))
            .and_then(|c| c.minimum(1.0))
            .map_err(backend)
    }

    /// One tensor of `dtype` and length `n` from per-tensor 0-d results of
    /// that dtype; masked-out entries are 0.
    fn gather(&self, parts: Vec<Option<Tensor>>, dtype: CDType) -> Result<Tensor> {
        if parts.is_empty() {
            return Tensor::zeros(0, dtype, &self.device).map_err(backend);
        }
        let zero = Tensor::zeros((), dtype, &self.device).map_err(backend)?;
        let parts: Vec<Tensor> = parts
            .into_iter()
            .map(|p| p.unwrap_or_else(|| zero.clone()))
            .collect();
        Tensor::stack(&parts, 0).map_err(backend)
    }
}

/// Builds a tensor of `dtype` on `device` from host values (a
/// [`HostTensor`] always holds as many values as its shape has elements).
fn host_to_tensor(value: &HostTensor, dtype: CDType, device: &Device) -> Result<Tensor> {
    Tensor::from_vec(value.data().to_vec(), value.shape().to_vec(), device)
        .and_then(|t| cast(&t, dtype))
        .map_err(backend)
}

impl ParamStore for CandleStore {
    type Scalar = f64;
    type Norms = CandleNorms;

    fn num_tensors(&self) -> usize {
        self.vars.len()
    }

    fn shape(&self, index: usize) -> Result<Vec<usize>> {
        self.check_index(index)?;
        Ok(self.vars[index].dims().to_vec())
    }

    fn dtype(&self) -> DType {
        // `build` accepts float dtypes only.
        amp_dtype(self.dtype).unwrap_or(DType::F32)
    }

    fn zero_grads(&mut self) -> Result<()> {
        // Dropping the tensors frees their memory before the next backward
        // (those the store made become spares, when it writes in place).
        for index in 0..self.grads.len() {
            self.replace_grad(index, None, false);
        }
        self.has_grad.fill(false);
        Ok(())
    }

    fn grad_mask(&self) -> Result<Vec<bool>> {
        Ok(self.has_grad.clone())
    }

    fn alloc_buffer(&mut self) -> Result<BufferId> {
        let buffer = self
            .vars
            .iter()
            .map(|v| Tensor::zeros(v.shape(), self.dtype, &self.device))
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(backend)?;
        Ok(self.buffers.insert(buffer))
    }

    fn free_buffer(&mut self, id: BufferId) -> Result<()> {
        self.buffers.remove(id).map(drop)
    }

    fn pin_buffer(&mut self, id: BufferId, pinned: bool) -> Result<()> {
        self.buffers.set_pinned(id, pinned)
    }

    fn copy(&mut self, dst: Slot, src: Slot, mask: &[bool]) -> Result<()> {
        self.check_mask(mask)?;
        self.check_pair(dst, src)?;
        let mut batch = Batch::with_capacity(mask.len());
        for index in (0..mask.len()).filter(|&i| mask[i]) {
            if let Some(target) = self.in_place_target(dst, index)? {
                let value = self.source(src, index)?;
                batch.push(target.elem_count(), move || {
                    target.inplace_op2(&value, &in_place::CopyFrom)
                });
                continue;
            }
            let mut value = self.value(src, index)?;
            // Vars change in place, and so do the store's own tensors where
            // it writes in place: a slot must own its copy. (`Var::set`
            // copies by itself; master weights are replaced, never changed
            // in place.)
            let shared = src == Slot::Params && self.master.is_none();
            if dst != Slot::Params && (shared || self.writes_in_place()) {
                value = value.copy().map_err(backend)?;
            }
            self.put(dst, index, value)?;
        }
        batch.run()
    }

    fn scale(&mut self, dst: Slot, factor: &[f64], mask: &[bool]) -> Result<()> {
        self.check_mask(mask)?;
        check_len("scale factors", mask.len(), factor.len())?;
        self.check_slot(dst)?;
        let mut batch = Batch::with_capacity(mask.len());
        for index in (0..mask.len()).filter(|&i| mask[i] && factor[i] != 1.0) {
            if let Some(target) = self.in_place_target(dst, index)? {
                let op = in_place::Scale(factor[index]);
                batch.push(target.elem_count(), move || target.inplace_op1(&op));
                continue;
            }
            let d = self.up(&self.value(dst, index)?)?;
            let scaled = d.affine(factor[index], 0.0).map_err(backend)?;
            let scaled = self.down(scaled)?;
            self.put(dst, index, scaled)?;
        }
        batch.run()
    }

    fn axpy(&mut self, dst: Slot, alpha: &[f64], src: Slot, mask: &[bool]) -> Result<()> {
        self.check_mask(mask)?;
        check_len("axpy coefficients", mask.len(), alpha.len())?;
        self.check_pair(dst, src)?;
        let (mut batch, mut adopted) = (Batch::with_capacity(mask.len()), Vec::new());
        for index in (0..mask.len()).filter(|&i| mask[i]) {
            // A gradient taken from the caller goes to the spare, summed on
            // the way: `spare ← g + alpha · src` in one pass. The spare
            // becomes the gradient once written.
            let spare = (dst == Slot::Grads)
                .then(|| self.take_spare(index))
                .flatten();
            let (target, base) = match spare {
                Some((spare, g)) => {
                    adopted.push((index, spare.clone()));
                    (Some(spare), Some(g))
                }
                None => (self.in_place_target(dst, index)?, None),
            };
            if let Some(target) = target {
                let (s, a) = (self.source(src, index)?, alpha[index]);
                batch.push(target.elem_count(), move || match &base {
                    Some(g) => target.inplace_op3(g, &s, &in_place::AxpyFrom(a)),
                    None => target.inplace_op2(&s, &in_place::Axpy(a)),
                });
                continue;
            }
            let d = self.up(&self.value(dst, index)?)?;
            let s = self.up(&self.value(src, index)?)?;
            // ±1 needs no multiply: x·1 is exact, so the result is the same.
            let a = alpha[index];
            let sum = if a == 1.0 {
                d.add(&s)
            } else if a == -1.0 {
                d.sub(&s)
            } else {
                s.affine(a, 0.0).and_then(|s| d.add(&s))
            }
            .map_err(backend)?;
            let sum = self.down(sum)?;
            self.put(dst, index, sum)?;
        }
        batch.run()?;
        for (index, spare) in adopted {
            self.replace_grad(index, Some(spare), true);
        }
        Ok(())
    }

    fn addcmul(&mut self, dst: Slot, alpha: &[f64], a: Slot, b: Slot, mask: &[bool]) -> Result<()> {
        self.check_mask(mask)?;
        amp_core::composed::check_addcmul(mask.len(), dst, alpha, a, b)?;
        for slot in [dst, a, b] {
            self.check_slot(slot)?;
        }
        let mut batch = Batch::with_capacity(mask.len());
        for index in (0..mask.len()).filter(|&i| mask[i]) {
            if let Some(target) = self.in_place_target(dst, index)? {
                let (x, y) = (self.source(a, index)?, self.source(b, index)?);
                let op = in_place::Addcmul(alpha[index]);
                batch.push(target.elem_count(), move || target.inplace_op3(&x, &y, &op));
                continue;
            }
            let d = self.up(&self.value(dst, index)?)?;
            let x = self.up(&self.value(a, index)?)?;
            let y = self.up(&self.value(b, index)?)?;
            // d + (alpha · x) · y, in that order (amp_core::elementwise).
            let sum = x
                .affine(alpha[index], 0.0)
                .and_then(|t| t.mul(&y))
                .and_then(|t| d.add(&t))
                .map_err(backend)?;
            let sum = self.down(sum)?;
            self.put(dst, index, sum)?;
        }
        batch.run()
    }

    fn addcdiv_sqrt(
        &mut self,
        dst: Slot,
        alpha: &[f64],
        num: Slot,
        den: Slot,
        divisor: &[f64],
        eps: &[f64],
        mask: &[bool],
    ) -> Result<()> {
        self.check_mask(mask)?;
        amp_core::composed::check_addcdiv_sqrt(mask.len(), dst, (alpha, divisor, eps), num, den)?;
        for slot in [dst, num, den] {
            self.check_slot(slot)?;
        }
        let mut batch = Batch::with_capacity(mask.len());
        for index in (0..mask.len()).filter(|&i| mask[i]) {
            if let Some(target) = self.in_place_target(dst, index)? {
                let (x, y) = (self.source(num, index)?, self.source(den, index)?);
                let op = in_place::AddcdivSqrt {
                    alpha: alpha[index],
                    divisor: divisor[index],
                    eps: eps[index],
                };
                batch.push(target.elem_count(), move || target.inplace_op3(&x, &y, &op));
                continue;
            }
            let d = self.up(&self.value(dst, index)?)?;
            let x = self.up(&self.value(num, index)?)?;
            let y = self.up(&self.value(den, index)?)?;
            // A true division by the divisor (candle's `/ f64` multiplies by
            // the reciprocal, which rounds differently).
            let c = Tensor::new(divisor[index], &self.device)
                .and_then(|c| c.to_dtype(self.compute))
                .map_err(backend)?;
            // d + (alpha · x) / (√y / c + eps), in that order
            // (amp_core::elementwise).
            let sum = y
                .sqrt()
                .and_then(|t| t.broadcast_div(&c))
                .and_then(|t| t.affine(1.0, eps[index]))
                .and_then(|den| x.affine(alpha[index], 0.0)?.div(&den))
                .and_then(|t| d.add(&t))
                .map_err(backend)?;
            let sum = self.down(sum)?;
            self.put(dst, index, sum)?;
        }
        batch.run()
    }

    fn axpy_from(
        &mut self,
        dst: Slot,
        base: Slot,
        alpha: &[f64],
        src: Slot,
        mask: &[bool],
    ) -> Result<()> {
        if self.fused_axpy_from(dst, base, alpha, src, mask)? {
            return Ok(());
        }
        amp_core::composed::axpy_from(self, dst, base, alpha, src, mask)
    }

    fn perturb_from_grads(
        &mut self,
        snapshot: Option<Slot>,
        delta: Option<Slot>,
        inner_lr: &[f64],
        epsilon: &[f64],
        mask: &[bool],
    ) -> Result<CandleNorms> {
        if let Some(norms) = self.fused_perturb(snapshot, delta, inner_lr, epsilon, mask)? {
            return Ok(norms);
        }
        amp_core::composed::perturb_from_grads(self, snapshot, delta, inner_lr, epsilon, mask)
    }

    fn maximum(&mut self, dst: Slot, src: Slot, mask: &[bool]) -> Result<()> {
        self.check_mask(mask)?;
        self.check_pair(dst, src)?;
        for index in (0..mask.len()).filter(|&i| mask[i]) {
            let d = self.value(dst, index)?;
            let s = self.value(src, index)?;
            // candle's maximum keeps `d` where `s` is NaN; a NaN in `s`
            // must win, as in torch.maximum (amp_core::elementwise).
            let max = d
                .maximum(&s)
                .and_then(|m| s.ne(&s)?.where_cond(&s, &m))
                .map_err(backend)?;
            self.put(dst, index, max)?;
        }
        Ok(())
    }

    fn norms(&mut self, src: Slot, mask: &[bool]) -> Result<CandleNorms> {
        self.check_mask(mask)?;
        self.check_slot(src)?;
        if let Some(norms) = self.host_norms(src, mask, None)? {
            return Ok(norms);
        }
        let mut parts = Vec::with_capacity(mask.len());
        for (index, &active) in mask.iter().enumerate() {
            parts.push(if active {
                let t = self.up(&self.value(src, index)?)?;
                Some(t.sqr().and_then(|t| t.sum_all()).map_err(backend)?)
            } else {
                None
            });
        }
        // One square root for the whole vector.
        let norms = self.gather(parts, self.compute)?.sqrt().map_err(backend)?;
        Ok(CandleNorms { norms })
    }

    fn clip_to_norms(
        &mut self,
        dst: Slot,
        norms: &CandleNorms,
        max_norm: &[f64],
        mask: &[bool],
    ) -> Result<()> {
        self.check_mask(mask)?;
        check_len("norms", mask.len(), norms.len())?;
        check_len("maximum norms", mask.len(), max_norm.len())?;
        self.check_slot(dst)?;
        if !mask.iter().any(|&m| m) {
            return Ok(());
        }
        let coefficients = self.coefficients(norms, max_norm)?;
        // Writing in place, the coefficients are read from host memory (on
        // the CPU a read is a copy of one value per tensor).
        let on_host = match self.writes_in_place() {
            true => Some(
                cast(&coefficients, CDType::F64)
                    .and_then(|c| c.to_vec1::<f64>())
                    .map_err(backend)?,
            ),
            false => None,
        };
        let mut batch = Batch::with_capacity(mask.len());
        for index in (0..mask.len()).filter(|&i| mask[i]) {
            if let Some(c) = &on_host {
                if let Some(target) = self.in_place_target(dst, index)? {
                    let op = in_place::Multiply(c[index]);
                    batch.push(target.elem_count(), move || target.inplace_op1(&op));
                    continue;
                }
            }
            let d = self.up(&self.value(dst, index)?)?;
            // A 0-d view of the coefficient, broadcast: no host read.
            let clipped = coefficients
                .get(index)
                .and_then(|c| d.broadcast_mul(&c))
                .map_err(backend)?;
            let clipped = self.down(clipped)?;
            self.put(dst, index, clipped)?;
        }
        batch.run()
    }

    fn norms_to_host(&self, norms: &CandleNorms) -> Result<Vec<f64>> {
        cast(&norms.norms, CDType::F64)
            .and_then(|n| n.to_vec1::<f64>())
            .map_err(backend)
    }

    fn all_finite(&mut self, src: Slot, mask: &[bool]) -> Result<bool> {
        self.check_mask(mask)?;
        self.check_slot(src)?;
        if !mask.iter().any(|&m| m) {
            return Ok(true);
        }
        if self.writes_in_place() {
            // On the CPU: a scan of each tensor's memory, nothing allocated
            // (`None`: a tensor that is not contiguous).
            let scans = self.read_each(src, mask, |_, t| in_place::all_finite(t))?;
            let scans: Vec<Option<bool>> = scans.into_iter().flatten().collect();
            let finite = match scans.contains(&Some(false)) {
                true => Some(false),
                false => scans.iter().all(Option::is_some).then_some(true),
            };
            if let Some(finite) = finite {
                return Ok(finite);
            }
        }
        // x·0 is 0 for finite x and NaN for ±inf and NaN, so the sum of
        // x·0 over the slot is 0 exactly when every element is finite (a
        // plain sum could overflow). Computed in the storage dtype: zeros
        // cannot overflow.
        let mut parts = Vec::with_capacity(mask.len());
        for (index, &active) in mask.iter().enumerate() {
            parts.push(if active {
                let t = self.value(src, index)?;
                Some(
                    t.affine(0.0, 0.0)
                        .and_then(|z| z.sum_all())
                        .map_err(backend)?,
                )
            } else {
                None
            });
        }
        let total = self
            .gather(parts, self.dtype)?
            .sum_all()
            .and_then(|t| t.to_dtype(CDType::F64))
            .and_then(|t| t.to_scalar::<f64>())
            .map_err(backend)?;
        Ok(total.is_finite())
    }

    fn read(&self, slot: Slot, index: usize) -> Result<HostTensor> {
        self.check_index(index)?;
        self.check_slot(slot)?;
        let shape = self.vars[index].dims().to_vec();
        let numel = self.vars[index].elem_count();
        let data = if (slot == Slot::Grads && !self.has_grad[index]) || numel == 0 {
            vec![0.0; numel]
        } else {
            self.value(slot, index)?
                .to_dtype(CDType::F64)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f64>())
                .map_err(backend)?
        };
        HostTensor::new(shape, self.dtype(), data)
    }

    fn write(&mut self, slot: Slot, index: usize, value: &HostTensor) -> Result<()> {
        check_shape(index, &self.shape(index)?, value.shape())?;
        self.check_slot(slot)?;
        let tensor = host_to_tensor(value, self.dtype, &self.device)?;
        self.put(slot, index, tensor)?;
        if slot == Slot::Grads {
            self.has_grad[index] = true;
        }
        Ok(())
    }
}

impl fmt::Display for CandleStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CandleStore({} tensors, {:?}, {})",
            self.vars.len(),
            self.dtype,
            device_name(&self.device)
        )
    }
}
