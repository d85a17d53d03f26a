//! The framework side of a backend: runs whose gradients come from the
//! framework's own autograd instead of the host.
//!
//! The rest of the kit writes host-computed gradients into
//! [`Slot::Grads`], which checks the store's arithmetic but not the parts an
//! adapter writes for its framework: the model reading the store's weights
//! (or, for frameworks whose modules own immutable tensors, being rebuilt
//! from them in [`ParamStore::prepare_pass`]), the backward pass, and the
//! gradients collected from it. An [`AutogradFactory`] computes the
//! [`Objective`] with the framework's own operations on the model's
//! parameters and runs its backward pass; the properties here check that
//!
//! - the model sees θ on the clean pass and θ + δₖ on perturbed pass k: the
//!   loss and gradients the framework computes equal the host's at the
//!   weights the store holds at that moment ([`model_sees_each_pass`]);
//! - the gradients it collects are present exactly for the tensors the loss
//!   depends on (frozen tensors have none);
//! - the model handed back between steps computes the loss at the updated θ;
//! - the whole run agrees with the ndarray oracle fed host gradients
//!   ([`autograd_matches_oracle`]).
//!
//! Instantiate both for a backend with [`autograd_suite!`](crate::autograd_suite).

use std::cell::RefCell;

use amp_core::{AmpError, DType, HostTensor, ParamStore, Pass, Result, Slot};

use crate::properties::{fail, unit_roundoff, Check};
use crate::{
    compare_with_oracle, host_values, read_slot, run_case_with, Case, Objective, Outcome,
    StoreFactory,
};

/// A [`StoreFactory`] whose framework computes the conformance objective
/// and its gradients itself.
pub trait AutogradFactory: StoreFactory {
    /// One closure call done the framework's way: the [`Objective`]'s loss
    /// computed with the framework's operations from the model's parameters
    /// as the model holds them now, its backward pass run, and the
    /// gradients handed to the store through the adapter's own collection
    /// path. Returns the loss.
    ///
    /// Compute in `f64` (cast each parameter up first, so that the
    /// gradient is rounded to the store's dtype once, on the way back): the
    /// properties then allow only that rounding. A frozen tensor
    /// ([`Objective::frozen`]) enters the loss detached, so that it gets no
    /// gradient.
    fn loss_and_grads(&self, store: &mut Self::Store, objective: &Objective) -> Result<f64>;

    /// The loss of the model as a user holds it between steps (after
    /// taking it back from the store the adapter's way), without a
    /// backward pass.
    fn model_loss(&self, store: &mut Self::Store, objective: &Objective) -> Result<f64>;
}

/// What went wrong inside a run, first one first.
type Violations = RefCell<Vec<String>>;

/// A run with the framework's gradients.
#[derive(Debug)]
pub struct AutogradRun {
    /// What the run produced.
    pub outcome: Outcome,
    /// Every violation seen inside the run, first one first.
    pub violations: Vec<String>,
    /// Tensors with no elements that the framework gave no gradient (candle
    /// records no operation on an empty tensor, so its backward pass has
    /// none for them; libtorch gives an empty one). Nothing is lost: there
    /// is nothing to update. The oracle run treats them as frozen.
    pub empty_without_grad: Vec<usize>,
}

/// Runs `case` with the framework's gradients, checking each closure call
/// and the model after each step. `Ok(None)` when the framework gave no
/// gradient at all and every tensor that should have one is empty (there
/// is nothing to run).
pub fn run_autograd<F: AutogradFactory>(
    factory: &F,
    case: &Case,
    dtype: DType,
) -> Result<Option<AutogradRun>> {
    let violations: Violations = RefCell::new(Vec::new());
    let empty_without_grad: RefCell<Option<Vec<usize>>> = RefCell::new(None);
    let objective = &case.objective;
    let outcome = run_case_with(
        factory,
        case,
        dtype,
        |store: &mut F::Store, pass: Pass| {
            let theta = read_slot(store, Slot::Params)?;
            let (want_loss, want_grads) = objective.evaluate(&host_values(&theta));
            let loss = factory.loss_and_grads(store, objective)?;
            check_loss(
                &violations,
                &format!("{pass}: the framework's loss"),
                (loss, want_loss, loss_bound(objective, &theta, want_loss)),
                "the model does not see them",
            );
            let mask = store.grad_mask()?;
            empty_without_grad.borrow_mut().get_or_insert_with(|| {
                (0..theta.len())
                    .filter(|&i| {
                        theta[i].data().is_empty() && !mask.get(i).copied().unwrap_or(true)
                    })
                    .collect()
            });
            check_grads(store, pass, objective, &theta, &want_grads, &violations)?;
            Ok(((), loss))
        },
        |store: &mut F::Store, step: usize| {
            let theta = read_slot(store, Slot::Params)?;
            let (want, _) = objective.evaluate(&host_values(&theta));
            let got = factory.model_loss(store, objective)?;
            check_loss(
                &violations,
                &format!("after step {step}: the model's loss"),
                (got, want, loss_bound(objective, &theta, want)),
                "the model handed back is not θ",
            );
            Ok(())
        },
    );
    let nothing_to_run = case
        .init
        .iter()
        .zip(&objective.frozen)
        .all(|(t, &frozen)| frozen || t.data().is_empty());
    match outcome {
        Err(AmpError::NoGradient) if nothing_to_run => Ok(None),
        Err(e) => Err(e),
        Ok(outcome) => Ok(Some(AutogradRun {
            outcome,
            violations: violations.into_inner(),
            empty_without_grad: empty_without_grad.into_inner().unwrap_or_default(),
        })),
    }
}

fn note(violations: &Violations, message: String) {
    violations.borrow_mut().push(message);
}

/// Notes a loss `got` farther than `bound` from the host's `want` at the
/// store's weights.
fn check_loss(violations: &Violations, what: &str, (got, want, bound): (f64, f64, f64), why: &str) {
    let gap = (got - want).abs();
    if gap.is_nan() || gap > bound {
        note(
            violations,
            format!(
                "{what} {got:e} is not the loss {want:e} at the store's weights \
                 (|Δ| > {bound:e}): {why}"
            ),
        );
    }
}

/// How far two `f64` evaluations of the loss at the same weights may differ:
/// the terms are summed in another order. Every term is non-negative except
/// inside the coupling sum `s`, whose cancellation is bounded by `Σ|wθ|`.
fn loss_bound(objective: &Objective, theta: &[HostTensor], loss: f64) -> f64 {
    let s_abs = coupling_abs(objective, theta);
    1e-9 * (1.0 + loss.abs() + objective.coupling * s_abs * s_abs)
}

/// `Σ |w θ|` over every element.
fn coupling_abs(objective: &Objective, theta: &[HostTensor]) -> f64 {
    theta
        .iter()
        .zip(&objective.coupling_weights)
        .map(|(t, w)| {
            t.data()
                .iter()
                .zip(w)
                .map(|(x, w)| (x * w).abs())
                .sum::<f64>()
        })
        .sum()
}

/// The gradients in the store after the framework's backward pass against
/// the host's: present exactly where the loss depends on the tensor, equal
/// up to their rounding to the store's dtype.
fn check_grads<S: ParamStore>(
    store: &S,
    pass: Pass,
    objective: &Objective,
    theta: &[HostTensor],
    want: &[Option<Vec<f64>>],
    violations: &Violations,
) -> Result<()> {
    let mask = store.grad_mask()?;
    let u = unit_roundoff(store.dtype());
    let s_abs = coupling_abs(objective, theta);
    for (i, want) in want.iter().enumerate() {
        let present = mask.get(i).copied().unwrap_or(false);
        let Some(want) = want else {
            if present {
                note(
                    violations,
                    format!("{pass}: tensor {i} is frozen but has a gradient"),
                );
            }
            continue;
        };
        if !present && !want.is_empty() {
            note(
                violations,
                format!("{pass}: tensor {i} has no gradient after the backward pass"),
            );
            continue;
        }
        if !present {
            continue;
        }
        let got = store.read(Slot::Grads, i)?;
        let max_w = objective.coupling_weights[i]
            .iter()
            .fold(0.0f64, |m, w| m.max(w.abs()));
        let max_g = want.iter().fold(0.0f64, |m, g| m.max(g.abs()));
        let bound = (4.0 * u + 1e-9) * (1.0 + max_g + objective.coupling * s_abs * max_w);
        if let Some((j, (g, w))) = got.data().iter().zip(want).enumerate().find(|(_, (g, w))| {
            let gap = (*g - *w).abs();
            gap.is_nan() || gap > bound
        }) {
            note(
                violations,
                format!(
                    "{pass}: gradient [{i}][{j}] from the framework is {g:e}, the host's at the \
                     store's weights {w:e} (|Δ| > {bound:e})"
                ),
            );
        }
    }
    Ok(())
}

/// The framework's losses and gradients at every pass are those at the
/// weights the store holds (θ on the clean pass, θ + δₖ on perturbed pass
/// k), only tensors the loss depends on get gradients, and the model taken
/// back after each step computes the loss at the new θ.
pub fn model_sees_each_pass<F: AutogradFactory>(factory: &F, case: &Case, dtype: DType) -> Check {
    let Some(run) = run_autograd(factory, case, dtype).map_err(fail("autograd run"))? else {
        return Ok(());
    };
    match run.violations.into_iter().next() {
        None => Ok(()),
        Some(first) => Err(format!("{} {dtype}: {first}", factory.name())),
    }
}

/// A run with the framework's gradients agrees with the ndarray `f64`
/// oracle fed host gradients, at the tolerance of the conformance suite.
pub fn autograd_matches_oracle<F: AutogradFactory>(
    factory: &F,
    case: &Case,
    dtype: DType,
) -> Check {
    let Some(run) = run_autograd(factory, case, dtype).map_err(fail("autograd run"))? else {
        return Ok(());
    };
    let mut oracle_case = case.clone();
    for &i in &run.empty_without_grad {
        oracle_case.objective.frozen[i] = true;
    }
    compare_with_oracle(case, &oracle_case, &run.outcome, dtype)
        .map_err(|e| format!("{} {dtype} (autograd): {e}", factory.name()))
}

/// Instantiates the framework-side properties for one backend and dtype:
/// `autograd_suite!(module_name, factory_expression, DType::F32);` with a
/// factory implementing [`AutogradFactory`].
#[macro_export]
macro_rules! autograd_suite {
    ($module:ident, $factory:expr, $dtype:expr) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;
            use $crate::proptest::prelude::*;
            use $crate::{autograd, strategies};

            $crate::conformance_suite!(@tests autograd; $factory, $dtype;
                model_sees_each_pass,
                autograd_matches_oracle
            );
        }
    };
}
