//! `--distributed`, under `mpirun -np N` (feature `mpi`): the share of a
//! data-parallel AMP step spent in gradient reductions, per policy, on the
//! 4 × 512 and 2 × 2048 MLPs.
//!
//! Every rank steps the ndarray MLP (single-threaded matrix products: one
//! core per rank) on the same batch — the cost does not depend on the
//! values — joined to the others by `amp::distributed::mpi`. Each policy
//! runs a fixed number of steps after two warm-up steps, the same on every
//! rank (collective calls must match); rank 0 prints, per step: the step's
//! time, the time in gradient reductions (host copies, the exchange and the
//! mean, waiting for the slower rank included) and in flag agreements, the
//! gradient bytes this rank sent, and the reductions. Every-pass reduction
//! at K = 1 makes two reductions per step, final-pass one: half the bytes.

use amp::distributed::mpi::{self as amp_mpi, MpiCollective};
use amp::{BoxError, Reduce};

use crate::fixtures::Trainer;
use crate::mlp::SPECS;

/// One policy's figures on one model, per step.
struct Row {
    model: &'static str,
    policy: &'static str,
    step_ms: f64,
    reduce_ms: f64,
    agree_ms: f64,
    bytes: f64,
    reductions: f64,
}

/// Runs the measurement; rank 0 prints the table.
pub fn run(quick: bool, seed: u64) -> Result<(), BoxError> {
    let (universe, probe) = amp_mpi::initialize()?;
    let (rank, world) = (probe.rank(), probe.world_size());
    drop(probe);
    let mut rows = Vec::new();
    for (spec, steps) in [(SPECS[1], 30), (SPECS[2], 8)] {
        let steps = if quick { steps / 4 } else { steps };
        let problem = spec.problem(seed);
        for reduce in [Reduce::EveryPass, Reduce::FinalPass] {
            let (_erm, amp) = crate::mlp_ndarray::trainers(&problem)?;
            let link = MpiCollective::new(universe.world())?;
            let stats = link.stats();
            let mut amp: Trainer<_> = amp.joined(Box::new(link), reduce)?;
            amp.steps(2)?;
            stats.reset();
            let timing = amp.steps(steps)?;
            let per = |x: f64| x / steps as f64;
            rows.push(Row {
                model: spec.name,
                policy: reduce.name(),
                step_ms: 1e3 * timing.per_step(),
                reduce_ms: 1e3 * per(stats.reduce_seconds()),
                agree_ms: 1e3 * per(stats.agree_seconds()),
                bytes: per(stats.sent_bytes() as f64),
                reductions: per(stats.reductions() as f64),
            });
        }
    }
    if rank == 0 {
        print!("{}", render(&rows, world, quick));
    }
    Ok(())
}

fn render(rows: &[Row], world: usize, quick: bool) -> String {
    use std::fmt::Write as _;
    let mut out = format!(
        "\nData-parallel AMP (K = 1, SGD Nesterov 0.9), {world} MPI ranks, ndarray f32 MLPs{}\n\
         per step, rank 0: step time, of which in gradient reductions and in flag agreements; \
         gradient bytes sent; reductions\n\n",
        if quick { " — QUICK run" } else { "" }
    );
    let _ = writeln!(
        out,
        "{:<8} {:<11} {:>9} {:>14} {:>10} {:>12} {:>10}",
        "model", "reduce", "step ms", "reduce ms (%)", "agree ms", "bytes sent", "reductions"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:<8} {:<11} {:>9.2} {:>8.2} ({:>3.0}) {:>10.3} {:>12.0} {:>10.1}",
            r.model,
            r.policy,
            r.step_ms,
            r.reduce_ms,
            100.0 * r.reduce_ms / r.step_ms.max(1e-12),
            r.agree_ms,
            r.bytes,
            r.reductions
        );
    }
    out
}
