//! # amp-checkpoint
//!
//! Checkpoints for [`Amp`], the Adversarial Model Perturbation optimiser
//! (AMP here is adversarial model perturbation, not automatic mixed
//! precision): the weights and the optimiser's whole [`AmpState`] in one
//! safetensors file, for any [`ParamStore`] and [`BaseOptimizer`] — the
//! in-tree backends, a store of your own tensor type, either tier. The facade
//! crate re-exports this crate as `amp::checkpoint`.
//!
//! A checkpoint holds everything a resumed run needs:
//! - the model parameters ([`Slot::Params`]), each in the store's own dtype;
//! - the base optimiser's kind, settings (for [`Sgd`](amp_core::Sgd):
//!   momentum, dampening, Nesterov) and state (the momentum buffers — which
//!   Python SAM wrappers lose on save);
//! - the step counters, the [`AmpConfig`] the optimiser was built with, and
//!   every parameter group as resolved against the store with its *current*
//!   learning rate (as last set by a schedule).
//!
//! # Resuming
//! Build the optimiser exactly as the first run did, then [`load`]. `n` steps
//! in one process and `k` steps, save, load into a fresh [`Amp`], `n − k`
//! steps give the same weights and state bit for bit (when the closure is
//! deterministic and the dtype is unchanged).
//!
//! ```
//! use amp_core::{Amp, AmpConfig, AmpError, SgdConfig};
//! use amp_ndarray::NdStore;
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
//!     Amp::sgd(store, AmpConfig::new(0.1, 0.5), SgdConfig::nesterov(0.9))
//! };
//!
//! let dir = tempfile::tempdir().map_err(AmpError::backend)?;
//! let path = dir.path().join("amp.safetensors");
//! let mut first = build()?;
//! for _ in 0..3 { step(&mut first)?; }
//! amp_checkpoint::save(&first, &path)?;
//! for _ in 0..2 { step(&mut first)?; }
//!
//! let mut resumed = build()?;
//! amp_checkpoint::load(&mut resumed, &path)?;
//! assert_eq!(resumed.steps(), 3);
//! for _ in 0..2 { step(&mut resumed)?; }
//! assert_eq!(resumed.store().params(), first.store().params()); // bit for bit
//! # Ok::<(), AmpError>(())
//! ```
//!
//! # Format (version 2)
//! A [safetensors](https://huggingface.co/docs/safetensors) file, readable by
//! any safetensors reader:
//! - `param.{i}`: parameter `i`;
//! - `optimizer.{b}.{i}`: tensor `i` of the base optimiser's state buffer `b`
//!   (absent where the optimiser has no state for that tensor yet);
//! - `optimizer_scalars.{s}`: the base optimiser's host-side values `s`, as a
//!   1-d `F64` tensor;
//! - metadata key `amp_checkpoint` ([`METADATA_KEY`]): a JSON object with
//!   `format_version` ([`FORMAT_VERSION`]), the dtype and shapes of the
//!   store, the step counters, the configuration, the resolved groups, and
//!   the base optimiser's kind, settings and the names of its buffers and
//!   values. Every floating-point value reads back bit for bit.
//!
//! Tensors are stored in their own dtype (`f16` as `F16`, `bf16` as `BF16`,
//! `f32` as `F32`, `f64` as `F64`), so a resume is bit-exact. The same state
//! always serialises to the same bytes.
//!
//! Files of format version 1 (written by amp 0.1) are refused with a message
//! that says so: version 1 did not record the base optimiser's settings, so
//! it cannot be checked against the optimiser it would be loaded into.
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
//! truncated or corrupted, of another format version, whose metadata
//! contradicts its tensors, or that does not match the store or the
//! optimiser returns a typed error and leaves the optimiser as it was:
//! - [`AmpError::CountMismatch`]: another number of tensors;
//! - [`AmpError::ShapeMismatch`]: a tensor of another shape;
//! - [`AmpError::DTypeMismatch`]: a dtype change the [`DTypeConversion`] refuses;
//! - [`AmpError::InvalidState`]: a state [`Amp::load_state`] refuses (other
//!   groups, another base optimiser or settings, ε, ζ, weight decay,
//!   `inner_iter` or `restore` — unless [`LoadOptions::keep_hyperparameters`]
//!   — or non-finite optimiser state);
//! - [`AmpError::Checkpoint`]: anything else (not a regular file, unreadable
//!   file, bad header or metadata, unsupported version, missing or
//!   unexpected tensor).
//!
//! [`inspect`] and the loaders parse and check a file with the same code, so
//! a file `inspect` accepts is one a matching optimiser loads, and the other
//! way round. Should writing fail part-way (a backend error, as every value
//! was checked beforehand), the parameters are copied back from a
//! device-side backup, so the optimiser is still as it was.
//!
//! # Atomic saves
//! [`save`] writes to a temporary file in the target's directory, flushes it
//! to disk (`fsync`), then renames it over the target, and finally flushes the
//! directory. A crash mid-save leaves the previous checkpoint intact (and at
//! worst a stray `.{name}.tmp-*` file).
#![warn(missing_docs)]

mod codec;
mod file;
mod format;
mod load;

use std::path::Path;

use amp_core::{
    Amp, AmpConfig, AmpError, AmpState, BaseOptimizer, DType, GroupState, ParamStore, Result, Slot,
};

pub use crate::load::{DTypeConversion, LoadOptions};

/// The version of the checkpoint format this build writes and reads.
///
/// ```
/// assert_eq!(amp_checkpoint::FORMAT_VERSION, 2);
/// ```
pub const FORMAT_VERSION: u32 = 2;

/// The key of the safetensors metadata map that holds the checkpoint's JSON
/// metadata.
///
/// ```
/// use amp_core::{Amp, AmpConfig, SgdConfig};
/// use amp_ndarray::NdStore;
///
/// let amp = Amp::sgd(NdStore::from_arrays([ndarray::arr1(&[1.0f64])]),
///                    AmpConfig::new(0.1, 0.5), SgdConfig::default())?;
/// let bytes = amp_checkpoint::to_bytes(&amp)?;
/// // Any safetensors reader sees the metadata under this key.
/// let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
/// let json = &header.metadata().as_ref().unwrap()[amp_checkpoint::METADATA_KEY];
/// assert!(json.contains("\"format_version\":2"));
/// # Ok::<(), amp_core::AmpError>(())
/// ```
pub const METADATA_KEY: &str = "amp_checkpoint";

/// What a checkpoint holds, read by [`inspect`] without a store.
///
/// ```
/// use amp_core::{Amp, AmpConfig, DType, SgdConfig};
/// use amp_ndarray::NdStore;
///
/// let store = NdStore::from_arrays([ndarray::Array2::<f32>::zeros((3, 2))]);
/// let mut amp = Amp::sgd(store, AmpConfig::new(0.1, 0.25), SgdConfig::nesterov(0.9))?;
/// amp.set_lr(0.01)?;
/// let info = amp_checkpoint::inspect(&amp_checkpoint::to_bytes(&amp)?)?;
/// assert_eq!(info.dtype, DType::F32);
/// assert_eq!(info.shapes, vec![vec![3, 2]]);
/// assert_eq!(info.state.steps, 0);
/// assert_eq!(info.state.config.epsilon, 0.25);
/// assert_eq!(info.state.groups[0].lr, 0.01);
/// assert_eq!(info.state.base.kind, "sgd");
/// # Ok::<(), amp_core::AmpError>(())
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
    /// The optimiser state recorded in the file, buffers included.
    pub state: AmpState,
}

impl CheckpointInfo {
    /// The configuration the optimiser was built with: enough to build the
    /// same optimiser again.
    pub fn config(&self) -> &AmpConfig {
        &self.state.config
    }

    /// The parameter groups with their learning rates at save time.
    pub fn groups(&self) -> &[GroupState] {
        &self.state.groups
    }
}

/// Serialises the weights and the complete state of `amp` to checkpoint
/// bytes (see the [crate docs](crate) for the format).
///
/// ```
/// use amp_core::{Amp, AmpConfig, SgdConfig};
/// use amp_ndarray::NdStore;
///
/// let store = NdStore::from_arrays([ndarray::arr1(&[1.0f64, 2.0])]);
/// let amp = Amp::sgd(store, AmpConfig::new(0.1, 0.5), SgdConfig::nesterov(0.9))?;
/// let bytes = amp_checkpoint::to_bytes(&amp)?;
/// assert_eq!(bytes, amp_checkpoint::to_bytes(&amp)?); // deterministic
/// # Ok::<(), amp_core::AmpError>(())
/// ```
pub fn to_bytes<S: ParamStore, O: BaseOptimizer<S>>(amp: &Amp<S, O>) -> Result<Vec<u8>> {
    let store = amp.store();
    let params = (0..store.num_tensors())
        .map(|i| store.read(Slot::Params, i))
        .collect::<Result<Vec<_>>>()?;
    format::encode(store.dtype(), &params, &amp.state()?)
}

/// Restores the weights and the complete state of `amp` from checkpoint
/// bytes, with the default (strict) [`LoadOptions`]. On error nothing
/// changes.
///
/// ```
/// use amp_core::{Amp, AmpConfig, AmpError, SgdConfig};
/// use amp_ndarray::NdStore;
///
/// let build = |x: f64| Amp::sgd(NdStore::from_arrays([ndarray::arr1(&[x])]),
///                               AmpConfig::new(0.1, 0.5), SgdConfig::default());
/// let bytes = amp_checkpoint::to_bytes(&build(7.0)?)?;
/// let mut amp = build(0.0)?;
/// amp_checkpoint::from_bytes(&mut amp, &bytes)?;
/// assert_eq!(amp.store().params()[0][0], 7.0);
///
/// // A truncated file is refused, and nothing changes.
/// let err = amp_checkpoint::from_bytes(&mut amp, &bytes[..bytes.len() - 1]).unwrap_err();
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
/// use amp_core::{Amp, AmpConfig, AmpError, SgdConfig};
/// use amp_checkpoint::{DTypeConversion, LoadOptions};
/// use amp_ndarray::NdStore;
///
/// // Written by an f64 store, loaded into an f32 one: narrowing.
/// let wide = Amp::sgd(NdStore::from_arrays([ndarray::arr1(&[0.1f64])]),
///                     AmpConfig::new(0.1, 0.5), SgdConfig::default())?;
/// let bytes = amp_checkpoint::to_bytes(&wide)?;
/// let mut narrow = Amp::sgd(NdStore::from_arrays([ndarray::arr1(&[0.0f32])]),
///                           AmpConfig::new(0.1, 0.5), SgdConfig::default())?;
/// let err = amp_checkpoint::from_bytes(&mut narrow, &bytes).unwrap_err();
/// assert!(matches!(err, AmpError::DTypeMismatch { index: 0, .. }));
///
/// let rounding = LoadOptions::default().dtype(DTypeConversion::Rounding);
/// amp_checkpoint::from_bytes_with(&mut narrow, &bytes, &rounding)?;
/// assert_eq!(narrow.store().params()[0][0], 0.1f32);
/// # Ok::<(), AmpError>(())
/// ```
pub fn from_bytes_with<S: ParamStore, O: BaseOptimizer<S>>(
    amp: &mut Amp<S, O>,
    bytes: &[u8],
    options: &LoadOptions,
) -> Result<()> {
    let parsed = format::decode(bytes)?;
    load::Plan::new(amp, parsed, options)?.apply(amp)
}

/// Reads what checkpoint bytes hold, checking the whole file (header,
/// version, metadata against the tensors) but not against any store.
///
/// ```
/// use amp_core::{Amp, AmpConfig, SgdConfig};
/// use amp_ndarray::NdStore;
///
/// let amp = Amp::sgd(NdStore::from_arrays([ndarray::arr1(&[1.0f32, 2.0])]),
///                    AmpConfig::new(0.1, 0.5).inner_iter(2), SgdConfig::default())?;
/// let info = amp_checkpoint::inspect(&amp_checkpoint::to_bytes(&amp)?)?;
/// // Enough to build the same optimiser again.
/// assert_eq!(info.config(), amp.config());
/// assert!(amp_checkpoint::inspect(b"not a checkpoint").is_err());
/// # Ok::<(), amp_core::AmpError>(())
/// ```
pub fn inspect(bytes: &[u8]) -> Result<CheckpointInfo> {
    let parsed = format::decode(bytes)?;
    Ok(CheckpointInfo {
        format_version: FORMAT_VERSION,
        dtype: parsed.dtype,
        shapes: parsed.params.iter().map(|p| p.shape().to_vec()).collect(),
        state: parsed.state,
    })
}

/// Saves the weights and the complete state of `amp` to `path`, atomically:
/// a crash mid-save leaves the previous file at `path` intact.
///
/// ```
/// use amp_core::{Amp, AmpConfig, AmpError, SgdConfig};
/// use amp_ndarray::NdStore;
///
/// let amp = Amp::sgd(NdStore::from_arrays([ndarray::arr1(&[1.0f32])]),
///                    AmpConfig::new(0.1, 0.5), SgdConfig::nesterov(0.9))?;
/// let dir = tempfile::tempdir().map_err(AmpError::backend)?;
/// let path = dir.path().join("step-0.safetensors");
/// amp_checkpoint::save(&amp, &path)?;
/// amp_checkpoint::save(&amp, &path)?; // replaces it
/// assert_eq!(std::fs::read_dir(dir.path()).map_err(AmpError::backend)?.count(), 1);
/// # Ok::<(), AmpError>(())
/// ```
pub fn save<S: ParamStore, O: BaseOptimizer<S>>(
    amp: &Amp<S, O>,
    path: impl AsRef<Path>,
) -> Result<()> {
    let bytes = to_bytes(amp)?;
    file::write_atomic(path.as_ref(), &bytes)
}

/// Loads the checkpoint at `path` into `amp`, with the default (strict)
/// [`LoadOptions`]. Anything but a regular file (a directory, a FIFO, a
/// device) is refused before it is opened. On error nothing changes.
///
/// ```
/// use amp_core::{Amp, AmpConfig, AmpError, SgdConfig};
/// use amp_ndarray::NdStore;
///
/// let mut amp = Amp::sgd(NdStore::from_arrays([ndarray::arr1(&[1.0f32])]),
///                        AmpConfig::new(0.1, 0.5), SgdConfig::nesterov(0.9))?;
/// let err = amp_checkpoint::load(&mut amp, "/nonexistent/amp.safetensors").unwrap_err();
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
/// use amp_core::{Amp, AmpConfig, AmpError, SgdConfig};
/// use amp_checkpoint::LoadOptions;
/// use amp_ndarray::NdStore;
///
/// let build = |epsilon| Amp::sgd(NdStore::from_arrays([ndarray::arr1(&[1.0f32])]),
///                                AmpConfig::new(0.1, epsilon), SgdConfig::default());
/// let dir = tempfile::tempdir().map_err(AmpError::backend)?;
/// let path = dir.path().join("amp.safetensors");
/// amp_checkpoint::save(&build(0.5)?, &path)?;
///
/// // Resuming with another ε is refused by default …
/// let mut amp = build(0.1)?;
/// assert!(matches!(amp_checkpoint::load(&mut amp, &path), Err(AmpError::InvalidState(_))));
/// // … and allowed on purpose, keeping the new ε.
/// amp_checkpoint::load_with(&mut amp, &path, &LoadOptions::default().keep_hyperparameters(true))?;
/// assert_eq!(amp.groups()[0].epsilon, 0.1);
/// # Ok::<(), AmpError>(())
/// ```
pub fn load_with<S: ParamStore, O: BaseOptimizer<S>>(
    amp: &mut Amp<S, O>,
    path: impl AsRef<Path>,
    options: &LoadOptions,
) -> Result<()> {
    let bytes = file::read_regular(path.as_ref())?;
    from_bytes_with(amp, &bytes, options)
}

/// Reads the checkpoint at `path` as [`inspect`] does.
pub fn inspect_file(path: impl AsRef<Path>) -> Result<CheckpointInfo> {
    inspect(&file::read_regular(path.as_ref())?)
}

fn corrupt(message: impl Into<String>) -> AmpError {
    AmpError::Checkpoint(message.into())
}
