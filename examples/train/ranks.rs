//! Data-parallel runs of the main job: under `mpirun -np N` (with the
//! `mpi` feature) every process is one rank, trains the same network from
//! the same seed on its share of every batch, and joins its optimiser to
//! the others through `amp::distributed::mpi`; rank 0 prints the table.

use amp::{Amp, BaseOptimizer, BoxError, ParamStore};

/// What joins one rank's optimiser to the others.
#[cfg(feature = "mpi")]
pub type Link = amp::distributed::mpi::MpiCollective;
/// What joins one rank's optimiser to the others (none without `mpi`).
#[cfg(not(feature = "mpi"))]
pub type Link = std::convert::Infallible;

/// This process's place in the job.
pub struct Ranks {
    /// Keeps MPI initialised for the whole run (under an MPI launcher).
    #[cfg(feature = "mpi")]
    universe: Option<amp::distributed::mpi::mpi::environment::Universe>,
    /// This rank.
    pub rank: usize,
    /// The number of ranks.
    pub world: usize,
}

/// Whether an MPI launcher started this process (it sets the world size).
fn launched_by_mpirun() -> Option<String> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"]
        .iter()
        .find_map(|v| std::env::var(v).ok().map(|_| (*v).to_string()))
}

impl Ranks {
    /// The job this process belongs to: one rank of an MPI job when an MPI
    /// launcher started it, else a job of one.
    pub fn detect() -> Result<Ranks, BoxError> {
        let Some(_variable) = launched_by_mpirun() else {
            return Ok(Ranks::single());
        };
        #[cfg(feature = "mpi")]
        {
            use amp::distributed::mpi::mpi::traits::Communicator;
            let (universe, collective) = amp::distributed::mpi::initialize()?;
            let (rank, world) = (collective.rank(), universe.world().size() as usize);
            Ok(Ranks {
                universe: Some(universe),
                rank,
                world,
            })
        }
        #[cfg(not(feature = "mpi"))]
        Err(format!(
            "started by an MPI launcher ({_variable} is set), but this build has no MPI: \
             rebuild with `--features mpi`"
        )
        .into())
    }

    /// A job of one; MPI is left uninitialised.
    fn single() -> Ranks {
        Ranks {
            #[cfg(feature = "mpi")]
            universe: None,
            rank: 0,
            world: 1,
        }
    }

    /// A new link for one run's optimiser (`None` in a job of one).
    pub fn link(&self) -> Result<Option<Link>, BoxError> {
        if self.world == 1 {
            return Ok(None);
        }
        #[cfg(feature = "mpi")]
        if let Some(universe) = &self.universe {
            return Ok(Some(amp::distributed::mpi::MpiCollective::new(
                universe.world(),
            )?));
        }
        Ok(None)
    }

    /// This rank's rows of `batch`: a contiguous share, as even as the
    /// batch allows; a batch smaller than the job gives the ranks past its
    /// end one row each, taken from its start.
    pub fn share<'a>(&self, batch: &'a [usize]) -> &'a [usize] {
        let (n, world) = (batch.len(), self.world);
        let start = self.rank * n / world;
        let end = (self.rank + 1) * n / world;
        if start < end {
            &batch[start..end]
        } else {
            let i = self.rank % n.max(1);
            &batch[i..(i + 1).min(n)]
        }
    }
}

/// `amp`, joined to the other ranks through `link` when there is one.
pub fn join<S: ParamStore, O: BaseOptimizer<S>>(
    amp: Amp<S, O>,
    link: Option<Link>,
) -> Result<Amp<S, O>, BoxError> {
    match link {
        None => Ok(amp),
        #[cfg(feature = "mpi")]
        Some(link) => Ok(amp.with_collective(Box::new(link))?),
        #[cfg(not(feature = "mpi"))]
        Some(never) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranks(rank: usize, world: usize) -> Ranks {
        Ranks {
            #[cfg(feature = "mpi")]
            universe: None,
            rank,
            world,
        }
    }

    #[test]
    fn shares_cover_the_batch_once_and_are_never_empty() {
        let batch: Vec<usize> = (100..132).collect();
        for world in 1..=5 {
            let shares: Vec<&[usize]> = (0..world).map(|r| ranks(r, world).share(&batch)).collect();
            assert_eq!(shares.concat(), batch, "world {world}");
            let (min, max) = (
                shares.iter().map(|s| s.len()).min().unwrap(),
                shares.iter().map(|s| s.len()).max().unwrap(),
            );
            assert!(max - min <= 1, "world {world}: {min}..{max}");
        }
        // A batch smaller than the job: every rank still gets a row.
        let short = [7, 8];
        for r in 0..3 {
            assert_eq!(ranks(r, 3).share(&short).len(), 1);
        }
    }
}
