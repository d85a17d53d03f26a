//! The step's mode: how it perturbs the weights and brings θ back, decided
//! once, when the optimiser is built.

use crate::config::{AmpConfig, RestoreMode};
use crate::error::Result;
use crate::store::{BufferId, ParamStore, Slot};

/// How a step perturbs the weights and brings θ back, decided from the
/// configuration when the optimiser is built (its buffers with it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Mode {
    /// `inner_iter = 0`: one base step with the clean gradient.
    Erm,
    /// Copy-restore with one inner iteration: the snapshot is taken and
    /// θ + δ formed by one fused store operation; δ is never stored.
    FusedCopy { snapshot: BufferId },
    /// Copy-restore with several inner iterations: δ is kept across them.
    Copy { snapshot: BufferId, delta: BufferId },
    /// Subtract-restore: θ + δ − δ.
    Subtract { delta: BufferId },
}

impl Mode {
    pub(super) fn build<S: ParamStore>(store: &mut S, config: &AmpConfig) -> Result<Self> {
        if config.inner_iter == 0 {
            return Ok(Mode::Erm);
        }
        match (config.restore, config.inner_iter) {
            (RestoreMode::Copy, 1) => Ok(Mode::FusedCopy {
                snapshot: store.alloc_buffer()?,
            }),
            (RestoreMode::Copy, _) => {
                let snapshot = store.alloc_buffer()?;
                match store.alloc_buffer() {
                    Ok(delta) => Ok(Mode::Copy { snapshot, delta }),
                    Err(error) => {
                        let _ = store.free_buffer(snapshot);
                        Err(error)
                    }
                }
            }
            (RestoreMode::Subtract, _) => Ok(Mode::Subtract {
                delta: store.alloc_buffer()?,
            }),
        }
    }

    pub(super) fn buffers(self) -> Vec<BufferId> {
        match self {
            Mode::Erm => vec![],
            Mode::FusedCopy { snapshot } => vec![snapshot],
            Mode::Copy { snapshot, delta } => vec![snapshot, delta],
            Mode::Subtract { delta } => vec![delta],
        }
    }

    pub(super) fn snapshot(self) -> Option<Slot> {
        match self {
            Mode::FusedCopy { snapshot } | Mode::Copy { snapshot, .. } => {
                Some(Slot::Buffer(snapshot))
            }
            Mode::Erm | Mode::Subtract { .. } => None,
        }
    }

    /// δ when it is kept in a buffer of its own.
    pub(super) fn delta(self) -> Option<Slot> {
        match self {
            Mode::Copy { delta, .. } | Mode::Subtract { delta } => Some(Slot::Buffer(delta)),
            Mode::Erm | Mode::FusedCopy { .. } => None,
        }
    }
}
