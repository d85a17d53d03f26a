//! [`FaultyStore`]: a [`ParamStore`] wrapper that panics inside a chosen
//! store operation, to check that a step brings θ back however it ends.

use std::cell::{Cell, RefCell};

use amp_core::{ParamStore, Result, Slot};

use crate::hooked::{Hooked, StoreHook, StoreOp};
use crate::InjectedPanic;

/// Forwards every operation to the wrapped store, counting them; once
/// [`armed`](FaultyStore::arm), the chosen operation panics (with an
/// [`InjectedPanic`] payload) or returns an error, before it touches
/// anything. It records the slots that completed operations wrote, so a
/// test can tell whether the base optimiser's state was written before the
/// panic.
pub type FaultyStore<S> = Hooked<S, Faults>;

/// The hook of a [`FaultyStore`]: where the fault is, and what has run.
#[derive(Debug, Default)]
pub struct Faults {
    /// Operations to let through before the injected fault; `None`: never.
    countdown: Cell<Option<usize>>,
    /// Whether the fault is a panic (else an error).
    panics: Cell<bool>,
    /// Operations seen since the last [`FaultyStore::arm`] or
    /// [`FaultyStore::count`].
    seen: Cell<usize>,
    written: RefCell<Vec<Slot>>,
}

impl<S: ParamStore> StoreHook<S> for Faults {
    fn before(&self, _store: &S, op: &StoreOp<'_>) -> Result<()> {
        if let Some(left) = self.countdown.get() {
            if left == 0 {
                self.countdown.set(None);
                if self.panics.get() {
                    std::panic::panic_any(InjectedPanic(self.seen.get()));
                }
                return Err(amp_core::AmpError::backend(format!(
                    "injected failure of store operation {} ({})",
                    self.seen.get(),
                    op.name
                )));
            }
            self.countdown.set(Some(left - 1));
        }
        self.seen.set(self.seen.get() + 1);
        self.written.borrow_mut().extend_from_slice(op.writes);
        Ok(())
    }
}

impl<S: ParamStore> Hooked<S, Faults> {
    /// Wraps `inner`, unarmed.
    pub fn new(inner: S) -> Self {
        Hooked::with_hook(inner, Faults::default())
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
        let faults = self.hook();
        faults.panics.set(panics);
        faults.countdown.set(Some(after));
        faults.seen.set(0);
        faults.written.borrow_mut().clear();
    }

    /// Starts counting operations without a fault.
    pub fn count(&self) {
        let faults = self.hook();
        faults.countdown.set(None);
        faults.seen.set(0);
        faults.written.borrow_mut().clear();
    }

    /// Operations seen since [`FaultyStore::arm`] or [`FaultyStore::count`].
    pub fn seen(&self) -> usize {
        self.hook().seen.get()
    }

    /// Whether an operation that completed since the last arming wrote
    /// `slot`.
    pub fn wrote(&self, slot: Slot) -> bool {
        self.hook().written.borrow().contains(&slot)
    }
}
