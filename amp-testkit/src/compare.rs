//! Comparing a run with the oracle's: the dtype's [`Tolerance`], widened
//! only where the case itself is ill-conditioned ([`Conditioning`]).
//!
//! A fixed relative tolerance judges a store fairly as long as the
//! algorithm passes rounding errors on at roughly their size. Some steps do
//! not: Adam's first step is `lr · g/(|g| + eps)`, and where `g` is a
//! cancellation of the size of `eps`, one rounding of θ moves the step by
//! `lr · eps · δg/(|g| + eps)²` — thousands of times the rounding. No store
//! can do better there, so the comparison allows, per value, a multiple of
//! how far the `f64` oracle itself moves when its initial weights move by
//! one rounding of the dtype. In a well-conditioned case that movement is
//! far below the tolerance and changes nothing.

use amp_core::{DType, HostTensor, OptimizerState, Result};

use crate::{run_case, Case, NdFactory, Outcome};

/// Tolerances for comparing a backend with the `f64` oracle.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    /// Relative tolerance, applied against the scale of each tensor.
    pub relative: f64,
}

impl Tolerance {
    /// The tolerance for a dtype, per step of a run.
    ///
    /// - `f64`: 1e-10. Backends differ from the oracle only in reduction order
    ///   (norms) and fused multiply-adds: a few ulps (1e-16) per operation,
    ///   amplified at most by ~10 operations per step and momentum.
    /// - `f32`: 5e-5. The weights are rounded to f32 at the start (≤ 6e-8
    ///   relative) and every operation rounds again; the projection divides by
    ///   a norm accumulated in f32 (error ≲ √n · 6e-8 for the sizes used),
    ///   and momentum accumulates errors over steps.
    /// - `bf16`/`f16`: 2e-2 (8 and 11 mantissa bits).
    ///
    /// Where the case magnifies rounding beyond these (see the module
    /// docs), [`Conditioning`] widens the bound value by value.
    pub fn for_dtype(dtype: DType) -> Self {
        let relative = match dtype {
            DType::F64 => 1e-10,
            DType::F32 => 5e-5,
            _ => 2e-2,
        };
        Tolerance { relative }
    }
}

/// Per value of an [`Outcome`], how far the `f64` oracle's outcome moves
/// when every initial weight `θⱼ` moves by one rounding of a dtype: the
/// largest change over two runs from `θⱼ · (1 ± u)`, the signs alternating
/// from element to element and swapped between the runs (`u` the dtype's
/// unit roundoff).
///
/// A comparison allows each value `FACTOR` times its spread where that
/// exceeds the tolerance's bound: a store rounds at every operation of
/// every step, not only once at the start.
#[derive(Clone, Debug)]
pub struct Conditioning {
    spread: Outcome,
}

impl Conditioning {
    /// How many times its spread a value may be off.
    pub const FACTOR: f64 = 4.0;

    /// The oracle's outcome for `case` and its conditioning in `dtype`.
    /// A perturbed run that fails (e.g. a non-finite loss the unperturbed
    /// run does not meet) contributes nothing.
    pub fn oracle(case: &Case, dtype: DType) -> Result<(Outcome, Conditioning)> {
        let want = run_case(&NdFactory, case, DType::F64)?;
        let u = crate::properties::unit_roundoff(dtype);
        let mut spread = zeroed(&want);
        for sign in [1.0, -1.0] {
            let mut moved = case.clone();
            let mut flip = sign;
            for t in &mut moved.init {
                for x in t.data_mut() {
                    *x *= 1.0 + flip * u;
                    flip = -flip;
                }
            }
            if let Ok(other) = run_case(&NdFactory, &moved, DType::F64) {
                widen(&mut spread, &want, &other);
            }
        }
        Ok((want, Conditioning { spread }))
    }

    /// Compares `got`, a run of `case` in `dtype`, with `want` at
    /// [`Tolerance::for_dtype`], widened by this conditioning (of the same
    /// case and dtype).
    pub fn compare(
        &self,
        case: &Case,
        got: &Outcome,
        want: &Outcome,
        dtype: DType,
    ) -> std::result::Result<(), String> {
        compare_outcomes(case, got, want, Tolerance::for_dtype(dtype), Some(self))
    }
}

/// Compares `got`, a run of `case` in `dtype`, with the oracle's run of
/// `oracle_case` (`case` itself, or `case` with what the run could not
/// update marked frozen) at the dtype's tolerance, widened by the oracle's
/// [`Conditioning`].
pub fn compare_with_oracle(
    case: &Case,
    oracle_case: &Case,
    got: &Outcome,
    dtype: DType,
) -> std::result::Result<(), String> {
    let (want, conditioning) =
        Conditioning::oracle(oracle_case, dtype).map_err(|e| format!("oracle run: {e}"))?;
    conditioning.compare(case, got, &want, dtype)
}

/// An outcome of the same structure with every value zero.
fn zeroed(like: &Outcome) -> Outcome {
    let zero = |t: &HostTensor| {
        let mut z = t.clone();
        z.data_mut().fill(0.0);
        z
    };
    let mut out = like.clone();
    out.params = like.params.iter().map(zero).collect();
    for (_, tensors) in &mut out.base_state.buffers {
        for t in tensors.iter_mut().flatten() {
            *t = zero(t);
        }
    }
    out.losses.fill(0.0);
    for norms in &mut out.perturbation_norms {
        norms.fill(0.0);
    }
    out
}

/// `spread = max(spread, |other − base|)` value by value, where `other`
/// has the structure of `base` (values it lacks are left alone).
fn widen(spread: &mut Outcome, base: &Outcome, other: &Outcome) {
    fn tensor(spread: &mut HostTensor, base: &HostTensor, other: &HostTensor) {
        if base.shape() != other.shape() {
            return;
        }
        for (s, (a, b)) in spread
            .data_mut()
            .iter_mut()
            .zip(base.data().iter().zip(other.data()))
        {
            *s = s.max((a - b).abs());
        }
    }
    for ((s, a), b) in spread
        .params
        .iter_mut()
        .zip(&base.params)
        .zip(&other.params)
    {
        tensor(s, a, b);
    }
    let buffers = spread.base_state.buffers.iter_mut();
    for ((s, a), b) in buffers
        .zip(&base.base_state.buffers)
        .zip(&other.base_state.buffers)
    {
        if s.0 != b.0 {
            continue;
        }
        for ((s, a), b) in s.1.iter_mut().zip(&a.1).zip(&b.1) {
            if let (Some(s), Some(a), Some(b)) = (s.as_mut(), a, b) {
                tensor(s, a, b);
            }
        }
    }
    for ((s, a), b) in spread
        .losses
        .iter_mut()
        .zip(&base.losses)
        .zip(&other.losses)
    {
        *s = s.max((a - b).abs());
    }
    let norms = spread.perturbation_norms.iter_mut();
    for ((s, a), b) in norms
        .zip(&base.perturbation_norms)
        .zip(&other.perturbation_norms)
    {
        for ((s, x), y) in s.iter_mut().zip(a).zip(b) {
            *s = s.max((x - y).abs());
        }
    }
}

/// The bound for one value: the tolerance's, or `FACTOR` times the value's
/// spread where that is larger.
fn bound(tolerance_bound: f64, spread: Option<f64>) -> f64 {
    tolerance_bound.max(Conditioning::FACTOR * spread.unwrap_or(0.0))
}

/// Compares two sets of tensors element by element:
/// `|a − b| ≤ relative · steps · (1 + scale)`, where `scale` is the largest
/// magnitude in the tensor of either side and of `reference_scale` (the
/// initial weights, whose magnitude bounds the cancellation error).
pub fn compare_tensors(
    what: &str,
    got: &[HostTensor],
    want: &[HostTensor],
    reference_scale: &[HostTensor],
    tolerance: Tolerance,
    steps: usize,
) -> std::result::Result<(), String> {
    compare_tensors_within(what, got, want, reference_scale, None, tolerance, steps)
}

/// [`compare_tensors`] with, per element, the bound widened to `FACTOR`
/// times `spread` where that is larger.
fn compare_tensors_within(
    what: &str,
    got: &[HostTensor],
    want: &[HostTensor],
    reference_scale: &[HostTensor],
    spread: Option<&[HostTensor]>,
    tolerance: Tolerance,
    steps: usize,
) -> std::result::Result<(), String> {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: {} tensors, expected {}",
            got.len(),
            want.len()
        ));
    }
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if g.shape() != w.shape() {
            return Err(format!(
                "{what}[{i}]: shape {:?}, expected {:?}",
                g.shape(),
                w.shape()
            ));
        }
        let max_abs = |t: &HostTensor| t.data().iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let scale = max_abs(g)
            .max(max_abs(w))
            .max(reference_scale.get(i).map(max_abs).unwrap_or(0.0));
        let tolerance_bound = tolerance.relative * steps.max(1) as f64 * (1.0 + scale);
        let spread = spread.and_then(|s| s.get(i)).map(|s| s.data());
        for (j, (a, b)) in g.data().iter().zip(w.data()).enumerate() {
            let bound = bound(tolerance_bound, spread.and_then(|s| s.get(j).copied()));
            let ok = (a - b).abs() <= bound || (a.is_nan() && b.is_nan()) || a == b;
            if !ok {
                return Err(format!(
                    "{what}[{i}][{j}]: got {a:e}, expected {b:e} (|Δ| {:e} > bound {bound:e})",
                    (a - b).abs()
                ));
            }
        }
    }
    Ok(())
}

/// Compares a backend's outcome with the oracle's: weights, the base
/// optimiser's state, closure calls, losses and perturbation norms, at
/// `tolerance`, widened where `conditioning` (of the same case and dtype)
/// says the case magnifies rounding.
pub fn compare_outcomes(
    case: &Case,
    got: &Outcome,
    want: &Outcome,
    tolerance: Tolerance,
    conditioning: Option<&Conditioning>,
) -> std::result::Result<(), String> {
    let steps = case.steps;
    let spread = conditioning.map(|c| &c.spread);
    compare_tensors_within(
        "params",
        &got.params,
        &want.params,
        &case.init,
        spread.map(|s| s.params.as_slice()),
        tolerance,
        steps,
    )?;
    compare_states(
        &got.base_state,
        &want.base_state,
        &case.init,
        spread.map(|s| &s.base_state),
        tolerance,
        steps,
    )?;
    if got.closure_calls != want.closure_calls {
        return Err(format!(
            "closure calls: {} vs {}",
            got.closure_calls, want.closure_calls
        ));
    }
    let close = |a: f64, b: f64, spread: Option<f64>| {
        let scale = a.abs().max(b.abs());
        let tolerance_bound = tolerance.relative * 10.0 * steps.max(1) as f64 * (1.0 + scale);
        (a - b).abs() <= bound(tolerance_bound, spread)
    };
    for (s, (a, b)) in got.losses.iter().zip(&want.losses).enumerate() {
        if !close(*a, *b, spread.and_then(|o| o.losses.get(s).copied())) {
            return Err(format!("loss at step {s}: {a:e} vs {b:e}"));
        }
    }
    for (s, (a, b)) in got
        .perturbation_norms
        .iter()
        .zip(&want.perturbation_norms)
        .enumerate()
    {
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            let spread = spread
                .and_then(|o| o.perturbation_norms.get(s))
                .and_then(|n| n.get(i).copied());
            if !close(*x, *y, spread) {
                return Err(format!("‖δ‖ of tensor {i} at step {s}: {x:e} vs {y:e}"));
            }
        }
    }
    Ok(())
}

/// Compares two base-optimiser states: the same buffers, initialised for
/// the same tensors, with values at ten times `tolerance` (they accumulate
/// over steps) widened by `spread` (a [`Conditioning`]'s, per value), and
/// the same host values (step counts) exactly.
fn compare_states(
    got: &OptimizerState,
    want: &OptimizerState,
    like: &[HostTensor],
    spread: Option<&OptimizerState>,
    tolerance: Tolerance,
    steps: usize,
) -> std::result::Result<(), String> {
    let names =
        |s: &OptimizerState| -> Vec<String> { s.buffers.iter().map(|b| b.0.clone()).collect() };
    if names(got) != names(want) {
        return Err(format!(
            "state buffers {:?}, expected {:?}",
            names(got),
            names(want)
        ));
    }
    if got.scalars != want.scalars {
        return Err(format!(
            "state values {:?}, expected {:?}",
            got.scalars, want.scalars
        ));
    }
    let unwrap = |m: &[Option<HostTensor>]| -> Vec<HostTensor> {
        m.iter()
            .zip(like)
            .map(|(t, p)| {
                t.clone().unwrap_or_else(|| {
                    let mut zeros = p.clone();
                    zeros.data_mut().fill(0.0);
                    zeros
                })
            })
            .collect()
    };
    for (k, ((name, g), (_, w))) in got.buffers.iter().zip(&want.buffers).enumerate() {
        if g.len() != w.len() {
            return Err(format!("{name}: {} tensors, expected {}", g.len(), w.len()));
        }
        for (i, (a, b)) in g.iter().zip(w).enumerate() {
            if a.is_some() != b.is_some() {
                return Err(format!(
                    "{name}[{i}]: initialised {} vs {}",
                    a.is_some(),
                    b.is_some()
                ));
            }
        }
        let spread = spread
            .and_then(|s| s.buffers.get(k))
            .filter(|(n, _)| n == name)
            .map(|(_, tensors)| unwrap(tensors));
        compare_tensors_within(
            name,
            &unwrap(g),
            &unwrap(w),
            like,
            spread.as_deref(),
            Tolerance {
                relative: tolerance.relative * 10.0,
            },
            steps,
        )?;
    }
    Ok(())
}
