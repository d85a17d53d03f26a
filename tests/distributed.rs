//! Data-parallel AMP with the in-process collective (ranks are threads):
//! the every-pass policy equals one process on the concatenated batch, the
//! ranks' weights stay bit-identical under both policies, and whatever goes
//! wrong on one rank — a NaN, an error, a panic, gradients that do not
//! match up — ends or skips the step on every rank, without a hang.
//!
//! Tolerance against one process: 1e-12 relative (f64; only the order of
//! the sums differs).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use amp::backend::ndarray::{Element, NdStore};
use amp::{
    Amp, AmpConfig, AmpError, Collective, InProcess, NonFinitePolicy, ParamStore, Reduce,
    RestoreMode, SgdConfig, StepReport,
};
use amp_testkit::data_parallel::{least_squares, share, store, weights, ROWS};

fn config(reduce: Reduce, inner_iter: usize) -> AmpConfig {
    AmpConfig::new(0.2, 0.05)
        .inner_iter(inner_iter)
        .weight_decay(1e-3)
        .reduce(reduce)
}

/// Runs `body(rank, amp)` on `world` threads, each rank an `Amp` over its
/// own copy of the model joined by an in-process group; the ranks' results
/// in rank order.
fn on_ranks<T, R>(
    world: usize,
    config: AmpConfig,
    body: impl Fn(usize, &mut Amp<NdStore<T>>) -> R + Send + Sync + 'static,
) -> Vec<R>
where
    T: Element + Send,
    R: Send + 'static,
{
    let body = Arc::new(body);
    let threads: Vec<_> = InProcess::group_with_timeout(world, Duration::from_secs(20))
        .into_iter()
        .enumerate()
        .map(|(rank, collective)| {
            let (body, config) = (Arc::clone(&body), config.clone());
            std::thread::spawn(move || {
                let amp = Amp::sgd(store::<T>(), config, SgdConfig::nesterov(0.9)).unwrap();
                let mut amp = amp.with_collective(Box::new(collective)).unwrap();
                body(rank, &mut amp)
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

#[test]
fn every_pass_equals_one_process_on_the_concatenated_batch() {
    for world in [2, 3] {
        for inner_iter in [1, 2] {
            let mut single = Amp::sgd(
                store::<f64>(),
                config(Reduce::EveryPass, inner_iter),
                SgdConfig::nesterov(0.9),
            )
            .unwrap();
            for step in 0..10 {
                let rows: Vec<usize> = (0..world).flat_map(|r| share(step, r, world)).collect();
                single
                    .step(|s: &mut NdStore<f64>, _| {
                        Ok::<_, AmpError>(((), least_squares(s, &rows)?))
                    })
                    .unwrap();
            }
            let ranks = on_ranks(
                world,
                config(Reduce::EveryPass, inner_iter),
                move |rank, amp| {
                    for step in 0..10 {
                        let rows = share(step, rank, world);
                        amp.step(|s: &mut NdStore<f64>, _| {
                            Ok::<_, AmpError>(((), least_squares(s, &rows)?))
                        })
                        .unwrap();
                    }
                    weights(amp)
                },
            );
            let want = weights(&single);
            for got in &ranks {
                for (g, w) in got.iter().zip(want.iter()) {
                    assert!(
                        (g - w).abs() <= 1e-12 * w.abs().max(1.0),
                        "world {world}, K {inner_iter}: {got:?} vs {want:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn ranks_stay_bit_identical_under_both_policies() {
    let mut finals = Vec::new();
    for reduce in [Reduce::EveryPass, Reduce::FinalPass] {
        let ranks = on_ranks(3, config(reduce, 2), move |rank, amp| {
            for step in 0..25 {
                // Ranks hold different data (and different amounts of it).
                let rows: Vec<usize> = (0..3 + rank * 2)
                    .map(|k| (step * 5 + rank * 11 + k) % ROWS)
                    .collect();
                amp.step(|s: &mut NdStore<f32>, _| {
                    Ok::<_, AmpError>(((), least_squares(s, &rows)?))
                })
                .unwrap();
            }
            weights(amp)
        });
        assert_eq!(ranks[0], ranks[1], "{reduce:?}");
        assert_eq!(ranks[0], ranks[2], "{reduce:?}");
        finals.push(ranks[0].clone());
    }
    // The policies train differently: the ascent sees the global gradient
    // in one and each rank's own in the other.
    assert_ne!(finals[0], finals[1]);
}

#[test]
fn final_pass_with_the_same_data_on_every_rank_is_one_process() {
    // Each rank's own gradient is then the global one: both policies and a
    // single process take the very same steps.
    let rows: Vec<usize> = (0..8).collect();
    let mut single = Amp::sgd(
        store::<f64>(),
        config(Reduce::FinalPass, 1),
        SgdConfig::nesterov(0.9),
    )
    .unwrap();
    for _ in 0..10 {
        single
            .step(|s: &mut NdStore<f64>, _| Ok::<_, AmpError>(((), least_squares(s, &rows)?)))
            .unwrap();
    }
    let ranks = on_ranks(2, config(Reduce::FinalPass, 1), move |_, amp| {
        let rows: Vec<usize> = (0..8).collect();
        for _ in 0..10 {
            amp.step(|s: &mut NdStore<f64>, _| Ok::<_, AmpError>(((), least_squares(s, &rows)?)))
                .unwrap();
        }
        weights(amp)
    });
    assert_eq!(ranks[0], weights(&single));
    assert_eq!(ranks[1], weights(&single));
}

/// A step in which rank 1 does `fault` on the perturbed pass (on the clean
/// one with [`Reduce::FinalPass`], whose clean gradients are not
/// averaged: only agreement carries the fault to rank 0); every rank's
/// result, and its weights before and after.
type Outcome = (Result<StepReport<()>, String>, Vec<f64>, Vec<f64>);

fn fault_on_rank_1(reduce: Reduce, policy: NonFinitePolicy, fault: &'static str) -> Vec<Outcome> {
    let config = config(reduce, 1).non_finite(policy);
    on_ranks(2, config, move |rank, amp| {
        let rows = share(0, rank, 2);
        for _ in 0..3 {
            amp.step(|s: &mut NdStore<f64>, _| Ok::<_, AmpError>(((), least_squares(s, &rows)?)))
                .unwrap();
        }
        let before = weights(amp);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            amp.step(|s: &mut NdStore<f64>, pass| {
                let loss = least_squares(s, &rows)?;
                let faulty_pass = pass.is_perturbed() == (reduce == Reduce::EveryPass);
                if rank == 1 && faulty_pass {
                    match fault {
                        "nan" => s.grad_mut(0)?[[1]] = f64::NAN,
                        "error" => return Err(AmpError::backend("rank 1's model failed")),
                        "panic" => panic!("rank 1's model panicked"),
                        "no gradient" => s.zero_grads()?,
                        _ => unreachable!(),
                    }
                }
                Ok(((), loss))
            })
        }));
        let result = match result {
            Ok(Ok(report)) => Ok(report),
            Ok(Err(error)) => Err(format!("{error:?}")),
            Err(_) => Err("panicked".to_string()),
        };
        let after = weights(amp);
        // Both ranks carry on together afterwards.
        amp.step(|s: &mut NdStore<f64>, _| Ok::<_, AmpError>(((), least_squares(s, &rows)?)))
            .unwrap();
        (result, before, after)
    })
}

#[test]
fn a_nan_on_one_rank_skips_the_step_on_every_rank() {
    for reduce in [Reduce::EveryPass, Reduce::FinalPass] {
        let skipped = fault_on_rank_1(reduce, NonFinitePolicy::Skip, "nan");
        for (rank, (result, before, after)) in skipped.into_iter().enumerate() {
            let report = result.unwrap();
            assert!(
                matches!(report.skipped, Some(AmpError::NonFiniteGradient { .. })),
                "{reduce:?} rank {rank}: {:?}",
                report.skipped
            );
            assert_eq!(before, after, "rank {rank}");
        }
        let failed = fault_on_rank_1(reduce, NonFinitePolicy::Error, "nan");
        for (rank, (result, before, after)) in failed.into_iter().enumerate() {
            let error = result.unwrap_err();
            assert!(
                error.starts_with("NonFiniteGradient"),
                "{reduce:?} rank {rank}: {error}"
            );
            assert_eq!(before, after, "rank {rank}");
        }
    }
}

#[test]
fn an_error_or_a_panic_on_one_rank_ends_the_step_on_every_rank() {
    for fault in ["error", "panic"] {
        let outcomes = fault_on_rank_1(Reduce::EveryPass, NonFinitePolicy::Error, fault);
        let (peer, failed) = (&outcomes[0], &outcomes[1]);
        assert!(
            peer.0.as_ref().unwrap_err().starts_with("PeerFailed"),
            "{fault}: {:?}",
            peer.0
        );
        let own = failed.0.as_ref().unwrap_err();
        match fault {
            "error" => assert!(own.starts_with("Closure"), "{own}"),
            _ => assert_eq!(own, "panicked"),
        }
        for (result, before, after) in &outcomes {
            assert_eq!(before, after, "{fault}: {result:?}");
        }
    }
}

#[test]
fn gradients_on_some_ranks_only_are_refused_on_every_rank() {
    for (result, before, after) in
        fault_on_rank_1(Reduce::FinalPass, NonFinitePolicy::Error, "no gradient")
    {
        let error = result.unwrap_err();
        assert!(error.starts_with("RanksDisagree"), "{error}");
        assert_eq!(before, after);
    }
}

/// The in-process collective, counting the gradient values it averages.
struct Counted {
    inner: InProcess,
    values: Arc<AtomicU64>,
    calls: Arc<AtomicU64>,
}

impl<S: ParamStore> Collective<S> for Counted {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_and(&mut self, flags: &[bool]) -> amp::Result<Vec<bool>> {
        Collective::<S>::all_and(&mut self.inner, flags)
    }
    fn mean_grads(&mut self, store: &mut S, mask: &[bool]) -> amp::Result<()> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.values.fetch_add(
            mask.iter().filter(|&&m| m).count() as u64,
            Ordering::Relaxed,
        );
        self.inner.mean_grads(store, mask)
    }
}

#[test]
fn final_pass_reduces_once_per_step_every_pass_once_per_pass() {
    for (reduce, inner_iter, want) in [
        (Reduce::EveryPass, 1, 2),
        (Reduce::FinalPass, 1, 1),
        (Reduce::EveryPass, 2, 3),
        (Reduce::FinalPass, 2, 1),
    ] {
        let counts: Vec<(u64, u64)> = InProcess::group(2)
            .into_iter()
            .enumerate()
            .map(|(rank, inner)| {
                std::thread::spawn(move || {
                    let (values, calls) =
                        (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
                    let counted = Counted {
                        inner,
                        values: values.clone(),
                        calls: calls.clone(),
                    };
                    let amp = Amp::sgd(
                        store::<f64>(),
                        config(reduce, inner_iter),
                        SgdConfig::nesterov(0.9),
                    )
                    .unwrap();
                    let mut amp = amp.with_collective(Box::new(counted)).unwrap();
                    let rows = share(0, rank, 2);
                    for _ in 0..4 {
                        amp.step(|s: &mut NdStore<f64>, _| {
                            Ok::<_, AmpError>(((), least_squares(s, &rows)?))
                        })
                        .unwrap();
                    }
                    (
                        calls.load(Ordering::Relaxed),
                        values.load(Ordering::Relaxed),
                    )
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        for (calls, tensors) in counts {
            assert_eq!(calls, 4 * want, "{reduce:?} K {inner_iter}");
            assert_eq!(tensors, 2 * 4 * want);
        }
    }
}

#[test]
fn a_checkpoint_saved_by_rank_0_resumes_every_rank_bit_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rank0.safetensors");
    let saved = path.clone();
    // Ten steps uninterrupted; rank 0 saves after five.
    let uninterrupted = on_ranks(2, config(Reduce::FinalPass, 1), move |rank, amp| {
        for step in 0..10 {
            if step == 5 && rank == 0 {
                amp::checkpoint::save(amp, &saved).unwrap();
            }
            let rows = share(step, rank, 2);
            amp.step(|s: &mut NdStore<f32>, _| Ok::<_, AmpError>(((), least_squares(s, &rows)?)))
                .unwrap();
        }
        weights(amp)
    });
    // Fresh ranks load rank 0's checkpoint and take the last five steps.
    let resumed = on_ranks(2, config(Reduce::FinalPass, 1), move |rank, amp| {
        amp::checkpoint::load(amp, &path).unwrap();
        for step in 5..10 {
            let rows = share(step, rank, 2);
            amp.step(|s: &mut NdStore<f32>, _| Ok::<_, AmpError>(((), least_squares(s, &rows)?)))
                .unwrap();
        }
        weights(amp)
    });
    assert_eq!(uninterrupted, resumed);
    assert_eq!(resumed[0], resumed[1]);
}

#[test]
fn what_cannot_work_is_refused() {
    let mut group = InProcess::group(1);
    let subtract = config(Reduce::FinalPass, 1).restore(RestoreMode::Subtract);
    let amp = Amp::sgd(store::<f64>(), subtract, SgdConfig::nesterov(0.9)).unwrap();
    assert!(matches!(
        amp.with_collective(Box::new(group.remove(0))),
        Err(AmpError::InvalidConfig {
            field: "reduce",
            ..
        })
    ));
    // The split step is not data-parallel.
    let lone = |rank: InProcess| {
        Amp::sgd(
            store::<f64>(),
            config(Reduce::EveryPass, 1),
            SgdConfig::nesterov(0.9),
        )
        .unwrap()
        .with_collective(Box::new(rank))
        .unwrap()
    };
    let mut amp = lone(InProcess::group(1).remove(0));
    assert_eq!(amp.rank_and_world_size(), Some((0, 1)));
    assert!(matches!(
        amp.perturb(),
        Err(AmpError::InvalidConfig {
            field: "collective",
            ..
        })
    ));
    // A rank that waits for a peer that never comes gives up.
    let mut amp = lone(InProcess::group_with_timeout(2, Duration::from_millis(200)).remove(0));
    let before = weights(&amp);
    let rows = share(0, 0, 2);
    let error = amp
        .step(|s: &mut NdStore<f64>, _| Ok::<_, AmpError>(((), least_squares(s, &rows)?)))
        .unwrap_err();
    assert!(error.to_string().contains("waited"), "{error}");
    assert_eq!(weights(&amp), before);
}
