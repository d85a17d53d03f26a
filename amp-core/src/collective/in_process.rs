//! [`InProcess`]: ranks that are threads of one process, the reference the
//! other transports are checked against.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::{grads_to_host, host_to_grads, mean_in_rank_order, Collective};
use crate::error::{AmpError, Result};
use crate::store::ParamStore;

/// What the ranks of an [`InProcess`] group share.
#[derive(Debug)]
struct Rendezvous {
    state: Mutex<Round>,
    arrived: Condvar,
    timeout: Duration,
}

#[derive(Debug)]
struct Round {
    generation: u64,
    slots: Vec<Option<Vec<f64>>>,
    count: usize,
    result: Arc<Vec<Vec<f64>>>,
    /// Set when a rank gave up waiting: every later call fails at once.
    broken: Option<String>,
}

/// One rank of a group of ranks that are threads of one process: the
/// in-process [`Collective`]. Data goes through host memory (each rank reads
/// its gradients to the host with [`ParamStore::read`]), so it works over
/// any store; it is the reference the other transports are tested against,
/// and what a test uses to run N ranks without a launcher.
///
/// Two ranks, each a thread with its own copy of the weights and its own
/// data, train L(θ) = ½‖θ − c_r‖² (rank r's target c_r): the averaged
/// gradient is that of the mean target, and the ranks' weights stay the
/// same bit for bit.
/// ```
/// use amp_core::{Amp, AmpConfig, InProcess, Reduce, SgdConfig};
/// # use amp_core::{DType, Result, TensorOps, TensorStore};
/// # struct Host;
/// # impl TensorOps for Host {
/// #     type Tensor = Vec<f64>;
/// #     type Scalar = f64;
/// #     fn dtype(&self) -> DType { DType::F64 }
/// #     fn shape(&self, t: &Vec<f64>) -> Vec<usize> { vec![t.len()] }
/// #     fn scale(&self, t: &Vec<f64>, f: f64) -> Result<Vec<f64>> { Ok(t.iter().map(|x| f * x).collect()) }
/// #     fn axpy(&self, y: &Vec<f64>, a: f64, x: &Vec<f64>) -> Result<Vec<f64>> {
/// #         Ok(y.iter().zip(x).map(|(y, x)| y + a * x).collect())
/// #     }
/// #     fn sum_of_squares(&self, t: &Vec<f64>) -> Result<f64> { Ok(t.iter().map(|x| x * x).sum()) }
/// #     fn to_host(&self, t: &Vec<f64>) -> Result<Vec<f64>> { Ok(t.clone()) }
/// #     fn tensor_like(&self, d: &[f64], _: &Vec<f64>) -> Result<Vec<f64>> { Ok(d.to_vec()) }
/// # }
/// let threads: Vec<_> = InProcess::group(2)
///     .into_iter()
///     .map(|rank| {
///         std::thread::spawn(move || -> amp_core::Result<Vec<f64>> {
///             let target = if rank.rank() == 0 { [1.0, 2.0] } else { [3.0, -2.0] };
///             let store = TensorStore::new(Host, vec![vec![0.0, 0.0]]);
///             let config = AmpConfig::new(0.5, 0.1).reduce(Reduce::EveryPass);
///             let mut amp =
///                 Amp::sgd(store, config, SgdConfig::default())?.with_collective(Box::new(rank))?;
///             for _ in 0..40 {
///                 amp.step(|s: &mut TensorStore<Host>, _pass| {
///                     let theta = s.params()[0].clone();
///                     let g: Vec<f64> = theta.iter().zip(target).map(|(t, c)| t - c).collect();
///                     let loss = 0.5 * g.iter().map(|x| x * x).sum::<f64>();
///                     s.set_grad(0, g)?;
///                     Ok::<_, amp_core::AmpError>(((), loss))
///                 })?;
///             }
///             Ok(amp.store().params()[0].clone())
///         })
///     })
///     .collect();
/// let theta: Vec<Vec<f64>> = threads.into_iter().map(|t| t.join().unwrap()).collect::<Result<_>>()?;
/// assert_eq!(theta[0], theta[1]); // bit for bit
/// assert!((theta[0][0] - 2.0).abs() < 1e-6 && theta[0][1].abs() < 1e-6); // the mean target
/// # Ok::<(), amp_core::AmpError>(())
/// ```
#[derive(Debug, Clone)]
pub struct InProcess {
    rank: usize,
    world_size: usize,
    shared: Arc<Rendezvous>,
    /// Gradient values this rank has sent through `mean_grads`.
    reduced_values: u64,
}

impl InProcess {
    /// How long a rank waits for the others by default before it gives up
    /// (and breaks the group): 60 s.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

    /// The `world_size` ranks of a new group, rank `r` at index `r`; hand
    /// one to each thread. A group of 0 ranks is empty.
    pub fn group(world_size: usize) -> Vec<InProcess> {
        Self::group_with_timeout(world_size, Self::DEFAULT_TIMEOUT)
    }

    /// [`InProcess::group`] whose ranks wait at most `timeout` for each
    /// other in any one operation.
    pub fn group_with_timeout(world_size: usize, timeout: Duration) -> Vec<InProcess> {
        let shared = Arc::new(Rendezvous {
            state: Mutex::new(Round {
                generation: 0,
                slots: vec![None; world_size],
                count: 0,
                result: Arc::new(Vec::new()),
                broken: None,
            }),
            arrived: Condvar::new(),
            timeout,
        });
        (0..world_size)
            .map(|rank| InProcess {
                rank,
                world_size,
                shared: Arc::clone(&shared),
                reduced_values: 0,
            })
            .collect()
    }

    /// This rank, in `0..world_size()`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks in the group.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// Gradient values (elements) this rank has averaged with the others
    /// so far: the traffic of its reductions, in elements.
    pub fn reduced_values(&self) -> u64 {
        self.reduced_values
    }

    /// Every rank's `data`, in rank order, once all have sent theirs.
    fn exchange(&self, data: Vec<f64>) -> Result<Arc<Vec<Vec<f64>>>> {
        let shared = &*self.shared;
        let mut round = shared
            .state
            .lock()
            .map_err(|_| AmpError::backend("in-process group: a rank panicked"))?;
        if let Some(reason) = &round.broken {
            return Err(AmpError::backend(format!(
                "in-process group broken: {reason}"
            )));
        }
        let generation = round.generation;
        round.slots[self.rank] = Some(data);
        round.count += 1;
        if round.count == self.world_size {
            let parts = round.slots.iter_mut().map(|s| s.take().unwrap_or_default());
            round.result = Arc::new(parts.collect());
            round.count = 0;
            round.generation += 1;
            shared.arrived.notify_all();
            return Ok(Arc::clone(&round.result));
        }
        let deadline = Instant::now() + shared.timeout;
        while round.generation == generation {
            if let Some(reason) = &round.broken {
                return Err(AmpError::backend(format!(
                    "in-process group broken: {reason}"
                )));
            }
            let now = Instant::now();
            if now >= deadline {
                let reason = format!(
                    "rank {} waited {:?} for the other ranks",
                    self.rank, shared.timeout
                );
                round.broken = Some(reason.clone());
                shared.arrived.notify_all();
                return Err(AmpError::backend(format!("in-process group: {reason}")));
            }
            round = shared
                .arrived
                .wait_timeout(round, deadline - now)
                .map_err(|_| AmpError::backend("in-process group: a rank panicked"))?
                .0;
        }
        Ok(Arc::clone(&round.result))
    }
}

impl<S: ParamStore> Collective<S> for InProcess {
    fn rank(&self) -> usize {
        InProcess::rank(self)
    }

    fn world_size(&self) -> usize {
        InProcess::world_size(self)
    }

    fn all_and(&mut self, flags: &[bool]) -> Result<Vec<bool>> {
        let mine = flags.iter().map(|&f| if f { 1.0 } else { 0.0 }).collect();
        let all = self.exchange(mine)?;
        if all.iter().any(|part| part.len() != flags.len()) {
            return Err(AmpError::contract(
                "all_and: ranks passed different numbers of flags",
            ));
        }
        Ok((0..flags.len())
            .map(|i| all.iter().all(|part| part[i] != 0.0))
            .collect())
    }

    fn mean_grads(&mut self, store: &mut S, mask: &[bool]) -> Result<()> {
        let mine = grads_to_host(store, mask)?;
        let count = mine.len();
        let all = self.exchange(mine)?;
        if all.iter().any(|part| part.len() != count) {
            return Err(AmpError::contract(
                "mean_grads: ranks sent gradients of different sizes",
            ));
        }
        self.reduced_values += count as u64;
        host_to_grads(store, mask, &mean_in_rank_order(&all))
    }
}
