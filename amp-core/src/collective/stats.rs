//! What a transport's [`Collective`](super::Collective) has done: counters
//! shared with the caller.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// What a collective has done so far: shared (behind an `Arc`), so that it
/// can be read while the collective itself is boxed inside an `Amp`. Times
/// are wall-clock, waiting for the other ranks included; a transport that
/// only enqueues work on a device says what its times cover.
#[derive(Debug, Default)]
pub struct CollectiveStats {
    reduce_nanos: AtomicU64,
    agree_nanos: AtomicU64,
    sent_bytes: AtomicU64,
    reductions: AtomicU64,
    agreements: AtomicU64,
}

impl CollectiveStats {
    /// Seconds spent in gradient reductions (for a host transport: reading
    /// the gradients to the host, the exchange, the mean, writing them
    /// back).
    pub fn reduce_seconds(&self) -> f64 {
        self.reduce_nanos.load(Ordering::Relaxed) as f64 * 1e-9
    }

    /// Seconds spent agreeing on flags.
    pub fn agree_seconds(&self) -> f64 {
        self.agree_nanos.load(Ordering::Relaxed) as f64 * 1e-9
    }

    /// Bytes of gradient this rank has sent.
    pub fn sent_bytes(&self) -> u64 {
        self.sent_bytes.load(Ordering::Relaxed)
    }

    /// Gradient reductions.
    pub fn reductions(&self) -> u64 {
        self.reductions.load(Ordering::Relaxed)
    }

    /// Flag agreements.
    pub fn agreements(&self) -> u64 {
        self.agreements.load(Ordering::Relaxed)
    }

    /// Records one gradient reduction that started at `since` and sent
    /// `bytes` bytes of gradient.
    pub fn record_reduction(&self, since: Instant, bytes: u64) {
        add_elapsed(&self.reduce_nanos, since);
        self.sent_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.reductions.fetch_add(1, Ordering::Relaxed);
    }

    /// Records one agreement on flags that started at `since`.
    pub fn record_agreement(&self, since: Instant) {
        add_elapsed(&self.agree_nanos, since);
        self.agreements.fetch_add(1, Ordering::Relaxed);
    }

    /// Starts counting afresh.
    pub fn reset(&self) {
        for counter in [
            &self.reduce_nanos,
            &self.agree_nanos,
            &self.sent_bytes,
            &self.reductions,
            &self.agreements,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
    }
}

fn add_elapsed(counter: &AtomicU64, since: Instant) {
    let nanos = u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX);
    counter.fetch_add(nanos, Ordering::Relaxed);
}
