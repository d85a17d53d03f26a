//! # amp-tch
//!
//! The libtorch backend of [`amp_core`], over [`tch`] tensors, on the CPU and
//! on CUDA. AMP here is *adversarial model perturbation* (Zheng, Zhang & Mao,
//! CVPR 2021) — a regulariser that trains toward flat minima — not automatic
//! mixed precision.
//!
//! [`TchStore`] implements [`ParamStore`] over the trainable variables of a
//! [`tch::nn::VarStore`] ([`TchStore::from_var_store`]), over any list of
//! leaf tensors ([`TchStore::from_tensors`]) or over host values
//! ([`TchStore::from_host`]). Gradients are libtorch's own: the closure runs
//! `loss.backward()` and autograd leaves them in each tensor's `.grad()`; the
//! store undefines them before every closure call (PyTorch's
//! `zero_grad(set_to_none=True)`; with the [flat layout](#flat-layout) it
//! zeroes them in place instead), so a tensor that the loss does not reach
//! has no gradient and is neither perturbed nor stepped.
//!
//! Train a small MLP with AMP (SGD with Nesterov momentum as the base
//! optimiser, as in the paper):
//! ```
//! use amp_core::{Amp, AmpConfig, AmpError, SgdConfig};
//! use amp_tch::TchStore;
//! use tch::nn::{self, Module};
//! use tch::{Device, Kind, Tensor};
//!
//! tch::manual_seed(0);
//! // Two classes: inside or outside the circle of radius 1.
//! let x = Tensor::rand([256, 2], (Kind::Float, Device::Cpu)) * 3.0 - 1.5;
//! let y = x.square().sum_dim_intlist(1, false, Kind::Float).gt(1.0).to_kind(Kind::Int64);
//!
//! let vs = nn::VarStore::new(Device::Cpu);
//! let model = nn::seq()
//!     .add(nn::linear(vs.root() / "l1", 2, 32, Default::default()))
//!     .add_fn(|t| t.relu())
//!     .add(nn::linear(vs.root() / "l2", 32, 2, Default::default()));
//!
//! let store = TchStore::from_var_store(&vs)?;
//! let config = AmpConfig::default().lr(0.1).epsilon(0.1).inner_iter(1);
//! let mut amp = Amp::sgd(store, config, SgdConfig::nesterov(0.9))?;
//! let mut first = None;
//! let mut loss = f64::NAN;
//! for _ in 0..300 {
//!     // The store has cleared the gradients before each call.
//!     let report = amp.step(|_store, _pass| {
//!         let logits = model.forward(&x);
//!         let loss = logits.cross_entropy_for_logits(&y);
//!         loss.backward();
//!         Ok::<_, AmpError>((logits, loss.double_value(&[])))
//!     })?;
//!     first.get_or_insert(report.loss);
//!     loss = report.loss;
//! }
//! assert!(loss < 0.5 * first.unwrap(), "loss {loss}, first {first:?}");
//! # Ok::<(), AmpError>(())
//! ```
//! (The closure may equally return `TchError` and use tch's fallible `f_*`
//! methods with `?`: any error that converts into a boxed error will do.)
//!
//! ## Multi-tensor execution
//! tch 0.24 does not bind ATen's multi-tensor `_foreach_*` operators, so a
//! small C++ shim, compiled by `build.rs` against the headers of the same
//! libtorch, calls them: each batched [`ParamStore`] operation is **one** call
//! into the shim and a constant number of ATen calls, whatever the number of
//! tensors:
//!
//! | operation | ATen calls |
//! |---|---|
//! | `copy` | `_foreach_copy_` |
//! | `scale` | `_foreach_mul_` (scalar list) |
//! | `axpy` | `_foreach_add_(dst, src, alpha)` per distinct coefficient (≤ 4: parameter groups), else `_foreach_mul` + `_foreach_add_` |
//! | `norms` | `_foreach_norm` + `stack` |
//! | `clip_to_norms` | a few ops on the stacked norms + `_foreach_mul_` (tensor list) |
//! | `all_finite` | `_foreach_norm(∞)` + `stack` + `isfinite().all()`, one read (CPU: `aminmax` per tensor + `stack` instead) |
//! | `axpy_from` | `_foreach_copy_` + the `axpy` calls |
//! | `perturb_from_grads` | the unfused sequence of [`amp_core::composed`] |
//! | `zero_grads`, `grad_mask` | no kernel: references dropped or inspected |
//! | `alloc_buffer` | one `zeros` allocation, viewed per tensor |
//!
//! The foreach operators work on the tensors where autograd and the model
//! put them, and on CUDA they run as fused multi-tensor launches.
//! One caveat: `clip_to_norms` multiplies each tensor by its own coefficient,
//! a 0-d device tensor; ATen's CUDA fast path does not cover that broadcast,
//! so on CUDA it is one small launch per tensor — still without any host
//! synchronisation. Per-tensor clip coefficients and norms stay on the device
//! ([`TchNorms`] holds a device tensor); only
//! [`norms_to_host`](ParamStore::norms_to_host) and
//! [`all_finite`](ParamStore::all_finite) read from the device, once each.
//!
//! ## CPU fast path
//! libtorch's CPU foreach kernels are loops over the tensors that pay a full
//! operator dispatch (about a microsecond) per tensor per operation, and its
//! infinity norm runs far below memory speed. So when every tensor that a
//! batched operation touches (destination and source, masked-in) is a dense,
//! contiguous `f32` or `f64` CPU tensor — parameters, autograd gradients and
//! buffers normally are — the shim runs every operation as plain loops over
//! the tensors' memory (compiled with `-O3 -ffp-contract=off`), with the
//! reference store's arithmetic: `d + a·s` as a separate multiply and add,
//! norms accumulated in `f64` over 8 partial sums exactly as `amp-ndarray`
//! sums them, the clip coefficient `min(1, max / (n + 1e-12))` in the
//! tensors' dtype (a NaN quotient counts as 1, as Rust's `min` has it), and a
//! branch-free finite check over blocks. `perturb_from_grads` is fused there:
//! per tensor one read of the gradient for its norm, then one pass that
//! writes the snapshot and θ + δ; `axpy_from` is one pass. On that path the
//! results are the reference store's bit for bit. [`TchNorms`] then holds a
//! CPU tensor, as it does on the ATen path; written parameters get their
//! autograd version counter bumped, as an in-place ATen operation would.
//! Anything else — CUDA, half precision, strided tensors — takes the ATen
//! path unchanged.
//!
//! ## Flat layout
//! Autograd allocates every gradient on its own and frees it at the next
//! reset, and a model's parameters are as many separate allocations: with a
//! thousand small tensors, the batched operations spend their time on
//! scattered memory and on reading each tensor's metadata.
//! [`TchStore::flatten`] moves the parameters into one allocation (the
//! model's variables become views of it, values unchanged) and the gradients
//! into another, which `zero_grads` then zeroes with one `memset` and
//! `backward()` accumulates into in place. On the CPU the store also keeps
//! the tensors' addresses and sizes, checks them after every closure call
//! (in `grad_mask`), and runs the operations over them directly, merging
//! tensors that lie back to back into one loop. Results are the same bit for
//! bit (the conformance suite runs on flattened stores too).
//! ## Numerics
//! The store's [`ParamStore::Scalar`] is `f64` whatever the tensors' dtype:
//! coefficients go to libtorch as `f64` scalars, and libtorch rounds them to
//! the tensors' compute type, as the `f32` reference store rounds them to
//! `f32`. Projection coefficients are computed on the device in the tensors'
//! dtype. `axpy` is PyTorch's `add_(src, alpha=a)`, which on CPUs with FMA is
//! a fused multiply-add (one rounding), where the reference store rounds
//! twice; norms accumulate in the tensors' dtype, where the reference store
//! accumulates in `f64`. Results therefore agree with the reference within a
//! few ulps per operation, not bit for bit — except on the CPU fast path
//! above, which matches the reference bit for bit.
//!
//! ## Linking
//! `build.rs` gives this package's binaries, tests and examples a RUNPATH to
//! libtorch and keeps `libtorch.so` (which loads `libtorch_cuda.so`) as a
//! needed library, so they start without `LD_LIBRARY_PATH` and see CUDA when
//! there is one. A package of your own that has tch binaries needs the same
//! lines in its `build.rs`; the libtorch directory is exported to it as
//! `DEP_AMP_TCH_LIBTORCH_LIB`.
#![warn(missing_docs)]

use std::ffi::{c_char, c_int, CStr};

use amp_core::{
    check_len, check_shape, AmpError, BufferId, Buffers, DType, HostTensor, ParamStore, Result,
    Slot, PROJECTION_GUARD,
};
use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

/// The `tch` crate this backend is built on (`=0.24.0`, libtorch 2.11), so
/// that dependents name the same version.
pub use tch;

mod ffi {
    use std::ffi::{c_char, c_int};
    use torch_sys::C_tensor;

    /// The tensors themselves.
    pub const PLAIN: c_int = 0;
    /// Their gradients; an undefined gradient reads as zeros.
    pub const GRAD_READ: c_int = 1;
    /// Their gradients; an undefined gradient is defined as zeros first.
    pub const GRAD_WRITE: c_int = 2;

    /// Operations of `amp_tch_raw`.
    pub const RAW_COPY: c_int = 0;
    pub const RAW_SCALE: c_int = 1;
    pub const RAW_AXPY: c_int = 2;
    pub const RAW_AXPY_FROM: c_int = 3;
    pub const RAW_NORMS: c_int = 4;
    pub const RAW_CLIP: c_int = 5;
    pub const RAW_ALL_FINITE: c_int = 6;
    pub const RAW_PERTURB: c_int = 7;

    extern "C" {
        pub fn amp_tch_free_error(message: *mut c_char);
        pub fn amp_tch_copy(
            dst: *const *mut C_tensor,
            dst_view: c_int,
            src: *const *mut C_tensor,
            src_view: c_int,
            n: usize,
        ) -> *mut c_char;
        pub fn amp_tch_scale(
            dst: *const *mut C_tensor,
            dst_view: c_int,
            factor: *const f64,
            n: usize,
        ) -> *mut c_char;
        pub fn amp_tch_axpy(
            dst: *const *mut C_tensor,
            dst_view: c_int,
            src: *const *mut C_tensor,
            src_view: c_int,
            alpha: *const f64,
            n: usize,
        ) -> *mut c_char;
        pub fn amp_tch_axpy_from(
            dst: *const *mut C_tensor,
            dst_view: c_int,
            base: *const *mut C_tensor,
            base_view: c_int,
            src: *const *mut C_tensor,
            src_view: c_int,
            alpha: *const f64,
            n: usize,
        ) -> *mut c_char;
        #[allow(clippy::too_many_arguments)]
        pub fn amp_tch_perturb(
            params: *const *mut C_tensor,
            snapshot: *const *mut C_tensor,
            delta: *const *mut C_tensor,
            n: usize,
            inner_lr: *const f64,
            max_norm: *const f64,
            guard: f64,
            norms: *mut *mut C_tensor,
            handled: *mut c_int,
        ) -> *mut c_char;
        pub fn amp_tch_norms(
            src: *const *mut C_tensor,
            src_view: c_int,
            n: usize,
            out: *mut *mut C_tensor,
        ) -> *mut c_char;
        pub fn amp_tch_clip(
            dst: *const *mut C_tensor,
            dst_view: c_int,
            n: usize,
            norms: *mut C_tensor,
            max_norm: *const f64,
            guard: f64,
        ) -> *mut c_char;
        pub fn amp_tch_all_finite(
            src: *const *mut C_tensor,
            src_view: c_int,
            n: usize,
            out: *mut c_int,
        ) -> *mut c_char;
        pub fn amp_tch_reset_grads(params: *const *mut C_tensor, n: usize) -> *mut c_char;
        pub fn amp_tch_grad_mask(
            params: *const *mut C_tensor,
            n: usize,
            out: *mut u8,
        ) -> *mut c_char;
        pub fn amp_tch_set_grad(param: *mut C_tensor, value: *mut C_tensor) -> *mut c_char;
        pub fn amp_tch_flatten(
            params: *const *mut C_tensor,
            n: usize,
            views: *mut *mut C_tensor,
            flat_params: *mut *mut C_tensor,
            flat_grads: *mut *mut C_tensor,
        ) -> *mut c_char;
        pub fn amp_tch_flat_zero(
            params: *const *mut C_tensor,
            views: *const *mut C_tensor,
            n: usize,
            flat_grads: *mut C_tensor,
            versions: *mut i64,
        ) -> *mut c_char;
        pub fn amp_tch_flat_grad_mask(
            params: *const *mut C_tensor,
            views: *const *mut C_tensor,
            n: usize,
            versions: *const i64,
            expected: *const super::RawSpan,
            out: *mut u8,
            intact: *mut c_int,
        ) -> *mut c_char;
        #[allow(clippy::too_many_arguments)]
        pub fn amp_tch_raw(
            op: c_int,
            is_double: c_int,
            n: usize,
            d: *const super::RawSpan,
            a: *const super::RawSpan,
            b: *const super::RawSpan,
            e: *const super::RawSpan,
            c1: *const f64,
            c2: *const f64,
            guard: f64,
            out: *mut std::ffi::c_void,
            bump: *const *mut C_tensor,
            nbump: usize,
        ) -> *mut c_char;
        pub fn amp_tch_get_grad(param: *mut C_tensor, out: *mut *mut C_tensor) -> *mut c_char;
        pub fn amp_tch_alloc_like(
            params: *const *mut C_tensor,
            n: usize,
            out: *mut *mut C_tensor,
        ) -> *mut c_char;
    }
}

/// Turns a shim return value (NULL or an owned message) into a `Result`.
fn check(message: *mut c_char) -> Result<()> {
    if message.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null return is a NUL-terminated string malloc'ed by the
    // shim, released exactly once here.
    let text = unsafe {
        let text = CStr::from_ptr(message).to_string_lossy().into_owned();
        ffi::amp_tch_free_error(message);
        text
    };
    Err(AmpError::backend(text))
}

/// Wraps an owned `at::Tensor*` returned by the shim.
///
/// # Safety
/// `ptr` must be null or a pointer allocated with `new at::Tensor` and not
/// owned by anything else.
unsafe fn take_tensor(ptr: *mut C_tensor) -> Result<Tensor> {
    if ptr.is_null() {
        Err(AmpError::backend("the libtorch shim returned no tensor"))
    } else {
        Ok(Tensor::from_ptr(ptr))
    }
}

fn tch_error(error: tch::TchError) -> AmpError {
    AmpError::backend(error)
}

/// The raw pointer of a tensor, for the shim. The tensor must outlive the
/// call that uses it; the shim mutates it only in place (or its `.grad`).
fn raw(tensor: &Tensor) -> *mut C_tensor {
    tensor.as_ptr().cast_mut()
}

/// The [`DType`] of a libtorch kind, if it is a floating-point one.
pub fn dtype_of(kind: Kind) -> Option<DType> {
    match kind {
        Kind::Half => Some(DType::F16),
        Kind::BFloat16 => Some(DType::BF16),
        Kind::Float => Some(DType::F32),
        Kind::Double => Some(DType::F64),
        _ => None,
    }
}

/// The libtorch kind of a [`DType`].
pub fn kind_of(dtype: DType) -> Result<Kind> {
    match dtype {
        DType::F16 => Ok(Kind::Half),
        DType::BF16 => Ok(Kind::BFloat16),
        DType::F32 => Ok(Kind::Float),
        DType::F64 => Ok(Kind::Double),
        other => Err(AmpError::backend(format!(
            "dtype {other} has no libtorch equivalent here"
        ))),
    }
}

fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Builds a tensor of `kind` on `device` from host values (rounded to
/// `kind`); it does not require grad.
fn host_to_tensor(value: &HostTensor, kind: Kind, device: Device) -> Result<Tensor> {
    check_len(
        "host tensor elements",
        value.shape.iter().product(),
        value.data.len(),
    )?;
    let shape = value
        .shape
        .iter()
        .map(|&d| i64::try_from(d).map_err(AmpError::backend))
        .collect::<Result<Vec<i64>>>()?;
    Tensor::f_from_slice(&value.data)
        .and_then(|t| t.f_view(shape.as_slice()))
        .and_then(|t| t.f_to_kind(kind))
        .and_then(|t| t.f_to_device(device))
        .map_err(tch_error)
}

/// Per-tensor Euclidean norms computed by [`TchStore`], left on the device.
///
/// `values` holds one entry per masked-in tensor, in store order; `mask` says
/// which tensors those are. [`ParamStore::norms_to_host`] expands them to one
/// `f64` per tensor, with 0 for the masked-out ones.
#[derive(Debug)]
pub struct TchNorms {
    values: Tensor,
    mask: Vec<bool>,
}

impl TchNorms {
    /// The norms of the masked-in tensors, a 1-D tensor on the store's device
    /// in the store's dtype.
    pub fn values(&self) -> &Tensor {
        &self.values
    }

    /// Which tensors of the store the entries of [`TchNorms::values`] belong
    /// to.
    pub fn mask(&self) -> &[bool] {
        &self.mask
    }
}

/// Parameters as libtorch tensors, with their autograd gradients and
/// parameter-shaped buffers.
///
/// All tensors share one device and one floating-point dtype (`f32`, `f64`,
/// `f16` or `bf16`); constructors reject anything else with
/// [`AmpError::DeviceMismatch`] or [`AmpError::DTypeMismatch`]. The store
/// holds shallow clones: in-place updates of the store's tensors are updates
/// of the model's own variables.
///
/// Gradients live in each tensor's `.grad()`, where `backward()` puts them;
/// [`ParamStore::write`] with [`Slot::Grads`] sets one by hand (tests,
/// host-computed gradients). An absent gradient reads as zeros; a batched
/// operation that writes into [`Slot::Grads`] of a tensor without a gradient
/// first gives it a zero gradient, which then counts in
/// [`grad_mask`](ParamStore::grad_mask) ([`amp_core::Amp`] only writes
/// gradients of tensors that have one). Buffers are zero-filled tensors of
/// the parameters' shapes, views into one allocation per buffer.
#[derive(Debug)]
pub struct TchStore {
    params: Vec<Tensor>,
    device: Device,
    kind: Kind,
    dtype: DType,
    buffers: Buffers<Vec<Tensor>>,
    flat: Option<Flat>,
}

/// The flat layout of [`TchStore::flatten`].
#[derive(Debug)]
struct Flat {
    /// All gradients, one allocation (the parameters' allocation is held by
    /// the parameters themselves).
    grads: Tensor,
    /// Per parameter: its gradient over `grads` (`None` for parameters that
    /// did not require grad when flattened).
    views: Vec<Option<Tensor>>,
    /// Per parameter: the version of its gradient when last zeroed.
    versions: Vec<i64>,
    /// The raw path's spans, on the CPU in f32/f64 (see [`RawSpan`]).
    raw: Option<RawLayout>,
}

/// Where a tensor's elements are, as the shim's fast path addresses them:
/// the address (as an integer, so that the store stays `Send`) and the
/// element count. Laid out as the shim's `Span`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
struct RawSpan {
    addr: usize,
    n: i64,
}

impl RawSpan {
    fn of(tensor: &Tensor) -> Self {
        RawSpan {
            addr: tensor.data_ptr() as usize,
            n: tensor.numel() as i64,
        }
    }
}

/// Span lists (and per-tensor coefficients) of an elementwise operation with
/// empty tensors dropped and runs of neighbours merged: tensor `i + 1`
/// joins tensor `i` when, in every list, it starts where `i` ends and its
/// coefficient has the same bits.
#[allow(clippy::type_complexity)]
fn coalesce(
    lists: [Option<&[RawSpan]>; 4],
    coefficients: Option<&[f64]>,
    elem: usize,
) -> ([Option<Vec<RawSpan>>; 4], Option<Vec<f64>>) {
    let mut out: [Option<Vec<RawSpan>>; 4] = lists.map(|l| l.map(|_| Vec::new()));
    let mut merged_coefficients = coefficients.map(|_| Vec::new());
    let n = lists.iter().flatten().map(|l| l.len()).next().unwrap_or(0);
    for i in 0..n {
        let empty = lists.iter().flatten().any(|l| l[i].n == 0);
        if empty {
            continue;
        }
        let c = coefficients.map(|c| c[i]);
        let joins = out.iter().zip(&lists).all(|(o, l)| match (o, l) {
            (Some(o), Some(l)) => o
                .last()
                .is_some_and(|last| last.addr + last.n as usize * elem == l[i].addr),
            _ => true,
        }) && out.iter().flatten().all(|o| !o.is_empty())
            && match (&merged_coefficients, c) {
                (Some(m), Some(c)) => m
                    .last()
                    .is_some_and(|&last: &f64| last.to_bits() == c.to_bits()),
                _ => true,
            };
        for (o, l) in out.iter_mut().zip(&lists) {
            if let (Some(o), Some(l)) = (o.as_mut(), l) {
                match o.last_mut() {
                    Some(last) if joins => last.n += l[i].n,
                    _ => o.push(l[i]),
                }
            }
        }
        if let (Some(m), Some(c)) = (merged_coefficients.as_mut(), c) {
            if !joins {
                m.push(c);
            }
        }
    }
    (out, merged_coefficients)
}

/// The flat layout's spans, for operations that skip reading every
/// tensor's metadata. They are trusted only while `intact`: set when the
/// layout is made and by every [`ParamStore::grad_mask`] that finds the
/// parameters where they were laid out and every gradient that arrived in
/// its place; cleared by [`ParamStore::zero_grads`] and by anything that
/// gives a tensor a gradient of its own.
#[derive(Debug)]
struct RawLayout {
    params: Vec<RawSpan>,
    /// `None` for parameters without a flat gradient.
    grads: Vec<Option<RawSpan>>,
    /// Per buffer: its tensors' spans.
    buffers: std::collections::HashMap<BufferId, Vec<RawSpan>>,
    intact: std::sync::atomic::AtomicBool,
}

impl Flat {
    /// The shim's pointers of `views` (NULL where a parameter has none).
    fn view_pointers(&self) -> Vec<*mut C_tensor> {
        self.views
            .iter()
            .map(|v| v.as_ref().map_or(std::ptr::null_mut(), raw))
            .collect()
    }
}

impl TchStore {
    /// A store over `tensors` (normally leaves that require grad; tensors
    /// that never get a gradient are simply never stepped).
    ///
    /// Errors: [`AmpError::DeviceMismatch`] when the tensors are not all on
    /// the first one's device, [`AmpError::DTypeMismatch`] when one is not a
    /// floating-point tensor or its dtype differs from the first one's,
    /// [`AmpError::Backend`] for an undefined tensor. An empty list gives an
    /// empty store on the CPU (which [`amp_core::Amp`] rejects with
    /// [`AmpError::EmptyStore`]).
    pub fn from_tensors(tensors: Vec<Tensor>) -> Result<Self> {
        let mut device = Device::Cpu;
        let mut kind = Kind::Float;
        for (index, tensor) in tensors.iter().enumerate() {
            if !tensor.defined() {
                return Err(AmpError::backend(format!("tensor {index} is undefined")));
            }
            let this_kind = tensor.f_kind().map_err(tch_error)?;
            if dtype_of(this_kind).is_none() {
                return Err(AmpError::DTypeMismatch {
                    index,
                    expected: "a floating-point dtype".into(),
                    found: format!("{this_kind:?}"),
                });
            }
            if index == 0 {
                device = tensor.device();
                kind = this_kind;
                continue;
            }
            if tensor.device() != device {
                return Err(AmpError::DeviceMismatch {
                    index,
                    expected: device_name(device),
                    found: device_name(tensor.device()),
                });
            }
            if this_kind != kind {
                return Err(AmpError::DTypeMismatch {
                    index,
                    expected: dtype_of(kind).map_or("?", DType::name).into(),
                    found: dtype_of(this_kind).map_or("?", DType::name).into(),
                });
            }
        }
        let dtype = dtype_of(kind).unwrap_or(DType::F32);
        Ok(TchStore {
            params: tensors,
            device,
            kind,
            dtype,
            buffers: Buffers::new(),
            flat: None,
        })
    }

    /// A store over the trainable variables of `vs`, in creation order.
    pub fn from_var_store(vs: &tch::nn::VarStore) -> Result<Self> {
        Self::from_tensors(vs.trainable_variables())
    }

    /// A store of new leaf tensors on `device` that require grad, holding
    /// `values` with their shapes and dtypes (the factory of the
    /// cross-backend test suite).
    pub fn from_host(values: &[HostTensor], device: Device) -> Result<Self> {
        let tensors = values
            .iter()
            .map(|value| {
                let kind = kind_of(value.dtype)?;
                host_to_tensor(value, kind, device)?
                    .f_set_requires_grad(true)
                    .map_err(tch_error)
            })
            .collect::<Result<Vec<_>>>()?;
        Self::from_tensors(tensors)
    }

    /// Moves the parameters into one contiguous allocation and their
    /// gradients into another, for models with many small tensors.
    ///
    /// Afterwards every parameter is a view of one buffer (its values,
    /// `requires_grad` and autograd identity unchanged: the model's variables
    /// are the store's tensors, so the model sees the move), and every
    /// parameter that requires grad keeps a gradient in one zero-filled
    /// buffer. [`ParamStore::zero_grads`] then zeroes that buffer in one fill
    /// instead of dropping the gradients, and `backward()` accumulates into
    /// it in place, as PyTorch's `zero_grad(set_to_none=False)` would: no
    /// gradient is allocated or freed per pass, and the batched operations
    /// walk contiguous memory instead of a thousand scattered allocations.
    /// [`ParamStore::grad_mask`] still reports only the tensors that
    /// received a gradient since the last reset (autograd's in-place
    /// accumulation is seen through each gradient's version counter).
    ///
    /// Call it once, before training; calling it again does nothing. On
    /// error the store and the tensors are unchanged. Should a parameter be
    /// given new storage afterwards (`set_data`), the store notices at the
    /// next [`ParamStore::grad_mask`] and works on the tensors where they
    /// are, as without the flat layout.
    ///
    /// ```
    /// use amp_core::{ParamStore, Slot};
    /// use amp_tch::TchStore;
    /// use amp_tch::tch::{Device, Kind, Tensor};
    ///
    /// let a = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
    /// let b = Tensor::from_slice(&[3.0f32]).set_requires_grad(true);
    /// let mut store = TchStore::from_tensors(vec![a.shallow_clone(), b.shallow_clone()])?;
    /// store.flatten()?;
    /// assert_eq!(Vec::<f32>::try_from(&a).unwrap(), vec![1.0, 2.0]); // values kept
    /// store.zero_grads()?;
    /// (&a * &a).sum(Kind::Float).backward(); // only `a` gets a gradient
    /// assert_eq!(store.grad_mask()?, vec![true, false]);
    /// assert_eq!(store.read(Slot::Grads, 0)?.data, vec![2.0, 4.0]);
    /// # Ok::<(), amp_core::AmpError>(())
    /// ```
    pub fn flatten(&mut self) -> Result<()> {
        if self.flat.is_some() || self.params.is_empty() {
            return Ok(());
        }
        let n = self.params.len();
        let pointers: Vec<*mut C_tensor> = self.params.iter().map(raw).collect();
        let mut views = vec![std::ptr::null_mut::<C_tensor>(); n];
        let mut flat_params: *mut C_tensor = std::ptr::null_mut();
        let mut flat_grads: *mut C_tensor = std::ptr::null_mut();
        // SAFETY: `views` has one slot per parameter; the shim fills slots
        // and the two outputs only on success.
        check(unsafe {
            ffi::amp_tch_flatten(
                pointers.as_ptr(),
                n,
                views.as_mut_ptr(),
                &mut flat_params,
                &mut flat_grads,
            )
        })?;
        let views: Vec<Option<Tensor>> = views
            .into_iter()
            .map(|ptr| {
                // SAFETY: allocated by the shim with `new at::Tensor`.
                (!ptr.is_null()).then(|| unsafe { Tensor::from_ptr(ptr) })
            })
            .collect();
        // SAFETY: allocated by the shim on success.
        let (_params, grads) = unsafe { (take_tensor(flat_params)?, take_tensor(flat_grads)?) };
        let raw = (self.device == Device::Cpu && matches!(self.kind, Kind::Float | Kind::Double))
            .then(|| RawLayout {
                params: self.params.iter().map(RawSpan::of).collect(),
                grads: views
                    .iter()
                    .map(|v: &Option<Tensor>| v.as_ref().map(RawSpan::of))
                    .collect(),
                buffers: self
                    .buffers
                    .iter()
                    .map(|(id, b)| (id, b.iter().map(RawSpan::of).collect()))
                    .collect(),
                intact: std::sync::atomic::AtomicBool::new(true),
            });
        self.flat = Some(Flat {
            grads,
            views,
            versions: vec![i64::MIN; n],
            raw,
        });
        Ok(())
    }

    /// `true` after [`TchStore::flatten`].
    pub fn is_flat(&self) -> bool {
        self.flat.is_some()
    }

    /// The parameter tensors, in store order (they share storage with the
    /// model's variables).
    pub fn tensors(&self) -> &[Tensor] {
        &self.params
    }

    /// Gives the parameter tensors back.
    pub fn into_tensors(self) -> Vec<Tensor> {
        self.params
    }

    /// The device of every tensor.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The libtorch kind of every tensor.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Sets the gradient of tensor `index` to a copy of `grad` (which must
    /// have the parameter's shape, dtype and device), without autograd: for
    /// gradients computed outside libtorch's `backward()`, or handed over
    /// from elsewhere. The store keeps its own copy, since the optimiser
    /// writes into gradients in place; an existing gradient is overwritten in
    /// place, a missing one allocated. Nothing changes on error.
    ///
    /// ```
    /// use amp_tch::TchStore;
    /// use amp_tch::tch::{Device, Kind, Tensor};
    ///
    /// let w = Tensor::zeros([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    /// let mut store = TchStore::from_tensors(vec![w])?;
    /// store.set_grad(0, &Tensor::from_slice(&[1.0f32, 2.0, 3.0]))?;
    /// let g = store.grad(0)?.expect("a gradient");
    /// assert_eq!(Vec::<f32>::try_from(&g).unwrap(), vec![1.0, 2.0, 3.0]);
    /// // The wrong shape is a typed error.
    /// assert!(store.set_grad(0, &Tensor::from_slice(&[1.0f32])).is_err());
    /// # Ok::<(), amp_core::AmpError>(())
    /// ```
    pub fn set_grad(&mut self, index: usize, grad: &Tensor) -> Result<()> {
        let shape = self.shape(index)?;
        let found: Vec<usize> = grad
            .size()
            .into_iter()
            .map(|d| usize::try_from(d).map_err(AmpError::backend))
            .collect::<Result<_>>()?;
        check_shape(index, &shape, &found)?;
        if grad.kind() != self.kind {
            return Err(AmpError::DTypeMismatch {
                index,
                expected: format!("{:?}", self.kind),
                found: format!("{:?}", grad.kind()),
            });
        }
        if grad.device() != self.device {
            return Err(AmpError::DeviceMismatch {
                index,
                expected: device_name(self.device),
                found: device_name(grad.device()),
            });
        }
        match self.attached_grad(index)? {
            Some(existing) => tch::no_grad(|| existing.shallow_clone().f_copy_(grad))
                .map(drop)
                .map_err(tch_error),
            None => {
                let dims: Vec<i64> = grad.size();
                let fresh = tch::no_grad(|| {
                    let mut fresh = Tensor::f_empty(dims.as_slice(), (self.kind, self.device))?;
                    fresh.f_copy_(grad)?;
                    Ok::<_, tch::TchError>(fresh)
                })
                .map_err(tch_error)?;
                // A gradient of its own: not in the flat layout.
                self.distrust_raw();
                // SAFETY: both tensors outlive the call.
                check(unsafe { ffi::amp_tch_set_grad(raw(&self.params[index]), raw(&fresh)) })
            }
        }
    }

    /// The gradient of tensor `index` (sharing storage), or `None` when it
    /// has none.
    pub fn grad(&self, index: usize) -> Result<Option<Tensor>> {
        let grad = self.attached_grad(index)?;
        if grad.is_some() && self.flat.is_some() && !self.grad_mask()?[index] {
            // Flat layout: a zero gradient that nothing wrote is no gradient.
            return Ok(None);
        }
        Ok(grad)
    }

    /// The tensor in `.grad()` of parameter `index`, whether or not it
    /// received a gradient since the last reset.
    fn attached_grad(&self, index: usize) -> Result<Option<Tensor>> {
        self.check_index(index)?;
        let mut out: *mut C_tensor = std::ptr::null_mut();
        // SAFETY: the parameter outlives the call; `out` receives a new
        // `at::Tensor` that we own.
        check(unsafe { ffi::amp_tch_get_grad(raw(&self.params[index]), &mut out) })?;
        // SAFETY: freshly allocated by the shim.
        let grad = unsafe { take_tensor(out)? };
        Ok(grad.defined().then_some(grad))
    }

    fn check_index(&self, index: usize) -> Result<()> {
        amp_core::check_index(index, self.params.len())
    }

    fn check_mask(&self, mask: &[bool]) -> Result<()> {
        check_len("mask", self.params.len(), mask.len())
    }

    fn buffer(&self, id: BufferId) -> Result<&[Tensor]> {
        self.buffers.get(id).map(Vec::as_slice)
    }

    /// Raw pointers of the masked-in tensors of `slot` and the shim view that
    /// reaches them; `write` says whether the shim writes into them.
    fn pointers(
        &self,
        slot: Slot,
        mask: &[bool],
        write: bool,
    ) -> Result<(Vec<*mut C_tensor>, c_int)> {
        let (tensors, view) = match slot {
            Slot::Params => (&self.params[..], ffi::PLAIN),
            Slot::Grads => (
                &self.params[..],
                if write {
                    ffi::GRAD_WRITE
                } else {
                    ffi::GRAD_READ
                },
            ),
            Slot::Buffer(id) => (self.buffer(id)?, ffi::PLAIN),
        };
        let pointers = tensors
            .iter()
            .zip(mask)
            .filter(|(_, &m)| m)
            .map(|(t, _)| raw(t))
            .collect();
        Ok((pointers, view))
    }

    /// The raw layout, when it may be used now (see [`RawLayout`]).
    fn raw(&self) -> Option<&RawLayout> {
        let raw = self.flat.as_ref()?.raw.as_ref()?;
        raw.intact
            .load(std::sync::atomic::Ordering::Acquire)
            .then_some(raw)
    }

    /// Stops the raw path until the next check finds the layout intact.
    fn distrust_raw(&self) {
        if let Some(raw) = self.flat.as_ref().and_then(|f| f.raw.as_ref()) {
            raw.intact
                .store(false, std::sync::atomic::Ordering::Release);
        }
    }

    /// The masked-in spans of `slot` on the raw path (`None` when a tensor
    /// has no span there).
    fn raw_spans(raw: &RawLayout, slot: Slot, mask: &[bool]) -> Option<Vec<RawSpan>> {
        let pick = |spans: &[RawSpan]| -> Vec<RawSpan> {
            spans
                .iter()
                .zip(mask)
                .filter(|(_, &m)| m)
                .map(|(s, _)| *s)
                .collect()
        };
        match slot {
            Slot::Params => Some(pick(&raw.params)),
            Slot::Grads => raw
                .grads
                .iter()
                .zip(mask)
                .filter(|(_, &m)| m)
                .map(|(g, _)| *g)
                .collect(),
            Slot::Buffer(id) => raw.buffers.get(&id).map(|b| pick(b)),
        }
    }

    /// One `amp_tch_raw` call over `n` tensors; the parameters selected by
    /// `bump` get their autograd version bumped (they are written).
    #[allow(clippy::too_many_arguments)]
    fn raw_call(
        &self,
        op: c_int,
        n: usize,
        lists: [Option<&[RawSpan]>; 4],
        c1: Option<&[f64]>,
        c2: Option<&[f64]>,
        out: *mut std::ffi::c_void,
        bump: Option<&[bool]>,
    ) -> Result<()> {
        let bumped: Vec<*mut C_tensor> = bump
            .map(|mask| {
                self.params
                    .iter()
                    .zip(mask)
                    .filter(|(_, &m)| m)
                    .map(|(t, _)| raw(t))
                    .collect()
            })
            .unwrap_or_default();
        // Elementwise operations run over neighbouring tensors that lie
        // back to back in every list (and share their coefficient) as one
        // loop: with the flat layout, usually all of them.
        let elementwise = matches!(
            op,
            ffi::RAW_COPY
                | ffi::RAW_SCALE
                | ffi::RAW_AXPY
                | ffi::RAW_AXPY_FROM
                | ffi::RAW_ALL_FINITE
        );
        let merged;
        let (n, lists, c1) = if elementwise {
            merged = coalesce(lists, c1, self.dtype.size_in_bytes());
            let (lists, c1) = (&merged.0, merged.1.as_deref());
            let n = lists.iter().flatten().map(Vec::len).next().unwrap_or(0);
            (n, [0, 1, 2, 3].map(|k| lists[k].as_deref()), c1)
        } else {
            (n, lists, c1)
        };
        let list = |l: Option<&[RawSpan]>| l.map_or(std::ptr::null(), <[RawSpan]>::as_ptr);
        let coefficients = |c: Option<&[f64]>| c.map_or(std::ptr::null(), <[f64]>::as_ptr);
        // SAFETY: every list given has n entries, every coefficient slice n
        // values; the spans were taken from live tensors that the store
        // keeps, and were checked since the last closure call (`intact`).
        check(unsafe {
            ffi::amp_tch_raw(
                op,
                c_int::from(self.kind == Kind::Double),
                n,
                list(lists[0]),
                list(lists[1]),
                list(lists[2]),
                list(lists[3]),
                coefficients(c1),
                coefficients(c2),
                PROJECTION_GUARD,
                out,
                bumped.as_ptr(),
                bumped.len(),
            )
        })
    }

    /// Runs `op` on the raw path when it is open and every slot has spans
    /// there: the lists are `[dst, srcs…]` (`dst` written, its parameters'
    /// versions bumped when it is [`Slot::Params`]; `srcs` read). `None`
    /// when the general path must run instead.
    #[allow(clippy::too_many_arguments)]
    fn try_raw(
        &self,
        op: c_int,
        dst: Option<Slot>,
        srcs: &[Slot],
        mask: &[bool],
        c1: Option<&[f64]>,
        c2: Option<&[f64]>,
        out: *mut std::ffi::c_void,
    ) -> Option<Result<()>> {
        let raw = self.raw()?;
        let d = match dst {
            Some(slot) => Some(Self::raw_spans(raw, slot, mask)?),
            None => None,
        };
        let s = srcs
            .iter()
            .map(|&slot| Self::raw_spans(raw, slot, mask))
            .collect::<Option<Vec<_>>>()?;
        let mut lists: [Option<&[RawSpan]>; 4] = [d.as_deref(), None, None, None];
        for (list, spans) in lists[1..].iter_mut().zip(&s) {
            *list = Some(spans);
        }
        let n = mask.iter().filter(|&&m| m).count();
        let bump = (dst == Some(Slot::Params)).then_some(mask);
        Some(self.raw_call(op, n, lists, c1, c2, out, bump))
    }

    /// Coefficients of the masked-in tensors.
    fn masked(values: &[f64], mask: &[bool]) -> Vec<f64> {
        (0..mask.len())
            .filter(|&i| mask[i])
            .map(|i| values[i])
            .collect()
    }

    fn check_distinct(dst: Slot, src: Slot) -> Result<()> {
        if dst == src {
            Err(AmpError::backend(format!(
                "source and destination must be different slots, got {dst:?} twice"
            )))
        } else {
            Ok(())
        }
    }

    fn slot_tensor(&self, slot: Slot, index: usize) -> Result<Option<Tensor>> {
        self.check_index(index)?;
        match slot {
            Slot::Params => Ok(Some(self.params[index].shallow_clone())),
            Slot::Grads => self.grad(index),
            Slot::Buffer(id) => Ok(Some(self.buffer(id)?[index].shallow_clone())),
        }
    }
}

impl ParamStore for TchStore {
    /// Coefficients are handed to libtorch as `f64` and rounded by it to the
    /// tensors' compute type.
    type Scalar = f64;
    type Norms = TchNorms;

    fn num_tensors(&self) -> usize {
        self.params.len()
    }

    fn shape(&self, index: usize) -> Result<Vec<usize>> {
        self.check_index(index)?;
        self.params[index]
            .size()
            .into_iter()
            .map(|d| usize::try_from(d).map_err(AmpError::backend))
            .collect()
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn zero_grads(&mut self) -> Result<()> {
        let (pointers, _) = self.pointers(Slot::Params, &vec![true; self.params.len()], true)?;
        self.distrust_raw();
        if let Some(flat) = self.flat.as_mut() {
            let views = flat.view_pointers();
            // SAFETY: every list has one entry per parameter; the tensors
            // outlive the call.
            return check(unsafe {
                ffi::amp_tch_flat_zero(
                    pointers.as_ptr(),
                    views.as_ptr(),
                    pointers.len(),
                    raw(&flat.grads),
                    flat.versions.as_mut_ptr(),
                )
            });
        }
        // SAFETY: the parameters outlive the call.
        check(unsafe { ffi::amp_tch_reset_grads(pointers.as_ptr(), pointers.len()) })
    }

    fn grad_mask(&self) -> Result<Vec<bool>> {
        let (pointers, _) = self.pointers(Slot::Params, &vec![true; self.params.len()], false)?;
        let mut out = vec![0u8; pointers.len()];
        if let Some(flat) = &self.flat {
            let views = flat.view_pointers();
            let expected = flat
                .raw
                .as_ref()
                .map_or(std::ptr::null(), |r| r.params.as_ptr());
            let mut intact: c_int = 0;
            // SAFETY: every list has one entry per parameter (`expected` too,
            // or it is NULL); the tensors outlive the call.
            check(unsafe {
                ffi::amp_tch_flat_grad_mask(
                    pointers.as_ptr(),
                    views.as_ptr(),
                    pointers.len(),
                    flat.versions.as_ptr(),
                    expected,
                    out.as_mut_ptr(),
                    &mut intact,
                )
            })?;
            if let Some(raw) = &flat.raw {
                raw.intact
                    .store(intact != 0, std::sync::atomic::Ordering::Release);
            }
            return Ok(out.into_iter().map(|b| b != 0).collect());
        }
        // SAFETY: `out` has one byte per pointer; the parameters outlive the call.
        check(unsafe {
            ffi::amp_tch_grad_mask(pointers.as_ptr(), pointers.len(), out.as_mut_ptr())
        })?;
        Ok(out.into_iter().map(|b| b != 0).collect())
    }

    fn alloc_buffer(&mut self) -> Result<BufferId> {
        let (pointers, _) = self.pointers(Slot::Params, &vec![true; self.params.len()], false)?;
        let mut out = vec![std::ptr::null_mut::<C_tensor>(); pointers.len()];
        // SAFETY: `out` has one slot per pointer; the shim fills every slot on
        // success and none on failure.
        let status =
            unsafe { ffi::amp_tch_alloc_like(pointers.as_ptr(), pointers.len(), out.as_mut_ptr()) };
        // Take ownership of whatever was allocated before checking, so that
        // nothing leaks on error.
        let mut buffer = Vec::with_capacity(out.len());
        for ptr in out {
            if !ptr.is_null() {
                // SAFETY: allocated by the shim with `new at::Tensor`.
                buffer.push(unsafe { Tensor::from_ptr(ptr) });
            }
        }
        check(status)?;
        check_len("buffer tensors", self.params.len(), buffer.len())?;
        let spans: Vec<RawSpan> = buffer.iter().map(RawSpan::of).collect();
        let id = self.buffers.insert(buffer);
        if let Some(raw) = self.flat.as_mut().and_then(|f| f.raw.as_mut()) {
            raw.buffers.insert(id, spans);
        }
        Ok(id)
    }

    fn free_buffer(&mut self, id: BufferId) -> Result<()> {
        if let Some(raw) = self.flat.as_mut().and_then(|f| f.raw.as_mut()) {
            raw.buffers.remove(&id);
        }
        self.buffers.remove(id).map(drop)
    }

    fn copy(&mut self, dst: Slot, src: Slot, mask: &[bool]) -> Result<()> {
        self.check_mask(mask)?;
        Self::check_distinct(dst, src)?;
        let null = std::ptr::null_mut();
        if let Some(done) = self.try_raw(ffi::RAW_COPY, Some(dst), &[src], mask, None, None, null) {
            return done;
        }
        let (d, dv) = self.pointers(dst, mask, true)?;
        let (s, sv) = self.pointers(src, mask, false)?;
        // SAFETY: both lists have d.len() entries; the tensors outlive the call.
        check(unsafe { ffi::amp_tch_copy(d.as_ptr(), dv, s.as_ptr(), sv, d.len()) })
    }

    fn scale(&mut self, dst: Slot, factor: &[f64], mask: &[bool]) -> Result<()> {
        self.check_mask(mask)?;
        check_len("scale factors", mask.len(), factor.len())?;
        // A factor of exactly 1 changes nothing: skip those tensors.
        let active: Vec<bool> = (0..mask.len())
            .map(|i| mask[i] && factor[i] != 1.0)
            .collect();
        let f = Self::masked(factor, &active);
        let null = std::ptr::null_mut();
        let raw = self.try_raw(
            ffi::RAW_SCALE,
            Some(dst),
            &[],
            &active,
            Some(&f),
            None,
            null,
        );
        if let Some(done) = raw {
            return done;
        }
        let (d, dv) = self.pointers(dst, &active, true)?;
        // SAFETY: `f` has d.len() entries; the tensors outlive the call.
        check(unsafe { ffi::amp_tch_scale(d.as_ptr(), dv, f.as_ptr(), d.len()) })
    }

    fn axpy(&mut self, dst: Slot, alpha: &[f64], src: Slot, mask: &[bool]) -> Result<()> {
        self.check_mask(mask)?;
        check_len("axpy coefficients", mask.len(), alpha.len())?;
        Self::check_distinct(dst, src)?;
        let a = Self::masked(alpha, mask);
        let null = std::ptr::null_mut();
        let raw = self.try_raw(ffi::RAW_AXPY, Some(dst), &[src], mask, Some(&a), None, null);
        if let Some(done) = raw {
            return done;
        }
        let (d, dv) = self.pointers(dst, mask, true)?;
        let (s, sv) = self.pointers(src, mask, false)?;
        // SAFETY: all three lists have d.len() entries; the tensors outlive the call.
        check(unsafe { ffi::amp_tch_axpy(d.as_ptr(), dv, s.as_ptr(), sv, a.as_ptr(), d.len()) })
    }

    /// One pass on the CPU fast path (dense f32/f64 tensors); elsewhere a
    /// copy and `_foreach_add_`.
    fn axpy_from(
        &mut self,
        dst: Slot,
        base: Slot,
        alpha: &[f64],
        src: Slot,
        mask: &[bool],
    ) -> Result<()> {
        amp_core::composed::check_axpy_from_slots(dst, src)?;
        if base == dst {
            return self.axpy(dst, alpha, src, mask);
        }
        self.check_mask(mask)?;
        check_len("axpy coefficients", mask.len(), alpha.len())?;
        let a = Self::masked(alpha, mask);
        let null = std::ptr::null_mut();
        let lists = [base, src];
        let raw = self.try_raw(
            ffi::RAW_AXPY_FROM,
            Some(dst),
            &lists,
            mask,
            Some(&a),
            None,
            null,
        );
        if let Some(done) = raw {
            return done;
        }
        let (d, dv) = self.pointers(dst, mask, true)?;
        let (b, bv) = self.pointers(base, mask, false)?;
        let (s, sv) = self.pointers(src, mask, false)?;
        // SAFETY: all four lists have d.len() entries; the tensors outlive the call.
        check(unsafe {
            ffi::amp_tch_axpy_from(
                d.as_ptr(),
                dv,
                b.as_ptr(),
                bv,
                s.as_ptr(),
                sv,
                a.as_ptr(),
                d.len(),
            )
        })
    }

    /// Fused on the CPU fast path (dense f32/f64 tensors): per tensor, one
    /// read of the gradient for its norm and one pass writing θ (and the
    /// snapshot, δ), with the unfused sequence's rounding. Elsewhere (CUDA,
    /// half precision, strided tensors) it is that sequence,
    /// [`amp_core::composed::perturb_from_grads`].
    fn perturb_from_grads(
        &mut self,
        snapshot: Option<Slot>,
        delta: Option<Slot>,
        inner_lr: &[f64],
        epsilon: &[f64],
        mask: &[bool],
    ) -> Result<TchNorms> {
        self.check_mask(mask)?;
        check_len("inner learning rates", mask.len(), inner_lr.len())?;
        check_len("maximum norms", mask.len(), epsilon.len())?;
        amp_core::composed::check_perturb_slots(snapshot, delta)?;
        if let Some(raw) = self.raw() {
            let spans = |slot: Option<Slot>| slot.map(|slot| Self::raw_spans(raw, slot, mask));
            if let (Some(t), Some(g), snap, del) = (
                Self::raw_spans(raw, Slot::Params, mask),
                Self::raw_spans(raw, Slot::Grads, mask),
                spans(snapshot),
                spans(delta),
            ) {
                // A snapshot or δ asked for must have spans too.
                if !t.is_empty() && !matches!(snap, Some(None)) && !matches!(del, Some(None)) {
                    let (snap, del) = (snap.flatten(), del.flatten());
                    let values = Tensor::f_empty([t.len() as i64], (self.kind, self.device))
                        .map_err(tch_error)?;
                    let lists = [Some(&t[..]), Some(&g[..]), snap.as_deref(), del.as_deref()];
                    let (z, e) = (Self::masked(inner_lr, mask), Self::masked(epsilon, mask));
                    let out = values.data_ptr();
                    self.raw_call(
                        ffi::RAW_PERTURB,
                        t.len(),
                        lists,
                        Some(&z),
                        Some(&e),
                        out,
                        Some(mask),
                    )?;
                    return Ok(TchNorms {
                        values,
                        mask: mask.to_vec(),
                    });
                }
            }
        }
        let (p, _) = self.pointers(Slot::Params, mask, true)?;
        let snap = snapshot
            .map(|slot| self.pointers(slot, mask, true).map(|(v, _)| v))
            .transpose()?;
        let del = delta
            .map(|slot| self.pointers(slot, mask, true).map(|(v, _)| v))
            .transpose()?;
        let (z, e) = (Self::masked(inner_lr, mask), Self::masked(epsilon, mask));
        let mut out: *mut C_tensor = std::ptr::null_mut();
        let mut handled: c_int = 0;
        if !p.is_empty() {
            // SAFETY: every list has p.len() entries (or is NULL); the
            // tensors outlive the call; `out` receives a new tensor only when
            // `handled` is set.
            check(unsafe {
                ffi::amp_tch_perturb(
                    p.as_ptr(),
                    snap.as_ref().map_or(std::ptr::null(), |v| v.as_ptr()),
                    del.as_ref().map_or(std::ptr::null(), |v| v.as_ptr()),
                    p.len(),
                    z.as_ptr(),
                    e.as_ptr(),
                    PROJECTION_GUARD,
                    &mut out,
                    &mut handled,
                )
            })?;
        }
        if handled == 0 {
            return amp_core::composed::perturb_from_grads(
                self, snapshot, delta, inner_lr, epsilon, mask,
            );
        }
        Ok(TchNorms {
            // SAFETY: freshly allocated by the shim.
            values: unsafe { take_tensor(out)? },
            mask: mask.to_vec(),
        })
    }

    fn norms(&mut self, src: Slot, mask: &[bool]) -> Result<TchNorms> {
        self.check_mask(mask)?;
        if let Some(s) = self.raw().and_then(|raw| Self::raw_spans(raw, src, mask)) {
            if !s.is_empty() {
                let values = Tensor::f_empty([s.len() as i64], (self.kind, self.device))
                    .map_err(tch_error)?;
                let lists = [None, Some(&s[..]), None, None];
                self.raw_call(
                    ffi::RAW_NORMS,
                    s.len(),
                    lists,
                    None,
                    None,
                    values.data_ptr(),
                    None,
                )?;
                return Ok(TchNorms {
                    values,
                    mask: mask.to_vec(),
                });
            }
        }
        let (s, sv) = self.pointers(src, mask, false)?;
        let values = if s.is_empty() {
            Tensor::f_zeros([0], (self.kind, self.device)).map_err(tch_error)?
        } else {
            let mut out: *mut C_tensor = std::ptr::null_mut();
            // SAFETY: the tensors outlive the call; `out` receives a new tensor.
            check(unsafe { ffi::amp_tch_norms(s.as_ptr(), sv, s.len(), &mut out) })?;
            // SAFETY: freshly allocated by the shim.
            unsafe { take_tensor(out)? }
        };
        Ok(TchNorms {
            values,
            mask: mask.to_vec(),
        })
    }

    fn clip_to_norms(
        &mut self,
        dst: Slot,
        norms: &TchNorms,
        max_norm: &[f64],
        mask: &[bool],
    ) -> Result<()> {
        self.check_mask(mask)?;
        check_len("norms", mask.len(), norms.mask.len())?;
        check_len("maximum norms", mask.len(), max_norm.len())?;
        if let Some(index) = (0..mask.len()).find(|&i| mask[i] && !norms.mask[i]) {
            return Err(AmpError::backend(format!(
                "clip_to_norms: no norm was computed for tensor {index}"
            )));
        }
        let limits = Self::masked(max_norm, mask);
        if norms.mask == mask
            && norms.values.device() == Device::Cpu
            && norms.values.kind() == self.kind
            && norms.values.is_contiguous()
        {
            if let Some(d) = self.raw().and_then(|raw| Self::raw_spans(raw, dst, mask)) {
                if d.is_empty() {
                    return Ok(());
                }
                check_len("norms", d.len(), norms.values.numel())?;
                let bump = (dst == Slot::Params).then_some(mask);
                let lists = [Some(&d[..]), None, None, None];
                let values = norms.values.data_ptr();
                return self.raw_call(
                    ffi::RAW_CLIP,
                    d.len(),
                    lists,
                    Some(&limits),
                    None,
                    values,
                    bump,
                );
            }
        }
        let (d, dv) = self.pointers(dst, mask, true)?;
        if d.is_empty() {
            return Ok(());
        }
        let values = if norms.mask == mask {
            norms.values.shallow_clone()
        } else {
            // Positions, within the norms, of the tensors to clip.
            let mut position = 0i64;
            let mut positions = Vec::with_capacity(d.len());
            for (i, &has_norm) in norms.mask.iter().enumerate() {
                if has_norm {
                    if mask[i] {
                        positions.push(position);
                    }
                    position += 1;
                }
            }
            let index = Tensor::f_from_slice(&positions)
                .and_then(|t| t.f_to_device(self.device))
                .map_err(tch_error)?;
            norms.values.f_index_select(0, &index).map_err(tch_error)?
        };
        // SAFETY: `limits` and `values` have d.len() entries; the tensors
        // outlive the call.
        check(unsafe {
            ffi::amp_tch_clip(
                d.as_ptr(),
                dv,
                d.len(),
                raw(&values),
                limits.as_ptr(),
                PROJECTION_GUARD,
            )
        })
    }

    fn norms_to_host(&self, norms: &TchNorms) -> Result<Vec<f64>> {
        let count = norms.mask.iter().filter(|&&m| m).count();
        let mut values = vec![0.0f64; count];
        if count > 0 {
            norms
                .values
                .f_to_kind(Kind::Double)
                .and_then(|t| t.f_copy_data(&mut values, count))
                .map_err(tch_error)?;
        }
        let mut values = values.into_iter();
        Ok(norms
            .mask
            .iter()
            .map(|&m| if m { values.next().unwrap_or(0.0) } else { 0.0 })
            .collect())
    }

    fn all_finite(&mut self, src: Slot, mask: &[bool]) -> Result<bool> {
        self.check_mask(mask)?;
        let mut out: c_int = 0;
        let flag = (&mut out as *mut c_int).cast();
        if let Some(done) = self.try_raw(ffi::RAW_ALL_FINITE, None, &[src], mask, None, None, flag)
        {
            return done.map(|()| out != 0);
        }
        let (s, sv) = self.pointers(src, mask, false)?;
        let mut out: c_int = 0;
        // SAFETY: the tensors outlive the call.
        check(unsafe { ffi::amp_tch_all_finite(s.as_ptr(), sv, s.len(), &mut out) })?;
        Ok(out != 0)
    }

    fn read(&self, slot: Slot, index: usize) -> Result<HostTensor> {
        let shape = self.shape(index)?;
        let numel: usize = shape.iter().product();
        let mut data = vec![0.0f64; numel];
        if let Some(tensor) = self.slot_tensor(slot, index)? {
            if numel > 0 {
                tensor
                    .f_detach()
                    .and_then(|t| t.f_to_kind(Kind::Double))
                    .and_then(|t| t.f_copy_data(&mut data, numel))
                    .map_err(tch_error)?;
            }
        }
        HostTensor::new(shape, self.dtype, data)
    }

    fn write(&mut self, slot: Slot, index: usize, value: &HostTensor) -> Result<()> {
        check_shape(index, &self.shape(index)?, &value.shape)?;
        let source = host_to_tensor(value, self.kind, self.device)?;
        match slot {
            Slot::Grads => match self.attached_grad(index)? {
                // Into the existing gradient (with the flat layout, its
                // place in the flat allocation).
                Some(existing) => {
                    tch::no_grad(|| existing.shallow_clone().f_copy_(&source)).map_err(tch_error)
                }
                None => {
                    // A gradient of its own: not in the flat layout.
                    self.distrust_raw();
                    // SAFETY: both tensors outlive the call.
                    check(unsafe { ffi::amp_tch_set_grad(raw(&self.params[index]), raw(&source)) })
                }
            },
            Slot::Params => tch::no_grad(|| self.params[index].f_copy_(&source)).map_err(tch_error),
            Slot::Buffer(id) => {
                let buffer = self.buffers.get_mut(id)?;
                tch::no_grad(|| buffer[index].f_copy_(&source)).map_err(tch_error)
            }
        }
    }
}
