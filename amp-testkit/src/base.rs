//! [`CaseBase`]: the base optimiser a [`Case`](crate::Case) runs with,
//! SGD or Adam, behind one type.

use amp_core::{
    Adam, AdamConfig, BaseOptimizer, BufferId, OptimizerState, ParamStore, Result, Sgd, SgdConfig,
    Slot, StepContext,
};

/// SGD or Adam, chosen per case; forwards every call.
#[derive(Debug)]
pub enum CaseBase {
    /// [`Sgd`].
    Sgd(Sgd),
    /// [`Adam`] (Adam or AdamW).
    Adam(Adam),
}

impl CaseBase {
    /// SGD with `sgd` when `adam` is `None`, else Adam with `adam`.
    pub fn new(sgd: SgdConfig, adam: Option<AdamConfig>) -> Result<Self> {
        Ok(match adam {
            Some(adam) => CaseBase::Adam(Adam::new(adam)?),
            None => CaseBase::Sgd(Sgd::new(sgd)?),
        })
    }

    /// The buffers the optimiser holds (momentum, or Adam's moments).
    pub fn buffers(&self) -> Vec<BufferId> {
        match self {
            CaseBase::Sgd(sgd) => sgd.momentum_buffer().into_iter().collect(),
            CaseBase::Adam(adam) => adam.buffers(),
        }
    }
}

macro_rules! forward {
    ($self:ident, $o:ident => $body:expr) => {
        match $self {
            CaseBase::Sgd($o) => $body,
            CaseBase::Adam($o) => $body,
        }
    };
}

impl<S: ParamStore> BaseOptimizer<S> for CaseBase {
    fn validate(&self) -> Result<()> {
        forward!(self, o => BaseOptimizer::<S>::validate(o))
    }
    fn kind(&self) -> &'static str {
        forward!(self, o => BaseOptimizer::<S>::kind(o))
    }
    fn settings(&self) -> Vec<(&'static str, f64)> {
        forward!(self, o => BaseOptimizer::<S>::settings(o))
    }
    fn step(&mut self, store: &mut S, ctx: &StepContext<'_, S::Scalar>) -> Result<()> {
        forward!(self, o => o.step(store, ctx))
    }
    fn step_from(
        &mut self,
        store: &mut S,
        ctx: &StepContext<'_, S::Scalar>,
        weights: Slot,
    ) -> Result<()> {
        forward!(self, o => o.step_from(store, ctx, weights))
    }
    fn save_state(&self, store: &S) -> Result<OptimizerState> {
        forward!(self, o => o.save_state(store))
    }
    fn load_state(&mut self, store: &mut S, state: &OptimizerState) -> Result<()> {
        forward!(self, o => o.load_state(store, state))
    }
    fn buffers_held(&self) -> usize {
        forward!(self, o => BaseOptimizer::<S>::buffers_held(o))
    }
}
