//! The kernels of the store's fused SGD step ([`ParamStore::sgd_update`]):
//! per element, the bits of the sequence of store operations
//! [`amp_core::composed::sgd_update`] runs on this store — its `axpy` (`d +
//! s`, `d − s`, or `d + (s · α + 0)`), its `scale` (`x · μ + 0`, skipped for
//! μ = 1) and its `copy` — without writing the gradients. candle's in-place
//! operations write one tensor and read at most two, so the step takes two
//! passes with momentum (the buffer, then θ; three when Nesterov's update
//! reads θ from a snapshot, which θ copies first) and one without; the
//! conformance suite's `fused_ops_match_composed` and `tests/in_place.rs`
//! compare the result with the composed sequence bit for bit.
//!
//! [`ParamStore::sgd_update`]: amp_core::ParamStore::sgd_update

use super::*;

/// A coefficient of the store's `axpy`, which treats ±1 apart.
#[derive(Clone, Copy)]
pub(super) enum Alpha<T> {
    One,
    MinusOne,
    Times(T),
}

impl<T: Real> Alpha<T> {
    pub(super) fn of(a: f64) -> Self {
        if a == 1.0 {
            Alpha::One
        } else if a == -1.0 {
            Alpha::MinusOne
        } else {
            Alpha::Times(T::of(a))
        }
    }

    /// `x + α · s` as the store's `axpy` computes it.
    #[inline(always)]
    pub(super) fn axpy(self, x: T, s: T) -> T {
        match self {
            Alpha::One => x + s,
            Alpha::MinusOne => x - s,
            Alpha::Times(a) => x + (s * a + T::ZERO),
        }
    }
}

/// One tensor's SGD step: the per-tensor coefficients and the momentum
/// settings every tensor shares (`momentum` and `keep` unused without a
/// buffer).
#[derive(Clone, Copy, Debug)]
pub(crate) struct SgdStep {
    /// λ (0: `d` is g itself).
    pub weight_decay: f64,
    /// μ.
    pub momentum: f64,
    /// `1 − dampening`.
    pub keep: f64,
    /// `−lr`.
    pub step: f64,
    /// The buffer is set to `d` (its first step).
    pub first: bool,
}

/// `d = g + λ·w` (the store's `axpy` into the gradient), or g for λ = 0.
#[inline(always)]
fn decayed<T: Real>(decay: Option<Alpha<T>>, g: T, w: T) -> T {
    match decay {
        Some(lambda) => lambda.axpy(g, w),
        None => g,
    }
}

fn decay_of<T: Real>(op: &SgdStep) -> Option<Alpha<T>> {
    (op.weight_decay != 0.0).then(|| Alpha::of(op.weight_decay))
}

/// The momentum buffer `b ← d` (first step) or `b ← (b · μ + 0) + keep · d`
/// (`b` unscaled for μ = 1), with `d` from g and the weights w.
pub(crate) struct SgdBuffer(pub SgdStep);

fn buffer<T: Real>(b: &mut [T], op: &SgdStep, g: &[T], w: &[T]) {
    let decay = decay_of::<T>(op);
    let triples = b.iter_mut().zip(g).zip(w);
    if op.first {
        triples.for_each(|((b, &g), &w)| *b = decayed(decay, g, w));
        return;
    }
    let keep = Alpha::<T>::of(op.keep);
    if op.momentum == 1.0 {
        triples.for_each(|((b, &g), &w)| *b = keep.axpy(*b, decayed(decay, g, w)));
    } else {
        let mu = T::of(op.momentum);
        triples.for_each(|((b, &g), &w)| {
            *b = keep.axpy(*b * mu + T::ZERO, decayed(decay, g, w));
        });
    }
}

/// θ ← θ − lr · (d + μ · b) with `d` from g and θ itself, b the buffer
/// [`SgdBuffer`] wrote: Nesterov's update.
pub(crate) struct SgdNesterov(pub SgdStep);

fn nesterov<T: Real>(theta: &mut [T], op: &SgdStep, g: &[T], b: &[T]) {
    let (decay, mu, step) = (
        decay_of::<T>(op),
        Alpha::<T>::of(op.momentum),
        Alpha::<T>::of(op.step),
    );
    for ((t, &g), &b) in theta.iter_mut().zip(g).zip(b) {
        let d = decayed(decay, g, *t);
        *t = step.axpy(*t, mu.axpy(d, b));
    }
}

/// θ ← w − lr · (g + λ·w), without momentum, from the weights w.
pub(crate) struct SgdDecayed(pub SgdStep);

fn decayed_from<T: Real>(theta: &mut [T], op: &SgdStep, w: &[T], g: &[T]) {
    let (decay, step) = (decay_of::<T>(op), Alpha::<T>::of(op.step));
    for ((t, &w), &g) in theta.iter_mut().zip(w).zip(g) {
        *t = step.axpy(w, decayed(decay, g, w));
    }
}

/// [`SgdDecayed`] with the weights read from θ itself.
pub(crate) struct SgdDecayedSelf(pub SgdStep);

fn decayed_self<T: Real>(theta: &mut [T], op: &SgdStep, g: &[T]) {
    let (decay, step) = (decay_of::<T>(op), Alpha::<T>::of(op.step));
    for (t, &g) in theta.iter_mut().zip(g) {
        *t = step.axpy(*t, decayed(decay, g, *t));
    }
}

in_place_op!(3, SgdBuffer, "amp-sgd-buffer", |op, b, g, w| buffer(
    b, &op.0, g, w
));
in_place_op!(3, SgdNesterov, "amp-sgd-nesterov", |op, t, g, b| {
    nesterov(t, &op.0, g, b)
});
in_place_op!(3, SgdDecayed, "amp-sgd-decayed", |op, t, w, g| {
    decayed_from(t, &op.0, w, g)
});
in_place_op!(2, SgdDecayedSelf, "amp-sgd-decayed-self", |op, t, g| {
    decayed_self(t, &op.0, g)
});
