//! The [`ParamStore`] trait: the batched operations AMP needs on a model's
//! parameters, and the small types that address them.

use std::fmt::Debug;

use num_traits::Float;

use crate::error::{AmpError, Result};
use crate::grad_fn::Pass;

/// The small-epsilon guard of the projection, `‖δ‖₂ + 1e-12`, as in the
/// reference implementation.
pub const PROJECTION_GUARD: f64 = 1e-12;

/// A handle to a parameter-shaped buffer allocated by
/// [`ParamStore::alloc_buffer`].
///
/// Buffers hold one tensor per parameter, of the parameter's shape, dtype and
/// device. They carry optimiser state (momentum), the perturbation δ and the
/// snapshot of θ used by [`RestoreMode::Copy`](crate::RestoreMode::Copy).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BufferId(usize);

impl BufferId {
    /// Makes a handle from the store's own index. Only store implementations
    /// need this.
    pub fn new(index: usize) -> Self {
        BufferId(index)
    }

    /// The store's own index behind the handle.
    pub fn index(self) -> usize {
        self.0
    }
}

/// Which set of tensors an operation reads or writes.
///
/// Every slot holds one tensor per parameter, with the parameter's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Slot {
    /// The parameters θ themselves.
    Params,
    /// The gradients written by the last closure call.
    Grads,
    /// A buffer from [`ParamStore::alloc_buffer`].
    Buffer(BufferId),
}

/// The element type of a tensor as stored on the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
#[non_exhaustive]
pub enum DType {
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// IEEE single precision.
    F32,
    /// IEEE double precision.
    F64,
}

impl DType {
    /// The name used in checkpoints and messages (`"f32"`, …).
    pub fn name(self) -> &'static str {
        match self {
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F32 => "f32",
            DType::F64 => "f64",
        }
    }

    /// Parses [`DType::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "f16" => DType::F16,
            "bf16" => DType::BF16,
            "f32" => DType::F32,
            "f64" => DType::F64,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 => 4,
            DType::F64 => 8,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A tensor copied to host memory, backend-neutral.
///
/// Values are held as `f64`, which represents every `f16`, `bf16` and `f32`
/// value exactly, so a round trip through `HostTensor` is bit-exact for every
/// [`DType`] (NaN payloads aside). It always holds exactly as many values as
/// its shape has elements: [`HostTensor::new`] checks it, and so does
/// deserialisation.
///
/// ```
/// use amp_core::{DType, HostTensor};
///
/// let t = HostTensor::new(vec![2, 3], DType::F32, vec![0.5; 6])?;
/// assert_eq!((t.shape(), t.dtype(), t.numel()), (&[2, 3][..], DType::F32, 6));
/// assert!(HostTensor::new(vec![2, 3], DType::F32, vec![0.5; 5]).is_err());
/// # Ok::<(), amp_core::AmpError>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(try_from = "HostTensorFields"))]
pub struct HostTensor {
    shape: Vec<usize>,
    dtype: DType,
    data: Vec<f64>,
}

/// A [`HostTensor`] as deserialised, before its check.
#[cfg(feature = "serde")]
#[derive(serde::Deserialize)]
struct HostTensorFields {
    shape: Vec<usize>,
    dtype: DType,
    data: Vec<f64>,
}

#[cfg(feature = "serde")]
impl TryFrom<HostTensorFields> for HostTensor {
    type Error = AmpError;

    fn try_from(fields: HostTensorFields) -> Result<Self> {
        HostTensor::new(fields.shape, fields.dtype, fields.data)
    }
}

impl HostTensor {
    /// Builds a host tensor, checking that `data` fits `shape`
    /// ([`AmpError::CountMismatch`] otherwise). `data` is in row-major (C)
    /// order; an empty `shape` is a 0-d scalar with one value.
    pub fn new(shape: Vec<usize>, dtype: DType, data: Vec<f64>) -> Result<Self> {
        let numel = checked_numel(&shape)?;
        if numel != data.len() {
            return Err(AmpError::CountMismatch {
                what: "host tensor elements",
                expected: numel,
                found: data.len(),
            });
        }
        Ok(HostTensor { shape, dtype, data })
    }

    /// A tensor of zeros.
    pub fn zeros(shape: Vec<usize>, dtype: DType) -> Result<Self> {
        let numel = checked_numel(&shape)?;
        Ok(HostTensor {
            shape,
            dtype,
            data: vec![0.0; numel],
        })
    }

    /// The shape; empty for a 0-d scalar.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The dtype the values came from and go back to.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The values in row-major (C) order.
    pub fn data(&self) -> &[f64] {
        &self.data
    }

    /// The values, to change in place (their number is fixed).
    pub fn data_mut(&mut self) -> &mut [f64] {
        &mut self.data
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// The same values tagged with another dtype. They are not rounded to
    /// it here: a store rounds what it is given on
    /// [`ParamStore::write`].
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    /// The same values under another shape with as many elements
    /// ([`AmpError::CountMismatch`] otherwise).
    pub fn reshaped(self, shape: Vec<usize>) -> Result<Self> {
        HostTensor::new(shape, self.dtype, self.data)
    }

    /// The values, giving up the shape.
    pub fn into_data(self) -> Vec<f64> {
        self.data
    }

    /// Shape, dtype and values.
    pub fn into_parts(self) -> (Vec<usize>, DType, Vec<f64>) {
        (self.shape, self.dtype, self.data)
    }
}

/// The number of elements of `shape`, refusing one that overflows `usize`.
fn checked_numel(shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| {
            AmpError::config(
                "shape",
                format!("{shape:?} has more elements than fit in memory"),
            )
        })
}

/// The scalar type a [`ParamStore`] computes in.
///
/// Implemented for every `num_traits::Float` that is `Debug + Send + Sync`;
/// in practice `f32` and `f64`.
pub trait Scalar: Float + Debug + Send + Sync + 'static {
    /// Converts a hyper-parameter given as `f64` (rounding to nearest).
    fn from_f64_rounded(value: f64) -> Self {
        <Self as num_traits::NumCast>::from(value).unwrap_or_else(Self::nan)
    }

    /// Widens to `f64`.
    fn widen(self) -> f64 {
        num_traits::ToPrimitive::to_f64(&self).unwrap_or(f64::NAN)
    }
}

impl<T: Float + Debug + Send + Sync + 'static> Scalar for T {}

/// The parameters of a model, their gradients and parameter-shaped buffers,
/// with the batched operations that AMP and its base optimiser need.
///
/// Every operation works on **all tensors at once**, restricted to those whose
/// `mask` entry is `true`; coefficient slices have one entry per tensor (the
/// entries of masked-out tensors are ignored). Batching lets a GPU backend run
/// each operation as one fused launch, and per-tensor results such as norms
/// stay in [`ParamStore::Norms`], on the device, until
/// [`ParamStore::norms_to_host`] is called. A step reads from the device a
/// constant number of times, never once per tensor.
///
/// Implementations are thin: they move data, and the algorithm (in
/// [`Amp`](crate::Amp) and [`Sgd`](crate::Sgd)) is written once on top.
/// Errors are returned, never panicked: a mask or coefficient slice of the
/// wrong length is an [`AmpError::CountMismatch`], an unknown buffer an
/// [`AmpError::UnknownBuffer`].
///
/// # Gradients
/// [`Amp::step`](crate::Amp::step) calls [`zero_grads`](ParamStore::zero_grads)
/// before every closure call; afterwards [`grad_mask`](ParamStore::grad_mask)
/// says which tensors received a gradient. How a gradient gets into the store
/// is the backend's business: written from the host
/// ([`write_grad`](ParamStore::write_grad)), accumulated by autograd into
/// each tensor (libtorch), or handed over from a gradient map returned by
/// `backward()` (candle).
///
/// The presence rules every store follows (the conformance suite's
/// `gradient_presence` property checks them):
/// - [`zero_grads`](ParamStore::zero_grads) makes every gradient absent;
/// - writing [`Slot::Grads`] (through [`write`](ParamStore::write) or
///   [`write_grad`](ParamStore::write_grad)) makes that tensor's gradient
///   present, and so does the framework's backward pass for the tensors it
///   reaches;
/// - nothing else changes presence: operations with `Slot::Grads` as their
///   destination (such as [`scale`](ParamStore::scale) for clipping) change
///   values only;
/// - an absent gradient reads as zeros.
///
/// # Implementing it for your own tensor type
/// Implement the required methods over your tensor type; the provided ones
/// have defaults. The workspace's `tests/custom_store.rs` implements the trait
/// for plain `Vec<Vec<f64>>` outside every crate of the workspace and trains
/// with it; `amp-ndarray` is the reference implementation. Without
/// multi-tensor kernels to batch with, implement the per-tensor
/// [`TensorOps`](crate::TensorOps) instead and use
/// [`TensorStore`](crate::TensorStore), which implements this trait.
pub trait ParamStore {
    /// The scalar type of hyper-parameters and coefficients, `f32` or `f64`
    /// (a half-precision store computes in `f32`).
    type Scalar: Scalar;
    /// Per-tensor L2 norms, left wherever the backend computed them (a device
    /// tensor on a GPU backend, a `Vec` on the CPU reference).
    type Norms;

    /// Number of parameter tensors.
    fn num_tensors(&self) -> usize;

    /// Shape of parameter `index` (empty for a 0-d scalar).
    fn shape(&self, index: usize) -> Result<Vec<usize>>;

    /// Element type of the parameters as stored.
    fn dtype(&self) -> DType;

    /// Forgets all gradients, so that the next closure call starts afresh.
    /// Called before every closure call of a step.
    fn zero_grads(&mut self) -> Result<()>;

    /// One entry per tensor: `true` where the last closure call produced a
    /// gradient. Tensors without one are neither perturbed nor stepped.
    fn grad_mask(&self) -> Result<Vec<bool>>;

    /// Allocates a zero-filled parameter-shaped buffer.
    fn alloc_buffer(&mut self) -> Result<BufferId>;

    /// Releases a buffer.
    fn free_buffer(&mut self, id: BufferId) -> Result<()>;

    /// `dst[i] ← src[i]` for every masked-in tensor. `dst` and `src` differ.
    fn copy(&mut self, dst: Slot, src: Slot, mask: &[bool]) -> Result<()>;

    /// `dst[i] ← factor[i] · dst[i]`.
    fn scale(&mut self, dst: Slot, factor: &[Self::Scalar], mask: &[bool]) -> Result<()>;

    /// `dst[i] ← dst[i] + alpha[i] · src[i]` (computed as one multiply and one
    /// add per element, as PyTorch's `add_(src, alpha=…)` does). `dst` and
    /// `src` differ.
    fn axpy(&mut self, dst: Slot, alpha: &[Self::Scalar], src: Slot, mask: &[bool]) -> Result<()>;

    /// Per-tensor Euclidean norms `‖src[i]‖₂`; masked-out entries are 0.
    fn norms(&mut self, src: Slot, mask: &[bool]) -> Result<Self::Norms>;

    /// The projection onto per-tensor balls:
    /// `dst[i] ← dst[i] · min(1, max_norm[i] / (norms[i] + 1e-12))`, with the
    /// coefficient computed in [`ParamStore::Scalar`] and kept on the device.
    /// `norms` comes from [`ParamStore::norms`] of the same `dst`.
    fn clip_to_norms(
        &mut self,
        dst: Slot,
        norms: &Self::Norms,
        max_norm: &[Self::Scalar],
        mask: &[bool],
    ) -> Result<()>;

    /// Copies norms to the host, one `f64` per tensor (one device read).
    fn norms_to_host(&self, norms: &Self::Norms) -> Result<Vec<f64>>;

    /// `true` when every element of every masked-in tensor of `src` is finite
    /// (one reduction and one device read for the whole slot).
    fn all_finite(&mut self, src: Slot, mask: &[bool]) -> Result<bool>;

    /// Copies tensor `index` of `slot` to the host. A tensor of
    /// [`Slot::Grads`] without a gradient reads as zeros.
    fn read(&self, slot: Slot, index: usize) -> Result<HostTensor>;

    /// Overwrites tensor `index` of `slot` with `value`, which must have the
    /// tensor's shape ([`AmpError::ShapeMismatch`] otherwise, and nothing is
    /// written). Values are rounded to the store's dtype. Writing
    /// [`Slot::Grads`] also marks that gradient present (see
    /// [Gradients](ParamStore#gradients)).
    fn write(&mut self, slot: Slot, index: usize, value: &HostTensor) -> Result<()>;

    /// Sets the gradient of tensor `index` from the host and marks it
    /// present: `grad_mask()?[index]` is `true` until the next
    /// [`zero_grads`](ParamStore::zero_grads). What a closure that computes
    /// gradients on the host calls. The default is
    /// [`write`](ParamStore::write) into [`Slot::Grads`].
    fn write_grad(&mut self, index: usize, value: &HostTensor) -> Result<()> {
        self.write(Slot::Grads, index, value)
    }

    /// `dst[i] ← base[i] + alpha[i] · src[i]`: an [`axpy`](ParamStore::axpy)
    /// whose addend is read from `base` instead of `dst`, in one pass (one
    /// multiply and one add per element, as `axpy`). `dst` and `src` differ;
    /// `base` may be `dst` (then it is `axpy`).
    ///
    /// [`Sgd`](crate::Sgd) ends its step with it, reading θ from AMP's
    /// snapshot, so that restoring θ costs no pass of its own. The default is
    /// [`composed::axpy_from`](crate::composed::axpy_from) (a copy and an
    /// axpy); a backend may fuse it.
    fn axpy_from(
        &mut self,
        dst: Slot,
        base: Slot,
        alpha: &[Self::Scalar],
        src: Slot,
        mask: &[bool],
    ) -> Result<()> {
        crate::composed::axpy_from(self, dst, base, alpha, src, mask)
    }

    /// The first ascent step of AMP and its projection, fused. For every
    /// masked-in tensor, with `g` its gradient:
    ///
    /// ```text
    /// v        = inner_lr[i] · g            (no multiply where inner_lr[i] is 1)
    /// c        = min(1, epsilon[i] / (‖v‖₂ + 1e-12))
    /// snapshot ← θ                          (when `snapshot` is given)
    /// delta    ← c · v                      (when `delta` is given)
    /// θ        ← θ + c · v
    /// ```
    ///
    /// and returns the norms `‖v‖₂` (before projection). The arithmetic and
    /// its rounding are those of the unfused sequence
    /// ([`composed::perturb_from_grads`](crate::composed::perturb_from_grads),
    /// the default): copy, [`scale`](ParamStore::scale),
    /// [`norms`](ParamStore::norms), [`clip_to_norms`](ParamStore::clip_to_norms),
    /// [`axpy`](ParamStore::axpy). A fused implementation makes five passes
    /// over parameter-sized memory (reads g twice and θ once, writes θ and
    /// the snapshot), against eight to ten for the sequence.
    ///
    /// `snapshot` and `delta` are distinct buffers. Afterwards the gradient
    /// slot holds either `g` or `c · v` (callers must not rely on which). On
    /// error θ is as it was.
    fn perturb_from_grads(
        &mut self,
        snapshot: Option<Slot>,
        delta: Option<Slot>,
        inner_lr: &[Self::Scalar],
        epsilon: &[Self::Scalar],
        mask: &[bool],
    ) -> Result<Self::Norms> {
        crate::composed::perturb_from_grads(self, snapshot, delta, inner_lr, epsilon, mask)
    }

    /// `dst[i] ← dst[i] + (alpha[i] · a[i]) · b[i]` element-wise, as ATen's
    /// `addcmul_` ([`elementwise::addcmul`](crate::elementwise::addcmul)).
    /// `dst` is neither source; `a` may be `b` (Adam squares the gradient
    /// with it). A missing gradient reads as zeros.
    ///
    /// The default ([`composed::addcmul`](crate::composed::addcmul)) goes
    /// through the host tensor by tensor, computing in `f64` for an `f64`
    /// store and in `f32` otherwise; a backend overrides it with its own
    /// kernels, giving the same bits for `f32` and `f64`.
    fn addcmul(
        &mut self,
        dst: Slot,
        alpha: &[Self::Scalar],
        a: Slot,
        b: Slot,
        mask: &[bool],
    ) -> Result<()> {
        crate::composed::addcmul(self, dst, alpha, a, b, mask)
    }

    /// `dst[i] ← dst[i] + (alpha[i] · num[i]) / (√den[i] / divisor[i] + eps[i])`
    /// element-wise: Adam's update
    /// ([`elementwise::addcdiv_sqrt`](crate::elementwise::addcdiv_sqrt)).
    /// `dst` is neither source. The default
    /// ([`composed::addcdiv_sqrt`](crate::composed::addcdiv_sqrt)) goes
    /// through the host, as [`ParamStore::addcmul`]'s does.
    #[allow(clippy::too_many_arguments)]
    fn addcdiv_sqrt(
        &mut self,
        dst: Slot,
        alpha: &[Self::Scalar],
        num: Slot,
        den: Slot,
        divisor: &[Self::Scalar],
        eps: &[Self::Scalar],
        mask: &[bool],
    ) -> Result<()> {
        crate::composed::addcdiv_sqrt(self, dst, alpha, num, den, divisor, eps, mask)
    }

    /// `dst[i] ← max(dst[i], src[i])` element-wise, NaN if either is NaN (as
    /// `torch.maximum`); AMSGrad keeps its running maximum with it. The
    /// default ([`composed::maximum`](crate::composed::maximum)) goes
    /// through the host.
    fn maximum(&mut self, dst: Slot, src: Slot, mask: &[bool]) -> Result<()> {
        crate::composed::maximum(self, dst, src, mask)
    }

    /// One Adam step of the masked-in tensors, fused: per element,
    /// [`elementwise::adam`](crate::elementwise::adam) with the tensor's
    /// [`AdamCoefficients`](crate::elementwise::AdamCoefficients), reading
    /// θ, g, m and v (and AMSGrad's maximum) once and writing θ, m and v
    /// (and the maximum) once — seven passes over the parameters where the
    /// default ([`composed::adam_update`](crate::composed::adam_update), a
    /// sequence of the operations above) makes about sixteen. It must give
    /// the default's bits. Afterwards the gradient slot holds g or g + λθ
    /// (callers must not rely on which).
    fn adam_update(
        &mut self,
        slots: crate::elementwise::AdamSlots,
        coefficients: &[crate::elementwise::AdamCoefficients<Self::Scalar>],
        mask: &[bool],
    ) -> Result<()> {
        crate::composed::adam_update(self, slots, coefficients, mask)
    }

    /// One SGD step of the masked-in tensors, fused: per element,
    /// [`elementwise::sgd`](crate::elementwise::sgd) with the tensor's
    /// [`SgdCoefficients`](crate::elementwise::SgdCoefficients), reading θ
    /// from `weights` ([`Slot::Params`], or AMP's snapshot while the
    /// parameters hold θ + δ), g and the momentum buffer once and writing θ
    /// into [`Slot::Params`] and the buffer once — five passes over the
    /// parameters where the default
    /// ([`composed::sgd_update`](crate::composed::sgd_update), the sequence
    /// [`Sgd`](crate::Sgd) runs otherwise) makes up to fifteen. It must give
    /// the default's bits. Afterwards the gradient slot holds g, `g + λθ`
    /// or the update (callers must not rely on which).
    fn sgd_update(
        &mut self,
        weights: Slot,
        momentum: Option<&crate::elementwise::SgdMomentum<Self::Scalar>>,
        coefficients: &[crate::elementwise::SgdCoefficients<Self::Scalar>],
        mask: &[bool],
    ) -> Result<()> {
        crate::composed::sgd_update(self, weights, momentum, coefficients, mask)
    }

    /// Pins (`true`) or unpins a buffer: a pinned buffer cannot be freed
    /// ([`ParamStore::free_buffer`] returns [`AmpError::BufferInUse`]).
    /// [`Amp`](crate::Amp) and [`Sgd`](crate::Sgd) pin the buffers they hold
    /// between steps, so that a closure that frees buffers of its own cannot
    /// free theirs. Stores built on [`Buffers`] forward to
    /// [`Buffers::set_pinned`]; the default does nothing (no protection).
    fn pin_buffer(&mut self, id: BufferId, pinned: bool) -> Result<()> {
        let _ = (id, pinned);
        Ok(())
    }

    /// Called by [`Amp`](crate::Amp) before every closure call, after
    /// [`zero_grads`](ParamStore::zero_grads), told which pass follows. A
    /// store over a framework whose model owns immutable weights (a
    /// functional framework) rebuilds the model from the store's weights
    /// here, so that the closure sees θ on the clean pass and θ + δₖ on
    /// perturbed pass k. The default does nothing.
    fn prepare_pass(&mut self, pass: Pass) -> Result<()> {
        let _ = pass;
        Ok(())
    }

    /// Moves gradients that arrived outside the gradient slot into it,
    /// adding them to what the slot holds. A store whose model computes
    /// elsewhere — a half-precision model stepped through f32 master
    /// weights, whose autograd leaves half-precision gradients on the
    /// model's own variables — implements it; the default does nothing.
    ///
    /// [`Amp`](crate::Amp) calls it after every closure call that returned
    /// `Ok`, before it looks at the gradients (the mask, the loss scale,
    /// the finiteness check), and the split step
    /// ([`Amp::perturb`](crate::Amp::perturb)) before it reads the clean
    /// gradient. Whatever reads gradients on the closure's behalf calls it
    /// first ([`clip_grad_norm`](ParamStore::clip_grad_norm),
    /// [`LossScale::unscale_grads`](crate::LossScale::unscale_grads)), so
    /// it must be idempotent: a second call with no new gradients in
    /// between changes nothing.
    fn collect_grads(&mut self) -> Result<()> {
        Ok(())
    }

    /// Total number of elements over all parameters.
    fn total_numel(&self) -> Result<usize> {
        (0..self.num_tensors()).try_fold(0usize, |acc, i| {
            Ok(acc + self.shape(i)?.iter().product::<usize>())
        })
    }

    /// Scales gradients so that their global Euclidean norm (over all
    /// masked-in tensors together) is at most `max_norm`, as PyTorch's
    /// `clip_grad_norm_` does: `g ← g · min(1, max_norm / (‖g‖ + 1e-6))`.
    /// Returns the norm before clipping, read to the host.
    ///
    /// Call it inside the closure to clip on every pass, as the paper's recipe
    /// does. The default reads the per-tensor norms (one device read) and
    /// applies one scale; backends may keep it on the device.
    fn clip_grad_norm(&mut self, max_norm: f64, mask: &[bool]) -> Result<f64> {
        if !(max_norm.is_finite() && max_norm > 0.0) {
            return Err(AmpError::config(
                "max_norm",
                format!("must be positive and finite, got {max_norm}"),
            ));
        }
        self.collect_grads()?;
        let norms = self.norms(Slot::Grads, mask)?;
        let host = self.norms_to_host(&norms)?;
        let total = host.iter().map(|n| n * n).sum::<f64>().sqrt();
        let coefficient = (max_norm / (total + 1e-6)).min(1.0);
        if coefficient < 1.0 {
            let factor = vec![Self::Scalar::from_f64_rounded(coefficient); mask.len()];
            self.scale(Slot::Grads, &factor, mask)?;
        }
        Ok(total)
    }

    /// [`ParamStore::clip_grad_norm`] over every tensor that has a gradient
    /// (as [`ParamStore::grad_mask`] reports): what a closure calls after its
    /// backward pass.
    fn clip_grads_to_norm(&mut self, max_norm: f64) -> Result<f64> {
        self.collect_grads()?;
        let mask = self.grad_mask()?;
        self.clip_grad_norm(max_norm, &mask)
    }
}

/// Checks that a mask or coefficient slice has one entry per tensor; for
/// store implementations.
pub fn check_len(what: &'static str, expected: usize, found: usize) -> Result<()> {
    if expected == found {
        Ok(())
    } else {
        Err(AmpError::CountMismatch {
            what,
            expected,
            found,
        })
    }
}

/// Checks that `index` names one of `len` tensors; for store
/// implementations.
pub fn check_index(index: usize, len: usize) -> Result<()> {
    if index < len {
        Ok(())
    } else {
        Err(AmpError::IndexOutOfRange { index, len })
    }
}

/// Checks that a tensor handed to [`ParamStore::write`] (or any other
/// per-tensor input) has the parameter's shape; for store implementations.
pub fn check_shape(index: usize, expected: &[usize], found: &[usize]) -> Result<()> {
    if expected == found {
        Ok(())
    } else {
        Err(AmpError::ShapeMismatch {
            index,
            expected: expected.to_vec(),
            found: found.to_vec(),
        })
    }
}

/// The parameter-shaped buffers of a store, addressed by [`BufferId`]; for
/// store implementations.
///
/// Freed slots are reused, so ids stay small over long runs, and a freed or
/// unknown id is an [`AmpError::UnknownBuffer`], never a panic.
///
/// A buffer can be pinned ([`Buffers::set_pinned`]): then
/// [`Buffers::remove`] refuses it with [`AmpError::BufferInUse`]. `Amp` and
/// [`Sgd`](crate::Sgd) pin the buffers they hold (through
/// [`ParamStore::pin_buffer`]), so that a closure freeing them by mistake
/// gets an error instead of destroying the snapshot of θ or the momentum.
#[derive(Clone, Debug)]
pub struct Buffers<B> {
    slots: Vec<Option<B>>,
    pinned: Vec<bool>,
}

impl<B> Default for Buffers<B> {
    fn default() -> Self {
        Buffers {
            slots: Vec::new(),
            pinned: Vec::new(),
        }
    }
}

impl<B> Buffers<B> {
    /// No buffers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores a buffer (not pinned) and returns its id.
    pub fn insert(&mut self, buffer: B) -> BufferId {
        if let Some(i) = self.slots.iter().position(Option::is_none) {
            self.slots[i] = Some(buffer);
            self.pinned[i] = false;
            BufferId::new(i)
        } else {
            self.slots.push(Some(buffer));
            self.pinned.push(false);
            BufferId::new(self.slots.len() - 1)
        }
    }

    /// Removes a buffer and gives it back; a pinned one is refused with
    /// [`AmpError::BufferInUse`] and stays.
    pub fn remove(&mut self, id: BufferId) -> Result<B> {
        self.get(id)?;
        if self.pinned[id.index()] {
            return Err(AmpError::BufferInUse(id.index()));
        }
        self.slots
            .get_mut(id.index())
            .and_then(Option::take)
            .ok_or(AmpError::UnknownBuffer(id.index()))
    }

    /// Pins or unpins a live buffer (see [`Buffers`]).
    pub fn set_pinned(&mut self, id: BufferId, pinned: bool) -> Result<()> {
        self.get(id)?;
        self.pinned[id.index()] = pinned;
        Ok(())
    }

    /// The buffer behind `id`.
    pub fn get(&self, id: BufferId) -> Result<&B> {
        self.slots
            .get(id.index())
            .and_then(Option::as_ref)
            .ok_or(AmpError::UnknownBuffer(id.index()))
    }

    /// The buffer behind `id`, mutably.
    pub fn get_mut(&mut self, id: BufferId) -> Result<&mut B> {
        self.slots
            .get_mut(id.index())
            .and_then(Option::as_mut)
            .ok_or(AmpError::UnknownBuffer(id.index()))
    }

    /// Two different buffers at once, the first mutably.
    pub fn pair_mut(&mut self, dst: BufferId, src: BufferId) -> Result<(&mut B, &B)> {
        self.get(dst)?;
        self.get(src)?;
        if dst == src {
            return Err(AmpError::backend(format!(
                "buffer {} is both source and destination",
                dst.index()
            )));
        }
        let (lo, hi) = (dst.index().min(src.index()), dst.index().max(src.index()));
        let (left, right) = self.slots.split_at_mut(hi);
        let (low, high) = (&mut left[lo], &mut right[0]);
        let (low, high) = (low.as_mut(), high.as_mut());
        match (low, high) {
            (Some(low), Some(high)) if dst.index() < src.index() => Ok((low, high)),
            (Some(low), Some(high)) => Ok((high, low)),
            _ => Err(AmpError::UnknownBuffer(dst.index())),
        }
    }

    /// The live buffers with their ids, in id order.
    pub fn iter(&self) -> impl Iterator<Item = (BufferId, &B)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.as_ref().map(|b| (BufferId::new(i), b)))
    }

    /// Number of live buffers.
    pub fn len(&self) -> usize {
        self.slots.iter().filter(|b| b.is_some()).count()
    }

    /// `true` when no buffer is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
