//! The kernels of the store's fused SGD step ([`ParamStore::sgd_update`]):
//! per element, the bits of the sequence of store operations
//! [`amp_core::composed::sgd_update`] runs on this store — its `axpy` (`d +
//! s`, `d − s`, or `d + (s · α + 0)`), its `scale` (`x · μ + 0`, skipped for
//! μ = 1) and its `copy` — without writing the gradients, in one pass per
//! tensor: with momentum, θ and the buffer together ([`SgdMomentumStep`],
//! the buffer through a nested operation as candle's in-place operations
//! write one tensor each). The conformance suite's
//! `fused_ops_match_composed` and `tests/in_place.rs` compare the result
//! with the composed sequence bit for bit.
//!
//! [`ParamStore::sgd_update`]: amp_core::ParamStore::sgd_update

use super::*;

/// A coefficient of the store's `axpy`, which treats ±1 apart; the
/// kernels compute `x + α · s` with it through `with_alpha!`.
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

fn decay_of<T: Real>(op: &SgdStep) -> Option<Alpha<T>> {
    (op.weight_decay != 0.0).then(|| Alpha::of(op.weight_decay))
}

/// The momentum buffer's rule: `b ← d` on its first step, else
/// `b ← (b · μ + 0) + keep · d` (`b` unscaled for μ = 1) — the store's
/// `copy`, or its `scale` and `axpy`.
struct Momentum<T> {
    first: bool,
    /// `None` for μ = 1.
    mu: Option<T>,
    keep: Alpha<T>,
}

impl<T: Real> Momentum<T> {
    fn of(op: &SgdStep) -> Self {
        Momentum {
            first: op.first,
            mu: (op.momentum != 1.0).then(|| T::of(op.momentum)),
            keep: Alpha::of(op.keep),
        }
    }

    /// `b ← next(b, d)` element by element.
    fn update(&self, b: &mut [T], d: &[T]) {
        let pairs = b.iter_mut().zip(d);
        with_alpha!(T, self.keep, |kept| match (self.first, self.mu) {
            (true, _) => b.copy_from_slice(d),
            (false, Some(mu)) => pairs.for_each(|(b, &d)| *b = kept(*b * mu + T::ZERO, d)),
            (false, None) => pairs.for_each(|(b, &d)| *b = kept(*b, d)),
        })
    }
}

/// One momentum step of a tensor in one pass, writing θ and the buffer:
/// with `d = g + λ·w` (w the weights: read from `weights` when given, else
/// θ itself), the buffer as [`Momentum`] updates it, then θ ← w − lr·(d +
/// μ·b) with Nesterov, θ ← w − lr·b without. θ is the operation's
/// destination, g (and the weights when they are not θ) its sources; the
/// buffer is written through a nested operation ([`pair::with_second`]), so
/// it must share storage with none of them.
pub(crate) struct SgdMomentumStep<'a> {
    pub step: SgdStep,
    pub nesterov: bool,
    pub buffer: &'a Tensor,
}

const MOMENTUM_STEP: &str = "amp-sgd-momentum";

impl SgdMomentumStep<'_> {
    fn run<T: Real>(&self, theta: &mut [T], g: &[T], w: Option<&[T]>) -> candle_core::Result<()> {
        let n = theta.len();
        if g.len() != n || w.is_some_and(|w| w.len() != n) {
            bail!("{MOMENTUM_STEP}: operands of different lengths");
        }
        pair::with_second(MOMENTUM_STEP, self.buffer, n, |b: &mut [T]| {
            pair::blocks_pair(theta, b, g, w, |t, b, g, w| {
                momentum_step(&self.step, self.nesterov, t, b, g, w)
            });
            Ok(())
        })
    }
}

/// Elements per chunk of [`momentum_step`]: its three loops over a chunk
/// work in L1 cache, so memory sees one pass.
const CHUNK: usize = 512;

/// [`SgdMomentumStep`]'s kernel, chunk by chunk: `d` for the chunk, then
/// the buffer, then θ — three short loops, each with at most two
/// coefficients decided outside it, instead of one loop deciding all of
/// them per element (which took twice as long at 1e7 elements).
fn momentum_step<T: Real>(
    op: &SgdStep,
    nesterov: bool,
    theta: &mut [T],
    b: &mut [T],
    g: &[T],
    w: Option<&[T]>,
) {
    let (decay, rule) = (decay_of::<T>(op), Momentum::<T>::of(op));
    let (mu, step) = (Alpha::<T>::of(op.momentum), Alpha::<T>::of(op.step));
    let (mut d, mut own) = ([T::ZERO; CHUNK], [T::ZERO; CHUNK]);
    for start in (0..theta.len()).step_by(CHUNK) {
        let end = (start + CHUNK).min(theta.len());
        let (t, b, g, d) = (
            &mut theta[start..end],
            &mut b[start..end],
            &g[start..end],
            &mut d[..end - start],
        );
        // The weights of the chunk: θ's own values are read before θ's
        // loop overwrites them.
        let w = match w {
            Some(w) => &w[start..end],
            None => {
                let own = &mut own[..end - start];
                own.copy_from_slice(t);
                &*own
            }
        };
        match decay {
            Some(lambda) => with_alpha!(T, lambda, |decayed| {
                let elements = d.iter_mut().zip(g).zip(w);
                elements.for_each(|((d, &g), &w)| *d = decayed(g, w));
            }),
            None => d.copy_from_slice(g),
        }
        rule.update(b, d);
        let elements = t.iter_mut().zip(w).zip(d.iter()).zip(b.iter());
        with_alpha!(T, step, |stepped| match nesterov {
            true => with_alpha!(T, mu, |ahead| {
                elements.for_each(|(((t, &w), &d), &b)| *t = stepped(w, ahead(d, b)))
            }),
            false => elements.for_each(|(((t, &w), _), &b)| *t = stepped(w, b)),
        })
    }
}

in_place_op!(whole 2, SgdMomentumStep<'_>, MOMENTUM_STEP, |op, theta, g| {
    op.run(theta, g, None)
});
in_place_op!(whole 3, SgdMomentumStep<'_>, MOMENTUM_STEP, |op, theta, g, w| {
    op.run(theta, g, Some(w))
});

/// θ ← w − lr · (g + λ·w) for λ ≠ 0, without momentum, from the weights w.
pub(crate) struct SgdDecayed(pub SgdStep);

fn decayed_from<T: Real>(theta: &mut [T], op: &SgdStep, w: &[T], g: &[T]) {
    let (lambda, step) = (Alpha::<T>::of(op.weight_decay), Alpha::<T>::of(op.step));
    let elements = theta.iter_mut().zip(w).zip(g);
    with_alpha!(T, step, |stepped| with_alpha!(T, lambda, |decayed| {
        elements.for_each(|((t, &w), &g)| *t = stepped(w, decayed(g, w)))
    }))
}

/// [`SgdDecayed`] with the weights read from θ itself.
pub(crate) struct SgdDecayedSelf(pub SgdStep);

fn decayed_self<T: Real>(theta: &mut [T], op: &SgdStep, g: &[T]) {
    let (lambda, step) = (Alpha::<T>::of(op.weight_decay), Alpha::<T>::of(op.step));
    let elements = theta.iter_mut().zip(g);
    with_alpha!(T, step, |stepped| with_alpha!(T, lambda, |decayed| {
        elements.for_each(|(t, &g)| *t = stepped(*t, decayed(g, *t)))
    }))
}

in_place_op!(3, SgdDecayed, "amp-sgd-decayed", |op, t, w, g| {
    decayed_from(t, &op.0, w, g)
});
in_place_op!(2, SgdDecayedSelf, "amp-sgd-decayed-self", |op, t, g| {
    decayed_self(t, &op.0, g)
});
