//! The store's tensors borrowed, slot by slot ([`View`]), and
//! [`CandleStore::each`], which runs one job per tensor over rayon's
//! threads with each job finding its own tensors.
//!
//! With a thousand small tensors, a step's cost is mostly per tensor:
//! looking tensors up, cloning their handles, checking layouts, locking
//! storage. Done on the calling thread ahead of the kernels, that work is
//! serial while the kernels run in parallel; done inside each tensor's job,
//! it runs on every thread, on the tensors the same thread then writes, and
//! borrows where it would clone.

use amp_core::threads::tensors_per_piece;
use amp_core::{Result, Slot};
use candle_core::{Tensor, Var};
use rayon::prelude::*;

use crate::{backend, storage_address, CandleStore};

/// The tensors of one slot, borrowed from the store.
#[derive(Clone, Copy)]
pub(crate) enum View<'a> {
    /// θ: the vars.
    Vars(&'a [Var]),
    /// θ with master weights, or a buffer.
    Tensors(&'a [Tensor]),
    /// The gradients (`None`: missing, which reads as zeros).
    Grads(&'a [Option<Tensor>]),
}

impl<'a> View<'a> {
    /// Tensor `index`; `None` for a missing gradient.
    pub(crate) fn get(self, index: usize) -> Option<&'a Tensor> {
        match self {
            View::Vars(vars) => vars.get(index).map(Var::as_tensor),
            View::Tensors(tensors) => tensors.get(index),
            View::Grads(grads) => grads.get(index).and_then(Option::as_ref),
        }
    }

    /// Tensor `index`, which an earlier pass of the same operation found:
    /// an error should it be missing.
    pub(crate) fn found(self, index: usize) -> candle_core::Result<&'a Tensor> {
        match self.get(index) {
            Some(tensor) => Ok(tensor),
            None => candle_core::bail!("tensor {index} went missing between passes"),
        }
    }
}

/// `tensor` when an in-place kernel can read or write it as one
/// contiguous run of elements: contiguous and not empty.
pub(crate) fn contiguous(tensor: Option<&Tensor>) -> Option<&Tensor> {
    tensor.filter(|t| t.is_contiguous() && t.elem_count() > 0)
}

/// Whether `tensor` shares its storage with any of `others`.
pub(crate) fn shares_storage<'a>(
    tensor: &Tensor,
    others: impl IntoIterator<Item = &'a Tensor>,
) -> bool {
    let address = storage_address(tensor);
    (others.into_iter()).any(|other| storage_address(other) == address)
}

impl CandleStore {
    /// The tensors of `slot`, borrowed; fails for a buffer that is not
    /// live.
    pub(crate) fn view(&self, slot: Slot) -> Result<View<'_>> {
        Ok(match (slot, &self.master) {
            (Slot::Params, None) => View::Vars(&self.vars),
            (Slot::Params, Some(master)) => View::Tensors(master),
            (Slot::Grads, _) => View::Grads(&self.grads),
            (Slot::Buffer(id), _) => View::Tensors(self.buffers.get(id)?),
        })
    }

    /// `job(index)` for every index of `indices`, the results in their
    /// order, scheduled by [`schedule`]: over rayon's threads, tensor by
    /// tensor, when there are several holding enough elements between them
    /// on the CPU; in order on this thread otherwise (always on a GPU).
    pub(crate) fn each<R: Send>(
        &self,
        indices: &[usize],
        job: impl Fn(usize) -> R + Sync + Send,
    ) -> Vec<R> {
        let elements: usize = indices.iter().map(|&i| self.numel[i]).sum();
        match schedule(self.device.is_cpu(), indices.len(), elements) {
            Some(per_piece) => {
                let jobs = indices.par_iter().with_min_len(per_piece);
                jobs.map(|&index| job(index)).collect()
            }
            None => indices.iter().map(|&index| job(index)).collect(),
        }
    }

    /// [`CandleStore::each`] for jobs that fail or not: the first error,
    /// if any (the other jobs may have run).
    pub(crate) fn each_pass(
        &self,
        indices: &[usize],
        job: impl Fn(usize) -> candle_core::Result<()> + Sync + Send,
    ) -> Result<()> {
        let ran = self.each(indices, job).into_iter();
        ran.collect::<candle_core::Result<()>>().map_err(backend)
    }
}

/// How jobs over `tensors` tensors holding `elements` elements in all run:
/// `Some(n)`, over rayon's threads at least `n` tensors to a piece,
/// by amp-core's rule ([`tensors_per_piece`]) — only on the CPU (`host`):
/// a GPU's kernels are launches on one stream, queued in order; `None`, in
/// order on the calling thread. The one place [`CandleStore::each`] and
/// [`Batch`](crate::targets::Batch) take their schedule from.
pub(crate) fn schedule(host: bool, tensors: usize, elements: usize) -> Option<usize> {
    tensors_per_piece(tensors, elements).filter(|_| host)
}
