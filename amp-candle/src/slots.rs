//! Reading and storing one tensor of a slot, the checks every operation
//! makes first, and the conversions between storage and compute dtypes.

use amp_core::{check_len, AmpError, HostTensor, Result, Slot, PROJECTION_GUARD};
use candle_core::{DType as CDType, Device, Tensor};

use crate::{backend, cast, CandleNorms, CandleStore};

impl CandleStore {
    pub(crate) fn check_index(&self, index: usize) -> Result<()> {
        amp_core::check_index(index, self.vars.len())
    }

    pub(crate) fn check_mask(&self, mask: &[bool]) -> Result<()> {
        check_len("mask", self.vars.len(), mask.len())
    }

    /// Fails for a buffer that is not live, before anything is written.
    pub(crate) fn check_slot(&self, slot: Slot) -> Result<()> {
        match slot {
            Slot::Buffer(id) => self.buffers.get(id).map(drop),
            _ => Ok(()),
        }
    }

    pub(crate) fn check_pair(&self, dst: Slot, src: Slot) -> Result<()> {
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
    pub(crate) fn value(&self, slot: Slot, index: usize) -> Result<Tensor> {
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
    pub(crate) fn source(&self, slot: Slot, index: usize) -> Result<Tensor> {
        match (slot, &self.master) {
            (Slot::Params, None) => Ok(self.vars[index].as_tensor().clone()),
            _ => self.value(slot, index),
        }
    }

    /// Stores `value` (of the storage dtype, and never sharing a var's
    /// storage) as tensor `index` of `slot`. Writing a gradient does not
    /// change [`ParamStore::grad_mask`](amp_core::ParamStore::grad_mask).
    pub(crate) fn put(&mut self, slot: Slot, index: usize, value: Tensor) -> Result<()> {
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
    pub(crate) fn up(&self, tensor: &Tensor) -> Result<Tensor> {
        cast(tensor, self.compute).map_err(backend)
    }

    /// Rounds back to the storage dtype.
    pub(crate) fn down(&self, tensor: Tensor) -> Result<Tensor> {
        cast(&tensor, self.dtype).map_err(backend)
    }

    /// The projection's coefficients `min(1, max_norm / (norm + 1e-12))`,
    /// all tensors at once, on the device, in the compute dtype.
    pub(crate) fn coefficients(&self, norms: &CandleNorms, max_norm: &[f64]) -> Result<Tensor> {
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
    pub(crate) fn gather(&self, parts: Vec<Option<Tensor>>, dtype: CDType) -> Result<Tensor> {
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
pub(crate) fn host_to_tensor(value: &HostTensor, dtype: CDType, device: &Device) -> Result<Tensor> {
    Tensor::from_vec(value.data().to_vec(), value.shape().to_vec(), device)
        .and_then(|t| cast(&t, dtype))
        .map_err(backend)
}
