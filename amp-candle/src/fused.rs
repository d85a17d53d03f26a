//! The fused operations of the store contract,
//! [`ParamStore::axpy_from`], [`ParamStore::perturb_from_grads`],
//! [`ParamStore::sgd_update`] and [`ParamStore::adam_update`], for
//! stores that write in place (CPU, `f32` and `f64`): each in fewer passes
//! over memory than the composed sequences of [`amp_core::composed`],
//! with their bits (the conformance suite's `fused_ops_match_composed`
//! compares them). Elsewhere the store runs the composed sequences.

use amp_core::composed::{
    check_adam_update, check_axpy_from_slots, check_perturb_slots, check_sgd_update,
};
use amp_core::{
    check_len, AdamCoefficients, AdamSlots, ParamStore, Result, SgdCoefficients, SgdMomentum, Slot,
};
use candle_core::DType as CDType;

use crate::in_place::{
    AdamFirst, AdamMax, AdamSecond, AdamTheta, Ascend, Axpy, AxpyFrom, SgdBuffer, SgdDecayed,
    SgdDecayedSelf, SgdNesterov, SgdStep,
};
use crate::targets::Batch;
use crate::{backend, cast, CandleNorms, CandleStore};

impl CandleStore {
    /// `dst ← base + alpha · src` in one pass per tensor (a copy and an
    /// axpy otherwise). `false` when the store does not write in place or
    /// `base` is `dst` (plain `axpy`): the caller runs the composed
    /// sequence. Tensors that cannot be written in place (empty ones) go
    /// through that sequence on their own.
    pub(crate) fn fused_axpy_from(
        &mut self,
        dst: Slot,
        base: Slot,
        alpha: &[f64],
        src: Slot,
        mask: &[bool],
    ) -> Result<bool> {
        if !self.writes_in_place() || base == dst {
            return Ok(false);
        }
        self.check_mask(mask)?;
        check_len("axpy coefficients", mask.len(), alpha.len())?;
        check_axpy_from_slots(dst, src)?;
        for slot in [dst, base, src] {
            self.check_slot(slot)?;
        }
        let mut batch = Batch::with_capacity(mask.len());
        for index in (0..mask.len()).filter(|&i| mask[i]) {
            match self.in_place_target(dst, index)? {
                Some(target) => {
                    let (b, s) = (self.source(base, index)?, self.source(src, index)?);
                    let op = AxpyFrom(alpha[index]);
                    batch.push(target.elem_count(), move || target.inplace_op3(&b, &s, &op));
                }
                None => {
                    let only: Vec<bool> = (0..mask.len()).map(|i| i == index).collect();
                    amp_core::composed::axpy_from(self, dst, base, alpha, src, &only)?;
                }
            }
        }
        batch.run()?;
        Ok(true)
    }

    /// AMP's first ascent step: the snapshot copied, the norms of
    /// `v = inner_lr · g` read from the gradients' memory, and
    /// `θ ← θ + c · v` in one pass per tensor — the gradients are only
    /// read (where the composed sequence scales and clips them in place
    /// first). `None` when the store does not write in place, without a
    /// snapshot (which puts θ back should a kernel fail), when δ is to be
    /// kept, or when a gradient is not contiguous: the caller runs the
    /// composed sequence. Everything is checked, and the norms computed,
    /// before anything is written.
    pub(crate) fn fused_perturb(
        &mut self,
        snapshot: Option<Slot>,
        delta: Option<Slot>,
        inner_lr: &[f64],
        epsilon: &[f64],
        mask: &[bool],
    ) -> Result<Option<CandleNorms>> {
        let (Some(snapshot), None, true) = (snapshot, delta, self.writes_in_place()) else {
            return Ok(None);
        };
        let n = self.num_tensors();
        check_len("mask", n, mask.len())?;
        check_len("inner learning rates", n, inner_lr.len())?;
        check_len("maximum norms", n, epsilon.len())?;
        check_perturb_slots(Some(snapshot), delta)?;
        self.check_slot(snapshot)?;
        let Some(norms) = self.host_norms(Slot::Grads, mask, Some(inner_lr))? else {
            return Ok(None);
        };
        let c = cast(&self.coefficients(&norms, epsilon)?, CDType::F64)
            .and_then(|c| c.to_vec1::<f64>())
            .map_err(backend)?;
        self.copy(snapshot, Slot::Params, mask)?;
        let mut batch = Batch::with_capacity(n);
        for index in (0..n).filter(|&i| mask[i]) {
            // Empty vars have nothing to write.
            let Some(target) = self.in_place_target(Slot::Params, index)? else {
                continue;
            };
            let g = self.source(Slot::Grads, index)?;
            let op = Ascend {
                inner_lr: inner_lr[index],
                c: c[index],
            };
            batch.push(target.elem_count(), move || target.inplace_op2(&g, &op));
        }
        if let Err(error) = batch.run() {
            self.copy(Slot::Params, snapshot, mask)?;
            return Err(error);
        }
        Ok(Some(norms))
    }
}

/// The kernel that writes θ in the fused SGD step.
enum ThetaKernel {
    Nesterov(SgdNesterov),
    Decayed(SgdDecayed),
    DecayedSelf(SgdDecayedSelf),
    AxpyFrom(AxpyFrom),
    Axpy(Axpy),
}

impl CandleStore {
    /// [`ParamStore::sgd_update`] in place, the gradients only read: with
    /// momentum, the buffer in one pass ([`SgdBuffer`]) and then θ in one
    /// (Nesterov's update, or the buffer added to the weights), θ first
    /// given the weights' values when Nesterov's update reads them from a
    /// snapshot (candle's in-place kernels read at most two tensors);
    /// without momentum, θ in one pass. `false` when the store does not
    /// write in place: the caller runs the composed sequence. Tensors that
    /// cannot be written in place (empty ones) go through that sequence on
    /// their own.
    pub(crate) fn fused_sgd(
        &mut self,
        weights: Slot,
        momentum: Option<&SgdMomentum<f64>>,
        coefficients: &[SgdCoefficients<f64>],
        mask: &[bool],
    ) -> Result<bool> {
        if !self.writes_in_place() {
            return Ok(false);
        }
        let n = self.num_tensors();
        check_sgd_update(n, weights, momentum, coefficients, mask)?;
        self.check_slot(weights)?;
        let buffer = momentum.map(|m| m.buffer);
        if let Some(buffer) = buffer {
            self.check_slot(buffer)?;
        }
        let mut fused = mask.to_vec();
        for index in (0..n).filter(|&i| mask[i]) {
            // The gradient is a source: the kernels read contiguous memory.
            let in_place = self.in_place_target(Slot::Params, index)?.is_some()
                && self.source(Slot::Grads, index)?.is_contiguous()
                && match buffer {
                    Some(b) => self.in_place_target(b, index)?.is_some(),
                    None => true,
                };
            if !in_place {
                fused[index] = false;
                let only: Vec<bool> = (0..n).map(|i| i == index).collect();
                amp_core::composed::sgd_update(self, weights, momentum, coefficients, &only)?;
            }
        }
        let op = |i: usize| SgdStep {
            weight_decay: coefficients[i].weight_decay,
            momentum: momentum.map_or(0.0, |m| m.momentum),
            keep: momentum.map_or(1.0, |m| m.keep),
            step: coefficients[i].step,
            first: coefficients[i].first,
        };
        let mut weights = weights;
        if let Some(buffer) = buffer {
            let mut batch = Batch::with_capacity(n);
            for index in (0..n).filter(|&i| fused[i]) {
                let target = self.source(buffer, index)?;
                let (g, w) = (
                    self.source(Slot::Grads, index)?,
                    self.source(weights, index)?,
                );
                let op = SgdBuffer(op(index));
                batch.push(target.elem_count(), move || target.inplace_op3(&g, &w, &op));
            }
            batch.run()?;
            if momentum.is_some_and(|m| m.nesterov) && weights != Slot::Params {
                self.copy(Slot::Params, weights, &fused)?;
                weights = Slot::Params;
            }
        }
        let nesterov = momentum.is_some_and(|m| m.nesterov);
        let mut batch = Batch::with_capacity(n);
        for index in (0..n).filter(|&i| fused[i]) {
            let theta = self.source(Slot::Params, index)?;
            let from_self = weights == Slot::Params;
            let (kernel, x, y) = match buffer {
                Some(b) => {
                    let b = self.source(b, index)?;
                    if nesterov {
                        let g = self.source(Slot::Grads, index)?;
                        (ThetaKernel::Nesterov(SgdNesterov(op(index))), g, Some(b))
                    } else if from_self {
                        (ThetaKernel::Axpy(Axpy(coefficients[index].step)), b, None)
                    } else {
                        let w = self.source(weights, index)?;
                        let kernel = ThetaKernel::AxpyFrom(AxpyFrom(coefficients[index].step));
                        (kernel, w, Some(b))
                    }
                }
                None => {
                    let g = self.source(Slot::Grads, index)?;
                    let step = coefficients[index].step;
                    match (coefficients[index].weight_decay != 0.0, from_self) {
                        (true, true) => {
                            (ThetaKernel::DecayedSelf(SgdDecayedSelf(op(index))), g, None)
                        }
                        (false, true) => (ThetaKernel::Axpy(Axpy(step)), g, None),
                        (decay, false) => {
                            let w = self.source(weights, index)?;
                            let kernel = match decay {
                                true => ThetaKernel::Decayed(SgdDecayed(op(index))),
                                false => ThetaKernel::AxpyFrom(AxpyFrom(step)),
                            };
                            (kernel, w, Some(g))
                        }
                    }
                }
            };
            batch.push(theta.elem_count(), move || match (&kernel, &y) {
                (ThetaKernel::Nesterov(op), Some(y)) => theta.inplace_op3(&x, y, op),
                (ThetaKernel::Decayed(op), Some(y)) => theta.inplace_op3(&x, y, op),
                (ThetaKernel::AxpyFrom(op), Some(y)) => theta.inplace_op3(&x, y, op),
                (ThetaKernel::DecayedSelf(op), _) => theta.inplace_op2(&x, op),
                (ThetaKernel::Axpy(op), _) => theta.inplace_op2(&x, op),
                _ => candle_core::bail!("amp-sgd: a kernel without its second source"),
            });
        }
        batch.run()?;
        Ok(true)
    }
}

impl CandleStore {
    /// [`ParamStore::adam_update`] in place, the gradients only read: m in
    /// one pass ([`AdamFirst`]), v in one ([`AdamSecond`]), AMSGrad's
    /// maximum in one ([`AdamMax`]), then θ in one ([`AdamTheta`]); the
    /// moments read θ before its pass shrinks it. `false` when the store
    /// does not write in place: the caller runs the composed sequence.
    /// Tensors that cannot be written in place (empty ones) go through that
    /// sequence on their own.
    pub(crate) fn fused_adam(
        &mut self,
        slots: AdamSlots,
        coefficients: &[AdamCoefficients<f64>],
        mask: &[bool],
    ) -> Result<bool> {
        if !self.writes_in_place() {
            return Ok(false);
        }
        let n = self.num_tensors();
        check_adam_update(n, slots, coefficients, mask)?;
        let moments = [slots.exp_avg, slots.exp_avg_sq];
        let written: Vec<Slot> = moments.into_iter().chain(slots.max_exp_avg_sq).collect();
        for &slot in &written {
            self.check_slot(slot)?;
        }
        let mut fused = mask.to_vec();
        for index in (0..n).filter(|&i| mask[i]) {
            let mut in_place = self.in_place_target(Slot::Params, index)?.is_some()
                && self.source(Slot::Grads, index)?.is_contiguous();
            for &slot in &written {
                in_place = in_place && self.in_place_target(slot, index)?.is_some();
            }
            if !in_place {
                fused[index] = false;
                let only: Vec<bool> = (0..n).map(|i| i == index).collect();
                amp_core::composed::adam_update(self, slots, coefficients, &only)?;
            }
        }
        let op = |i: usize| coefficients[i];
        let indices: Vec<usize> = (0..n).filter(|&i| fused[i]).collect();
        for (slot, second) in [(slots.exp_avg, false), (slots.exp_avg_sq, true)] {
            let mut batch = Batch::with_capacity(n);
            for &index in &indices {
                let target = self.source(slot, index)?;
                let g = self.source(Slot::Grads, index)?;
                let theta = self.source(Slot::Params, index)?;
                let op = op(index);
                batch.push(target.elem_count(), move || match second {
                    false => target.inplace_op3(&g, &theta, &AdamFirst(op)),
                    true => target.inplace_op3(&g, &theta, &AdamSecond(op)),
                });
            }
            batch.run()?;
        }
        if let Some(max) = slots.max_exp_avg_sq {
            let mut batch = Batch::with_capacity(n);
            for &index in &indices {
                let (target, v) = (
                    self.source(max, index)?,
                    self.source(slots.exp_avg_sq, index)?,
                );
                batch.push(target.elem_count(), move || {
                    target.inplace_op2(&v, &AdamMax)
                });
            }
            batch.run()?;
        }
        let den = slots.max_exp_avg_sq.unwrap_or(slots.exp_avg_sq);
        let mut batch = Batch::with_capacity(n);
        for &index in &indices {
            let theta = self.source(Slot::Params, index)?;
            let (m, d) = (self.source(slots.exp_avg, index)?, self.source(den, index)?);
            let op = AdamTheta(op(index));
            batch.push(theta.elem_count(), move || theta.inplace_op3(&m, &d, &op));
        }
        batch.run()?;
        Ok(true)
    }
}
