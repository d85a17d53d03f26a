//! [`Hooked`]: one [`ParamStore`] wrapper that forwards every operation —
//! the provided ones included, so a backend's fused versions stay the ones
//! that run — to the wrapped store, and shows each to a [`StoreHook`]
//! before and after it runs. Fault injection ([`crate::faulty`]), byte and
//! time meters and host-read counters are hooks over it.

use amp_core::{
    AdamCoefficients, AdamSlots, BufferId, DType, HostTensor, ParamStore, Pass, Result,
    SgdCoefficients, SgdMomentum, Slot,
};

/// One store operation as a hook sees it.
#[derive(Clone, Copy, Debug)]
pub struct StoreOp<'a> {
    /// The [`ParamStore`] method, such as `"axpy"`.
    pub name: &'static str,
    /// The slots it writes.
    pub writes: &'a [Slot],
    /// Its mask, for the operations that take one.
    pub mask: Option<&'a [bool]>,
    /// Parameter-sized passes over the masked tensors it makes, reads and
    /// writes counted (its logical memory traffic: `axpy` reads two slots
    /// and writes one, 3); 0 for operations that move no parameter data.
    pub passes: u64,
    /// Whether it brings data computed on the device back to the host, and
    /// so waits for the device.
    pub host_read: bool,
}

/// What watches, or disturbs, every operation of a [`Hooked`] store.
pub trait StoreHook<S: ParamStore> {
    /// Called before `op` runs; an error is returned in its place, and the
    /// operation does not run.
    fn before(&self, store: &S, op: &StoreOp<'_>) -> Result<()> {
        let _ = (store, op);
        Ok(())
    }

    /// Called after `op` ran, whatever it returned.
    fn after(&self, store: &S, op: &StoreOp<'_>) {
        let _ = (store, op);
    }
}

/// A store that forwards every operation to `inner`, shown to `hook`.
/// Shape queries (`num_tensors`, `shape`, `dtype`) are not shown.
#[derive(Debug)]
pub struct Hooked<S, H> {
    inner: S,
    hook: H,
}

impl<S: ParamStore, H: StoreHook<S>> Hooked<S, H> {
    /// Wraps `inner`.
    pub fn with_hook(inner: S, hook: H) -> Self {
        Hooked { inner, hook }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The wrapped store, mutably: what a closure computes gradients with.
    pub fn inner_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The hook.
    pub fn hook(&self) -> &H {
        &self.hook
    }

    /// Gives the wrapped store back.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// Runs `f` on the inner store, shown to the hook.
    fn run<T>(&mut self, op: StoreOp<'_>, f: impl FnOnce(&mut S) -> Result<T>) -> Result<T> {
        self.hook.before(&self.inner, &op)?;
        let out = f(&mut self.inner);
        self.hook.after(&self.inner, &op);
        out
    }

    /// [`Hooked::run`] for the operations that take `&self`.
    fn look<T>(&self, op: StoreOp<'_>, f: impl FnOnce(&S) -> Result<T>) -> Result<T> {
        self.hook.before(&self.inner, &op)?;
        let out = f(&self.inner);
        self.hook.after(&self.inner, &op);
        out
    }
}

/// An operation's description.
fn op<'a>(
    name: &'static str,
    writes: &'a [Slot],
    mask: Option<&'a [bool]>,
    passes: u64,
) -> StoreOp<'a> {
    StoreOp {
        name,
        writes,
        mask,
        passes,
        host_read: false,
    }
}

/// An operation that returns device data to the host.
fn host_op<'a>(name: &'static str, mask: Option<&'a [bool]>, passes: u64) -> StoreOp<'a> {
    StoreOp {
        host_read: true,
        ..op(name, &[], mask, passes)
    }
}

impl<S: ParamStore, H: StoreHook<S>> ParamStore for Hooked<S, H> {
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
        self.run(op("zero_grads", &[Slot::Grads], None, 0), |s| {
            s.zero_grads()
        })
    }

    fn grad_mask(&self) -> Result<Vec<bool>> {
        self.look(op("grad_mask", &[], None, 0), |s| s.grad_mask())
    }

    fn alloc_buffer(&mut self) -> Result<BufferId> {
        self.run(op("alloc_buffer", &[], None, 0), |s| s.alloc_buffer())
    }

    fn free_buffer(&mut self, id: BufferId) -> Result<()> {
        self.run(op("free_buffer", &[Slot::Buffer(id)], None, 0), |s| {
            s.free_buffer(id)
        })
    }

    fn pin_buffer(&mut self, id: BufferId, pinned: bool) -> Result<()> {
        self.run(op("pin_buffer", &[], None, 0), |s| s.pin_buffer(id, pinned))
    }

    fn prepare_pass(&mut self, pass: Pass) -> Result<()> {
        self.run(op("prepare_pass", &[], None, 0), |s| s.prepare_pass(pass))
    }

    fn collect_grads(&mut self) -> Result<()> {
        self.run(op("collect_grads", &[Slot::Grads], None, 0), |s| {
            s.collect_grads()
        })
    }

    fn copy(&mut self, dst: Slot, src: Slot, mask: &[bool]) -> Result<()> {
        self.run(op("copy", &[dst], Some(mask), 2), |s| {
            s.copy(dst, src, mask)
        })
    }

    fn scale(&mut self, dst: Slot, factor: &[S::Scalar], mask: &[bool]) -> Result<()> {
        self.run(op("scale", &[dst], Some(mask), 2), |s| {
            s.scale(dst, factor, mask)
        })
    }

    fn axpy(&mut self, dst: Slot, alpha: &[S::Scalar], src: Slot, mask: &[bool]) -> Result<()> {
        self.run(op("axpy", &[dst], Some(mask), 3), |s| {
            s.axpy(dst, alpha, src, mask)
        })
    }

    fn axpy_from(
        &mut self,
        dst: Slot,
        base: Slot,
        alpha: &[S::Scalar],
        src: Slot,
        mask: &[bool],
    ) -> Result<()> {
        self.run(op("axpy_from", &[dst], Some(mask), 3), |s| {
            s.axpy_from(dst, base, alpha, src, mask)
        })
    }

    fn perturb_from_grads(
        &mut self,
        snapshot: Option<Slot>,
        delta: Option<Slot>,
        inner_lr: &[S::Scalar],
        epsilon: &[S::Scalar],
        mask: &[bool],
    ) -> Result<S::Norms> {
        // Reads the gradient twice and θ once, writes θ, the snapshot and δ
        // where asked for; may leave the gradient scaled.
        let mut writes = vec![Slot::Params, Slot::Grads];
        writes.extend(snapshot);
        writes.extend(delta);
        let passes = 4 + u64::from(snapshot.is_some()) + u64::from(delta.is_some());
        self.run(op("perturb_from_grads", &writes, Some(mask), passes), |s| {
            s.perturb_from_grads(snapshot, delta, inner_lr, epsilon, mask)
        })
    }

    fn norms(&mut self, src: Slot, mask: &[bool]) -> Result<S::Norms> {
        self.run(op("norms", &[], Some(mask), 1), |s| s.norms(src, mask))
    }

    fn clip_to_norms(
        &mut self,
        dst: Slot,
        norms: &S::Norms,
        max_norm: &[S::Scalar],
        mask: &[bool],
    ) -> Result<()> {
        self.run(op("clip_to_norms", &[dst], Some(mask), 2), |s| {
            s.clip_to_norms(dst, norms, max_norm, mask)
        })
    }

    fn norms_to_host(&self, norms: &S::Norms) -> Result<Vec<f64>> {
        self.look(host_op("norms_to_host", None, 0), |s| {
            s.norms_to_host(norms)
        })
    }

    fn all_finite(&mut self, src: Slot, mask: &[bool]) -> Result<bool> {
        self.run(host_op("all_finite", Some(mask), 1), |s| {
            s.all_finite(src, mask)
        })
    }

    fn read(&self, slot: Slot, index: usize) -> Result<HostTensor> {
        self.look(host_op("read", None, 0), |s| s.read(slot, index))
    }

    fn write(&mut self, slot: Slot, index: usize, value: &HostTensor) -> Result<()> {
        self.run(op("write", &[slot], None, 0), |s| {
            s.write(slot, index, value)
        })
    }

    fn write_grad(&mut self, index: usize, value: &HostTensor) -> Result<()> {
        self.run(op("write_grad", &[Slot::Grads], None, 0), |s| {
            s.write_grad(index, value)
        })
    }

    fn addcmul(
        &mut self,
        dst: Slot,
        alpha: &[S::Scalar],
        a: Slot,
        b: Slot,
        mask: &[bool],
    ) -> Result<()> {
        // Reads dst, a and b (once when they are one slot), writes dst.
        let passes = if a == b { 3 } else { 4 };
        self.run(op("addcmul", &[dst], Some(mask), passes), |s| {
            s.addcmul(dst, alpha, a, b, mask)
        })
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
        self.run(op("addcdiv_sqrt", &[dst], Some(mask), 4), |s| {
            s.addcdiv_sqrt(dst, alpha, num, den, divisor, eps, mask)
        })
    }

    fn maximum(&mut self, dst: Slot, src: Slot, mask: &[bool]) -> Result<()> {
        self.run(op("maximum", &[dst], Some(mask), 3), |s| {
            s.maximum(dst, src, mask)
        })
    }

    fn adam_update(
        &mut self,
        slots: AdamSlots,
        coefficients: &[AdamCoefficients<S::Scalar>],
        mask: &[bool],
    ) -> Result<()> {
        // Reads θ, g and the moments, writes θ and the moments (the
        // gradient too where weight decay folds into it).
        let mut writes = vec![Slot::Params, Slot::Grads, slots.exp_avg, slots.exp_avg_sq];
        writes.extend(slots.max_exp_avg_sq);
        let passes = if slots.max_exp_avg_sq.is_some() { 9 } else { 7 };
        self.run(op("adam_update", &writes, Some(mask), passes), |s| {
            s.adam_update(slots, coefficients, mask)
        })
    }

    fn sgd_update(
        &mut self,
        weights: Slot,
        momentum: Option<&SgdMomentum<S::Scalar>>,
        coefficients: &[SgdCoefficients<S::Scalar>],
        mask: &[bool],
    ) -> Result<()> {
        // Reads the weights, g and the momentum buffer, writes θ and the
        // buffer (the gradient too where the sequence folds into it).
        let mut writes = vec![Slot::Params, Slot::Grads];
        writes.extend(momentum.map(|m| m.buffer));
        let passes = if momentum.is_some() { 5 } else { 3 };
        self.run(op("sgd_update", &writes, Some(mask), passes), |s| {
            s.sgd_update(weights, momentum, coefficients, mask)
        })
    }

    fn clip_grad_norm(&mut self, max_norm: f64, mask: &[bool]) -> Result<f64> {
        // Norms (one read), the coefficient to the host, the scaling (a
        // read and a write).
        let op = StoreOp {
            writes: &[Slot::Grads],
            ..host_op("clip_grad_norm", Some(mask), 3)
        };
        self.run(op, |s| s.clip_grad_norm(max_norm, mask))
    }
}
