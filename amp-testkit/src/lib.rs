//! # amp-testkit
//!
//! The conformance kit every `amp` backend is checked with. AMP here is
//! *adversarial model perturbation*, not automatic mixed precision.
//!
//! - [`Objective`]: analytic losses whose gradients are computed on the host
//!   in `f64` from the weights read back through [`ParamStore::read`], and
//!   written with [`ParamStore::write`] into [`Slot::Grads`]. Every backend
//!   therefore sees the same gradient at the same weights (rounded to its
//!   dtype).
//! - [`reference`](mod@reference): a direct, loop-by-loop transcription of the algorithm in
//!   plain `f64`, independent of every `ParamStore`; it checks the ndarray
//!   oracle, which in turn checks the other backends.
//! - [`Case`] and [`run_case`]: run a multi-step AMP schedule on any store
//!   built by a factory and collect weights, momentum and diagnostics.
//! - [`properties`]: the invariants of the algorithm as functions that a
//!   proptest body calls for any backend.
//! - [`strategies`]: proptest generators of cases.
//! - [`autograd`]: the framework side — runs whose gradients come from the
//!   backend's own autograd, checking that the model sees θ + δ on every
//!   perturbed pass and that gradients are collected as the loss demands.
#![warn(missing_docs)]

pub mod autograd;
mod base;
mod compare;
mod contract;
pub mod data_parallel;
pub mod faulty;
pub mod grid;
pub mod hooked;
pub mod properties;
pub mod reference;
mod scaling;
mod split;
pub mod strategies;
pub mod tensor_ops;

use std::cell::Cell;

use amp_core::{
    AdamConfig, Amp, AmpConfig, AmpError, BaseOptimizer, DType, HostTensor, OptimizerState,
    ParamStore, Pass, Result, SgdConfig, Slot,
};

pub use crate::base::CaseBase;
pub use crate::compare::{
    compare_outcomes, compare_tensors, compare_with_oracle, Conditioning, Tolerance,
};

/// Builds a store holding the given initial values (shapes and dtype included).
pub trait StoreFactory {
    /// The store type.
    type Store: ParamStore;
    /// Makes a fresh store; its dtype is `dtype`, its values `values` rounded
    /// to it.
    fn make(&self, values: &[HostTensor], dtype: DType) -> Result<Self::Store>;
    /// A human-readable name, such as `"ndarray f32"`.
    fn name(&self) -> String;
    /// Whether the framework has 0-d (scalar) tensors. When it has not,
    /// the suites give every case's 0-d tensor the shape `[1]` instead
    /// ([`Case::fitted_to`]).
    fn zero_dim_tensors(&self) -> bool {
        true
    }
}

/// An analytic, non-separable loss over all parameter tensors:
///
/// ```text
/// L(θ) = ½ Σᵢ Σⱼ aᵢⱼ (θᵢⱼ − cᵢⱼ)²  +  ½ β (Σᵢ Σⱼ wᵢⱼ θᵢⱼ)²
/// ∂L/∂θᵢⱼ = aᵢⱼ (θᵢⱼ − cᵢⱼ) + β s wᵢⱼ,   s = Σ wθ
/// ```
///
/// The coupling term makes every tensor's gradient depend on every other
/// tensor, as in a real network. Tensors listed in `frozen` get no gradient.
#[derive(Clone, Debug, PartialEq)]
pub struct Objective {
    /// Per-element curvature `a` (> 0), one flat vector per tensor.
    pub curvature: Vec<Vec<f64>>,
    /// Per-element centre `c`.
    pub center: Vec<Vec<f64>>,
    /// Coupling weights `w`.
    pub coupling_weights: Vec<Vec<f64>>,
    /// Coupling strength β ≥ 0.
    pub coupling: f64,
    /// `true` for tensors that receive no gradient.
    pub frozen: Vec<bool>,
}

impl Objective {
    /// Loss and per-tensor gradients (`None` for frozen tensors) at `theta`.
    pub fn evaluate(&self, theta: &[Vec<f64>]) -> (f64, Vec<Option<Vec<f64>>>) {
        let mut s = 0.0;
        for (t, w) in theta.iter().zip(&self.coupling_weights) {
            for (x, w) in t.iter().zip(w) {
                s += w * x;
            }
        }
        let mut loss = 0.5 * self.coupling * s * s;
        let mut grads = Vec::with_capacity(theta.len());
        for (i, t) in theta.iter().enumerate() {
            let (a, c, w) = (
                &self.curvature[i],
                &self.center[i],
                &self.coupling_weights[i],
            );
            let mut g = Vec::with_capacity(t.len());
            for j in 0..t.len() {
                let d = t[j] - c[j];
                loss += 0.5 * a[j] * d * d;
                g.push(a[j] * d + self.coupling * s * w[j]);
            }
            grads.push((!self.frozen[i]).then_some(g));
        }
        (loss, grads)
    }

    /// A gradient function for any store: reads θ back, evaluates on the
    /// host, writes the gradients. `calls` counts the calls, `fault` injects
    /// failures.
    pub fn grad_fn<'a, S: ParamStore>(
        &'a self,
        calls: &'a Cell<usize>,
        fault: Fault,
    ) -> impl FnMut(&mut S, Pass) -> Result<((), f64)> + 'a {
        move |store: &mut S, _pass: Pass| {
            let call = calls.get() + 1;
            calls.set(call);
            if fault == Fault::Error(call) {
                return Err(AmpError::backend(format!(
                    "injected failure on call {call}"
                )));
            }
            if fault == Fault::Panic(call) {
                std::panic::panic_any(InjectedPanic(call));
            }
            let theta = read_slot(store, Slot::Params)?;
            let (mut loss, grads) = self.evaluate(&host_values(&theta));
            for (i, g) in grads.into_iter().enumerate() {
                if let Some(mut g) = g {
                    if fault == Fault::NanGradient(call) && !g.is_empty() {
                        g[0] = f64::NAN;
                    }
                    let t = HostTensor::new(theta[i].shape().to_vec(), theta[i].dtype(), g)?;
                    store.write_grad(i, &t)?;
                }
            }
            if fault == Fault::NanLoss(call) {
                loss = f64::NAN;
            }
            Ok(((), loss))
        }
    }
}

/// A failure injected into the `n`-th closure call (1-based, counted over the
/// whole run).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// No failure.
    None,
    /// The closure returns an error on call `n`.
    Error(usize),
    /// The closure reports a NaN loss on call `n`.
    NanLoss(usize),
    /// The closure writes a NaN into the first element of a gradient on call
    /// `n` (when some gradient has an element).
    NanGradient(usize),
    /// The closure panics on call `n` (with an [`InjectedPanic`] payload).
    Panic(usize),
}

/// The payload of a panic injected by the conformance kit ([`Fault::Panic`],
/// [`faulty::FaultyStore`]); the panic hook of [`quiet_injected_panics`]
/// does not print it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InjectedPanic(pub usize);

/// Installs (once) a panic hook that stays silent for [`InjectedPanic`]
/// payloads and hands every other panic to the previous hook, so that the
/// properties that inject panics do not flood the test output.
pub fn quiet_injected_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<InjectedPanic>().is_none() {
                previous(info);
            }
        }));
    });
}

/// A multi-step AMP run on an analytic objective.
#[derive(Clone, Debug)]
pub struct Case {
    /// Initial weights (shapes and values; the dtype is chosen per run).
    pub init: Vec<HostTensor>,
    /// The objective.
    pub objective: Objective,
    /// AMP's configuration (groups included).
    pub config: AmpConfig,
    /// The SGD settings (the base optimiser unless `adam` is set).
    pub sgd: SgdConfig,
    /// When set, the base optimiser is [`Adam`](amp_core::Adam) with these
    /// settings instead of SGD.
    pub adam: Option<AdamConfig>,
    /// Number of steps.
    pub steps: usize,
}

impl Case {
    /// Whether step `step` (0-based) perturbs: `inner_iter ≥ 1` and the
    /// configuration's `start_step` and `interval` say so.
    pub fn perturbs_at(&self, step: usize) -> bool {
        let (step, c) = (step as u64, &self.config);
        c.inner_iter > 0 && step >= c.start_step && (step - c.start_step) % c.interval.max(1) == 0
    }

    /// The closure calls of step `step`: K + 1 when it perturbs, else 1.
    pub fn calls_at(&self, step: usize) -> usize {
        if self.perturbs_at(step) {
            self.config.inner_iter + 1
        } else {
            1
        }
    }

    /// This case with every 0-d tensor given the shape `[1]` (same value).
    pub fn without_zero_dim(mut self) -> Case {
        self.init = self
            .init
            .into_iter()
            .map(|t| match t.shape() {
                [] => t.clone().reshaped(vec![1]).unwrap_or(t),
                _ => t,
            })
            .collect();
        self
    }

    /// This case as `factory`'s framework can hold it: unchanged, or
    /// [`Case::without_zero_dim`] when the factory says the framework has
    /// no 0-d tensors.
    pub fn fitted_to<F: StoreFactory>(self, factory: &F) -> Case {
        if factory.zero_dim_tensors() {
            self
        } else {
            self.without_zero_dim()
        }
    }

    /// The optimiser of this case over `store`.
    pub fn build<S: ParamStore>(&self, store: S) -> Result<Amp<S, CaseBase>> {
        Amp::new(
            store,
            self.config.clone(),
            CaseBase::new(self.sgd, self.adam)?,
        )
    }
}

/// What a run produced.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// Final weights.
    pub params: Vec<HostTensor>,
    /// The base optimiser's final state: its buffers (SGD's momentum,
    /// Adam's moments; `None` per tensor where uninitialised) and values
    /// (Adam's step counts).
    pub base_state: OptimizerState,
    /// Per step: the clean loss.
    pub losses: Vec<f64>,
    /// Per step: the perturbed losses.
    pub perturbed_losses: Vec<Vec<f64>>,
    /// Per step: ‖δ_K‖ per tensor.
    pub perturbation_norms: Vec<Vec<f64>>,
    /// Per step: tensors clipped at the last projection.
    pub clipped: Vec<usize>,
    /// Total closure calls.
    pub closure_calls: usize,
}

/// Reads every tensor of a slot to the host.
pub fn read_slot<S: ParamStore>(store: &S, slot: Slot) -> Result<Vec<HostTensor>> {
    (0..store.num_tensors())
        .map(|i| store.read(slot, i))
        .collect()
}

/// The flat values of host tensors.
pub fn host_values(tensors: &[HostTensor]) -> Vec<Vec<f64>> {
    tensors.iter().map(|t| t.data().to_vec()).collect()
}

/// The base optimiser's state, read to the host.
pub fn base_state<S: ParamStore, O: BaseOptimizer<S>>(amp: &Amp<S, O>) -> Result<OptimizerState> {
    amp.base().save_state(amp.store())
}

/// Runs `case` on a store from `factory` with dtype `dtype`.
pub fn run_case<F: StoreFactory>(factory: &F, case: &Case, dtype: DType) -> Result<Outcome> {
    let calls = Cell::new(0);
    let grad_fn = case.objective.grad_fn(&calls, Fault::None);
    let mut out = run_case_with(factory, case, dtype, grad_fn, |_: &mut F::Store, _| Ok(()))?;
    out.closure_calls = calls.get();
    Ok(out)
}

/// Runs `case` on a store from `factory` with dtype `dtype` and the
/// gradient function `grad_fn`; `after_step(store, step)` runs after each
/// step (0-based). The outcome counts the closure calls.
pub fn run_case_with<F, G, A>(
    factory: &F,
    case: &Case,
    dtype: DType,
    mut grad_fn: G,
    mut after_step: A,
) -> Result<Outcome>
where
    F: StoreFactory,
    G: FnMut(&mut F::Store, Pass) -> Result<((), f64)>,
    A: FnMut(&mut F::Store, usize) -> Result<()>,
{
    let store = factory.make(&case.init, dtype)?;
    let mut amp = case.build(store)?;
    let mut out = Outcome {
        params: Vec::new(),
        base_state: OptimizerState::default(),
        losses: Vec::new(),
        perturbed_losses: Vec::new(),
        perturbation_norms: Vec::new(),
        clipped: Vec::new(),
        closure_calls: 0,
    };
    for step in 0..case.steps {
        let report = amp.step(&mut grad_fn)?;
        out.closure_calls += report.closure_calls;
        out.losses.push(report.loss);
        out.perturbed_losses.push(report.perturbed_losses);
        out.perturbation_norms.push(report.perturbation_norms);
        out.clipped.push(report.clipped);
        after_step(amp.store_mut(), step)?;
    }
    out.params = read_slot(amp.store(), Slot::Params)?;
    out.base_state = base_state(&amp)?;
    Ok(out)
}

/// The ndarray oracle as a [`StoreFactory`].
#[derive(Clone, Copy, Debug, Default)]
pub struct NdFactory;

impl StoreFactory for NdFactory {
    type Store = NdAny;

    fn make(&self, values: &[HostTensor], dtype: DType) -> Result<NdAny> {
        fn build<T: amp_ndarray::Element>(
            values: &[HostTensor],
        ) -> Result<Vec<ndarray::ArrayD<T>>> {
            values
                .iter()
                .map(|v| {
                    ndarray::ArrayD::from_shape_vec(
                        ndarray::IxDyn(v.shape()),
                        v.data().iter().map(|&x| T::from_f64_rounded(x)).collect(),
                    )
                    .map_err(AmpError::backend)
                })
                .collect()
        }
        match dtype {
            DType::F32 => Ok(NdAny::F32(amp_ndarray::NdStore::new(build(values)?))),
            DType::F64 => Ok(NdAny::F64(amp_ndarray::NdStore::new(build(values)?))),
            other => Err(AmpError::backend(format!("ndarray has no {other} store"))),
        }
    }

    fn name(&self) -> String {
        "ndarray".into()
    }
}

/// An ndarray store of either precision (the scalar type is fixed per run,
/// so the factory hides it behind this enum, which forwards every call).
#[derive(Clone, Debug)]
pub enum NdAny {
    /// An `f32` store.
    F32(amp_ndarray::NdStore<f32>),
    /// An `f64` store.
    F64(amp_ndarray::NdStore<f64>),
}

/// Forwards one `ParamStore` call to the inner store, converting scalars.
macro_rules! forward {
    ($self:ident, $s:ident => $body:expr) => {
        match $self {
            NdAny::F32($s) => $body,
            NdAny::F64($s) => $body,
        }
    };
}

fn to<T: amp_core::Scalar>(values: &[f64]) -> Vec<T> {
    values.iter().map(|&v| T::from_f64_rounded(v)).collect()
}

impl ParamStore for NdAny {
    // Coefficients arrive as f64 and are rounded to the inner store's scalar
    // type before use, exactly as a typed store would receive them.
    type Scalar = f64;
    type Norms = Vec<f64>;

    fn num_tensors(&self) -> usize {
        forward!(self, s => s.num_tensors())
    }
    fn shape(&self, index: usize) -> Result<Vec<usize>> {
        forward!(self, s => s.shape(index))
    }
    fn dtype(&self) -> DType {
        forward!(self, s => s.dtype())
    }
    fn zero_grads(&mut self) -> Result<()> {
        forward!(self, s => s.zero_grads())
    }
    fn grad_mask(&self) -> Result<Vec<bool>> {
        forward!(self, s => s.grad_mask())
    }
    fn alloc_buffer(&mut self) -> Result<amp_core::BufferId> {
        forward!(self, s => s.alloc_buffer())
    }
    fn free_buffer(&mut self, id: amp_core::BufferId) -> Result<()> {
        forward!(self, s => s.free_buffer(id))
    }
    fn pin_buffer(&mut self, id: amp_core::BufferId, pinned: bool) -> Result<()> {
        forward!(self, s => s.pin_buffer(id, pinned))
    }
    fn copy(&mut self, dst: Slot, src: Slot, mask: &[bool]) -> Result<()> {
        forward!(self, s => s.copy(dst, src, mask))
    }
    fn addcmul(&mut self, dst: Slot, alpha: &[f64], a: Slot, b: Slot, mask: &[bool]) -> Result<()> {
        forward!(self, s => s.addcmul(dst, &to(alpha), a, b, mask))
    }
    fn addcdiv_sqrt(
        &mut self,
        dst: Slot,
        alpha: &[f64],
        num: Slot,
        den: Slot,
        divisor: &[f64],
        eps: &[f64],
        mask: &[bool],
    ) -> Result<()> {
        forward!(self, s => s.addcdiv_sqrt(dst, &to(alpha), num, den, &to(divisor), &to(eps), mask))
    }
    fn maximum(&mut self, dst: Slot, src: Slot, mask: &[bool]) -> Result<()> {
        forward!(self, s => s.maximum(dst, src, mask))
    }
    fn adam_update(
        &mut self,
        slots: amp_core::AdamSlots,
        coefficients: &[amp_core::AdamCoefficients<f64>],
        mask: &[bool],
    ) -> Result<()> {
        fn round<T: amp_core::Scalar>(
            c: &amp_core::AdamCoefficients<f64>,
        ) -> amp_core::AdamCoefficients<T> {
            let r = T::from_f64_rounded;
            amp_core::AdamCoefficients {
                shrink: r(c.shrink),
                l2: r(c.l2),
                beta1: (r(c.beta1.0), r(c.beta1.1)),
                beta2: (r(c.beta2.0), r(c.beta2.1)),
                step: r(c.step),
                divisor: r(c.divisor),
                eps: r(c.eps),
            }
        }
        forward!(self, s => s.adam_update(slots, &coefficients.iter().map(round).collect::<Vec<_>>(), mask))
    }
    fn sgd_update(
        &mut self,
        weights: Slot,
        momentum: Option<&amp_core::SgdMomentum<f64>>,
        coefficients: &[amp_core::SgdCoefficients<f64>],
        mask: &[bool],
    ) -> Result<()> {
        fn round<T: amp_core::Scalar>(
            c: &amp_core::SgdCoefficients<f64>,
        ) -> amp_core::SgdCoefficients<T> {
            amp_core::SgdCoefficients {
                weight_decay: T::from_f64_rounded(c.weight_decay),
                step: T::from_f64_rounded(c.step),
                first: c.first,
            }
        }
        fn momentum_in<T: amp_core::Scalar>(
            m: Option<&amp_core::SgdMomentum<f64>>,
        ) -> Option<amp_core::SgdMomentum<T>> {
            m.map(|m| amp_core::SgdMomentum {
                buffer: m.buffer,
                momentum: T::from_f64_rounded(m.momentum),
                keep: T::from_f64_rounded(m.keep),
                nesterov: m.nesterov,
            })
        }
        forward!(self, s => s.sgd_update(
            weights,
            momentum_in(momentum).as_ref(),
            &coefficients.iter().map(round).collect::<Vec<_>>(),
            mask,
        ))
    }
    fn axpy_from(
        &mut self,
        dst: Slot,
        base: Slot,
        alpha: &[f64],
        src: Slot,
        mask: &[bool],
    ) -> Result<()> {
        forward!(self, s => s.axpy_from(dst, base, &to(alpha), src, mask))
    }
    fn perturb_from_grads(
        &mut self,
        snapshot: Option<Slot>,
        delta: Option<Slot>,
        inner_lr: &[f64],
        epsilon: &[f64],
        mask: &[bool],
    ) -> Result<Vec<f64>> {
        forward!(self, s => {
            let n = s.perturb_from_grads(snapshot, delta, &to(inner_lr), &to(epsilon), mask)?;
            s.norms_to_host(&n)
        })
    }
    fn scale(&mut self, dst: Slot, factor: &[f64], mask: &[bool]) -> Result<()> {
        forward!(self, s => s.scale(dst, &to(factor), mask))
    }
    fn axpy(&mut self, dst: Slot, alpha: &[f64], src: Slot, mask: &[bool]) -> Result<()> {
        forward!(self, s => s.axpy(dst, &to(alpha), src, mask))
    }
    fn norms(&mut self, src: Slot, mask: &[bool]) -> Result<Vec<f64>> {
        forward!(self, s => {
            let n = s.norms(src, mask)?;
            s.norms_to_host(&n)
        })
    }
    fn clip_to_norms(
        &mut self,
        dst: Slot,
        norms: &Vec<f64>,
        max_norm: &[f64],
        mask: &[bool],
    ) -> Result<()> {
        forward!(self, s => s.clip_to_norms(dst, &to(norms), &to(max_norm), mask))
    }
    fn norms_to_host(&self, norms: &Vec<f64>) -> Result<Vec<f64>> {
        Ok(norms.clone())
    }
    fn all_finite(&mut self, src: Slot, mask: &[bool]) -> Result<bool> {
        forward!(self, s => s.all_finite(src, mask))
    }
    fn read(&self, slot: Slot, index: usize) -> Result<HostTensor> {
        forward!(self, s => s.read(slot, index))
    }
    fn write(&mut self, slot: Slot, index: usize, value: &HostTensor) -> Result<()> {
        forward!(self, s => s.write(slot, index, value))
    }
}

/// Where the conformance suite keeps the seeds of failing cases, relative to
/// the package whose tests run it.
pub const REGRESSIONS: &str = "tests/conformance.proptest-regressions";

/// The proptest configuration of the conformance suite: `AMP_PROPTEST_CASES`
/// cases per property (default 128; raise it for a deep run, e.g.
/// `AMP_PROPTEST_CASES=2000`).
pub fn proptest_config() -> proptest::test_runner::Config {
    let cases = std::env::var("AMP_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128);
    proptest::test_runner::Config {
        cases,
        // Failing seeds of every suite go to one file (relative to the
        // package root, where integration tests run), committed and re-run
        // first by every property of every backend.
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::Direct(REGRESSIONS),
        )),
        ..proptest::test_runner::Config::default()
    }
}

/// Instantiates the whole conformance suite for one backend and dtype:
/// `conformance_suite!(module_name, factory_expression, DType::F32);`
///
/// Every property of [`properties`] becomes a proptest over
/// [`strategies::case`]; a failing case is shrunk and printed, and its seed is
/// kept in `proptest-regressions/` beside the test file. The fixed
/// configurations of [`grid`] run as one more test, `oracle_grid`.
#[macro_export]
macro_rules! conformance_suite {
    ($module:ident, $factory:expr, $dtype:expr) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;
            use $crate::proptest::prelude::*;
            use $crate::{properties, strategies};

            $crate::conformance_suite!(@tests properties; $factory, $dtype;
                matches_oracle,
                projection_bound,
                restore,
                k0_and_eps0_equal_base,
                closure_calls,
                base_step_uses_perturbed_gradient,
                fused_ops_match_composed,
                failure_leaves_state,
                store_panic_leaves_state,
                split_step_matches_step,
                adam_update_matches_composed,
                gradient_presence,
                loss_scale_is_exact,
                overflow_skips_the_step
            );

            /// The fixed grid of configurations against the oracle
            /// (`amp_testkit::grid`).
            #[test]
            fn oracle_grid() {
                let factory = $factory;
                if let Err(message) = $crate::grid::matches_oracle(&factory, $dtype) {
                    panic!("{}", message);
                }
            }
        }
    };
    // One proptest per property of `$module` (`properties`, `autograd`).
    (@tests $module:ident; $factory:expr, $dtype:expr; $($property:ident),*) => {
        $(
            proptest! {
                #![proptest_config($crate::proptest_config())]
                #[test]
                fn $property(case in strategies::case(5, 4)) {
                    let factory = $factory;
                    let case = case.fitted_to(&factory);
                    if let Err(message) = $module::$property(&factory, &case, $dtype) {
                        prop_assert!(false, "{}", message);
                    }
                }
            }
        )*
    };
}

pub use proptest;

/// Prints that a test was skipped and why, straight to the process's standard
/// error: the test harness captures `eprintln!` of passing tests, and a skip
/// must be seen.
pub fn skip_notice(what: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {what}: {why}");
}
