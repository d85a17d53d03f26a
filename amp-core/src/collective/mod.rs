//! Data-parallel AMP: the collective operations a step needs across the
//! ranks of a job, and when it reduces the gradients.
//!
//! Each rank runs its own [`Amp`](crate::Amp) over its own copy of the
//! model, with its own micro-batch, and hands it a [`Collective`]
//! ([`Amp::with_collective`](crate::Amp::with_collective)). The step then
//! averages the gradients across the ranks where the [`Reduce`] policy says
//! so, and makes every decision that steers it — a closure that failed, a
//! non-finite loss or gradient, a loss-scale overflow, which tensors have a
//! gradient — the same on every rank, by agreeing on it first. Starting
//! from the same weights, the ranks' weights then stay bit-identical step
//! after step, and no rank waits forever for another that has given up.
//!
//! [`InProcess`] implements the trait for ranks that are threads of one
//! process (tests, and the reference the other transports are checked
//! against); MPI and NCCL adapters implement it over those libraries.

use crate::error::{AmpError, Result};
use crate::store::{HostTensor, ParamStore, Slot};

mod in_process;
mod stats;

pub use in_process::InProcess;
pub use stats::CollectiveStats;

/// Which passes of a step have their gradients averaged across ranks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Reduce {
    /// Every pass: the perturbation is computed from the global gradient,
    /// so N ranks with micro-batches of b equal one process with the
    /// concatenated batch of N·b (to rounding). At K = 1 two reductions per
    /// step.
    #[default]
    EveryPass,
    /// Only the gradient the base step uses (the last perturbed pass; the
    /// clean pass on steps that do not perturb): each rank ascends on its
    /// own micro-batch (m-sharpness, with m the micro-batch), per-tensor
    /// norms and projections stay per rank. One reduction per step, half
    /// the traffic of [`Reduce::EveryPass`] at K = 1. Needs
    /// [`RestoreMode::Copy`](crate::RestoreMode::Copy): ranks hold different
    /// δ, and only a copy brings every rank back to the same θ bit for bit.
    FinalPass,
}

impl Reduce {
    /// The name used in messages (`"every_pass"`, `"final_pass"`).
    pub fn name(self) -> &'static str {
        match self {
            Reduce::EveryPass => "every_pass",
            Reduce::FinalPass => "final_pass",
        }
    }
}

/// The collective operations of a data-parallel step, over the ranks of one
/// job. Every rank calls the same operations in the same order (the step
/// does); an implementation must give every rank the same result, bit for
/// bit, and return an error rather than wait forever when a rank is gone.
pub trait Collective<S: ParamStore>: Send {
    /// This rank, in `0..world_size()`.
    fn rank(&self) -> usize;

    /// The number of ranks.
    fn world_size(&self) -> usize;

    /// Element-wise logical AND of `flags` over the ranks (every rank
    /// passes as many).
    fn all_and(&mut self, flags: &[bool]) -> Result<Vec<bool>>;

    /// Replaces the gradient of every tensor of `mask` (the same mask on
    /// every rank) by its mean over the ranks; every rank ends with the
    /// same bits.
    fn mean_grads(&mut self, store: &mut S, mask: &[bool]) -> Result<()>;
}

/// The gradients of the tensors of `mask`, read to the host and laid end to
/// end, in store order: what a host-side transport sends.
pub fn grads_to_host<S: ParamStore>(store: &S, mask: &[bool]) -> Result<Vec<f64>> {
    let mut out = Vec::new();
    for (index, _) in mask.iter().enumerate().filter(|(_, &m)| m) {
        out.extend_from_slice(store.read(Slot::Grads, index)?.data());
    }
    Ok(out)
}

/// Writes `values` (laid out as [`grads_to_host`] reads them) back into the
/// gradients of the tensors of `mask`, rounded to the store's dtype.
pub fn host_to_grads<S: ParamStore>(store: &mut S, mask: &[bool], values: &[f64]) -> Result<()> {
    let mut offset = 0;
    for (index, _) in mask.iter().enumerate().filter(|(_, &m)| m) {
        let shape = store.shape(index)?;
        let numel: usize = shape.iter().product();
        let Some(part) = values.get(offset..offset + numel) else {
            return Err(AmpError::contract(format!(
                "{} reduced gradient values for more elements",
                values.len()
            )));
        };
        offset += numel;
        let value = HostTensor::new(shape, store.dtype(), part.to_vec())?;
        store.write_grad(index, &value)?;
    }
    Ok(())
}

/// The mean of `parts` (one per rank, equally long), summed in rank order
/// so that every rank that computes it gets the same bits.
pub fn mean_in_rank_order(parts: &[Vec<f64>]) -> Vec<f64> {
    let Some(first) = parts.first() else {
        return Vec::new();
    };
    let n = parts.len() as f64;
    (0..first.len())
        .map(|i| parts.iter().map(|p| p[i]).sum::<f64>() / n)
        .collect()
}
