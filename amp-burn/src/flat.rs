//! [`Flat`]: one parameter as the store holds it — any rank, kept flat.

use std::sync::atomic::{AtomicU64, Ordering};

use amp_core::{AmpError, Result};
use burn::tensor::{Shape, Tensor};

/// Versions identify values: every [`Flat`] made from new data gets the
/// next one, and a clone keeps its original's (burn tensors are immutable,
/// so equal versions mean equal values).
static NEXT_VERSION: AtomicU64 = AtomicU64::new(1);

/// One float parameter of a burn module, of any rank, as the store holds it:
/// a rank-1 tensor without autodiff, its shape, and a version that tells
/// the store whether the module still holds this value.
///
/// burn's tensors carry their rank in the type (`Tensor<D>`); a store holds
/// tensors of many ranks, so it keeps them flat and gives them their shape
/// back when it rebuilds the module ([`Flat::to_tensor`]). Reshaping a
/// contiguous tensor moves no data.
#[derive(Clone, Debug)]
pub struct Flat {
    value: Tensor<1>,
    dims: Vec<usize>,
    version: u64,
}

impl Flat {
    /// `tensor`, flattened and detached from autodiff.
    pub fn new<const D: usize>(tensor: Tensor<D>) -> Self {
        let dims = tensor.dims().to_vec();
        let numel = dims.iter().product::<usize>();
        Self::from_parts(tensor.without_autodiff().reshape([numel]), dims)
    }

    /// A flat `value` standing for a tensor of shape `dims` (as many
    /// elements).
    pub(crate) fn from_parts(value: Tensor<1>, dims: Vec<usize>) -> Self {
        Self {
            value,
            dims,
            version: NEXT_VERSION.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// A result of the same shape as `self`.
    pub(crate) fn with_value(&self, value: Tensor<1>) -> Self {
        Self::from_parts(value, self.dims.clone())
    }

    /// The shape of the parameter.
    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    /// The number of elements.
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    /// The flat tensor (no autodiff).
    pub fn value(&self) -> &Tensor<1> {
        &self.value
    }

    /// The tensor in its own shape, without autodiff; an error when `D` is
    /// not its rank.
    pub fn to_tensor<const D: usize>(&self) -> Result<Tensor<D>> {
        if self.dims.len() != D {
            return Err(AmpError::backend(format!(
                "a parameter of shape {:?} cannot become a rank-{D} tensor",
                self.dims
            )));
        }
        Ok(self.value.clone().reshape(Shape::from(self.dims.clone())))
    }

    /// The version of the value (see [`Flat`]).
    pub(crate) fn version(&self) -> u64 {
        self.version
    }
}
