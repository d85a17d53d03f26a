//! # amp-core
//!
//! Backend-agnostic traits and the optimiser of **Adversarial Model
//! Perturbation** (AMP; Zheng, Zhang & Mao, *Regularizing Neural Networks via
//! Adversarial Model Perturbation*, CVPR 2021). AMP here is adversarial model
//! perturbation — a regulariser that trains toward flat minima by minimising
//! the loss under the worst norm-bounded perturbation of the weights — not
//! automatic mixed precision.
//!
//! The algorithm is written once, in [`Amp`], against three traits:
//! - [`ParamStore`]: the parameters, their gradients and parameter-shaped
//!   buffers, with batched operations (axpy, scale, per-tensor norms and
//!   projection, copy) that a GPU backend can run as one launch each;
//! - [`GradFn`]: the closure that runs forward and backward and reports the
//!   loss, told which [`Pass`] it serves;
//! - [`BaseOptimizer`]: the outer optimiser; [`Sgd`] and [`Adam`] (Adam and
//!   AdamW) have PyTorch's semantics, and any other optimiser plugs in.
//!
//! For mixed-precision training (f16/bf16 forward and backward passes),
//! [`AmpConfig::loss_scale`] adds a dynamic loss scale that the step
//! divides out of every pass's gradients before AMP's ascent sees them
//! ([`LossScale`]); f32 master weights are the store's business (candle's
//! `CandleStore::with_master_weights`).
//!
//! Backends: `amp-ndarray` (CPU reference and test oracle), `amp-tch`
//! (libtorch), `amp-candle` (candle). To use your own tensor type, either
//! implement [`TensorOps`] — a few operations on one tensor — and wrap the
//! parameters in a [`TensorStore`], which implements [`ParamStore`] for you;
//! or implement [`ParamStore`] directly, to run each operation over all
//! tensors at once with the framework's multi-tensor kernels.
//!
//! ```
//! use amp_core::{AmpConfig, ParamGroup, RestoreMode, SgdConfig};
//!
//! // The paper's CIFAR recipe, with a smaller ε for the biases (tensor 1).
//! let config = AmpConfig::new(0.1, 0.5)
//!     .lr(0.1)
//!     .epsilon(0.5)
//!     .inner_lr(1.0)
//!     .inner_iter(1)
//!     .weight_decay(1e-4)
//!     .restore(RestoreMode::Copy)
//!     .group(ParamGroup::new([0]))
//!     .group(ParamGroup::new([1]).epsilon(0.05).weight_decay(0.0));
//! config.validate()?;
//! SgdConfig::nesterov(0.9).validate()?;
//! assert!(AmpConfig::new(0.1, -1.0).validate().is_err());
//! # Ok::<(), amp_core::AmpError>(())
//! ```
#![warn(missing_docs)]

mod adam;
mod amp;
pub mod collective;
pub mod composed;
mod config;
pub mod elementwise;
mod error;
mod grad_fn;
mod loss_scale;
mod optimizer;
mod report;
pub mod schedule;
mod state;
mod state_check;
mod store;
mod tensor_ops;
mod tensor_store;
pub mod threads;

pub use crate::adam::{Adam, AdamConfig};
pub use crate::amp::{Amp, External, Perturbed};
pub use crate::collective::{Collective, InProcess, Reduce};
pub use crate::config::{AmpConfig, EpsilonSchedule, NonFinitePolicy, ParamGroup, RestoreMode};
pub use crate::elementwise::{AdamCoefficients, AdamSlots, SgdCoefficients, SgdMomentum};
pub use crate::error::{AmpError, BoxError, Result};
pub use crate::grad_fn::{GradFn, Pass};
pub use crate::loss_scale::{LossScale, LossScaleConfig, LossScaleState, MAX_SCALE, MIN_SCALE};
pub use crate::optimizer::{BaseOptimizer, OptimizerState, Sgd, SgdConfig, StepContext};
pub use crate::report::StepReport;
pub use crate::schedule::{Cosine, LrSchedule, MultiStep};
pub use crate::state::{AmpState, BaseState, GroupState, StateOptions};
pub use crate::store::{
    check_index, check_len, check_shape, BufferId, Buffers, DType, HostTensor, ParamStore, Scalar,
    Slot, PROJECTION_GUARD,
};
pub use crate::tensor_ops::TensorOps;
pub use crate::tensor_store::TensorStore;
