//! Loading: everything checked against the optimiser into a plan, then
//! written.

use amp_core::{
    Amp, AmpError, AmpState, BaseOptimizer, DType, HostTensor, ParamStore, Result, Slot,
    StateOptions,
};

use crate::codec::overflow_threshold;
use crate::format::Parsed;

/// Which dtype changes [`load_with`](crate::load_with) accepts; see the
/// [crate docs](crate#dtype-conversion-rules).
///
/// ```
/// use amp_checkpoint::{DTypeConversion, LoadOptions};
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
    /// use amp_core::DType;
    /// use amp_checkpoint::DTypeConversion;
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

/// How [`load_with`](crate::load_with) treats differences between the checkpoint and the
/// optimiser it is loaded into. The default is strict.
///
/// ```
/// use amp_checkpoint::{DTypeConversion, LoadOptions};
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
    /// `true` accepts a checkpoint whose ε, ζ, weight decay, `inner_iter`,
    /// `restore` or base-optimiser settings differ from the optimiser's, and
    /// keeps the optimiser's (to resume with new hyper-parameters on
    /// purpose); see [`StateOptions`]. The groups' tensors must still match,
    /// and the learning rates are still restored. Default `false`: a
    /// difference is an [`AmpError::InvalidState`].
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

/// Everything a load will write, fully validated.
pub(crate) struct Plan {
    params: Vec<HostTensor>,
    state: AmpState,
    options: StateOptions,
}

impl Plan {
    pub(crate) fn new<S: ParamStore, O: BaseOptimizer<S>>(
        amp: &Amp<S, O>,
        parsed: Parsed,
        options: &LoadOptions,
    ) -> Result<Self> {
        let store = amp.store();
        let n = store.num_tensors();
        let target = store.dtype();
        if parsed.params.len() != n {
            return Err(AmpError::CountMismatch {
                what: "checkpoint parameter tensors",
                expected: n,
                found: parsed.params.len(),
            });
        }
        for (i, tensor) in parsed.params.iter().enumerate() {
            let expected = store.shape(i)?;
            if tensor.shape() != expected {
                return Err(AmpError::ShapeMismatch {
                    index: i,
                    expected,
                    found: tensor.shape().to_vec(),
                });
            }
        }
        let accept = |index: usize, tensor: &HostTensor| -> Result<()> {
            if !options.dtype.accepts(tensor.dtype(), target) {
                return Err(AmpError::DTypeMismatch {
                    index,
                    expected: target.name().to_string(),
                    found: tensor.dtype().name().to_string(),
                });
            }
            // Only a narrowing conversion can overflow.
            if DTypeConversion::Lossless.accepts(tensor.dtype(), target) {
                Ok(())
            } else {
                check_range(index, tensor, target)
            }
        };
        for (i, tensor) in parsed.params.iter().enumerate() {
            accept(i, tensor)?;
        }
        for (_, list) in &parsed.state.base.state.buffers {
            for (i, tensor) in list.iter().enumerate() {
                if let Some(tensor) = tensor {
                    accept(i, tensor)?;
                }
            }
        }
        let state_options =
            StateOptions::default().keep_hyperparameters(options.keep_hyperparameters);
        amp.validate_state(&parsed.state, &state_options)?;
        Ok(Plan {
            params: parsed.params,
            state: parsed.state,
            options: state_options,
        })
    }

    /// Writes the plan. Every value was validated; should the backend fail
    /// anyway, the weights are copied back from a device-side backup (and
    /// the optimiser state, loaded last, changes only when its load
    /// succeeds).
    pub(crate) fn apply<S: ParamStore, O: BaseOptimizer<S>>(
        self,
        amp: &mut Amp<S, O>,
    ) -> Result<()> {
        let n = amp.store().num_tensors();
        let all = vec![true; n];
        let backup = amp.store_mut().alloc_buffer()?;
        if let Err(error) = amp
            .store_mut()
            .copy(Slot::Buffer(backup), Slot::Params, &all)
        {
            let _ = amp.store_mut().free_buffer(backup);
            return Err(error);
        }
        let written = self
            .params
            .iter()
            .enumerate()
            .try_for_each(|(i, tensor)| amp.store_mut().write(Slot::Params, i, tensor))
            .and_then(|()| amp.load_state_with(&self.state, &self.options));
        if written.is_err() {
            // Best effort: the original error is what the caller needs.
            let _ = amp
                .store_mut()
                .copy(Slot::Params, Slot::Buffer(backup), &all);
        }
        // A buffer that cannot be freed is leaked, not reported: the load
        // itself has succeeded or failed cleanly by now.
        let _ = amp.store_mut().free_buffer(backup);
        written
    }
}

/// Under [`DTypeConversion::Rounding`], a finite value beyond the target's
/// range would become ±∞: refuse it.
fn check_range(index: usize, tensor: &HostTensor, target: DType) -> Result<()> {
    let Some(limit) = overflow_threshold(target) else {
        return Ok(());
    };
    if let Some(value) = tensor
        .data()
        .iter()
        .find(|x| x.is_finite() && x.abs() >= limit)
    {
        return Err(AmpError::Checkpoint(format!(
            "tensor {index}: value {value} is out of the range of {target}"
        )));
    }
    Ok(())
}
