//! One step: [`Amp::step`] and the inner loop it runs.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

use super::{Amp, Mode};
use crate::config::NonFinitePolicy;
use crate::error::{AmpError, Result};
use crate::grad_fn::{GradFn, Pass};
use crate::optimizer::{BaseOptimizer, StepContext};
use crate::report::StepReport;
use crate::store::{check_len, ParamStore, Scalar, Slot, PROJECTION_GUARD};

/// How far a step has come, kept outside the code that may fail or panic so
/// that θ can be brought back afterwards.
#[derive(Debug, Default)]
pub(super) struct Progress {
    /// The tensors the step works on (those with a clean gradient).
    pub(super) active: Vec<bool>,
    /// `true` while the parameters may hold something other than θ that
    /// the mode can undo: θ + δ, or (copy modes) a base update in progress.
    pub(super) moved: bool,
}

/// A failed step: the error, and the report when the clean pass got that
/// far (a skipped step returns it).
struct Failure<O> {
    error: AmpError,
    report: Option<Box<StepReport<O>>>,
}

impl<O> From<AmpError> for Failure<O> {
    fn from(error: AmpError) -> Self {
        Failure {
            error,
            report: None,
        }
    }
}

impl<S: ParamStore, O: BaseOptimizer<S>> Amp<S, O> {
    /// One AMP step with a closure `|store, pass| -> Result<(output, loss), E>`.
    /// See [`Amp`] for the algorithm and [`GradFn`] for the contract.
    pub fn step<F, Out, E>(&mut self, mut closure: F) -> Result<StepReport<Out>>
    where
        F: FnMut(&mut S, Pass) -> std::result::Result<(Out, f64), E>,
        E: Into<crate::error::BoxError>,
    {
        self.step_with(&mut closure)
    }

    /// One AMP step with any [`GradFn`].
    pub fn step_with<G: GradFn<S>>(&mut self, grad_fn: &mut G) -> Result<StepReport<G::Output>> {
        // Either counter may be the one this step increments.
        if self.steps == u64::MAX {
            return Err(AmpError::CounterOverflow("steps"));
        }
        if self.skipped_steps == u64::MAX {
            return Err(AmpError::CounterOverflow("skipped_steps"));
        }
        let mut progress = Progress::default();
        let outcome = catch_unwind(AssertUnwindSafe(|| self.run(grad_fn, &mut progress)));
        let failure = match self.settle(&progress, outcome)? {
            Ok(report) => {
                self.steps += 1;
                if let Some(scaler) = &mut self.scaler {
                    scaler.finite_step();
                }
                return Ok(report);
            }
            Err(failure) => failure,
        };
        match (failure.error, failure.report) {
            (
                error @ (AmpError::NonFiniteLoss { .. } | AmpError::NonFiniteGradient { .. }),
                Some(mut report),
            ) if self.scaler.is_some() || self.config.non_finite == NonFinitePolicy::Skip => {
                // An overflow under a loss scale: one verdict for every
                // pass of the step, which is skipped; the scale backs off.
                if let Some(scaler) = &mut self.scaler {
                    scaler.overflow();
                }
                self.skipped_steps += 1;
                report.skipped = Some(error);
                Ok(*report)
            }
            (error, _) => Err(error),
        }
    }

    /// What code that moved θ (tracked in `progress`) came to, run under
    /// `catch_unwind`: passed through when it succeeded; after an error, θ
    /// brought back and the error handed on — unless bringing θ back failed
    /// too, which is reported over it (the weights are then not θ and the
    /// caller must know); after a panic, θ brought back (a second panic
    /// while doing so is swallowed, not an abort) and the panic resumed.
    /// The one place [`Amp::step_with`] and [`Amp::perturb_with`] end.
    pub(super) fn settle<T, E>(
        &mut self,
        progress: &Progress,
        outcome: std::thread::Result<std::result::Result<T, E>>,
    ) -> Result<std::result::Result<T, E>> {
        match outcome {
            Ok(Ok(value)) => Ok(Ok(value)),
            Ok(Err(error)) => {
                self.restore(progress)?;
                Ok(Err(error))
            }
            Err(panic) => {
                let _ = catch_unwind(AssertUnwindSafe(|| self.restore(progress)));
                resume_unwind(panic);
            }
        }
    }

    /// Brings θ back after a failed or panicked step, as far as the mode
    /// allows (see [`Amp`]).
    pub(super) fn restore(&mut self, progress: &Progress) -> Result<()> {
        if !progress.moved {
            return Ok(());
        }
        match self.mode {
            Mode::FusedCopy { snapshot } | Mode::Copy { snapshot, .. } => {
                self.store
                    .copy(Slot::Params, Slot::Buffer(snapshot), &progress.active)
            }
            Mode::Subtract { delta } => self.store.axpy(
                Slot::Params,
                &self.neg_ones,
                Slot::Buffer(delta),
                &progress.active,
            ),
            Mode::Erm => Ok(()),
        }
    }

    /// The step proper; it leaves restoring θ to [`Amp::step_with`].
    fn run<G: GradFn<S>>(
        &mut self,
        grad_fn: &mut G,
        progress: &mut Progress,
    ) -> std::result::Result<StepReport<G::Output>, Failure<G::Output>> {
        self.store.zero_grads()?;
        self.store.prepare_pass(Pass::Clean)?;
        self.begin_pass();
        let last = !self.perturbs_now();
        let (output, loss) = self.evaluate_pass(grad_fn, Pass::Clean, last)?;
        let mut report = StepReport {
            output,
            loss,
            perturbed_losses: Vec::new(),
            perturbation_norms: vec![0.0; self.store.num_tensors()],
            clipped: 0,
            closure_calls: 1,
            skipped: None,
            perturbed: false,
        };
        match self.finish(grad_fn, progress, &mut report) {
            Ok(()) => Ok(report),
            Err(error) => Err(Failure {
                error,
                report: Some(Box::new(report)),
            }),
        }
    }

    /// Everything after the clean closure call.
    fn finish<G: GradFn<S>>(
        &mut self,
        grad_fn: &mut G,
        progress: &mut Progress,
        report: &mut StepReport<G::Output>,
    ) -> Result<()> {
        check_loss(Pass::Clean, report.loss)?;
        let active = self.clean_mask()?;
        progress.active = active.clone();

        let perturb = self.perturbs_now();
        if perturb {
            let inner_iter = self.config.inner_iter;
            let mut last_norms = None;
            for k in 1..=inner_iter {
                last_norms = Some(self.ascend(k, &active, progress)?);
                self.perturbed_pass(
                    grad_fn,
                    Pass::Perturbed { k, of: inner_iter },
                    &active,
                    report,
                )?;
            }
            if let Some(norms) = last_norms {
                self.report_norms(
                    &norms,
                    &active,
                    &mut report.perturbation_norms,
                    &mut report.clipped,
                )?;
            }
        }
        report.perturbed = perturb;
        let ctx = StepContext {
            lr: &self.lr,
            weight_decay: &self.weight_decay,
            mask: &active,
            step: self.steps,
        };
        match (perturb, self.mode) {
            // With copy-restore the base step reads θ from the snapshot and
            // writes over θ + δ: restoring costs no pass of its own, and on
            // failure θ comes back from the snapshot (`progress.moved`).
            (true, Mode::FusedCopy { snapshot } | Mode::Copy { snapshot, .. }) => self
                .base
                .step_from(&mut self.store, &ctx, Slot::Buffer(snapshot)),
            (true, Mode::Subtract { delta }) => {
                self.store
                    .axpy(Slot::Params, &self.neg_ones, Slot::Buffer(delta), &active)?;
                progress.moved = false;
                self.base.step(&mut self.store, &ctx)
            }
            _ => self.base.step(&mut self.store, &ctx),
        }
    }

    /// Whether the step about to be taken perturbs: `inner_iter ≥ 1`, and
    /// the recipes of [`AmpConfig`](crate::AmpConfig) (`start_step`,
    /// `interval`) say so for this step.
    pub(super) fn perturbs_now(&self) -> bool {
        let c = &self.config;
        self.mode != Mode::Erm
            && self.steps >= c.start_step
            && (self.steps - c.start_step) % c.interval.max(1) == 0
    }

    /// The tensors with a clean gradient, checked: one entry per tensor, at
    /// least one, all finite.
    pub(super) fn clean_mask(&mut self) -> Result<Vec<bool>> {
        let active = self.store.grad_mask()?;
        if active.len() != self.store.num_tensors() {
            return Err(AmpError::contract(format!(
                "grad_mask returned {} entries for {} tensors",
                active.len(),
                self.store.num_tensors()
            )));
        }
        if !active.iter().any(|&a| a) {
            return Err(AmpError::NoGradient);
        }
        self.check_gradients(Pass::Clean, &active)?;
        Ok(active)
    }

    /// Before a closure call: a loss scale's gradients are scaled again.
    fn begin_pass(&self) {
        if let Some(scaler) = &self.scaler {
            scaler.handle.begin_pass();
        }
    }

    /// Checks a gradient mask against the clean pass's, divides the
    /// gradients by the loss scale (unless the closure did), and checks them
    /// for finiteness.
    fn check_gradients(&mut self, pass: Pass, active: &[bool]) -> Result<()> {
        if pass.is_perturbed() {
            let mask = self.store.grad_mask()?;
            check_len("gradient mask", active.len(), mask.len())?;
            if let Some(index) = (0..active.len()).find(|&i| active[i] && !mask[i]) {
                return Err(AmpError::MissingGradient { pass, index });
            }
        }
        if let Some(scaler) = &self.scaler {
            scaler.handle.finish_pass(&mut self.store, active)?;
        }
        let finite = self.store.all_finite(Slot::Grads, active);
        if self.agree(finite)? {
            Ok(())
        } else {
            Err(AmpError::NonFiniteGradient { pass })
        }
    }

    /// Ascent step k from the gradient in the store, and the projection: on
    /// success the weights are θ + δ_k. Returns the norms the projection
    /// used.
    pub(super) fn ascend(
        &mut self,
        k: usize,
        active: &[bool],
        progress: &mut Progress,
    ) -> Result<S::Norms> {
        let (snapshot, delta) = (self.mode.snapshot(), self.mode.delta());
        if k == 1 {
            // δ = clip(ζ·g) from δ = 0, the snapshot of θ and θ ← θ + δ in
            // one fused store operation; θ is untouched if it fails.
            let norms = self.store.perturb_from_grads(
                snapshot,
                delta,
                &self.inner_lr,
                &self.epsilon,
                active,
            )?;
            progress.moved = true;
            return Ok(norms);
        }
        let Some(delta) = delta else {
            // `Mode::build` gives every mode with K ≥ 2 a δ buffer.
            return Err(AmpError::contract("no δ buffer for inner_iter ≥ 2"));
        };
        if snapshot.is_none() {
            // Subtract mode: step back from θ + δ_{k−1} before δ changes.
            self.store
                .axpy(Slot::Params, &self.neg_ones, delta, active)?;
            progress.moved = false;
        }
        // Ascent δ ← δ + ζ·g, then the projection onto each tensor's ε-ball.
        self.store
            .axpy(delta, &self.inner_lr, Slot::Grads, active)?;
        let norms = self.store.norms(delta, active)?;
        self.store
            .clip_to_norms(delta, &norms, &self.epsilon, active)?;
        // Weights to θ + δ.
        if let Some(snapshot) = snapshot {
            self.store.copy(Slot::Params, snapshot, active)?;
        }
        self.store.axpy(Slot::Params, &self.ones, delta, active)?;
        progress.moved = true;
        Ok(norms)
    }

    /// A closure call at θ + δ_k, its loss and gradients checked.
    pub(super) fn perturbed_pass<G: GradFn<S>>(
        &mut self,
        grad_fn: &mut G,
        pass: Pass,
        active: &[bool],
        report: &mut StepReport<G::Output>,
    ) -> Result<()> {
        self.store.zero_grads()?;
        self.store.prepare_pass(pass)?;
        self.begin_pass();
        report.closure_calls += 1;
        let last = matches!(pass, Pass::Perturbed { k, of } if k == of);
        let (_, loss) = self.evaluate_pass(grad_fn, pass, last)?;
        report.perturbed_losses.push(loss);
        check_loss(pass, loss)?;
        self.check_gradients(pass, active)
    }

    /// ‖δ_K‖ per tensor and the number of tensors clipped, from the norms
    /// the last projection used.
    pub(super) fn report_norms(
        &self,
        norms: &S::Norms,
        active: &[bool],
        out: &mut [f64],
        clipped: &mut usize,
    ) -> Result<()> {
        let norms = self.store.norms_to_host(norms)?;
        check_len("norms", active.len(), norms.len())?;
        *clipped = 0;
        for (i, &norm) in norms.iter().enumerate() {
            if !active[i] {
                continue;
            }
            let epsilon = self.epsilon[i].widen();
            let coefficient = (epsilon / (norm + PROJECTION_GUARD)).min(1.0);
            if coefficient < 1.0 {
                *clipped += 1;
            }
            out[i] = norm * coefficient;
        }
        Ok(())
    }
}

pub(super) fn check_loss(pass: Pass, value: f64) -> Result<()> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(AmpError::NonFiniteLoss { pass, value })
    }
}
