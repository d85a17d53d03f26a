//! The two fused operations of the store contract,
//! [`ParamStore::axpy_from`](amp_core::ParamStore::axpy_from) and
//! [`ParamStore::perturb_from_grads`](amp_core::ParamStore::perturb_from_grads),
//! in fewer passes over memory than the composed sequences of
//! [`amp_core::composed`] and with their bits (the conformance suite's
//! `fused_ops_match_composed` compares them).

use amp_core::composed::{check_axpy_from_slots, check_perturb_slots};
use amp_core::{check_len, BufferId, Result, Slot, PROJECTION_GUARD};
use ndarray::ArrayD;

use crate::loops::{ascend, each3, sum_of_squares_of};
use crate::{Element, NdStore};

/// Whether `a` and `b` lie in memory in the same order, contiguously (so
/// that their slices in memory order pair their elements).
fn same_layout<T: Element>(a: &ArrayD<T>, b: &ArrayD<T>) -> bool {
    a.strides() == b.strides()
        && a.as_slice_memory_order().is_some()
        && b.as_slice_memory_order().is_some()
}

impl<T: Element> NdStore<T> {
    /// `dst ← base + alpha · src` in one pass per tensor (a copy and an
    /// axpy otherwise; just the axpy when `base` is `dst`).
    pub(crate) fn fused_axpy_from(
        &mut self,
        dst: Slot,
        base: Slot,
        alpha: &[T],
        src: Slot,
        mask: &[bool],
    ) -> Result<()> {
        check_len("mask", self.params.len(), mask.len())?;
        check_len("axpy coefficients", mask.len(), alpha.len())?;
        check_axpy_from_slots(dst, src)?;
        if base == dst {
            return amp_core::ParamStore::axpy(self, dst, alpha, src, mask);
        }
        self.slot(base)?;
        self.slot(src)?;
        self.with_taken(dst, |store, d| {
            let (b, s) = (store.slot(base)?, store.slot(src)?);
            for i in (0..mask.len()).filter(|&i| mask[i]) {
                let a = alpha[i];
                each3(&mut d[i], &b[i], &s[i], |d, b, s| *d = b + a * s);
            }
            Ok(())
        })
    }

    /// AMP's first ascent step: per tensor, the norm of `v = z · g` read
    /// from the gradient (on one thread, in the order of `norms`), then one
    /// pass writing θ, the snapshot and δ. `None` (nothing written) when a
    /// tensor's θ, g, snapshot or δ are not laid out alike and contiguously:
    /// the caller runs the composed sequence, which handles any layout.
    pub(crate) fn fused_perturb(
        &mut self,
        snapshot: Option<Slot>,
        delta: Option<Slot>,
        inner_lr: &[T],
        epsilon: &[T],
        mask: &[bool],
    ) -> Result<Option<Vec<T>>> {
        let n = self.params.len();
        check_len("mask", n, mask.len())?;
        check_len("inner learning rates", n, inner_lr.len())?;
        check_len("maximum norms", n, epsilon.len())?;
        check_perturb_slots(snapshot, delta)?;
        // Both are buffers (or absent), and not the same one.
        let id = |slot: Option<Slot>| match slot {
            Some(Slot::Buffer(id)) => Some(id),
            _ => None,
        };
        let (snap_id, delta_id) = (id(snapshot), id(delta));
        for id in [snap_id, delta_id].into_iter().flatten() {
            let buffer = self.buffers.get(id)?;
            if (0..n).any(|i| mask[i] && !same_layout(&self.params[i], &buffer[i])) {
                return Ok(None);
            }
        }
        if (0..n).any(|i| mask[i] && !same_layout(&self.params[i], &self.grads[i])) {
            return Ok(None);
        }
        let mut snap = self.take_buffer(snap_id)?;
        let mut del = self.take_buffer(delta_id)?;
        let guard = T::from_f64_rounded(PROJECTION_GUARD);
        let mut norms = vec![T::zero(); n];
        for i in (0..n).filter(|&i| mask[i]) {
            let z = inner_lr[i];
            let (theta, g) = (&mut self.params[i], &self.grads[i]);
            let (Some(theta), Some(g)) =
                (theta.as_slice_memory_order_mut(), g.as_slice_memory_order())
            else {
                unreachable!("layouts checked above");
            };
            let norm = T::from_f64_rounded(sum_of_squares_of(g, |x| x * z).sqrt());
            norms[i] = norm;
            let c = (epsilon[i] / (norm + guard)).min(T::one());
            let s = snap.as_mut().and_then(|b| b[i].as_slice_memory_order_mut());
            let d = del.as_mut().and_then(|b| b[i].as_slice_memory_order_mut());
            ascend(theta, g, s, d, z, c);
        }
        self.put_buffer(snap_id, snap)?;
        self.put_buffer(delta_id, del)?;
        Ok(Some(norms))
    }

    /// Buffer `id`'s tensors, taken out of the store (see `put_buffer`).
    fn take_buffer(&mut self, id: Option<BufferId>) -> Result<Option<Vec<ArrayD<T>>>> {
        id.map(|id| Ok(std::mem::take(self.buffers.get_mut(id)?)))
            .transpose()
    }

    /// Puts back what `take_buffer` took.
    fn put_buffer(&mut self, id: Option<BufferId>, tensors: Option<Vec<ArrayD<T>>>) -> Result<()> {
        if let (Some(id), Some(tensors)) = (id, tensors) {
            *self.buffers.get_mut(id)? = tensors;
        }
        Ok(())
    }
}
