//! Dynamic loss scaling for mixed-precision training (f16/bf16 forward and
//! backward passes), across all of a step's passes.
//!
//! In half precision, small gradients underflow to zero; multiplying the
//! loss by a large factor S before the backward pass keeps them
//! representable, and dividing the gradients by S gives them back. AMP makes
//! the division matter more than it does for a plain optimiser: its ascent
//! δ ← δ + ζ·g is not normalised, so a gradient still multiplied by
//! S = 65 536 pushes every δ to the edge of its ε-ball. Here the step
//! divides **each** pass's gradients by S before it uses them (for the
//! ascent or for the base step), one overflow verdict covers all K + 1
//! passes, and an overflow skips the step with θ and the base optimiser's
//! state untouched, backing the scale off. The semantics are PyTorch's
//! `GradScaler`: start at 2¹⁶, ×2 after 2000 consecutive steps without
//! overflow, ×½ on overflow.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{AmpError, Result};
use crate::store::{ParamStore, Scalar, Slot};

/// How the loss scale moves, with PyTorch `GradScaler`'s defaults.
///
/// ```
/// use amp_core::LossScaleConfig;
///
/// let config = LossScaleConfig::default().growth_interval(1000);
/// assert_eq!((config.init_scale, config.growth_interval), (65536.0, 1000));
/// assert!(config.validate().is_ok());
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct LossScaleConfig {
    /// The scale of the first step, finite and > 0. Default 2¹⁶.
    pub init_scale: f64,
    /// Factor the scale grows by after `growth_interval` consecutive steps
    /// without overflow, finite and > 1. Default 2.
    pub growth_factor: f64,
    /// Factor the scale shrinks by on overflow, in (0, 1). Default ½.
    pub backoff_factor: f64,
    /// Consecutive steps without overflow before the scale grows, ≥ 1.
    /// Default 2000.
    pub growth_interval: u64,
}

impl Default for LossScaleConfig {
    fn default() -> Self {
        LossScaleConfig {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
}

impl LossScaleConfig {
    /// Sets [`LossScaleConfig::init_scale`].
    pub fn init_scale(mut self, init_scale: f64) -> Self {
        self.init_scale = init_scale;
        self
    }

    /// Sets [`LossScaleConfig::growth_factor`].
    pub fn growth_factor(mut self, growth_factor: f64) -> Self {
        self.growth_factor = growth_factor;
        self
    }

    /// Sets [`LossScaleConfig::backoff_factor`].
    pub fn backoff_factor(mut self, backoff_factor: f64) -> Self {
        self.backoff_factor = backoff_factor;
        self
    }

    /// Sets [`LossScaleConfig::growth_interval`].
    pub fn growth_interval(mut self, growth_interval: u64) -> Self {
        self.growth_interval = growth_interval;
        self
    }

    /// Checks every field's range ([`AmpError::InvalidConfig`] otherwise).
    pub fn validate(&self) -> Result<()> {
        let bad = |field, reason: &str, value: f64| {
            Err(AmpError::config(field, format!("{reason}, got {value}")))
        };
        if !(self.init_scale.is_finite() && self.init_scale >= MIN_SCALE) {
            return bad(
                "loss_scale.init_scale",
                "must be finite and at least the smallest normal f32",
                self.init_scale,
            );
        }
        if !(self.growth_factor.is_finite() && self.growth_factor > 1.0) {
            return bad(
                "loss_scale.growth_factor",
                "must be finite and > 1",
                self.growth_factor,
            );
        }
        if !(self.backoff_factor > 0.0 && self.backoff_factor < 1.0) {
            return bad(
                "loss_scale.backoff_factor",
                "must be in (0, 1)",
                self.backoff_factor,
            );
        }
        if self.growth_interval == 0 {
            return Err(AmpError::config(
                "loss_scale.growth_interval",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// The smallest scale: the smallest normal `f32`. A scale backed off below
/// it stays there (its reciprocal must stay finite in `f32`).
pub const MIN_SCALE: f64 = f32::MIN_POSITIVE as f64;

/// The largest scale: the largest `f32`. A scale grown past it stays there.
pub const MAX_SCALE: f64 = f32::MAX as f64;

/// The loss scale's state, part of [`AmpState`](crate::AmpState) and so of
/// every checkpoint.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct LossScaleState {
    /// The scale the next step multiplies its loss by.
    pub scale: f64,
    /// Consecutive steps without overflow since the scale last changed.
    pub growth_tracker: u64,
}

/// The scale of the current step, shared between [`Amp`](crate::Amp) and
/// the closure: take it with [`Amp::loss_scale`](crate::Amp::loss_scale)
/// before the step and multiply the loss by [`LossScale::scale`] before the
/// backward pass; the step divides the gradients by it.
///
/// A closure that clips gradients (or reads them for any other purpose)
/// must see them unscaled: it calls [`LossScale::unscale_grads`] first, and
/// the step then leaves that pass's gradients alone — they are never divided
/// twice.
#[derive(Clone, Debug)]
pub struct LossScale {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// The scale, as `f64` bits.
    scale: AtomicU64,
    /// Whether the closure has unscaled the current pass's gradients.
    unscaled: AtomicBool,
}

impl LossScale {
    pub(crate) fn new(scale: f64) -> Self {
        LossScale {
            shared: Arc::new(Shared {
                scale: AtomicU64::new(scale.to_bits()),
                unscaled: AtomicBool::new(false),
            }),
        }
    }

    /// The factor to multiply the loss by in this step.
    pub fn scale(&self) -> f64 {
        f64::from_bits(self.shared.scale.load(Ordering::Relaxed))
    }

    pub(crate) fn set_scale(&self, scale: f64) {
        self.shared.scale.store(scale.to_bits(), Ordering::Relaxed);
    }

    /// Divides the gradients now in `store` (every tensor that has one) by
    /// the scale, once per pass: a second call in the same pass does
    /// nothing, and the step does not divide them again. Call it inside the
    /// closure, after the backward pass, before anything reads the
    /// gradients (clipping).
    pub fn unscale_grads<S: ParamStore>(&self, store: &mut S) -> Result<()> {
        if self.shared.unscaled.load(Ordering::Relaxed) {
            return Ok(());
        }
        store.collect_grads()?;
        let mask = store.grad_mask()?;
        self.finish_pass(store, &mask)
    }

    /// Before each closure call: the pass's gradients are still scaled.
    pub(crate) fn begin_pass(&self) {
        self.shared.unscaled.store(false, Ordering::Relaxed);
    }

    /// After each closure call: divides the gradients of `mask` by the
    /// scale unless the closure did.
    pub(crate) fn finish_pass<S: ParamStore>(&self, store: &mut S, mask: &[bool]) -> Result<()> {
        if self.shared.unscaled.swap(true, Ordering::Relaxed) {
            return Ok(());
        }
        let inverse = S::Scalar::from_f64_rounded(1.0 / self.scale());
        let factors = vec![inverse; mask.len()];
        store.scale(Slot::Grads, &factors, mask)
    }
}

/// The scaler an [`Amp`](crate::Amp) holds: its configuration, the scale
/// shared with closures, and the count towards the next growth.
#[derive(Debug)]
pub(crate) struct Scaler {
    pub(crate) config: LossScaleConfig,
    pub(crate) handle: LossScale,
    pub(crate) growth_tracker: u64,
}

impl Scaler {
    pub(crate) fn new(config: LossScaleConfig) -> Result<Self> {
        config.validate()?;
        Ok(Scaler {
            config,
            handle: LossScale::new(config.init_scale),
            growth_tracker: 0,
        })
    }

    pub(crate) fn state(&self) -> LossScaleState {
        LossScaleState {
            scale: self.handle.scale(),
            growth_tracker: self.growth_tracker,
        }
    }

    pub(crate) fn load(&mut self, state: LossScaleState) {
        self.handle.set_scale(state.scale);
        self.growth_tracker = state.growth_tracker;
    }

    /// A step without overflow: the scale grows after `growth_interval` of
    /// them in a row.
    pub(crate) fn finite_step(&mut self) {
        self.growth_tracker += 1;
        if self.growth_tracker >= self.config.growth_interval {
            let grown = self.handle.scale() * self.config.growth_factor;
            self.handle.set_scale(grown.min(MAX_SCALE));
            self.growth_tracker = 0;
        }
    }

    /// A step that overflowed: the scale backs off.
    pub(crate) fn overflow(&mut self) {
        let shrunk = self.handle.scale() * self.config.backoff_factor;
        self.handle.set_scale(shrunk.max(MIN_SCALE));
        self.growth_tracker = 0;
    }
}

/// Checks a saved loss-scale state against the optimiser's configuration;
/// with `keep` (keep the optimiser's hyper-parameters), a state with no
/// scale leaves the optimiser's as it is, and a saved scale the optimiser
/// does not use is ignored.
pub(crate) fn check_state(
    config: Option<&LossScaleConfig>,
    state: Option<&LossScaleState>,
    keep: bool,
) -> Result<()> {
    match (config, state) {
        (None, None) => Ok(()),
        (Some(_), None) | (None, Some(_)) if keep => Ok(()),
        (Some(_), Some(s)) => {
            if s.scale.is_finite() && (MIN_SCALE..=MAX_SCALE).contains(&s.scale) {
                Ok(())
            } else {
                Err(AmpError::InvalidState(format!(
                    "the loss scale {} is outside [{MIN_SCALE:e}, {MAX_SCALE:e}]",
                    s.scale
                )))
            }
        }
        (Some(_), None) => Err(AmpError::InvalidState(
            "the state has no loss scale, and the optimiser scales its loss".into(),
        )),
        (None, Some(_)) => Err(AmpError::InvalidState(
            "the state has a loss scale, and the optimiser does not scale its loss".into(),
        )),
    }
}
