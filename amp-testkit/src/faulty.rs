//! [`FaultyStore`]: a [`ParamStore`] wrapper that panics inside a chosen
//! store operation, to check that a step brings θ back however it ends.

use std::cell::{Cell, RefCell};

use amp_core::{BufferId, DType, HostTensor, ParamStore, Pass, Result, Slot};

use crate::InjectedPanic;

/// Forwards every operation to the wrapped store, counting them; once
/// [`armed`](FaultyStore::arm), the chosen operation panics (with an
/// [`InjectedPanic`] payload) or returns an error, before it touches
/// anything. It records the
/// slots that completed operations wrote, so a test can tell whether the
/// base optimiser's state was written before the panic.
pub struct FaultyStore<S> {
    inner: S,
    /// Operations to let through before the injected fault; `None`: never.
    countdown: Cell<Option<usize>>,
    /// Whether the fault is a panic (else an error).
    panics: Cell<bool>,
    /// Operations seen since the last [`FaultyStore::arm`] or
    /// [`FaultyStore::count`].
    seen: Cell<usize>,
    written: RefCell<Vec<Slot>>,
}

impl<S: ParamStore> FaultyStore<S> {
    /// Wraps `inner`, unarmed.
    pub fn new(inner: S) -> Self {
        FaultyStore {
            inner,
            countdown: Cell::new(None),
            panics: Cell::new(true),
            seen: Cell::new(0),
            written: RefCell::new(Vec::new()),
        }
    }

    /// The next `after` operations run; the one after them panics.
    pub fn arm(&self, after: usize) {
        self.arm_with(after, true);
    }

    /// The next `after` operations run; the one after them returns an
    /// [`AmpError::Backend`](amp_core::AmpError::Backend) error.
    pub fn arm_error(&self, after: usize) {
        self.arm_with(after, false);
    }

    fn arm_with(&self, after: usize, panics: bool) {
        self.panics.set(panics);
        self.countdown.set(Some(after));
        self.seen.set(0);
        self.written.borrow_mut().clear();
    }

    /// Starts counting operations without a panic.
    pub fn count(&self) {
        self.countdown.set(None);
        self.seen.set(0);
        self.written.borrow_mut().clear();
    }

    /// Operations seen since [`FaultyStore::arm`] or [`FaultyStore::count`].
    pub fn seen(&self) -> usize {
        self.seen.get()
    }

    /// Whether an operation that completed since the last arming wrote
    /// `slot`.
    pub fn wrote(&self, slot: Slot) -> bool {
        self.written.borrow().contains(&slot)
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn tick(&self, writes: &[Slot]) -> Result<()> {
        if let Some(left) = self.countdown.get() {
            if left == 0 {
                self.countdown.set(None);
                if self.panics.get() {
                    std::panic::panic_any(InjectedPanic(self.seen.get()));
                }
                return Err(amp_core::AmpError::backend(format!(
                    "injected failure of store operation {}",
                    self.seen.get()
                )));
            }
            self.countdown.set(Some(left - 1));
        }
        self.seen.set(self.seen.get() + 1);
        self.written.borrow_mut().extend_from_slice(writes);
        Ok(())
    }
}

impl<S: ParamStore> ParamStore for FaultyStore<S> {
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
        self.tick(&[Slot::Grads])?;
        self.inner.zero_grads()
    }

    fn grad_mask(&self) -> Result<Vec<bool>> {
        self.tick(&[])?;
        self.inner.grad_mask()
    }

    fn alloc_buffer(&mut self) -> Result<BufferId> {
        self.tick(&[])?;
        self.inner.alloc_buffer()
    }

    fn free_buffer(&mut self, id: BufferId) -> Result<()> {
        self.tick(&[Slot::Buffer(id)])?;
        self.inner.free_buffer(id)
    }

    fn copy(&mut self, dst: Slot, src: Slot, mask: &[bool]) -> Result<()> {
        self.tick(&[dst])?;
        self.inner.copy(dst, src, mask)
    }

    fn scale(&mut self, dst: Slot, factor: &[S::Scalar], mask: &[bool]) -> Result<()> {
        self.tick(&[dst])?;
        self.inner.scale(dst, factor, mask)
    }

    fn axpy(&mut self, dst: Slot, alpha: &[S::Scalar], src: Slot, mask: &[bool]) -> Result<()> {
        self.tick(&[dst])?;
        self.inner.axpy(dst, alpha, src, mask)
    }

    fn norms(&mut self, src: Slot, mask: &[bool]) -> Result<S::Norms> {
        self.tick(&[])?;
        self.inner.norms(src, mask)
    }

    fn clip_to_norms(
        &mut self,
        dst: Slot,
        norms: &S::Norms,
        max_norm: &[S::Scalar],
        mask: &[bool],
    ) -> Result<()> {
        self.tick(&[dst])?;
        self.inner.clip_to_norms(dst, norms, max_norm, mask)
    }

    fn norms_to_host(&self, norms: &S::Norms) -> Result<Vec<f64>> {
        self.tick(&[])?;
        self.inner.norms_to_host(norms)
    }

    fn all_finite(&mut self, src: Slot, mask: &[bool]) -> Result<bool> {
        self.tick(&[])?;
        self.inner.all_finite(src, mask)
    }

    fn read(&self, slot: Slot, index: usize) -> Result<HostTensor> {
        self.tick(&[])?;
        self.inner.read(slot, index)
    }

    fn write(&mut self, slot: Slot, index: usize, value: &HostTensor) -> Result<()> {
        self.tick(&[slot])?;
        self.inner.write(slot, index, value)
    }

    fn axpy_from(
        &mut self,
        dst: Slot,
        base: Slot,
        alpha: &[S::Scalar],
        src: Slot,
        mask: &[bool],
    ) -> Result<()> {
        self.tick(&[dst])?;
        self.inner.axpy_from(dst, base, alpha, src, mask)
    }

    fn perturb_from_grads(
        &mut self,
        snapshot: Option<Slot>,
        delta: Option<Slot>,
        inner_lr: &[S::Scalar],
        epsilon: &[S::Scalar],
        mask: &[bool],
    ) -> Result<S::Norms> {
        let mut writes = vec![Slot::Params, Slot::Grads];
        writes.extend(snapshot);
        writes.extend(delta);
        self.tick(&writes)?;
        self.inner
            .perturb_from_grads(snapshot, delta, inner_lr, epsilon, mask)
    }

    fn addcmul(
        &mut self,
        dst: Slot,
        alpha: &[S::Scalar],
        a: Slot,
        b: Slot,
        mask: &[bool],
    ) -> Result<()> {
        self.tick(&[dst])?;
        self.inner.addcmul(dst, alpha, a, b, mask)
    }

    fn addcdiv_sqrt(
        &mut self,
        dst: Slot,
        alpha: &[S::Scalar],
        num: Slot,
        den: Slot,
        divisor: &[S::Scalar],
        eps: &[S::Scalar],
        mask: &[bool],
    ) -> Result<()> {
        self.tick(&[dst])?;
        self.inner
            .addcdiv_sqrt(dst, alpha, num, den, divisor, eps, mask)
    }

    fn adam_update(
        &mut self,
        slots: amp_core::AdamSlots,
        coefficients: &[amp_core::AdamCoefficients<S::Scalar>],
        mask: &[bool],
    ) -> Result<()> {
        let mut writes = vec![Slot::Params, Slot::Grads, slots.exp_avg, slots.exp_avg_sq];
        writes.extend(slots.max_exp_avg_sq);
        self.tick(&writes)?;
        self.inner.adam_update(slots, coefficients, mask)
    }

    fn maximum(&mut self, dst: Slot, src: Slot, mask: &[bool]) -> Result<()> {
        self.tick(&[dst])?;
        self.inner.maximum(dst, src, mask)
    }

    fn pin_buffer(&mut self, id: BufferId, pinned: bool) -> Result<()> {
        self.tick(&[])?;
        self.inner.pin_buffer(id, pinned)
    }

    fn prepare_pass(&mut self, pass: Pass) -> Result<()> {
        self.tick(&[])?;
        self.inner.prepare_pass(pass)
    }
}
