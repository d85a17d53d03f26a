//! Where the store's CPU operations write: which tensor of a slot an
//! in-place operation may write into ([`CandleStore::in_place_target`]),
//! the spare storage that receives the first write to a gradient taken from
//! the caller, and [`Batch`], which runs the kernels of one operation over
//! many tensors on rayon's threads.

use amp_core::{Result, Slot};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::in_place::{sum_of_squares, CopyFrom};
use crate::views::schedule;
use crate::{backend, same_storage, CandleNorms, CandleStore};

/// The in-place kernels of one operation, on distinct tensors, queued and
/// then run together, scheduled by amp-core's rule ([`schedule`]):
/// over rayon's threads, tensor by tensor, when there are several holding
/// enough elements between them (a long tensor also splits its own loop);
/// in order otherwise. Every element is computed on its own, so the bits do
/// not depend on the schedule. `J` is the one closure type of the operation
/// (no allocation per kernel).
pub(crate) struct Batch<J> {
    jobs: Vec<J>,
    elements: usize,
    /// The kernels run on the CPU (else in order: see
    /// [`CandleStore::batch`]).
    host: bool,
}

impl<J: FnOnce() -> candle_core::Result<()> + Send> Batch<J> {
    /// Queues `job`, which writes `elements` elements.
    pub(crate) fn push(&mut self, elements: usize, job: J) {
        self.elements += elements;
        self.jobs.push(job);
    }

    /// Runs every job; the first error is returned (the others may have
    /// run).
    pub(crate) fn run(self) -> Result<()> {
        match schedule(self.host, self.jobs.len(), self.elements) {
            Some(per_piece) => {
                let jobs = self.jobs.into_par_iter().with_min_len(per_piece);
                jobs.try_for_each(|job| job())
            }
            None => self.jobs.into_iter().try_for_each(|job| job()),
        }
        .map_err(backend)
    }
}

impl CandleStore {
    /// This store with every operation allocating its result, as candle's
    /// operations do, instead of writing into the existing storage. The
    /// results are the same bits; what changes is memory traffic (each
    /// result is freshly allocated memory). For comparisons and debugging;
    /// half-precision stores always allocate, and CUDA stores unless
    /// [`CandleStore::in_place_on_cuda`].
    pub fn allocating(mut self) -> Self {
        self.in_place = false;
        self.in_place_cuda = false;
        self
    }

    /// This store, on a CUDA device, with its optimiser's operations
    /// written into the existing storage by amp-candle's own CUDA kernels
    /// (one launch per tensor and operation), as the CPU store writes in
    /// place by default, instead of candle's allocating operations. On the
    /// CPU it changes nothing.
    ///
    /// The kernels compute each element with the CPU loops' sequence of
    /// IEEE operations (no fused multiply-add), so from the same operands
    /// they give the CPU store's bits, where candle's own kernels may
    /// differ in the last place. The norms stay candle's GPU reductions,
    /// summed in another order than on the CPU: where a norm enters a step
    /// (clipping, an ascent clipped to ε) the results agree with the CPU
    /// store's to rounding, not bit for bit. Clipping reads the per-tensor
    /// coefficients to the host (one synchronisation per clip). Opt-in:
    /// CUDA stores use candle's operations by default.
    pub fn in_place_on_cuda(mut self) -> Self {
        self.in_place = true;
        self.in_place_cuda = true;
        self
    }

    /// Whether this store writes into existing storage: with `f32` or
    /// `f64` storage computed in its own dtype, without master weights, on
    /// the CPU unless [`CandleStore::allocating`], on CUDA with
    /// [`CandleStore::in_place_on_cuda`].
    pub(crate) fn writes_in_place(&self) -> bool {
        let device = match &self.device {
            Device::Cpu => self.in_place,
            Device::Cuda(_) => self.in_place && self.in_place_cuda,
            _ => false,
        };
        device && self.compute == self.dtype && self.master.is_none()
    }

    /// A batch of in-place kernels for `capacity` tensors: run over
    /// rayon's threads on the CPU ([`Batch::run`]), in order on a GPU
    /// (each kernel is one launch on the device's stream).
    pub(crate) fn batch<J>(&self, capacity: usize) -> Batch<J> {
        Batch {
            jobs: Vec::with_capacity(capacity),
            elements: 0,
            host: self.device.is_cpu(),
        }
    }

    /// The norms of `src` read from host memory ([`sum_of_squares`]) on
    /// the CPU for `f32` and `f64` storage, in both modes (they write
    /// nothing); `None` elsewhere, and for a tensor that is not contiguous.
    /// With `scale`, the norms of `src` scaled tensor by tensor as the
    /// store's `scale` would scale it.
    pub(crate) fn host_norms(
        &self,
        src: Slot,
        mask: &[bool],
        scale: Option<&[f64]>,
    ) -> Result<Option<CandleNorms>> {
        if !self.device.is_cpu() || self.compute != self.dtype {
            return Ok(None);
        }
        let factor = |index: usize| scale.map_or(1.0, |s| s[index]);
        let sums = self.read_each(src, mask, |index, t| sum_of_squares(t, factor(index)))?;
        let mut out = vec![0.0f64; mask.len()];
        for (index, sum) in sums.into_iter().enumerate() {
            match sum {
                Some(Some(sum)) => out[index] = sum,
                Some(None) => return Ok(None),
                None => {}
            }
        }
        let sums = out;
        let norms = sums.into_iter().map(f64::sqrt).collect::<Vec<_>>();
        let n = norms.len();
        let norms = Tensor::from_vec(norms, n, &self.device)
            .and_then(|t| t.to_dtype(self.compute))
            .map_err(crate::backend)?;
        Ok(Some(CandleNorms { norms }))
    }

    /// `read(index, tensor)` for every tensor of `slot` under `mask` (`None`
    /// where masked out), over rayon's threads tensor by tensor when there
    /// are several holding enough elements between them
    /// ([`CandleStore::each`]): for scans of host memory. A missing
    /// gradient is read as zeros.
    pub(crate) fn read_each<R: Send>(
        &self,
        slot: Slot,
        mask: &[bool],
        read: impl Fn(usize, &Tensor) -> R + Sync + Send,
    ) -> Result<Vec<Option<R>>> {
        let view = self.view(slot)?;
        let indices: Vec<usize> = (0..mask.len()).filter(|&i| mask[i]).collect();
        let results = self.each(&indices, |index| match view.get(index) {
            Some(tensor) => Ok(read(index, tensor)),
            None => self.value(slot, index).map(|zeros| read(index, &zeros)),
        });
        let mut out: Vec<Option<R>> = std::iter::repeat_with(|| None).take(mask.len()).collect();
        for (index, result) in indices.into_iter().zip(results) {
            out[index] = Some(result?);
        }
        Ok(out)
    }

    /// Tensor `index` of `slot` when an operation may write into its
    /// storage: a var (updated in place anyway, as `Var::set` does), a
    /// buffer, or a gradient the store made itself; contiguous and not
    /// empty. A gradient taken from the caller is first copied into the
    /// tensor's spare ([`CandleStore::grad_target`]).
    pub(crate) fn in_place_target(&mut self, slot: Slot, index: usize) -> Result<Option<Tensor>> {
        if !self.writes_in_place() {
            return Ok(None);
        }
        let tensor = match slot {
            Slot::Params => self.vars.get(index).map(|v| v.as_tensor().clone()),
            Slot::Grads => self.grad_target(index)?,
            Slot::Buffer(id) => self.buffers.get(id)?.get(index).cloned(),
        };
        Ok(tensor.filter(|t| t.is_contiguous() && t.elem_count() > 0))
    }

    /// Gradient `index` as the target of an in-place operation: one the
    /// store made itself, or else the tensor's spare, given the gradient's
    /// values and then made the gradient — one pass over memory already
    /// mapped, where an allocating operation would map fresh pages. `None`
    /// without a spare (then the operation allocates).
    fn grad_target(&mut self, index: usize) -> Result<Option<Tensor>> {
        if self.grad_owned.get(index) == Some(&true) {
            return Ok(self.grads[index].clone());
        }
        let Some((spare, grad)) = self.take_spare(index) else {
            return Ok(None);
        };
        spare.inplace_op2(&grad, &CopyFrom).map_err(backend)?;
        self.replace_grad(index, Some(spare.clone()), true);
        Ok(Some(spare))
    }

    /// The spare of tensor `index`, to receive a value computed from the
    /// gradient taken from the caller, returned beside it. Once written,
    /// the caller makes the spare the gradient ([`CandleStore::replace_grad`],
    /// owned); on failure the gradient is untouched. `None` when the
    /// gradient is the store's own or missing, when there is no spare, or
    /// when the gradient is the spare's own storage or not contiguous.
    pub(crate) fn take_spare(&mut self, index: usize) -> Option<(Tensor, Tensor)> {
        if !self.writes_in_place() || self.grad_owned.get(index) != Some(&false) {
            return None;
        }
        let grad = self.grads[index].clone().filter(Tensor::is_contiguous)?;
        let spare = self.spare[index].take()?;
        // A spare that is the gradient's own storage (handed back by the
        // caller) is dropped: it must not be written while read.
        if same_storage(&grad, &spare) {
            return None;
        }
        Some((spare, grad))
    }

    /// Makes `value` gradient `index`, `owned` when the store made it; a
    /// gradient the store made itself that this replaces becomes the
    /// tensor's spare (in-place stores).
    pub(crate) fn replace_grad(&mut self, index: usize, value: Option<Tensor>, owned: bool) {
        let old = std::mem::replace(&mut self.grads[index], value);
        if self.grad_owned[index] && self.writes_in_place() {
            if let Some(old) = old {
                self.spare[index] = Some(old);
            }
        }
        self.grad_owned[index] = owned;
    }
}
