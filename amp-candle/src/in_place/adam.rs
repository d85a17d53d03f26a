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

    #[inline(always)]
    fn apply(self, x: T) -> T {
        match self.0 {
            Some(f) => x * f + T::ZERO,
            None => x,
        }
    }
}

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

    #[inline(always)]
    fn at(self, g: T, theta: T) -> T {
        match self.l2 {
            Some(l2) => l2.axpy(g, self.shrink.apply(theta)),
            None => g,
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
    for ((m, &g), &t) in m.iter_mut().zip(g).zip(theta) {
        *m = beta1c.axpy(beta1.apply(*m), grad.at(g, t));
    }
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
    for ((v, &g), &t) in v.iter_mut().zip(g).zip(theta) {
        let g = grad.at(g, t);
        *v = beta2.apply(*v) + (g * beta2c + T::ZERO) * g;
    }
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
    for ((t, &m), &den) in theta.iter_mut().zip(m).zip(den) {
        let d = (den.sqrt() / divisor) * one + eps;
        *t = shrink.apply(*t) + (m * step + T::ZERO) / d;
    }
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
