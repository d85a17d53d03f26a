//! [`Counted`]: a [`ParamStore`] wrapper that counts the calls which bring a
//! value from the device to the host — and so wait for the device — during
//! an optimiser step: `norms_to_host`, `all_finite`, `read` and
//! `clip_grad_norm` (each returns host data computed on the device). Every
//! other primitive only queues device work.
//!
//! The count is per call of the store interface, which is what amp-core
//! controls; the backends implement each of these calls with one transfer
//! (one reduction brought back), so a count that does not grow with the
//! tensor count means the step's synchronisations do not either.

use std::cell::Cell;

use amp::{BufferId, DType, HostTensor, ParamStore, Result, Slot};

/// A store that forwards every call to `inner` and counts host reads.
pub struct Counted<S: ParamStore> {
    /// The wrapped store.
    pub inner: S,
    /// Host reads since the last reset (a `Cell`: some reads take `&self`).
    reads: Cell<u64>,
}

impl<S: ParamStore> Counted<S> {
    /// Wraps `inner` with a zero count.
    pub fn new(inner: S) -> Self {
        Counted {
            inner,
            reads: Cell::new(0),
        }
    }

    /// Host reads since the last [`Counted::reset`].
    pub fn reads(&self) -> u64 {
        self.reads.get()
    }

    /// Starts counting from zero.
    pub fn reset(&self) {
        self.reads.set(0);
    }

    fn count(&self) {
        self.reads.set(self.reads.get() + 1);
    }
}

impl<S: ParamStore> ParamStore for Counted<S> {
    type Scalar = S::Scalar;
    type Norms = S::Norms;

    fn num_tensors(&self) -> usize {
        self.inner.num_tensors()
    }
    fn shape(&self, index: usize) -> Result<Vec<usize>> {
        self.inner.shape(index)
    }
    fn dtype(&self) -> DType {
        self.inner.dtype()
    }
    fn zero_grads(&mut self) -> Result<()> {
        self.inner.zero_grads()
    }
    fn grad_mask(&self) -> Result<Vec<bool>> {
        self.inner.grad_mask()
    }
    fn alloc_buffer(&mut self) -> Result<BufferId> {
        self.inner.alloc_buffer()
    }
    fn free_buffer(&mut self, id: BufferId) -> Result<()> {
        self.inner.free_buffer(id)
    }
    fn copy(&mut self, dst: Slot, src: Slot, mask: &[bool]) -> Result<()> {
        self.inner.copy(dst, src, mask)
    }
    fn scale(&mut self, dst: Slot, factor: &[Self::Scalar], mask: &[bool]) -> Result<()> {
        self.inner.scale(dst, factor, mask)
    }
    fn axpy(&mut self, dst: Slot, alpha: &[Self::Scalar], src: Slot, mask: &[bool]) -> Result<()> {
        self.inner.axpy(dst, alpha, src, mask)
    }
    fn axpy_from(
        &mut self,
        dst: Slot,
        base: Slot,
        alpha: &[Self::Scalar],
        src: Slot,
        mask: &[bool],
    ) -> Result<()> {
        self.inner.axpy_from(dst, base, alpha, src, mask)
    }
    fn perturb_from_grads(
        &mut self,
        snapshot: Option<Slot>,
        delta: Option<Slot>,
        inner_lr: &[Self::Scalar],
        epsilon: &[Self::Scalar],
        mask: &[bool],
    ) -> Result<Self::Norms> {
        self.inner
            .perturb_from_grads(snapshot, delta, inner_lr, epsilon, mask)
    }
    fn norms(&mut self, src: Slot, mask: &[bool]) -> Result<Self::Norms> {
        self.inner.norms(src, mask)
    }
    fn clip_to_norms(
        &mut self,
        dst: Slot,
        norms: &Self::Norms,
        max_norm: &[Self::Scalar],
        mask: &[bool],
    ) -> Result<()> {
        self.inner.clip_to_norms(dst, norms, max_norm, mask)
    }
    fn norms_to_host(&self, norms: &Self::Norms) -> Result<Vec<f64>> {
        self.count();
        self.inner.norms_to_host(norms)
    }
    fn all_finite(&mut self, src: Slot, mask: &[bool]) -> Result<bool> {
        self.count();
        self.inner.all_finite(src, mask)
    }
    fn read(&self, slot: Slot, index: usize) -> Result<HostTensor> {
        self.count();
        self.inner.read(slot, index)
    }
    fn write(&mut self, slot: Slot, index: usize, value: &HostTensor) -> Result<()> {
        self.inner.write(slot, index, value)
    }
    fn clip_grad_norm(&mut self, max_norm: f64, mask: &[bool]) -> Result<f64> {
        self.count();
        self.inner.clip_grad_norm(max_norm, mask)
    }
}
