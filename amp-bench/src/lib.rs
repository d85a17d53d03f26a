//! The measuring harness of amp (AMP: adversarial model perturbation, not
//! automatic mixed precision): what its programs time and how.
//!
//! Not published; it serves three programs of this crate:
//!
//! * `bench_report` — AMP's cost against ERM, the copy floor and PyTorch,
//!   per backend, in one table (`cargo run --release -p amp-bench --bin
//!   bench_report`, add `--features tch` or `--features burn`);
//! * `gpu_bench` — the same figures on a GPU, run by `scripts/gpu-check.sh`;
//! * the criterion benches (`cargo bench -p amp-bench`).
//!
//! The cargo features name the backends as the facade's do (`ndarray` and
//! `candle` by default, `tch`, `cuda`, `burn`, `mpi`).
//!
//! ```
//! use amp_bench::mlp::SPECS;
//! // The three benchmark MLPs: 40×32, 4×512 and 2×2048.
//! assert_eq!(SPECS.len(), 3);
//! assert_eq!(SPECS[0].problem(7).layers.len(), 42);
//! ```

pub mod fixtures;
pub mod measure;
pub mod metered;
pub mod mlp;
#[cfg(feature = "burn")]
pub mod mlp_burn;
#[cfg(feature = "candle")]
pub mod mlp_candle;
#[cfg(feature = "ndarray")]
pub mod mlp_ndarray;
#[cfg(feature = "tch")]
pub mod mlp_tch;
