//! The state of an [`Amp`](crate::Amp) optimiser as one typed host value:
//! what [`Amp::state`](crate::Amp::state) returns and
//! [`Amp::load_state`](crate::Amp::load_state) restores.

use crate::config::AmpConfig;
use crate::loss_scale::LossScaleState;
use crate::optimizer::OptimizerState;

/// A parameter group as resolved against the store: every hyper-parameter
/// the group's tensors are stepped with, the learning rate as last set (by a
/// schedule through [`Amp::set_lr`](crate::Amp::set_lr)).
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct GroupState {
    /// Indices (into the store) of the group's tensors, in the order given.
    pub tensors: Vec<usize>,
    /// The group's current outer learning rate.
    pub lr: f64,
    /// The radius ε of the group's perturbation balls.
    pub epsilon: f64,
    /// The group's inner (ascent) learning rate ζ.
    pub inner_lr: f64,
    /// The group's weight decay.
    pub weight_decay: f64,
}

/// The base optimiser's part of an [`AmpState`]: what it is, the settings
/// that change what its step computes, and its buffers and values.
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct BaseState {
    /// [`BaseOptimizer::kind`](crate::BaseOptimizer::kind), such as `"sgd"`.
    pub kind: String,
    /// [`BaseOptimizer::settings`](crate::BaseOptimizer::settings): name and
    /// value (booleans as 0 or 1), such as `momentum = 0.9`.
    pub settings: Vec<(String, f64)>,
    /// [`BaseOptimizer::save_state`](crate::BaseOptimizer::save_state): the
    /// buffers (momentum, …) and host-side values.
    pub state: OptimizerState,
}

/// Everything an [`Amp`](crate::Amp) optimiser holds besides the weights:
/// its configuration, the resolved parameter groups with their current
/// learning rates, the step counters and the base optimiser's settings and
/// state.
///
/// [`Amp::state`](crate::Amp::state) reads it (the buffers are copied to the
/// host); [`Amp::load_state`](crate::Amp::load_state) validates all of it
/// against the optimiser before it changes anything. With the `serde`
/// feature it is `Serialize` and `Deserialize`.
///
/// ```
/// use amp_core::{AmpConfig, AmpState, BaseState, GroupState};
///
/// let group = GroupState { tensors: vec![0], lr: 0.1, epsilon: 0.5, inner_lr: 1.0, weight_decay: 0.0 };
/// let state = AmpState {
///     config: AmpConfig::new(0.1, 0.5),
///     groups: vec![group],
///     steps: 0,
///     skipped_steps: 0,
///     base: BaseState::default(),
///     loss_scale: None,
/// };
/// assert_eq!(state.groups[0].tensors, [0]);
/// ```
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct AmpState {
    /// The configuration the optimiser was built with.
    pub config: AmpConfig,
    /// Every parameter group as resolved against the store.
    pub groups: Vec<GroupState>,
    /// Steps taken ([`Amp::steps`](crate::Amp::steps)).
    pub steps: u64,
    /// Steps skipped ([`Amp::skipped_steps`](crate::Amp::skipped_steps)).
    pub skipped_steps: u64,
    /// The base optimiser's settings and state.
    pub base: BaseState,
    /// The loss scale and its count towards the next growth, when the
    /// configuration scales the loss ([`AmpConfig::loss_scale`]).
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub loss_scale: Option<LossScaleState>,
}

/// How [`Amp::load_state_with`](crate::Amp::load_state_with) treats
/// hyper-parameters that differ between the state and the optimiser. The
/// default is strict.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct StateOptions {
    /// `true` accepts a state whose ε, ζ, weight decay, `inner_iter`,
    /// `restore` or base-optimiser settings (momentum, …) differ from the
    /// optimiser's, and keeps the optimiser's own (to resume with new
    /// hyper-parameters on purpose). The groups' tensors and the base
    /// optimiser's kind must still match; learning rates and counters are
    /// still restored. Default `false`: a difference is an
    /// [`AmpError::InvalidState`](crate::AmpError::InvalidState).
    pub keep_hyperparameters: bool,
}

impl StateOptions {
    /// Sets [`StateOptions::keep_hyperparameters`].
    pub fn keep_hyperparameters(mut self, keep: bool) -> Self {
        self.keep_hyperparameters = keep;
        self
    }
}
