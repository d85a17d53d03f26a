//! [`Counted`]: a [`ParamStore`] wrapper (amp-testkit's [`Hooked`] with a
//! [`HostReads`] hook) that counts the calls which bring a
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

use amp::{ParamStore, Result};
use amp_testkit::hooked::{Hooked, StoreHook, StoreOp};

/// The hook that counts host reads (a `Cell`: some reads take `&self`).
#[derive(Debug, Default)]
pub struct HostReads {
    reads: Cell<u64>,
}

impl HostReads {
    /// Host reads since the last [`HostReads::reset`].
    pub fn reads(&self) -> u64 {
        self.reads.get()
    }

    /// Starts counting from zero.
    pub fn reset(&self) {
        self.reads.set(0);
    }
}

impl<S: ParamStore> StoreHook<S> for HostReads {
    fn before(&self, _store: &S, op: &StoreOp<'_>) -> Result<()> {
        if op.host_read {
            self.reads.set(self.reads.get() + 1);
        }
        Ok(())
    }
}

/// A store that forwards every call to its inner store and counts host
/// reads.
pub type Counted<S> = Hooked<S, HostReads>;

/// Wraps `inner` with a zero count.
pub fn counted<S: ParamStore>(inner: S) -> Counted<S> {
    Hooked::with_hook(inner, HostReads::default())
}
