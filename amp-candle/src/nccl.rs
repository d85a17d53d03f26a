//! Data-parallel training on several GPUs: [`NcclCollective`], an amp
//! [`Collective`] over NVIDIA's NCCL (through candle's `nccl` support,
//! cudarc's bindings), one process — or one thread — per GPU.
//!
//! Every rank builds the same model from the same seed on its own GPU,
//! trains on its own share of each batch and hands its `Amp` a collective
//! made from one shared [`NcclId`]; the step then averages the gradients
//! across ranks as [`AmpConfig::reduce`](amp_core::AmpConfig::reduce) says
//! and agrees with the other ranks on every decision (see
//! [`amp_core::collective`]):
//!
//! ```no_run
//! use amp_candle::nccl::{NcclCollective, NcclId};
//! use amp_candle::CandleStore;
//! use amp_core::{Amp, AmpConfig, Reduce, SgdConfig};
//! # fn vars_on(_: &amp_candle::candle_core::Device) -> Vec<amp_candle::candle_core::Var> { vec![] }
//!
//! // Rank 0 makes the id and hands its bytes to the other ranks (through
//! // a file, an environment variable, MPI, ...).
//! let (rank, world_size) = (0, 2);
//! let id = NcclId::new()?;
//! let bytes = id.to_bytes();
//! // On every rank, with `bytes` from rank 0:
//! let id = NcclId::from_bytes(&bytes);
//! let device = amp_candle::cuda_device(rank)?;
//! let collective = NcclCollective::new(&device, rank, world_size, &id)?;
//! let store = CandleStore::from_vars(vars_on(&device))?;
//! let config = AmpConfig::new(0.1, 0.05).reduce(Reduce::EveryPass);
//! let mut amp = Amp::sgd(store, config, SgdConfig::nesterov(0.9))?
//!     .with_collective(Box::new(collective))?;
//! # Ok::<(), amp_core::AmpError>(())
//! ```
//!
//! ## How it moves data
//! Each gradient of the reduced tensors is all-reduced with NCCL's average
//! (`ncclAvg`) into a new tensor on the same CUDA stream as candle's
//! kernels, so nothing waits for the host; the rank's gradient is then that
//! tensor (the gradient handed over by the closure is not written). NCCL's
//! algorithms reduce each element once and hand the result to every rank,
//! so the ranks' gradients are the same bits, and so are their weights
//! after the step. Flags are agreed with one all-reduce (minimum) of bytes
//! on the device, read back to the host. Every dtype candle stores
//! parameters in (f16, bf16, f32, f64) is reduced in that dtype.
//!
//! ## The library
//! candle links NCCL's `libnccl.so.2` (as it links the CUDA libraries): a
//! binary built with this feature starts where that library is on the
//! library path — the `nvidia-nccl` wheels (a dependency of PyTorch's CUDA
//! wheels) or a system install. `scripts/gpu-bundle.sh` builds against a
//! stand-in for it, on which every NCCL call fails: [`NcclId::new`] is then
//! an [`AmpError::Backend`].
//!
//! ## Limits
//! A rank that dies leaves the others waiting inside NCCL: amp's agreement
//! on every decision keeps the ranks in step as long as they run, but NCCL
//! itself has no timeout here. One NCCL call is made per tensor.

use std::sync::Arc;
use std::time::Instant;

use amp_core::collective::CollectiveStats;
use amp_core::{AmpError, Collective, ParamStore, Result};
use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, ValidAsZeroBits};
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, NcclType, ReduceOp};
use candle_core::cuda_backend::CudaDType;
use candle_core::{bail, CpuStorage, CudaDevice, CudaStorage, CustomOp1, DType as CDType};
use candle_core::{Device, DeviceLocation, Layout, Shape, Tensor};

use crate::{backend, CandleStore};

/// The id every rank of one NCCL group is created from: made once (on rank
/// 0, [`NcclId::new`]) and passed to the other ranks as 128 bytes
/// ([`NcclId::to_bytes`], [`NcclId::from_bytes`]).
#[derive(Clone, Copy, Debug)]
pub struct NcclId(Id);

impl NcclId {
    /// A new id. Errors ([`AmpError::Backend`]): NCCL fails.
    pub fn new() -> Result<Self> {
        Id::new().map(NcclId).map_err(|error| {
            AmpError::backend(format!("NCCL cannot make a group id: {:?}", error.0))
        })
    }

    /// The id's 128 bytes, to hand to the other ranks.
    pub fn to_bytes(&self) -> [u8; 128] {
        self.0.internal().map(|c| c as u8)
    }

    /// The id whose bytes are `bytes` (from [`NcclId::to_bytes`] on rank 0).
    pub fn from_bytes(bytes: &[u8; 128]) -> Self {
        NcclId(Id::uninit(bytes.map(|b| b as std::ffi::c_char)))
    }
}

/// The communicator, movable to another thread: NCCL allows a
/// communicator to be used from any thread as long as two threads do not
/// use it at once, which `&mut self` on every [`Collective`] operation (and
/// this type not being `Sync`) guarantees.
struct SendComm(Comm);

// SAFETY: see above. `Comm` is a handle to the NCCL communicator and an
// `Arc` of a CUDA stream (itself `Send`); it is not `Send` only because the
// handle is a raw pointer. NCCL requires no thread affinity for it.
unsafe impl Send for SendComm {}

/// A rank of an NCCL group on one GPU, as an amp [`Collective`] for
/// [`CandleStore`]s on that GPU. See the [module docs](self).
pub struct NcclCollective {
    comm: SendComm,
    device: CudaDevice,
    ordinal: usize,
    rank: usize,
    world_size: usize,
    stats: Arc<CollectiveStats>,
}

impl std::fmt::Debug for NcclCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NcclCollective(rank {} of {}, cuda:{})",
            self.rank, self.world_size, self.ordinal
        )
    }
}

impl NcclCollective {
    /// Rank `rank` of a group of `world_size` made from `id`, on `device`
    /// (a CUDA device; one rank per GPU: NCCL refuses two ranks on one).
    /// Blocks until every rank of the group has called it.
    ///
    /// Errors ([`AmpError::Backend`]): `device` is not a CUDA device, `rank`
    /// is not below `world_size`, or NCCL refuses.
    pub fn new(device: &Device, rank: usize, world_size: usize, id: &NcclId) -> Result<Self> {
        let Device::Cuda(cuda) = device else {
            return Err(AmpError::backend(format!(
                "NCCL needs a CUDA device, got {:?}",
                device.location()
            )));
        };
        if rank >= world_size {
            return Err(AmpError::backend(format!(
                "rank {rank} is not below the world size {world_size}"
            )));
        }
        let stream = cuda.cuda_stream();
        let ordinal = stream.context().ordinal();
        let comm = Comm::from_rank(stream, rank, world_size, id.0).map_err(|error| {
            AmpError::backend(format!(
                "NCCL refused rank {rank} of {world_size} on cuda:{ordinal}: {:?}",
                error.0
            ))
        })?;
        Ok(NcclCollective {
            comm: SendComm(comm),
            device: cuda.clone(),
            ordinal,
            rank,
            world_size,
            stats: Arc::default(),
        })
    }

    /// What this collective has done so far, readable after it is handed
    /// to an `Amp`. Reduction times cover enqueuing the all-reduces on the
    /// stream (they run asynchronously); agreement times include waiting
    /// for the result on the host.
    pub fn stats(&self) -> Arc<CollectiveStats> {
        Arc::clone(&self.stats)
    }

    /// The NCCL communicator (cudarc's), for collectives of your own on
    /// the same group.
    pub fn comm(&self) -> &Comm {
        &self.comm.0
    }

    /// `tensor` all-reduced over the ranks with `op`, as a new tensor.
    fn all_reduce(&self, tensor: &Tensor, op: Op) -> candle_core::Result<Tensor> {
        tensor.apply_op1_no_bwd(&AllReduce {
            comm: &self.comm.0,
            op,
        })
    }
}

impl Drop for NcclCollective {
    /// Waits for the work queued on the stream, the all-reduces included,
    /// before the communicator is torn down (cudarc aborts it, which would
    /// cut short a reduction still in flight).
    fn drop(&mut self) {
        let _ = self.device.synchronize();
    }
}

impl Collective<CandleStore> for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_and(&mut self, flags: &[bool]) -> Result<Vec<bool>> {
        // Every rank passes as many flags (the step's own calls do), so
        // every rank skips an empty exchange alike.
        if flags.is_empty() {
            return Ok(Vec::new());
        }
        let start = Instant::now();
        let device = Device::Cuda(self.device.clone());
        let mine: Vec<u8> = flags.iter().map(|&f| u8::from(f)).collect();
        let all = Tensor::from_vec(mine, flags.len(), &device)
            .and_then(|t| self.all_reduce(&t, Op::Min))
            .and_then(|t| t.to_vec1::<u8>())
            .map_err(backend)?;
        self.stats.record_agreement(start);
        Ok(all.into_iter().map(|v| v != 0).collect())
    }

    fn mean_grads(&mut self, store: &mut CandleStore, mask: &[bool]) -> Result<()> {
        amp_core::check_len("mask", store.num_tensors(), mask.len())?;
        let here = DeviceLocation::Cuda {
            gpu_id: self.ordinal,
        };
        if store.num_tensors() > 0 && store.device().location() != here {
            return Err(AmpError::DeviceMismatch {
                index: 0,
                expected: format!("{here:?} (the collective's GPU)"),
                found: format!("{:?}", store.device().location()),
            });
        }
        let start = Instant::now();
        let mut bytes = 0u64;
        let mut reduced = Vec::new();
        for index in (0..mask.len()).filter(|&i| mask[i]) {
            let grad = match store.grad(index) {
                Some(grad) => grad.clone(),
                None => {
                    let var = store.var(index)?;
                    Tensor::zeros(var.shape(), store.candle_dtype(), store.device())
                        .map_err(backend)?
                }
            };
            // Every rank has the same shapes: an empty tensor is skipped
            // on all of them.
            if grad.elem_count() == 0 {
                continue;
            }
            bytes += (grad.elem_count() * grad.dtype().size_in_bytes()) as u64;
            reduced.push((index, self.all_reduce(&grad, Op::Avg).map_err(backend)?));
        }
        for (index, grad) in reduced {
            store.set_grad(index, &grad)?;
        }
        self.stats.record_reduction(start, bytes);
        Ok(())
    }
}

/// The reduction of an [`AllReduce`].
#[derive(Clone, Copy, Debug)]
enum Op {
    /// The mean over the ranks (`ncclAvg`).
    Avg,
    /// The minimum over the ranks.
    Min,
}

/// An all-reduce as a candle operation on CUDA tensors: the result is a new
/// tensor, on the communicator's stream.
struct AllReduce<'a> {
    comm: &'a Comm,
    op: Op,
}

impl AllReduce<'_> {
    fn run<T>(
        &self,
        storage: &CudaStorage,
        start: usize,
        end: usize,
    ) -> candle_core::Result<CudaStorage>
    where
        T: CudaDType + NcclType + DeviceRepr + ValidAsZeroBits,
    {
        let device = storage.device.clone();
        let src = storage.as_cuda_slice::<T>()?.slice(start..end);
        let mut dst = device.alloc_zeros::<T>(end - start)?;
        let op = match self.op {
            Op::Avg => ReduceOp::Avg,
            Op::Min => ReduceOp::Min,
        };
        if let Err(error) = self.comm.all_reduce(&src, &mut dst, &op) {
            bail!("NCCL all-reduce failed: {:?}", error.0);
        }
        Ok(CudaStorage::wrap_cuda_slice(dst, device))
    }
}

impl CustomOp1 for AllReduce<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        bail!("NCCL reduces CUDA tensors only")
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("NCCL reduces contiguous tensors only");
        };
        let out = match storage.dtype() {
            CDType::U8 => self.run::<u8>(storage, start, end)?,
            CDType::F16 => self.run::<half::f16>(storage, start, end)?,
            CDType::BF16 => self.run::<half::bf16>(storage, start, end)?,
            CDType::F32 => self.run::<f32>(storage, start, end)?,
            CDType::F64 => self.run::<f64>(storage, start, end)?,
            other => bail!("NCCL reduction of {other:?} tensors is not supported"),
        };
        Ok((out, layout.shape().clone()))
    }
}
