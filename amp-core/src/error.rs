//! The one error type of the crate and the description of which pass failed.

use crate::grad_fn::Pass;

/// A boxed error from a closure or a backend.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Result alias used throughout the crate.
pub type Result<T, E = AmpError> = std::result::Result<T, E>;

/// Everything that can go wrong in this crate and in the backends built on it.
///
/// Whenever [`Amp::step`](crate::Amp::step) returns an error, the weights and
/// the optimiser state are what they were before the step: bit-exact with
/// [`RestoreMode::Copy`](crate::RestoreMode::Copy), within a few ulps with
/// [`RestoreMode::Subtract`](crate::RestoreMode::Subtract).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AmpError {
    /// A configuration value is out of its domain.
    #[error("invalid configuration: `{field}` {reason}")]
    InvalidConfig {
        /// The field, as named in the configuration struct.
        field: &'static str,
        /// Why the value was rejected.
        reason: String,
    },
    /// The parameter store holds no tensor.
    #[error("the parameter store holds no tensor")]
    EmptyStore,
    /// Two collections that must have one entry per tensor do not.
    #[error("count mismatch in {what}: expected {expected}, found {found}")]
    CountMismatch {
        /// What was being counted.
        what: &'static str,
        /// The expected count (usually the number of tensors in the store).
        expected: usize,
        /// The count that was given.
        found: usize,
    },
    /// A tensor does not have the shape of the parameter it belongs to.
    #[error("shape mismatch at tensor {index}: expected {expected:?}, found {found:?}")]
    ShapeMismatch {
        /// Index of the tensor in the store.
        index: usize,
        /// The parameter's shape.
        expected: Vec<usize>,
        /// The shape that was given.
        found: Vec<usize>,
    },
    /// A tensor does not have the dtype it must have.
    #[error("dtype mismatch at tensor {index}: expected {expected}, found {found}")]
    DTypeMismatch {
        /// Index of the tensor in the store.
        index: usize,
        /// The dtype that was expected.
        expected: String,
        /// The dtype that was given.
        found: String,
    },
    /// Parameters live on different devices.
    #[error("tensor {index} is on {found}, but the store is on {expected}")]
    DeviceMismatch {
        /// Index of the tensor in the store.
        index: usize,
        /// The device of the store (of its first tensor).
        expected: String,
        /// The device of the offending tensor.
        found: String,
    },
    /// An index is outside the store.
    #[error("tensor index {index} is out of range for a store of {len} tensors")]
    IndexOutOfRange {
        /// The index that was given.
        index: usize,
        /// The number of tensors in the store.
        len: usize,
    },
    /// A buffer handle does not name a live buffer of this store.
    #[error("unknown or freed buffer {0}")]
    UnknownBuffer(usize),
    /// A buffer is pinned by the optimiser that holds it and cannot be
    /// freed.
    #[error("buffer {0} is held by an optimiser and cannot be freed")]
    BufferInUse(usize),
    /// The closure reported a loss that is NaN or infinite.
    #[error("non-finite loss {value} in the {pass}")]
    NonFiniteLoss {
        /// The pass that produced it.
        pass: Pass,
        /// The loss value.
        value: f64,
    },
    /// A gradient produced by the closure holds a NaN or an infinity.
    #[error("non-finite gradient in the {pass}")]
    NonFiniteGradient {
        /// The pass that produced it.
        pass: Pass,
    },
    /// A tensor that had a gradient in the clean pass has none in a later pass.
    #[error("tensor {index} had a gradient in the clean pass but none in the {pass}")]
    MissingGradient {
        /// The pass that lacked it.
        pass: Pass,
        /// Index of the tensor in the store.
        index: usize,
    },
    /// No tensor received a gradient in the clean pass.
    #[error("no tensor received a gradient in the clean pass")]
    NoGradient,
    /// The closure returned an error.
    #[error("the closure failed in the {pass}: {source}")]
    Closure {
        /// The pass whose closure call failed.
        pass: Pass,
        /// The closure's error.
        #[source]
        source: BoxError,
    },
    /// Data-parallel training: another rank's closure failed (or panicked)
    /// in this pass, so every rank abandons the step; the weights are θ.
    #[error("another rank failed in the {pass}; the step was abandoned on every rank")]
    PeerFailed {
        /// The pass that failed on another rank.
        pass: Pass,
    },
    /// Data-parallel training: the ranks' gradients do not match up (a
    /// tensor has a gradient on some ranks only), so no rank steps.
    #[error("the ranks disagree in the {pass}: {reason}")]
    RanksDisagree {
        /// The pass in which they disagree.
        pass: Pass,
        /// What differs.
        reason: String,
    },
    /// A store broke the [`ParamStore`](crate::ParamStore) contract: a mask
    /// or norms vector of the wrong length, a missing buffer it had handed
    /// out, the same slot given as source and destination.
    #[error("store contract violated: {0}")]
    StoreContract(String),
    /// An optimiser state handed to [`Amp::load_state`](crate::Amp::load_state)
    /// (directly or from a checkpoint) does not fit the optimiser, or holds
    /// values no step could start from.
    #[error("invalid optimiser state: {0}")]
    InvalidState(String),
    /// A step counter would pass `u64::MAX`; the step was not taken.
    #[error("the {0} counter is at u64::MAX: no further step can be counted")]
    CounterOverflow(&'static str),
    /// A checkpoint could not be read, written or applied.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// An error from the tensor library behind a backend.
    #[error("backend error: {0}")]
    Backend(#[source] BoxError),
}

impl AmpError {
    /// Wraps any error of a tensor library as [`AmpError::Backend`].
    pub fn backend<E: Into<BoxError>>(error: E) -> Self {
        AmpError::Backend(error.into())
    }

    /// Builds an [`AmpError::StoreContract`].
    pub fn contract(reason: impl Into<String>) -> Self {
        AmpError::StoreContract(reason.into())
    }

    /// Builds an [`AmpError::InvalidState`].
    pub fn state(reason: impl Into<String>) -> Self {
        AmpError::InvalidState(reason.into())
    }

    /// Builds an [`AmpError::InvalidConfig`].
    pub fn config(field: &'static str, reason: impl Into<String>) -> Self {
        AmpError::InvalidConfig {
            field,
            reason: reason.into(),
        }
    }
}
