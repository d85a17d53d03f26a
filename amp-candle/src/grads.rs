//! Gradients handed to a [`CandleStore`]: from candle's `backward()`, a
//! `GradStore`, or one tensor at a time, checked before they are taken.

use amp_core::{check_shape, AmpError, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType as CDType, Tensor};

use crate::{backend, cast, device_name, storage_address, CandleStore};

impl CandleStore {
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
    /// dtype and device. The store never writes into `grad`; one that
    /// shares a var's storage or is not contiguous is taken as a copy.
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
    /// [`ParamStore::zero_grads`](amp_core::ParamStore::zero_grads): no gradient). Returns how many vars got a
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
    /// held since the last [`ParamStore::zero_grads`](amp_core::ParamStore::zero_grads) (for gradient
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
    /// updated in place, and so is one that is not contiguous (a
    /// transposed view, say), since the CPU store's in-place kernels read
    /// contiguous memory.
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
        } else if !grad.is_contiguous() {
            grad.contiguous().map_err(backend)
        } else {
            Ok(grad)
        }
    }
}
