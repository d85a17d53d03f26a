//! The [`ParamStore`] operations of [`TchStore`]: each batched operation is
//! one call into the shim (`shim/ops.cpp`), which picks the CPU loop path or
//! ATen's multi-tensor operators from the tensors as they are at that call.

use std::ffi::c_int;

use amp_core::{
    check_len, check_shape, AdamCoefficients, AdamSlots, AmpError, BufferId, DType, HostTensor,
    ParamStore, Result, SgdCoefficients, SgdMomentum, Slot, PROJECTION_GUARD,
};
use tch::{Kind, Tensor};
use torch_sys::C_tensor;

use crate::ffi::{self, check, raw, take_tensor};
use crate::kinds::{host_to_tensor, tch_error};
use crate::{TchNorms, TchStore};

/// Coefficients of the masked-in tensors.
fn masked(values: &[f64], mask: &[bool]) -> Vec<f64> {
    values
        .iter()
        .zip(mask)
        .filter(|(_, &m)| m)
        .map(|(&v, _)| v)
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

impl TchStore {
    fn check_mask(&self, mask: &[bool]) -> Result<()> {
        check_len("mask", self.params.len(), mask.len())
    }

    /// The norms of the `count` tensors of `mask`, in store order: all of
    /// `norms` when it was computed over `mask`, else the entries selected.
    fn norm_values(&self, norms: &TchNorms, mask: &[bool], count: usize) -> Result<Tensor> {
        if norms.mask == mask {
            return Ok(norms.values.shallow_clone());
        }
        let mut position = 0i64;
        let mut positions = Vec::with_capacity(count);
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
        norms.values.f_index_select(0, &index).map_err(tch_error)
    }

    /// `addcdiv_sqrt` on the CPU loop path (`shim/adam.cpp`): `Ok(false)`,
    /// nothing written, where a tensor does not qualify or `dst` is the
    /// gradient slot.
    #[allow(clippy::too_many_arguments)]
    fn addcdiv_sqrt_loop(
        &self,
        dst: Slot,
        alpha: &[f64],
        num: Slot,
        den: Slot,
        divisor: &[f64],
        eps: &[f64],
        mask: &[bool],
    ) -> Result<bool> {
        self.check_mask(mask)?;
        amp_core::composed::check_addcdiv_sqrt(mask.len(), dst, (alpha, divisor, eps), num, den)?;
        if dst == Slot::Grads {
            return Ok(false);
        }
        let (d, dv) = self.pointers(dst, mask, true)?;
        let (x, xv) = self.pointers(num, mask, false)?;
        let (y, yv) = self.pointers(den, mask, false)?;
        let c: Vec<ffi::AddcdivTensor> = (0..mask.len())
            .filter(|&i| mask[i])
            .map(|i| ffi::AddcdivTensor {
                alpha: alpha[i],
                divisor: divisor[i],
                eps: eps[i],
            })
            .collect();
        let mut handled: c_int = 0;
        // SAFETY: every list (and `c`) has d.len() entries; the tensors
        // outlive the call.
        check(unsafe {
            ffi::amp_tch_addcdiv_sqrt(
                d.as_ptr(),
                dv,
                x.as_ptr(),
                xv,
                y.as_ptr(),
                yv,
                d.len(),
                c.as_ptr(),
                &mut handled,
            )
        })?;
        Ok(handled != 0)
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
        crate::kinds::shape_of(&self.params[index])
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn zero_grads(&mut self) -> Result<()> {
        self.reset_model_grads()?;
        let params = self.all_params();
        if let Some(flat) = self.flat.as_mut() {
            return flat.zero(&params);
        }
        // SAFETY: the parameters outlive the call.
        check(unsafe { ffi::amp_tch_reset_grads(params.as_ptr(), params.len()) })
    }

    fn grad_mask(&self) -> Result<Vec<bool>> {
        let params = self.all_params();
        if let Some(flat) = &self.flat {
            return flat.grad_mask(&params);
        }
        let mut out = vec![0u8; params.len()];
        // SAFETY: `out` has one byte per pointer; the parameters outlive the call.
        check(unsafe { ffi::amp_tch_grad_mask(params.as_ptr(), params.len(), out.as_mut_ptr()) })?;
        Ok(out.into_iter().map(|b| b != 0).collect())
    }

    /// With master weights: the gradients autograd left on the model's
    /// half-precision variables, widened and added into the master copy's;
    /// the variables' own are dropped. Otherwise nothing (they are where
    /// `backward()` put them).
    fn collect_grads(&mut self) -> Result<()> {
        self.widen_model_grads()
    }

    fn alloc_buffer(&mut self) -> Result<BufferId> {
        let params = self.all_params();
        let mut out = vec![std::ptr::null_mut::<C_tensor>(); params.len()];
        // SAFETY: `out` has one slot per pointer; the shim fills every slot on
        // success and none on failure.
        let status =
            unsafe { ffi::amp_tch_alloc_like(params.as_ptr(), params.len(), out.as_mut_ptr()) };
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
        Ok(self.buffers.insert(buffer))
    }

    fn free_buffer(&mut self, id: BufferId) -> Result<()> {
        self.buffers.remove(id).map(drop)
    }

    fn pin_buffer(&mut self, id: BufferId, pinned: bool) -> Result<()> {
        self.buffers.set_pinned(id, pinned)
    }

    fn copy(&mut self, dst: Slot, src: Slot, mask: &[bool]) -> Result<()> {
        self.check_mask(mask)?;
        check_distinct(dst, src)?;
        let (d, dv) = self.pointers(dst, mask, true)?;
        let (s, sv) = self.pointers(src, mask, false)?;
        // SAFETY: both lists have d.len() entries; the tensors outlive the call.
        let done = check(unsafe { ffi::amp_tch_copy(d.as_ptr(), dv, s.as_ptr(), sv, d.len()) });
        self.mirror(dst, mask, done)
    }

    fn scale(&mut self, dst: Slot, factor: &[f64], mask: &[bool]) -> Result<()> {
        self.check_mask(mask)?;
        check_len("scale factors", mask.len(), factor.len())?;
        // A factor of exactly 1 changes nothing: skip those tensors.
        let active: Vec<bool> = mask
            .iter()
            .zip(factor)
            .map(|(&m, &f)| m && f != 1.0)
            .collect();
        let f = masked(factor, &active);
        let (d, dv) = self.pointers(dst, &active, true)?;
        // SAFETY: `f` has d.len() entries; the tensors outlive the call.
        let done = check(unsafe { ffi::amp_tch_scale(d.as_ptr(), dv, f.as_ptr(), d.len()) });
        self.mirror(dst, &active, done)
    }

    fn axpy(&mut self, dst: Slot, alpha: &[f64], src: Slot, mask: &[bool]) -> Result<()> {
        self.check_mask(mask)?;
        check_len("axpy coefficients", mask.len(), alpha.len())?;
        check_distinct(dst, src)?;
        let a = masked(alpha, mask);
        let (d, dv) = self.pointers(dst, mask, true)?;
        let (s, sv) = self.pointers(src, mask, false)?;
        // SAFETY: all three lists have d.len() entries; the tensors outlive the call.
        let done = check(unsafe {
            ffi::amp_tch_axpy(d.as_ptr(), dv, s.as_ptr(), sv, a.as_ptr(), d.len())
        });
        self.mirror(dst, mask, done)
    }

    fn addcmul(&mut self, dst: Slot, alpha: &[f64], a: Slot, b: Slot, mask: &[bool]) -> Result<()> {
        let done = self.addcmul_each(dst, alpha, a, b, mask);
        self.mirror(dst, mask, done)
    }

    fn addcdiv_sqrt(
        &mut self,
        dst: Slot,
        alpha: &[f64],
        num: Slot,
        den: Slot,
        divisor: &[f64],
        eps: &[f64],
        mask: &[bool],
    ) -> Result<()> {
        // The loop path (dense f32/f64 CPU tensors; not into gradients,
        // whose absent ones `addcdiv_sqrt_each` leaves absent), else ATen.
        let done = match self.addcdiv_sqrt_loop(dst, alpha, num, den, divisor, eps, mask) {
            Ok(true) => Ok(()),
            Ok(false) => self.addcdiv_sqrt_each(dst, alpha, num, den, divisor, eps, mask),
            Err(e) => Err(e),
        };
        self.mirror(dst, mask, done)
    }

    fn maximum(&mut self, dst: Slot, src: Slot, mask: &[bool]) -> Result<()> {
        let done = self.maximum_each(dst, src, mask);
        self.mirror(dst, mask, done)
    }

    /// One pass on the CPU loop path (dense f32/f64 tensors); elsewhere a
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
        let a = masked(alpha, mask);
        let (d, dv) = self.pointers(dst, mask, true)?;
        let (b, bv) = self.pointers(base, mask, false)?;
        let (s, sv) = self.pointers(src, mask, false)?;
        // SAFETY: all four lists have d.len() entries; the tensors outlive the call.
        let done = check(unsafe {
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
        });
        self.mirror(dst, mask, done)
    }

    /// One pass over θ, g and the momentum buffer (and the weights read) on
    /// the CPU loop path (dense f32/f64 tensors), `shim/sgd.cpp`; elsewhere
    /// (CUDA, half precision, strided tensors) the composed sequence,
    /// [`amp_core::composed::sgd_update`].
    fn sgd_update(
        &mut self,
        weights: Slot,
        momentum: Option<&SgdMomentum<f64>>,
        coefficients: &[SgdCoefficients<f64>],
        mask: &[bool],
    ) -> Result<()> {
        let n = self.params.len();
        amp_core::composed::check_sgd_update(n, weights, momentum, coefficients, mask)?;
        let (p, _) = self.pointers(Slot::Params, mask, true)?;
        if p.is_empty() {
            return Ok(());
        }
        let (w, _) = self.pointers(weights, mask, false)?;
        let (g, gv) = self.pointers(Slot::Grads, mask, false)?;
        let b = momentum
            .map(|m| self.pointers(m.buffer, mask, true).map(|(b, _)| b))
            .transpose()?;
        let c: Vec<ffi::SgdTensor> = coefficients
            .iter()
            .zip(mask)
            .filter(|(_, &m)| m)
            .map(|(c, _)| ffi::SgdTensor {
                weight_decay: c.weight_decay,
                step: c.step,
                first: f64::from(u8::from(c.first)),
            })
            .collect();
        let (mu, keep, nesterov) =
            momentum.map_or((0.0, 1.0, false), |m| (m.momentum, m.keep, m.nesterov));
        let mut handled: c_int = 0;
        // SAFETY: every list (and `c`) has p.len() entries, `b` is NULL or
        // such a list; the tensors outlive the call.
        check(unsafe {
            ffi::amp_tch_sgd(
                p.as_ptr(),
                w.as_ptr(),
                g.as_ptr(),
                gv,
                b.as_ref().map_or(std::ptr::null(), |v| v.as_ptr()),
                p.len(),
                c.as_ptr(),
                mu,
                keep,
                c_int::from(nesterov),
                &mut handled,
            )
        })?;
        if handled == 0 {
            // The composed sequence's own writes of θ mirror it.
            return amp_core::composed::sgd_update(self, weights, momentum, coefficients, mask);
        }
        self.mirror(Slot::Params, mask, Ok(()))
    }

    /// One pass over θ, g and the moments on the CPU loop path (dense
    /// f32/f64 tensors), `shim/adam.cpp`; elsewhere (CUDA, half precision,
    /// strided tensors) the composed sequence,
    /// [`amp_core::composed::adam_update`].
    fn adam_update(
        &mut self,
        slots: AdamSlots,
        coefficients: &[AdamCoefficients<f64>],
        mask: &[bool],
    ) -> Result<()> {
        amp_core::composed::check_adam_update(self.params.len(), slots, coefficients, mask)?;
        let (p, _) = self.pointers(Slot::Params, mask, true)?;
        if p.is_empty() {
            return Ok(());
        }
        let (g, gv) = self.pointers(Slot::Grads, mask, false)?;
        let (m, _) = self.pointers(slots.exp_avg, mask, true)?;
        let (v, _) = self.pointers(slots.exp_avg_sq, mask, true)?;
        let max = slots
            .max_exp_avg_sq
            .map(|slot| self.pointers(slot, mask, true).map(|(x, _)| x))
            .transpose()?;
        let c: Vec<ffi::AdamTensor> = coefficients
            .iter()
            .zip(mask)
            .filter(|(_, &m)| m)
            .map(|(c, _)| c.into())
            .collect();
        let mut handled: c_int = 0;
        // SAFETY: every list (and `c`) has p.len() entries, `max` is NULL or
        // such a list; the tensors outlive the call.
        check(unsafe {
            ffi::amp_tch_adam(
                p.as_ptr(),
                g.as_ptr(),
                gv,
                m.as_ptr(),
                v.as_ptr(),
                max.as_ref().map_or(std::ptr::null(), |x| x.as_ptr()),
                p.len(),
                c.as_ptr(),
                &mut handled,
            )
        })?;
        if handled == 0 {
            // The composed sequence's own writes of θ mirror it.
            return amp_core::composed::adam_update(self, slots, coefficients, mask);
        }
        self.mirror(Slot::Params, mask, Ok(()))
    }

    /// Fused on the CPU loop path (dense f32/f64 tensors): per tensor, one
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
        let (p, _) = self.pointers(Slot::Params, mask, true)?;
        let list = |slot: Option<Slot>| {
            slot.map(|slot| self.pointers(slot, mask, true).map(|(v, _)| v))
                .transpose()
        };
        let (snap, del) = (list(snapshot)?, list(delta)?);
        let (z, e) = (masked(inner_lr, mask), masked(epsilon, mask));
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
            // The composed sequence's own writes of θ mirror it.
            return amp_core::composed::perturb_from_grads(
                self, snapshot, delta, inner_lr, epsilon, mask,
            );
        }
        self.mirror(Slot::Params, mask, Ok(()))?;
        Ok(TchNorms {
            // SAFETY: freshly allocated by the shim.
            values: unsafe { take_tensor(out)? },
            mask: mask.to_vec(),
        })
    }

    fn norms(&mut self, src: Slot, mask: &[bool]) -> Result<TchNorms> {
        self.check_mask(mask)?;
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
        let limits = masked(max_norm, mask);
        let (d, dv) = self.pointers(dst, mask, true)?;
        if d.is_empty() {
            return Ok(());
        }
        let values = self.norm_values(norms, mask, d.len())?;
        // SAFETY: `limits` and `values` have d.len() entries; the tensors
        // outlive the call.
        let done = check(unsafe {
            ffi::amp_tch_clip(
                d.as_ptr(),
                dv,
                d.len(),
                raw(&values),
                limits.as_ptr(),
                PROJECTION_GUARD,
            )
        });
        self.mirror(dst, mask, done)
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
        check_shape(index, &self.shape(index)?, value.shape())?;
        let source = host_to_tensor(value, self.kind, self.device)?;
        match slot {
            Slot::Grads => match self.attached_grad(index)? {
                // Into the existing gradient (with the flat layout, its
                // place in the flat allocation).
                Some(existing) => {
                    tch::no_grad(|| existing.shallow_clone().f_copy_(&source)).map_err(tch_error)
                }
                None => self.attach_grad(index, &source),
            },
            Slot::Params => {
                let done = tch::no_grad(|| self.params[index].f_copy_(&source)).map_err(tch_error);
                let mut only = vec![false; self.params.len()];
                only[index] = true;
                self.mirror(Slot::Params, &only, done)
            }
            Slot::Buffer(id) => {
                let buffer = self.buffers.get_mut(id)?;
                tch::no_grad(|| buffer[index].f_copy_(&source)).map_err(tch_error)
            }
        }
    }
}
