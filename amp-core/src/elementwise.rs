//! The element formulas of the operations that Adam-type optimisers need
//! ([`ParamStore::addcmul`](crate::ParamStore::addcmul),
//! [`ParamStore::addcdiv_sqrt`](crate::ParamStore::addcdiv_sqrt),
//! [`ParamStore::maximum`](crate::ParamStore::maximum)) and of the fused
//! optimiser steps ([`adam`], [`sgd`]), written once.
//!
//! Each is evaluated in the order written, one rounding per operation, as
//! ATen's CPU kernels evaluate `addcmul_`, `addcdiv_` and `maximum`. A
//! backend that runs them its own way (a tensor library's kernels) must give
//! the same bits for `f32` and `f64`; the conformance suite checks it
//! against the host default in [`composed`](crate::composed), which calls
//! these functions.

use num_traits::Float;

/// `d + (alpha · a) · b`.
#[inline]
pub fn addcmul<T: Float>(d: T, alpha: T, a: T, b: T) -> T {
    d + alpha * a * b
}

/// `d + (alpha · num) / (√den / divisor + eps)`: Adam's update with its
/// denominator.
#[inline]
pub fn addcdiv_sqrt<T: Float>(d: T, alpha: T, num: T, den: T, divisor: T, eps: T) -> T {
    d + alpha * num / (den.sqrt() / divisor + eps)
}

/// `max(a, b)`, NaN if either is NaN (as `torch.maximum`); of two equal
/// values (`-0` and `+0`) the first.
#[inline]
pub fn maximum<T: Float>(a: T, b: T) -> T {
    if a.is_nan() || b.is_nan() {
        T::nan()
    } else if a < b {
        b
    } else {
        a
    }
}

/// [`addcmul`] over values copied to the host, in `f64` when `wide` (an
/// `f64` tensor) and in `f32` otherwise: the arithmetic of the host defaults
/// ([`composed::addcmul`](crate::composed::addcmul),
/// [`TensorOps::addcmul`](crate::TensorOps::addcmul)).
pub(crate) fn addcmul_host(wide: bool, d: &mut [f64], alpha: f64, x: &[f64], y: &[f64]) {
    for ((d, &x), &y) in d.iter_mut().zip(x).zip(y) {
        *d = if wide {
            addcmul(*d, alpha, x, y)
        } else {
            f64::from(addcmul(*d as f32, alpha as f32, x as f32, y as f32))
        };
    }
}

/// [`addcdiv_sqrt`] over host values, as [`addcmul_host`]; the
/// coefficients are `(alpha, divisor, eps)`.
pub(crate) fn addcdiv_sqrt_host(
    wide: bool,
    d: &mut [f64],
    (alpha, divisor, eps): (f64, f64, f64),
    num: &[f64],
    den: &[f64],
) {
    for ((d, &x), &y) in d.iter_mut().zip(num).zip(den) {
        *d = if wide {
            addcdiv_sqrt(*d, alpha, x, y, divisor, eps)
        } else {
            let (d32, x, y) = (*d as f32, x as f32, y as f32);
            f64::from(addcdiv_sqrt(
                d32,
                alpha as f32,
                x,
                y,
                divisor as f32,
                eps as f32,
            ))
        };
    }
}

/// [`maximum`] over host values (exact in `f64` for every dtype).
pub(crate) fn maximum_host(d: &mut [f64], x: &[f64]) {
    for (d, &x) in d.iter_mut().zip(x) {
        *d = maximum(*d, x);
    }
}

/// The buffers of Adam's moments, for
/// [`ParamStore::adam_update`](crate::ParamStore::adam_update): three
/// distinct buffers (two without AMSGrad).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdamSlots {
    /// The first moment m.
    pub exp_avg: crate::Slot,
    /// The second moment v.
    pub exp_avg_sq: crate::Slot,
    /// AMSGrad's running maximum of v.
    pub max_exp_avg_sq: Option<crate::Slot>,
}

/// The per-tensor coefficients of one Adam step on one tensor, in the
/// store's scalar type: what [`adam`] and
/// [`ParamStore::adam_update`](crate::ParamStore::adam_update) apply.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamCoefficients<T> {
    /// Decoupled weight decay: θ is multiplied by this first (AdamW's
    /// `1 − lr·λ`; 1 for none).
    pub shrink: T,
    /// L2 weight decay: `λ·θ` is added to the gradient (Adam's λ; 0 for
    /// none).
    pub l2: T,
    /// β₁ and `1 − β₁`.
    pub beta1: (T, T),
    /// β₂ and `1 − β₂`.
    pub beta2: (T, T),
    /// `−lr / (1 − β₁ᵗ)`.
    pub step: T,
    /// `√(1 − β₂ᵗ)`.
    pub divisor: T,
    /// Added to the denominator.
    pub eps: T,
}

/// One Adam step on one element, exactly as the sequence of store
/// operations [`composed::adam_update`](crate::composed::adam_update) runs
/// it: θ shrunk (when `shrink ≠ 1`), `g + λθ` (when `l2 ≠ 0`), the moments
/// (`m·β₁ + (1−β₁)·g`, `v·β₂ + ((1−β₂)·g)·g`), AMSGrad's maximum when
/// `max` is given, then [`addcdiv_sqrt`]. Returns θ, m, v (and the maximum
/// through `max`).
#[inline]
pub fn adam<T: Float>(
    theta: T,
    g: T,
    m: T,
    v: T,
    max: Option<&mut T>,
    c: &AdamCoefficients<T>,
) -> (T, T, T) {
    let theta = if c.shrink != T::one() {
        theta * c.shrink
    } else {
        theta
    };
    let g = if c.l2 != T::zero() {
        g + c.l2 * theta
    } else {
        g
    };
    let m = m * c.beta1.0;
    let m = m + c.beta1.1 * g;
    let v = v * c.beta2.0;
    let v = addcmul(v, c.beta2.1, g, g);
    let den = match max {
        Some(max) => {
            *max = maximum(*max, v);
            *max
        }
        None => v,
    };
    (addcdiv_sqrt(theta, c.step, m, den, c.divisor, c.eps), m, v)
}

/// The momentum of one SGD step, for
/// [`ParamStore::sgd_update`](crate::ParamStore::sgd_update): the buffer
/// that holds it and the settings every tensor shares.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdMomentum<T> {
    /// The momentum buffer b.
    pub buffer: crate::Slot,
    /// μ.
    pub momentum: T,
    /// `1 − dampening`.
    pub keep: T,
    /// Nesterov's update `d + μ·b` instead of `b`.
    pub nesterov: bool,
}

/// The per-tensor coefficients of one SGD step on one tensor, in the
/// store's scalar type: what [`sgd`] and
/// [`ParamStore::sgd_update`](crate::ParamStore::sgd_update) apply.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdCoefficients<T> {
    /// L2 weight decay λ: `d = g + λ·θ` (0: none, and `d` is `g` itself).
    pub weight_decay: T,
    /// `−lr`.
    pub step: T,
    /// The tensor's first step with momentum: the buffer is set to `d`
    /// instead of `μ·b + (1 − dampening)·d`.
    pub first: bool,
}

/// One SGD step on one element, exactly as the sequence of store
/// operations [`composed::sgd_update`](crate::composed::sgd_update) runs
/// it: `d = g + λ·w` (when `λ ≠ 0`), the momentum buffer `b ← d` on the
/// first step and `b ← (b·μ) + keep·d` after it, the update `u = d + μ·b`
/// (Nesterov), `b` (momentum) or `d` (none), and the new weight `w + step·u`.
/// `w` is θ as the step reads it (AMP's snapshot, or θ itself).
#[inline]
pub fn sgd<T: Float>(
    w: T,
    g: T,
    buffer: Option<&mut T>,
    momentum: Option<&SgdMomentum<T>>,
    c: &SgdCoefficients<T>,
) -> T {
    let d = if c.weight_decay != T::zero() {
        g + c.weight_decay * w
    } else {
        g
    };
    let u = match (buffer, momentum) {
        (Some(b), Some(m)) => {
            *b = if c.first {
                d
            } else {
                let scaled = *b * m.momentum;
                scaled + m.keep * d
            };
            if m.nesterov {
                d + m.momentum * *b
            } else {
                *b
            }
        }
        _ => d,
    };
    w + c.step * u
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maximum_propagates_nan_and_keeps_the_first_of_equal_zeros() {
        assert!(maximum(f64::NAN, 1.0).is_nan());
        assert!(maximum(1.0, f64::NAN).is_nan());
        assert_eq!(maximum(-0.0f64, 0.0).to_bits(), (-0.0f64).to_bits());
        assert_eq!(maximum(1.0f32, 2.0), 2.0);
    }

    #[test]
    fn formulas_round_in_the_order_written() {
        // (alpha · a) · b in f32 differs from alpha · (a · b) here.
        let (alpha, a, b) = (0.1f32, 3.0e-3f32, 7.0f32);
        assert_eq!(addcmul(0.0, alpha, a, b), (alpha * a) * b);
        let got = addcdiv_sqrt(1.0f64, -0.5, 2.0, 16.0, 2.0, 1e-8);
        assert_eq!(got, 1.0 + (-0.5 * 2.0) / (4.0 / 2.0 + 1e-8));
    }
}
