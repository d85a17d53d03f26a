//! The flat layout of [`TchStore::flatten`]: parameters in one allocation,
//! gradients in another that is zeroed in place.
//!
//! The layout is a placement of the tensors, not a cache of addresses: the
//! store keeps the flat gradient tensor and one gradient tensor per
//! parameter, and every operation reads their memory afresh in the shim
//! (which merges tensors that lie back to back into one loop). So a
//! parameter given new storage afterwards (`set_data`) is simply worked on
//! where it is now; it only stops being merged with its neighbours.

use amp_core::{ParamStore, Result};
use tch::Tensor;
use torch_sys::C_tensor;

use crate::ffi::{self, check, raw, take_tensor};
use crate::TchStore;

/// What [`TchStore::flatten`] made.
#[derive(Debug)]
pub(crate) struct Flat {
    /// All gradients, one allocation (the parameters' allocation is held by
    /// the parameters themselves).
    grads: Tensor,
    /// Per parameter: its gradient over `grads` (`None` for parameters that
    /// did not require grad when flattened).
    views: Vec<Option<Tensor>>,
    /// Per parameter: the version of its gradient when last zeroed.
    versions: Vec<i64>,
}

impl Flat {
    /// The shim's pointers of `views` (NULL where a parameter has none).
    fn view_pointers(&self) -> Vec<*mut C_tensor> {
        self.views
            .iter()
            .map(|v| v.as_ref().map_or(std::ptr::null_mut(), raw))
            .collect()
    }

    /// `zero_grads`: re-attaches each parameter's flat gradient, zeroes them
    /// all with one fill and records their versions.
    pub(crate) fn zero(&mut self, params: &[*mut C_tensor]) -> Result<()> {
        let views = self.view_pointers();
        // SAFETY: `params`, `views` and `versions` have one entry per
        // parameter; the tensors outlive the call.
        check(unsafe {
            ffi::amp_tch_flat_zero(
                params.as_ptr(),
                views.as_ptr(),
                params.len(),
                raw(&self.grads),
                self.versions.as_mut_ptr(),
            )
        })
    }

    /// `grad_mask`: the parameters whose gradient was written since
    /// [`Flat::zero`] (or that have a gradient of their own).
    pub(crate) fn grad_mask(&self, params: &[*mut C_tensor]) -> Result<Vec<bool>> {
        let views = self.view_pointers();
        let mut out = vec![0u8; params.len()];
        // SAFETY: every list has one entry per parameter, `out` one byte;
        // the tensors outlive the call.
        check(unsafe {
            ffi::amp_tch_flat_grad_mask(
                params.as_ptr(),
                views.as_ptr(),
                params.len(),
                self.versions.as_ptr(),
                out.as_mut_ptr(),
            )
        })?;
        Ok(out.into_iter().map(|b| b != 0).collect())
    }
}

impl TchStore {
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
    /// walk contiguous memory, tensors that lie back to back merged into one
    /// loop, instead of a thousand scattered allocations.
    /// [`ParamStore::grad_mask`] still reports only the tensors that
    /// received a gradient since the last reset (autograd's in-place
    /// accumulation is seen through each gradient's version counter).
    ///
    /// Call it once, before training; calling it again does nothing. On
    /// error the store and the tensors are unchanged. A parameter may be
    /// given new storage afterwards (`set_data`): every operation reads the
    /// tensors where they are at that moment, so it is trained (and loaded,
    /// and rolled back) where it now lives, with the same results.
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
    /// assert_eq!(store.read(Slot::Grads, 0)?.data(), [2.0, 4.0]);
    /// # Ok::<(), amp_core::AmpError>(())
    /// ```
    pub fn flatten(&mut self) -> Result<()> {
        if self.flat.is_some() || self.params.is_empty() {
            return Ok(());
        }
        if self.master.is_some() {
            return Err(amp_core::AmpError::config(
                "flatten",
                "a store with master weights cannot be flattened",
            ));
        }
        let n = self.num_tensors();
        let pointers = self.all_params();
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
        // SAFETY: allocated by the shim on success. The parameters hold
        // their allocation themselves.
        let (_params, grads) = unsafe { (take_tensor(flat_params)?, take_tensor(flat_grads)?) };
        self.flat = Some(Flat {
            grads,
            views,
            versions: vec![i64::MIN; n],
        });
        Ok(())
    }

    /// `true` after [`TchStore::flatten`].
    pub fn is_flat(&self) -> bool {
        self.flat.is_some()
    }
}
