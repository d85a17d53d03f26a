//! Master weights: an f32 copy of θ for a half-precision (f16/bf16) model.

use amp_core::{AmpError, Result};
use candle_core::DType as CDType;

use crate::{backend, cast, compute_dtype, CandleStore};

impl CandleStore {
    /// Keeps an f32 copy of θ ("master weights") for a model whose vars are
    /// f16 or bf16, and steps that copy instead of the vars.
    ///
    /// Without it a half-precision store rounds every update back to the
    /// vars' dtype, and an update smaller than half the weight's ulp (in
    /// bf16, 2⁻⁸ of its magnitude) is lost: late in training, with a small
    /// learning rate, most are. With it:
    ///
    /// - the base optimiser, δ (ascent and projection) and every buffer work
    ///   in f32 on the master copy ([`CandleStore::candle_dtype`] becomes
    ///   `F32`, and so does [`ParamStore::dtype`](amp_core::ParamStore::dtype));
    /// - every write of θ or θ + δ also writes the vars, rounded to their
    ///   dtype, so the model's forward pass sees the current weights in its
    ///   own precision (θ + δ on perturbed passes, θ between steps);
    /// - the model's gradients arrive in its half dtype
    ///   ([`CandleStore::backward`], [`CandleStore::absorb_grads`]) and are
    ///   widened to f32 when taken; gradients in f32 are accepted too;
    /// - [`ParamStore::read`](amp_core::ParamStore::read) and
    ///   [`ParamStore::write`](amp_core::ParamStore::write) of the parameters
    ///   (and so checkpoints) see the master copy.
    ///
    /// Memory: one f32 copy of the parameters (4 bytes per parameter), and
    /// AMP's and the base optimiser's buffers in f32 instead of the vars'
    /// dtype (twice the size: with SGD momentum and copy-restore at K = 1,
    /// 8 bytes per parameter instead of 4).
    ///
    /// Call it before the store is handed to an optimiser (no buffer may
    /// exist yet); gradients already held are dropped. Refused for vars
    /// that are not f16 or bf16.
    ///
    /// ```
    /// use amp_candle::CandleStore;
    /// use amp_core::ParamStore;
    /// use candle_core::{DType, Device, Tensor, Var};
    ///
    /// let w = Var::from_tensor(&Tensor::ones(3, DType::BF16, &Device::Cpu)?)?;
    /// let store = CandleStore::from_vars(vec![w.clone()])?.with_master_weights()?;
    /// assert_eq!(store.candle_dtype(), DType::F32);
    /// assert_eq!(store.model_dtype(), DType::BF16);
    /// assert_eq!(store.dtype(), amp_core::DType::F32);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn with_master_weights(mut self) -> Result<Self> {
        let model = self.model_dtype();
        if !matches!(model, CDType::F16 | CDType::BF16) {
            return Err(AmpError::config(
                "master_weights",
                format!("master weights are for f16 and bf16 vars, these are {model:?}"),
            ));
        }
        if self.master.is_some() {
            return Ok(self);
        }
        if !self.buffers.is_empty() {
            return Err(AmpError::config(
                "master_weights",
                "the store already holds buffers: keep master weights before building the \
                 optimiser",
            ));
        }
        let master = self
            .vars
            .iter()
            .map(|v| cast(v.as_tensor(), CDType::F32))
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(backend)?;
        self.master = Some(master);
        self.dtype = CDType::F32;
        self.compute = compute_dtype(CDType::F32);
        self.grads.iter_mut().for_each(|g| *g = None);
        self.has_grad.fill(false);
        Ok(self)
    }

    /// Whether the store keeps master weights
    /// ([`CandleStore::with_master_weights`]).
    pub fn has_master_weights(&self) -> bool {
        self.master.is_some()
    }
}
