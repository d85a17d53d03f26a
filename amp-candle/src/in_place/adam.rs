//! The kernels of the store's fused Adam step
//! ([`ParamStore::adam_update`]): per element, the bits of the sequence of
//! store operations [`amp_core::composed::adam_update`] runs on this store
//! — its `scale` (`x · f + 0`, skipped for f = 1), `axpy`, `addcmul`,
//! `maximum` and `addcdiv_sqrt` — without writing the gradients. One pass
//! per moment, one for AMSGrad's maximum and one for θ, where the sequence
//! makes about sixteen; the conformance suite's
//! `adam_update_matches_composed` and `tests/in_place.rs` compare the
//! result with the sequence bit for bit.
//!
//! [`ParamStore::adam_update`]: amp_core::ParamStore::adam_update

use super::sgd::Alpha;
use super::*;
use amp_core::AdamCoefficients;

/// One tensor's coefficients, in `f64`.
type AdamStep = AdamCoefficients<f64>;

/// `x · f + 0` (the store's `scale`), or x for f = 1 (which it skips).
#[derive(Clone, Copy)]
struct Factor<T>(Option<T>);

impl<T: Real> Factor<T> {
    fn of(f: f64) -> Self {
        Factor((f != 1.0).then(|| T::of(f)))
    }
}

/// `$body` with `$f` the closure `|x| x · f + 0` of the store's `scale`
/// by a [`Factor`], or `|x| x` for f = 1 (which `scale` skips), decided
/// here (see `with_alpha!`).
macro_rules! with_factor {
    ($t:ty, $factor:expr, |$f:ident| $body:expr) => {
        match $factor.0 {
            Some(f) => {
                let $f = |x: $t| x * f + <$t>::ZERO;
                $body
            }
            None => {
                let $f = |x: $t| x;
                $body
            }
        }
    };
}

/// Elements per chunk of [`Gradient::each_chunk`]: the chunk's gradient is
/// computed into a buffer in L1 cache, then read by the moment's loop.
const CHUNK: usize = 512;

/// The gradient as the moments read it: `g + λ·θ'` (θ' the shrunk θ) with
/// L2 decay, else g.
#[derive(Clone, Copy)]
struct Gradient<T> {
    shrink: Factor<T>,
    l2: Option<Alpha<T>>,
}

impl<T: Real> Gradient<T> {
    fn of(op: &AdamStep) -> Self {
        Gradient {
            shrink: Factor::of(op.shrink),
            l2: (op.l2 != 0.0).then(|| Alpha::of(op.l2)),
        }
    }

    /// `f(target, d)` chunk by chunk, `d` the gradient Adam's moments see
    /// (g, or with L2 decay `g + l2 · (θ · shrink + 0)`), each loop with its
    /// coefficients decided outside it.
    fn each_chunk(self, target: &mut [T], g: &[T], theta: &[T], f: impl Fn(&mut [T], &[T])) {
        let Some(l2) = self.l2 else {
            return f(target, g);
        };
        let mut d = [T::ZERO; CHUNK];
        let chunks = target.chunks_mut(CHUNK).zip(g.chunks(CHUNK));
        for ((target, g), theta) in chunks.zip(theta.chunks(CHUNK)) {
            let d = &mut d[..g.len()];
            let elements = d.iter_mut().zip(g).zip(theta);
            with_alpha!(T, l2, |decayed| with_factor!(T, self.shrink, |shrunk| {
                elements.for_each(|((d, &g), &t)| *d = decayed(g, shrunk(t)))
            }));
            f(target, d);
        }
    }
}

/// `m ← (m · β₁ + 0) + (1 − β₁) · g` (the store's `scale` and `axpy`).
pub(crate) struct AdamFirst(pub AdamStep);

fn first<T: Real>(m: &mut [T], op: &AdamStep, g: &[T], theta: &[T]) {
    let (grad, beta1, beta1c) = (
        Gradient::<T>::of(op),
        Factor::<T>::of(op.beta1.0),
        Alpha::<T>::of(op.beta1.1),
    );
    grad.each_chunk(m, g, theta, |m, d| {
        with_factor!(T, beta1, |kept| with_alpha!(T, beta1c, |added| {
            m.iter_mut()
                .zip(d)
                .for_each(|(m, &d)| *m = added(kept(*m), d))
        }))
    });
}

/// `v ← (v · β₂ + 0) + (g · (1 − β₂) + 0) · g` (the store's `scale` and
/// `addcmul`).
pub(crate) struct AdamSecond(pub AdamStep);

fn second<T: Real>(v: &mut [T], op: &AdamStep, g: &[T], theta: &[T]) {
    let (grad, beta2, beta2c) = (
        Gradient::<T>::of(op),
        Factor::<T>::of(op.beta2.0),
        T::of(op.beta2.1),
    );
    grad.each_chunk(v, g, theta, |v, d| {
        with_factor!(T, beta2, |kept| {
            let pairs = v.iter_mut().zip(d);
            pairs.for_each(|(v, &d)| *v = kept(*v) + (d * beta2c + T::ZERO) * d)
        })
    });
}

/// AMSGrad's `max ← maximum(max, v)` as the store computes it: candle's
/// `maximum` (`v` where `max < v`, else `max`), then `v` wherever `v` is
/// NaN.
pub(crate) struct AdamMax;

fn running_max<T: Real>(max: &mut [T], v: &[T]) {
    for (d, &s) in max.iter_mut().zip(v) {
        #[allow(clippy::eq_op)] // NaN is the one value not equal to itself
        let nan = s != s;
        if nan || *d < s {
            *d = s;
        }
    }
}

/// `θ ← θ' + (m · step + 0) / ((√den / divisor) · 1 + eps)` with θ' the
/// shrunk θ (the store's `scale` and `addcdiv_sqrt`).
pub(crate) struct AdamTheta(pub AdamStep);

fn theta<T: Real>(theta: &mut [T], op: &AdamStep, m: &[T], den: &[T]) {
    let (shrink, step, divisor, eps, one) = (
        Factor::<T>::of(op.shrink),
        T::of(op.step),
        T::of(op.divisor),
        T::of(op.eps),
        T::of(1.0),
    );
    let elements = theta.iter_mut().zip(m).zip(den);
    with_factor!(T, shrink, |shrunk| {
        elements.for_each(|((t, &m), &den)| {
            let d = (den.sqrt() / divisor) * one + eps;
            *t = shrunk(*t) + (m * step + T::ZERO) / d;
        })
    })
}

in_place_op!(3, AdamFirst, "amp-adam-first", |op, m, g, t| first(
    m, &op.0, g, t
));
in_place_op!(3, AdamSecond, "amp-adam-second", |op, v, g, t| second(
    v, &op.0, g, t
));
in_place_op!(2, AdamMax, "amp-adam-max", |_op, d, v| running_max(d, v));
in_place_op!(3, AdamTheta, "amp-adam-theta", |op, t, m, den| theta(
    t, &op.0, m, den
));
