//! Train a small MLP on real data with ERM and with AMP, and compare.
//!
//! ```text
//! cargo run --release --example train                # defaults: candle, CPU
//! cargo run --release --example train -- --help
//! cargo run --release --example train -- --backend ndarray --seeds 10 --quiet
//! ```
//!
//! AMP is *adversarial model perturbation* (Zheng, Zhang & Mao, CVPR 2021):
//! each step takes the gradient at the worst weights within a per-tensor
//! ε-ball around θ, which favours flat minima. Here it regularises an MLP that
//! classifies red wines as good (quality ≥ 6) or not from 11 physico-chemical
//! measurements (the UCI red wine quality data, shipped in `linfa-datasets`;
//! exact duplicate rows dropped).
//!
//! The same network (same seeded initial weights, same seeded batch order) is
//! trained once with ERM — SGD with Nesterov momentum, i.e. AMP with
//! `inner_iter = 0` — and once with AMP, for every seed; the program prints
//! the test error of the last epoch as mean ± std over seeds, the time per
//! epoch and the AMP/ERM time ratio, and writes SVG plots of training loss
//! and test error per epoch.
//!
//! # How the defaults were chosen
//! Data: the 1359 distinct wines (240 exact duplicates dropped, see
//! `data.rs`), one fixed split (seed 0) into 815 training, 272 validation and
//! 272 test wines; features standardised with training statistics only.
//! Every choice was made on the **validation** error of the last epoch, mean
//! over seeds 100–109 (not the reported seeds 0–9), with `--val-only`, which
//! never predicts the test rows. Reproduce any cell with
//! `--backend ndarray --val-only --first-seed 100 --seeds 10 [flags]`.
//!
//! A first sweep ran on the raw file, duplicates included, and its defaults
//! (120 epochs, ε = 0.2, ζ = 2) then gave AMP 21.9 % on validation but 27.9 %
//! on test against ERM's 22.4 %. Looking into that gap (ERM stopped early or
//! with strong weight decay did just as badly on that test split) showed the
//! duplicate leak: copies of training wines in the held-out rows reward
//! memorisation. The duplicates were dropped and the whole sweep redone;
//! the numbers below are from the deduplicated data only.
//!
//! * Task `good` (2 classes). On the raw data the 6-class grade gave no
//!   consistent AMP gain (ERM 38.0–38.2 %, AMP 37.5–39.4 % over
//!   ε ∈ {0.05, 0.1, 0.2, 0.5}); its rare grades (10 and 18 wines) make it
//!   mostly noise at this size. It was not re-run after deduplication.
//! * Base optimiser as in the paper: SGD, momentum 0.9, Nesterov, weight
//!   decay 1e-4, gradient-norm clipping at 50 inside the closure (never
//!   active here), lr × 0.1 at half and three quarters of the epochs (the
//!   paper's 100 and 150 of 200), batch 32, MLP 11-64-64-2 (8.9 k weights
//!   for 815 rows, enough to overfit).
//! * Budget and lr (ERM validation error; AMP at ε = 0.1, ζ = 1 alongside):
//!
//!   | epochs \ lr |  0.01           |  0.05           |  0.1            |
//!   |-------------|-----------------|-----------------|-----------------|
//!   | 30          | 25.22 / 28.05   | 24.38 / 24.67   | 26.58 / 24.30   |
//!   | 60          | 24.26 / 25.55   | 28.20 / 24.41   | 30.44 / 25.88   |
//!   | 120         | 26.03 / 24.08   | 30.66 / 27.32   | 30.66 / 29.12   |
//!
//!   As in the paper, the budget is one that lets ERM fit its training data
//!   (60 epochs at lr 0.05: training loss 0.20, validation 28.20 %), and the
//!   regulariser is judged there. Honest caveat: ERM's best cells are the
//!   small-lr or short runs (24.26 % at 60 epochs, lr 0.01; 24.38 % at 30
//!   epochs, lr 0.05) — tuned early stopping — which match AMP's best.
//! * ε and ζ at 60 epochs, lr 0.05 (AMP validation error; ERM 28.20 %):
//!
//!   | ε \ ζ |    1      |    2    |
//!   |-------|-----------|---------|
//!   | 0.05  | 25.40     | 25.33   |
//!   | 0.1   | 24.41     | 24.12   |
//!   | 0.2   | **24.15** | 25.15   |
//!   | 0.5   | 24.67     | 26.18   |
//!
//!   ε = 0.2 with the paper's ζ = 1 and K = 1: tied for best with ε = 0.1,
//!   ζ = 2 (0.03 points apart, far inside the noise), and ties go to the
//!   paper's ζ. AMP was lower than ERM on 10 of 10 validation seeds there
//!   (−4.04 ± 1.55 points paired).
//! * Seeds: 10, which keeps the default run well under two minutes on 2 CPU
//!   cores.
//! * AdamW as the base (`--optimizer adamw`), chosen the same way: weight
//!   decay 0.01 (PyTorch's AdamW default), the lr of the budget where ERM
//!   fits its training data (training loss about 0.2, as SGD's budget), then
//!   ε on AMP's validation error. ERM / AMP validation error at ε 0.2 (ERM
//!   training loss):
//!
//!   | lr      | ERM             | AMP     |
//!   |---------|-----------------|---------|
//!   | 0.001   | 24.23 (0.368)   | 25.62   |
//!   | 0.003   | 26.91 (0.216)   | 24.78   |
//!   | 0.01    | 29.78 (0.125)   | 25.18   |
//!
//!   ε at lr 0.003: 0.05 → 26.54, 0.1 → 25.85, **0.2 → 24.78**, 0.5 → 25.33.
//!   Honest caveat: AdamW alone at lr 0.001 (24.23 %, where it does not fit
//!   its training data) is as good as any AMP cell; AMP's gain is, again,
//!   at the budget where ERM overfits.
#![warn(missing_docs)]

mod data;
#[cfg(feature = "burn")]
mod mlp_burn;
#[cfg(feature = "candle")]
mod mlp_candle;
#[cfg(feature = "ndarray")]
mod mlp_ndarray;
#[cfg(feature = "tch")]
mod mlp_tch;
mod model;
mod ranks;
mod report;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use amp::schedule::{Cosine, LrSchedule, MultiStep};
use amp::{AdamConfig, AmpConfig, AmpError, BoxError, LossScaleConfig, Reduce, SgdConfig};
use clap::Parser;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use plotters::style::RGBColor;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::data::{Data, Task};
use crate::model::{BackendKind, Base, DeviceKind, Precision, Setup, Which};
use crate::report::{MethodResult, RunHistory};

/// `--optimizer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum OptimizerKind {
    /// SGD with momentum (the paper's).
    Sgd,
    /// Adam, weight decay added to the gradient.
    Adam,
    /// AdamW, decoupled weight decay.
    Adamw,
}

impl OptimizerKind {
    fn name(self) -> &'static str {
        match self {
            OptimizerKind::Sgd => "SGD",
            OptimizerKind::Adam => "Adam",
            OptimizerKind::Adamw => "AdamW",
        }
    }
}

/// Learning-rate schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ScheduleKind {
    /// Multiply by `--gamma` at each of `--milestones` (PyTorch `MultiStepLR`).
    Multistep,
    /// Cosine annealing from `--lr` to 0 over `--epochs`.
    Cosine,
}

/// Train an MLP on the red wine quality data with ERM (SGD + momentum) and
/// with AMP (adversarial model perturbation), over several seeds, and compare
/// their test errors and training times.
#[derive(Parser, Debug)]
#[command(name = "train", version, allow_negative_numbers = true)]
struct Args {
    /// Radius ε of each weight tensor's perturbation ball.
    #[arg(long, default_value_t = 0.2, help_heading = "AMP")]
    epsilon: f64,
    /// Inner (ascent) learning rate ζ.
    #[arg(long, default_value_t = 1.0, help_heading = "AMP")]
    inner_lr: f64,
    /// Inner ascent iterations K of the AMP runs (the ERM runs use 0).
    #[arg(long, default_value_t = 1, help_heading = "AMP")]
    inner_iter: usize,
    /// Perturb on every k-th step only, plain steps between (AMP runs).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..),
          help_heading = "AMP")]
    interval: u64,
    /// Perturb only from this epoch on, plain steps before (AMP runs).
    #[arg(long, default_value_t = 0, help_heading = "AMP")]
    start_epoch: u64,

    /// Base optimiser: SGD (with `--momentum`, `--nesterov`), Adam (L2
    /// weight decay) or AdamW (decoupled weight decay), PyTorch's defaults
    /// for betas and eps.
    #[arg(long, value_enum, default_value_t = OptimizerKind::Sgd, help_heading = "Optimiser")]
    optimizer: OptimizerKind,

    /// Outer learning rate.
    #[arg(long, default_value_t = 0.05, help_heading = "Optimiser")]
    lr: f64,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9, help_heading = "Optimiser")]
    momentum: f64,
    /// Weight decay.
    #[arg(long, default_value_t = 1e-4, help_heading = "Optimiser")]
    weight_decay: f64,
    /// Nesterov momentum (`--nesterov false` for heavy ball).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true", help_heading = "Optimiser")]
    nesterov: bool,
    /// Clip the global gradient norm to this on every pass (the paper uses 50;
    /// `--clip-norm` alone with no value turns clipping off).
    #[arg(long, default_value = "50", num_args = 0..=1, default_missing_value = "off",
          value_parser = parse_clip, help_heading = "Optimiser")]
    clip_norm: Clip,
    /// Mini-batch size.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..),
          help_heading = "Optimiser")]
    batch_size: u64,
    /// Epochs per run.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..),
          help_heading = "Optimiser")]
    epochs: u64,
    /// Learning-rate schedule.
    #[arg(long, value_enum, default_value_t = ScheduleKind::Multistep, help_heading = "Optimiser")]
    schedule: ScheduleKind,
    /// Epochs at which the multistep schedule multiplies the learning rate by
    /// `--gamma`, comma-separated [default: half and three quarters of
    /// `--epochs`]. Give the flag with no value for a constant rate.
    #[arg(long, value_delimiter = ',', num_args = 0.., help_heading = "Optimiser")]
    milestones: Option<Vec<usize>>,
    /// Factor of the multistep schedule.
    #[arg(long, default_value_t = 0.1, help_heading = "Optimiser")]
    gamma: f64,

    /// Number of seeds (0, 1, …): each seeds the initial weights and the
    /// batch order, shared by the ERM and the AMP run.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..1000),
          help_heading = "Experiment")]
    seeds: u64,
    /// First seed.
    #[arg(long, default_value_t = 0, help_heading = "Experiment")]
    first_seed: u64,
    /// Hidden layer widths, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "64,64",
        help_heading = "Experiment"
    )]
    hidden: Vec<usize>,
    /// What to predict.
    #[arg(long, value_enum, default_value_t = Task::Good, help_heading = "Experiment")]
    task: Task,
    /// Seed of the train / validation / test split.
    #[arg(long, default_value_t = 0, help_heading = "Experiment")]
    split_seed: u64,
    /// Tensor library.
    #[arg(long, value_enum, default_value_t = BackendKind::default_kind(), help_heading = "Experiment")]
    backend: BackendKind,
    /// Device.
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu, help_heading = "Experiment")]
    device: DeviceKind,
    /// Precision of the model's weights and activations (mixed precision:
    /// candle and tch backends). bf16 and f16 keep f32 master weights for the
    /// optimiser; f16 also scales the loss dynamically.
    #[arg(long, value_enum, default_value_t = Precision::F32, help_heading = "Experiment")]
    precision: Precision,
    /// With `--precision bf16|f16`: step f32 master weights (`false`: step
    /// the half-precision weights themselves, losing updates below their
    /// resolution).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true", help_heading = "Experiment")]
    master_weights: bool,

    /// Under `mpirun -np N` (build with `--features mpi`): which passes
    /// average their gradients across the ranks. `every-pass`: N ranks
    /// train as one process on the whole batch; `final-pass`: each rank
    /// perturbs from its own share (m-sharpness).
    #[arg(long, value_enum, default_value_t = ReduceKind::EveryPass, help_heading = "Experiment")]
    reduce: ReduceKind,

    /// Directory for the SVG plots.
    #[arg(long, default_value = "target/amp-train", help_heading = "Output")]
    out_dir: PathBuf,
    /// Report validation error only, never the test error (for choosing
    /// hyper-parameters without looking at the test split).
    #[arg(long, help_heading = "Output")]
    val_only: bool,
    /// Print only the results table and the plot paths: no progress bars.
    #[arg(long, short, help_heading = "Output")]
    quiet: bool,
}

/// `--reduce`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ReduceKind {
    /// Every pass's gradients averaged across ranks.
    EveryPass,
    /// Only the base step's gradient averaged.
    FinalPass,
}

impl ReduceKind {
    fn policy(self) -> Reduce {
        match self {
            ReduceKind::EveryPass => Reduce::EveryPass,
            ReduceKind::FinalPass => Reduce::FinalPass,
        }
    }
}

/// `--clip-norm`: a positive number, or off.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Clip {
    Off,
    At(f64),
}

fn parse_clip(text: &str) -> Result<Clip, String> {
    if matches!(text, "off" | "none") {
        return Ok(Clip::Off);
    }
    let value: f64 = text
        .parse()
        .map_err(|_| format!("expected a positive number or `off`, got `{text}`"))?;
    if value.is_finite() && value > 0.0 {
        Ok(Clip::At(value))
    } else {
        Err(format!(
            "must be positive and finite (or `off`), got {value}"
        ))
    }
}

/// A run's settings after validation.
struct Plan {
    amp: AmpConfig,
    erm: AmpConfig,
    base: Base,
    schedule: Box<dyn LrSchedule>,
    sizes: Vec<usize>,
}

/// The flag that sets a configuration field, for error messages.
fn flag_of(field: &str) -> String {
    match field {
        "lr" => "--lr".into(),
        "epsilon" => "--epsilon".into(),
        "inner_lr" => "--inner-lr".into(),
        "weight_decay" => "--weight-decay".into(),
        "momentum" => "--momentum".into(),
        "nesterov" => "--nesterov".into(),
        "interval" => "--interval".into(),
        "milestones" => "--milestones".into(),
        "gamma" => "--gamma".into(),
        "total_epochs" => "--epochs".into(),
        other => format!("`{other}`"),
    }
}

/// Turns a configuration error of the library into a message naming the flag.
fn explain(error: AmpError) -> String {
    match error {
        AmpError::InvalidConfig { field, reason } => {
            let hint = if field == "nesterov" {
                " (pass `--nesterov false` to train with momentum 0)"
            } else {
                ""
            };
            format!("invalid value for {}: {reason}{hint}", flag_of(field))
        }
        other => other.to_string(),
    }
}

/// Validates every flag through the library's own validators.
fn plan(args: &Args, data: &Data) -> Result<Plan, String> {
    let batches_per_epoch = data.train.len().div_ceil(args.batch_size as usize) as u64;
    let start_step = args
        .start_epoch
        .checked_mul(batches_per_epoch)
        .ok_or("invalid value for --start-epoch: too large")?;
    let amp = AmpConfig::new(args.lr, args.epsilon)
        .inner_lr(args.inner_lr)
        .inner_iter(args.inner_iter)
        .weight_decay(args.weight_decay)
        .reduce(args.reduce.policy())
        .interval(args.interval)
        .start_step(start_step);
    let amp = match args.precision {
        Precision::F16 => amp.loss_scale(LossScaleConfig::default()),
        _ => amp,
    };
    if args.precision != Precision::F32
        && matches!(args.backend, BackendKind::Ndarray | BackendKind::Burn)
    {
        return Err(format!(
            "invalid value for --precision: {} needs --backend candle or tch (the {} backend trains in f32)",
            args.precision.name(),
            args.backend.name()
        ));
    }
    amp.validate().map_err(explain)?;
    let erm = amp.clone().inner_iter(0);
    let base = match args.optimizer {
        OptimizerKind::Sgd => {
            let sgd = SgdConfig {
                momentum: args.momentum,
                dampening: 0.0,
                nesterov: args.nesterov,
            };
            sgd.validate().map_err(explain)?;
            Base::Sgd(sgd)
        }
        OptimizerKind::Adam => Base::Adam(AdamConfig::adam()),
        OptimizerKind::Adamw => Base::Adam(AdamConfig::adamw()),
    };
    let epochs = args.epochs as usize;
    let schedule: Box<dyn LrSchedule> = match args.schedule {
        ScheduleKind::Multistep => {
            let milestones = args
                .milestones
                .clone()
                .unwrap_or_else(|| vec![epochs / 2, epochs * 3 / 4]);
            Box::new(MultiStep::new(milestones, args.gamma).map_err(explain)?)
        }
        ScheduleKind::Cosine => Box::new(Cosine::new(epochs, 0.0).map_err(explain)?),
    };
    if args.hidden.contains(&0) {
        return Err("invalid value for --hidden: every width must be positive".into());
    }
    let mut sizes = vec![data.features];
    sizes.extend(&args.hidden);
    sizes.push(data.classes);
    Ok(Plan {
        amp,
        erm,
        base,
        schedule,
        sizes,
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    let data = data::load(args.task, args.split_seed);
    let plan = match plan(&args, &data) {
        Ok(plan) => plan,
        Err(message) => {
            eprintln!("error: {message}\n\nFor more information, try '--help'.");
            return ExitCode::from(2);
        }
    };
    match run(&args, &data, &plan) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let message = error.to_string();
            eprintln!("error: {message}");
            let mut source = error.source();
            while let Some(cause) = source {
                let cause_text = cause.to_string();
                // Wrappers often repeat their source in their own message.
                if !message.contains(&cause_text) {
                    eprintln!("  caused by: {cause_text}");
                }
                source = cause.source();
            }
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args, data: &Data, plan: &Plan) -> Result<(), BoxError> {
    let ranks = ranks::Ranks::detect()?;
    if ranks.rank != 0 {
        // Every rank trains; rank 0 reports.
        return train_silently(args, data, plan, &ranks);
    }
    let clip_norm = match args.clip_norm {
        Clip::Off => None,
        Clip::At(v) => Some(v),
    };
    let arch = plan
        .sizes
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join("-");
    let recipes = match (args.interval, args.start_epoch) {
        (1, 0) => String::new(),
        (k, 0) => format!(", every {k}th step"),
        (1, e) => format!(", from epoch {e}"),
        (k, e) => format!(", every {k}th step from epoch {e}"),
    };
    let amp_name = format!(
        "AMP (eps {}, zeta {}, K {}{recipes})",
        args.epsilon, args.inner_lr, args.inner_iter
    );
    let erm_name = match args.optimizer {
        OptimizerKind::Sgd if args.nesterov => "ERM (SGD, Nesterov)".to_string(),
        kind => format!("ERM ({})", kind.name()),
    };
    if !args.quiet {
        println!(
            "red wine quality, {}: {} exact duplicates dropped, {} train / {} val / {} test rows; MLP {arch}",
            args.task.describe(),
            data.duplicates_dropped,
            data.train.len(),
            data.val.len(),
            data.test.len()
        );
        println!(
            "{} seeds x {} epochs, batch {}, {} lr {} ({:?}){}, weight decay {}, clip {}; backend {} on {}",
            args.seeds,
            args.epochs,
            args.batch_size,
            args.optimizer.name(),
            args.lr,
            args.schedule,
            match args.optimizer {
                OptimizerKind::Sgd => format!(", momentum {}", args.momentum),
                _ => String::new(),
            },
            args.weight_decay,
            clip_norm.map_or("off".into(), |c| c.to_string()),
            args.backend.name(),
            args.device.name()
        );
        if ranks.world > 1 {
            println!(
                "data-parallel: {} MPI ranks, each on its share of every batch, reduce {}",
                ranks.world,
                args.reduce.policy().name()
            );
        }
    }

    let bars = MultiProgress::with_draw_target(if args.quiet {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    });
    let runs_bar = bars.add(ProgressBar::new(args.seeds * 2));
    runs_bar.set_style(
        ProgressStyle::with_template("runs   [{bar:30}] {pos}/{len} {msg} ({elapsed})")?
            .progress_chars("=> "),
    );
    let epoch_bar = bars.add(ProgressBar::new(args.epochs));
    epoch_bar.set_style(
        ProgressStyle::with_template("epochs [{bar:30}] {pos}/{len} {msg}")?.progress_chars("=> "),
    );

    let mut erm = MethodResult {
        name: erm_name,
        runs: Vec::new(),
    };
    let mut amp = MethodResult {
        name: amp_name,
        runs: Vec::new(),
    };
    let started = Instant::now();
    for seed in args.first_seed..args.first_seed + args.seeds {
        // ERM and AMP alternate, so that slow drift of the machine's speed
        // falls on both alike.
        for (method, config) in [(&mut erm, &plan.erm), (&mut amp, &plan.amp)] {
            let label = if config.inner_iter == 0 { "ERM" } else { "AMP" };
            runs_bar.set_message(format!("{label}, seed {seed}"));
            let setup = setup(args, data, plan, config, seed, &ranks)?;
            let mut net = model::build(args.backend, setup)?;
            let history = train(net.as_mut(), data, plan, args, seed, &ranks, &epoch_bar)
                .map_err(|e| format!("{label} run with seed {seed}: {e}"))?;
            method.runs.push(history);
            runs_bar.inc(1);
        }
    }
    epoch_bar.finish_and_clear();
    runs_bar.finish_and_clear();

    if !args.quiet {
        println!(
            "trained {} runs in {:.1} s\n",
            args.seeds * 2,
            started.elapsed().as_secs_f64()
        );
    }
    println!(
        "{} error of the last epoch (mean ± std over {} seeds), red wine {}, MLP {arch}, {} epochs, {} backend{}:\n",
        if args.val_only { "Validation" } else { "Test" },
        args.seeds,
        args.task.describe(),
        args.epochs,
        args.backend.name(),
        match (args.precision, args.master_weights, ranks.world) {
            (Precision::F32, _, 1) => String::new(),
            (Precision::F32, _, n) => format!(", {n} ranks"),
            (p, true, n) => format!(", {} with f32 master weights{}", p.name(), ranks_note(n)),
            (p, false, n) => format!(", {} without master weights{}", p.name(), ranks_note(n)),
        }
    );
    print!("{}", report::table(&erm, &amp, !args.val_only));

    std::fs::create_dir_all(&args.out_dir)
        .map_err(|e| format!("cannot create {}: {e}", args.out_dir.display()))?;
    const ERM_COLOR: RGBColor = RGBColor(214, 39, 40);
    const AMP_COLOR: RGBColor = RGBColor(31, 119, 180);
    let methods = [(&erm, ERM_COLOR), (&amp, AMP_COLOR)];
    let loss_path = args.out_dir.join("train_loss.svg");
    report::plot(
        &loss_path,
        "Training loss L(θ) per epoch, red wine",
        "cross-entropy",
        &methods,
        |r| &r.train_loss,
        1.0,
    )?;
    let error_path = if args.val_only {
        let path = args.out_dir.join("val_error.svg");
        report::plot(
            &path,
            "Validation error per epoch, red wine",
            "validation error (%)",
            &methods,
            |r| &r.val_error,
            100.0,
        )?;
        path
    } else {
        let path = args.out_dir.join("test_error.svg");
        report::plot(
            &path,
            "Test error per epoch, red wine",
            "test error (%)",
            &methods,
            |r| &r.test_error,
            100.0,
        )?;
        path
    };
    println!(
        "\nplots: {}\n       {}",
        loss_path.display(),
        error_path.display()
    );
    Ok(())
}

/// `, N ranks` in a data-parallel job.
fn ranks_note(world: usize) -> String {
    if world > 1 {
        format!(", {world} ranks")
    } else {
        String::new()
    }
}

/// A rank other than 0: the same runs, in the same order, with nothing
/// printed.
fn train_silently(
    args: &Args,
    data: &Data,
    plan: &Plan,
    ranks: &ranks::Ranks,
) -> Result<(), BoxError> {
    let bar = ProgressBar::hidden();
    for seed in args.first_seed..args.first_seed + args.seeds {
        for config in [&plan.erm, &plan.amp] {
            let mut net =
                model::build(args.backend, setup(args, data, plan, config, seed, ranks)?)?;
            train(net.as_mut(), data, plan, args, seed, ranks, &bar)?;
        }
    }
    Ok(())
}

/// One run's model and optimiser settings: `config` (ERM's or AMP's) from
/// seed `seed`.
fn setup<'a>(
    args: &Args,
    data: &'a Data,
    plan: &Plan,
    config: &AmpConfig,
    seed: u64,
    ranks: &ranks::Ranks,
) -> Result<Setup<'a>, BoxError> {
    Ok(Setup {
        data,
        layers: model::init_layers(&plan.sizes, seed),
        amp: config.clone(),
        base: plan.base,
        clip_norm: match args.clip_norm {
            Clip::Off => None,
            Clip::At(v) => Some(v),
        },
        device: args.device,
        precision: args.precision,
        master_weights: args.master_weights,
        link: ranks.link()?,
    })
}

/// Trains one network for `--epochs` epochs and records its history; in a
/// data-parallel job, on this rank's share of every batch (the training
/// loss is then this rank's).
fn train(
    net: &mut dyn model::Model,
    data: &Data,
    plan: &Plan,
    args: &Args,
    seed: u64,
    ranks: &ranks::Ranks,
    bar: &ProgressBar,
) -> Result<RunHistory, BoxError> {
    // The batch order depends on the seed only, so ERM and AMP see the same
    // batches.
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xA3);
    let mut order: Vec<usize> = (0..data.train.len()).collect();
    let mut history = RunHistory::default();
    bar.reset();
    for epoch in 0..args.epochs as usize {
        net.set_lr(plan.schedule.lr(args.lr, epoch))?;
        order.shuffle(&mut rng);
        let start = Instant::now();
        let mut loss_sum = 0.0;
        let mut rows = 0;
        for batch in order.chunks(args.batch_size as usize) {
            let share = ranks.share(batch);
            loss_sum += net.step(share)? * share.len() as f64;
            rows += share.len();
        }
        net.synchronize()?;
        history.epoch_seconds.push(start.elapsed().as_secs_f64());
        history.train_loss.push(loss_sum / rows as f64);
        history
            .val_error
            .push(data.val.error_rate(&net.predict(Which::Val)?));
        // With --val-only the test rows are not even predicted.
        history.test_error.push(if args.val_only {
            f64::NAN
        } else {
            data.test.error_rate(&net.predict(Which::Test)?)
        });
        bar.set_message(format!(
            "loss {:.3}, val error {:.1}%",
            history.train_loss[epoch],
            history.val_error[epoch] * 100.0
        ));
        bar.inc(1);
    }
    Ok(history)
}
