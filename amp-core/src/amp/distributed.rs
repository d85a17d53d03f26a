//! Data-parallel steps: the closure call of each pass, with the ranks'
//! agreement on how it went and the reduction of its gradients.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

use super::Amp;
use crate::collective::{Collective, Reduce};
use crate::config::RestoreMode;
use crate::error::{AmpError, Result};
use crate::grad_fn::{GradFn, Pass};
use crate::optimizer::BaseOptimizer;
use crate::store::ParamStore;

impl<S: ParamStore, O: BaseOptimizer<S>> Amp<S, O> {
    /// Makes this optimiser one rank of a data-parallel job: every step
    /// averages gradients across the ranks of `collective` as
    /// [`AmpConfig::reduce`](crate::AmpConfig::reduce) says, and agrees
    /// with them on everything that steers it, so that ranks that start
    /// from the same weights (and optimiser state) keep the same weights,
    /// bit for bit:
    ///
    /// - after each closure call, whether it succeeded, whether its loss is
    ///   finite, and which tensors have a gradient: a closure that fails or
    ///   panics on one rank ends the step on all of them (the others return
    ///   [`AmpError::PeerFailed`]; a panic is resumed on its own rank), a
    ///   non-finite loss on one rank counts on all of them, and gradients
    ///   on some ranks only are [`AmpError::RanksDisagree`];
    /// - after each pass's gradients are reduced (and unscaled), whether
    ///   they are finite: a NaN on one rank skips (or fails) the step on
    ///   all ranks, and a loss scale backs off on all of them alike.
    ///
    /// The report's losses are this rank's own (NaN where another rank's
    /// was not finite). The split step ([`Amp::perturb`]) does not support
    /// a collective (its base step is the caller's).
    ///
    /// Errors ([`AmpError::InvalidConfig`]): a rank outside
    /// `0..world_size`, and [`Reduce::FinalPass`] with
    /// [`RestoreMode::Subtract`] (ranks would restore θ from different δ
    /// with different rounding).
    pub fn with_collective(mut self, collective: Box<dyn Collective<S>>) -> Result<Self> {
        let (rank, world) = (collective.rank(), collective.world_size());
        if rank >= world {
            return Err(AmpError::config(
                "collective",
                format!("rank {rank} of a world of {world}"),
            ));
        }
        if self.config.reduce == Reduce::FinalPass && self.config.restore == RestoreMode::Subtract {
            return Err(AmpError::config(
                "reduce",
                "final_pass reduction needs restore = copy: each rank holds its own δ, and \
                 θ + δ − δ rounds differently on each",
            ));
        }
        self.collective = Some(collective);
        Ok(self)
    }

    /// This rank and the number of ranks, when the optimiser is one rank of
    /// a data-parallel job ([`Amp::with_collective`]).
    pub fn rank_and_world_size(&self) -> Option<(usize, usize)> {
        self.collective.as_ref().map(|c| (c.rank(), c.world_size()))
    }

    /// Whether the optimiser is one rank of a data-parallel job.
    pub(super) fn is_distributed(&self) -> bool {
        self.collective.is_some()
    }

    /// One closure call and the gradients it leaves, collected; with a
    /// collective, agreed on and reduced (`last`: the pass whose gradient
    /// the base step uses).
    pub(super) fn evaluate_pass<G: GradFn<S>>(
        &mut self,
        grad_fn: &mut G,
        pass: Pass,
        last: bool,
    ) -> Result<(G::Output, f64)> {
        if self.collective.is_none() {
            let out = grad_fn
                .evaluate(&mut self.store, pass)
                .map_err(|source| AmpError::Closure { pass, source })?;
            self.store.collect_grads()?;
            return Ok(out);
        }
        let n = self.store.num_tensors();
        let store = &mut self.store;
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let out = grad_fn
                .evaluate(store, pass)
                .map_err(|source| AmpError::Closure { pass, source })?;
            store.collect_grads()?;
            let mask = store.grad_mask()?;
            if mask.len() != n {
                return Err(AmpError::contract(format!(
                    "grad_mask returned {} entries for {n} tensors",
                    mask.len()
                )));
            }
            Ok((out, mask))
        }));
        // Every rank states how its pass went, failed or not, before any
        // acts on it: a rank that returned early would leave the others
        // waiting.
        let mut flags = vec![false; 2 + 2 * n];
        if let Ok(Ok(((_, loss), mask))) = &outcome {
            flags[0] = true;
            flags[1] = loss.is_finite();
            for (i, &m) in mask.iter().enumerate() {
                flags[2 + i] = m;
                flags[2 + n + i] = !m;
            }
        }
        let agreed = self.collective_mut()?.all_and(&flags);
        let ((output, loss), mask) = match outcome {
            Err(panic) => resume_unwind(panic),
            Ok(Err(error)) => return Err(error),
            Ok(Ok(done)) => done,
        };
        let agreed = agreed?;
        if !agreed[0] {
            return Err(AmpError::PeerFailed { pass });
        }
        if let Some(index) = (0..n).find(|&i| !agreed[2 + i] && !agreed[2 + n + i]) {
            return Err(AmpError::RanksDisagree {
                pass,
                reason: format!("tensor {index} has a gradient on some ranks only"),
            });
        }
        // A non-finite loss on any rank is one on every rank.
        let loss = if agreed[1] || !loss.is_finite() {
            loss
        } else {
            f64::NAN
        };
        if last || self.config.reduce == Reduce::EveryPass {
            let collective = self
                .collective
                .as_mut()
                .ok_or_else(|| AmpError::contract("no collective"))?;
            collective.mean_grads(&mut self.store, &mask)?;
        }
        Ok((output, loss))
    }

    /// A verdict every rank shares: `local` (this rank's, or its error)
    /// AND-ed over the ranks. Without a collective, `local` itself. A rank
    /// whose own check failed still takes part (saying `false`), then
    /// returns its error.
    pub(super) fn agree(&mut self, local: Result<bool>) -> Result<bool> {
        if self.collective.is_none() {
            return local;
        }
        let mine = matches!(local, Ok(true));
        let agreed = self.collective_mut()?.all_and(&[mine]);
        let local = local?;
        Ok(local && agreed?.first().copied().unwrap_or(false))
    }

    fn collective_mut(&mut self) -> Result<&mut Box<dyn Collective<S>>> {
        self.collective
            .as_mut()
            .ok_or_else(|| AmpError::contract("no collective"))
    }
}
