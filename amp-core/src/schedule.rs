//! Learning-rate schedules that drive [`Amp::set_lr`](crate::Amp::set_lr).

use crate::error::{AmpError, Result};

/// A learning-rate schedule: the learning rate for an epoch, given the base
/// learning rate.
pub trait LrSchedule {
    /// The learning rate to use during `epoch` (0-based).
    fn lr(&self, base_lr: f64, epoch: usize) -> f64;
}

/// Multiplies the learning rate by `gamma` at each milestone epoch, as
/// PyTorch's `MultiStepLR` (the paper: ×0.1 at epochs 100 and 150).
#[derive(Clone, Debug, PartialEq)]
pub struct MultiStep {
    milestones: Vec<usize>,
    gamma: f64,
}

impl MultiStep {
    /// Builds the schedule; `milestones` must be strictly increasing and
    /// `gamma` finite and positive.
    pub fn new(milestones: Vec<usize>, gamma: f64) -> Result<Self> {
        if milestones.windows(2).any(|w| w[0] >= w[1]) {
            return Err(AmpError::config(
                "milestones",
                format!("must be strictly increasing, got {milestones:?}"),
            ));
        }
        if !(gamma.is_finite() && gamma > 0.0) {
            return Err(AmpError::config(
                "gamma",
                format!("must be finite and positive, got {gamma}"),
            ));
        }
        Ok(MultiStep { milestones, gamma })
    }
}

impl LrSchedule for MultiStep {
    fn lr(&self, base_lr: f64, epoch: usize) -> f64 {
        let passed = self.milestones.iter().filter(|&&m| m <= epoch).count();
        base_lr * self.gamma.powi(passed as i32)
    }
}

/// Cosine annealing from the base learning rate to `min_lr` over
/// `total_epochs`, as PyTorch's `CosineAnnealingLR` (closed form).
#[derive(Clone, Debug, PartialEq)]
pub struct Cosine {
    total_epochs: usize,
    min_lr: f64,
}

impl Cosine {
    /// Builds the schedule; `total_epochs` must be positive and `min_lr`
    /// finite and non-negative.
    pub fn new(total_epochs: usize, min_lr: f64) -> Result<Self> {
        if total_epochs == 0 {
            return Err(AmpError::config("total_epochs", "must be positive"));
        }
        if !(min_lr.is_finite() && min_lr >= 0.0) {
            return Err(AmpError::config(
                "min_lr",
                format!("must be finite and non-negative, got {min_lr}"),
            ));
        }
        Ok(Cosine {
            total_epochs,
            min_lr,
        })
    }
}

impl LrSchedule for Cosine {
    fn lr(&self, base_lr: f64, epoch: usize) -> f64 {
        let t = epoch.min(self.total_epochs) as f64 / self.total_epochs as f64;
        self.min_lr + (base_lr - self.min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

/// A constant learning rate.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Constant;

impl LrSchedule for Constant {
    fn lr(&self, base_lr: f64, _epoch: usize) -> f64 {
        base_lr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multistep_matches_pytorch() {
        let s = MultiStep::new(vec![100, 150], 0.1).unwrap();
        assert_eq!(s.lr(0.1, 0), 0.1);
        assert_eq!(s.lr(0.1, 99), 0.1);
        assert!((s.lr(0.1, 100) - 0.01).abs() < 1e-15);
        assert!((s.lr(0.1, 150) - 0.001).abs() < 1e-15);
        assert!(MultiStep::new(vec![5, 5], 0.1).is_err());
        assert!(MultiStep::new(vec![5], f64::NAN).is_err());
    }

    #[test]
    fn cosine_endpoints_and_midpoint() {
        let s = Cosine::new(10, 0.0).unwrap();
        assert_eq!(s.lr(1.0, 0), 1.0);
        assert!((s.lr(1.0, 5) - 0.5).abs() < 1e-12);
        assert!(s.lr(1.0, 10).abs() < 1e-12);
        assert!(s.lr(1.0, 20).abs() < 1e-12);
        assert!(Cosine::new(0, 0.0).is_err());
    }
}
