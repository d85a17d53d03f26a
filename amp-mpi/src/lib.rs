//! # amp-mpi
//!
//! Data-parallel training with [`amp_core::Amp`] across the processes of an
//! MPI job (CPU clusters): [`MpiCollective`] implements
//! [`Collective`] over an MPI communicator, through
//! the `mpi` crate (rsmpi) and the system's MPI library (Open MPI from
//! Debian's `libopenmpi-dev`, or MPICH). AMP here is *adversarial model
//! perturbation* (Zheng, Zhang & Mao, CVPR 2021), a regulariser that trains
//! toward flat minima — not automatic mixed precision.
//!
//! Every rank builds the same model from the same seed, trains on its own
//! share of each batch, and hands its `Amp` the collective; the step then
//! averages gradients across ranks as
//! [`AmpConfig::reduce`](amp_core::AmpConfig::reduce) says and agrees with
//! the other ranks on every decision, so the ranks' weights stay
//! bit-identical (see [`amp_core::collective`]):
//!
//! ```no_run
//! use amp_core::{Amp, AmpConfig, AmpError, Reduce, SgdConfig};
//! use amp_ndarray::NdStore;
//!
//! // Run with `mpirun -np 4 ./my-trainer`.
//! let (_universe, collective) = amp_mpi::initialize()?;
//! let rank = collective.rank();
//! let store = NdStore::from_arrays([ndarray::arr1(&[0.0f32, 0.0])]);
//! let config = AmpConfig::new(0.1, 0.05).reduce(Reduce::EveryPass);
//! let mut amp = Amp::sgd(store, config, SgdConfig::nesterov(0.9))?
//!     .with_collective(Box::new(collective))?;
//! let target = [rank as f32, 1.0];
//! for _ in 0..100 {
//!     amp.step(|s: &mut NdStore<f32>, _pass| {
//!         let g = &s.params()[0] - &ndarray::arr1(&target).into_dyn();
//!         let loss = 0.5 * g.iter().map(|x| x * x).sum::<f32>() as f64;
//!         s.grad_mut(0)?.assign(&g);
//!         Ok::<_, AmpError>(((), loss))
//!     })?;
//! }
//! # Ok::<(), AmpError>(())
//! ```
//!
//! ## How it moves data
//! Gradients are read to the host ([`amp_core::collective::grads_to_host`])
//! and exchanged with one `MPI_Allgather` per reduction, in `f32` for
//! stores of 32 bits or fewer per element (exact: their values are `f32`
//! values) and in `f64` otherwise; every rank then sums the ranks'
//! contributions in rank order and divides, so every rank gets the same
//! bits — the same bits as [`InProcess`](amp_core::InProcess), the
//! in-process reference — whatever algorithm the MPI library uses. Each
//! rank receives (N − 1) × the gradient's size per reduction (an
//! all-reduce's traffic at N = 2). Flags are agreed with one
//! `MPI_Allreduce` (minimum) of bytes.
//!
//! ## Threads
//! `Amp` requires its collective to be `Send`. [`MpiCollective::new`]
//! therefore requires MPI to run at `MPI_THREAD_MULTIPLE`
//! ([`initialize`] asks for it), under which MPI may be called from any
//! thread at any time; a library initialised at a lower level is refused.
#![warn(missing_docs)]

use std::sync::Arc;
use std::time::Instant;

pub use amp_core::collective::CollectiveStats;
use amp_core::collective::{grads_to_host, host_to_grads, mean_in_rank_order};
use amp_core::{AmpError, Collective, ParamStore, Result};
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator, CommunicatorCollectives};
use mpi::Threading;

/// The `mpi` crate this adapter is built on (rsmpi 0.8), for the
/// communicator types its public signatures use.
pub use mpi;

/// Initialises MPI at `MPI_THREAD_MULTIPLE` and returns the universe (keep
/// it alive until training ends: dropping it finalises MPI) and a
/// collective over the world communicator.
///
/// Errors ([`AmpError::Backend`]): MPI already initialised, or the library
/// does not provide `MPI_THREAD_MULTIPLE`.
pub fn initialize() -> Result<(Universe, MpiCollective)> {
    let (universe, provided) = mpi::initialize_with_threading(Threading::Multiple)
        .ok_or_else(|| AmpError::backend("MPI was already initialised"))?;
    if provided != Threading::Multiple {
        return Err(AmpError::backend(format!(
            "the MPI library provides {provided:?} threading, MpiCollective needs Multiple"
        )));
    }
    let collective = MpiCollective::new(universe.world())?;
    Ok((universe, collective))
}

/// The world, or any other communicator, as an amp
/// [`Collective`]: one rank per process.
#[derive(Debug)]
pub struct MpiCollective {
    comm: Comm,
    rank: usize,
    world_size: usize,
    stats: Arc<CollectiveStats>,
}

/// The communicator, movable to another thread: sound because
/// [`MpiCollective::new`] only accepts one when MPI runs at
/// `MPI_THREAD_MULTIPLE`, where any thread may call MPI at any time.
struct Comm(SimpleCommunicator);

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Comm(rank {} of {})", self.0.rank(), self.0.size())
    }
}

// SAFETY: MPI_THREAD_MULTIPLE (checked in `MpiCollective::new` before a
// `Comm` exists) allows calls on a communicator from any thread, and the
// handle itself is plain data.
unsafe impl Send for Comm {}

impl MpiCollective {
    /// A collective over `comm`.
    ///
    /// Errors ([`AmpError::Backend`]): MPI not running at
    /// `MPI_THREAD_MULTIPLE` (initialise with [`initialize`], or with
    /// `mpi::initialize_with_threading(Threading::Multiple)`).
    pub fn new(comm: SimpleCommunicator) -> Result<Self> {
        let level = mpi::environment::threading_support();
        if level != Threading::Multiple {
            return Err(AmpError::backend(format!(
                "MPI runs at {level:?} threading; MpiCollective needs Multiple"
            )));
        }
        let rank = usize::try_from(comm.rank()).map_err(AmpError::backend)?;
        let world_size = usize::try_from(comm.size()).map_err(AmpError::backend)?;
        Ok(MpiCollective {
            comm: Comm(comm),
            rank,
            world_size,
            stats: Arc::default(),
        })
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// What this collective has done so far, as a handle that stays
    /// readable after the collective is handed to an `Amp`.
    pub fn stats(&self) -> Arc<CollectiveStats> {
        Arc::clone(&self.stats)
    }

    /// The communicator.
    pub fn communicator(&self) -> &SimpleCommunicator {
        &self.comm.0
    }

    /// Every rank's `mine` (all equally long), in rank order.
    fn gather<T: mpi::datatype::Equivalence + Copy + Default>(&self, mine: &[T]) -> Vec<Vec<T>> {
        let mut all = vec![T::default(); mine.len() * self.world_size];
        self.comm.0.all_gather_into(mine, &mut all[..]);
        all.chunks(mine.len().max(1))
            .take(self.world_size)
            .map(<[T]>::to_vec)
            .collect()
    }
}

impl<S: ParamStore> Collective<S> for MpiCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_and(&mut self, flags: &[bool]) -> Result<Vec<bool>> {
        // Every rank passes as many flags: the step's own calls do.
        let start = Instant::now();
        let mine: Vec<u8> = flags.iter().map(|&f| u8::from(f)).collect();
        let mut all = vec![0u8; mine.len()];
        self.comm
            .0
            .all_reduce_into(&mine[..], &mut all[..], SystemOperation::min());
        self.stats.record_agreement(start);
        Ok(all.into_iter().map(|v| v != 0).collect())
    }

    fn mean_grads(&mut self, store: &mut S, mask: &[bool]) -> Result<()> {
        let start = Instant::now();
        let mine = grads_to_host(store, mask)?;
        let (parts, bytes): (Vec<Vec<f64>>, usize) = if store.dtype().size_in_bytes() <= 4 {
            let narrow: Vec<f32> = mine.iter().map(|&v| v as f32).collect();
            let parts = self.gather(&narrow);
            let wide = parts
                .into_iter()
                .map(|p| p.into_iter().map(f64::from).collect());
            (wide.collect(), 4 * narrow.len())
        } else {
            (self.gather(&mine), 8 * mine.len())
        };
        let written = if mine.is_empty() {
            Ok(())
        } else {
            host_to_grads(store, mask, &mean_in_rank_order(&parts))
        };
        self.stats.record_reduction(start, bytes as u64);
        written
    }
}
