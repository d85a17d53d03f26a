//! The fused [`ParamStore`] operations written with the basic ones.
//!
//! [`ParamStore::perturb_from_grads`] and [`ParamStore::axpy_from`] are
//! provided methods whose defaults call these functions. A store that fuses
//! them for some of its tensors (say, dense CPU tensors) calls the function
//! here for the others, and the workspace's conformance suite checks that
//! both give the same result.

use num_traits::One;

use crate::error::{AmpError, Result};
use crate::store::{check_len, ParamStore, Slot};

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
