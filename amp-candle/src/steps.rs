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
    AdamFirst, AdamMax, AdamSecond, AdamTheta, Axpy, AxpyFrom, SgdDecayed, SgdDecayedSelf,
    SgdMomentumStep, SgdStep,
};
use crate::targets::Batch;
use crate::{same_storage, CandleStore};

/// The kernel that writes θ in the fused SGD step without momentum, with
/// the tensors it reads.
enum ThetaKernel {
    /// Reads the weights and g.
    Decayed(SgdDecayed, Tensor, Tensor),
    /// Reads the weights and g.
    AxpyFrom(AxpyFrom, Tensor, Tensor),
    /// Reads g.
    DecayedSelf(SgdDecayedSelf, Tensor),
    /// Reads g.
    Axpy(Axpy, Tensor),
}

impl ThetaKernel {
    fn run(&self, theta: &Tensor) -> candle_core::Result<()> {
        match self {
            ThetaKernel::Decayed(op, x, y) => theta.inplace_op3(x, y, op),
            ThetaKernel::AxpyFrom(op, x, y) => theta.inplace_op3(x, y, op),
            ThetaKernel::DecayedSelf(op, x) => theta.inplace_op2(x, op),
            ThetaKernel::Axpy(op, x) => theta.inplace_op2(x, op),
        }
    }
}

impl CandleStore {
    /// [`ParamStore::sgd_update`] in place, the gradients only read, one
    /// pass per tensor: with momentum, θ and the buffer together
    /// ([`SgdMomentumStep`]); without, θ alone. `false` when the store does not
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
        let written: Vec<Slot> = momentum.map(|m| m.buffer).into_iter().collect();
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
        let from_self = weights == Slot::Params;
        if let Some(m) = momentum {
            let mut batch = Batch::with_capacity(n);
            for index in (0..n).filter(|&i| fused[i]) {
                let theta = self.source(Slot::Params, index)?;
                let g = self.source(Slot::Grads, index)?;
                let w = match from_self {
                    true => None,
                    false => Some(self.source(weights, index)?),
                };
                let buffer = self.source(m.buffer, index)?;
                // The buffer is written through an operation nested in
                // θ's: it must not share storage with what θ's operation
                // holds (the store never makes it so; checked all the same).
                if [&theta, &g]
                    .into_iter()
                    .chain(&w)
                    .any(|t| same_storage(t, &buffer))
                {
                    let only: Vec<bool> = (0..n).map(|i| i == index).collect();
                    amp_core::composed::sgd_update(self, weights, momentum, coefficients, &only)?;
                    continue;
                }
                let op = SgdMomentumStep {
                    step: op(index),
                    nesterov: m.nesterov,
                    buffer,
                };
                batch.push(theta.elem_count(), move || match &w {
                    Some(w) => theta.inplace_op3(&g, w, &op),
                    None => theta.inplace_op2(&g, &op),
                });
            }
            return batch.run().map(|()| true);
        }
        let mut batch = Batch::with_capacity(n);
        for index in (0..n).filter(|&i| fused[i]) {
            let theta = self.source(Slot::Params, index)?;
            let step = coefficients[index].step;
            let g = self.source(Slot::Grads, index)?;
            let decay = coefficients[index].weight_decay != 0.0;
            let kernel = match (decay, from_self) {
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
