//! Checkpoints: save the complete state of an [`Amp`] optimiser and resume it
//! bit for bit, on any backend.
//!
//! A checkpoint holds everything a resumed run needs:
//! - the model parameters ([`Slot::Params`]), each in the store's own dtype;
//! - the base optimiser's state from [`BaseOptimizer::save_state`]
//!   (for [`Sgd`](crate::Sgd), the momentum buffers — which Python SAM
//!   wrappers lose on save);
//! - the step counters ([`Amp::steps`], [`Amp::skipped_steps`]);
//! - the [`AmpConfig`] the optimiser was built with, every parameter group as
//!   resolved against the store (tensors, ε, ζ, weight decay) and each group's
//!   *current* learning rate (as last set by a schedule).
//!
//! The functions are generic over any [`ParamStore`] and [`BaseOptimizer`], so
//! every backend gets checkpoints without code of its own.
//!
//! # Resuming
//! Build the optimiser exactly as the first run did, then [`load`]. `n` steps
//! in one process and `k` steps, save, load into a fresh [`Amp`], `n − k`
//! steps give the same weights and state bit for bit (when the closure is
//! deterministic and the dtype is unchanged).
//!
//! ```
//! use amp::{checkpoint, Amp, AmpConfig, AmpError, SgdConfig};
//! use amp::backend::ndarray::NdStore;
//! use ndarray::array;
//!
//! // Minimise ½‖θ‖², whose gradient is θ.
//! fn step(amp: &mut Amp<NdStore<f32>>) -> Result<(), AmpError> {
//!     amp.step(|s: &mut NdStore<f32>, _pass| {
//!         let theta = s.params()[0].clone();
//!         s.set_grad(0, theta)?;
//!         Ok::<_, AmpError>(((), 0.0))
//!     })?;
//!     Ok(())
//! }
//! let build = || {
//!     let store = NdStore::from_arrays([array![3.0f32, -4.0].into_dyn()]);
//!     Amp::sgd(store, AmpConfig::default().lr(0.1), SgdConfig::nesterov(0.9))
//! };
//!
//! let dir = tempfile::tempdir().map_err(AmpError::backend)?;
//! let path = dir.path().join("amp.safetensors");
//! let mut first = build()?;
//! for _ in 0..3 { step(&mut first)?; }
//! checkpoint::save(&first, &path)?;
//! for _ in 0..2 { step(&mut first)?; }
//!
//! let mut resumed = build()?;
//! checkpoint::load(&mut resumed, &path)?;
//! assert_eq!(resumed.steps(), 3);
//! for _ in 0..2 { step(&mut resumed)?; }
//! assert_eq!(resumed.store().params(), first.store().params()); // bit for bit
//! # Ok::<(), AmpError>(())
//! ```
//!
//! # Format (version 1)
//! A [safetensors](https://huggingface.co/docs/safetensors) file, readable by
//! any safetensors reader:
//! - `param.{i}`: parameter `i`;
//! - `optimizer.{b}.{i}`: tensor `i` of the base optimiser's state buffer `b`
//!   (absent where the optimiser has no state for that tensor yet);
//! - `optimizer_scalars.{s}`: the base optimiser's host-side values `s`, as a
//!   1-d `F64` tensor;
//! - metadata key `amp_checkpoint` ([`METADATA_KEY`]): a JSON object with
//!   `format_version` ([`FORMAT_VERSION`]), the dtype and shapes of the
//!   store, the step counters, the configuration, the resolved groups and the
//!   names of the optimiser's buffers and values. Floating-point values are
//!   written as strings (Rust's shortest round-trip form, such as `"0.1"`) so
//!   that they read back bit for bit.
//!
//! Tensors are stored in their own dtype (`f16` as `F16`, `bf16` as `BF16`,
//! `f32` as `F32`, `f64` as `F64`), so a resume is bit-exact. The same state
//! always serialises to the same bytes.
//!
//! # Dtype conversion rules
//! A checkpoint written by one backend loads into any other whose tensors have
//! the same count and shapes. When a tensor's dtype in the checkpoint differs
//! from the store's, [`LoadOptions::dtype`] decides:
//!
//! | [`DTypeConversion`] | accepted | values |
//! |---|---|---|
//! | `Exact` | same dtype only | bit-exact |
//! | `Lossless` (default) | same dtype, or widening: `f16`/`bf16` → `f32`/`f64`, `f32` → `f64` | exact |
//! | `Rounding` | any pair | rounded to nearest, ties to even; a finite value that would overflow to ±∞ is an error |
//!
//! A conversion that is not accepted is an [`AmpError::DTypeMismatch`] naming
//! the tensor. Note `f16` ↔ `bf16` is narrowing both ways (each has values the
//! other lacks).
//!
//! # Validation
//! Loading validates everything before it writes anything: a file that is
//! truncated or corrupted, of another format version, or that does not match
//! the store or the optimiser returns a typed error and leaves the optimiser
//! as it was:
//! - [`AmpError::CountMismatch`]: another number of tensors;
//! - [`AmpError::ShapeMismatch`]: a tensor of another shape;
//! - [`AmpError::DTypeMismatch`]: a dtype change the [`DTypeConversion`] refuses;
//! - [`AmpError::Checkpoint`]: anything else (unreadable file, bad
//!   header or metadata, unsupported version, missing or unexpected tensor,
//!   configuration mismatch, state the base optimiser refuses).
//!
//! The configuration must match where it changes the numbers a step
//! computes: the groups' tensors, and — unless
//! [`LoadOptions::keep_hyperparameters`] is set — each group's ε, ζ and weight
//! decay, `inner_iter` and `restore`. The learning rates are state, not
//! configuration: they are restored from the checkpoint. `non_finite` is not
//! compared (it changes nothing on a finite step).
//!
//! Should writing fail part-way (a backend error, as every value was checked
//! beforehand), the parameters are copied back from a device-side backup, so
//! the optimiser is still as it was.
//!
//! # Atomic saves
//! [`save`] writes to a temporary file in the target's directory, flushes it
//! to disk (`fsync`), then renames it over the target, and finally flushes the
//! directory. A crash mid-save leaves the previous checkpoint intact (and at
//! worst a stray `.{name}.tmp-*` file).

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use safetensors::tensor::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};

use crate::{
    Amp, AmpConfig, AmpError, BaseOptimizer, DType, HostTensor, NonFinitePolicy, OptimizerState,
    ParamGroup, ParamStore, RestoreMode, Result, Slot,
};

/// The version of the checkpoint format this build writes and reads.
///
/// ```
/// assert_eq!(amp::checkpoint::FORMAT_VERSION, 1);
/// ```
pub const FORMAT_VERSION: u32 = 1;

/// The key of the safetensors metadata map that holds the checkpoint's JSON
/// metadata.
///
/// ```
/// use amp::{checkpoint, Amp, AmpConfig, SgdConfig};
/// use amp::backend::ndarray::NdStore;
///
/// let amp = Amp::sgd(NdStore::from_arrays([ndarray::arr1(&[1.0f64])]),
///                    AmpConfig::default(), SgdConfig::default())?;
/// let bytes = checkpoint::to_bytes(&amp)?;
/// // Any safetensors reader sees the metadata under this key.
/// let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
/// let json = &header.metadata().as_ref().unwrap()[checkpoint::METADATA_KEY];
/// assert!(json.contains("\"format_version\":1"));
/// # Ok::<(), amp::AmpError>(())
/// ```
pub const METADATA_KEY: &str = "amp_checkpoint";

/// Which dtype changes [`load_with`] accepts; see the
/// [module docs](self#dtype-conversion-rules).
///
/// ```
/// use amp::checkpoint::{DTypeConversion, LoadOptions};
///
/// assert_eq!(LoadOptions::default().dtype, DTypeConversion::Lossless);
/// let lenient = LoadOptions::default().dtype(DTypeConversion::Rounding);
/// assert_eq!(lenient.dtype, DTypeConversion::Rounding);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DTypeConversion {
    /// Every tensor must have the store's dtype.
    Exact,
    /// The store's dtype, or one that holds every value of the checkpoint's
    /// exactly (`f16`/`bf16` → `f32`/`f64`, `f32` → `f64`). The default.
    #[default]
    Lossless,
    /// Any dtype; values are rounded to nearest, ties to even. A finite value
    /// too large for the store's dtype is an error rather than an infinity.
    Rounding,
}

impl DTypeConversion {
    /// Whether a tensor stored as `from` may be loaded into a store of `to`.
    ///
    /// ```
    /// use amp::DType;
    /// use amp::checkpoint::DTypeConversion;
    ///
    /// assert!(DTypeConversion::Lossless.accepts(DType::F32, DType::F64));
    /// assert!(!DTypeConversion::Lossless.accepts(DType::F64, DType::F32));
    /// assert!(!DTypeConversion::Lossless.accepts(DType::F16, DType::BF16));
    /// assert!(DTypeConversion::Rounding.accepts(DType::F64, DType::F16));
    /// assert!(!DTypeConversion::Exact.accepts(DType::BF16, DType::F32));
    /// ```
    pub fn accepts(self, from: DType, to: DType) -> bool {
        match self {
            DTypeConversion::Exact => from == to,
            DTypeConversion::Lossless => {
                from == to
                    || matches!(
                        (from, to),
                        (DType::F16 | DType::BF16, DType::F32 | DType::F64)
                            | (DType::F32, DType::F64)
                    )
            }
            DTypeConversion::Rounding => true,
        }
    }
}

/// How [`load_with`] treats differences between the checkpoint and the
/// optimiser it is loaded into. The default is strict.
///
/// ```
/// use amp::checkpoint::{DTypeConversion, LoadOptions};
///
/// let options = LoadOptions::default()
///     .dtype(DTypeConversion::Exact)
///     .keep_hyperparameters(true);
/// assert!(options.keep_hyperparameters);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LoadOptions {
    /// Which dtype changes are accepted. Default
    /// [`DTypeConversion::Lossless`].
    pub dtype: DTypeConversion,
    /// `true` accepts a checkpoint whose ε, ζ, weight decay, `inner_iter` or
    /// `restore` differ from the optimiser's, and keeps the optimiser's (to
    /// resume with new hyper-parameters on purpose). The groups' tensors must
    /// still match, and the learning rates are still restored. Default
    /// `false`: a difference is an [`AmpError::Checkpoint`].
    pub keep_hyperparameters: bool,
}

impl LoadOptions {
    /// Sets [`LoadOptions::dtype`].
    pub fn dtype(mut self, dtype: DTypeConversion) -> Self {
        self.dtype = dtype;
        self
    }

    /// Sets [`LoadOptions::keep_hyperparameters`].
    pub fn keep_hyperparameters(mut self, keep: bool) -> Self {
        self.keep_hyperparameters = keep;
        self
    }
}

/// What a checkpoint holds, read by [`inspect`] without a store.
///
/// ```
/// use amp::{checkpoint, Amp, AmpConfig, DType, SgdConfig};
/// use amp::backend::ndarray::NdStore;
///
/// let store = NdStore::from_arrays([ndarray::Array2::<f32>::zeros((3, 2))]);
/// let mut amp = Amp::sgd(store, AmpConfig::default().epsilon(0.25), SgdConfig::nesterov(0.9))?;
/// amp.set_lr(0.01)?;
/// let info = checkpoint::inspect(&checkpoint::to_bytes(&amp)?)?;
/// assert_eq!(info.dtype, DType::F32);
/// assert_eq!(info.shapes, vec![vec![3, 2]]);
/// assert_eq!(info.steps, 0);
/// assert_eq!(info.config.epsilon, 0.25);
/// assert_eq!(info.group_lr, vec![0.01]);
/// # Ok::<(), amp::AmpError>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct CheckpointInfo {
    /// The format version of the file.
    pub format_version: u32,
    /// The dtype of the store that wrote it.
    pub dtype: DType,
    /// The shape of each parameter.
    pub shapes: Vec<Vec<usize>>,
    /// [`Amp::steps`] at save time.
    pub steps: u64,
    /// [`Amp::skipped_steps`] at save time.
    pub skipped_steps: u64,
    /// The configuration the optimiser was built with, enough to build the
    /// same optimiser again.
    pub config: AmpConfig,
    /// The learning rate of each parameter group at save time.
    pub group_lr: Vec<f64>,
    /// The names of the base optimiser's state buffers.
    pub optimizer_buffers: Vec<String>,
}

/// Serialises the complete state of `amp` to checkpoint bytes (see the
/// [module docs](self) for the format).
///
/// ```
/// use amp::{checkpoint, Amp, AmpConfig, SgdConfig};
/// use amp::backend::ndarray::NdStore;
///
/// let store = NdStore::from_arrays([ndarray::arr1(&[1.0f64, 2.0])]);
/// let amp = Amp::sgd(store, AmpConfig::default(), SgdConfig::nesterov(0.9))?;
/// let bytes = checkpoint::to_bytes(&amp)?;
/// assert_eq!(bytes, checkpoint::to_bytes(&amp)?); // deterministic
/// # Ok::<(), amp::AmpError>(())
/// ```
pub fn to_bytes<S: ParamStore, O: BaseOptimizer<S>>(amp: &Amp<S, O>) -> Result<Vec<u8>> {
    let store = amp.store();
    let n = store.num_tensors();
    let mut tensors: Vec<(String, Encoded)> = Vec::new();
    let mut shapes = Vec::with_capacity(n);
    for i in 0..n {
        let tensor = store.read(Slot::Params, i)?;
        shapes.push(tensor.shape.clone());
        tensors.push((param_name(i), Encoded::new(&tensor)?));
    }

    let state = amp.base_state()?;
    let mut buffers = Vec::with_capacity(state.buffers.len());
    for (b, (name, list)) in state.buffers.iter().enumerate() {
        if list.len() != n {
            return Err(AmpError::CountMismatch {
                what: "optimizer state tensors",
                expected: n,
                found: list.len(),
            });
        }
        for (i, tensor) in list.iter().enumerate() {
            if let Some(tensor) = tensor {
                tensors.push((buffer_name(b, i), Encoded::new(tensor)?));
            }
        }
        buffers.push(BufferMeta {
            name: name.clone(),
            present: list.iter().map(Option::is_some).collect(),
        });
    }
    let mut scalars = Vec::with_capacity(state.scalars.len());
    for (s, (name, values)) in state.scalars.iter().enumerate() {
        let tensor = HostTensor::new(vec![values.len()], DType::F64, values.clone())?;
        tensors.push((scalar_name(s), Encoded::new(&tensor)?));
        scalars.push(name.clone());
    }

    let groups = (0..amp.num_groups())
        .map(|g| {
            Ok(GroupMeta {
                tensors: amp.group_tensors(g)?.to_vec(),
                lr: Exact(amp.group_lr(g)?),
                epsilon: Exact(amp.group_epsilon(g)?),
                inner_lr: Exact(amp.group_inner_lr(g)?),
                weight_decay: Exact(amp.group_weight_decay(g)?),
            })
        })
        .collect::<Result<Vec<_>>>()?;

    let meta = Meta {
        format_version: FORMAT_VERSION,
        dtype: store.dtype().name().to_string(),
        shapes,
        steps: amp.steps(),
        skipped_steps: amp.skipped_steps(),
        config: ConfigMeta::from_config(amp.config()),
        groups,
        optimizer: OptimizerMeta { buffers, scalars },
    };
    let json = serde_json::to_string(&meta)
        .map_err(|e| AmpError::Checkpoint(format!("cannot encode the metadata: {e}")))?;
    // One metadata key only: safetensors writes its metadata map in hash
    // order, and a single entry keeps the bytes deterministic.
    let metadata = Some(HashMap::from([(METADATA_KEY.to_string(), json)]));
    safetensors::tensor::serialize(
        tensors.iter().map(|(name, tensor)| (name.as_str(), tensor)),
        &metadata,
    )
    .map_err(|e| AmpError::Checkpoint(format!("cannot serialise: {e}")))
}

/// Restores the complete state of `amp` from checkpoint bytes, with the
/// default (strict) [`LoadOptions`]. On error nothing changes.
///
/// ```
/// use amp::{checkpoint, Amp, AmpConfig, AmpError, SgdConfig};
/// use amp::backend::ndarray::NdStore;
///
/// let build = |x: f64| Amp::sgd(NdStore::from_arrays([ndarray::arr1(&[x])]),
///                               AmpConfig::default(), SgdConfig::default());
/// let bytes = checkpoint::to_bytes(&build(7.0)?)?;
/// let mut amp = build(0.0)?;
/// checkpoint::from_bytes(&mut amp, &bytes)?;
/// assert_eq!(amp.store().params()[0][0], 7.0);
///
/// // A truncated file is refused, and nothing changes.
/// let err = checkpoint::from_bytes(&mut amp, &bytes[..bytes.len() - 1]).unwrap_err();
/// assert!(matches!(err, AmpError::Checkpoint(_)));
/// assert_eq!(amp.store().params()[0][0], 7.0);
/// # Ok::<(), AmpError>(())
/// ```
pub fn from_bytes<S: ParamStore, O: BaseOptimizer<S>>(
    amp: &mut Amp<S, O>,
    bytes: &[u8],
) -> Result<()> {
    from_bytes_with(amp, bytes, &LoadOptions::default())
}

/// [`from_bytes`] with explicit [`LoadOptions`]. On error nothing changes.
///
/// ```
/// use amp::{checkpoint, Amp, AmpConfig, AmpError, SgdConfig};
/// use amp::checkpoint::{DTypeConversion, LoadOptions};
/// use amp::backend::ndarray::NdStore;
///
/// // Written by an f64 store, loaded into an f32 one: narrowing.
/// let wide = Amp::sgd(NdStore::from_arrays([ndarray::arr1(&[0.1f64])]),
///                     AmpConfig::default(), SgdConfig::default())?;
/// let bytes = checkpoint::to_bytes(&wide)?;
/// let mut narrow = Amp::sgd(NdStore::from_arrays([ndarray::arr1(&[0.0f32])]),
///                           AmpConfig::default(), SgdConfig::default())?;
/// let err = checkpoint::from_bytes(&mut narrow, &bytes).unwrap_err();
/// assert!(matches!(err, AmpError::DTypeMismatch { index: 0, .. }));
///
/// let rounding = LoadOptions::default().dtype(DTypeConversion::Rounding);
/// checkpoint::from_bytes_with(&mut narrow, &bytes, &rounding)?;
/// assert_eq!(narrow.store().params()[0][0], 0.1f32);
/// # Ok::<(), AmpError>(())
/// ```
pub fn from_bytes_with<S: ParamStore, O: BaseOptimizer<S>>(
    amp: &mut Amp<S, O>,
    bytes: &[u8],
    options: &LoadOptions,
) -> Result<()> {
    let plan = Plan::new(amp, bytes, options)?;
    plan.apply(amp)
}

/// Reads the metadata of checkpoint bytes, checking the whole file's
/// structure (header, version, tensors present with the recorded shapes)
/// but not any store.
///
/// ```
/// use amp::{checkpoint, Amp, AmpConfig, SgdConfig};
/// use amp::backend::ndarray::NdStore;
///
/// let amp = Amp::sgd(NdStore::from_arrays([ndarray::arr1(&[1.0f32, 2.0])]),
///                    AmpConfig::default().inner_iter(2), SgdConfig::default())?;
/// let info = checkpoint::inspect(&checkpoint::to_bytes(&amp)?)?;
/// // Enough to build the same optimiser again.
/// assert_eq!(&info.config, amp.config());
/// assert!(checkpoint::inspect(b"not a checkpoint").is_err());
/// # Ok::<(), amp::AmpError>(())
/// ```
pub fn inspect(bytes: &[u8]) -> Result<CheckpointInfo> {
    let file = Parsed::parse(bytes)?;
    let meta = &file.meta;
    // Decode the tensors too, so that `inspect` accepts only what a store of
    // these shapes could load.
    file.decode_all()?;
    Ok(CheckpointInfo {
        format_version: meta.format_version,
        dtype: file.dtype,
        shapes: meta.shapes.clone(),
        steps: meta.steps,
        skipped_steps: meta.skipped_steps,
        config: meta.config.to_config()?,
        group_lr: meta.groups.iter().map(|g| g.lr.0).collect(),
        optimizer_buffers: meta
            .optimizer
            .buffers
            .iter()
            .map(|b| b.name.clone())
            .collect(),
    })
}

/// Saves the complete state of `amp` to `path`, atomically: a crash mid-save
/// leaves the previous file at `path` intact. See the [module docs](self).
///
/// ```
/// use amp::{checkpoint, Amp, AmpConfig, AmpError, SgdConfig};
/// use amp::backend::ndarray::NdStore;
///
/// let amp = Amp::sgd(NdStore::from_arrays([ndarray::arr1(&[1.0f32])]),
///                    AmpConfig::default(), SgdConfig::nesterov(0.9))?;
/// let dir = tempfile::tempdir().map_err(AmpError::backend)?;
/// let path = dir.path().join("step-0.safetensors");
/// checkpoint::save(&amp, &path)?;
/// checkpoint::save(&amp, &path)?; // replaces it
/// assert_eq!(std::fs::read_dir(dir.path()).map_err(AmpError::backend)?.count(), 1);
/// # Ok::<(), AmpError>(())
/// ```
pub fn save<S: ParamStore, O: BaseOptimizer<S>>(
    amp: &Amp<S, O>,
    path: impl AsRef<Path>,
) -> Result<()> {
    let bytes = to_bytes(amp)?;
    write_atomic(path.as_ref(), &bytes)
}

/// Loads the checkpoint at `path` into `amp`, with the default (strict)
/// [`LoadOptions`]. On error nothing changes.
///
/// ```
/// use amp::{checkpoint, Amp, AmpConfig, AmpError, SgdConfig};
/// use amp::backend::ndarray::NdStore;
///
/// let mut amp = Amp::sgd(NdStore::from_arrays([ndarray::arr1(&[1.0f32])]),
///                        AmpConfig::default(), SgdConfig::nesterov(0.9))?;
/// let err = checkpoint::load(&mut amp, "/nonexistent/amp.safetensors").unwrap_err();
/// assert!(matches!(err, AmpError::Checkpoint(_)));
/// # Ok::<(), AmpError>(())
/// ```
pub fn load<S: ParamStore, O: BaseOptimizer<S>>(
    amp: &mut Amp<S, O>,
    path: impl AsRef<Path>,
) -> Result<()> {
    load_with(amp, path, &LoadOptions::default())
}

/// [`load`] with explicit [`LoadOptions`]. On error nothing changes.
///
/// ```
/// use amp::{checkpoint, Amp, AmpConfig, AmpError, SgdConfig};
/// use amp::checkpoint::LoadOptions;
/// use amp::backend::ndarray::NdStore;
///
/// let build = |epsilon| Amp::sgd(NdStore::from_arrays([ndarray::arr1(&[1.0f32])]),
///                                AmpConfig::default().epsilon(epsilon), SgdConfig::default());
/// let dir = tempfile::tempdir().map_err(AmpError::backend)?;
/// let path = dir.path().join("amp.safetensors");
/// checkpoint::save(&build(0.5)?, &path)?;
///
/// // Resuming with another ε is refused by default …
/// let mut amp = build(0.1)?;
/// assert!(matches!(checkpoint::load(&mut amp, &path), Err(AmpError::Checkpoint(_))));
/// // … and allowed on purpose, keeping the new ε.
/// checkpoint::load_with(&mut amp, &path, &LoadOptions::default().keep_hyperparameters(true))?;
/// assert_eq!(amp.group_epsilon(0)?, 0.1);
/// # Ok::<(), AmpError>(())
/// ```
pub fn load_with<S: ParamStore, O: BaseOptimizer<S>>(
    amp: &mut Amp<S, O>,
    path: impl AsRef<Path>,
    options: &LoadOptions,
) -> Result<()> {
    let path = path.as_ref();
    let bytes = fs::read(path)
        .map_err(|e| AmpError::Checkpoint(format!("cannot read {}: {e}", path.display())))?;
    from_bytes_with(amp, &bytes, options)
}

// ---------------------------------------------------------------------------
// Loading: parse and validate everything into a plan, then apply it.

/// Everything a load will write, fully validated.
struct Plan {
    params: Vec<HostTensor>,
    state: OptimizerState,
    group_lr: Vec<f64>,
    steps: u64,
    skipped_steps: u64,
}

impl Plan {
    fn new<S: ParamStore, O: BaseOptimizer<S>>(
        amp: &Amp<S, O>,
        bytes: &[u8],
        options: &LoadOptions,
    ) -> Result<Self> {
        let file = Parsed::parse(bytes)?;
        let meta = &file.meta;
        let store = amp.store();
        let n = store.num_tensors();
        let target = store.dtype();

        if meta.shapes.len() != n {
            return Err(AmpError::CountMismatch {
                what: "checkpoint parameter tensors",
                expected: n,
                found: meta.shapes.len(),
            });
        }
        let shapes = (0..n).map(|i| store.shape(i)).collect::<Result<Vec<_>>>()?;
        for (i, (expected, found)) in shapes.iter().zip(&meta.shapes).enumerate() {
            if expected != found {
                return Err(AmpError::ShapeMismatch {
                    index: i,
                    expected: expected.clone(),
                    found: found.clone(),
                });
            }
        }
        check_groups(amp, meta, options)?;

        let (params, state) = file.decode_all()?;
        let accept = |index: usize, tensor: &HostTensor| -> Result<()> {
            if !options.dtype.accepts(tensor.dtype, target) {
                return Err(AmpError::DTypeMismatch {
                    index,
                    expected: target.name().to_string(),
                    found: tensor.dtype.name().to_string(),
                });
            }
            // Only a narrowing conversion can overflow.
            if DTypeConversion::Lossless.accepts(tensor.dtype, target) {
                Ok(())
            } else {
                check_range(index, tensor, target)
            }
        };
        for (i, tensor) in params.iter().enumerate() {
            accept(i, tensor)?;
        }
        for (_, list) in &state.buffers {
            for (i, tensor) in list.iter().enumerate() {
                if let Some(tensor) = tensor {
                    accept(i, tensor)?;
                }
            }
        }

        Ok(Plan {
            params,
            state,
            group_lr: meta.groups.iter().map(|g| g.lr.0).collect(),
            steps: meta.steps,
            skipped_steps: meta.skipped_steps,
        })
    }

    /// Writes the plan. Every value was validated; should the backend fail
    /// anyway, what was written is undone.
    fn apply<S: ParamStore, O: BaseOptimizer<S>>(self, amp: &mut Amp<S, O>) -> Result<()> {
        let n = amp.store().num_tensors();
        let all = vec![true; n];
        let old_lr = (0..amp.num_groups())
            .map(|g| amp.group_lr(g))
            .collect::<Result<Vec<_>>>()?;
        // A device-side backup of θ, so that a failure part-way can be undone
        // without a host copy of the whole model.
        let backup = amp.store_mut().alloc_buffer()?;
        if let Err(error) = amp
            .store_mut()
            .copy(Slot::Buffer(backup), Slot::Params, &all)
        {
            let _ = amp.store_mut().free_buffer(backup);
            return Err(error);
        }
        let result = self.write(amp);
        if result.is_err() {
            // Best effort: the original error is what the caller needs.
            let _ = amp
                .store_mut()
                .copy(Slot::Params, Slot::Buffer(backup), &all);
            for (g, &lr) in old_lr.iter().enumerate() {
                let _ = amp.set_group_lr(g, lr);
            }
        }
        // A buffer that cannot be freed is leaked, not reported: the load
        // itself has succeeded or failed cleanly by now.
        let _ = amp.store_mut().free_buffer(backup);
        result
    }

    fn write<S: ParamStore, O: BaseOptimizer<S>>(&self, amp: &mut Amp<S, O>) -> Result<()> {
        for (i, tensor) in self.params.iter().enumerate() {
            amp.store_mut().write(Slot::Params, i, tensor)?;
        }
        for (g, &lr) in self.group_lr.iter().enumerate() {
            amp.set_group_lr(g, lr)?;
        }
        // Last, because it is the one step that cannot be undone from here;
        // the base optimiser changes nothing when it fails.
        amp.load_base_state(&self.state, self.steps, self.skipped_steps)
    }
}

/// Checks the groups (always) and the hyper-parameters that change what a
/// step computes (unless told to keep the optimiser's own).
fn check_groups<S: ParamStore, O: BaseOptimizer<S>>(
    amp: &Amp<S, O>,
    meta: &Meta,
    options: &LoadOptions,
) -> Result<()> {
    let mismatch = |what: String| {
        Err(AmpError::Checkpoint(format!(
            "configuration mismatch: {what}"
        )))
    };
    if meta.groups.len() != amp.num_groups() {
        return mismatch(format!(
            "the checkpoint has {} parameter groups, this optimiser {}",
            meta.groups.len(),
            amp.num_groups()
        ));
    }
    for (g, group) in meta.groups.iter().enumerate() {
        let tensors = amp.group_tensors(g)?;
        if group.tensors != tensors {
            return mismatch(format!(
                "group {g} holds tensors {:?} in the checkpoint but {tensors:?} here",
                group.tensors
            ));
        }
        if !(group.lr.0.is_finite() && group.lr.0 >= 0.0) {
            return Err(AmpError::Checkpoint(format!(
                "group {g} has an invalid learning rate {}",
                group.lr.0
            )));
        }
        if options.keep_hyperparameters {
            continue;
        }
        for (field, saved, here) in [
            ("epsilon", group.epsilon.0, amp.group_epsilon(g)?),
            ("inner_lr", group.inner_lr.0, amp.group_inner_lr(g)?),
            (
                "weight_decay",
                group.weight_decay.0,
                amp.group_weight_decay(g)?,
            ),
        ] {
            if saved.to_bits() != here.to_bits() {
                return mismatch(format!(
                    "`{field}` of group {g} is {saved} in the checkpoint but {here} here"
                ));
            }
        }
    }
    if !options.keep_hyperparameters {
        let config = amp.config();
        if meta.config.inner_iter != config.inner_iter {
            return mismatch(format!(
                "`inner_iter` is {} in the checkpoint but {} here",
                meta.config.inner_iter, config.inner_iter
            ));
        }
        let restore = restore_name(config.restore);
        if meta.config.restore != restore {
            return mismatch(format!(
                "`restore` is {:?} in the checkpoint but {restore:?} here",
                meta.config.restore
            ));
        }
    }
    Ok(())
}

/// Under [`DTypeConversion::Rounding`], a finite value beyond the target's
/// range would become ±∞: refuse it.
fn check_range(index: usize, tensor: &HostTensor, target: DType) -> Result<()> {
    let Some(limit) = overflow_threshold(target) else {
        return Ok(());
    };
    if let Some(value) = tensor
        .data
        .iter()
        .find(|x| x.is_finite() && x.abs() >= limit)
    {
        return Err(AmpError::Checkpoint(format!(
            "tensor {index}: value {value} is out of the range of {target}"
        )));
    }
    Ok(())
}

/// The smallest magnitude that rounds to infinity in `dtype` (the largest
/// finite value plus half an ulp); `None` for `f64`.
fn overflow_threshold(dtype: DType) -> Option<f64> {
    match dtype {
        DType::F16 => Some(65520.0),
        // (2 − 2⁻⁸)·2¹²⁷ and (2 − 2⁻²⁴)·2¹²⁷.
        DType::BF16 => Some((2.0 - 2f64.powi(-8)) * 2f64.powi(127)),
        DType::F32 => Some((2.0 - 2f64.powi(-24)) * 2f64.powi(127)),
        _ => None,
    }
}

/// A parsed safetensors file with its checkpoint metadata.
struct Parsed<'a> {
    meta: Meta,
    dtype: DType,
    header: safetensors::tensor::Metadata,
    data: &'a [u8],
    /// Tensors looked up so far, to catch unexpected extra ones.
    seen: std::cell::Cell<usize>,
}

impl<'a> Parsed<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Self> {
        let (header_len, header) = SafeTensors::read_metadata(bytes)
            .map_err(|e| corrupt(format!("not a valid safetensors file ({e})")))?;
        let data = header_len
            .checked_add(8)
            .and_then(|start| bytes.get(start..))
            .ok_or_else(|| corrupt("the header runs past the end of the file".into()))?;
        let json = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(METADATA_KEY))
            .ok_or_else(|| {
                corrupt(format!(
                    "no `{METADATA_KEY}` metadata: not written by amp::checkpoint"
                ))
            })?;
        let value: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| corrupt(format!("the metadata is not valid JSON ({e})")))?;
        // The version first, so that a newer file gets a clear message rather
        // than a schema error.
        let version = value
            .get("format_version")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| corrupt("the metadata has no `format_version`".into()))?;
        if version != u64::from(FORMAT_VERSION) {
            return Err(AmpError::Checkpoint(format!(
                "format version {version} is not supported: this build reads version \
                 {FORMAT_VERSION}"
            )));
        }
        let meta: Meta = serde_json::from_value(value)
            .map_err(|e| corrupt(format!("invalid metadata ({e})")))?;
        let dtype = DType::from_name(&meta.dtype)
            .ok_or_else(|| corrupt(format!("unknown dtype {:?}", meta.dtype)))?;
        Ok(Parsed {
            meta,
            dtype,
            header,
            data,
            seen: std::cell::Cell::new(0),
        })
    }

    fn view(&self, name: &str, shape: &[usize]) -> Result<(Dtype, &'a [u8])> {
        let info = self
            .header
            .info(name)
            .ok_or_else(|| corrupt(format!("tensor `{name}` is missing")))?;
        if info.shape != shape {
            return Err(corrupt(format!(
                "tensor `{name}` has shape {:?}, but the metadata says {shape:?}",
                info.shape
            )));
        }
        let (start, end) = info.data_offsets;
        let bytes = self
            .data
            .get(start..end)
            .ok_or_else(|| corrupt(format!("tensor `{name}` lies outside the file")))?;
        self.seen.set(self.seen.get() + 1);
        Ok((info.dtype, bytes))
    }

    /// Decodes a tensor that must have `shape`.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        let (dtype, bytes) = self.view(name, shape)?;
        let dtype = match dtype {
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            Dtype::F32 => DType::F32,
            Dtype::F64 => DType::F64,
            other => {
                return Err(corrupt(format!(
                    "tensor `{name}` has dtype {other:?}; only F16, BF16, F32 and F64 are \
                     supported"
                )))
            }
        };
        HostTensor::new(shape.to_vec(), dtype, decode(dtype, bytes))
    }

    /// Decodes a 1-d `F64` tensor of host-side values.
    fn scalars(&self, name: &str) -> Result<Vec<f64>> {
        let info = self
            .header
            .info(name)
            .ok_or_else(|| corrupt(format!("tensor `{name}` is missing")))?;
        if info.dtype != Dtype::F64 || info.shape.len() != 1 {
            return Err(corrupt(format!("tensor `{name}` must be a 1-d F64 tensor")));
        }
        let shape = info.shape.clone();
        Ok(self.tensor(name, &shape)?.data)
    }

    /// Decodes the parameters and the optimiser state, checking that the file
    /// holds exactly the tensors its metadata describes.
    fn decode_all(&self) -> Result<(Vec<HostTensor>, OptimizerState)> {
        let meta = &self.meta;
        let n = meta.shapes.len();
        let params = (0..n)
            .map(|i| self.tensor(&param_name(i), &meta.shapes[i]))
            .collect::<Result<Vec<_>>>()?;
        let mut state = OptimizerState::default();
        for (b, buffer) in meta.optimizer.buffers.iter().enumerate() {
            if buffer.present.len() != n {
                return Err(AmpError::CountMismatch {
                    what: "checkpoint optimizer state tensors",
                    expected: n,
                    found: buffer.present.len(),
                });
            }
            let list = buffer
                .present
                .iter()
                .enumerate()
                .map(|(i, &present)| {
                    present
                        .then(|| self.tensor(&buffer_name(b, i), &meta.shapes[i]))
                        .transpose()
                })
                .collect::<Result<Vec<_>>>()?;
            state.buffers.push((buffer.name.clone(), list));
        }
        for (s, name) in meta.optimizer.scalars.iter().enumerate() {
            state
                .scalars
                .push((name.clone(), self.scalars(&scalar_name(s))?));
        }
        self.check_tensor_count()?;
        Ok((params, state))
    }

    /// Every tensor of the file must have been looked up: an extra one means
    /// the file is not what its metadata says.
    fn check_tensor_count(&self) -> Result<()> {
        let total = self.header.tensors().len();
        if total == self.seen.get() {
            Ok(())
        } else {
            Err(corrupt(format!(
                "the file holds {total} tensors, but its metadata accounts for {}",
                self.seen.get()
            )))
        }
    }
}

fn corrupt(message: String) -> AmpError {
    AmpError::Checkpoint(message)
}

fn param_name(index: usize) -> String {
    format!("param.{index}")
}

fn buffer_name(buffer: usize, index: usize) -> String {
    format!("optimizer.{buffer}.{index}")
}

fn scalar_name(index: usize) -> String {
    format!("optimizer_scalars.{index}")
}

// ---------------------------------------------------------------------------
// Atomic writes.

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let io_error =
        |what: &str, e: std::io::Error| AmpError::Checkpoint(format!("cannot {what}: {e}"));
    let name = path
        .file_name()
        .ok_or_else(|| AmpError::Checkpoint(format!("{} does not name a file", path.display())))?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(
        ".tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = dir.join(tmp_name);

    let written = (|| {
        let mut file = File::options()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| io_error(&format!("create {}", tmp.display()), e))?;
        file.write_all(bytes)
            .map_err(|e| io_error(&format!("write {}", tmp.display()), e))?;
        // The data must be on disk before the rename makes it the checkpoint.
        file.sync_all()
            .map_err(|e| io_error(&format!("sync {}", tmp.display()), e))?;
        drop(file);
        fs::rename(&tmp, path).map_err(|e| {
            io_error(
                &format!("rename {} to {}", tmp.display(), path.display()),
                e,
            )
        })
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
        return written;
    }
    // Make the rename itself durable. Not every platform can open a
    // directory for syncing; the checkpoint is complete either way.
    if let Ok(dir) = File::open(&dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Tensor encoding.

/// A tensor encoded for safetensors, in its own dtype, little-endian.
struct Encoded {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl Encoded {
    fn new(tensor: &HostTensor) -> Result<Self> {
        let numel = tensor
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d));
        if numel != Some(tensor.data.len()) {
            return Err(AmpError::CountMismatch {
                what: "host tensor elements",
                expected: numel.unwrap_or(usize::MAX),
                found: tensor.data.len(),
            });
        }
        let data = &tensor.data;
        let (dtype, bytes) = match tensor.dtype {
            DType::F64 => (
                Dtype::F64,
                data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
            DType::F32 => (
                Dtype::F32,
                // `as` rounds to nearest, ties to even; exact for f32 values.
                data.iter()
                    .flat_map(|&x| (x as f32).to_le_bytes())
                    .collect(),
            ),
            DType::F16 => (
                Dtype::F16,
                data.iter()
                    .flat_map(|&x| F16.encode(x).to_le_bytes())
                    .collect(),
            ),
            DType::BF16 => (
                Dtype::BF16,
                data.iter()
                    .flat_map(|&x| BF16.encode(x).to_le_bytes())
                    .collect(),
            ),
            other => {
                return Err(AmpError::Checkpoint(format!(
                    "dtype {other} cannot be stored in a checkpoint"
                )))
            }
        };
        Ok(Encoded {
            dtype,
            shape: tensor.shape.clone(),
            bytes,
        })
    }
}

impl View for &Encoded {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }

    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Decodes little-endian `bytes` of `dtype`; `bytes.len()` is a multiple of
/// the element size (safetensors checked it against the shape).
fn decode(dtype: DType, bytes: &[u8]) -> Vec<f64> {
    match dtype {
        DType::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect(),
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| F16.decode(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        _ => bytes
            .chunks_exact(2)
            .map(|c| BF16.decode(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
    }
}

/// A 16-bit IEEE-style binary format: 1 sign bit, `exponent_bits`, and
/// `mantissa_bits` of fraction. Written here because the facade has no
/// half-precision dependency.
#[derive(Clone, Copy)]
struct Half {
    exponent_bits: u32,
    mantissa_bits: u32,
}

const F16: Half = Half {
    exponent_bits: 5,
    mantissa_bits: 10,
};

const BF16: Half = Half {
    exponent_bits: 8,
    mantissa_bits: 7,
};

impl Half {
    fn bias(self) -> i32 {
        (1 << (self.exponent_bits - 1)) - 1
    }

    fn max_exponent_field(self) -> u16 {
        (1 << self.exponent_bits) - 1
    }

    fn decode(self, bits: u16) -> f64 {
        let sign = if bits & 0x8000 != 0 { -1.0 } else { 1.0 };
        let exponent = (bits >> self.mantissa_bits) & self.max_exponent_field();
        let mantissa = f64::from(bits & ((1 << self.mantissa_bits) - 1));
        let magnitude = if exponent == self.max_exponent_field() {
            if mantissa == 0.0 {
                f64::INFINITY
            } else {
                f64::NAN
            }
        } else if exponent == 0 {
            // Subnormal: mantissa · 2^(1 − bias − mantissa_bits).
            mantissa * 2f64.powi(1 - self.bias() - self.mantissa_bits as i32)
        } else {
            (2f64.powi(self.mantissa_bits as i32) + mantissa)
                * 2f64.powi(i32::from(exponent) - self.bias() - self.mantissa_bits as i32)
        };
        sign * magnitude
    }

    /// Rounds to nearest, ties to even (overflow to ±∞, NaN to a quiet NaN).
    fn encode(self, x: f64) -> u16 {
        let sign: u16 = if x.is_sign_negative() { 0x8000 } else { 0 };
        let infinity = self.max_exponent_field() << self.mantissa_bits;
        if x.is_nan() {
            return sign | infinity | (1 << (self.mantissa_bits - 1));
        }
        let a = x.abs();
        let min_exponent = 1 - self.bias();
        // The exponent of the binade `a` rounds within; below the normal
        // range, the fixed subnormal spacing.
        let exponent = if a >= 2f64.powi(min_exponent) {
            // `a` is a normal f64 here, so its exponent field is exact.
            ((a.to_bits() >> 52) & 0x7ff) as i32 - 1023
        } else {
            min_exponent
        };
        let ulp = exponent - self.mantissa_bits as i32;
        // Scaling by a power of two is exact; `round_ties_even` does the
        // rounding. Infinity scales to infinity and is caught below.
        let units = (a * 2f64.powi(-ulp)).round_ties_even();
        let implicit = 2f64.powi(self.mantissa_bits as i32);
        if a < 2f64.powi(min_exponent) {
            // Subnormal; `units` may round up to `implicit`, which encodes the
            // smallest normal number as it stands.
            return sign | units as u16;
        }
        let (units, exponent) = if units >= 2.0 * implicit {
            (units / 2.0, exponent + 1)
        } else {
            (units, exponent)
        };
        let field = exponent + self.bias();
        if !units.is_finite() || field >= i32::from(self.max_exponent_field()) {
            return sign | infinity;
        }
        sign | ((field as u16) << self.mantissa_bits) | (units - implicit) as u16
    }
}

// ---------------------------------------------------------------------------
// Metadata.

/// An `f64` written as a string in Rust's shortest round-trip form, so that
/// it reads back bit for bit whatever the JSON parser does with numbers.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Exact(f64);

impl Serialize for Exact {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(&format!("{:?}", self.0))
    }
}

impl<'de> Deserialize<'de> for Exact {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse()
            .map(Exact)
            .map_err(|_| serde::de::Error::custom(format!("{text:?} is not a number")))
    }
}

#[derive(Serialize, Deserialize)]
struct Meta {
    format_version: u32,
    dtype: String,
    shapes: Vec<Vec<usize>>,
    steps: u64,
    skipped_steps: u64,
    config: ConfigMeta,
    groups: Vec<GroupMeta>,
    optimizer: OptimizerMeta,
}

/// [`AmpConfig`] as built.
#[derive(Serialize, Deserialize)]
struct ConfigMeta {
    lr: Exact,
    epsilon: Exact,
    inner_lr: Exact,
    inner_iter: usize,
    weight_decay: Exact,
    restore: String,
    non_finite: String,
    groups: Vec<ParamGroupMeta>,
}

#[derive(Serialize, Deserialize)]
struct ParamGroupMeta {
    tensors: Vec<usize>,
    lr: Option<Exact>,
    epsilon: Option<Exact>,
    inner_lr: Option<Exact>,
    weight_decay: Option<Exact>,
}

/// A group as resolved against the store, with its current learning rate.
#[derive(Serialize, Deserialize)]
struct GroupMeta {
    tensors: Vec<usize>,
    lr: Exact,
    epsilon: Exact,
    inner_lr: Exact,
    weight_decay: Exact,
}

#[derive(Serialize, Deserialize)]
struct OptimizerMeta {
    buffers: Vec<BufferMeta>,
    scalars: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct BufferMeta {
    name: String,
    present: Vec<bool>,
}

fn restore_name(restore: RestoreMode) -> &'static str {
    match restore {
        RestoreMode::Copy => "copy",
        RestoreMode::Subtract => "subtract",
    }
}

fn non_finite_name(policy: NonFinitePolicy) -> &'static str {
    match policy {
        NonFinitePolicy::Error => "error",
        NonFinitePolicy::Skip => "skip",
    }
}

impl ConfigMeta {
    fn from_config(config: &AmpConfig) -> Self {
        let exact = |x: Option<f64>| x.map(Exact);
        ConfigMeta {
            lr: Exact(config.lr),
            epsilon: Exact(config.epsilon),
            inner_lr: Exact(config.inner_lr),
            inner_iter: config.inner_iter,
            weight_decay: Exact(config.weight_decay),
            restore: restore_name(config.restore).to_string(),
            non_finite: non_finite_name(config.non_finite).to_string(),
            groups: config
                .groups
                .iter()
                .map(|g| ParamGroupMeta {
                    tensors: g.tensors.clone(),
                    lr: exact(g.lr),
                    epsilon: exact(g.epsilon),
                    inner_lr: exact(g.inner_lr),
                    weight_decay: exact(g.weight_decay),
                })
                .collect(),
        }
    }

    fn to_config(&self) -> Result<AmpConfig> {
        let restore = match self.restore.as_str() {
            "copy" => RestoreMode::Copy,
            "subtract" => RestoreMode::Subtract,
            other => return Err(corrupt(format!("unknown restore mode {other:?}"))),
        };
        let non_finite = match self.non_finite.as_str() {
            "error" => NonFinitePolicy::Error,
            "skip" => NonFinitePolicy::Skip,
            other => return Err(corrupt(format!("unknown non-finite policy {other:?}"))),
        };
        let mut config = AmpConfig {
            lr: self.lr.0,
            epsilon: self.epsilon.0,
            inner_lr: self.inner_lr.0,
            inner_iter: self.inner_iter,
            weight_decay: self.weight_decay.0,
            restore,
            non_finite,
            groups: Vec::new(),
        };
        for g in &self.groups {
            let mut group = ParamGroup::new(g.tensors.iter().copied());
            group.lr = g.lr.map(|x| x.0);
            group.epsilon = g.epsilon.map(|x| x.0);
            group.inner_lr = g.inner_lr.map(|x| x.0);
            group.weight_decay = g.weight_decay.map(|x| x.0);
            config.groups.push(group);
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_formats_round_trip_every_bit_pattern() {
        for format in [F16, BF16] {
            for bits in 0..=u16::MAX {
                let value = format.decode(bits);
                if value.is_nan() {
                    assert!(format.decode(format.encode(value)).is_nan());
                } else {
                    assert_eq!(format.encode(value), bits, "bits {bits:#06x} = {value}");
                }
            }
        }
    }

    #[test]
    fn f16_known_values() {
        // IEEE 754 binary16 reference encodings.
        assert_eq!(F16.encode(1.0), 0x3c00);
        assert_eq!(F16.encode(-2.0), 0xc000);
        assert_eq!(F16.encode(65504.0), 0x7bff);
        assert_eq!(F16.encode(65519.0), 0x7bff); // below the halfway point
        assert_eq!(F16.encode(65520.0), 0x7c00); // halfway: ties to even → ∞
        assert_eq!(F16.encode(2f64.powi(-24)), 0x0001);
        assert_eq!(F16.encode(2f64.powi(-25)), 0x0000); // tie to even (0)
        assert_eq!(F16.encode(1.5 * 2f64.powi(-24)), 0x0002); // tie to even (2)
        assert_eq!(F16.encode(2f64.powi(-14)), 0x0400);
        assert_eq!(F16.encode(0.1), 0x2e66);
        assert_eq!(F16.encode(-0.0), 0x8000);
        assert_eq!(F16.encode(f64::NEG_INFINITY), 0xfc00);
    }

    #[test]
    fn bf16_matches_rounding_the_f32_bits() {
        // bf16 is the top half of an f32; round to nearest even on the f32
        // bits, for values that are exact f32s (no double rounding).
        let mut x = 0x1234_5678u32;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let value = f32::from_bits(x);
            if value.is_nan() {
                continue;
            }
            let lsb = (x >> 16) & 1;
            let expected = (x.wrapping_add(0x7fff + lsb) >> 16) as u16;
            // Rounding up from the largest finite value carries into ∞,
            // which the bit trick gets right too.
            assert_eq!(BF16.encode(f64::from(value)), expected, "{value:e}");
        }
    }

    /// The next f64 below a positive `x`.
    fn below(x: f64) -> f64 {
        f64::from_bits(x.to_bits() - 1)
    }

    #[test]
    fn overflow_thresholds_round_to_infinity() {
        let f32_limit = overflow_threshold(DType::F32).unwrap_or(0.0);
        assert!((f32_limit as f32).is_infinite());
        assert!((below(f32_limit) as f32).is_finite());
        let bf16_limit = overflow_threshold(DType::BF16).unwrap_or(0.0);
        assert_eq!(BF16.encode(bf16_limit), 0x7f80);
        assert_eq!(BF16.encode(below(bf16_limit)), 0x7f7f);
        assert_eq!(F16.encode(below(65520.0)), 0x7bff);
    }
}
