//! The [`GradFn`] trait: the closure that runs forward and backward.

use std::fmt;

use crate::error::BoxError;
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

/// Which closure call of a step is being served.
///
/// A step at `inner_iter = K` calls the closure `K + 1` times: once at the
/// clean weights θ and once at each perturbed point θ + δₖ. A model can use
/// this, for example, to freeze BatchNorm running statistics on perturbed
/// passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pass {
    /// The first call, at the unperturbed weights θ. Its outputs and loss are
    /// what the step returns.
    Clean,
    /// Inner iteration `k` (1-based) of `of`, at θ + δₖ.
    Perturbed {
        /// The inner iteration, from 1 to `of`.
        k: usize,
        /// The number of inner iterations of the step (`inner_iter`).
        of: usize,
    },
}

impl Pass {
    /// `true` for the clean pass.
    pub fn is_clean(&self) -> bool {
        matches!(self, Pass::Clean)
    }

    /// `true` for any perturbed pass.
    pub fn is_perturbed(&self) -> bool {
        !self.is_clean()
    }
}

impl fmt::Display for Pass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pass::Clean => write!(f, "clean pass"),
            Pass::Perturbed { k, of } => write!(f, "perturbed pass {k} of {of}"),
        }
    }
}
