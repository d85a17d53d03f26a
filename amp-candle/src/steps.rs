//! The base optimisers' steps as single store operations,
//! [`ParamStore::sgd_update`] and [`ParamStore::adam_update`], for stores
//! that write in place (CPU, `f32` and `f64`): the kernels of
//! [`crate::in_place`] over θ, the optimiser's buffers and the gradient
//! (only read), with the bits of the composed sequences of
//! [`amp_core::composed`] (the conformance suite's
//! `fused_ops_match_composed` and `adam_update_matches_composed` compare
//! them). Elsewhere the store runs the composed sequences.

use amp_core::composed::{check_adam_update, check_sgd_update};
use amp_core::{
    AdamCoefficients, AdamSlots, ParamStore, Result, SgdCoefficients, SgdMomentum, Slot,
};
use candle_core::Tensor;

use crate::in_place::{
    AdamFirst, AdamMax, AdamSecond, AdamTheta, Axpy, AxpyFrom, SgdBuffer, SgdDecayed,
    SgdDecayedSelf, SgdNesterov, SgdStep,
};
use crate::targets::Batch;
use crate::CandleStore;

/// The kernel that writes θ in the fused SGD step, with the tensors it
/// reads.
enum ThetaKernel {
    /// Reads g and the buffer.
    Nesterov(SgdNesterov, Tensor, Tensor),
    /// Reads the weights and g.
    Decayed(SgdDecayed, Tensor, Tensor),
    /// Reads the weights and the update (g or the buffer).
    AxpyFrom(AxpyFrom, Tensor, Tensor),
    /// Reads g.
    DecayedSelf(SgdDecayedSelf, Tensor),
    /// Reads the update (g or the buffer).
    Axpy(Axpy, Tensor),
}

impl ThetaKernel {
    fn run(&self, theta: &Tensor) -> candle_core::Result<()> {
        match self {
            ThetaKernel::Nesterov(op, x, y) => theta.inplace_op3(x, y, op),
            ThetaKernel::Decayed(op, x, y) => theta.inplace_op3(x, y, op),
            ThetaKernel::AxpyFrom(op, x, y) => theta.inplace_op3(x, y, op),
            ThetaKernel::DecayedSelf(op, x) => theta.inplace_op2(x, op),
            ThetaKernel::Axpy(op, x) => theta.inplace_op2(x, op),
        }
    }
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
        let written: Vec<Slot> = buffer.into_iter().collect();
        let fused = self.split_fused(mask, &written, |store, only| {
            amp_core::composed::sgd_update(store, weights, momentum, coefficients, only)
        })?;
        let op = |i: usize| SgdStep {
            weight_decay: coefficients[i].weight_decay,
            momentum: momentum.map_or(0.0, |m| m.momentum),
            keep: momentum.map_or(1.0, |m| m.keep),
            step: coefficients[i].step,
            first: coefficients[i].first,
        };
        let nesterov = momentum.is_some_and(|m| m.nesterov);
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
            if nesterov && weights != Slot::Params {
                self.copy(Slot::Params, weights, &fused)?;
                weights = Slot::Params;
            }
        }
        let mut batch = Batch::with_capacity(n);
        for index in (0..n).filter(|&i| fused[i]) {
            let theta = self.source(Slot::Params, index)?;
            let from_self = weights == Slot::Params;
            let step = coefficients[index].step;
            let kernel = match buffer {
                Some(b) => {
                    let b = self.source(b, index)?;
                    if nesterov {
                        let g = self.source(Slot::Grads, index)?;
                        ThetaKernel::Nesterov(SgdNesterov(op(index)), g, b)
                    } else if from_self {
                        ThetaKernel::Axpy(Axpy(step), b)
                    } else {
                        ThetaKernel::AxpyFrom(AxpyFrom(step), self.source(weights, index)?, b)
                    }
                }
                None => {
                    let g = self.source(Slot::Grads, index)?;
                    let decay = coefficients[index].weight_decay != 0.0;
                    match (decay, from_self) {
                        (true, true) => ThetaKernel::DecayedSelf(SgdDecayedSelf(op(index)), g),
                        (false, true) => ThetaKernel::Axpy(Axpy(step), g),
                        (true, false) => {
                            let w = self.source(weights, index)?;
                            ThetaKernel::Decayed(SgdDecayed(op(index)), w, g)
                        }
                        (false, false) => {
                            let w = self.source(weights, index)?;
                            ThetaKernel::AxpyFrom(AxpyFrom(step), w, g)
                        }
                    }
                }
            };
            batch.push(theta.elem_count(), move || kernel.run(&theta));
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
        let fused = self.split_fused(mask, &written, |store, only| {
            amp_core::composed::adam_update(store, slots, coefficients, only)
        })?;
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

impl CandleStore {
    /// For a fused step that writes θ and the slots of `written` in place
    /// and reads the gradient: checks the slots, and returns the tensors of
    /// `mask` it can run on (θ and every written slot in-place targets, the
    /// gradient contiguous, as the kernels read contiguous memory). Each
    /// other tensor of `mask` runs `composed` here, alone (its mask selects
    /// that tensor only).
    fn split_fused(
        &mut self,
        mask: &[bool],
        written: &[Slot],
        mut composed: impl FnMut(&mut Self, &[bool]) -> Result<()>,
    ) -> Result<Vec<bool>> {
        for &slot in written {
            self.check_slot(slot)?;
        }
        let n = self.num_tensors();
        let mut fused = mask.to_vec();
        for index in (0..n).filter(|&i| mask[i]) {
            let mut in_place = self.in_place_target(Slot::Params, index)?.is_some()
                && self.source(Slot::Grads, index)?.is_contiguous();
            for &slot in written {
                in_place = in_place && self.in_place_target(slot, index)?.is_some();
            }
            if !in_place {
                fused[index] = false;
                let only: Vec<bool> = (0..n).map(|i| i == index).collect();
                composed(self, &only)?;
            }
        }
        Ok(fused)
    }
}
