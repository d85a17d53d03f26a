//! The MPI collective across real processes: the test re-executes itself
//! under `mpirun` with 2 and 3 ranks, and each rank runs the scenarios in
//! [`rank_main`]. Checked on every rank (a failed rank fails `mpirun`):
//!
//! - every-pass reduction equals one process on the concatenated batch
//!   (1e-12 relative, f64), and matches the in-process collective bit for
//!   bit;
//! - the ranks' weights are bit-identical after training, under both
//!   policies, in f32;
//! - a NaN gradient on one rank skips the step on every rank;
//! - a checkpoint saved by rank 0 resumes every rank bit-exactly.
//!
//! Without `mpirun` on the PATH the test prints that it was skipped.

use std::path::PathBuf;
use std::process::Command;

use amp_core::{Amp, AmpConfig, AmpError, InProcess, NonFinitePolicy, Reduce, SgdConfig};
use amp_mpi::mpi::traits::{Communicator, CommunicatorCollectives};
use amp_mpi::MpiCollective;
use amp_ndarray::NdStore;
use amp_testkit::data_parallel::{least_squares, share, step, store, weights, ROWS};

const CHILD: &str = "AMP_MPI_RANK_MAIN";

#[test]
fn mpi_ranks_agree_and_match_one_process() {
    if std::env::var_os(CHILD).is_some() {
        return rank_main();
    }
    if Command::new("mpirun").arg("--version").output().is_err() {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "NOTICE: mpi_ranks_agree_and_match_one_process: no mpirun on the PATH, SKIPPED \
             (the README's test command installs Open MPI)"
        );
        return;
    }
    let exe = std::env::current_exe().unwrap();
    for ranks in [2, 3] {
        let dir = tempfile::tempdir().unwrap();
        let output = Command::new("mpirun")
            .args([
                "--allow-run-as-root",
                "--oversubscribe",
                "--timeout",
                "120",
                "-np",
            ])
            .arg(ranks.to_string())
            .arg(&exe)
            .args([
                "--exact",
                "mpi_ranks_agree_and_match_one_process",
                "--nocapture",
            ])
            .env(CHILD, dir.path())
            .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout).to_string()
            + &String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{ranks} ranks:\n{text}");
        let done = text.matches("rank scenarios passed").count();
        assert_eq!(done, ranks, "{ranks} ranks:\n{text}");
    }
}

fn config(reduce: Reduce) -> AmpConfig {
    AmpConfig::new(0.2, 0.05)
        .inner_iter(2)
        .weight_decay(1e-3)
        .reduce(reduce)
}

/// An optimiser over the starting weights, joined to the world.
fn joined<T: amp_ndarray::Element>(
    universe: &amp_mpi::mpi::environment::Universe,
    config: AmpConfig,
) -> Amp<NdStore<T>> {
    let link = MpiCollective::new(universe.world()).unwrap();
    Amp::sgd(store::<T>(), config, SgdConfig::nesterov(0.9))
        .unwrap()
        .with_collective(Box::new(link))
        .unwrap()
}

/// `values` are the same bits on every rank.
fn same_on_every_rank(comm: &impl Communicator, values: &[f64], what: &str) {
    let mut all = vec![0.0f64; values.len() * comm.size() as usize];
    comm.all_gather_into(values, &mut all[..]);
    for (r, part) in all.chunks(values.len()).enumerate() {
        let same = part
            .iter()
            .zip(values)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(
            same,
            "{what}: rank {r} holds {part:?}, rank {} {values:?}",
            comm.rank()
        );
    }
}

/// What every rank runs under `mpirun`.
fn rank_main() {
    let dir = PathBuf::from(std::env::var_os(CHILD).unwrap());
    let (universe, _) = amp_mpi::initialize().unwrap();
    let world = universe.world();
    let (rank, size) = (world.rank() as usize, world.size() as usize);
    // Every pass: one process on the concatenated batch.
    let mut single = Amp::sgd(
        store::<f64>(),
        config(Reduce::EveryPass),
        SgdConfig::nesterov(0.9),
    )
    .unwrap();
    let mut ranked = joined::<f64>(&universe, config(Reduce::EveryPass));
    for k in 0..10 {
        let all: Vec<usize> = (0..size).flat_map(|r| share(k, r, size)).collect();
        step(&mut single, &all);
        step(&mut ranked, &share(k, rank, size));
    }
    for (a, b) in weights(&ranked).iter().zip(weights(&single)) {
        assert!(
            (a - b).abs() <= 1e-12 * b.abs().max(1.0),
            "rank {rank}: {a} vs {b}"
        );
    }
    same_on_every_rank(&world, &weights(&ranked), "every pass, f64");

    // The same job with the in-process collective (threads standing in for
    // the ranks, on this one rank) gives the same bits.
    let threads: Vec<_> = InProcess::group(size)
        .into_iter()
        .map(|c| {
            std::thread::spawn(move || {
                let r = c.rank();
                let mut amp = Amp::sgd(
                    store::<f64>(),
                    config(Reduce::EveryPass),
                    SgdConfig::nesterov(0.9),
                )
                .unwrap()
                .with_collective(Box::new(c))
                .unwrap();
                for k in 0..10 {
                    step(&mut amp, &share(k, r, size));
                }
                weights(&amp)
            })
        })
        .collect();
    for t in threads {
        assert_eq!(
            t.join().unwrap(),
            weights(&ranked),
            "rank {rank}: MPI vs in-process"
        );
    }

    // Both policies keep f32 ranks bit-identical, with different data; at
    // K = 2 every-pass reduction sends three times the gradient bytes of
    // final-pass (K + 1 reductions per step against 1), 4 bytes a weight.
    let mut sent = Vec::new();
    for reduce in [Reduce::EveryPass, Reduce::FinalPass] {
        let link = Box::new(MpiCollective::new(universe.world()).unwrap());
        let stats = link.stats();
        let mut amp = Amp::sgd(store::<f32>(), config(reduce), SgdConfig::nesterov(0.9))
            .unwrap()
            .with_collective(link)
            .unwrap();
        for k in 0..20 {
            let rows: Vec<usize> = (0..3 + 2 * rank)
                .map(|j| (k * 5 + rank * 11 + j) % ROWS)
                .collect();
            step(&mut amp, &rows);
        }
        same_on_every_rank(&world, &weights(&amp), reduce.name());
        sent.push((stats.reductions(), stats.sent_bytes()));
    }
    assert_eq!(sent, [(60, 60 * 4 * 4), (20, 20 * 4 * 4)], "rank {rank}");

    // A NaN on the last rank's clean gradient (final-pass policy: not
    // averaged, only agreed) skips the step everywhere.
    let skip = config(Reduce::FinalPass).non_finite(NonFinitePolicy::Skip);
    let mut amp = joined::<f32>(&universe, skip);
    step(&mut amp, &share(0, rank, size));
    let before = weights(&amp);
    let report = amp
        .step(|s: &mut NdStore<f32>, pass| {
            let loss = least_squares(s, &share(1, rank, size))?;
            if rank == size - 1 && !pass.is_perturbed() {
                s.grad_mut(0)?[[0]] = f32::NAN;
            }
            Ok::<_, AmpError>(((), loss))
        })
        .unwrap();
    assert!(
        matches!(report.skipped, Some(AmpError::NonFiniteGradient { .. })),
        "rank {rank}: {:?}",
        report.skipped
    );
    assert_eq!(weights(&amp), before, "rank {rank}");
    assert_eq!(amp.skipped_steps(), 1);

    // A checkpoint saved by rank 0 resumes every rank bit-exactly.
    let path = dir.join("rank0.safetensors");
    let mut amp = joined::<f32>(&universe, config(Reduce::FinalPass));
    for k in 0..10 {
        if k == 5 {
            if rank == 0 {
                amp_checkpoint::save(&amp, &path).unwrap();
            }
            world.barrier();
        }
        step(&mut amp, &share(k, rank, size));
    }
    let mut resumed = joined::<f32>(&universe, config(Reduce::FinalPass));
    amp_checkpoint::load(&mut resumed, &path).unwrap();
    for k in 5..10 {
        step(&mut resumed, &share(k, rank, size));
    }
    assert_eq!(weights(&resumed), weights(&amp), "rank {rank}");
    same_on_every_rank(&world, &weights(&resumed), "resumed");

    println!("rank {rank} of {size}: rank scenarios passed");
}
