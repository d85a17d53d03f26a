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
use crate::views::{contiguous, shares_storage, View};
use crate::{backend, CandleStore};

/// The kernel that writes θ in the fused SGD step without momentum, with
/// the weights it reads when they are not θ.
enum ThetaKernel<'a> {
    Decayed(SgdDecayed, &'a Tensor),
    AxpyFrom(AxpyFrom, &'a Tensor),
    DecayedSelf(SgdDecayedSelf),
    Axpy(Axpy),
}

impl ThetaKernel<'_> {
    /// Writes θ from the gradient `g`.
    fn run(&self, theta: &Tensor, g: &Tensor) -> candle_core::Result<()> {
        match self {
            ThetaKernel::Decayed(op, w) => theta.inplace_op3(w, g, op),
            ThetaKernel::AxpyFrom(op, w) => theta.inplace_op3(w, g, op),
            ThetaKernel::DecayedSelf(op) => theta.inplace_op2(g, op),
            ThetaKernel::Axpy(op) => theta.inplace_op2(g, op),
        }
    }
}

impl CandleStore {
    /// [`ParamStore::sgd_update`] in place, the gradients only read, one
    /// pass per tensor: with momentum, θ and the buffer together
    /// ([`SgdMomentumStep`]); without, θ alone. Each tensor's job finds its
    /// tensors and checks them itself ([`CandleStore::each`]). `false` when
    /// the store does not write in place: the caller runs the composed
    /// sequence. Tensors that cannot be written in place (empty ones, a
    /// missing gradient) go through that sequence after the others.
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
        let (params, grads) = (self.view(Slot::Params)?, self.view(Slot::Grads)?);
        let from = (weights != Slot::Params)
            .then(|| self.view(weights))
            .transpose()?;
        let buffers = momentum.map(|m| self.view(m.buffer)).transpose()?;
        let op = |i: usize| SgdStep {
            weight_decay: coefficients[i].weight_decay,
            momentum: momentum.map_or(0.0, |m| m.momentum),
            keep: momentum.map_or(1.0, |m| m.keep),
            step: coefficients[i].step,
            first: coefficients[i].first,
        };
        let indices: Vec<usize> = (0..n).filter(|&i| mask[i]).collect();
        let ran = self.each(&indices, |index| -> candle_core::Result<bool> {
            let theta = contiguous(params.get(index));
            let g = grads.get(index).filter(|g| g.is_contiguous());
            let w = from.map(|from| from.get(index));
            let (Some(theta), Some(g), None | Some(Some(_))) = (theta, g, w) else {
                return Ok(false);
            };
            let w = w.flatten();
            let Some(m) = momentum else {
                return theta_kernel(op(index), w).run(theta, g).map(|()| true);
            };
            let Some(buffer) = contiguous(buffers.and_then(|b| b.get(index))) else {
                return Ok(false);
            };
            // The buffer is written through an operation nested in θ's:
            // it must not share storage with what θ's operation holds (the
            // store never makes it so; checked all the same).
            if shares_storage(buffer, [theta, g].into_iter().chain(w)) {
                return Ok(false);
            }
            let op = SgdMomentumStep {
                step: op(index),
                nesterov: m.nesterov,
                buffer,
            };
            match w {
                Some(w) => theta.inplace_op3(g, w, &op),
                None => theta.inplace_op2(g, &op),
            }
            .map(|()| true)
        });
        let rest = self.leftovers(&indices, ran)?;
        if rest.contains(&true) {
            amp_core::composed::sgd_update(self, weights, momentum, coefficients, &rest)?;
        }
        Ok(true)
    }

    /// The mask of the tensors of `indices` whose job in
    /// [`CandleStore::each`] returned `false` (not run: the caller runs
    /// them another way); the first error of a job, if any.
    pub(crate) fn leftovers(
        &self,
        indices: &[usize],
        ran: Vec<candle_core::Result<bool>>,
    ) -> Result<Vec<bool>> {
        let mut rest = vec![false; self.num_tensors()];
        for (&index, ran) in indices.iter().zip(ran) {
            rest[index] = !ran.map_err(backend)?;
        }
        Ok(rest)
    }
}

/// The kernel that writes θ in the fused SGD step without momentum, from
/// the weights `w` when given (θ's own values otherwise).
fn theta_kernel(op: SgdStep, w: Option<&Tensor>) -> ThetaKernel<'_> {
    match (op.weight_decay != 0.0, w) {
        (true, None) => ThetaKernel::DecayedSelf(SgdDecayedSelf(op)),
        (false, None) => ThetaKernel::Axpy(Axpy(op.step)),
        (true, Some(w)) => ThetaKernel::Decayed(SgdDecayed(op), w),
        (false, Some(w)) => ThetaKernel::AxpyFrom(AxpyFrom(op.step), w),
    }
}

impl CandleStore {
    /// [`ParamStore::adam_update`] in place, the gradients only read: m in
    /// one pass ([`AdamFirst`]), v in one ([`AdamSecond`]), AMSGrad's
    /// maximum in one ([`AdamMax`]), then θ in one ([`AdamTheta`]); the
    /// moments read θ before its pass shrinks it. Each tensor's job finds
    /// its tensors itself ([`CandleStore::each`]); the first pass checks
    /// them. `false` when the store does not write in place: the caller
    /// runs the composed sequence. Tensors that cannot be written in place
    /// (empty ones, a missing gradient) go through that sequence after the
    /// others.
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
        let (params, grads) = (self.view(Slot::Params)?, self.view(Slot::Grads)?);
        let (m, v) = (self.view(slots.exp_avg)?, self.view(slots.exp_avg_sq)?);
        let max = slots.max_exp_avg_sq.map(|s| self.view(s)).transpose()?;
        let indices: Vec<usize> = (0..n).filter(|&i| mask[i]).collect();
        // m, for the tensors whose every operand the kernels can take.
        let ran = self.each(&indices, |index| -> candle_core::Result<bool> {
            let theta = contiguous(params.get(index));
            let g = grads.get(index).filter(|g| g.is_contiguous());
            let (first, second) = (contiguous(m.get(index)), contiguous(v.get(index)));
            let max_ok = max.is_none_or(|max| contiguous(max.get(index)).is_some());
            let (Some(theta), Some(g), Some(m), Some(_), true) = (theta, g, first, second, max_ok)
            else {
                return Ok(false);
            };
            m.inplace_op3(g, theta, &AdamFirst(coefficients[index]))
                .map(|()| true)
        });
        let rest = self.leftovers(&indices, ran)?;
        let fused: Vec<usize> = indices.into_iter().filter(|&i| !rest[i]).collect();
        // The later passes read the tensors the first one checked.
        let tensor = View::found;
        self.each_pass(&fused, |index| {
            let (theta, g) = (tensor(params, index)?, tensor(grads, index)?);
            tensor(v, index)?.inplace_op3(g, theta, &AdamSecond(coefficients[index]))
        })?;
        if let Some(max) = max {
            self.each_pass(&fused, |index| {
                tensor(max, index)?.inplace_op2(tensor(v, index)?, &AdamMax)
            })?;
        }
        let den = max.unwrap_or(v);
        self.each_pass(&fused, |index| {
            let (m, d) = (tensor(m, index)?, tensor(den, index)?);
            tensor(params, index)?.inplace_op3(m, d, &AdamTheta(coefficients[index]))
        })?;
        if rest.contains(&true) {
            amp_core::composed::adam_update(self, slots, coefficients, &rest)?;
        }
        Ok(true)
    }
}
