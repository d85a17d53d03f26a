//! Per-tensor norms that stay where the tensors are.

use tch::Tensor;

/// Per-tensor Euclidean norms computed by [`TchStore`](crate::TchStore),
/// left on the device.
///
/// `values` holds one entry per masked-in tensor, in store order; `mask` says
/// which tensors those are. [`ParamStore::norms_to_host`] expands them to one
/// `f64` per tensor, with 0 for the masked-out ones.
///
/// [`ParamStore::norms_to_host`]: amp_core::ParamStore::norms_to_host
#[derive(Debug)]
pub struct TchNorms {
    pub(crate) values: Tensor,
    pub(crate) mask: Vec<bool>,
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
