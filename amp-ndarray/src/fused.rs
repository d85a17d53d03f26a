//! The fused operations of the store contract,
//! [`ParamStore::axpy_from`](amp_core::ParamStore::axpy_from),
//! [`ParamStore::perturb_from_grads`](amp_core::ParamStore::perturb_from_grads)
//! and [`ParamStore::sgd_update`](amp_core::ParamStore::sgd_update), in fewer
//! passes over memory than the composed sequences of
//! [`amp_core::composed`] and with their bits (the conformance suite's
//! `fused_ops_match_composed` compares them).

use amp_core::composed::{check_axpy_from_slots, check_perturb_slots, check_sgd_update};
use amp_core::elementwise::{self, SgdCoefficients, SgdMomentum};
use amp_core::{check_len, BufferId, Result, Slot, PROJECTION_GUARD};
use ndarray::{ArrayD, Zip};

use crate::loops::{
    ascend, each3, each_tensor, masked_elements, per_tensor, spread, sum_of_squares_of, CHUNK,
    PARALLEL,
};
use crate::{Element, NdStore};
use rayon::prelude::{IndexedParallelIterator, ParallelIterator, ParallelSlice, ParallelSliceMut};

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
    /// from the gradient (in the order of `norms`), then one
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
        let elements = masked_elements(&self.params, mask);
        let (snaps, deltas) = (per_tensor(snap.as_mut(), n), per_tensor(del.as_mut(), n));
        let tensors = self
            .params
            .iter_mut()
            .zip(&self.grads)
            .zip(snaps)
            .zip(deltas);
        let computed = each_tensor(tensors, mask, elements, |i, (((theta, g), s), d)| {
            let z = inner_lr[i];
            let (Some(theta), Some(g)) =
                (theta.as_slice_memory_order_mut(), g.as_slice_memory_order())
            else {
                unreachable!("layouts checked above");
            };
            let norm = T::from_f64_rounded(sum_of_squares_of(g, |x| x * z).sqrt());
            let c = (epsilon[i] / (norm + guard)).min(T::one());
            let s = s.and_then(|s| s.as_slice_memory_order_mut());
            let d = d.and_then(|d| d.as_slice_memory_order_mut());
            ascend(theta, g, s, d, z, c);
            norm
        });
        let norms = spread(computed, mask, T::zero());
        self.put_buffer(snap_id, snap)?;
        self.put_buffer(delta_id, del)?;
        Ok(Some(norms))
    }

    /// One SGD step: per tensor, one loop over θ, g, the momentum buffer
    /// (and the weights read, when they are not θ), each element by
    /// [`elementwise::sgd`].
    pub(crate) fn fused_sgd(
        &mut self,
        weights: Slot,
        momentum: Option<&SgdMomentum<T>>,
        coefficients: &[SgdCoefficients<T>],
        mask: &[bool],
    ) -> Result<()> {
        check_sgd_update(self.params.len(), weights, momentum, coefficients, mask)?;
        self.slot(weights)?;
        let buffer_id = match momentum.map(|m| m.buffer) {
            Some(Slot::Buffer(id)) => Some(id),
            _ => None,
        };
        // The momentum buffer is taken out of the store while θ, g and the
        // weights stay in it, and put back whatever happens.
        let mut buffer = self.take_buffer(buffer_id)?;
        let Self {
            params,
            grads,
            buffers,
            ..
        } = self;
        let source = match weights {
            Slot::Buffer(id) => Some(buffers.get(id)?),
            _ => None,
        };
        let elements = masked_elements(params, mask);
        let tensors = params.iter_mut().zip(grads.iter());
        let tensors = tensors.zip(per_tensor(buffer.as_mut(), mask.len()));
        each_tensor(tensors, mask, elements, |i, ((t, g), b)| {
            let c = &coefficients[i];
            let w = source.map(|w| &w[i]);
            let alike = same_layout(t, g)
                && w.is_none_or(|w| same_layout(t, w))
                && b.as_deref().is_none_or(|b| same_layout(t, b));
            if alike {
                sgd_slices(t, w, g, b, momentum, c);
            } else {
                sgd_zip(t, w, g, b, momentum, c);
            }
        });
        self.put_buffer(buffer_id, buffer)
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

/// [`elementwise::sgd`] over runs of elements at the same index: θ, the
/// weights read (θ itself where the weights are `None`), g, the momentum
/// buffer, the momentum and the tensor's coefficients.
type SgdLoop<T> = fn(
    &mut [T],
    Option<&[T]>,
    &[T],
    Option<&mut [T]>,
    Option<&SgdMomentum<T>>,
    &SgdCoefficients<T>,
);

/// The [`SgdLoop`] of one tensor's step. The step's choices — momentum or
/// none, its first step, Nesterov, weight decay or none — are the same for
/// every element, but the compiler keeps them as a branch per element in
/// one loop, which it does not vectorise: each combination has its own
/// loop, with the choices constants ([`sgd_fixed`]).
fn sgd_loop<T: Element>(m: Option<&SgdMomentum<T>>, c: &SgdCoefficients<T>) -> SgdLoop<T> {
    let decay = c.weight_decay != T::zero();
    match (m.map(|m| (c.first, m.nesterov)), decay) {
        (None, false) => sgd_fixed::<T, false, false, false, false>,
        (None, true) => sgd_fixed::<T, false, false, false, true>,
        (Some((false, false)), false) => sgd_fixed::<T, true, false, false, false>,
        (Some((false, false)), true) => sgd_fixed::<T, true, false, false, true>,
        (Some((false, true)), false) => sgd_fixed::<T, true, false, true, false>,
        (Some((false, true)), true) => sgd_fixed::<T, true, false, true, true>,
        (Some((true, false)), false) => sgd_fixed::<T, true, true, false, false>,
        (Some((true, false)), true) => sgd_fixed::<T, true, true, false, true>,
        (Some((true, true)), false) => sgd_fixed::<T, true, true, true, false>,
        (Some((true, true)), true) => sgd_fixed::<T, true, true, true, true>,
    }
}

/// The [`SgdLoop`] with momentum (`MOMENTUM`), its first step (`FIRST`),
/// Nesterov (`NESTEROV`) and weight decay (`DECAY`) fixed; [`sgd_loop`]
/// picks the one whose choices hold. A weight decay of zero is the same
/// step as none, and `FIRST`/`NESTEROV` only matter with momentum.
fn sgd_fixed<
    T: Element,
    const MOMENTUM: bool,
    const FIRST: bool,
    const NESTEROV: bool,
    const DECAY: bool,
>(
    t: &mut [T],
    w: Option<&[T]>,
    g: &[T],
    b: Option<&mut [T]>,
    m: Option<&SgdMomentum<T>>,
    c: &SgdCoefficients<T>,
) {
    let c = &SgdCoefficients {
        weight_decay: if DECAY { c.weight_decay } else { T::zero() },
        step: c.step,
        first: FIRST,
    };
    let m = match m {
        Some(m) if MOMENTUM => Some(SgdMomentum {
            nesterov: NESTEROV,
            ..*m
        }),
        _ => None,
    };
    let m = m.as_ref();
    let sgd = elementwise::sgd;
    match (w, b) {
        (None, None) => t
            .iter_mut()
            .zip(g)
            .for_each(|(t, &g)| *t = sgd(*t, g, None, m, c)),
        (None, Some(b)) => {
            for ((t, &g), b) in t.iter_mut().zip(g).zip(b) {
                *t = sgd(*t, g, Some(b), m, c);
            }
        }
        (Some(w), None) => {
            for ((t, &g), &w) in t.iter_mut().zip(g).zip(w) {
                *t = sgd(w, g, None, m, c);
            }
        }
        (Some(w), Some(b)) => {
            for (((t, &g), &w), b) in t.iter_mut().zip(g).zip(w).zip(b) {
                *t = sgd(w, g, Some(b), m, c);
            }
        }
    }
}

/// The [`sgd_loop`] of the step over tensors laid out alike (slices in
/// memory order), split over rayon's threads from [`PARALLEL`] elements on.
fn sgd_slices<T: Element>(
    t: &mut ArrayD<T>,
    w: Option<&ArrayD<T>>,
    g: &ArrayD<T>,
    b: Option<&mut ArrayD<T>>,
    m: Option<&SgdMomentum<T>>,
    c: &SgdCoefficients<T>,
) {
    let len = t.len();
    let slices = (
        t.as_slice_memory_order_mut(),
        w.map(|w| w.as_slice_memory_order()),
        g.as_slice_memory_order(),
        b.map(|b| b.as_slice_memory_order_mut()),
    );
    let (Some(t), w, Some(g), b) = slices else {
        unreachable!("layouts checked by the caller");
    };
    let (w, b) = (w.map(Option::unwrap), b.map(Option::unwrap));
    let run = sgd_loop(m, c);
    if len < PARALLEL {
        return run(t, w, g, b, m, c);
    }
    let pieces = t.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK));
    match (w, b) {
        (None, None) => pieces.for_each(|(t, g)| run(t, None, g, None, m, c)),
        (None, Some(b)) => pieces
            .zip(b.par_chunks_mut(CHUNK))
            .for_each(|((t, g), b)| run(t, None, g, Some(b), m, c)),
        (Some(w), None) => pieces
            .zip(w.par_chunks(CHUNK))
            .for_each(|((t, g), w)| run(t, Some(w), g, None, m, c)),
        (Some(w), Some(b)) => pieces
            .zip(w.par_chunks(CHUNK))
            .zip(b.par_chunks_mut(CHUNK))
            .for_each(|(((t, g), w), b)| run(t, Some(w), g, Some(b), m, c)),
    }
}

/// [`elementwise::sgd`] through `ndarray::Zip`, for tensors laid out
/// differently.
fn sgd_zip<T: Element>(
    t: &mut ArrayD<T>,
    w: Option<&ArrayD<T>>,
    g: &ArrayD<T>,
    b: Option<&mut ArrayD<T>>,
    m: Option<&SgdMomentum<T>>,
    c: &SgdCoefficients<T>,
) {
    let len = t.len();
    let zip = Zip::from(t).and(g);
    let sgd = elementwise::sgd;
    match (w, b) {
        (None, None) => zip_each!(len, zip, |t: &mut T, &g: &T| *t = sgd(*t, g, None, m, c)),
        (None, Some(b)) => zip_each!(len, zip.and(b), |t: &mut T, &g: &T, b: &mut T| {
            *t = sgd(*t, g, Some(b), m, c)
        }),
        (Some(w), None) => zip_each!(len, zip.and(w), |t: &mut T, &g: &T, &w: &T| {
            *t = sgd(w, g, None, m, c)
        }),
        (Some(w), Some(b)) => zip_each!(
            len,
            zip.and(w).and(b),
            |t: &mut T, &g: &T, &w: &T, b: &mut T| *t = sgd(w, g, Some(b), m, c)
        ),
    }
}
