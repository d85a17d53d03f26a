//! The split step: AMP's perturbation without its base step, for stepping
//! the weights with another framework's optimiser.

use std::panic::{catch_unwind, AssertUnwindSafe};

use super::step::Progress;
use super::Amp;
use crate::config::AmpConfig;
use crate::error::{AmpError, Result};
use crate::grad_fn::{GradFn, Pass};
use crate::optimizer::{BaseOptimizer, OptimizerState, StepContext};
use crate::report::StepReport;
use crate::store::ParamStore;

/// The base optimiser of an [`Amp`] built for the split step
/// ([`Amp::external`]): the weights are stepped by the caller's own
/// optimiser, so [`Amp::step`] refuses to run (it has no base step to take).
#[derive(Clone, Copy, Debug, Default)]
pub struct External;

impl<S: ParamStore> BaseOptimizer<S> for External {
    fn kind(&self) -> &'static str {
        "external"
    }

    fn step(&mut self, _store: &mut S, _ctx: &StepContext<'_, S::Scalar>) -> Result<()> {
        Err(AmpError::config(
            "base",
            "this optimiser was built with Amp::external for the split step: call \
             Amp::perturb, compute the gradient at θ + δ, restore, and step with \
             your own optimiser",
        ))
    }

    fn save_state(&self, _store: &S) -> Result<OptimizerState> {
        Ok(OptimizerState::default())
    }

    fn load_state(&mut self, _store: &mut S, state: &OptimizerState) -> Result<()> {
        if state.buffers.is_empty() && state.scalars.is_empty() {
            Ok(())
        } else {
            Err(AmpError::state(
                "an external optimiser keeps its own state; this state holds some",
            ))
        }
    }
}

impl<S: ParamStore> Amp<S, External> {
    /// AMP's perturbation without a base optimiser, for the split step
    /// ([`Amp::perturb`]) with the optimiser of your own framework. The
    /// configuration's `lr` and `weight_decay` are not used (your
    /// optimiser has its own); `epsilon`, `inner_lr`, `inner_iter`,
    /// `restore`, `interval`, `start_step` and the groups are.
    pub fn external(store: S, config: AmpConfig) -> Result<Self> {
        Amp::new(store, config, External)
    }
}

/// The weights at θ + δ, between [`Amp::perturb`] and
/// [`Perturbed::restore`]. Dropped without `restore` (an early return, a
/// `?`, a panic), it brings θ back all the same, without counting the
/// step.
///
/// While it lives, compute the gradient at θ + δ with your own code (the
/// store's tensors are the model's: a forward pass sees θ + δ), then call
/// [`Perturbed::restore`] and step with your optimiser.
#[must_use = "the weights are at θ + δ until `restore` is called or the guard is dropped"]
pub struct Perturbed<'a, S: ParamStore, O: BaseOptimizer<S>> {
    amp: &'a mut Amp<S, O>,
    progress: Progress,
    perturbed: bool,
    perturbation_norms: Vec<f64>,
    clipped: usize,
    restored: bool,
}

impl<S: ParamStore, O: BaseOptimizer<S>> Amp<S, O> {
    /// The split step's first half, for `inner_iter ≤ 1`: with the clean
    /// gradient in the store (from your own forward and backward at θ),
    /// moves the weights to θ + δ and clears the gradients, so that your
    /// next backward pass gives ∇L(θ + δ). See [`Perturbed`].
    ///
    /// With `inner_iter ≥ 2` the intermediate gradients need a closure:
    /// use [`Amp::perturb_with`]. When the configuration does not perturb
    /// this step (`inner_iter = 0`, [`AmpConfig::interval`],
    /// [`AmpConfig::start_step`]), the weights stay at θ and
    /// [`Perturbed::perturbed`] says so; the gradients are left as they
    /// are, so your optimiser can step with the clean gradient.
    ///
    /// On error the weights are θ. A non-finite clean gradient is an
    /// [`AmpError::NonFiniteGradient`] whatever the
    /// [`NonFinitePolicy`](crate::NonFinitePolicy): skipping is your
    /// optimiser's call.
    ///
    /// ```
    /// use amp_core::{Amp, AmpConfig, Sgd, SgdConfig, BaseOptimizer, StepContext};
    /// # use amp_core::{AmpError, DType, Result, TensorOps, TensorStore};
    /// # struct Host;
    /// # impl TensorOps for Host {
    /// #     type Tensor = Vec<f64>;
    /// #     type Scalar = f64;
    /// #     fn dtype(&self) -> DType { DType::F64 }
    /// #     fn shape(&self, t: &Vec<f64>) -> Vec<usize> { vec![t.len()] }
    /// #     fn scale(&self, t: &Vec<f64>, f: f64) -> Result<Vec<f64>> { Ok(t.iter().map(|x| f * x).collect()) }
    /// #     fn axpy(&self, y: &Vec<f64>, a: f64, x: &Vec<f64>) -> Result<Vec<f64>> {
    /// #         Ok(y.iter().zip(x).map(|(y, x)| y + a * x).collect())
    /// #     }
    /// #     fn sum_of_squares(&self, t: &Vec<f64>) -> Result<f64> { Ok(t.iter().map(|x| x * x).sum()) }
    /// #     fn to_host(&self, t: &Vec<f64>) -> Result<Vec<f64>> { Ok(t.clone()) }
    /// #     fn tensor_like(&self, d: &[f64], _: &Vec<f64>) -> Result<Vec<f64>> { Ok(d.to_vec()) }
    /// # }
    /// // L(θ) = ½‖θ‖², ∇L = θ; "your" optimiser is plain SGD here.
    /// let store = TensorStore::new(Host, vec![vec![3.0, -4.0]]);
    /// let mut amp = Amp::external(store, AmpConfig::new(0.0, 0.5))?;
    /// let mut mine = Sgd::new(SgdConfig::default())?;
    /// // Clean pass, by your own code.
    /// let g = amp.store().params()[0].clone();
    /// amp.store_mut().set_grad(0, g)?;
    /// let mut guard = amp.perturb()?;
    /// // θ + δ = (3, −4) + 0.5·(3, −4)/5: your backward pass there.
    /// let g = guard.store().params()[0].clone();
    /// assert!((g[0] - 3.3).abs() < 1e-12);
    /// guard.store_mut().set_grad(0, g)?;
    /// guard.restore()?;
    /// assert_eq!(amp.store().params()[0], [3.0, -4.0]);
    /// // Your optimiser steps θ with ∇L(θ + δ).
    /// let ctx = StepContext { lr: &[0.1], weight_decay: &[0.0], mask: &[true], step: 0 };
    /// mine.step(amp.store_mut(), &ctx)?;
    /// assert!((amp.store().params()[0][0] - (3.0 - 0.33)).abs() < 1e-12);
    /// # Ok::<(), AmpError>(())
    /// ```
    pub fn perturb(&mut self) -> Result<Perturbed<'_, S, O>> {
        if self.config.inner_iter > 1 && self.perturbs_now() {
            return Err(AmpError::config(
                "inner_iter",
                format!(
                    "perturb takes one ascent step from the gradient in the store; \
                     inner_iter = {} needs a gradient at each intermediate point: \
                     use perturb_with and a closure",
                    self.config.inner_iter
                ),
            ));
        }
        self.perturb_with(&mut |_: &mut S, _: Pass| -> Result<((), f64)> {
            Err(AmpError::contract("no intermediate pass at inner_iter ≤ 1"))
        })
    }

    /// [`Amp::perturb`] for any `inner_iter`: the closure gives the
    /// gradients at the intermediate points θ + δ₁ … θ + δ_{K−1} (told the
    /// pass, as in [`Amp::step`]); the gradient at θ + δ_K is yours to
    /// compute once this returns. On error or panic the weights are θ.
    pub fn perturb_with<G: GradFn<S>>(&mut self, grad_fn: &mut G) -> Result<Perturbed<'_, S, O>> {
        if self.steps == u64::MAX {
            return Err(AmpError::CounterOverflow("steps"));
        }
        if self.scaler.is_some() {
            // The clean gradient and the base step are the caller's: so is
            // the loss scale, which must divide both (their framework's
            // scaler), and the split step's ascent would see it scaled.
            return Err(AmpError::config(
                "loss_scale",
                "the split step (perturb) does not support a loss scale; use Amp::step",
            ));
        }
        if self.is_distributed() {
            return Err(AmpError::config(
                "collective",
                "the split step (perturb) is not data-parallel: its base step is yours; use \
                 Amp::step",
            ));
        }
        let n = self.store.num_tensors();
        let mut guard = Perturbed {
            progress: Progress::default(),
            perturbed: self.perturbs_now(),
            perturbation_norms: vec![0.0; n],
            clipped: 0,
            restored: false,
            amp: self,
        };
        if !guard.perturbed {
            return Ok(guard);
        }
        let outcome = catch_unwind(AssertUnwindSafe(|| guard.ascend_all(grad_fn)));
        // On failure θ is brought back by `settle` rather than by the
        // guard's drop, so that a failure to restore it is reported over
        // the first error.
        guard.restored = !matches!(outcome, Ok(Ok(())));
        guard.amp.settle(&guard.progress, outcome)??;
        Ok(guard)
    }
}

impl<S: ParamStore, O: BaseOptimizer<S>> Perturbed<'_, S, O> {
    /// The K ascent steps, with the closure's passes between them, ending at
    /// θ + δ_K with the gradients cleared.
    fn ascend_all<G: GradFn<S>>(&mut self, grad_fn: &mut G) -> Result<()> {
        let amp = &mut *self.amp;
        amp.store.collect_grads()?;
        let active = amp.clean_mask()?;
        self.progress.active = active.clone();
        let inner_iter = amp.config.inner_iter;
        let mut report = StepReport {
            output: (),
            loss: 0.0,
            perturbed_losses: Vec::new(),
            perturbation_norms: Vec::new(),
            clipped: 0,
            closure_calls: 0,
            skipped: None,
            perturbed: true,
        };
        let mut passes = AsGradFn(grad_fn);
        let mut norms = None;
        for k in 1..=inner_iter {
            norms = Some(amp.ascend(k, &active, &mut self.progress)?);
            if k < inner_iter {
                let pass = Pass::Perturbed { k, of: inner_iter };
                amp.perturbed_pass(&mut passes, pass, &active, &mut report)?;
            }
        }
        if let Some(norms) = norms {
            amp.report_norms(
                &norms,
                &active,
                &mut self.perturbation_norms,
                &mut self.clipped,
            )?;
        }
        let last = Pass::Perturbed {
            k: inner_iter,
            of: inner_iter,
        };
        amp.store.zero_grads()?;
        amp.store.prepare_pass(last)
    }

    /// The store, at θ + δ.
    pub fn store(&self) -> &S {
        &self.amp.store
    }

    /// The store, mutably: hand it the gradient at θ + δ.
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.amp.store
    }

    /// Whether the weights were moved (see [`Amp::perturb`]).
    pub fn perturbed(&self) -> bool {
        self.perturbed
    }

    /// The pass the gradient you compute now serves: the last perturbed
    /// one.
    pub fn pass(&self) -> Pass {
        let of = self.amp.config.inner_iter;
        Pass::Perturbed { k: of, of }
    }

    /// Per tensor, ‖δ_K‖₂ (0 for tensors without a gradient).
    pub fn perturbation_norms(&self) -> &[f64] {
        &self.perturbation_norms
    }

    /// How many tensors the last projection shrank.
    pub fn clipped(&self) -> usize {
        self.clipped
    }

    /// Brings the weights back to θ (bit-exact with copy-restore), keeps the
    /// gradients you computed at θ + δ, and counts the step in
    /// [`Amp::steps`]. Step with your optimiser next.
    pub fn restore(mut self) -> Result<()> {
        self.restored = true;
        self.amp.restore(&self.progress)?;
        self.amp.steps += 1;
        Ok(())
    }
}

impl<S: ParamStore, O: BaseOptimizer<S>> Drop for Perturbed<'_, S, O> {
    fn drop(&mut self) {
        if !self.restored {
            // Nothing to report to: `restore` is the call that reports.
            let _ = self.amp.restore(&self.progress);
        }
    }
}

/// A `GradFn` borrowed as one (the step's helpers take them by `&mut G`).
struct AsGradFn<'g, G>(&'g mut G);

impl<S: ParamStore, G: GradFn<S>> GradFn<S> for AsGradFn<'_, G> {
    type Output = ();

    fn evaluate(
        &mut self,
        store: &mut S,
        pass: Pass,
    ) -> std::result::Result<((), f64), crate::error::BoxError> {
        self.0.evaluate(store, pass).map(|(_, loss)| ((), loss))
    }
}
