//! [`TensorOps`]: the per-tensor tier for store authors — a handful of
//! operations on one tensor type, from which [`TensorStore`] builds a whole
//! [`ParamStore`](crate::ParamStore).
//!
//! [`TensorStore`]: crate::TensorStore

use crate::elementwise;
use crate::error::Result;
use crate::grad_fn::Pass;
use crate::store::{DType, Scalar};

/// The operations AMP needs on **one tensor** of a framework's tensor type.
///
/// Implement this (seven required methods) and wrap your parameters in a
/// [`TensorStore`](crate::TensorStore): it does the slots, buffers, gradient
/// presence, masks and length checks, and implements
/// [`ParamStore`](crate::ParamStore) on top. Implement `ParamStore` itself
/// instead when the framework has multi-tensor kernels (one launch for all
/// tensors) worth using.
///
/// Operations borrow their inputs and return a new tensor: the store swaps
/// the result in only once it exists, so a failing (or panicking) operation
/// never takes a parameter with it, and [`Amp`](crate::Amp) can promise that
/// θ survives any error. For frameworks with reference-counted immutable
/// tensors, `tensor.clone()` is a pointer copy, so an operation is written as
/// `tensor.clone().mul_scalar(factor)`.
///
/// Shapes are checked by the store before an operation is called: `axpy`
/// receives two tensors of one shape, `tensor_like` a slice of `like`'s
/// element count.
pub trait TensorOps {
    /// The framework's tensor type.
    ///
    /// The store copies a tensor with `clone`; the copy may share storage
    /// with the original (as reference-counted tensors do) as long as no
    /// operation and no closure mutates a tensor in place.
    type Tensor: Clone;

    /// The type coefficients arrive in, `f32` or `f64`
    /// ([`ParamStore::Scalar`](crate::ParamStore::Scalar)).
    type Scalar: Scalar;

    /// Element type of the tensors, as reported by
    /// [`ParamStore::dtype`](crate::ParamStore::dtype).
    fn dtype(&self) -> DType;

    /// The shape of `tensor` (empty for a 0-d scalar).
    fn shape(&self, tensor: &Self::Tensor) -> Vec<usize>;

    /// `factor · tensor`.
    fn scale(&self, tensor: &Self::Tensor, factor: Self::Scalar) -> Result<Self::Tensor>;

    /// `y + alpha · x`, computed as one multiply and one add per element
    /// (no fused multiply-add), as PyTorch's `y.add(x, alpha=…)` does.
    fn axpy(&self, y: &Self::Tensor, alpha: Self::Scalar, x: &Self::Tensor)
        -> Result<Self::Tensor>;

    /// `Σ x²` over the elements, widened to `f64`; 0 for an empty tensor.
    ///
    /// The store takes its square root and rounds it to
    /// [`Scalar`](TensorOps::Scalar) to get the norm. Accumulating in `f64`
    /// agrees best with the ndarray oracle; accumulating in the tensor's own
    /// type stays within the conformance suite's tolerance for `f32`. A NaN
    /// element must give NaN and an infinite one +∞, as a plain sum does
    /// (the default [`all_finite`](TensorOps::all_finite) relies on it).
    fn sum_of_squares(&self, tensor: &Self::Tensor) -> Result<f64>;

    /// The elements in row-major (C) order, widened to `f64`.
    fn to_host(&self, tensor: &Self::Tensor) -> Result<Vec<f64>>;

    /// A tensor of `like`'s shape, dtype and device holding `data` (row-major,
    /// as many values as `like` has elements), each rounded to the dtype.
    fn tensor_like(&self, data: &[f64], like: &Self::Tensor) -> Result<Self::Tensor>;

    /// A zero-filled tensor of `like`'s shape, dtype and device.
    ///
    /// The default goes through [`tensor_like`](TensorOps::tensor_like); it runs
    /// when a buffer is allocated, not on every step.
    fn zeros_like(&self, like: &Self::Tensor) -> Result<Self::Tensor> {
        let numel = self.shape(like).iter().product();
        self.tensor_like(&vec![0.0; numel], like)
    }

    /// `true` when every element is finite.
    ///
    /// The default reads one number: a finite
    /// [`sum_of_squares`](TensorOps::sum_of_squares) means every element is
    /// finite. A sum that overflowed is told apart from a NaN or an infinity
    /// by checking the elements on the host, which only happens for
    /// gradients beyond about 1e154 (`f64`) or 1e19 (a sum in `f32`).
    fn all_finite(&self, tensor: &Self::Tensor) -> Result<bool> {
        if self.sum_of_squares(tensor)?.is_finite() {
            return Ok(true);
        }
        Ok(self.to_host(tensor)?.iter().all(|x| x.is_finite()))
    }

    /// [`sum_of_squares`](TensorOps::sum_of_squares) of each tensor, in
    /// order: what [`ParamStore::norms`](crate::ParamStore::norms) asks for
    /// all the tensors of a slot at once.
    ///
    /// The default calls `sum_of_squares` tensor by tensor. Override it
    /// where each result costs a device synchronisation (a GPU, a lazy
    /// backend) to read all the sums in one transfer; each sum must be the
    /// very number `sum_of_squares` gives for that tensor
    /// (`amp_testkit::tensor_ops` checks it bit for bit).
    fn sums_of_squares(&self, tensors: &[&Self::Tensor]) -> Result<Vec<f64>> {
        tensors.iter().map(|t| self.sum_of_squares(t)).collect()
    }

    /// `true` when every element of every tensor is finite: what
    /// [`ParamStore::all_finite`](crate::ParamStore::all_finite) asks for
    /// the tensors of a slot at once.
    ///
    /// The default calls [`all_finite`](TensorOps::all_finite) tensor by
    /// tensor and stops at the first that is not. Override it to decide
    /// with one transfer (and settle a non-finite combined result tensor by
    /// tensor, as a sum of finite values can overflow); it must agree with
    /// the default on every input.
    fn all_finite_in(&self, tensors: &[&Self::Tensor]) -> Result<bool> {
        for tensor in tensors {
            if !self.all_finite(tensor)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// `y + (alpha · a) · b` element-wise
    /// ([`elementwise::addcmul`]); Adam's
    /// second moment. The default goes through the host (computing in `f64`
    /// for an `f64` tensor, `f32` otherwise); override it with the
    /// framework's own operation to keep Adam on the device.
    fn addcmul(
        &self,
        y: &Self::Tensor,
        alpha: Self::Scalar,
        a: &Self::Tensor,
        b: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        let (mut d, x, z) = (self.to_host(y)?, self.to_host(a)?, self.to_host(b)?);
        let wide = self.dtype() == DType::F64;
        elementwise::addcmul_host(wide, &mut d, alpha.widen(), &x, &z);
        self.tensor_like(&d, y)
    }

    /// `y + (alpha · num) / (√den / divisor + eps)` element-wise
    /// ([`elementwise::addcdiv_sqrt`]);
    /// Adam's update. The default goes through the host, as
    /// [`addcmul`](TensorOps::addcmul)'s does.
    fn addcdiv_sqrt(
        &self,
        y: &Self::Tensor,
        alpha: Self::Scalar,
        num: &Self::Tensor,
        den: &Self::Tensor,
        divisor: Self::Scalar,
        eps: Self::Scalar,
    ) -> Result<Self::Tensor> {
        let (mut d, x, z) = (self.to_host(y)?, self.to_host(num)?, self.to_host(den)?);
        let wide = self.dtype() == DType::F64;
        let coefficients = (alpha.widen(), divisor.widen(), eps.widen());
        elementwise::addcdiv_sqrt_host(wide, &mut d, coefficients, &x, &z);
        self.tensor_like(&d, y)
    }

    /// `max(a, b)` element-wise, NaN if either is
    /// ([`elementwise::maximum`]); AMSGrad's
    /// running maximum. The default goes through the host.
    fn maximum(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor> {
        let (mut d, x) = (self.to_host(a)?, self.to_host(b)?);
        elementwise::maximum_host(&mut d, &x);
        self.tensor_like(&d, a)
    }

    /// Called by [`TensorStore`](crate::TensorStore) before every closure
    /// call with the weights that pass must see: θ on the clean pass, θ + δₖ
    /// on perturbed pass k.
    ///
    /// For frameworks whose model owns its weights as immutable tensors
    /// (module-owned parameters rebuilt by mapping), rebuild the model from
    /// `params` here and keep it in `self`; the closure reaches it through
    /// [`TensorStore::ops`](crate::TensorStore::ops). The weights change
    /// only through the store's operations, so a rebuild is needed only
    /// when a step has changed them since the last call. The default does
    /// nothing: right for frameworks whose model reads the store's tensors
    /// directly.
    fn prepare_pass(&mut self, params: &[Self::Tensor], pass: Pass) -> Result<()> {
        let _ = (params, pass);
        Ok(())
    }
}
