//! [`StepReport`]: what a step returns besides the updated weights.

use crate::error::AmpError;

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
    /// [`NonFinitePolicy::Skip`](crate::NonFinitePolicy::Skip); the weights and state are then untouched.
    pub skipped: Option<AmpError>,
    /// Whether the step perturbed the weights: `false` for `inner_iter = 0`
    /// and for the plain steps of [`AmpConfig::interval`](crate::AmpConfig::interval)
    /// and [`AmpConfig::start_step`](crate::AmpConfig::start_step).
    pub perturbed: bool,
}

impl<O> StepReport<O> {
    /// The loss at the last perturbed point, L(θ + δ_K); `None` when
    /// `inner_iter = 0` or the step was skipped before it.
    pub fn perturbed_loss(&self) -> Option<f64> {
        self.perturbed_losses.last().copied()
    }
}
