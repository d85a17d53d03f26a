//! # amp
//!
//! **Adversarial Model Perturbation** (AMP; Zheng, Zhang & Mao, *Regularizing
//! Neural Networks via Adversarial Model Perturbation*, CVPR 2021) for any
//! tensor backend. AMP here is adversarial model perturbation — a regulariser
//! that trains toward flat minima — not automatic mixed precision.
//!
//! This facade re-exports [`amp_core`] (the traits and the algorithm) and,
//! behind cargo features, each backend adapter under [`backend`]:
//!
//! | feature   | module             | store                   |
//! |-----------|--------------------|-------------------------|
//! | `ndarray` (default) | `backend::ndarray` | `NdStore<f32 / f64>` |
//! | `candle` (default)  | `backend::candle`  | `CandleStore`        |
//! | `tch`     | `backend::tch`     | `TchStore`              |
//! | `burn`    | `backend::burn`    | `BurnStore<M>` (any burn module) |
//! | `cuda`    | candle with CUDA   |                         |
//! | `mpi`     | `distributed::mpi` | data-parallel, MPI (CPU clusters) |
//! | `nccl`    | `distributed::nccl` | data-parallel, NCCL (GPUs; with `cuda`) |
//!
//! ```
//! use amp::{Amp, AmpConfig, SgdConfig};
//! use amp::backend::ndarray::NdStore;
//! use ndarray::array;
//!
//! // Minimise ½‖θ‖², whose gradient is θ.
//! let store = NdStore::from_arrays([array![3.0f64, -4.0].into_dyn()]);
//! let mut amp = Amp::sgd(store, AmpConfig::new(0.1, 0.5), SgdConfig::nesterov(0.9))?;
//! for _ in 0..100 {
//!     amp.step(|s: &mut NdStore<f64>, _pass| {
//!         let theta = s.params()[0].clone();
//!         let loss = 0.5 * theta.iter().map(|x| x * x).sum::<f64>();
//!         s.set_grad(0, theta)?;
//!         Ok::<_, amp::AmpError>(((), loss))
//!     })?;
//! }
//! assert!(amp.store().params()[0].iter().all(|x| x.abs() < 0.05));
//! # Ok::<(), amp::AmpError>(())
//! ```
#![warn(missing_docs)]

pub use amp_core::*;

/// Checkpoints of the weights and the whole optimiser state, for any store:
/// the `amp-checkpoint` crate.
pub use amp_checkpoint as checkpoint;

/// The backend adapters compiled in, one module per cargo feature.
pub mod backend {
    /// The ndarray CPU reference backend (feature `ndarray`).
    #[cfg(feature = "ndarray")]
    pub use amp_ndarray as ndarray;

    /// The candle backend (feature `candle`; CUDA with feature `cuda`).
    #[cfg(feature = "candle")]
    pub use amp_candle as candle;

    /// The libtorch backend through tch (feature `tch`).
    #[cfg(feature = "tch")]
    pub use amp_tch as tch;

    /// The burn backend (feature `burn`): burn modules on burn's CPU
    /// device.
    #[cfg(feature = "burn")]
    pub use amp_burn as burn;
}

/// Data-parallel training: the in-process collective and the policies are
/// amp-core's ([`InProcess`], [`Reduce`], [`Collective`]); the transports
/// of other libraries come with their features.
pub mod distributed {
    /// NCCL for GPUs, one rank per GPU (feature `nccl`, with candle's
    /// CUDA): `amp_candle::nccl`.
    #[cfg(feature = "nccl")]
    pub use amp_candle::nccl;
    /// MPI for CPU clusters (feature `mpi`): the `amp-mpi` crate.
    #[cfg(feature = "mpi")]
    pub use amp_mpi as mpi;
}
