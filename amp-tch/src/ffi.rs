//! The C++ shim's entry points (`shim/*.cpp`, compiled by `build.rs`) and
//! the helpers that cross the boundary: one typed function per operation,
//! tensors passed as `at::Tensor*` arrays.
//!
//! Every function returns NULL on success or an owned error message, which
//! [`check`] turns into an [`AmpError`]. The shim keeps no pointer between
//! calls: it reads every tensor's memory address afresh in each call, so
//! the only contract here is the usual one of a borrowed pointer — each
//! tensor passed must be alive for the duration of the call.

use std::ffi::{c_char, c_int, CStr};

use amp_core::{AmpError, Result};
use tch::Tensor;
use torch_sys::C_tensor;

/// Which tensors a list passed to the shim addresses (the shim's `View`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorView {
    /// The tensors themselves.
    Plain = 0,
    /// Their gradients; an undefined gradient reads as zeros.
    GradRead = 1,
    /// Their gradients; an undefined gradient is defined as zeros first.
    GradWrite = 2,
}

impl TensorView {
    /// The gradient view for reading or for writing.
    pub fn grads(write: bool) -> Self {
        if write {
            TensorView::GradWrite
        } else {
            TensorView::GradRead
        }
    }
}

/// One tensor's coefficients of the fused SGD step (`shim/sgd.cpp`'s
/// `SgdTensor`): doubles only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdTensor {
    /// λ (0: no weight decay).
    pub weight_decay: f64,
    /// `−lr`.
    pub step: f64,
    /// 1 on the tensor's first step with momentum, else 0.
    pub first: f64,
}

/// One tensor's coefficients of the fused Adam step (`shim/adam.cpp`'s
/// `AdamTensor`), those of [`amp_core::AdamCoefficients`] in its order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamTensor {
    /// Decoupled decay factor (1: none).
    pub shrink: f64,
    /// L2 decay λ (0: none).
    pub l2: f64,
    /// β₁.
    pub beta1: f64,
    /// `1 − β₁`.
    pub beta1c: f64,
    /// β₂.
    pub beta2: f64,
    /// `1 − β₂`.
    pub beta2c: f64,
    /// `−lr / (1 − β₁ᵗ)`.
    pub step: f64,
    /// `√(1 − β₂ᵗ)`.
    pub divisor: f64,
    /// Added to the denominator.
    pub eps: f64,
}

impl From<&amp_core::AdamCoefficients<f64>> for AdamTensor {
    fn from(c: &amp_core::AdamCoefficients<f64>) -> Self {
        AdamTensor {
            shrink: c.shrink,
            l2: c.l2,
            beta1: c.beta1.0,
            beta1c: c.beta1.1,
            beta2: c.beta2.0,
            beta2c: c.beta2.1,
            step: c.step,
            divisor: c.divisor,
            eps: c.eps,
        }
    }
}

/// One tensor's coefficients of `addcdiv_sqrt` on the loop path
/// (`shim/adam.cpp`'s `AddcdivTensor`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AddcdivTensor {
    /// Multiplies the numerator.
    pub alpha: f64,
    /// Divides the square root of the denominator.
    pub divisor: f64,
    /// Added to the denominator.
    pub eps: f64,
}

/// A list of tensors for the shim: borrowed `at::Tensor*` pointers.
pub type List = *const *mut C_tensor;

extern "C" {
    pub fn amp_tch_free_error(message: *mut c_char);

    // Batched operations (shim/ops.cpp).
    pub fn amp_tch_copy(
        dst: List,
        dst_view: TensorView,
        src: List,
        src_view: TensorView,
        n: usize,
    ) -> *mut c_char;
    pub fn amp_tch_scale(
        dst: List,
        dst_view: TensorView,
        factor: *const f64,
        n: usize,
    ) -> *mut c_char;
    pub fn amp_tch_axpy(
        dst: List,
        dst_view: TensorView,
        src: List,
        src_view: TensorView,
        alpha: *const f64,
        n: usize,
    ) -> *mut c_char;
    pub fn amp_tch_axpy_from(
        dst: List,
        dst_view: TensorView,
        base: List,
        base_view: TensorView,
        src: List,
        src_view: TensorView,
        alpha: *const f64,
        n: usize,
    ) -> *mut c_char;
    #[allow(clippy::too_many_arguments)]
    pub fn amp_tch_perturb(
        params: List,
        snapshot: List,
        delta: List,
        n: usize,
        inner_lr: *const f64,
        max_norm: *const f64,
        guard: f64,
        norms: *mut *mut C_tensor,
        handled: *mut c_int,
    ) -> *mut c_char;
    #[allow(clippy::too_many_arguments)]
    pub fn amp_tch_sgd(
        params: List,
        weights: List,
        grads: List,
        grads_view: TensorView,
        buffer: List,
        n: usize,
        coefficients: *const SgdTensor,
        momentum: f64,
        keep: f64,
        nesterov: c_int,
        handled: *mut c_int,
    ) -> *mut c_char;
    #[allow(clippy::too_many_arguments)]
    pub fn amp_tch_adam(
        params: List,
        grads: List,
        grads_view: TensorView,
        exp_avg: List,
        exp_avg_sq: List,
        max_exp_avg_sq: List,
        n: usize,
        coefficients: *const AdamTensor,
        handled: *mut c_int,
    ) -> *mut c_char;
    #[allow(clippy::too_many_arguments)]
    pub fn amp_tch_addcdiv_sqrt(
        dst: List,
        dst_view: TensorView,
        num: List,
        num_view: TensorView,
        den: List,
        den_view: TensorView,
        n: usize,
        coefficients: *const AddcdivTensor,
        handled: *mut c_int,
    ) -> *mut c_char;
    pub fn amp_tch_norms(
        src: List,
        src_view: TensorView,
        n: usize,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    pub fn amp_tch_clip(
        dst: List,
        dst_view: TensorView,
        n: usize,
        norms: *mut C_tensor,
        max_norm: *const f64,
        guard: f64,
    ) -> *mut c_char;
    pub fn amp_tch_all_finite(
        src: List,
        src_view: TensorView,
        n: usize,
        out: *mut c_int,
    ) -> *mut c_char;

    // Gradients, buffers, bookkeeping (shim/grads.cpp).
    pub fn amp_tch_reset_grads(params: List, n: usize) -> *mut c_char;
    pub fn amp_tch_grad_mask(params: List, n: usize, out: *mut u8) -> *mut c_char;
    pub fn amp_tch_set_grad(param: *mut C_tensor, value: *mut C_tensor) -> *mut c_char;
    pub fn amp_tch_get_grad(param: *mut C_tensor, out: *mut *mut C_tensor) -> *mut c_char;
    pub fn amp_tch_alloc_like(params: List, n: usize, out: *mut *mut C_tensor) -> *mut c_char;
    pub fn amp_tch_find_overlap(
        tensors: List,
        n: usize,
        first: *mut usize,
        second: *mut usize,
        found: *mut c_int,
    ) -> *mut c_char;

    // The flat layout (shim/flat.cpp).
    pub fn amp_tch_flatten(
        params: List,
        n: usize,
        views: *mut *mut C_tensor,
        flat_params: *mut *mut C_tensor,
        flat_grads: *mut *mut C_tensor,
    ) -> *mut c_char;
    pub fn amp_tch_flat_zero(
        params: List,
        views: List,
        n: usize,
        flat_grads: *mut C_tensor,
        versions: *mut i64,
    ) -> *mut c_char;
    pub fn amp_tch_flat_grad_mask(
        params: List,
        views: List,
        n: usize,
        versions: *const i64,
        out: *mut u8,
    ) -> *mut c_char;
}

/// Turns a shim return value (NULL or an owned message) into a `Result`.
pub fn check(message: *mut c_char) -> Result<()> {
    if message.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null return is a NUL-terminated string malloc'ed by the
    // shim, released exactly once here.
    let text = unsafe {
        let text = CStr::from_ptr(message).to_string_lossy().into_owned();
        amp_tch_free_error(message);
        text
    };
    Err(AmpError::backend(text))
}

/// Wraps an owned `at::Tensor*` returned by the shim.
///
/// # Safety
/// `ptr` must be null or a pointer allocated with `new at::Tensor` and not
/// owned by anything else.
pub unsafe fn take_tensor(ptr: *mut C_tensor) -> Result<Tensor> {
    if ptr.is_null() {
        Err(AmpError::backend("the libtorch shim returned no tensor"))
    } else {
        Ok(Tensor::from_ptr(ptr))
    }
}

/// The `at::Tensor*` of a tensor, for the shim. The tensor must outlive the
/// call that uses it; the shim mutates it only in place (or its `.grad`).
pub fn raw(tensor: &Tensor) -> *mut C_tensor {
    tensor.as_ptr().cast_mut()
}
