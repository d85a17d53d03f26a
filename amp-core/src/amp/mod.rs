//! [`Amp`]: the adversarial-model-perturbation step, written once over
//! [`ParamStore`] and [`BaseOptimizer`].

mod distributed;
mod groups;
mod mode;
mod split;
mod step;

use num_traits::One;

use crate::adam::{Adam, AdamConfig};
use crate::collective::Collective;
use crate::config::{check_hyper_in, AmpConfig, EpsilonSchedule};
use crate::error::{AmpError, Result};
use crate::loss_scale::{LossScale, Scaler};
use crate::optimizer::{BaseOptimizer, Sgd, SgdConfig};
use crate::state::{AmpState, BaseState, GroupState, StateOptions};
use crate::store::{ParamStore, Scalar};

use self::groups::resolve_groups;
use self::mode::Mode;
pub use self::split::{External, Perturbed};

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
/// With [`RestoreMode::Copy`](crate::RestoreMode::Copy), steps 4 and 5 are one: the base optimiser
/// reads θ from the snapshot and writes its result over θ + δ
/// ([`BaseOptimizer::step_from`]); the first pass of step 3 and the snapshot
/// are one store operation ([`ParamStore::perturb_from_grads`]). Both give
/// exactly what the separate steps give.
///
/// `K = 0` is plain ERM: one base step with the clean gradient. `ε = 0` gives
/// δ = 0 and so the clean gradient, at the cost of K extra passes.
///
/// However a step ends — an error, a non-finite loss or gradient, a panic
/// in the closure at any pass or in a store operation — the weights and the
/// optimiser state are what they were before it: bit-exact with
/// [`RestoreMode::Copy`](crate::RestoreMode::Copy), within a few ulps with [`RestoreMode::Subtract`](crate::RestoreMode::Subtract).
/// A panic is caught, θ is brought back, and the panic resumes. (Inside the
/// base optimiser's own update, θ comes back from the snapshot in copy mode;
/// with subtract-restore, `inner_iter = 0` or a plain step of the recipes
/// ([`AmpConfig::interval`], [`AmpConfig::start_step`]) there is no copy of
/// θ to bring back, so a panic there leaves the update part-way.)
///
/// Hyper-parameters are validated against the store's scalar type (an `lr`
/// that overflows `f32` is refused). The weights a successful step writes
/// are not checked for finiteness: that would cost a pass over the
/// parameters per step, and with finite, validated hyper-parameters and
/// finite gradients only a product beyond the dtype's range (say a weight
/// decay of 1e300) can overflow; the next step's clean pass then reports
/// the non-finite loss or gradient under [`NonFinitePolicy`](crate::NonFinitePolicy).
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
/// #     fn write(&mut self, s: Slot, _: usize, v: &HostTensor) -> Result<()> { self.set(s, v.data().to_vec()); Ok(()) }
/// # }
/// # let store = One { p: vec![3.0, -4.0], g: None, b: vec![] };
/// // `store` holds θ = (3, −4); the loss is ½‖θ‖², whose gradient is θ.
/// let config = AmpConfig::new(0.1, 0.5).inner_lr(1.0).inner_iter(1);
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
    mode: Mode,
    groups: Vec<GroupState>,
    /// Per-tensor hyper-parameters in the store's scalar type.
    lr: Vec<S::Scalar>,
    epsilon: Vec<S::Scalar>,
    inner_lr: Vec<S::Scalar>,
    weight_decay: Vec<S::Scalar>,
    ones: Vec<S::Scalar>,
    neg_ones: Vec<S::Scalar>,
    /// Per group: the learning rate it was configured with (what
    /// [`EpsilonSchedule::FollowLr`] divides by).
    configured_lr: Vec<f64>,
    /// The dynamic loss scale, when the configuration asks for one.
    scaler: Option<Scaler>,
    /// Data-parallel training: the other ranks ([`Amp::with_collective`]).
    collective: Option<Box<dyn Collective<S>>>,
    steps: u64,
    skipped_steps: u64,
}

impl<S: ParamStore> Amp<S, Sgd> {
    /// AMP over SGD with PyTorch semantics: the paper's setting.
    pub fn sgd(store: S, config: AmpConfig, sgd: SgdConfig) -> Result<Self> {
        Amp::new(store, config, Sgd::new(sgd)?)
    }
}

impl<S: ParamStore> Amp<S, Adam> {
    /// AMP over Adam or AdamW with PyTorch semantics
    /// ([`AdamConfig::adam`], [`AdamConfig::adamw`]); the weight decay is
    /// [`AmpConfig::weight_decay`] (and the groups').
    pub fn adam(store: S, config: AmpConfig, adam: AdamConfig) -> Result<Self> {
        Amp::new(store, config, Adam::new(adam)?)
    }
}

impl<S: ParamStore, O: BaseOptimizer<S>> Amp<S, O> {
    /// Builds the optimiser, validating the configuration against the store
    /// (every hyper-parameter must also be finite in the store's scalar
    /// type), and allocates the buffers its [`RestoreMode`](crate::RestoreMode) needs.
    pub fn new(mut store: S, config: AmpConfig, base: O) -> Result<Self> {
        config.validate_for::<S::Scalar>()?;
        base.validate()?;
        let n = store.num_tensors();
        if n == 0 {
            return Err(AmpError::EmptyStore);
        }
        let groups = resolve_groups(&config, n)?;
        let mode = Mode::build(&mut store, &config)?;
        let configured_lr: Vec<f64> = groups.iter().map(|g| g.lr).collect();
        let scaler = config.loss_scale.map(Scaler::new).transpose()?;
        for buffer in mode.buffers() {
            store.pin_buffer(buffer, true)?;
        }
        let mut amp = Amp {
            store,
            base,
            config,
            mode,
            groups,
            lr: Vec::new(),
            epsilon: Vec::new(),
            inner_lr: Vec::new(),
            weight_decay: Vec::new(),
            ones: vec![S::Scalar::one(); n],
            neg_ones: vec![-S::Scalar::one(); n],
            configured_lr,
            scaler,
            collective: None,
            steps: 0,
            skipped_steps: 0,
        };
        amp.refresh_per_tensor();
        Ok(amp)
    }

    fn refresh_per_tensor(&mut self) {
        let n = self.store.num_tensors();
        let spread = |get: fn(&GroupState) -> f64| {
            let mut out = vec![S::Scalar::from_f64_rounded(0.0); n];
            for group in &self.groups {
                for &i in &group.tensors {
                    out[i] = S::Scalar::from_f64_rounded(get(group));
                }
            }
            out
        };
        self.lr = spread(|g| g.lr);
        self.epsilon = vec![S::Scalar::from_f64_rounded(0.0); n];
        for (group, &configured) in self.groups.iter().zip(&self.configured_lr) {
            let epsilon = match self.config.epsilon_schedule {
                EpsilonSchedule::Constant => group.epsilon,
                EpsilonSchedule::FollowLr => group.epsilon * (group.lr / configured),
            };
            for &i in &group.tensors {
                self.epsilon[i] = S::Scalar::from_f64_rounded(epsilon);
            }
        }
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
    /// [`Amp::groups`]).
    pub fn config(&self) -> &AmpConfig {
        &self.config
    }

    /// Frees the buffers AMP holds and gives back the store and the base
    /// optimiser.
    pub fn into_parts(mut self) -> Result<(S, O)> {
        for buffer in self.mode.buffers() {
            self.store.pin_buffer(buffer, false)?;
            self.store.free_buffer(buffer)?;
        }
        Ok((self.store, self.base))
    }

    /// The parameter groups as resolved against the store (every `None` of a
    /// [`ParamGroup`](crate::ParamGroup) replaced by the value of [`AmpConfig`]), with their
    /// current learning rates.
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
    /// #     fn write(&mut self, _: Slot, i: usize, v: &HostTensor) -> Result<()> { self.0[i] = v.data()[0]; Ok(()) }
    /// # }
    /// # let store = Scalars(vec![1.0, 2.0, 3.0]);
    /// // `store` holds three tensors; the biases (tensor 2) get a smaller ε.
    /// let config = AmpConfig::new(0.1, 0.5)
    ///     .epsilon(0.5)
    ///     .group(ParamGroup::new([0, 1]))
    ///     .group(ParamGroup::new([2]).epsilon(0.05).weight_decay(1e-4));
    /// let amp = Amp::sgd(store, config, SgdConfig::nesterov(0.9))?;
    /// let groups = amp.groups();
    /// assert_eq!(groups[1].tensors, [2]);
    /// assert_eq!(groups[0].epsilon, 0.5); // inherited from the config
    /// assert_eq!(groups[1].epsilon, 0.05);
    /// assert_eq!(groups[1].inner_lr, 1.0);
    /// assert_eq!(groups[1].weight_decay, 1e-4);
    /// # Ok::<(), amp_core::AmpError>(())
    /// ```
    pub fn groups(&self) -> &[GroupState] {
        &self.groups
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
    /// It must be finite and non-negative in the store's scalar type.
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        check_hyper_in::<S::Scalar>("lr", lr)?;
        for group in &mut self.groups {
            group.lr = lr;
        }
        self.refresh_per_tensor();
        Ok(())
    }

    /// Sets the learning rate of one group.
    pub fn set_group_lr(&mut self, group: usize, lr: f64) -> Result<()> {
        check_hyper_in::<S::Scalar>("lr", lr)?;
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

    /// Steps skipped: under [`NonFinitePolicy::Skip`](crate::NonFinitePolicy::Skip), and, with a loss
    /// scale, every step whose loss or gradients overflowed.
    pub fn skipped_steps(&self) -> u64 {
        self.skipped_steps
    }

    /// The loss scale shared with the closure, when the configuration has
    /// one ([`AmpConfig::loss_scale`]); `None` otherwise.
    ///
    /// Take it before the step: within a step the scale does not change.
    /// The closure multiplies its loss by [`LossScale::scale`] before the
    /// backward pass and returns the loss *unscaled*; the step divides each
    /// pass's gradients by the scale before using them (a closure that clips
    /// gradients calls [`LossScale::unscale_grads`] first). A non-finite
    /// loss or gradient at any pass skips the step — θ and the base
    /// optimiser's state as they were, [`StepReport::skipped`](crate::StepReport::skipped) set, the
    /// skip counted — and backs the scale off, whatever
    /// [`AmpConfig::non_finite`] says; the scale grows after
    /// [`LossScaleConfig::growth_interval`](crate::LossScaleConfig::growth_interval)
    /// steps in a row without one.
    ///
    /// ```
    /// use amp_core::{Amp, AmpConfig, AmpError, LossScaleConfig, SgdConfig, TensorStore};
    /// # use amp_core::{DType, Result, TensorOps};
    /// # #[derive(Clone, Copy)] struct Host;
    /// # impl TensorOps for Host {
    /// #     type Tensor = Vec<f64>; type Scalar = f64;
    /// #     fn dtype(&self) -> DType { DType::F64 }
    /// #     fn shape(&self, t: &Vec<f64>) -> Vec<usize> { vec![t.len()] }
    /// #     fn scale(&self, t: &Vec<f64>, f: f64) -> Result<Vec<f64>> { Ok(t.iter().map(|x| f * x).collect()) }
    /// #     fn axpy(&self, y: &Vec<f64>, a: f64, x: &Vec<f64>) -> Result<Vec<f64>> {
    /// #         Ok(y.iter().zip(x).map(|(y, x)| y + a * x).collect()) }
    /// #     fn sum_of_squares(&self, t: &Vec<f64>) -> Result<f64> { Ok(t.iter().map(|x| x * x).sum()) }
    /// #     fn to_host(&self, t: &Vec<f64>) -> Result<Vec<f64>> { Ok(t.clone()) }
    /// #     fn tensor_like(&self, d: &[f64], _: &Vec<f64>) -> Result<Vec<f64>> { Ok(d.to_vec()) }
    /// # }
    /// // ½‖θ − 1‖² over one tensor, its gradient written already scaled,
    /// // as a backward pass of the scaled loss would.
    /// let store = TensorStore::new(Host, vec![vec![0.0, 0.0]]);
    /// let config = AmpConfig::new(0.5, 0.1).loss_scale(LossScaleConfig::default());
    /// let mut amp = Amp::sgd(store, config, SgdConfig::default())?;
    /// let scale = amp.loss_scale().expect("configured");
    /// assert_eq!(scale.scale(), 65536.0);
    /// let report = amp.step(|s: &mut TensorStore<Host>, _pass| {
    ///     let theta = s.params()[0].clone();
    ///     let loss: f64 = theta.iter().map(|x| 0.5 * (x - 1.0) * (x - 1.0)).sum();
    ///     let grad = theta.iter().map(|x| (x - 1.0) * scale.scale()).collect();
    ///     s.set_grad(0, grad)?;
    ///     Ok::<_, AmpError>(((), loss))
    /// })?;
    /// assert!(report.skipped.is_none());
    /// // The step used the unscaled gradient: θ moved by lr · (1 + δ-term),
    /// // not by 65536 times that.
    /// assert!(amp.store().params()[0][0] < 1.0);
    /// # Ok::<(), AmpError>(())
    /// ```
    pub fn loss_scale(&self) -> Option<LossScale> {
        self.scaler.as_ref().map(|s| s.handle.clone())
    }

    /// Parameter-sized buffers held between steps: AMP's own (snapshot, δ)
    /// plus the base optimiser's (momentum).
    pub fn buffers_held(&self) -> usize {
        self.amp_buffers_held() + self.base.buffers_held()
    }

    /// Parameter-sized buffers held by AMP itself, beyond the base optimiser:
    /// 0 at `inner_iter = 0`, 1 with copy-restore at `inner_iter = 1` and
    /// with subtract-restore, 2 with copy-restore at `inner_iter ≥ 2`.
    pub fn amp_buffers_held(&self) -> usize {
        self.mode.buffers().len()
    }

    /// The optimiser's whole state besides the weights: configuration,
    /// groups with their current learning rates, counters, and the base
    /// optimiser's kind, settings and buffers (copied to the host).
    pub fn state(&self) -> Result<AmpState> {
        Ok(AmpState {
            config: self.config.clone(),
            groups: self.groups.clone(),
            steps: self.steps,
            skipped_steps: self.skipped_steps,
            loss_scale: self.scaler.as_ref().map(Scaler::state),
            base: BaseState {
                kind: self.base.kind().to_string(),
                settings: self
                    .base
                    .settings()
                    .into_iter()
                    .map(|(name, value)| (name.to_string(), value))
                    .collect(),
                state: self.base.save_state(&self.store)?,
            },
        })
    }

    /// Restores a state from [`Amp::state`] with the default (strict)
    /// [`StateOptions`]. Everything is validated before anything changes;
    /// on error nothing has.
    pub fn load_state(&mut self, state: &AmpState) -> Result<()> {
        self.load_state_with(state, &StateOptions::default())
    }

    /// [`Amp::load_state`] with explicit [`StateOptions`].
    ///
    /// Refused with [`AmpError::InvalidState`] (nothing changed): groups
    /// holding other tensors; a learning rate that is negative, non-finite
    /// or overflows the store's scalar type; a base optimiser of another
    /// kind; any non-finite value in the base optimiser's buffers or values
    /// (or one that overflows the store's scalar type); and, unless
    /// [`StateOptions::keep_hyperparameters`], another ε, ζ, weight decay,
    /// `inner_iter`, `restore` or base-optimiser setting. The base optimiser
    /// refuses what does not fit it (another buffer name, another shape).
    pub fn load_state_with(&mut self, state: &AmpState, options: &StateOptions) -> Result<()> {
        self.validate_state(state, options)?;
        self.base.load_state(&mut self.store, &state.base.state)?;
        for (group, saved) in self.groups.iter_mut().zip(&state.groups) {
            group.lr = saved.lr;
        }
        self.refresh_per_tensor();
        self.steps = state.steps;
        self.skipped_steps = state.skipped_steps;
        if let (Some(scaler), Some(saved)) = (&mut self.scaler, state.loss_scale) {
            scaler.load(saved);
        }
        Ok(())
    }

    /// Checks a state as [`Amp::load_state_with`] does, without loading it
    /// (the base optimiser's own checks, such as buffer shapes, run only on
    /// load).
    pub fn validate_state(&self, state: &AmpState, options: &StateOptions) -> Result<()> {
        crate::state_check::check(self, state, options)
    }
}
