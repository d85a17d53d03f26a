//! AMP's cost on a GPU, per backend, in one table: the GPU counterpart of
//! `bench_report`, and the bench that `scripts/gpu-check.sh` runs.
//!
//! ```text
//! cargo run --release -p amp-bench --bin gpu_bench --features tch,cuda            # CUDA:0
//! cargo run --release -p amp-bench --bin gpu_bench --features tch,cuda -- --quick
//! cargo run --release -p amp-bench --bin gpu_bench --features tch -- --device cpu --quick
//! ```
//!
//! AMP is *adversarial model perturbation* (Zheng, Zhang & Mao, CVPR 2021),
//! not automatic mixed precision. Per backend (candle with candle's
//! allocating operations, candle writing in place through amp-candle's CUDA
//! kernels, tch, tch with the flat layout) it measures:
//!
//! * **AMP/ERM step time** on bench_report's three MLPs (40×32 at batch 16,
//!   4×512 at 128, 2×2048 at 256) and on a ResNet-18-sized convolutional
//!   model (CIFAR layout, 62 tensors, 11.2 M parameters, a fixed synthetic
//!   batch of 128 images of 3×32×32; see `cnn.rs`). ERM is `inner_iter = 0`,
//!   AMP `inner_iter = 1`, same closure; blocks interleaved A B A B …, the
//!   figure is the median per-pair ratio.
//! * **Optimizer-only throughput**: an AMP step (K = 1) over one f32 tensor
//!   of 1e6…1e8 elements with a closure that only hands over a gradient; the
//!   logical bytes of the batched primitives (bench_report's `metered.rs`)
//!   per second, as a fraction of a device-to-device copy (8 bytes per
//!   element) timed in the same rounds.
//! * **Device-to-host synchronisations per step**: store calls that return
//!   host data (`syncs.rs`) plus one loss read per closure call, for 12 and
//!   1000 tensors holding 1e6 parameters; the target is a count that does
//!   not depend on the tensor count. Time per optimizer step alongside.
//!
//! It reports and never fails on a missed target; it exits with an error only
//! when no backend could run on the requested device.
#![warn(missing_docs)]
// Built without candle and tch, the program has nothing to measure.
#![cfg_attr(
    not(any(feature = "candle", feature = "tch")),
    allow(dead_code, unused_variables, clippy::vec_init_then_push)
)]

mod cnn;
#[cfg(feature = "candle")]
mod on_candle;
#[cfg(feature = "tch")]
mod on_tch;
mod probes;
mod render;
mod syncs;

use amp::BoxError;
use amp_bench::{fixtures, measure, metered, mlp};
use clap::{Parser, ValueEnum};

use crate::fixtures::Steps;
use crate::measure::{block_len, interleave, median, warm_up, PairResult, Plan};

/// Where to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Where {
    /// CUDA device 0.
    Cuda,
    /// The CPU (a smoke test of the program itself).
    Cpu,
}

/// Command line.
#[derive(Parser, Debug)]
#[command(
    about = "AMP/ERM ratios, optimizer throughput against a device copy, and host syncs per step, on a GPU"
)]
pub struct Args {
    /// A short run (fewer, shorter blocks, sizes up to 1e7).
    #[arg(long)]
    pub quick: bool,
    /// Device.
    #[arg(long, value_enum, default_value_t = Where::Cuda)]
    pub device: Where,
    /// Only these backends (candle, candle-in-place, tch, tch-flat); all
    /// compiled-in by default.
    #[arg(long)]
    pub backend: Vec<String>,
    /// Batch size of the conv model.
    #[arg(long, default_value_t = 128)]
    pub cnn_batch: usize,
}

/// ERM and AMP trainers of one model.
pub type Pair = (Box<dyn Steps>, Box<dyn Steps>);

/// A builder or a probe: from a model or a tensor layout to what it makes.
pub type Make<In, Out> = Box<dyn Fn(&In) -> Result<Out, BoxError>>;

/// Result of a measurement, or its error as text.
pub type Outcome<T> = Result<T, String>;

/// One backend on one device, as the bench drives it.
pub struct Backend {
    /// Name in the table.
    pub name: &'static str,
    /// ERM and AMP trainers of an MLP.
    pub mlp: Make<mlp::Problem, Pair>,
    /// ERM and AMP trainers of the conv model.
    pub cnn: Make<cnn::Problem, Pair>,
    /// An AMP (K = 1) optimizer-only trainer over tensors of these sizes.
    pub opt: Make<[usize], Box<dyn Steps>>,
    /// Logical bytes the primitives move in one optimizer-only step.
    pub bytes: Make<[usize], u64>,
    /// Host reads per optimizer-only step: (store calls, closure calls).
    pub syncs: Make<[usize], (f64, f64)>,
    /// Kernels of the backend's own launched so far in this process, for a
    /// backend that counts them (amp-candle's in-place kernels).
    pub launches: Option<fn() -> u64>,
    /// A device-to-device copy of `n` f32: seconds per copy over `reps`.
    pub copy: Box<dyn Fn(usize) -> Result<probes::CopyTimer, BoxError>>,
}

/// Optimizer-only sizes (the last only in a full run).
const SIZES: [usize; 3] = [1_000_000, 10_000_000, 100_000_000];
/// Tensor counts of the synchronisation count, 1e6 parameters in all.
pub const COUNTS: [usize; 2] = [12, 1000];
/// Parameters of the synchronisation count.
const COUNT_TOTAL: usize = 1_000_000;

/// Everything measured for one backend.
#[derive(Default)]
pub struct Results {
    /// Backend name.
    pub name: &'static str,
    /// Per MLP of [`mlp::SPECS`].
    pub mlp: Vec<Outcome<PairResult>>,
    /// The conv model.
    pub cnn: Option<Outcome<PairResult>>,
    /// Per optimizer-only size: (n, fraction of the copy, optimizer GB/s,
    /// copy GB/s, optimizer ms per step).
    pub sizes: Vec<(usize, Outcome<[f64; 4]>)>,
    /// Per entry of [`COUNTS`]: (store reads, loss reads, optimizer ms,
    /// the backend's own kernel launches per optimizer step or NaN).
    pub syncs: Vec<Outcome<[f64; 4]>>,
}

fn pair(make: impl FnOnce() -> Result<Pair, BoxError>, plan: &Plan) -> Outcome<PairResult> {
    let run = || {
        let (mut erm, mut amp) = make()?;
        let plan = Plan {
            block_secs: 4.0 * plan.block_secs,
            ..*plan
        };
        interleave(erm.as_mut(), amp.as_mut(), &plan, false)
    };
    run().map_err(|e: BoxError| e.to_string())
}

fn size(backend: &Backend, n: usize, plan: &Plan) -> Result<[f64; 4], BoxError> {
    let bytes = (backend.bytes)(&[n])? as f64;
    let mut opt = (backend.opt)(&[n])?;
    let steps = block_len(warm_up(opt.as_mut(), plan.warmup_secs)?, plan);
    let mut copy = (backend.copy)(n)?;
    let once = copy.time(3)?;
    let reps = (plan.block_secs / once.max(1e-9)).ceil().clamp(1.0, 1e6) as usize;
    let (mut fraction, mut opt_secs, mut copy_bw) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..plan.rounds {
        let copy_secs = copy.time(reps)?;
        let t = opt.run(steps)?.optimizer_per_step();
        let floor = 8.0 * n as f64 / copy_secs;
        fraction.push(bytes / t / floor);
        opt_secs.push(t);
        copy_bw.push(floor);
    }
    let t = median(&opt_secs);
    Ok([
        median(&fraction),
        bytes / t / 1e9,
        median(&copy_bw) / 1e9,
        t * 1e3,
    ])
}

fn sync_count(backend: &Backend, count: usize, plan: &Plan) -> Result<[f64; 4], BoxError> {
    let layout = fixtures::layout(COUNT_TOTAL, count);
    let (store, loss) = (backend.syncs)(&layout)?;
    let mut opt = (backend.opt)(&layout)?;
    let steps = block_len(warm_up(opt.as_mut(), plan.warmup_secs)?, plan);
    let before = backend.launches.map(|count| count());
    let times = (0..plan.rounds)
        .map(|_| Ok(opt.run(steps)?.optimizer_per_step()))
        .collect::<Result<Vec<_>, BoxError>>()?;
    let launches = match (backend.launches, before) {
        (Some(count), Some(before)) => {
            (count() - before) as f64 / (plan.rounds as f64 * steps as f64)
        }
        _ => f64::NAN,
    };
    Ok([store, loss, median(&times) * 1e3, launches])
}

fn measure(backend: &Backend, args: &Args, plan: &Plan) -> Results {
    let mut r = Results {
        name: backend.name,
        ..Default::default()
    };
    for spec in mlp::SPECS {
        eprintln!("  {} mlp {}", backend.name, spec.name);
        let problem = spec.problem(42);
        r.mlp.push(pair(|| (backend.mlp)(&problem), plan));
    }
    eprintln!("  {} conv model", backend.name);
    let problem = cnn::Problem::new(args.cnn_batch, 7);
    r.cnn = Some(pair(|| (backend.cnn)(&problem), plan));
    let sizes = if args.quick { &SIZES[..2] } else { &SIZES[..] };
    for &n in sizes {
        eprintln!("  {} optimizer-only n={n:e}", backend.name);
        r.sizes
            .push((n, size(backend, n, plan).map_err(|e| e.to_string())));
    }
    for count in COUNTS {
        eprintln!("  {} host syncs, {count} tensors", backend.name);
        r.syncs
            .push(sync_count(backend, count, plan).map_err(|e| e.to_string()));
    }
    r
}

fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let plan = if args.quick {
        Plan {
            block_secs: 0.03,
            rounds: 3,
            warmup_secs: 0.1,
        }
    } else {
        Plan {
            block_secs: 0.1,
            rounds: 7,
            warmup_secs: 0.3,
        }
    };
    let (backends, unavailable) = probes::backends(args.device);
    for (name, why) in &unavailable {
        eprintln!("gpu_bench: {name} not run: {why}");
    }
    let selected: Vec<&Backend> = backends
        .iter()
        .filter(|b| args.backend.is_empty() || args.backend.iter().any(|n| n == b.name))
        .collect();
    if selected.is_empty() {
        return Err(format!(
            "no backend can run on {:?} (compiled in and selected: {:?}; unavailable: {unavailable:?})",
            args.device,
            backends.iter().map(|b| b.name).collect::<Vec<_>>()
        )
        .into());
    }
    let started = std::time::Instant::now();
    let results: Vec<Results> = selected.iter().map(|b| measure(b, &args, &plan)).collect();
    print!(
        "{}",
        render::table(
            &results,
            &args,
            &plan,
            &unavailable,
            started.elapsed().as_secs_f64()
        )
    );
    Ok(())
}
