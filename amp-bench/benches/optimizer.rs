//! Criterion benchmarks of AMP (adversarial model perturbation, not automatic
//! mixed precision) per backend, grouped `{backend}/{op}/{dtype}`:
//!
//! * `{backend}/amp_step/f32` and `{backend}/erm_step/f32`: the optimizer's
//!   own time per step (perturb, project, restore, SGD-Nesterov update; the
//!   trivial closure's time is subtracted), one tensor of 1e4…1e7 elements;
//!   throughput in bytes read and written by the batched primitives.
//! * `{backend}/amp_step_tensors/f32`: the same at 1e6 elements in all,
//!   split over 1, 100 and 1000 tensors.
//! * `host/copy/f32`: a plain copy of the same sizes, the bandwidth floor.
//! * `{backend}/mlp_step/f32`: full training steps, ERM and AMP (K = 1), of
//!   the three MLPs of the report.
//!
//! Every timing synchronises the device before the clock stops
//! (`iter_custom`). The interleaved ratios and the targets are in
//! `cargo run --release -p amp-bench --bin bench_report`; criterion times each
//! benchmark on its own. `cargo bench -p amp-bench -- ndarray/` runs a
//! subset; add `--features tch` for libtorch (`AMP_BENCH_CUDA=1` for CUDA).

// Built without any backend feature, there is nothing to measure.
#![cfg_attr(
    not(any(feature = "ndarray", feature = "candle", feature = "tch")),
    allow(dead_code, unused_imports)
)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use amp::BoxError;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

#[cfg(feature = "candle")]
use amp_bench::mlp_candle;
#[cfg(feature = "ndarray")]
use amp_bench::mlp_ndarray;
#[cfg(feature = "tch")]
use amp_bench::mlp_tch;
use amp_bench::{fixtures, mlp};

use fixtures::{layout, metered_step, opt_trainer, OptFixture, Trainer};
use mlp::{Problem, SPECS};

const SIZES: [usize; 4] = [10_000, 100_000, 1_000_000, 10_000_000];
const COUNTS: [usize; 3] = [1, 100, 1000];
const COUNT_TOTAL: usize = 1_000_000;

fn optimizer_time<S: amp::ParamStore>(trainer: &mut Trainer<S>, iters: u64) -> Duration {
    let timing = trainer.steps(iters as usize).expect("optimizer step");
    timing.total.saturating_sub(timing.closure)
}

fn optimizer<F: OptFixture>(c: &mut Criterion) {
    for (op, inner_iter) in [("amp_step", 1), ("erm_step", 0)] {
        let mut group = c.benchmark_group(format!("{}/{op}/f32", F::NAME));
        for n in SIZES {
            let bytes = metered_step::<F>(&[n], inner_iter, 0)
                .expect("meter")
                .total_bytes();
            group.throughput(Throughput::Bytes(bytes));
            let mut trainer = opt_trainer::<F>(&[n], inner_iter).expect("fixture");
            group.bench_function(BenchmarkId::from_parameter(n), |b| {
                b.iter_custom(|iters| optimizer_time(&mut trainer, iters))
            });
        }
        group.finish();
    }
    let mut group = c.benchmark_group(format!("{}/amp_step_tensors/f32", F::NAME));
    for count in COUNTS {
        let sizes = layout(COUNT_TOTAL, count);
        let bytes = metered_step::<F>(&sizes, 1, 0)
            .expect("meter")
            .total_bytes();
        group.throughput(Throughput::Bytes(bytes));
        let mut trainer = opt_trainer::<F>(&sizes, 1).expect("fixture");
        group.bench_function(BenchmarkId::from_parameter(count), |b| {
            b.iter_custom(|iters| optimizer_time(&mut trainer, iters))
        });
    }
    group.finish();
}

fn copy_floor(c: &mut Criterion) {
    let mut group = c.benchmark_group("host/copy/f32");
    for n in SIZES {
        group.throughput(Throughput::Bytes(8 * n as u64));
        let src = vec![1.0f32; n];
        let mut dst = vec![0.0f32; n];
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    dst.copy_from_slice(black_box(&src));
                    black_box(&mut dst);
                }
                start.elapsed()
            })
        });
    }
    group.finish();
}

type MakePair<S> = fn(&Problem) -> Result<(Trainer<S>, Trainer<S>), BoxError>;

fn mlp_steps<S: amp::ParamStore>(c: &mut Criterion, backend: &str, make: MakePair<S>) {
    let mut group = c.benchmark_group(format!("{backend}/mlp_step/f32"));
    for spec in SPECS {
        let problem = spec.problem(42);
        let (mut erm, mut amp) = make(&problem).expect("model");
        group.bench_function(BenchmarkId::new("erm", spec.name), |b| {
            b.iter_custom(|iters| erm.steps(iters as usize).expect("ERM step").total)
        });
        group.bench_function(BenchmarkId::new("amp", spec.name), |b| {
            b.iter_custom(|iters| amp.steps(iters as usize).expect("AMP step").total)
        });
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    copy_floor(c);
    #[cfg(feature = "ndarray")]
    {
        optimizer::<fixtures::nd::Nd>(c);
        mlp_steps(c, "ndarray", mlp_ndarray::trainers);
    }
    #[cfg(feature = "candle")]
    {
        optimizer::<fixtures::cdl::Candle>(c);
        mlp_steps(c, "candle", mlp_candle::trainers);
    }
    #[cfg(feature = "tch")]
    {
        optimizer::<fixtures::tc::Tch>(c);
        mlp_steps(c, "tch", mlp_tch::trainers);
    }
}

criterion_group! {
    name = group;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = benches
}
criterion_main!(group);
