//! Two fused operations of the store contract,
//! [`ParamStore::axpy_from`] and [`ParamStore::perturb_from_grads`], for
//! stores that write in place (CPU, `f32` and `f64`): each in fewer passes
//! over memory than the composed sequences of [`amp_core::composed`],
//! with their bits (the conformance suite's `fused_ops_match_composed`
//! compares them). Elsewhere the store runs the composed sequences.

use amp_core::composed::{check_axpy_from_slots, check_perturb_slots};
use amp_core::{check_len, ParamStore, Result, Slot};
use candle_core::DType as CDType;

use crate::in_place::{Ascend, AxpyFrom};
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
