//! Two fused operations of the store contract,
//! [`ParamStore::axpy_from`] and [`ParamStore::perturb_from_grads`], for
//! stores that write in place (CPU, `f32` and `f64`): each in fewer passes
//! over memory than the composed sequences of [`amp_core::composed`],
//! with their bits (the conformance suite's `fused_ops_match_composed`
//! compares them). Elsewhere the store runs the composed sequences.

use amp_core::composed::{check_axpy_from_slots, check_perturb_slots};
use amp_core::{check_len, ParamStore, Result, Slot};
use candle_core::DType as CDType;

use crate::in_place::{Ascend, AscendSaving, AxpyFrom};
use crate::views::{contiguous, shares_storage};
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
        let mut batch = self.batch(mask.len());
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

    /// AMP's first ascent step: the norms of `v = inner_lr · g` read from
    /// the gradients' memory, then the snapshot `s ← θ` and `θ ← θ + c · v`
    /// in one pass per tensor ([`AscendSaving`], each tensor's job finding
    /// and checking its own tensors: [`CandleStore::each`]); where the
    /// snapshot cannot be written in place yet (the first step), it is
    /// copied and θ then ascends on its own — the gradients are only
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
        let (params, grads) = (self.view(Slot::Params)?, self.view(Slot::Grads)?);
        let snapshots = self.view(snapshot)?;
        let ascend = |index: usize| Ascend {
            inner_lr: inner_lr[index],
            c: c[index],
        };
        let indices: Vec<usize> = (0..n).filter(|&i| mask[i]).collect();
        // θ and its snapshot in one pass where the snapshot can be written
        // in place (from the second step on): `true` for those.
        let ran = self.each(&indices, |index| -> candle_core::Result<bool> {
            let (Some(theta), Some(g)) = (contiguous(params.get(index)), grads.get(index)) else {
                return Ok(false);
            };
            let saving =
                contiguous(snapshots.get(index)).filter(|s| !shares_storage(s, [theta, g]));
            let Some(snapshot) = saving else {
                return Ok(false);
            };
            let op = AscendSaving {
                ascend: ascend(index),
                snapshot,
            };
            theta.inplace_op2(g, &op).map(|()| true)
        });
        // Which tensors' snapshots hold θ: on failure, those go back (a
        // kernel that fails has written nothing).
        let mut saved = vec![false; n];
        let mut failure = None;
        for (&index, ran) in indices.iter().zip(ran) {
            match ran {
                Ok(ran) => saved[index] = ran,
                Err(error) => failure = failure.or(Some(backend(error))),
            }
        }
        // The others: the snapshot copied, then θ ascends on its own.
        let rest: Vec<usize> = indices.into_iter().filter(|&i| !saved[i]).collect();
        if failure.is_none() && !rest.is_empty() {
            let mut copied = vec![false; n];
            rest.iter().for_each(|&i| copied[i] = true);
            match self.copy(snapshot, Slot::Params, &copied) {
                Ok(()) => rest.iter().for_each(|&i| saved[i] = true),
                Err(error) => failure = Some(error),
            }
        }
        if failure.is_none() && !rest.is_empty() {
            let (params, grads) = (self.view(Slot::Params)?, self.view(Slot::Grads)?);
            let ran = self.each(&rest, |index| -> Result<()> {
                // Empty vars have nothing to write.
                let Some(theta) = contiguous(params.get(index)) else {
                    return Ok(());
                };
                let zeros;
                let g = match grads.get(index) {
                    Some(g) => g,
                    None => {
                        zeros = self.value(Slot::Grads, index)?;
                        &zeros
                    }
                };
                theta.inplace_op2(g, &ascend(index)).map_err(backend)
            });
            failure = ran.into_iter().find_map(Result::err);
        }
        if let Some(error) = failure {
            self.copy(Slot::Params, snapshot, &saved)?;
            return Err(error);
        }
        Ok(Some(norms))
    }
}
