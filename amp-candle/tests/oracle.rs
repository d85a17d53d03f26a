//! AMP on candle (CPU) in half precision (f16 and bf16 vars, computed in
//! f32) against the amp-ndarray f64 oracle: same initial weights, the same
//! analytic gradient computed on the host and written through
//! `ParamStore::write(Slot::Grads)`, several steps, every configuration of
//! `common::cases` (K = 0, 1, 2; copy and subtract restore; clipped and
//! unclipped; plain SGD, momentum with dampening and weight decay, nesterov
//! with weight decay). In f32 and f64 the facade's conformance suites
//! (`tests/candle.rs`) run the testkit's grid of the same configurations
//! (`amp_testkit::grid`, test `oracle_grid`); `cuda.rs` runs this file's
//! comparison on a GPU in every dtype.
//!
//! Tolerances (`common::Tol`), checked after each of `STEPS` steps on the
//! weights, the momentum buffers, the losses and ‖δ‖; the largest error
//! measured is printed (`--nocapture`) and quoted here:
//! - f64, elementwise 1e-12 relative: both backends do the same IEEE
//!   operations in the same order except the norm's sum (candle reduces in
//!   its own order), which moves ‖δ‖ by a few ulps; measured below 1e-15.
//! - f32, elementwise 1e-5: every stored value is rounded to f32 (unit
//!   roundoff 6e-8) after each of the ~10 operations a step applies to it,
//!   the gradient is evaluated at rounded weights and the errors add up
//!   over the steps; measured 7e-7. A wrong coefficient shows at 1e-3.
//! - f16, 5e-3 and bf16, 4e-2, relative to the tensor's largest element:
//!   the same argument with unit roundoff 4.9e-4 (f16) and 3.9e-3 (bf16),
//!   and subtract-restore (θ + δ − δ, rounded twice at the scale of θ + δ)
//!   adds errors at the scale of the whole tensor, so small elements are
//!   judged at the tensor's scale; measured 3.1e-3 (f16) and 2.1e-2 (bf16).
mod common;

use amp_candle::candle_core::Device;
use amp_core::DType;
use common::{cases, run_against_oracle, stores, Tol};

const STEPS: usize = 4;

fn sweep(dtype: DType, tol: Tol) {
    let mut worst = 0.0f64;
    for case in cases() {
        let (candle, oracle) = stores(dtype, &Device::Cpu);
        worst = worst.max(run_against_oracle(&case, candle, oracle, STEPS, tol));
    }
    eprintln!("{dtype}: largest error {worst:.3} of the tolerance {tol:?}");
}

#[test]
fn f16_matches_oracle() {
    sweep(DType::F16, Tol::per_tensor(5e-3));
}

#[test]
fn bf16_matches_oracle() {
    sweep(DType::BF16, Tol::per_tensor(4e-2));
}
