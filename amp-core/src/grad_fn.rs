//! The [`GradFn`] trait: the closure that runs forward and backward.

use crate::error::{BoxError, Pass};
use crate::store::ParamStore;

/// Runs the model forward and backward at the store's current weights and
/// reports the outputs and the loss.
///
/// It is called `inner_iter + 1` times per step, told which [`Pass`] it
/// serves. Gradients have been cleared with [`ParamStore::zero_grads`] before
/// each call; the function leaves the new ones where its backend expects them
/// (see the backend's docs). The loss is returned as `f64` on the host.
///
/// Implemented for every `FnMut(&mut S, Pass) -> Result<(O, f64), E>` whose
/// error converts into a boxed error.
pub trait GradFn<S: ParamStore> {
    /// What the model computed (logits, metrics, …); the clean pass's is
    /// returned by the step, the perturbed passes' are dropped.
    type Output;

    /// Runs forward and backward for `pass`.
    fn evaluate(&mut self, store: &mut S, pass: Pass) -> Result<(Self::Output, f64), BoxError>;
}

impl<S, F, O, E> GradFn<S> for F
where
    S: ParamStore,
    F: FnMut(&mut S, Pass) -> Result<(O, f64), E>,
    E: Into<BoxError>,
{
    type Output = O;

    fn evaluate(&mut self, store: &mut S, pass: Pass) -> Result<(O, f64), BoxError> {
        self(store, pass).map_err(Into::into)
    }
}
