//! The [`BaseOptimizer`] trait and [`Sgd`], stochastic gradient descent with
//! PyTorch's semantics, written once against [`ParamStore`].

use crate::elementwise::{SgdCoefficients, SgdMomentum};
use crate::error::{AmpError, Result};
use crate::store::{BufferId, HostTensor, ParamStore, Scalar, Slot};

/// What the base optimiser is told at each step.
///
/// Every slice has one entry per tensor of the store.
#[derive(Clone, Copy, Debug)]
pub struct StepContext<'a, T> {
    /// Learning rate of each tensor (from its parameter group).
    pub lr: &'a [T],
    /// Weight decay of each tensor (from its parameter group).
    pub weight_decay: &'a [T],
    /// `true` for tensors that have a gradient and must be stepped.
    pub mask: &'a [bool],
    /// Number of steps taken before this one.
    pub step: u64,
}

/// The part of an optimiser's state that a checkpoint holds.
///
/// `buffers` are named parameter-shaped tensors (one optional tensor per
/// parameter: `None` where the state was never initialised); `scalars` are
/// named host-side numbers.
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct OptimizerState {
    /// Named per-parameter tensors, such as momentum buffers.
    pub buffers: Vec<(String, Vec<Option<HostTensor>>)>,
    /// Named host-side values.
    pub scalars: Vec<(String, Vec<f64>)>,
}

/// The outer optimiser that AMP hands the perturbed gradient to.
///
/// At the end of a step, [`Slot::Grads`] of the store holds the gradient taken
/// at θ + δ_K and the weights are back at θ; `step` updates θ. It may consume
/// the gradients (overwrite them). It must leave its own state untouched when
/// it returns an error.
///
/// # Plugging in another optimiser
/// ```
/// use amp_core::{BaseOptimizer, OptimizerState, ParamStore, Result, Slot, StepContext};
///
/// /// Plain SGD on a gradient clipped to a global norm, built from the
/// /// store's batched primitives.
/// struct ClippedSgd { max_norm: f64 }
///
/// impl<S: ParamStore> BaseOptimizer<S> for ClippedSgd {
///     fn step(&mut self, store: &mut S, ctx: &StepContext<'_, S::Scalar>) -> Result<()> {
///         store.clip_grad_norm(self.max_norm, ctx.mask)?;
///         let neg_lr: Vec<S::Scalar> = ctx.lr.iter().map(|&lr| -lr).collect();
///         store.axpy(Slot::Params, &neg_lr, Slot::Grads, ctx.mask)
///     }
///     fn save_state(&self, _store: &S) -> Result<OptimizerState> {
///         Ok(OptimizerState::default())
///     }
///     fn load_state(&mut self, _store: &mut S, _state: &OptimizerState) -> Result<()> {
///         Ok(())
///     }
/// }
/// ```
pub trait BaseOptimizer<S: ParamStore> {
    /// Checks the optimiser's own settings; called when [`Amp`](crate::Amp)
    /// is built. The default accepts everything.
    fn validate(&self) -> Result<()> {
        Ok(())
    }

    /// A short name of the optimiser, recorded in
    /// [`AmpState`](crate::AmpState) and checkpoints (`"sgd"` for [`Sgd`]).
    /// A state of another kind is refused on load. The default is
    /// `"custom"`.
    fn kind(&self) -> &'static str {
        "custom"
    }

    /// The settings that change what a step computes, by name (booleans as
    /// 0 or 1): recorded in [`AmpState`](crate::AmpState), compared on load.
    /// The default is none.
    fn settings(&self) -> Vec<(&'static str, f64)> {
        Vec::new()
    }

    /// Updates the weights in [`Slot::Params`] from the gradients in
    /// [`Slot::Grads`].
    fn step(&mut self, store: &mut S, ctx: &StepContext<'_, S::Scalar>) -> Result<()>;

    /// [`BaseOptimizer::step`] for weights held in `weights` (AMP's snapshot
    /// of θ) while [`Slot::Params`] holds something else (the perturbed
    /// weights θ + δ): the updated weights land in [`Slot::Params`] and
    /// `weights` is only read. It must give exactly what copying `weights`
    /// into [`Slot::Params`] and calling `step` gives, which is the default.
    ///
    /// An optimiser that reads θ from `weights` itself saves that copy, a
    /// full pass over the parameters per step ([`Sgd`] does, through
    /// [`ParamStore::axpy_from`]). If it fails, [`Amp`](crate::Amp) copies
    /// `weights` back into [`Slot::Params`].
    fn step_from(
        &mut self,
        store: &mut S,
        ctx: &StepContext<'_, S::Scalar>,
        weights: Slot,
    ) -> Result<()> {
        if weights != Slot::Params {
            store.copy(Slot::Params, weights, ctx.mask)?;
        }
        self.step(store, ctx)
    }

    /// Copies the optimiser's state to the host, for a checkpoint.
    fn save_state(&self, store: &S) -> Result<OptimizerState>;

    /// Replaces the optimiser's state with `state`. On error nothing changes
    /// (validate everything before writing anything). Every value in `state`
    /// has been checked to be finite and every tensor to have its
    /// parameter's shape before this is called.
    fn load_state(&mut self, store: &mut S, state: &OptimizerState) -> Result<()>;

    /// Number of parameter-sized buffers the optimiser holds between steps.
    fn buffers_held(&self) -> usize {
        0
    }
}

/// Settings of [`Sgd`]; learning rate and weight decay come from the
/// parameter groups of [`AmpConfig`](crate::AmpConfig).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdConfig {
    /// Momentum factor in `[0, 1)`. Default `0` (plain SGD).
    pub momentum: f64,
    /// Dampening of the momentum update in `[0, 1]`. Default `0`.
    pub dampening: f64,
    /// Nesterov momentum; needs `momentum > 0` and `dampening = 0`.
    /// Default `false`.
    pub nesterov: bool,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig {
            momentum: 0.0,
            dampening: 0.0,
            nesterov: false,
        }
    }
}

impl SgdConfig {
    /// The paper's setting: momentum 0.9 with Nesterov.
    pub fn nesterov(momentum: f64) -> Self {
        SgdConfig {
            momentum,
            dampening: 0.0,
            nesterov: true,
        }
    }

    /// Heavy-ball momentum without Nesterov.
    pub fn momentum(momentum: f64) -> Self {
        SgdConfig {
            momentum,
            ..SgdConfig::default()
        }
    }

    /// Sets [`SgdConfig::momentum`].
    pub fn with_momentum(mut self, momentum: f64) -> Self {
        self.momentum = momentum;
        self
    }

    /// Sets [`SgdConfig::dampening`].
    pub fn dampening(mut self, dampening: f64) -> Self {
        self.dampening = dampening;
        self
    }

    /// Sets [`SgdConfig::nesterov`].
    pub fn with_nesterov(mut self, nesterov: bool) -> Self {
        self.nesterov = nesterov;
        self
    }

    /// Checks every field; the error names the field and the reason.
    pub fn validate(&self) -> Result<()> {
        if !(self.momentum.is_finite() && (0.0..1.0).contains(&self.momentum)) {
            return Err(AmpError::config(
                "momentum",
                format!("must be in [0, 1), got {}", self.momentum),
            ));
        }
        if !(self.dampening.is_finite() && (0.0..=1.0).contains(&self.dampening)) {
            return Err(AmpError::config(
                "dampening",
                format!("must be in [0, 1], got {}", self.dampening),
            ));
        }
        if self.nesterov && (self.momentum <= 0.0 || self.dampening != 0.0) {
            return Err(AmpError::config(
                "nesterov",
                format!(
                    "needs momentum > 0 and dampening = 0, got momentum {} and dampening {}",
                    self.momentum, self.dampening
                ),
            ));
        }
        Ok(())
    }
}

/// Stochastic gradient descent with PyTorch's semantics.
///
/// For each tensor with gradient `g` (lr and weight decay from its group):
/// ```text
/// d = g + weight_decay · θ
/// if momentum ≠ 0:
///     buf = d                                      on the tensor's first step
///     buf = momentum · buf + (1 − dampening) · d   afterwards
///     d   = d + momentum · buf   if nesterov   else   buf
/// θ = θ − lr · d
/// ```
/// The momentum buffer is one parameter-sized buffer, allocated on the first
/// step that needs it.
///
/// `Sgd` is not `Clone`: it holds a handle to a buffer of one store, and two
/// optimisers must not step the same momentum.
#[derive(Debug)]
pub struct Sgd {
    config: SgdConfig,
    momentum_buffer: Option<BufferId>,
    /// Per tensor: whether its momentum buffer holds a value yet.
    initialized: Vec<bool>,
}

impl Sgd {
    /// Builds SGD, validating the settings.
    pub fn new(config: SgdConfig) -> Result<Self> {
        config.validate()?;
        Ok(Sgd {
            config,
            momentum_buffer: None,
            initialized: Vec::new(),
        })
    }

    /// The settings.
    pub fn config(&self) -> &SgdConfig {
        &self.config
    }

    /// The momentum buffer, once a step has allocated it.
    pub fn momentum_buffer(&self) -> Option<BufferId> {
        self.momentum_buffer
    }

    /// Per tensor: whether its momentum buffer has been initialised.
    pub fn initialized(&self) -> &[bool] {
        &self.initialized
    }

    /// One step reading θ from `weights` (weight decay and the update's
    /// addend) and writing the result into [`Slot::Params`].
    fn update<S: ParamStore>(
        &mut self,
        store: &mut S,
        ctx: &StepContext<'_, S::Scalar>,
        weights: Slot,
    ) -> Result<()> {
        let n = store.num_tensors();
        crate::store::check_len("step mask", n, ctx.mask.len())?;
        crate::store::check_len("learning rates", n, ctx.lr.len())?;
        crate::store::check_len("weight decays", n, ctx.weight_decay.len())?;
        if self.momentum_buffer.is_some() && self.initialized.len() != n {
            return Err(AmpError::state(format!(
                "this SGD holds momentum for {} tensors but the store has {n}: \
                 it was used with another store",
                self.initialized.len()
            )));
        }
        let momentum = if self.config.momentum != 0.0 {
            let buffer = match self.momentum_buffer {
                Some(buffer) => buffer,
                None => {
                    let buffer = store.alloc_buffer()?;
                    store.pin_buffer(buffer, true)?;
                    self.momentum_buffer = Some(buffer);
                    self.initialized = vec![false; n];
                    buffer
                }
            };
            Some(SgdMomentum {
                buffer: Slot::Buffer(buffer),
                momentum: S::Scalar::from_f64_rounded(self.config.momentum),
                keep: S::Scalar::from_f64_rounded(1.0 - self.config.dampening),
                nesterov: self.config.nesterov,
            })
        } else {
            None
        };
        // Per tensor: d = g + λ·θ (no addition where λ is 0, as PyTorch
        // skips it), the momentum buffer set to d on its first step, and θ
        // moved by −lr times the update (see `elementwise::sgd`).
        let coefficients: Vec<SgdCoefficients<S::Scalar>> = (0..n)
            .map(|i| SgdCoefficients {
                weight_decay: ctx.weight_decay[i],
                step: -ctx.lr[i],
                first: momentum.is_some() && !self.initialized[i],
            })
            .collect();
        store.sgd_update(weights, momentum.as_ref(), &coefficients, ctx.mask)?;
        if momentum.is_some() {
            for (done, &m) in self.initialized.iter_mut().zip(ctx.mask) {
                *done |= m;
            }
        }
        Ok(())
    }
}

const MOMENTUM_BUFFER: &str = "momentum_buffer";

impl<S: ParamStore> BaseOptimizer<S> for Sgd {
    fn validate(&self) -> Result<()> {
        self.config.validate()
    }

    fn kind(&self) -> &'static str {
        "sgd"
    }

    fn settings(&self) -> Vec<(&'static str, f64)> {
        vec![
            ("momentum", self.config.momentum),
            ("dampening", self.config.dampening),
            ("nesterov", f64::from(u8::from(self.config.nesterov))),
        ]
    }

    fn step(&mut self, store: &mut S, ctx: &StepContext<'_, S::Scalar>) -> Result<()> {
        self.update(store, ctx, Slot::Params)
    }

    fn step_from(
        &mut self,
        store: &mut S,
        ctx: &StepContext<'_, S::Scalar>,
        weights: Slot,
    ) -> Result<()> {
        self.update(store, ctx, weights)
    }

    fn save_state(&self, store: &S) -> Result<OptimizerState> {
        let mut state = OptimizerState::default();
        if let Some(buffer) = self.momentum_buffer {
            let tensors = self
                .initialized
                .iter()
                .enumerate()
                .map(|(i, &done)| {
                    done.then(|| store.read(Slot::Buffer(buffer), i))
                        .transpose()
                })
                .collect::<Result<Vec<_>>>()?;
            state.buffers.push((MOMENTUM_BUFFER.to_string(), tensors));
        }
        Ok(state)
    }

    fn load_state(&mut self, store: &mut S, state: &OptimizerState) -> Result<()> {
        let n = store.num_tensors();
        let mut tensors = None;
        for (name, value) in &state.buffers {
            if name != MOMENTUM_BUFFER || tensors.is_some() {
                return Err(AmpError::state(format!(
                    "SGD has no (further) state buffer named {name:?}"
                )));
            }
            tensors = Some(value);
        }
        if let Some((name, _)) = state.scalars.first() {
            return Err(AmpError::state(format!(
                "SGD has no state value named {name:?}"
            )));
        }
        let Some(tensors) = tensors else {
            // No momentum state saved: start afresh.
            if let Some(buffer) = self.momentum_buffer {
                store.pin_buffer(buffer, false)?;
                store.free_buffer(buffer)?;
                self.momentum_buffer = None;
            }
            self.initialized.clear();
            return Ok(());
        };
        if self.config.momentum == 0.0 {
            return Err(AmpError::state(
                "the state holds momentum buffers but this SGD has momentum 0",
            ));
        }
        crate::store::check_len("momentum buffers", n, tensors.len())?;
        for (i, t) in tensors.iter().enumerate() {
            if let Some(t) = t {
                crate::store::check_shape(i, &store.shape(i)?, t.shape())?;
            }
        }
        // Written into a fresh buffer, which replaces the old one only once
        // every tensor is in: a failure part-way leaves the old state whole.
        let fresh = store.alloc_buffer()?;
        let written = tensors
            .iter()
            .enumerate()
            .try_for_each(|(i, t)| match t {
                Some(t) => store.write(Slot::Buffer(fresh), i, t),
                None => Ok(()),
            })
            .and_then(|()| store.pin_buffer(fresh, true));
        if let Err(error) = written {
            let _ = store.free_buffer(fresh);
            return Err(error);
        }
        if let Some(old) = self.momentum_buffer.replace(fresh) {
            // The new state is in place; an old buffer that cannot be freed
            // is leaked rather than failing a load that has succeeded.
            let _ = store.pin_buffer(old, false);
            let _ = store.free_buffer(old);
        }
        self.initialized = tensors.iter().map(Option::is_some).collect();
        Ok(())
    }

    fn buffers_held(&self) -> usize {
        usize::from(self.momentum_buffer.is_some())
    }
}

/// A boxed optimiser is one: `Amp<S, Box<dyn BaseOptimizer<S>>>` picks SGD,
/// Adam or your own at run time.
///
/// ```
/// use amp_core::{Adam, AdamConfig, BaseOptimizer, ParamStore, Result, Sgd, SgdConfig};
///
/// fn base<S: ParamStore>(name: &str) -> Result<Box<dyn BaseOptimizer<S>>> {
///     Ok(match name {
///         "adamw" => Box::new(Adam::new(AdamConfig::adamw())?),
///         _ => Box::new(Sgd::new(SgdConfig::nesterov(0.9))?),
///     })
/// }
/// # let _ = base::<amp_core::TensorStore<Never>>("adamw");
/// # #[derive(Clone)] struct Never;
/// # impl amp_core::TensorOps for Never {
/// #     type Tensor = Never; type Scalar = f64;
/// #     fn dtype(&self) -> amp_core::DType { amp_core::DType::F64 }
/// #     fn shape(&self, _: &Never) -> Vec<usize> { vec![] }
/// #     fn scale(&self, t: &Never, _: f64) -> Result<Never> { Ok(t.clone()) }
/// #     fn axpy(&self, t: &Never, _: f64, _: &Never) -> Result<Never> { Ok(t.clone()) }
/// #     fn sum_of_squares(&self, _: &Never) -> Result<f64> { Ok(0.0) }
/// #     fn to_host(&self, _: &Never) -> Result<Vec<f64>> { Ok(vec![0.0]) }
/// #     fn tensor_like(&self, _: &[f64], t: &Never) -> Result<Never> { Ok(t.clone()) }
/// # }
/// ```
impl<S: ParamStore, O: BaseOptimizer<S> + ?Sized> BaseOptimizer<S> for Box<O> {
    fn validate(&self) -> Result<()> {
        (**self).validate()
    }
    fn kind(&self) -> &'static str {
        (**self).kind()
    }
    fn settings(&self) -> Vec<(&'static str, f64)> {
        (**self).settings()
    }
    fn step(&mut self, store: &mut S, ctx: &StepContext<'_, S::Scalar>) -> Result<()> {
        (**self).step(store, ctx)
    }
    fn step_from(
        &mut self,
        store: &mut S,
        ctx: &StepContext<'_, S::Scalar>,
        weights: Slot,
    ) -> Result<()> {
        (**self).step_from(store, ctx, weights)
    }
    fn save_state(&self, store: &S) -> Result<OptimizerState> {
        (**self).save_state(store)
    }
    fn load_state(&mut self, store: &mut S, state: &OptimizerState) -> Result<()> {
        (**self).load_state(store, state)
    }
    fn buffers_held(&self) -> usize {
        (**self).buffers_held()
    }
}
