//! [`Metered`]: a [`ParamStore`] wrapper that counts the bytes each batched
//! primitive reads and writes, and the time it takes.
//!
//! The byte count is the *logical* traffic of the primitives that amp-core
//! issues, whatever the backend does inside them: `copy` reads and writes
//! each element once, `scale` and `clip_to_norms` read and write it, `axpy`
//! and `axpy_from` read two and write one, `norms` and `all_finite` read
//! one, `perturb_from_grads` reads the gradient twice and θ once and writes
//! θ (and the snapshot and δ where asked for). This is the
//! numerator of "optimizer throughput as a fraction of the copy floor": a
//! backend that makes extra passes (temporaries, a separate write-back) moves
//! more bytes than it is credited with, and scores lower.

use std::time::{Duration, Instant};

use amp::{BufferId, DType, HostTensor, ParamStore, Result, Slot};

/// The primitives that move parameter-sized data, in report order.
pub const OPS: [&str; 10] = [
    "copy",
    "scale",
    "axpy",
    "axpy_from",
    "perturb",
    "norms",
    "clip_to_norms",
    "all_finite",
    "zero_grads",
    "other",
];

/// Bytes and time per primitive.
#[derive(Clone, Debug, Default)]
pub struct Meter {
    /// Bytes read and written, per entry of [`OPS`].
    pub bytes: [u64; OPS.len()],
    /// Calls, per entry of [`OPS`].
    pub calls: [u64; OPS.len()],
    /// Time spent, per entry of [`OPS`] (only when timing is on).
    pub time: [Duration; OPS.len()],
}

impl Meter {
    /// Total bytes over all primitives.
    pub fn total_bytes(&self) -> u64 {
        self.bytes.iter().sum()
    }
}

/// A store that forwards every call to `inner` and meters it.
pub struct Metered<S: ParamStore> {
    /// The wrapped store; closures reach the backend through it.
    pub inner: S,
    /// What has been counted since the last reset.
    pub meter: Meter,
    /// Whether each primitive is timed (adds two clock reads per call).
    pub timed: bool,
    /// Bytes per tensor (numel × dtype size), cached.
    tensor_bytes: Vec<u64>,
    /// Called after each timed primitive so that asynchronous devices are
    /// timed honestly.
    sync: fn(&S),
}

impl<S: ParamStore> Metered<S> {
    /// Wraps `inner`; `sync` waits for the device (a no-op on the CPU).
    pub fn new(inner: S, sync: fn(&S)) -> Result<Self> {
        let size = inner.dtype().size_in_bytes() as u64;
        let tensor_bytes = (0..inner.num_tensors())
            .map(|i| Ok(inner.shape(i)?.iter().product::<usize>() as u64 * size))
            .collect::<Result<Vec<_>>>()?;
        Ok(Metered {
            inner,
            meter: Meter::default(),
            timed: false,
            tensor_bytes,
            sync,
        })
    }

    fn masked_bytes(&self, mask: &[bool]) -> u64 {
        self.tensor_bytes
            .iter()
            .zip(mask)
            .filter(|(_, &m)| m)
            .map(|(b, _)| b)
            .sum()
    }

    fn record<T>(
        &mut self,
        op: usize,
        passes: u64,
        mask: &[bool],
        f: impl FnOnce(&mut S) -> T,
    ) -> T {
        let bytes = passes * self.masked_bytes(mask);
        self.meter.bytes[op] += bytes;
        self.meter.calls[op] += 1;
        if self.timed {
            let start = Instant::now();
            let out = f(&mut self.inner);
            (self.sync)(&self.inner);
            self.meter.time[op] += start.elapsed();
            out
        } else {
            f(&mut self.inner)
        }
    }
}

impl<S: ParamStore> ParamStore for Metered<S> {
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
        // Moves no parameter data of its own (0 bytes), but is timed: a
        // backend that frees and reallocates gradients pays for it here.
        self.record(8, 0, &[], |s| s.zero_grads())
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
        self.record(0, 2, mask, |s| s.copy(dst, src, mask))
    }
    fn scale(&mut self, dst: Slot, factor: &[Self::Scalar], mask: &[bool]) -> Result<()> {
        self.record(1, 2, mask, |s| s.scale(dst, factor, mask))
    }
    fn axpy(&mut self, dst: Slot, alpha: &[Self::Scalar], src: Slot, mask: &[bool]) -> Result<()> {
        self.record(2, 3, mask, |s| s.axpy(dst, alpha, src, mask))
    }
    fn addcmul(
        &mut self,
        dst: Slot,
        alpha: &[Self::Scalar],
        a: Slot,
        b: Slot,
        mask: &[bool],
    ) -> Result<()> {
        // Reads dst, a and b (once when they are one slot), writes dst.
        let passes = if a == b { 3 } else { 4 };
        self.record(9, passes, mask, |s| s.addcmul(dst, alpha, a, b, mask))
    }
    #[allow(clippy::too_many_arguments)]
    fn addcdiv_sqrt(
        &mut self,
        dst: Slot,
        alpha: &[Self::Scalar],
        num: Slot,
        den: Slot,
        divisor: &[Self::Scalar],
        eps: &[Self::Scalar],
        mask: &[bool],
    ) -> Result<()> {
        self.record(9, 4, mask, |s| {
            s.addcdiv_sqrt(dst, alpha, num, den, divisor, eps, mask)
        })
    }
    fn maximum(&mut self, dst: Slot, src: Slot, mask: &[bool]) -> Result<()> {
        self.record(9, 3, mask, |s| s.maximum(dst, src, mask))
    }
    fn axpy_from(
        &mut self,
        dst: Slot,
        base: Slot,
        alpha: &[Self::Scalar],
        src: Slot,
        mask: &[bool],
    ) -> Result<()> {
        self.record(3, 3, mask, |s| s.axpy_from(dst, base, alpha, src, mask))
    }
    fn perturb_from_grads(
        &mut self,
        snapshot: Option<Slot>,
        delta: Option<Slot>,
        inner_lr: &[Self::Scalar],
        epsilon: &[Self::Scalar],
        mask: &[bool],
    ) -> Result<Self::Norms> {
        let passes = 4 + u64::from(snapshot.is_some()) + u64::from(delta.is_some());
        self.record(4, passes, mask, |s| {
            s.perturb_from_grads(snapshot, delta, inner_lr, epsilon, mask)
        })
    }
    fn norms(&mut self, src: Slot, mask: &[bool]) -> Result<Self::Norms> {
        self.record(5, 1, mask, |s| s.norms(src, mask))
    }
    fn clip_to_norms(
        &mut self,
        dst: Slot,
        norms: &Self::Norms,
        max_norm: &[Self::Scalar],
        mask: &[bool],
    ) -> Result<()> {
        self.record(6, 2, mask, |s| s.clip_to_norms(dst, norms, max_norm, mask))
    }
    fn norms_to_host(&self, norms: &Self::Norms) -> Result<Vec<f64>> {
        self.inner.norms_to_host(norms)
    }
    fn all_finite(&mut self, src: Slot, mask: &[bool]) -> Result<bool> {
        self.record(7, 1, mask, |s| s.all_finite(src, mask))
    }
    fn read(&self, slot: Slot, index: usize) -> Result<HostTensor> {
        self.inner.read(slot, index)
    }
    fn write(&mut self, slot: Slot, index: usize, value: &HostTensor) -> Result<()> {
        self.inner.write(slot, index, value)
    }
    fn clip_grad_norm(&mut self, max_norm: f64, mask: &[bool]) -> Result<f64> {
        self.record(9, 3, mask, |s| s.clip_grad_norm(max_norm, mask))
    }
}
