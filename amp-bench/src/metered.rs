//! [`Metered`]: a [`ParamStore`] wrapper (amp-testkit's [`Hooked`] with a
//! [`Metering`] hook) that counts the bytes each batched primitive reads and
//! writes, and the time it takes.
//!
//! The byte count is the *logical* traffic of the primitives that amp-core
//! issues, whatever the backend does inside them: `copy` reads and writes
//! each element once, `scale` and `clip_to_norms` read and write it, `axpy`
//! and `axpy_from` read two and write one, `norms` and `all_finite` read
//! one, `perturb_from_grads` reads the gradient twice and θ once and writes
//! θ (and the snapshot and δ where asked for), `sgd_update` reads θ (or the
//! snapshot), g and the momentum buffer and writes θ and the buffer,
//! `adam_update` reads θ, g and the moments and writes θ and the moments.
//! This is the numerator of "optimizer throughput as a fraction of the copy
//! floor": a backend that makes extra passes (temporaries, a separate
//! write-back) moves more bytes than it is credited with, and scores lower.

use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant};

use amp::{ParamStore, Result};
use amp_testkit::hooked::{Hooked, StoreHook, StoreOp};

/// The primitives that move parameter-sized data, in report order.
pub const OPS: [&str; 12] = [
    "copy",
    "scale",
    "axpy",
    "axpy_from",
    "sgd",
    "adam",
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

/// The entry of [`OPS`] an operation is counted under; `None` for those
/// that move no parameter data (buffer bookkeeping, host reads of single
/// tensors, the gradient mask).
fn entry(name: &str) -> Option<usize> {
    Some(match name {
        "copy" => 0,
        "scale" => 1,
        "axpy" => 2,
        "axpy_from" => 3,
        "sgd_update" => 4,
        "adam_update" => 5,
        "perturb_from_grads" => 6,
        "norms" => 7,
        "clip_to_norms" => 8,
        "all_finite" => 9,
        // Moves no parameter data of its own (0 bytes), but is timed: a
        // backend that frees and reallocates gradients pays for it here.
        "zero_grads" => 10,
        "addcmul" | "addcdiv_sqrt" | "maximum" | "clip_grad_norm" => 11,
        _ => return None,
    })
}

/// The hook that meters: bytes from each operation's passes over the
/// masked tensors, and, when timing, the time until the device is done.
pub struct Metering<S> {
    meter: RefCell<Meter>,
    timed: Cell<bool>,
    /// Bytes per tensor (numel × dtype size).
    tensor_bytes: Vec<u64>,
    /// Waits for the device, so that asynchronous devices are timed
    /// honestly.
    sync: fn(&S),
    started: Cell<Option<Instant>>,
}

impl<S> Metering<S> {
    /// What has been counted since the last reset.
    pub fn meter(&self) -> Meter {
        self.meter.borrow().clone()
    }

    /// Starts counting afresh.
    pub fn reset(&self) {
        *self.meter.borrow_mut() = Meter::default();
    }

    /// Whether each primitive is timed (two clock reads and a device sync
    /// per call).
    pub fn set_timed(&self, timed: bool) {
        self.timed.set(timed);
    }
}

impl<S: ParamStore> StoreHook<S> for Metering<S> {
    fn before(&self, _store: &S, op: &StoreOp<'_>) -> Result<()> {
        if let Some(e) = entry(op.name) {
            let mask = op.mask.unwrap_or(&[]);
            let bytes: u64 = self
                .tensor_bytes
                .iter()
                .zip(mask)
                .filter(|(_, &m)| m)
                .map(|(b, _)| b)
                .sum();
            let mut meter = self.meter.borrow_mut();
            meter.bytes[e] += op.passes * bytes;
            meter.calls[e] += 1;
            if self.timed.get() {
                self.started.set(Some(Instant::now()));
            }
        }
        Ok(())
    }

    fn after(&self, store: &S, op: &StoreOp<'_>) {
        if let (Some(e), Some(start)) = (entry(op.name), self.started.take()) {
            (self.sync)(store);
            self.meter.borrow_mut().time[e] += start.elapsed();
        }
    }
}

/// A store that forwards every call to its inner store and meters it.
pub type Metered<S> = Hooked<S, Metering<S>>;

/// Wraps `inner`; `sync` waits for the device (a no-op on the CPU).
pub fn metered<S: ParamStore>(inner: S, sync: fn(&S)) -> Result<Metered<S>> {
    let size = inner.dtype().size_in_bytes() as u64;
    let tensor_bytes = (0..inner.num_tensors())
        .map(|i| Ok(inner.shape(i)?.iter().product::<usize>() as u64 * size))
        .collect::<Result<Vec<_>>>()?;
    let metering = Metering {
        meter: RefCell::new(Meter::default()),
        timed: Cell::new(false),
        tensor_bytes,
        sync,
        started: Cell::new(None),
    };
    Ok(Hooked::with_hook(inner, metering))
}
