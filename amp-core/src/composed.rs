//! The provided [`ParamStore`] operations, written with the required ones.
//!
//! [`ParamStore::perturb_from_grads`] and [`ParamStore::axpy_from`] are
//! fused sequences of basic operations; [`ParamStore::addcmul`],
//! [`ParamStore::addcdiv_sqrt`] and [`ParamStore::maximum`] (what Adam
//! needs) go through the host, tensor by tensor, with the formulas of
//! [`elementwise`]. Their defaults call these
//! functions. A store that runs them its own way for some of its tensors
//! (say, dense CPU tensors) calls the function here for the others, and the
//! workspace's conformance suite checks that both give the same bits.

use num_traits::{One, Zero};

use crate::elementwise::{self, AdamCoefficients, AdamSlots, SgdCoefficients, SgdMomentum};
use crate::error::{AmpError, Result};
use crate::store::{check_len, DType, HostTensor, ParamStore, Scalar, Slot};

/// Checks the slots of [`ParamStore::perturb_from_grads`]: the snapshot and
/// δ are buffers, distinct from each other (δ may also be absent).
pub fn check_perturb_slots(snapshot: Option<Slot>, delta: Option<Slot>) -> Result<()> {
    for (what, slot) in [("snapshot", snapshot), ("delta", delta)] {
        if let Some(slot @ (Slot::Params | Slot::Grads)) = slot {
            return Err(AmpError::backend(format!(
                "perturb_from_grads: the {what} must be a buffer, got {slot:?}"
            )));
        }
    }
    if snapshot.is_some() && snapshot == delta {
        return Err(AmpError::backend(
            "perturb_from_grads: snapshot and delta must be different buffers",
        ));
    }
    Ok(())
}

/// [`ParamStore::perturb_from_grads`] as copy, scale, norms, clip and axpy.
///
/// δ is built in `delta` when given, else in the gradient slot. If the final
/// move of θ fails, θ is put back (copied from the snapshot, or δ subtracted
/// again) before the error is returned.
pub fn perturb_from_grads<S: ParamStore + ?Sized>(
    store: &mut S,
    snapshot: Option<Slot>,
    delta: Option<Slot>,
    inner_lr: &[S::Scalar],
    epsilon: &[S::Scalar],
    mask: &[bool],
) -> Result<S::Norms> {
    let n = store.num_tensors();
    check_len("mask", n, mask.len())?;
    check_len("inner learning rates", n, inner_lr.len())?;
    check_len("maximum norms", n, epsilon.len())?;
    check_perturb_slots(snapshot, delta)?;
    let one = S::Scalar::one();
    if let Some(snapshot) = snapshot {
        store.copy(snapshot, Slot::Params, mask)?;
    }
    let d = delta.unwrap_or(Slot::Grads);
    if d != Slot::Grads {
        store.copy(d, Slot::Grads, mask)?;
    }
    if (0..n).any(|i| mask[i] && inner_lr[i] != one) {
        store.scale(d, inner_lr, mask)?;
    }
    let norms = store.norms(d, mask)?;
    store.clip_to_norms(d, &norms, epsilon, mask)?;
    if let Err(error) = store.axpy(Slot::Params, &vec![one; n], d, mask) {
        // Put θ back; a failure to do so is reported over the first error.
        match snapshot {
            Some(snapshot) => store.copy(Slot::Params, snapshot, mask)?,
            None => store.axpy(Slot::Params, &vec![-one; n], d, mask)?,
        }
        return Err(error);
    }
    Ok(norms)
}

/// [`ParamStore::axpy_from`] as a copy and an axpy (just the axpy when `base`
/// is `dst`).
pub fn axpy_from<S: ParamStore + ?Sized>(
    store: &mut S,
    dst: Slot,
    base: Slot,
    alpha: &[S::Scalar],
    src: Slot,
    mask: &[bool],
) -> Result<()> {
    check_axpy_from_slots(dst, src)?;
    if base != dst {
        store.copy(dst, base, mask)?;
    }
    store.axpy(dst, alpha, src, mask)
}

/// Checks the slots of [`ParamStore::axpy_from`]: `dst` differs from `src`
/// (`base` may be either).
pub fn check_axpy_from_slots(dst: Slot, src: Slot) -> Result<()> {
    if dst == src {
        return Err(AmpError::backend(format!(
            "axpy_from: source and destination must be different slots, got {dst:?} twice"
        )));
    }
    Ok(())
}

/// Checks that an operation's destination is none of its sources.
pub fn check_sources(operation: &str, dst: Slot, sources: &[Slot]) -> Result<()> {
    if sources.contains(&dst) {
        return Err(AmpError::backend(format!(
            "{operation}: the destination {dst:?} is also a source"
        )));
    }
    Ok(())
}

/// The argument checks of [`ParamStore::addcmul`] for `n` tensors: one
/// coefficient per tensor, `dst` neither source.
pub fn check_addcmul<T>(n: usize, dst: Slot, alpha: &[T], a: Slot, b: Slot) -> Result<()> {
    check_len("addcmul coefficients", n, alpha.len())?;
    check_sources("addcmul", dst, &[a, b])
}

/// The argument checks of [`ParamStore::addcdiv_sqrt`] for `n` tensors:
/// one coefficient, divisor and eps per tensor, `dst` neither source.
pub fn check_addcdiv_sqrt<T>(
    n: usize,
    dst: Slot,
    (alpha, divisor, eps): (&[T], &[T], &[T]),
    num: Slot,
    den: Slot,
) -> Result<()> {
    check_len("addcdiv coefficients", n, alpha.len())?;
    check_len("addcdiv divisors", n, divisor.len())?;
    check_len("addcdiv eps", n, eps.len())?;
    check_sources("addcdiv_sqrt", dst, &[num, den])
}

/// Runs `op` over the masked-in tensors on the host: reads `dst` and the
/// `sources`, lets `op` compute the new values of `dst` (in `f64` for an
/// `f64` store, in `f32` otherwise: `wide` says which), writes them back.
fn on_host<S: ParamStore + ?Sized>(
    store: &mut S,
    dst: Slot,
    sources: &[Slot],
    mask: &[bool],
    op: impl Fn(usize, bool, &mut [f64], &[HostTensor]),
) -> Result<()> {
    check_len("mask", store.num_tensors(), mask.len())?;
    let wide = store.dtype() == DType::F64;
    for i in (0..mask.len()).filter(|&i| mask[i]) {
        let mut d = store.read(dst, i)?;
        let inputs = sources
            .iter()
            .map(|&s| store.read(s, i))
            .collect::<Result<Vec<_>>>()?;
        op(i, wide, d.data_mut(), &inputs);
        store.write(dst, i, &d)?;
    }
    Ok(())
}

/// [`ParamStore::addcmul`] on the host.
pub fn addcmul<S: ParamStore + ?Sized>(
    store: &mut S,
    dst: Slot,
    alpha: &[S::Scalar],
    a: Slot,
    b: Slot,
    mask: &[bool],
) -> Result<()> {
    check_addcmul(store.num_tensors(), dst, alpha, a, b)?;
    on_host(store, dst, &[a, b], mask, |i, wide, d, inputs| {
        elementwise::addcmul_host(
            wide,
            d,
            alpha[i].widen(),
            inputs[0].data(),
            inputs[1].data(),
        );
    })
}

/// [`ParamStore::addcdiv_sqrt`] on the host.
#[allow(clippy::too_many_arguments)]
pub fn addcdiv_sqrt<S: ParamStore + ?Sized>(
    store: &mut S,
    dst: Slot,
    alpha: &[S::Scalar],
    num: Slot,
    den: Slot,
    divisor: &[S::Scalar],
    eps: &[S::Scalar],
    mask: &[bool],
) -> Result<()> {
    let n = store.num_tensors();
    check_addcdiv_sqrt(n, dst, (alpha, divisor, eps), num, den)?;
    on_host(store, dst, &[num, den], mask, |i, wide, d, inputs| {
        let coefficients = (alpha[i].widen(), divisor[i].widen(), eps[i].widen());
        elementwise::addcdiv_sqrt_host(wide, d, coefficients, inputs[0].data(), inputs[1].data());
    })
}

/// [`ParamStore::maximum`] on the host.
pub fn maximum<S: ParamStore + ?Sized>(
    store: &mut S,
    dst: Slot,
    src: Slot,
    mask: &[bool],
) -> Result<()> {
    check_sources("maximum", dst, &[src])?;
    // max is exact: f64 serves every dtype.
    on_host(store, dst, &[src], mask, |_, _, d, inputs| {
        elementwise::maximum_host(d, inputs[0].data());
    })
}

/// Checks the slots and lengths of [`ParamStore::adam_update`]: the moments
/// are distinct buffers, one coefficient set per tensor.
pub fn check_adam_update<T>(
    n: usize,
    slots: AdamSlots,
    coefficients: &[AdamCoefficients<T>],
    mask: &[bool],
) -> Result<()> {
    check_len("mask", n, mask.len())?;
    check_len("Adam coefficients", n, coefficients.len())?;
    let mut moments = vec![slots.exp_avg, slots.exp_avg_sq];
    moments.extend(slots.max_exp_avg_sq);
    for (k, slot) in moments.iter().enumerate() {
        if matches!(slot, Slot::Params | Slot::Grads) || moments[..k].contains(slot) {
            return Err(AmpError::backend(format!(
                "adam_update: the moments must be distinct buffers, got {moments:?}"
            )));
        }
    }
    Ok(())
}

/// [`ParamStore::adam_update`] as the sequence of store operations whose
/// element arithmetic [`elementwise::adam`] fuses: scale θ (decoupled
/// decay), axpy into g (L2 decay), scale and axpy m, scale v and addcmul,
/// maximum (AMSGrad), addcdiv_sqrt into θ.
pub fn adam_update<S: ParamStore + ?Sized>(
    store: &mut S,
    slots: AdamSlots,
    coefficients: &[AdamCoefficients<S::Scalar>],
    mask: &[bool],
) -> Result<()> {
    let n = store.num_tensors();
    check_adam_update(n, slots, coefficients, mask)?;
    let get = |f: fn(&AdamCoefficients<S::Scalar>) -> S::Scalar| -> Vec<S::Scalar> {
        coefficients.iter().map(f).collect()
    };
    let (one, zero) = (S::Scalar::one(), S::Scalar::zero());
    let shrink_mask: Vec<bool> = (0..n)
        .map(|i| mask[i] && coefficients[i].shrink != one)
        .collect();
    if shrink_mask.contains(&true) {
        store.scale(Slot::Params, &get(|c| c.shrink), &shrink_mask)?;
    }
    let l2_mask: Vec<bool> = (0..n)
        .map(|i| mask[i] && coefficients[i].l2 != zero)
        .collect();
    if l2_mask.contains(&true) {
        store.axpy(Slot::Grads, &get(|c| c.l2), Slot::Params, &l2_mask)?;
    }
    let (m, v) = (slots.exp_avg, slots.exp_avg_sq);
    store.scale(m, &get(|c| c.beta1.0), mask)?;
    store.axpy(m, &get(|c| c.beta1.1), Slot::Grads, mask)?;
    store.scale(v, &get(|c| c.beta2.0), mask)?;
    store.addcmul(v, &get(|c| c.beta2.1), Slot::Grads, Slot::Grads, mask)?;
    let den = match slots.max_exp_avg_sq {
        Some(max) => {
            store.maximum(max, v, mask)?;
            max
        }
        None => v,
    };
    store.addcdiv_sqrt(
        Slot::Params,
        &get(|c| c.step),
        m,
        den,
        &get(|c| c.divisor),
        &get(|c| c.eps),
        mask,
    )
}

/// Checks the arguments of [`ParamStore::sgd_update`]: θ is read from
/// [`Slot::Params`] or a buffer, the momentum buffer is another buffer, one
/// coefficient set per tensor.
pub fn check_sgd_update<T>(
    n: usize,
    weights: Slot,
    momentum: Option<&SgdMomentum<T>>,
    coefficients: &[SgdCoefficients<T>],
    mask: &[bool],
) -> Result<()> {
    check_len("mask", n, mask.len())?;
    check_len("SGD coefficients", n, coefficients.len())?;
    if weights == Slot::Grads {
        return Err(AmpError::backend(
            "sgd_update: the weights are read from Params or a buffer, got Grads",
        ));
    }
    if let Some(m) = momentum {
        if matches!(m.buffer, Slot::Params | Slot::Grads) || m.buffer == weights {
            return Err(AmpError::backend(format!(
                "sgd_update: the momentum buffer must be a buffer other than the \
                 weights ({weights:?}), got {:?}",
                m.buffer
            )));
        }
    }
    Ok(())
}

/// [`ParamStore::sgd_update`] as the sequence of store operations whose
/// element arithmetic [`elementwise::sgd`] fuses: axpy of the weight decay
/// into g, copy (first step) or scale and axpy of the momentum buffer, axpy
/// of Nesterov's term into g, and [`ParamStore::axpy_from`] writing θ.
pub fn sgd_update<S: ParamStore + ?Sized>(
    store: &mut S,
    weights: Slot,
    momentum: Option<&SgdMomentum<S::Scalar>>,
    coefficients: &[SgdCoefficients<S::Scalar>],
    mask: &[bool],
) -> Result<()> {
    let n = store.num_tensors();
    check_sgd_update(n, weights, momentum, coefficients, mask)?;
    let where_ = |f: &dyn Fn(&SgdCoefficients<S::Scalar>) -> bool| -> Vec<bool> {
        (0..n).map(|i| mask[i] && f(&coefficients[i])).collect()
    };
    let zero = S::Scalar::zero();
    let decay = where_(&|c| c.weight_decay != zero);
    if decay.contains(&true) {
        let lambda: Vec<S::Scalar> = coefficients.iter().map(|c| c.weight_decay).collect();
        store.axpy(Slot::Grads, &lambda, weights, &decay)?;
    }
    let update = match momentum {
        Some(m) => {
            let first = where_(&|c| c.first);
            let later = where_(&|c| !c.first);
            if first.contains(&true) {
                store.copy(m.buffer, Slot::Grads, &first)?;
            }
            if later.contains(&true) {
                store.scale(m.buffer, &vec![m.momentum; n], &later)?;
                store.axpy(m.buffer, &vec![m.keep; n], Slot::Grads, &later)?;
            }
            if m.nesterov {
                store.axpy(Slot::Grads, &vec![m.momentum; n], m.buffer, mask)?;
                Slot::Grads
            } else {
                m.buffer
            }
        }
        None => Slot::Grads,
    };
    let step: Vec<S::Scalar> = coefficients.iter().map(|c| c.step).collect();
    store.axpy_from(Slot::Params, weights, &step, update, mask)
}
