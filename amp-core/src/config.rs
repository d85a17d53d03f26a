//! Configuration of [`Amp`](crate::Amp): the hyper-parameters, the parameter
//! groups, and how a step restores θ and treats non-finite values.

use crate::collective::Reduce;
use crate::error::{AmpError, Result};
use crate::loss_scale::LossScaleConfig;
use crate::store::Scalar;

/// How the weights are brought back from θ + δ to θ after the inner loop.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum RestoreMode {
    /// Keep a snapshot of θ and step from it: bit-exact. Holds one
    /// parameter-sized buffer (the snapshot) when `inner_iter = 1`, where δ
    /// is never stored (the store's
    /// [`ParamStore::perturb_from_grads`](crate::ParamStore::perturb_from_grads)
    /// forms θ + δ directly), and two (snapshot and δ) when
    /// `inner_iter ≥ 2`. The base optimiser reads θ from the snapshot
    /// ([`BaseOptimizer::step_from`](crate::BaseOptimizer::step_from)), so
    /// that restoring costs no pass of its own with [`Sgd`](crate::Sgd).
    #[default]
    Copy,
    /// Subtract δ, as the reference implementation does: θ + δ − δ, which can
    /// differ from θ by a few ulps. Holds one parameter-sized buffer (δ).
    Subtract,
}

impl RestoreMode {
    /// The name used in checkpoints and messages (`"copy"`, `"subtract"`).
    pub fn name(self) -> &'static str {
        match self {
            RestoreMode::Copy => "copy",
            RestoreMode::Subtract => "subtract",
        }
    }

    /// Parses [`RestoreMode::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "copy" => Some(RestoreMode::Copy),
            "subtract" => Some(RestoreMode::Subtract),
            _ => None,
        }
    }
}

/// What a step does when the loss or a gradient is NaN or infinite.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum NonFinitePolicy {
    /// Return [`AmpError::NonFiniteLoss`] or [`AmpError::NonFiniteGradient`].
    #[default]
    Error,
    /// Skip the step (weights and optimiser state untouched), count it in
    /// [`Amp::skipped_steps`](crate::Amp::skipped_steps), and report it in
    /// [`StepReport::skipped`](crate::StepReport::skipped), as loss scalers
    /// do.
    Skip,
}

impl NonFinitePolicy {
    /// The name used in checkpoints and messages (`"error"`, `"skip"`).
    pub fn name(self) -> &'static str {
        match self {
            NonFinitePolicy::Error => "error",
            NonFinitePolicy::Skip => "skip",
        }
    }

    /// Parses [`NonFinitePolicy::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "error" => Some(NonFinitePolicy::Error),
            "skip" => Some(NonFinitePolicy::Skip),
            _ => None,
        }
    }
}

/// How ε changes over training.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum EpsilonSchedule {
    /// Each group's ε as configured, always.
    #[default]
    Constant,
    /// Each group's ε scaled by its current learning rate over its
    /// configured one, `ε · lr_now / lr_configured`: an lr schedule
    /// ([`Amp::set_lr`](crate::Amp::set_lr)) drives ε with it, as GSAM ties
    /// its radius to the learning rate (Zhuang et al., ICLR 2022). Needs
    /// every group's configured lr to be positive.
    FollowLr,
}

impl EpsilonSchedule {
    /// The name used in messages (`"constant"`, `"follow_lr"`).
    pub fn name(self) -> &'static str {
        match self {
            EpsilonSchedule::Constant => "constant",
            EpsilonSchedule::FollowLr => "follow_lr",
        }
    }
}

#[cfg(feature = "serde")]
fn one() -> u64 {
    1
}

/// Hyper-parameters of one parameter group; `None` falls back to the value of
/// [`AmpConfig`].
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ParamGroup {
    /// Indices (into the store) of the tensors of this group.
    pub tensors: Vec<usize>,
    /// `true`: the group also holds every tensor that no other group lists
    /// (see [`ParamGroup::rest`]).
    #[cfg_attr(feature = "serde", serde(default))]
    pub rest: bool,
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

    /// A group of every tensor that no other group lists, in store order:
    /// for example, biases in a group of their own and "everything else" in
    /// this one. At most one group may be the rest.
    ///
    /// ```
    /// use amp_core::{AmpConfig, ParamGroup};
    ///
    /// let config = AmpConfig::new(0.1, 0.5)
    ///     .group(ParamGroup::new([1, 3]).weight_decay(0.0))
    ///     .group(ParamGroup::rest().weight_decay(1e-4));
    /// assert!(config.validate().is_ok());
    /// ```
    pub fn rest() -> Self {
        ParamGroup {
            rest: true,
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

/// Configuration of [`Amp`](crate::Amp), validated once when the optimiser
/// is built.
///
/// Built with [`AmpConfig::new`] (the outer learning rate and ε are always
/// chosen explicitly) or [`AmpConfig::paper`]; fields are public, and the
/// same-named methods set them in builder style.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct AmpConfig {
    /// Outer learning rate, ≥ 0 (the paper's CIFAR recipe: `0.1`).
    pub lr: f64,
    /// Radius ε of each tensor's perturbation ball, ≥ 0 (the paper's CIFAR
    /// recipe: `0.5`). `0` reproduces plain base-optimiser steps.
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
    /// Perturb on every `interval`-th step only, with plain base-optimiser
    /// steps (one closure call) between: the average step then costs about
    /// `(interval + K) / interval` ERM steps. At least 1. Default `1`
    /// (every step). A plain step is a step at `inner_iter = 0`, with its
    /// guarantees (see [`Amp`](crate::Amp): no snapshot of θ is taken for
    /// it).
    #[cfg_attr(feature = "serde", serde(default = "one"))]
    pub interval: u64,
    /// Perturb only from step `start_step` on (steps counted from 0, as
    /// [`Amp::steps`](crate::Amp::steps)); plain base-optimiser steps
    /// before. Perturbing over the last part of training only
    /// ("late-start" SAM) costs that much less. Default `0`.
    #[cfg_attr(feature = "serde", serde(default))]
    pub start_step: u64,
    /// How ε follows the learning rate. Default
    /// [`EpsilonSchedule::Constant`].
    #[cfg_attr(feature = "serde", serde(default))]
    pub epsilon_schedule: EpsilonSchedule,
    /// Dynamic loss scaling for mixed-precision training (see
    /// [`LossScaleConfig`] and [`Amp::loss_scale`](crate::Amp::loss_scale)):
    /// the closure multiplies its loss by the step's scale, the step divides
    /// every pass's gradients by it, and a step whose gradients (or loss)
    /// overflow is skipped, the scale backed off. Default `None`: no
    /// scaling.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub loss_scale: Option<LossScaleConfig>,
    /// Data-parallel training: which passes have their gradients averaged
    /// across ranks ([`Reduce`]; used only by an [`Amp`](crate::Amp) given
    /// a [`Collective`](crate::Collective)). Default
    /// [`Reduce::EveryPass`].
    #[cfg_attr(feature = "serde", serde(default))]
    pub reduce: Reduce,
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
    /// A configuration with the two values every run must choose, the outer
    /// learning rate `lr` and the radius `epsilon` of the perturbation ball
    /// (as the reference's `AMP(params, lr, epsilon, …)` requires), and the
    /// defaults of the other fields: ζ = 1, K = 1, no weight decay,
    /// copy-restore, errors on non-finite values, one group.
    ///
    /// ```
    /// use amp_core::AmpConfig;
    ///
    /// let config = AmpConfig::new(0.05, 0.2).weight_decay(1e-4);
    /// assert_eq!((config.lr, config.epsilon, config.inner_iter), (0.05, 0.2, 1));
    /// ```
    pub fn new(lr: f64, epsilon: f64) -> Self {
        AmpConfig {
            lr,
            epsilon,
            inner_lr: 1.0,
            inner_iter: 1,
            weight_decay: 0.0,
            restore: RestoreMode::Copy,
            non_finite: NonFinitePolicy::Error,
            groups: Vec::new(),
            interval: 1,
            start_step: 0,
            epsilon_schedule: EpsilonSchedule::Constant,
            loss_scale: None,
            reduce: Reduce::EveryPass,
        }
    }

    /// The paper's CIFAR recipe (Zheng et al., 2021): lr 0.1, ε 0.5, ζ 1,
    /// K 1, weight decay 1e-4; use it with
    /// [`SgdConfig::nesterov(0.9)`](crate::SgdConfig::nesterov) (and the
    /// paper's schedule, ×0.1 at epochs 100 and 150 of 200).
    ///
    /// ```
    /// use amp_core::AmpConfig;
    ///
    /// let paper = AmpConfig::paper();
    /// assert_eq!((paper.lr, paper.epsilon, paper.weight_decay), (0.1, 0.5, 1e-4));
    /// ```
    pub fn paper() -> Self {
        AmpConfig::new(0.1, 0.5).weight_decay(1e-4)
    }

    /// Scales the loss dynamically (mixed precision), with `config`'s
    /// settings; sets [`AmpConfig::loss_scale`].
    pub fn loss_scale(mut self, config: LossScaleConfig) -> Self {
        self.loss_scale = Some(config);
        self
    }

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
        /// Sets [`AmpConfig::interval`].
        interval: u64,
        /// Sets [`AmpConfig::start_step`].
        start_step: u64,
        /// Sets [`AmpConfig::epsilon_schedule`].
        epsilon_schedule: EpsilonSchedule,
        /// Sets [`AmpConfig::reduce`].
        reduce: Reduce,
    }

    /// Adds a parameter group.
    pub fn group(mut self, group: ParamGroup) -> Self {
        self.groups.push(group);
        self
    }

    /// Checks every field on its own (group membership is checked against
    /// the store when [`Amp`](crate::Amp) is built, and every value against
    /// the store's scalar type). The error names the field.
    pub fn validate(&self) -> Result<()> {
        for (field, value) in self.hyper_parameters() {
            check_hyper(field, value)?;
        }
        self.check_recipes()
    }

    fn check_recipes(&self) -> Result<()> {
        if let Some(loss_scale) = &self.loss_scale {
            loss_scale.validate()?;
        }
        if self.interval == 0 {
            return Err(AmpError::config(
                "interval",
                "must be at least 1 (1 perturbs every step)",
            ));
        }
        if self.epsilon_schedule == EpsilonSchedule::FollowLr {
            let zero = std::iter::once(self.lr)
                .chain(self.groups.iter().filter_map(|g| g.lr))
                .any(|lr| lr == 0.0);
            if zero {
                return Err(AmpError::config(
                    "epsilon_schedule",
                    "follow_lr scales ε by lr_now / lr_configured and needs every \
                     configured learning rate to be positive",
                ));
            }
        }
        Ok(())
    }

    /// Checks every hyper-parameter as [`AmpConfig::validate`] does and that
    /// it is finite once rounded to the scalar type `T` a store computes in
    /// (`lr = 1e39` is a finite `f64` but infinite as `f32`).
    pub fn validate_for<T: Scalar>(&self) -> Result<()> {
        for (field, value) in self.hyper_parameters() {
            check_hyper_in::<T>(field, value)?;
        }
        self.check_recipes()
    }

    /// Every floating-point hyper-parameter with its field name, the groups'
    /// overrides included.
    fn hyper_parameters(&self) -> Vec<(&'static str, f64)> {
        let mut out = vec![
            ("lr", self.lr),
            ("epsilon", self.epsilon),
            ("inner_lr", self.inner_lr),
            ("weight_decay", self.weight_decay),
        ];
        for group in &self.groups {
            for (field, value) in [
                ("groups.lr", group.lr),
                ("groups.epsilon", group.epsilon),
                ("groups.inner_lr", group.inner_lr),
                ("groups.weight_decay", group.weight_decay),
            ] {
                if let Some(value) = value {
                    out.push((field, value));
                }
            }
        }
        out
    }
}

/// A hyper-parameter must be finite and non-negative.
pub(crate) fn check_hyper(field: &'static str, value: f64) -> Result<()> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(AmpError::config(
            field,
            format!("must be finite and non-negative, got {value}"),
        ))
    }
}

/// [`check_hyper`], and finite once rounded to `T`.
pub(crate) fn check_hyper_in<T: Scalar>(field: &'static str, value: f64) -> Result<()> {
    check_hyper(field, value)?;
    if T::from_f64_rounded(value).is_finite() {
        Ok(())
    } else {
        Err(AmpError::config(
            field,
            format!(
                "{value} overflows the store's {}-bit scalar type",
                std::mem::size_of::<T>() * 8
            ),
        ))
    }
}
