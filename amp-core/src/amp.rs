//! [`Amp`]: the adversarial-model-perturbation step, written once over
//! [`ParamStore`] and [`BaseOptimizer`].

use num_traits::{One, Zero};

use crate::error::{AmpError, Pass, Result};
use crate::grad_fn::GradFn;
use crate::optimizer::{BaseOptimizer, OptimizerState, Sgd, SgdConfig, StepContext};
use crate::store::{check_len, BufferId, ParamStore, Scalar, Slot, PROJECTION_GUARD};

/// How the weights are brought back from θ + δ to θ after the inner loop.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RestoreMode {
    /// Keep a snapshot of θ and step from it: bit-exact. Holds one
    /// parameter-sized buffer between steps (the snapshot) when
    /// `inner_iter = 1`, where δ is never stored (the store's
    /// [`ParamStore::perturb_from_grads`] forms θ + δ directly), and two
    /// (snapshot and δ) when `inner_iter ≥ 2`. The base optimiser reads θ
    /// from the snapshot ([`BaseOptimizer::step_from`]), so that restoring
    /// costs no pass of its own with [`Sgd`].
    #[default]
    Copy,
    /// Subtract δ, as the reference implementation does: θ + δ − δ, which can
    /// differ from θ by a few ulps. Holds one parameter-sized buffer (δ).
    Subtract,
}

/// What a step does when the loss or a gradient is NaN or infinite.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum NonFinitePolicy {
    /// Return [`AmpError::NonFiniteLoss`] or [`AmpError::NonFiniteGradient`].
    #[default]
    Error,
    /// Skip the step (weights and optimiser state untouched), count it in
    /// [`Amp::skipped_steps`], and report it in [`StepReport::skipped`], as
    /// loss scalers do.
    Skip,
}

/// Hyper-parameters of one parameter group; `None` falls back to the value of
/// [`AmpConfig`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParamGroup {
    /// Indices (into the store) of the tensors of this group.
    pub tensors: Vec<usize>,
    /// Outer learning rate of the group.
    pub lr: Option<f64>,
    /// Radius ε of the group's perturbation ball, per tensor.
    pub epsilon: Option<f64>,
    /// Inner (ascent) learning rate ζ of the group.
    pub inner_lr: Option<f64>,
    /// Weight decay of the group.
    pub weight_decay: Option<f64>,
}

impl ParamGroup {
    /// A group of the given tensors with every hyper-parameter inherited.
    pub fn new(tensors: impl IntoIterator<Item = usize>) -> Self {
        ParamGroup {
            tensors: tensors.into_iter().collect(),
            ..ParamGroup::default()
        }
    }

    /// Sets the group's learning rate.
    pub fn lr(mut self, lr: f64) -> Self {
        self.lr = Some(lr);
        self
    }

    /// Sets the group's ε.
    pub fn epsilon(mut self, epsilon: f64) -> Self {
        self.epsilon = Some(epsilon);
        self
    }

    /// Sets the group's ζ.
    pub fn inner_lr(mut self, inner_lr: f64) -> Self {
        self.inner_lr = Some(inner_lr);
        self
    }

    /// Sets the group's weight decay.
    pub fn weight_decay(mut self, weight_decay: f64) -> Self {
        self.weight_decay = Some(weight_decay);
        self
    }
}

/// Configuration of [`Amp`], validated once when the optimiser is built.
///
/// Fields are public; the same-named methods set them in builder style.
#[derive(Clone, Debug, PartialEq)]
pub struct AmpConfig {
    /// Outer learning rate, ≥ 0. Default `0.1` (the paper's CIFAR recipe).
    pub lr: f64,
    /// Radius ε of each tensor's perturbation ball, ≥ 0. Default `0.5`
    /// (the paper's CIFAR recipe). `0` reproduces plain base-optimiser steps.
    pub epsilon: f64,
    /// Inner (ascent) learning rate ζ, ≥ 0. Default `1`.
    pub inner_lr: f64,
    /// Number of inner ascent iterations K; the closure is called K + 1 times
    /// per step. Default `1`. `0` means no perturbation (plain ERM).
    pub inner_iter: usize,
    /// Weight decay applied by the base optimiser at θ, ≥ 0. Default `0`
    /// (the paper uses `1e-4`).
    pub weight_decay: f64,
    /// How θ is restored after the inner loop. Default [`RestoreMode::Copy`].
    pub restore: RestoreMode,
    /// What to do with a NaN or infinite loss or gradient. Default
    /// [`NonFinitePolicy::Error`].
    pub non_finite: NonFinitePolicy,
    /// Parameter groups. Empty (the default) means one group holding every
    /// tensor; otherwise every tensor must be in exactly one group.
    pub groups: Vec<ParamGroup>,
}

impl Default for AmpConfig {
    fn default() -> Self {
        AmpConfig {
            lr: 0.1,
            epsilon: 0.5,
            inner_lr: 1.0,
            inner_iter: 1,
            weight_decay: 0.0,
            restore: RestoreMode::Copy,
            non_finite: NonFinitePolicy::Error,
            groups: Vec::new(),
        }
    }
}

macro_rules! setter {
    ($(#[$doc:meta] $name:ident: $ty:ty),* $(,)?) => {$(
        #[$doc]
        pub fn $name(mut self, $name: $ty) -> Self {
            self.$name = $name;
            self
        }
    )*};
}

impl AmpConfig {
    setter! {
        /// Sets [`AmpConfig::lr`].
        lr: f64,
        /// Sets [`AmpConfig::epsilon`].
        epsilon: f64,
        /// Sets [`AmpConfig::inner_lr`].
        inner_lr: f64,
        /// Sets [`AmpConfig::inner_iter`].
        inner_iter: usize,
        /// Sets [`AmpConfig::weight_decay`].
        weight_decay: f64,
        /// Sets [`AmpConfig::restore`].
        restore: RestoreMode,
        /// Sets [`AmpConfig::non_finite`].
        non_finite: NonFinitePolicy,
    }

    /// Adds a parameter group.
    pub fn group(mut self, group: ParamGroup) -> Self {
        self.groups.push(group);
        self
    }

    /// Checks every field on its own (group membership is checked against
    /// the store when [`Amp`] is built). The error names the field.
    pub fn validate(&self) -> Result<()> {
        check_hyper("lr", self.lr)?;
        check_hyper("epsilon", self.epsilon)?;
        check_hyper("inner_lr", self.inner_lr)?;
        check_hyper("weight_decay", self.weight_decay)?;
        for group in &self.groups {
            for (field, value) in [
                ("groups.lr", group.lr),
                ("groups.epsilon", group.epsilon),
                ("groups.inner_lr", group.inner_lr),
                ("groups.weight_decay", group.weight_decay),
            ] {
                if let Some(value) = value {
                    check_hyper(field, value)?;
                }
            }
        }
        Ok(())
    }
}

fn check_hyper(field: &'static str, value: f64) -> Result<()> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(AmpError::config(
            field,
            format!("must be finite and non-negative, got {value}"),
        ))
    }
}

/// A parameter group as resolved against the store.
#[derive(Clone, Debug, PartialEq)]
struct Group {
    tensors: Vec<usize>,
    lr: f64,
    epsilon: f64,
    inner_lr: f64,
    weight_decay: f64,
}

/// What a successful step returns: the clean pass's results and diagnostics.
#[derive(Debug)]
pub struct StepReport<O> {
    /// The outputs of the clean pass, as the closure returned them.
    pub output: O,
    /// The loss of the clean pass, L(θ).
    pub loss: f64,
    /// The loss of each perturbed pass, L(θ + δₖ) for k = 1..K.
    pub perturbed_losses: Vec<f64>,
    /// Per tensor, ‖δ_K‖₂ after the last projection (0 for tensors without a
    /// gradient, and all 0 when `inner_iter = 0`). Computed on the host from
    /// the norms the projection used.
    pub perturbation_norms: Vec<f64>,
    /// How many tensors the last projection shrank (‖δ‖ > ε).
    pub clipped: usize,
    /// How many times the closure was called.
    pub closure_calls: usize,
    /// `Some(reason)` when the step was skipped under
    /// [`NonFinitePolicy::Skip`]; the weights and state are then untouched.
    pub skipped: Option<AmpError>,
}

impl<O> StepReport<O> {
    /// The loss at the last perturbed point, L(θ + δ_K); `None` when
    /// `inner_iter = 0` or the step was skipped before it.
    pub fn perturbed_loss(&self) -> Option<f64> {
        self.perturbed_losses.last().copied()
    }
}

/// Adversarial Model Perturbation (Zheng, Zhang & Mao, CVPR 2021).
///
/// AMP here is *adversarial model perturbation*, a regulariser that seeks flat
/// minima — not automatic mixed precision. It minimises
/// `L_AMP(θ) = max_{‖δ‖ ≤ ε} L(θ + δ)`, approximating the inner maximum with
/// K steps of projected gradient ascent. One step, with g the gradient of the
/// last closure call:
///
/// ```text
/// 1. clean pass at θ: keep outputs and loss; g ← ∇L(θ)
/// 2. δᵢ ← 0 for every tensor with a gradient
/// 3. for k = 1..K:
///      δᵢ ← δᵢ + ζᵢ · gᵢ                              (ascent)
///      δᵢ ← δᵢ · min(1, εᵢ / (‖δᵢ‖₂ + 1e-12))          (projection, per tensor)
///      perturbed pass at θ + δ:  g ← ∇L(θ + δ)
/// 4. weights back to θ (copied back, or δ subtracted: see RestoreMode)
/// 5. base-optimiser step at θ with g = ∇L(θ + δ_K)
/// ```
///
/// With [`RestoreMode::Copy`], steps 4 and 5 are one: the base optimiser
/// reads θ from the snapshot and writes its result over θ + δ
/// ([`BaseOptimizer::step_from`]); the first pass of step 3 and the snapshot
/// are one store operation ([`ParamStore::perturb_from_grads`]). Both give
/// exactly what the separate steps give.
///
/// `K = 0` is plain ERM: one base step with the clean gradient. `ε = 0` gives
/// δ = 0 and so the clean gradient, at the cost of K extra passes.
///
/// Any error leaves the weights and the optimiser state as they were before
/// the step (bit-exact with [`RestoreMode::Copy`]).
///
/// ```
/// use amp_core::{Amp, AmpConfig, SgdConfig};
/// # use amp_core::{AmpError, BufferId, DType, HostTensor, ParamStore, Result, Slot};
/// # // A one-tensor f64 store, enough for the example.
/// # struct One { p: Vec<f64>, g: Option<Vec<f64>>, b: Vec<Vec<f64>> }
/// # impl One {
/// #     fn get(&self, s: Slot) -> Vec<f64> { match s { Slot::Params => self.p.clone(),
/// #         Slot::Grads => self.g.clone().unwrap_or(vec![0.0; self.p.len()]),
/// #         Slot::Buffer(b) => self.b[b.index()].clone() } }
/// #     fn set(&mut self, s: Slot, v: Vec<f64>) { match s { Slot::Params => self.p = v,
/// #         Slot::Grads => self.g = Some(v), Slot::Buffer(b) => self.b[b.index()] = v } }
/// # }
/// # impl ParamStore for One {
/// #     type Scalar = f64; type Norms = Vec<f64>;
/// #     fn num_tensors(&self) -> usize { 1 }
/// #     fn shape(&self, _: usize) -> Result<Vec<usize>> { Ok(vec![self.p.len()]) }
/// #     fn dtype(&self) -> DType { DType::F64 }
/// #     fn zero_grads(&mut self) -> Result<()> { self.g = None; Ok(()) }
/// #     fn grad_mask(&self) -> Result<Vec<bool>> { Ok(vec![self.g.is_some()]) }
/// #     fn alloc_buffer(&mut self) -> Result<BufferId> { self.b.push(vec![0.0; self.p.len()]); Ok(BufferId::new(self.b.len() - 1)) }
/// #     fn free_buffer(&mut self, _: BufferId) -> Result<()> { Ok(()) }
/// #     fn copy(&mut self, d: Slot, s: Slot, _: &[bool]) -> Result<()> { let v = self.get(s); self.set(d, v); Ok(()) }
/// #     fn scale(&mut self, d: Slot, f: &[f64], _: &[bool]) -> Result<()> { let v = self.get(d).iter().map(|x| x * f[0]).collect(); self.set(d, v); Ok(()) }
/// #     fn axpy(&mut self, d: Slot, a: &[f64], s: Slot, _: &[bool]) -> Result<()> { let v = self.get(d).iter().zip(self.get(s)).map(|(x, y)| x + a[0] * y).collect(); self.set(d, v); Ok(()) }
/// #     fn norms(&mut self, s: Slot, _: &[bool]) -> Result<Vec<f64>> { Ok(vec![self.get(s).iter().map(|x| x * x).sum::<f64>().sqrt()]) }
/// #     fn clip_to_norms(&mut self, d: Slot, n: &Vec<f64>, m: &[f64], mask: &[bool]) -> Result<()> { self.scale(d, &[(m[0] / (n[0] + 1e-12)).min(1.0)], mask) }
/// #     fn norms_to_host(&self, n: &Vec<f64>) -> Result<Vec<f64>> { Ok(n.clone()) }
/// #     fn all_finite(&mut self, s: Slot, _: &[bool]) -> Result<bool> { Ok(self.get(s).iter().all(|x| x.is_finite())) }
/// #     fn read(&self, s: Slot, _: usize) -> Result<HostTensor> { HostTensor::new(vec![self.p.len()], DType::F64, self.get(s)) }
/// #     fn write(&mut self, s: Slot, _: usize, v: &HostTensor) -> Result<()> { self.set(s, v.data.clone()); Ok(()) }
/// # }
/// # let store = One { p: vec![3.0, -4.0], g: None, b: vec![] };
/// // `store` holds θ = (3, −4); the loss is ½‖θ‖², whose gradient is θ.
/// let config = AmpConfig::default().lr(0.1).epsilon(0.5).inner_lr(1.0).inner_iter(1);
/// let mut amp = Amp::sgd(store, config, SgdConfig::nesterov(0.9))?;
/// let report = amp.step(|s: &mut One, _pass| {
///     let loss = 0.5 * s.p.iter().map(|x| x * x).sum::<f64>();
///     s.g = Some(s.p.clone());
///     Ok::<_, AmpError>(((), loss))
/// })?;
/// assert_eq!(report.loss, 12.5);
/// assert_eq!(report.closure_calls, 2);
/// // ‖ζg‖ = 5 > ε = 0.5, so δ was clipped to norm 0.5.
/// assert_eq!(report.clipped, 1);
/// assert!((report.perturbation_norms[0] - 0.5).abs() < 1e-12);
/// # Ok::<(), AmpError>(())
/// ```
pub struct Amp<S: ParamStore, O: BaseOptimizer<S> = Sgd> {
    store: S,
    base: O,
    config: AmpConfig,
    groups: Vec<Group>,
    /// Per-tensor hyper-parameters in the store's scalar type.
    lr: Vec<S::Scalar>,
    epsilon: Vec<S::Scalar>,
    inner_lr: Vec<S::Scalar>,
    weight_decay: Vec<S::Scalar>,
    ones: Vec<S::Scalar>,
    neg_ones: Vec<S::Scalar>,
    /// Snapshot of θ for [`RestoreMode::Copy`].
    snapshot: Option<BufferId>,
    /// δ, when it must be kept across inner iterations or for
    /// subtract-restore.
    delta: Option<BufferId>,
    steps: u64,
    skipped_steps: u64,
}

impl<S: ParamStore> Amp<S, Sgd> {
    /// AMP over SGD with PyTorch semantics: the paper's setting.
    pub fn sgd(store: S, config: AmpConfig, sgd: SgdConfig) -> Result<Self> {
        Amp::new(store, config, Sgd::new(sgd)?)
    }
}

impl<S: ParamStore, O: BaseOptimizer<S>> Amp<S, O> {
    /// Builds the optimiser, validating the configuration against the store.
    pub fn new(store: S, config: AmpConfig, base: O) -> Result<Self> {
        config.validate()?;
        base.validate()?;
        let n = store.num_tensors();
        if n == 0 {
            return Err(AmpError::EmptyStore);
        }
        let groups = resolve_groups(&config, n)?;
        let mut amp = Amp {
            store,
            base,
            config,
            groups,
            lr: Vec::new(),
            epsilon: Vec::new(),
            inner_lr: Vec::new(),
            weight_decay: Vec::new(),
            ones: vec![S::Scalar::one(); n],
            neg_ones: vec![-S::Scalar::one(); n],
            snapshot: None,
            delta: None,
            steps: 0,
            skipped_steps: 0,
        };
        amp.refresh_per_tensor();
        Ok(amp)
    }

    fn refresh_per_tensor(&mut self) {
        let n = self.store.num_tensors();
        let spread = |get: fn(&Group) -> f64| {
            let mut out = vec![S::Scalar::zero(); n];
            for group in &self.groups {
                for &i in &group.tensors {
                    out[i] = S::Scalar::from_f64_rounded(get(group));
                }
            }
            out
        };
        self.lr = spread(|g| g.lr);
        self.epsilon = spread(|g| g.epsilon);
        self.inner_lr = spread(|g| g.inner_lr);
        self.weight_decay = spread(|g| g.weight_decay);
    }

    /// The parameter store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The parameter store, mutably (to change weights between steps).
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    /// The base optimiser.
    pub fn base(&self) -> &O {
        &self.base
    }

    /// The configuration the optimiser was built with (group learning rates
    /// changed by [`Amp::set_lr`] are not reflected here; see
    /// [`Amp::group_lr`]).
    pub fn config(&self) -> &AmpConfig {
        &self.config
    }

    /// Frees the buffers AMP holds and gives back the store and the base
    /// optimiser.
    pub fn into_parts(mut self) -> Result<(S, O)> {
        for buffer in [self.snapshot.take(), self.delta.take()]
            .into_iter()
            .flatten()
        {
            self.store.free_buffer(buffer)?;
        }
        Ok((self.store, self.base))
    }

    /// Number of parameter groups.
    pub fn num_groups(&self) -> usize {
        self.groups.len()
    }

    /// Learning rate of group `group`.
    pub fn group_lr(&self, group: usize) -> Result<f64> {
        self.groups
            .get(group)
            .map(|g| g.lr)
            .ok_or_else(|| AmpError::config("groups", format!("there is no group {group}")))
    }

    /// Sets the learning rate of every group (what an LR schedule calls).
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        check_hyper("lr", lr)?;
        for group in &mut self.groups {
            group.lr = lr;
        }
        self.refresh_per_tensor();
        Ok(())
    }

    /// Sets the learning rate of one group.
    pub fn set_group_lr(&mut self, group: usize, lr: f64) -> Result<()> {
        check_hyper("lr", lr)?;
        let g = self
            .groups
            .get_mut(group)
            .ok_or_else(|| AmpError::config("groups", format!("there is no group {group}")))?;
        g.lr = lr;
        self.refresh_per_tensor();
        Ok(())
    }

    /// Steps taken (skipped steps not counted).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Steps skipped under [`NonFinitePolicy::Skip`].
    pub fn skipped_steps(&self) -> u64 {
        self.skipped_steps
    }

    /// Parameter-sized buffers held between steps: AMP's own (snapshot, δ)
    /// plus the base optimiser's (momentum).
    pub fn buffers_held(&self) -> usize {
        usize::from(self.snapshot.is_some())
            + usize::from(self.delta.is_some())
            + self.base.buffers_held()
    }

    /// Parameter-sized buffers held by AMP itself, beyond the base optimiser.
    pub fn amp_buffers_held(&self) -> usize {
        usize::from(self.snapshot.is_some()) + usize::from(self.delta.is_some())
    }

    /// Copies the base optimiser's state to the host.
    pub fn base_state(&self) -> Result<OptimizerState> {
        self.base.save_state(&self.store)
    }

    /// Restores the step counters and the base optimiser's state (used by
    /// checkpoint loading; on error nothing changes).
    pub fn load_base_state(
        &mut self,
        state: &OptimizerState,
        steps: u64,
        skipped_steps: u64,
    ) -> Result<()> {
        self.base.load_state(&mut self.store, state)?;
        self.steps = steps;
        self.skipped_steps = skipped_steps;
        Ok(())
    }

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
        self.store.zero_grads()?;
        let (output, loss) = grad_fn
            .evaluate(&mut self.store, Pass::Clean)
            .map_err(|source| AmpError::Closure {
                pass: Pass::Clean,
                source,
            })?;
        let mut report = StepReport {
            output,
            loss,
            perturbed_losses: Vec::new(),
            perturbation_norms: vec![0.0; self.store.num_tensors()],
            clipped: 0,
            closure_calls: 1,
            skipped: None,
        };
        match self.finish_step(grad_fn, &mut report) {
            Ok(()) => {
                self.steps += 1;
                Ok(report)
            }
            Err(error @ (AmpError::NonFiniteLoss { .. } | AmpError::NonFiniteGradient { .. }))
                if self.config.non_finite == NonFinitePolicy::Skip =>
            {
                self.skipped_steps += 1;
                report.skipped = Some(error);
                Ok(report)
            }
            Err(error) => Err(error),
        }
    }

    /// Everything after the clean closure call. On error, θ and the base
    /// optimiser's state are as before the step.
    fn finish_step<G: GradFn<S>>(
        &mut self,
        grad_fn: &mut G,
        report: &mut StepReport<G::Output>,
    ) -> Result<()> {
        check_loss(Pass::Clean, report.loss)?;
        let active = self.store.grad_mask()?;
        check_len("gradient mask", self.store.num_tensors(), active.len())?;
        if !active.iter().any(|&a| a) {
            return Err(AmpError::NoGradient);
        }
        self.check_gradients(Pass::Clean, &active)?;

        // With copy-restore, θ is restored by the base step itself, which
        // reads θ from the snapshot (no separate copy back).
        let restore_from = if self.config.inner_iter > 0 {
            self.perturb(grad_fn, &active, report)?
        } else {
            None
        };

        let ctx = StepContext {
            lr: &self.lr,
            weight_decay: &self.weight_decay,
            mask: &active,
            step: self.steps,
        };
        match restore_from {
            None => self.base.step(&mut self.store, &ctx),
            Some(snapshot) => {
                let stepped = self.base.step_from(&mut self.store, &ctx, snapshot);
                if stepped.is_err() {
                    // θ + δ (or a partial update) is in the parameters: put
                    // θ back; a failure to do so is reported over the first.
                    self.store.copy(Slot::Params, snapshot, &active)?;
                }
                stepped
            }
        }
    }

    /// Checks a gradient mask against the clean pass's and the gradients for
    /// finiteness.
    fn check_gradients(&mut self, pass: Pass, active: &[bool]) -> Result<()> {
        if pass.is_perturbed() {
            let mask = self.store.grad_mask()?;
            check_len("gradient mask", active.len(), mask.len())?;
            if let Some(index) = (0..active.len()).find(|&i| active[i] && !mask[i]) {
                return Err(AmpError::MissingGradient { pass, index });
            }
        }
        if self.store.all_finite(Slot::Grads, active)? {
            Ok(())
        } else {
            Err(AmpError::NonFiniteGradient { pass })
        }
    }

    fn buffer(store: &mut S, held: &mut Option<BufferId>) -> Result<BufferId> {
        match *held {
            Some(id) => Ok(id),
            None => {
                let id = store.alloc_buffer()?;
                *held = Some(id);
                Ok(id)
            }
        }
    }

    /// Steps 2–4: the inner loop. On success with copy-restore, θ + δ is left
    /// in the parameters and the snapshot to restore from is returned (the
    /// base step reads θ from it); otherwise θ is restored here.
    fn perturb<G: GradFn<S>>(
        &mut self,
        grad_fn: &mut G,
        active: &[bool],
        report: &mut StepReport<G::Output>,
    ) -> Result<Option<Slot>> {
        let inner_iter = self.config.inner_iter;
        let copy_restore = self.config.restore == RestoreMode::Copy;
        // With copy-restore and one inner iteration δ = clip(ζ·g) is only
        // needed until the weights have moved, so it is never stored: no δ
        // buffer.
        let delta = if copy_restore && inner_iter == 1 {
            None
        } else {
            Some(Slot::Buffer(Self::buffer(
                &mut self.store,
                &mut self.delta,
            )?))
        };
        let snapshot = if copy_restore {
            Some(Slot::Buffer(Self::buffer(
                &mut self.store,
                &mut self.snapshot,
            )?))
        } else {
            None
        };

        let mut moved = false;
        let result = self.inner_loop(grad_fn, active, delta, snapshot, &mut moved, report);
        match (result, snapshot) {
            (Ok(()), Some(snapshot)) if moved => Ok(Some(snapshot)),
            (result, _) => {
                if moved {
                    let restored = match (snapshot, delta) {
                        (Some(snapshot), _) => self.store.copy(Slot::Params, snapshot, active),
                        (None, Some(delta)) => {
                            self.store.axpy(Slot::Params, &self.neg_ones, delta, active)
                        }
                        (None, None) => Err(AmpError::backend(
                            "nothing to restore θ from (no snapshot and no δ)",
                        )),
                    };
                    // A failure to restore is reported over the error that
                    // caused it: the weights are then not θ and the caller
                    // must know.
                    restored?;
                }
                result.map(|()| None)
            }
        }
    }

    fn inner_loop<G: GradFn<S>>(
        &mut self,
        grad_fn: &mut G,
        active: &[bool],
        delta: Option<Slot>,
        snapshot: Option<Slot>,
        moved: &mut bool,
        report: &mut StepReport<G::Output>,
    ) -> Result<()> {
        let inner_iter = self.config.inner_iter;
        let mut last_norms = None;
        for k in 1..=inner_iter {
            let pass = Pass::Perturbed { k, of: inner_iter };
            if k == 1 {
                // δ = clip(ζ·g) from δ = 0, the snapshot of θ and θ ← θ + δ
                // in one fused store operation; θ is untouched if it fails.
                let norms = self.store.perturb_from_grads(
                    snapshot,
                    delta,
                    &self.inner_lr,
                    &self.epsilon,
                    active,
                )?;
                *moved = true;
                last_norms = Some(norms);
            } else {
                let Some(delta) = delta else {
                    return Err(AmpError::backend("δ buffer missing for inner_iter > 1"));
                };
                if snapshot.is_none() {
                    // Subtract mode: step back from θ + δ_{k−1} before δ changes.
                    self.store
                        .axpy(Slot::Params, &self.neg_ones, delta, active)?;
                }
                // Ascent δ ← δ + ζ·g, then the projection onto each tensor's
                // ε-ball.
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
                last_norms = Some(norms);
            }

            self.store.zero_grads()?;
            report.closure_calls += 1;
            let (_, loss) = grad_fn
                .evaluate(&mut self.store, pass)
                .map_err(|source| AmpError::Closure { pass, source })?;
            report.perturbed_losses.push(loss);
            check_loss(pass, loss)?;
            self.check_gradients(pass, active)?;
        }
        if let Some(norms) = last_norms {
            let norms = self.store.norms_to_host(&norms)?;
            check_len("norms", active.len(), norms.len())?;
            report.clipped = 0;
            for (i, &norm) in norms.iter().enumerate() {
                if !active[i] {
                    continue;
                }
                let epsilon = self.epsilon[i].widen();
                let coefficient = (epsilon / (norm + PROJECTION_GUARD)).min(1.0);
                if coefficient < 1.0 {
                    report.clipped += 1;
                }
                report.perturbation_norms[i] = norm * coefficient;
            }
        }
        Ok(())
    }
}

fn check_loss(pass: Pass, value: f64) -> Result<()> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(AmpError::NonFiniteLoss { pass, value })
    }
}

fn resolve_groups(config: &AmpConfig, n: usize) -> Result<Vec<Group>> {
    let inherit = |tensors: Vec<usize>, g: Option<&ParamGroup>| Group {
        tensors,
        lr: g.and_then(|g| g.lr).unwrap_or(config.lr),
        epsilon: g.and_then(|g| g.epsilon).unwrap_or(config.epsilon),
        inner_lr: g.and_then(|g| g.inner_lr).unwrap_or(config.inner_lr),
        weight_decay: g
            .and_then(|g| g.weight_decay)
            .unwrap_or(config.weight_decay),
    };
    if config.groups.is_empty() {
        return Ok(vec![inherit((0..n).collect(), None)]);
    }
    let mut owner = vec![None; n];
    for (g, group) in config.groups.iter().enumerate() {
        if group.tensors.is_empty() {
            return Err(AmpError::config(
                "groups",
                format!("group {g} holds no tensor"),
            ));
        }
        for &i in &group.tensors {
            let slot = owner.get_mut(i).ok_or_else(|| {
                AmpError::config(
                    "groups",
                    format!("group {g} names tensor {i}, but the store holds {n} tensors"),
                )
            })?;
            if let Some(other) = *slot {
                return Err(AmpError::config(
                    "groups",
                    format!("tensor {i} is in group {other} and in group {g}"),
                ));
            }
            *slot = Some(g);
        }
    }
    if let Some(i) = owner.iter().position(Option::is_none) {
        return Err(AmpError::config(
            "groups",
            format!("tensor {i} is in no group"),
        ));
    }
    Ok(config
        .groups
        .iter()
        .map(|g| inherit(g.tensors.clone(), Some(g)))
        .collect())
}

/// Read access to the parameter groups as resolved against the store (every
/// `None` of a [`ParamGroup`] replaced by the value of [`AmpConfig`]), for
/// checkpoints and logging. A checkpoint records each group's tensors and
/// hyper-parameters and checks them when it is loaded.
impl<S: ParamStore, O: BaseOptimizer<S>> Amp<S, O> {
    fn resolved_group(&self, group: usize) -> Result<&Group> {
        self.groups
            .get(group)
            .ok_or_else(|| AmpError::config("groups", format!("there is no group {group}")))
    }

    /// The store indices of the tensors of group `group`, in the order the
    /// group was given (all tensors, in order, for the implicit single group).
    ///
    /// ```
    /// use amp_core::{Amp, AmpConfig, ParamGroup, SgdConfig};
    /// # use amp_core::{BufferId, DType, HostTensor, ParamStore, Result, Slot};
    /// # // A store of scalar tensors, enough for the example.
    /// # struct Scalars(Vec<f64>);
    /// # impl ParamStore for Scalars {
    /// #     type Scalar = f64; type Norms = Vec<f64>;
    /// #     fn num_tensors(&self) -> usize { self.0.len() }
    /// #     fn shape(&self, _: usize) -> Result<Vec<usize>> { Ok(vec![]) }
    /// #     fn dtype(&self) -> DType { DType::F64 }
    /// #     fn zero_grads(&mut self) -> Result<()> { Ok(()) }
    /// #     fn grad_mask(&self) -> Result<Vec<bool>> { Ok(vec![false; self.0.len()]) }
    /// #     fn alloc_buffer(&mut self) -> Result<BufferId> { Ok(BufferId::new(0)) }
    /// #     fn free_buffer(&mut self, _: BufferId) -> Result<()> { Ok(()) }
    /// #     fn copy(&mut self, _: Slot, _: Slot, _: &[bool]) -> Result<()> { Ok(()) }
    /// #     fn scale(&mut self, _: Slot, _: &[f64], _: &[bool]) -> Result<()> { Ok(()) }
    /// #     fn axpy(&mut self, _: Slot, _: &[f64], _: Slot, _: &[bool]) -> Result<()> { Ok(()) }
    /// #     fn norms(&mut self, _: Slot, m: &[bool]) -> Result<Vec<f64>> { Ok(vec![0.0; m.len()]) }
    /// #     fn clip_to_norms(&mut self, _: Slot, _: &Vec<f64>, _: &[f64], _: &[bool]) -> Result<()> { Ok(()) }
    /// #     fn norms_to_host(&self, n: &Vec<f64>) -> Result<Vec<f64>> { Ok(n.clone()) }
    /// #     fn all_finite(&mut self, _: Slot, _: &[bool]) -> Result<bool> { Ok(true) }
    /// #     fn read(&self, _: Slot, i: usize) -> Result<HostTensor> { HostTensor::new(vec![], DType::F64, vec![self.0[i]]) }
    /// #     fn write(&mut self, _: Slot, i: usize, v: &HostTensor) -> Result<()> { self.0[i] = v.data[0]; Ok(()) }
    /// # }
    /// # let store = Scalars(vec![1.0, 2.0, 3.0]);
    /// // `store` holds three tensors; the biases (tensor 2) get a smaller ε.
    /// let config = AmpConfig::default()
    ///     .epsilon(0.5)
    ///     .group(ParamGroup::new([0, 1]))
    ///     .group(ParamGroup::new([2]).epsilon(0.05).weight_decay(1e-4));
    /// let amp = Amp::sgd(store, config, SgdConfig::nesterov(0.9))?;
    /// assert_eq!(amp.group_tensors(1)?, &[2]);
    /// assert_eq!(amp.group_epsilon(0)?, 0.5); // inherited from the config
    /// assert_eq!(amp.group_epsilon(1)?, 0.05);
    /// assert_eq!(amp.group_inner_lr(1)?, 1.0);
    /// assert_eq!(amp.group_weight_decay(1)?, 1e-4);
    /// assert!(amp.group_epsilon(2).is_err());
    /// # Ok::<(), amp_core::AmpError>(())
    /// ```
    pub fn group_tensors(&self, group: usize) -> Result<&[usize]> {
        self.resolved_group(group).map(|g| g.tensors.as_slice())
    }

    /// The radius ε of group `group`'s perturbation balls (see
    /// [`Amp::group_tensors`] for an example).
    pub fn group_epsilon(&self, group: usize) -> Result<f64> {
        self.resolved_group(group).map(|g| g.epsilon)
    }

    /// The inner (ascent) learning rate ζ of group `group` (see
    /// [`Amp::group_tensors`] for an example).
    pub fn group_inner_lr(&self, group: usize) -> Result<f64> {
        self.resolved_group(group).map(|g| g.inner_lr)
    }

    /// The weight decay of group `group` (see [`Amp::group_tensors`] for an
    /// example).
    pub fn group_weight_decay(&self, group: usize) -> Result<f64> {
        self.resolved_group(group).map(|g| g.weight_decay)
    }
}
