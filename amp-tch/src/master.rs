//! Master weights: an f32 copy of θ for a half-precision (f16/bf16) model.
//!
//! The store's parameters become the f32 copies; the model's own variables
//! are kept beside them and written, rounded, after every operation that
//! writes θ, and their autograd gradients are widened into the copies'
//! gradients after every closure call ([`ParamStore::collect_grads`](amp_core::ParamStore::collect_grads)).

use amp_core::{AmpError, DType, Result, Slot};
use tch::{Kind, Tensor};
use torch_sys::C_tensor;

use crate::ffi::{self, check, raw, TensorView};
use crate::kinds::tch_error;
use crate::TchStore;

/// The model side of a store with master weights.
#[derive(Debug)]
pub(crate) struct Master {
    /// The model's variables (f16 or bf16), in store order.
    pub(crate) model: Vec<Tensor>,
    /// Their kind.
    pub(crate) kind: Kind,
}

impl Master {
    fn pointers(&self, mask: Option<&[bool]>) -> Vec<*mut C_tensor> {
        self.model
            .iter()
            .enumerate()
            .filter(|(i, _)| mask.is_none_or(|m| m[*i]))
            .map(|(_, t)| raw(t))
            .collect()
    }
}

impl TchStore {
    /// Keeps an f32 copy of θ ("master weights") for a model whose
    /// variables are f16 or bf16, and steps that copy instead of the
    /// variables.
    ///
    /// Without it a half-precision store rounds every update back to the
    /// variables' kind, and an update smaller than half the weight's ulp (in
    /// bf16, 2⁻⁸ of its magnitude) is lost: late in training, with a small
    /// learning rate, most are. With it:
    ///
    /// - the base optimiser, δ (ascent and projection) and every buffer work
    ///   in f32 on the master copy ([`TchStore::kind`] becomes `Float`, and
    ///   [`ParamStore::dtype`](amp_core::ParamStore::dtype) `F32`), on the CPU loop path when the tensors
    ///   are on the CPU;
    /// - every operation that writes θ or θ + δ also writes the model's
    ///   variables, rounded to their kind, so the model's forward pass sees
    ///   the current weights in its own precision (θ + δ on perturbed
    ///   passes, θ between steps);
    /// - the closure computes with the model's variables
    ///   ([`TchStore::tensors`] returns them) and calls `backward()` as
    ///   usual; after each closure call the store moves the gradients that
    ///   autograd left on the variables into the master copy's gradients,
    ///   widened to f32
    ///   ([`ParamStore::collect_grads`](amp_core::ParamStore::collect_grads),
    ///   which also runs first thing in
    ///   [`clip_grads_to_norm`](amp_core::ParamStore::clip_grads_to_norm)
    ///   and [`LossScale::unscale_grads`](amp_core::LossScale::unscale_grads),
    ///   so that both work inside the closure as on any store). A gradient
    ///   set by hand with [`TchStore::set_grad`] or
    ///   [`ParamStore::write`](amp_core::ParamStore::write) is an f32 one,
    ///   set on the master copy; a model gradient of the same tensor is
    ///   added to it;
    /// - [`ParamStore::read`](amp_core::ParamStore::read) and [`ParamStore::write`](amp_core::ParamStore::write) of the parameters
    ///   (and so checkpoints) see the master copy
    ///   ([`TchStore::master_tensors`]).
    ///
    /// Memory: one f32 copy of the parameters and of their gradients (4 + 4
    /// bytes per parameter), and AMP's and the base optimiser's buffers in
    /// f32 instead of the variables' kind (twice the size: with SGD momentum
    /// and copy-restore at K = 1, 8 bytes per parameter instead of 4).
    ///
    /// Call it before the store is handed to an optimiser (no buffer may
    /// exist yet) and instead of [`TchStore::flatten`] (the two do not
    /// combine); gradients already held are dropped. Refused
    /// ([`AmpError::InvalidConfig`]) for variables that are not f16 or bf16.
    ///
    /// ```
    /// use amp_core::ParamStore;
    /// use amp_tch::TchStore;
    /// use amp_tch::tch::{Device, Kind, Tensor};
    ///
    /// let w = Tensor::ones([3], (Kind::BFloat16, Device::Cpu)).set_requires_grad(true);
    /// let store = TchStore::from_tensors(vec![w])?.with_master_weights()?;
    /// assert_eq!(store.kind(), Kind::Float);
    /// assert_eq!(store.model_kind(), Kind::BFloat16);
    /// assert_eq!(store.dtype(), amp_core::DType::F32);
    /// assert_eq!(store.tensors()[0].kind(), Kind::BFloat16); // the model's
    /// # Ok::<(), amp_core::AmpError>(())
    /// ```
    pub fn with_master_weights(mut self) -> Result<Self> {
        if self.master.is_some() {
            return Ok(self);
        }
        if !matches!(self.kind, Kind::Half | Kind::BFloat16) {
            return Err(AmpError::config(
                "master_weights",
                format!(
                    "master weights are for f16 and bf16 tensors, these are {:?}",
                    self.kind
                ),
            ));
        }
        if !self.buffers.is_empty() {
            return Err(AmpError::config(
                "master_weights",
                "the store already holds buffers: keep master weights before building the \
                 optimiser",
            ));
        }
        if self.flat.is_some() {
            return Err(AmpError::config(
                "master_weights",
                "a flattened store cannot keep master weights",
            ));
        }
        let copies = self
            .params
            .iter()
            .map(|t| {
                t.f_detach()
                    .and_then(|t| t.f_to_kind(Kind::Float))
                    .and_then(|t| t.f_contiguous())
                    .and_then(|t| t.f_set_requires_grad(true))
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(tch_error)?;
        let model = std::mem::replace(&mut self.params, copies);
        self.master = Some(Master {
            model,
            kind: self.kind,
        });
        self.kind = Kind::Float;
        self.dtype = DType::F32;
        self.reset_model_grads()?;
        Ok(self)
    }

    /// Whether the store keeps master weights
    /// ([`TchStore::with_master_weights`]).
    pub fn has_master_weights(&self) -> bool {
        self.master.is_some()
    }

    /// The kind of the model's variables: [`TchStore::kind`], or the half
    /// kind of a store with master weights.
    pub fn model_kind(&self) -> Kind {
        self.master.as_ref().map_or(self.kind, |m| m.kind)
    }

    /// The tensors the optimiser steps: the f32 master copies of a store
    /// with master weights (they are no model's variables), else the same
    /// as [`TchStore::tensors`].
    pub fn master_tensors(&self) -> &[Tensor] {
        &self.params
    }

    /// After an operation that wrote `dst` over `mask` (whatever it
    /// returned): with master weights and `dst` the parameters, the model's
    /// variables get the master copy's values, rounded to their kind.
    /// `result` is returned unless it is `Ok` and the write fails.
    pub(crate) fn mirror(&self, dst: Slot, mask: &[bool], result: Result<()>) -> Result<()> {
        let Some(master) = &self.master else {
            return result;
        };
        if dst != Slot::Params {
            return result;
        }
        let model = master.pointers(Some(mask));
        let (copies, _) = self.pointers(Slot::Params, mask, false)?;
        // SAFETY: both lists have model.len() entries; the tensors outlive
        // the call.
        let written = check(unsafe {
            ffi::amp_tch_copy(
                model.as_ptr(),
                TensorView::Plain,
                copies.as_ptr(),
                TensorView::Plain,
                model.len(),
            )
        });
        result.and(written)
    }

    /// `zero_grads` of the model's variables (with master weights).
    pub(crate) fn reset_model_grads(&self) -> Result<()> {
        let Some(master) = &self.master else {
            return Ok(());
        };
        let model = master.pointers(None);
        // SAFETY: the variables outlive the call.
        check(unsafe { ffi::amp_tch_reset_grads(model.as_ptr(), model.len()) })
    }

    /// `collect_grads`: the gradients autograd left on the model's
    /// variables, widened and added into the master copy's gradients (zero
    /// where missing), then dropped from the variables, so that a second
    /// call finds nothing to add.
    pub(crate) fn widen_model_grads(&mut self) -> Result<()> {
        let Some(master) = &self.master else {
            return Ok(());
        };
        let model = master.pointers(None);
        let mut present = vec![0u8; model.len()];
        // SAFETY: `present` has one byte per pointer; the variables outlive
        // the call.
        check(unsafe {
            ffi::amp_tch_grad_mask(model.as_ptr(), model.len(), present.as_mut_ptr())
        })?;
        let from_model: Vec<bool> = present.into_iter().map(|b| b != 0).collect();
        let held = amp_core::ParamStore::grad_mask(&*self)?;
        // Where the copy has no gradient yet (the usual case: `zero_grads`
        // dropped it), the widened model gradient becomes it: one cast, no
        // zero fill and no mixed-dtype add.
        for index in (0..from_model.len()).filter(|&i| from_model[i] && !held[i]) {
            let model_grad = master.model[index].grad();
            let widened = tch::no_grad(|| model_grad.f_to_kind(Kind::Float))
                .and_then(|g| g.f_contiguous())
                .map_err(tch_error)?;
            self.attach_grad(index, &widened)?;
        }
        // Where it has one (set by hand, or collected earlier in the pass),
        // the model's is added to it.
        let adding: Vec<bool> = (0..from_model.len())
            .map(|i| from_model[i] && held[i])
            .collect();
        let (dst, dst_view) = self.pointers(Slot::Grads, &adding, true)?;
        if !dst.is_empty() {
            let src = master.pointers(Some(&adding));
            let ones = vec![1.0f64; dst.len()];
            // SAFETY: all three lists have dst.len() entries; the tensors
            // outlive the call.
            check(unsafe {
                ffi::amp_tch_axpy(
                    dst.as_ptr(),
                    dst_view,
                    src.as_ptr(),
                    TensorView::GradRead,
                    ones.as_ptr(),
                    dst.len(),
                )
            })?;
        }
        let src = master.pointers(Some(&from_model));
        // SAFETY: the variables outlive the call.
        check(unsafe { ffi::amp_tch_reset_grads(src.as_ptr(), src.len()) })
    }
}
