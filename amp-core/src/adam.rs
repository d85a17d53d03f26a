//! [`Adam`]: Adam and AdamW with PyTorch's semantics, written once against
//! [`ParamStore`].

use crate::elementwise::{AdamCoefficients, AdamSlots};
use crate::error::{AmpError, Result};
use crate::optimizer::{BaseOptimizer, OptimizerState, StepContext};
use crate::store::{check_len, check_shape, BufferId, ParamStore, Scalar, Slot};

/// Settings of [`Adam`]; learning rate and weight decay come from the
/// parameter groups of [`AmpConfig`](crate::AmpConfig).
///
/// ```
/// use amp_core::AdamConfig;
///
/// let adamw = AdamConfig::adamw().betas(0.9, 0.95).eps(1e-6);
/// assert!(adamw.decoupled_weight_decay);
/// assert!(adamw.validate().is_ok());
/// assert!(AdamConfig::adam().betas(1.0, 0.999).validate().is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamConfig {
    /// Decay of the first-moment average, in `[0, 1)`. Default `0.9`.
    pub beta1: f64,
    /// Decay of the second-moment average, in `[0, 1)`. Default `0.999`.
    pub beta2: f64,
    /// Added to the denominator, finite and ≥ 0. Default `1e-8`. (Not AMP's
    /// radius ε, [`AmpConfig::epsilon`](crate::AmpConfig::epsilon).)
    pub eps: f64,
    /// `false`: Adam, the weight decay is added to the gradient (L2,
    /// `g + λθ`). `true`: AdamW (Loshchilov & Hutter), the weights are
    /// shrunk by `1 − lr·λ` before the update.
    pub decoupled_weight_decay: bool,
    /// AMSGrad: divide by the running maximum of the second moment. Default
    /// `false`.
    pub amsgrad: bool,
}

impl AdamConfig {
    /// Adam with PyTorch's defaults: betas (0.9, 0.999), eps 1e-8, weight
    /// decay (from the groups) added to the gradient.
    pub fn adam() -> Self {
        AdamConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            decoupled_weight_decay: false,
            amsgrad: false,
        }
    }

    /// AdamW: [`AdamConfig::adam`] with decoupled weight decay. PyTorch's
    /// `AdamW` defaults to a weight decay of 0.01; here it comes from
    /// [`AmpConfig::weight_decay`](crate::AmpConfig::weight_decay) (default
    /// 0), so set it there.
    pub fn adamw() -> Self {
        AdamConfig {
            decoupled_weight_decay: true,
            ..AdamConfig::adam()
        }
    }

    /// Sets both betas.
    pub fn betas(mut self, beta1: f64, beta2: f64) -> Self {
        self.beta1 = beta1;
        self.beta2 = beta2;
        self
    }

    /// Sets [`AdamConfig::eps`].
    pub fn eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }

    /// Sets [`AdamConfig::amsgrad`].
    pub fn amsgrad(mut self, amsgrad: bool) -> Self {
        self.amsgrad = amsgrad;
        self
    }

    /// Sets [`AdamConfig::decoupled_weight_decay`].
    pub fn decoupled_weight_decay(mut self, decoupled: bool) -> Self {
        self.decoupled_weight_decay = decoupled;
        self
    }

    /// Checks every field; the error names the field and the reason.
    pub fn validate(&self) -> Result<()> {
        for (field, beta) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(beta.is_finite() && (0.0..1.0).contains(&beta)) {
                return Err(AmpError::config(
                    field,
                    format!("must be in [0, 1), got {beta}"),
                ));
            }
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return Err(AmpError::config(
                "eps",
                format!("must be finite and non-negative, got {}", self.eps),
            ));
        }
        Ok(())
    }
}

/// The buffers Adam holds, allocated together on its first step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Moments {
    exp_avg: BufferId,
    exp_avg_sq: BufferId,
    max_exp_avg_sq: Option<BufferId>,
}

impl Moments {
    fn ids(self) -> Vec<BufferId> {
        let mut ids = vec![self.exp_avg, self.exp_avg_sq];
        ids.extend(self.max_exp_avg_sq);
        ids
    }
}

const EXP_AVG: &str = "exp_avg";
const EXP_AVG_SQ: &str = "exp_avg_sq";
const MAX_EXP_AVG_SQ: &str = "max_exp_avg_sq";
const STEP: &str = "step";

/// Adam (Kingma & Ba) and AdamW (Loshchilov & Hutter) with PyTorch's
/// semantics (`torch.optim.Adam` / `AdamW`, and libtorch's C++ `Adam` /
/// `AdamW`, whose arithmetic this follows operation by operation).
///
/// For each tensor with gradient `g` (lr and weight decay λ from its group),
/// `t` the number of steps this tensor has taken, this one included:
/// ```text
/// θ = θ · (1 − lr·λ)                        AdamW (decoupled)
/// g = g + λ·θ                               Adam (L2)
/// m = β₁·m + (1 − β₁)·g
/// v = β₂·v + (1 − β₂)·g·g
/// v̂ = max(v̂, v)                            AMSGrad (v̂ replaces v below)
/// θ = θ − (lr / (1 − β₁ᵗ)) · m / (√v / √(1 − β₂ᵗ) + eps)
/// ```
/// `m`, `v` (and `v̂`) are parameter-sized buffers allocated on the first
/// step, zero-filled; `t` is counted per tensor, so a tensor that had no
/// gradient at some step is bias-corrected for the steps it took, as
/// PyTorch does. The state (buffers and `t`) is part of
/// [`AmpState`](crate::AmpState) and of checkpoints.
///
/// Like [`Sgd`](crate::Sgd), it updates its buffers in place: a store
/// operation that fails inside its update (not the closure, whose failures
/// happen before the base step) can leave them part-way.
///
/// ```
/// use amp_core::{AdamConfig, Amp, AmpConfig};
/// # use amp_core::{AmpError, DType, Result, TensorOps, TensorStore};
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
/// // L(θ) = ½‖θ‖², ∇L = θ; AdamW with λ = 0.01 under AMP.
/// let store = TensorStore::new(Host, vec![vec![1.0, -2.0]]);
/// let config = AmpConfig::new(1e-3, 0.05).weight_decay(0.01);
/// let mut amp = Amp::new(store, config, amp_core::Adam::new(AdamConfig::adamw())?)?;
/// for _ in 0..3 {
///     amp.step(|s: &mut TensorStore<Host>, _pass| {
///         let g = s.params()[0].clone();
///         let loss = 0.5 * g.iter().map(|x| x * x).sum::<f64>();
///         s.set_grad(0, g)?;
///         Ok::<_, AmpError>(((), loss))
///     })?;
/// }
/// // Adam's first steps move each weight by about lr against its gradient.
/// let w = &amp.store().params()[0];
/// assert!((w[0] - (1.0 - 3e-3)).abs() < 1e-4 && (w[1] - (-2.0 + 3e-3)).abs() < 1e-4);
/// # Ok::<(), AmpError>(())
/// ```
#[derive(Debug)]
pub struct Adam {
    config: AdamConfig,
    moments: Option<Moments>,
    /// Per tensor: steps taken (`t`).
    steps: Vec<u64>,
}

impl Adam {
    /// Builds the optimiser, validating the settings.
    pub fn new(config: AdamConfig) -> Result<Self> {
        config.validate()?;
        Ok(Adam {
            config,
            moments: None,
            steps: Vec::new(),
        })
    }

    /// The settings.
    pub fn config(&self) -> &AdamConfig {
        &self.config
    }

    /// Per tensor: the steps it has taken (empty before the first step).
    pub fn steps(&self) -> &[u64] {
        &self.steps
    }

    /// The first- and second-moment buffers (and AMSGrad's maximum), once
    /// a step has allocated them.
    pub fn buffers(&self) -> Vec<BufferId> {
        self.moments.map(Moments::ids).unwrap_or_default()
    }

    /// Allocates and pins the buffers; on failure nothing stays allocated.
    fn allocate<S: ParamStore>(&self, store: &mut S) -> Result<Moments> {
        let mut ids = Vec::new();
        let count = if self.config.amsgrad { 3 } else { 2 };
        let made = (0..count).try_for_each(|_| {
            let id = store.alloc_buffer()?;
            ids.push(id);
            store.pin_buffer(id, true)
        });
        if let Err(error) = made {
            release(store, &ids);
            return Err(error);
        }
        Ok(Moments {
            exp_avg: ids[0],
            exp_avg_sq: ids[1],
            max_exp_avg_sq: ids.get(2).copied(),
        })
    }
}

/// Unpins and frees buffers, ignoring failures (cleanup after an error, or
/// old state replaced by a loaded one).
fn release<S: ParamStore>(store: &mut S, ids: &[BufferId]) {
    for &id in ids {
        let _ = store.pin_buffer(id, false);
        let _ = store.free_buffer(id);
    }
}

impl<S: ParamStore> BaseOptimizer<S> for Adam {
    fn validate(&self) -> Result<()> {
        self.config.validate()
    }

    fn kind(&self) -> &'static str {
        if self.config.decoupled_weight_decay {
            "adamw"
        } else {
            "adam"
        }
    }

    fn settings(&self) -> Vec<(&'static str, f64)> {
        vec![
            ("beta1", self.config.beta1),
            ("beta2", self.config.beta2),
            ("eps", self.config.eps),
            ("amsgrad", f64::from(u8::from(self.config.amsgrad))),
        ]
    }

    fn step(&mut self, store: &mut S, ctx: &StepContext<'_, S::Scalar>) -> Result<()> {
        let n = store.num_tensors();
        check_len("step mask", n, ctx.mask.len())?;
        check_len("learning rates", n, ctx.lr.len())?;
        check_len("weight decays", n, ctx.weight_decay.len())?;
        if self.moments.is_some() && self.steps.len() != n {
            return Err(AmpError::state(format!(
                "this Adam holds moments for {} tensors but the store has {n}: \
                 it was used with another store",
                self.steps.len()
            )));
        }
        let mask = ctx.mask;
        let steps: Vec<u64> = (0..n)
            .map(|i| {
                let taken = self.steps.get(i).copied().unwrap_or(0);
                if mask[i] {
                    taken
                        .checked_add(1)
                        .ok_or(AmpError::CounterOverflow("adam step"))
                } else {
                    Ok(taken)
                }
            })
            .collect::<Result<_>>()?;
        let moments = match self.moments {
            Some(moments) => moments,
            None => {
                let moments = self.allocate(store)?;
                self.moments = Some(moments);
                self.steps = vec![0; n];
                moments
            }
        };
        let c = &self.config;
        let scalar = S::Scalar::from_f64_rounded;
        let lr: Vec<f64> = ctx.lr.iter().map(|x| x.widen()).collect();
        let wd: Vec<f64> = ctx.weight_decay.iter().map(|x| x.widen()).collect();

        // Bias corrections in f64 from each tensor's own step count, as
        // PyTorch computes them, rounded once to the store's scalar type.
        let coefficients: Vec<AdamCoefficients<S::Scalar>> = (0..n)
            .map(|i| {
                // `powf`, not `powi`: the C library's `pow`, as `std::pow`.
                let t = steps[i] as f64;
                let correction1 = 1.0 - c.beta1.powf(t);
                let correction2 = 1.0 - c.beta2.powf(t);
                let decays = mask[i] && wd[i] != 0.0;
                AdamCoefficients {
                    shrink: scalar(if decays && c.decoupled_weight_decay {
                        1.0 - lr[i] * wd[i]
                    } else {
                        1.0
                    }),
                    l2: if decays && !c.decoupled_weight_decay {
                        ctx.weight_decay[i]
                    } else {
                        scalar(0.0)
                    },
                    beta1: (scalar(c.beta1), scalar(1.0 - c.beta1)),
                    beta2: (scalar(c.beta2), scalar(1.0 - c.beta2)),
                    step: scalar(-(lr[i] / correction1)),
                    divisor: scalar(correction2.sqrt()),
                    eps: scalar(c.eps),
                }
            })
            .collect();
        let slots = AdamSlots {
            exp_avg: Slot::Buffer(moments.exp_avg),
            exp_avg_sq: Slot::Buffer(moments.exp_avg_sq),
            max_exp_avg_sq: moments.max_exp_avg_sq.map(Slot::Buffer),
        };
        store.adam_update(slots, &coefficients, mask)?;
        self.steps = steps;
        Ok(())
    }

    fn save_state(&self, store: &S) -> Result<OptimizerState> {
        let mut state = OptimizerState::default();
        let Some(moments) = self.moments else {
            return Ok(state);
        };
        let mut named = vec![(EXP_AVG, moments.exp_avg), (EXP_AVG_SQ, moments.exp_avg_sq)];
        if let Some(max) = moments.max_exp_avg_sq {
            named.push((MAX_EXP_AVG_SQ, max));
        }
        for (name, id) in named {
            let tensors = self
                .steps
                .iter()
                .enumerate()
                .map(|(i, &t)| (t > 0).then(|| store.read(Slot::Buffer(id), i)).transpose())
                .collect::<Result<Vec<_>>>()?;
            state.buffers.push((name.to_string(), tensors));
        }
        state.scalars.push((
            STEP.to_string(),
            self.steps.iter().map(|&t| t as f64).collect(),
        ));
        Ok(state)
    }

    fn load_state(&mut self, store: &mut S, state: &OptimizerState) -> Result<()> {
        let n = store.num_tensors();
        if state.buffers.is_empty() && state.scalars.is_empty() {
            // No state saved: start afresh.
            if let Some(moments) = self.moments.take() {
                release(store, &moments.ids());
            }
            self.steps.clear();
            return Ok(());
        }
        let steps = parse_steps(state, n)?;
        let mut wanted = vec![EXP_AVG, EXP_AVG_SQ];
        if self.config.amsgrad {
            wanted.push(MAX_EXP_AVG_SQ);
        }
        let mut tensors = Vec::new();
        for name in &wanted {
            let found: Vec<_> = state.buffers.iter().filter(|(b, _)| b == name).collect();
            let [(_, values)] = found.as_slice() else {
                return Err(AmpError::state(format!(
                    "an Adam state holds {name:?} once, found it {} times",
                    found.len()
                )));
            };
            check_len("Adam state tensors", n, values.len())?;
            for (i, value) in values.iter().enumerate() {
                match value {
                    Some(t) => check_shape(i, &store.shape(i)?, t.shape())?,
                    None if steps[i] > 0 => {
                        return Err(AmpError::state(format!(
                            "{name:?} of tensor {i} is missing though it took {} steps",
                            steps[i]
                        )))
                    }
                    None => {}
                }
            }
            tensors.push(values);
        }
        if let Some((name, _)) = state
            .buffers
            .iter()
            .find(|(name, _)| !wanted.contains(&name.as_str()))
        {
            return Err(AmpError::state(format!(
                "this Adam (amsgrad {}) has no state buffer named {name:?}",
                self.config.amsgrad
            )));
        }
        // Written into fresh buffers, which replace the old ones only once
        // every tensor is in: a failure part-way leaves the old state whole.
        let fresh = self.allocate(store)?;
        let written = fresh
            .ids()
            .iter()
            .zip(&tensors)
            .try_for_each(|(&id, values)| {
                values.iter().enumerate().try_for_each(|(i, t)| match t {
                    Some(t) if steps[i] > 0 => store.write(Slot::Buffer(id), i, t),
                    _ => Ok(()),
                })
            });
        if let Err(error) = written {
            release(store, &fresh.ids());
            return Err(error);
        }
        if let Some(old) = self.moments.replace(fresh) {
            release(store, &old.ids());
        }
        self.steps = steps;
        Ok(())
    }

    fn buffers_held(&self) -> usize {
        self.buffers().len()
    }
}

/// The per-tensor step counts of a saved state: whole, non-negative, exact
/// in `f64`.
fn parse_steps(state: &OptimizerState, n: usize) -> Result<Vec<u64>> {
    let found: Vec<_> = state
        .scalars
        .iter()
        .filter(|(name, _)| name == STEP)
        .collect();
    let [(_, values)] = found.as_slice() else {
        return Err(AmpError::state(format!(
            "an Adam state holds {STEP:?} once, found it {} times",
            found.len()
        )));
    };
    if let Some((name, _)) = state.scalars.iter().find(|(name, _)| name != STEP) {
        return Err(AmpError::state(format!(
            "Adam has no state value named {name:?}"
        )));
    }
    check_len("Adam step counts", n, values.len())?;
    values
        .iter()
        .map(|&t| {
            if t.is_finite() && t >= 0.0 && t.fract() == 0.0 && t <= 2f64.powi(53) {
                Ok(t as u64)
            } else {
                Err(AmpError::state(format!(
                    "an Adam step count must be a whole number in [0, 2^53], got {t}"
                )))
            }
        })
        .collect()
}
