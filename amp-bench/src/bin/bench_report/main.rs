//! AMP's cost against ERM and against the memory-bandwidth floor, per
//! backend, in one table (issue 8).
//!
//! ```text
//! cargo run --release -p amp-bench --bin bench_report                  # ndarray, candle
//! cargo run --release -p amp-bench --bin bench_report --features tch   # + libtorch
//! cargo run --release -p amp-bench --bin bench_report --features burn  # + burn (flex)
//! cargo run --release -p amp-bench --bin bench_report -- --quick       # a short run
//! cargo run --release -p amp-bench --bin bench_report -- --backend tch --skip-mlp
//! cargo run --release -p amp-bench --bin bench_report --features tch -- --no-torch
//! cargo build --release -p amp-bench --bin bench_report --features mpi &&
//!   mpirun -np 2 target/release/bench_report --distributed
//! ```
//! (`--features tch` needs libtorch: `source .venv/bin/activate;
//! export LIBTORCH_USE_PYTORCH=1`. With `AMP_BENCH_CUDA=1` and a visible GPU
//! the tch runs use CUDA:0.)
//!
//! AMP is *adversarial model perturbation* (Zheng, Zhang & Mao, CVPR 2021),
//! not automatic mixed precision. What is measured:
//!
//! * **AMP/ERM step time** on three MLPs (64 inputs, 10 classes): 40 hidden
//!   layers of width 32 at batch 16 (84 tensors), 4 × 512 at batch 128,
//!   2 × 2048 at batch 256. ERM is `inner_iter = 0`, AMP `inner_iter = 1`,
//!   both SGD with Nesterov momentum 0.9 (`--optimizer adam|adamw` for Adam
//!   or AdamW) and the very same closure; `--interval k` makes the AMP
//!   trainers perturb every k-th step only. ERM and
//!   AMP blocks alternate (A B A B …) after a warm-up; the figure is the
//!   median of the per-pair ratios.
//! * **Optimizer-only throughput**: an AMP step (K = 1, copy-restore) over
//!   one f32 tensor of 1e4…1e7 elements, with a trivial closure whose time is
//!   subtracted; bytes are those the batched primitives read and write (see
//!   `metered.rs`). Each block alternates with a plain copy of the same
//!   number of elements (`memcpy`, 1 and 2 threads; the faster is the floor),
//!   and the figure is the median per-pair fraction of the floor.
//! * **Tensor-count slowdown**: the same step over 1, 100 and 1000 tensors
//!   holding 1e6 elements in all, interleaved; median ratios to 1 tensor.
//! * **Extra memory**: parameter-sized buffers AMP holds between steps
//!   beyond the base optimiser's (`Amp::amp_buffers_held`).
//! * **PyTorch in the same run** (with `--features tch`; `--no-torch` to
//!   leave it out): the MLPs trained by PyTorch itself
//!   (`scripts/torch_reference.py`, a child process on the virtualenv's
//!   Python, same weights, batch, hyper-parameters and thread count). The
//!   `torch` column's AMP/ERM rows are torch's own AMP step (the reference's
//!   per-tensor Python loop) against `torch.optim`'s ERM step; the
//!   `amp/torch` rows are, per libtorch store, amp's ERM step over torch's
//!   and amp's AMP step over torch's, each pair interleaved like the others
//!   (see `torch_ref.rs` for what is and is not like for like), and under
//!   them the floor of the AMP ratio: amp's AMP step less its optimiser's
//!   share, over torch's — its closure's two passes alone. Without a
//!   usable Python or torch the column says `n/a (why)`.
//! * **Data-parallel** (`--distributed`, under `mpirun`, feature `mpi`):
//!   per reduction policy, the time an AMP step spends in gradient
//!   reductions and flag agreements, and the gradient bytes a rank sends per
//!   step, on the 4 × 512 and 2 × 2048 MLPs (`distributed.rs`).
//!
//! Timing assertions live nowhere: this program reports, it does not fail on
//! a missed target.
#![warn(missing_docs)]
// Built without any backend feature, the program has nothing to measure.
#![cfg_attr(
    not(any(
        feature = "ndarray",
        feature = "candle",
        feature = "tch",
        feature = "burn"
    )),
    allow(dead_code)
)]

#[cfg(all(feature = "mpi", feature = "ndarray"))]
mod distributed;
#[cfg(feature = "burn")]
use amp_bench::mlp_burn;
#[cfg(feature = "candle")]
use amp_bench::mlp_candle;
#[cfg(feature = "ndarray")]
use amp_bench::mlp_ndarray;
#[cfg(feature = "tch")]
use amp_bench::mlp_tch;
use amp_bench::{fixtures, measure, metered, mlp};
#[cfg(feature = "tch")]
mod torch_ref;

use std::fmt::Write as _;

use amp::{BoxError, ParamStore};
use clap::Parser;

use crate::fixtures::{metered_step, opt_trainer, OptFixture, Steps, TrainerPair};
use crate::measure::{block_len, interleave, median, range, warm_up, CopyFloor, PairResult, Plan};
use crate::metered::{Meter, OPS};
use crate::mlp::{MlpSpec, Problem, SPECS};

/// Command line.
#[derive(Parser, Debug)]
#[command(about = "AMP/ERM step-time ratios and optimizer throughput per backend")]
struct Args {
    /// A short run (fewer, shorter blocks): for a smoke test, not for figures.
    #[arg(long)]
    quick: bool,
    /// Only these backends (ndarray, candle, tch, tch-flat, burn); all
    /// compiled-in by default.
    #[arg(long)]
    backend: Vec<String>,
    /// Skip the MLP (AMP/ERM) measurements.
    #[arg(long)]
    skip_mlp: bool,
    /// Skip the optimizer-only measurements.
    #[arg(long)]
    skip_optimizer: bool,
    /// Interleaved rounds (default 11, 5 with --quick).
    #[arg(long)]
    rounds: Option<usize>,
    /// Base optimiser of every trainer: sgd (Nesterov 0.9), adam or adamw.
    #[arg(long, default_value = "sgd")]
    optimizer: String,
    /// The AMP trainers perturb every k-th step only (`AmpConfig::interval`).
    #[arg(long, default_value_t = 1)]
    interval: u64,
    /// Precision of the MLPs: f32, or bf16 with f32 master weights (mixed
    /// precision: candle, and tch in the plain layout; the others report no
    /// MLP figures).
    #[arg(long, default_value = "f32")]
    precision: String,
    /// Under `mpirun -np N` (feature `mpi`): only the data-parallel
    /// measurement, the time a step spends in gradient reductions per
    /// policy (see `distributed.rs`).
    #[arg(long)]
    distributed: bool,
    /// Leave out the PyTorch reference (`scripts/torch_reference.py`), which
    /// runs by default when tch is compiled in.
    #[arg(long)]
    no_torch: bool,
}

type MlpPair = (Box<dyn Steps>, Box<dyn Steps>);

/// Builds the ERM and AMP trainers of an MLP.
type MlpBuilder = Box<dyn Fn(&Problem) -> Result<MlpPair, BoxError>>;

/// Builds the optimizer-only fixture for given tensor sizes and repeats.
type OptBuilder = fn(&[usize], usize) -> Result<Box<dyn Steps>, BoxError>;

/// Per tensor count: the median optimizer time per step, and every round's
/// ratio to the one-tensor time.
type CountTimes = (Vec<f64>, Vec<Vec<f64>>);

/// One backend as the report drives it.
struct Backend {
    name: &'static str,
    mlp: MlpBuilder,
    opt: OptBuilder,
    meter: fn(&[usize], usize, usize) -> Result<Meter, BoxError>,
}

/// The entry of the backend whose optimizer-only fixture is `F` and whose
/// MLP trainers `trainers` builds.
fn backend<F: OptFixture, S: ParamStore + 'static>(
    trainers: fn(&Problem) -> Result<TrainerPair<S>, BoxError>,
) -> Backend {
    Backend {
        name: F::NAME,
        mlp: Box::new(move |p| {
            let (erm, amp) = trainers(p)?;
            Ok((Box::new(erm), Box::new(amp)))
        }),
        opt: opt_boxed::<F>,
        meter: metered_step::<F>,
    }
}

fn opt_boxed<F: OptFixture>(
    sizes: &[usize],
    inner_iter: usize,
) -> Result<Box<dyn Steps>, BoxError> {
    Ok(Box::new(opt_trainer::<F>(sizes, inner_iter)?))
}

// One push per compiled-in backend.
#[allow(clippy::vec_init_then_push)]
fn backends() -> Vec<Backend> {
    #[allow(unused_mut)]
    let mut list = Vec::new();
    #[cfg(feature = "ndarray")]
    list.push(backend::<fixtures::nd::Nd, _>(mlp_ndarray::trainers));
    #[cfg(feature = "candle")]
    list.push(backend::<fixtures::cdl::Candle, _>(mlp_candle::trainers));
    #[cfg(feature = "tch")]
    list.push(backend::<fixtures::tc::Tch, _>(mlp_tch::trainers));
    #[cfg(feature = "tch")]
    list.push(backend::<fixtures::tc::TchFlat, _>(mlp_tch::flat_trainers));
    #[cfg(feature = "burn")]
    list.push(backend::<fixtures::brn::Burn, _>(mlp_burn::trainers));
    list
}

/// Sizes of the optimizer-only sweep.
const SIZES: [usize; 4] = [10_000, 100_000, 1_000_000, 10_000_000];
/// Total of the tensor-count sweep.
const COUNT_TOTAL: usize = 1_000_000;
/// The per-primitive breakdowns: title, total parameters, tensors.
const BREAKDOWNS: [(&str, usize, usize); 3] = [
    ("at 1e7 f32, 1 tensor", 10_000_000, 1),
    ("at 1e6 f32, 1 tensor", COUNT_TOTAL, 1),
    ("at 1e6 f32 in 1000 tensors", COUNT_TOTAL, 1000),
];
/// Tensor counts of the tensor-count sweep.
const COUNTS: [usize; 3] = [1, 100, 1000];

/// Seed of every backend's MLP weights and batch.
const MLP_SEED: u64 = 42;

/// The plan of the MLP comparisons: a 2x2048 step takes 0.1–0.3 s, so
/// blocks four times longer than the optimizer-only ones hold several steps
/// each, and one slow step does not decide a round.
fn mlp_plan(plan: &Plan) -> Plan {
    Plan {
        block_secs: 4.0 * plan.block_secs,
        ..*plan
    }
}

/// One backend's AMP/ERM comparison on one MLP.
struct MlpResult {
    pair: PairResult,
    amp_held: usize,
    held: usize,
}

struct SizeResult {
    bytes: u64,
    opt_secs: f64,
    fraction: Vec<f64>,
    /// The base optimiser's step alone (`inner_iter = 0`), as a fraction of
    /// the floor counting only the bytes it must move.
    base_fraction: Vec<f64>,
    floor: Vec<f64>,
    floor_1t: Vec<f64>,
}

#[derive(Default)]
struct BackendResult {
    name: &'static str,
    mlp: Vec<Result<MlpResult, String>>,
    sizes: Vec<Result<SizeResult, String>>,
    counts: Option<Result<CountTimes, String>>,
    /// Per-primitive breakdowns, one per entry of [`BREAKDOWNS`].
    breakdowns: Vec<Result<Meter, String>>,
    opt_amp_held: Option<usize>,
    /// Per MLP, against PyTorch: amp's ERM over torch's, amp's AMP over
    /// torch's (libtorch stores only; empty without the reference).
    vs_torch: Vec<Result<(PairResult, PairResult), String>>,
}

fn run_mlp(backend: &Backend, spec: MlpSpec, plan: &Plan) -> Result<MlpResult, BoxError> {
    let problem = spec.problem(MLP_SEED);
    let (mut erm, mut amp) = (backend.mlp)(&problem)?;
    debug_assert_eq!(amp.tensors(), spec.tensors());
    let pair = interleave(erm.as_mut(), amp.as_mut(), &mlp_plan(plan), false)?;
    Ok(MlpResult {
        pair,
        amp_held: amp.amp_buffers_held(),
        held: amp.buffers_held(),
    })
}

fn run_size(backend: &Backend, n: usize, plan: &Plan) -> Result<(SizeResult, usize), BoxError> {
    let bytes = (backend.meter)(&[n], 1, 0)?.total_bytes();
    let mut opt = (backend.opt)(&[n], 1)?;
    let per = warm_up(opt.as_mut(), plan.warmup_secs)?;
    let steps = block_len(per, plan);
    let mut floor = CopyFloor::new(n);
    let reps = floor.reps(plan);
    let mut out = SizeResult {
        bytes,
        opt_secs: 0.0,
        fraction: Vec::new(),
        base_fraction: Vec::new(),
        floor: Vec::new(),
        floor_1t: Vec::new(),
    };
    // The base step alone: at 1e7 only (the figure the targets name).
    let mut alone = if n == SIZES[3] {
        let mut t = (backend.opt)(&[n], 0)?;
        let per = warm_up(t.as_mut(), plan.warmup_secs)?;
        Some((t, block_len(per, plan)))
    } else {
        None
    };
    let must = (must_move_passes() * 4 * n) as f64;
    let mut opt_secs = Vec::new();
    for _ in 0..plan.rounds {
        let (one, two) = floor.bandwidth(reps);
        let t = opt.run(steps)?.optimizer_per_step();
        let best = one.max(two);
        opt_secs.push(t);
        out.fraction.push(bytes as f64 / t / best);
        if let Some((base, base_steps)) = alone.as_mut() {
            let t = base.run(*base_steps)?.optimizer_per_step();
            out.base_fraction.push(must / t / best);
        }
        out.floor.push(best);
        out.floor_1t.push(one);
    }
    out.opt_secs = median(&opt_secs);
    Ok((out, opt.amp_buffers_held()))
}

/// Passes over parameter-sized f32 memory the base optimiser cannot avoid:
/// SGD with Nesterov momentum reads θ, g and the momentum and writes θ and
/// the momentum (5); Adam(W) reads θ, g, m and v and writes θ, m and v (7).
fn must_move_passes() -> usize {
    match fixtures::current_settings().adam {
        None => 5,
        Some(adam) if adam.amsgrad => 9,
        Some(_) => 7,
    }
}

fn run_counts(backend: &Backend, plan: &Plan) -> Result<CountTimes, BoxError> {
    let mut trainers = COUNTS
        .iter()
        .map(|&c| (backend.opt)(&fixtures::layout(COUNT_TOTAL, c), 1))
        .collect::<Result<Vec<_>, _>>()?;
    let steps = trainers
        .iter_mut()
        .map(|t| Ok(block_len(warm_up(t.as_mut(), plan.warmup_secs)?, plan)))
        .collect::<Result<Vec<_>, BoxError>>()?;
    let mut per: Vec<Vec<f64>> = vec![Vec::new(); COUNTS.len()];
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); COUNTS.len()];
    for _ in 0..plan.rounds {
        let times = trainers
            .iter_mut()
            .zip(&steps)
            .map(|(t, &n)| Ok(t.run(n)?.optimizer_per_step()))
            .collect::<Result<Vec<_>, BoxError>>()?;
        for (k, &t) in times.iter().enumerate() {
            per[k].push(t);
            ratios[k].push(t / times[0]);
        }
    }
    Ok((per.iter().map(|v| median(v)).collect(), ratios))
}

fn mlp_target(backend: &str, spec: &MlpSpec) -> Option<f64> {
    match (backend, spec.name) {
        ("tch", "40x32") => Some(2.10),
        ("tch", _) | ("candle", _) | ("burn", _) => Some(2.05),
        _ => None,
    }
}

fn verdict(met: bool) -> &'static str {
    if met {
        "ok"
    } else {
        "MISS"
    }
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// The rows under MLP `m`'s AMP/ERM row, per libtorch store: the median
/// ratios amp ERM / torch ERM and amp AMP / torch AMP, then the floor of
/// the second — amp's AMP step without its optimiser's share (the time
/// outside the closure) over torch's AMP step, per pair — which no work on
/// amp's optimiser can go below: the rest is the closure's two passes.
fn render_vs_torch(results: &[BackendResult], m: usize, width: usize) -> String {
    let rows: [(&str, VsTorchCell, &str); 2] = [
        (
            "  amp/torch step time: ERM | AMP",
            |erm, amp| format!("{:.2} | {:.2}", median(&erm.ratios), median(&amp.ratios)),
            "(below 1: amp faster)",
        ),
        (
            "  amp/torch AMP, amp's closures alone (floor)",
            |_, amp| format!("{:.2}", median(&closure_share(amp))),
            "(amp's optimiser at no cost)",
        ),
    ];
    let mut out = String::new();
    for (label, cell_of, note) in rows {
        let mut line = format!("{label:<46}");
        for r in results {
            let cell = match r.vs_torch.get(m) {
                Some(Ok((erm, amp))) => cell_of(erm, amp),
                Some(Err(e)) if e.starts_with("n/a") => "n/a".into(),
                Some(Err(e)) => format!("error: {}", e.chars().take(14).collect::<String>()),
                None => "-".into(),
            };
            let _ = write!(line, "{cell:<width$}");
        }
        let _ = writeln!(line, "{note}");
        out.push_str(&line);
    }
    out
}

/// One cell of a PyTorch row from a store's (ERM, AMP) comparisons.
type VsTorchCell = fn(&PairResult, &PairResult) -> String;

/// Per pair of `pair` (A: torch, B: amp), B's time inside its closures
/// over A's whole step.
fn closure_share(pair: &PairResult) -> Vec<f64> {
    pair.a
        .iter()
        .zip(&pair.b)
        .zip(&pair.b_opt)
        .map(|((a, b), b_opt)| (b - b_opt) / a)
        .collect()
}

/// One line of a per-primitive breakdown: calls, MB, ms and GB/s per op.
fn render_meter(m: &Meter) -> String {
    let mut out = String::new();
    for (i, op) in OPS.iter().enumerate() {
        if m.calls[i] == 0 {
            continue;
        }
        let secs = m.time[i].as_secs_f64();
        let _ = write!(out, " {op} x{} ", m.calls[i]);
        if m.bytes[i] > 0 {
            let _ = write!(
                out,
                "{:.0}MB {:.2}ms {}GB/s;",
                m.bytes[i] as f64 / 1e6,
                secs * 1e3,
                gbs(m.bytes[i] as f64 / secs)
            );
        } else {
            let _ = write!(out, "{:.2}ms;", secs * 1e3);
        }
    }
    out
}

fn gbs(bytes_per_sec: f64) -> String {
    format!("{:.1}", bytes_per_sec / 1e9)
}

fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    if args.distributed {
        #[cfg(all(feature = "mpi", feature = "ndarray"))]
        return distributed::run(args.quick, MLP_SEED);
        #[cfg(not(all(feature = "mpi", feature = "ndarray")))]
        return Err("--distributed needs the `mpi` feature (and `ndarray`)".into());
    }
    let adam = match args.optimizer.as_str() {
        "sgd" => None,
        "adam" => Some(amp::AdamConfig::adam()),
        "adamw" => Some(amp::AdamConfig::adamw()),
        other => {
            return Err(format!("--optimizer: expected sgd, adam or adamw, got {other}").into())
        }
    };
    if args.interval == 0 {
        return Err("--interval must be at least 1".into());
    }
    let bf16 = match args.precision.as_str() {
        "f32" => false,
        "bf16" => true,
        other => return Err(format!("--precision: expected f32 or bf16, got {other}").into()),
    };
    fixtures::configure(fixtures::Settings {
        adam,
        interval: args.interval,
        bf16,
    });
    let plan = if args.quick {
        Plan {
            block_secs: 0.03,
            rounds: args.rounds.unwrap_or(5),
            warmup_secs: 0.1,
        }
    } else {
        Plan {
            block_secs: 0.15,
            rounds: args.rounds.unwrap_or(11),
            warmup_secs: 0.5,
        }
    };
    let selected: Vec<Backend> = backends()
        .into_iter()
        .filter(|b| args.backend.is_empty() || args.backend.iter().any(|n| n == b.name))
        .collect();
    let start_load = load();
    let started = std::time::Instant::now();
    eprintln!(
        "bench_report: {} mode, backends {:?}, base {}, interval {}, load {start_load}",
        if args.quick { "quick" } else { "full" },
        selected.iter().map(|b| b.name).collect::<Vec<_>>(),
        args.optimizer,
        args.interval
    );

    let mut results = Vec::new();
    for backend in &selected {
        let mut r = BackendResult {
            name: backend.name,
            ..Default::default()
        };
        if !args.skip_mlp {
            for spec in SPECS {
                eprintln!("  {} mlp {}", backend.name, spec.name);
                r.mlp
                    .push(run_mlp(backend, spec, &plan).map_err(|e| e.to_string()));
            }
        }
        if !args.skip_optimizer {
            for n in SIZES {
                eprintln!("  {} optimizer-only n={n:e}", backend.name);
                r.sizes.push(match run_size(backend, n, &plan) {
                    Ok((s, held)) => {
                        r.opt_amp_held = Some(held);
                        Ok(s)
                    }
                    Err(e) => Err(e.to_string()),
                });
            }
            eprintln!("  {} tensor counts", backend.name);
            r.counts = Some(run_counts(backend, &plan).map_err(|e| e.to_string()));
            let timed = if args.quick { 2 } else { 5 };
            for (_, total, count) in BREAKDOWNS {
                let steps = timed * (SIZES[3] / total).max(1);
                let layout = fixtures::layout(total, count);
                r.breakdowns
                    .push((backend.meter)(&layout, 1, steps).map_err(|e| e.to_string()));
            }
        }
        results.push(r);
    }
    #[allow(unused_mut)]
    let mut torch_about: Option<String> = None;
    #[cfg(feature = "tch")]
    if !args.no_torch && !args.skip_mlp {
        let names: Vec<&'static str> = selected.iter().map(|b| b.name).collect();
        let report = torch_ref::measure(&names, &plan);
        for (store, vs) in report.vs {
            if let Some(r) = results.iter_mut().find(|r| r.name == store) {
                r.vs_torch = vs.into_iter().map(|v| v.map(|v| (v.erm, v.amp))).collect();
            }
        }
        results.push(BackendResult {
            name: "torch",
            mlp: report.own,
            ..Default::default()
        });
        torch_about = Some(report.about);
    }
    print!(
        "{}",
        render(
            &results,
            &args,
            &plan,
            &start_load,
            started.elapsed().as_secs_f64(),
            torch_about.as_deref(),
        )
    );
    Ok(())
}

/// One table: rows are figures, columns backends, with the targets;
/// `torch` describes the PyTorch reference when it ran.
fn render(
    results: &[BackendResult],
    args: &Args,
    plan: &Plan,
    start_load: &str,
    secs: f64,
    torch: Option<&str>,
) -> String {
    let mut out = String::new();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    #[cfg(feature = "tch")]
    let extra = format!(
        ", libtorch threads {}, tch device {:?}",
        tch::get_num_threads(),
        fixtures::tc::device()
    );
    #[cfg(not(feature = "tch"))]
    let extra = String::from(", tch not compiled in (add --features tch)");
    let _ = writeln!(
        out,
        "\nAMP (adversarial model perturbation) cost report — {} run, {} rounds of >= {:.2} s blocks \
         (MLPs: {:.2} s), {cores} cores{extra}\nbase optimiser {}, AMP perturbs every {} step(s), MLPs in {}\n\
         load average at start {start_load}, at end {}; run took {secs:.0} s\n",
        if args.quick { "QUICK" } else { "full" },
        plan.rounds,
        plan.block_secs,
        4.0 * plan.block_secs,
        if args.optimizer == "sgd" { "SGD (Nesterov 0.9)" } else { args.optimizer.as_str() },
        args.interval,
        if args.precision == "bf16" { "bf16 with f32 master weights" } else { "f32" },
        load()
    );
    if let Some(about) = torch {
        let _ = writeln!(out, "torch column: scripts/torch_reference.py, {about}\n");
    }

    let width = 24;
    let mut header = format!("{:<46}", "figure (median of interleaved pairs)");
    for r in results {
        let _ = write!(header, "{:<width$}", r.name);
    }
    let _ = writeln!(header, "target");
    out.push_str(&header);
    let _ = writeln!(out, "{}", "-".repeat(header.len() + 10));

    // AMP/ERM ratios.
    if !args.skip_mlp {
        for (m, spec) in SPECS.iter().enumerate() {
            let label = format!(
                "AMP/ERM step time {} ({} t, {:.2}M p, b{})",
                spec.name,
                spec.tensors(),
                spec.numel() as f64 / 1e6,
                spec.batch
            );
            let mut line = format!("{label:<46}");
            for r in results {
                let cell = match r.mlp.get(m) {
                    Some(Ok(res)) => {
                        let ratio = median(&res.pair.ratios);
                        let (lo, hi) = range(&res.pair.ratios);
                        let mark = mlp_target(r.name, spec)
                            .map_or(String::new(), |t| format!(" {}", verdict(ratio <= t)));
                        format!("{ratio:.2} [{lo:.2}-{hi:.2}]{mark}")
                    }
                    Some(Err(e)) if e.starts_with("n/a") => e.chars().take(width - 1).collect(),
                    Some(Err(e)) => format!("error: {}", e.chars().take(14).collect::<String>()),
                    None => "-".into(),
                };
                let _ = write!(line, "{cell:<width$}");
            }
            let _ = writeln!(
                line,
                "{}",
                if spec.name == "40x32" {
                    "tch <= 2.10, candle, burn <= 2.05"
                } else {
                    "tch, candle, burn <= 2.05"
                }
            );
            out.push_str(&line);
            if results.iter().any(|r| !r.vs_torch.is_empty()) {
                out.push_str(&render_vs_torch(results, m, width));
            }
        }
        for (label, pick) in [
            ("  ERM / AMP ms per step (40x32, 4x512, 2x2048)", 0),
            ("  of which optimiser (outside the closure)", 1),
        ] {
            let _ = writeln!(out, "{label}");
            let mut line = format!("{:<46}", "");
            for r in results {
                let cell = r
                    .mlp
                    .iter()
                    .map(|m| match m {
                        Ok(m) => {
                            let (a, b) = if pick == 0 {
                                (&m.pair.a, &m.pair.b)
                            } else {
                                (&m.pair.a_opt, &m.pair.b_opt)
                            };
                            format!("{:.3}/{:.3}", median(a) * 1e3, median(b) * 1e3)
                        }
                        Err(_) => "err".into(),
                    })
                    .collect::<Vec<_>>()
                    .join(" ");
                let _ = write!(line, "{cell}  ");
            }
            let _ = writeln!(line);
            out.push_str(&line);
        }
    }

    if !args.skip_optimizer {
        for (k, &n) in SIZES.iter().enumerate() {
            let mut line = format!(
                "{:<46}",
                format!("optimizer-only, {n:.0e} f32: fraction of copy floor")
            );
            for r in results {
                let cell = match r.sizes.get(k) {
                    Some(Ok(s)) => {
                        let f = median(&s.fraction);
                        let targeted = matches!(r.name, "ndarray" | "candle");
                        let mark = if targeted && n == 10_000_000 {
                            format!(" {}", verdict(f >= 0.5))
                        } else {
                            String::new()
                        };
                        format!("{f:.2} ({} GB/s){mark}", gbs(s.bytes as f64 / s.opt_secs))
                    }
                    Some(Err(e)) => format!("error: {}", e.chars().take(14).collect::<String>()),
                    None => "-".into(),
                };
                let _ = write!(line, "{cell:<width$}");
            }
            let _ = writeln!(
                line,
                "{}",
                if n == 10_000_000 {
                    "ndarray, candle >= 0.50"
                } else {
                    ""
                }
            );
            out.push_str(&line);
        }
        let mut line = format!(
            "{:<46}",
            format!(
                "base step alone, 1e7 f32: fraction ({} passes)",
                must_move_passes()
            )
        );
        for r in results {
            let cell = match r.sizes.get(3) {
                Some(Ok(s)) if !s.base_fraction.is_empty() => {
                    let f = median(&s.base_fraction);
                    let mark = if r.name == "ndarray" && args.optimizer != "sgd" {
                        format!(" {}", verdict(f >= 0.5))
                    } else {
                        String::new()
                    };
                    format!("{f:.2}{mark}")
                }
                _ => "-".into(),
            };
            let _ = write!(line, "{cell:<width$}");
        }
        let _ = writeln!(
            line,
            "{}",
            if args.optimizer == "sgd" {
                ""
            } else {
                "ndarray >= 0.50"
            }
        );
        out.push_str(&line);
        let mut line = format!("{:<46}", "  copy floor at 1e7: GB/s best (1 thread)");
        for r in results {
            let cell = match r.sizes.get(3) {
                Some(Ok(s)) => format!("{} ({})", gbs(median(&s.floor)), gbs(median(&s.floor_1t))),
                _ => "-".into(),
            };
            let _ = write!(line, "{cell:<width$}");
        }
        let _ = writeln!(line, "(reference PyTorch copy: ~31)");
        out.push_str(&line);
        let mut line = format!("{:<46}", "  optimizer-only step at 1e7: ms, MB moved");
        for r in results {
            let cell = match r.sizes.get(3) {
                Some(Ok(s)) => {
                    format!("{:.2} ms, {:.0} MB", s.opt_secs * 1e3, s.bytes as f64 / 1e6)
                }
                _ => "-".into(),
            };
            let _ = write!(line, "{cell:<width$}");
        }
        let _ = writeln!(line);
        out.push_str(&line);

        for (k, &c) in COUNTS.iter().enumerate().skip(1) {
            let mut line = format!(
                "{:<46}",
                format!("{c} vs 1 tensor(s), 1e6 f32 total: slowdown")
            );
            for r in results {
                let cell = match &r.counts {
                    Some(Ok((_, ratios))) => {
                        let x = median(&ratios[k]);
                        let targeted = matches!(r.name, "tch" | "candle");
                        let mark = if targeted && c == 1000 {
                            format!(" {}", verdict(x <= 1.5))
                        } else {
                            String::new()
                        };
                        format!("{x:.2}x{mark}")
                    }
                    Some(Err(e)) => format!("error: {}", e.chars().take(14).collect::<String>()),
                    None => "-".into(),
                };
                let _ = write!(line, "{cell:<width$}");
            }
            let _ = writeln!(
                line,
                "{}",
                if c == 1000 { "tch, candle <= 1.5" } else { "" }
            );
            out.push_str(&line);
        }
        let mut line = format!("{:<46}", "  optimizer-only ms/step at 1 | 100 | 1000 t");
        for r in results {
            let cell = match &r.counts {
                Some(Ok((per, _))) => per
                    .iter()
                    .map(|t| format!("{:.3}", t * 1e3))
                    .collect::<Vec<_>>()
                    .join(" | "),
                _ => "-".into(),
            };
            let _ = write!(line, "{cell:<width$}");
        }
        let _ = writeln!(line);
        out.push_str(&line);
    }

    let mut line = format!("{:<46}", "AMP buffers held between steps (all held)");
    for r in results {
        let from_mlp = r
            .mlp
            .iter()
            .find_map(|m| m.as_ref().ok())
            .map(|m| (m.amp_held, m.held));
        let cell = match (from_mlp, r.opt_amp_held) {
            (Some((amp, all)), _) if r.name == "torch" => format!("{amp} ({all})"),
            (Some((amp, all)), _) => format!("{amp} ({all}) {}", verdict(amp <= 1)),
            (None, Some(amp)) => format!("{amp} {}", verdict(amp <= 1)),
            _ => "-".into(),
        };
        let _ = write!(line, "{cell:<width$}");
    }
    let _ = writeln!(line, "<= 1 (copy mode, K = 1)");
    out.push_str(&line);

    // Where the optimizer's time goes at 1e7.
    if !args.skip_optimizer {
        for (k, (title, _, _)) in BREAKDOWNS.iter().enumerate() {
            let _ = writeln!(
                out,
                "\nper-primitive breakdown of one AMP step (K = 1) {title}: calls, MB, ms, GB/s"
            );
            for r in results {
                match r.breakdowns.get(k) {
                    Some(Ok(m)) => {
                        let _ = writeln!(out, "  {}{}", r.name, render_meter(m));
                    }
                    Some(Err(e)) => {
                        let _ = writeln!(out, "  {:<8} error: {e}", r.name);
                    }
                    None => {}
                }
            }
        }
    }
    for r in results {
        // An unavailable PyTorch reference is said once, in the heading.
        for m in r.mlp.iter().filter_map(|m| m.as_ref().err()) {
            if !m.starts_with("n/a") {
                let _ = writeln!(out, "{} MLP error: {m}", r.name);
            }
        }
        for m in r.vs_torch.iter().filter_map(|m| m.as_ref().err()) {
            if !m.starts_with("n/a") {
                let _ = writeln!(out, "{} vs torch error: {m}", r.name);
            }
        }
        for m in r.sizes.iter().filter_map(|m| m.as_ref().err()) {
            let _ = writeln!(out, "{} optimizer-only error: {m}", r.name);
        }
    }
    out
}
