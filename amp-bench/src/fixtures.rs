//! What is timed: an [`Trainer`] (an `Amp` over SGD with a boxed closure,
//! timed with the closure's own time kept apart) and the optimizer-only
//! fixtures of every backend (a store of a given layout and a trivial
//! closure that only hands over a gradient).
//!
//! Shared by the report program, the GPU bench and the criterion benches.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use amp::{
    Adam, AdamConfig, Amp, AmpConfig, BaseOptimizer, BoxError, ParamStore, Pass, Sgd, SgdConfig,
};

use crate::metered::Metered;

/// The closure every step calls: forward and backward, returning the loss.
pub type Closure<S> = Box<dyn FnMut(&mut S, Pass) -> Result<((), f64), BoxError>>;

/// Waits for the store's device (a no-op on the CPU).
pub type SyncFn<S> = fn(&S);

/// The ERM trainer and the AMP trainer of one model, in that order.
pub type TrainerPair<S> = (Trainer<S>, Trainer<S>);

/// Time taken by some steps, and how much of it the closure took.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timing {
    /// Wall time of the steps, device synchronised at both ends.
    pub total: Duration,
    /// Time inside the closure calls (synchronised at both ends of each).
    pub closure: Duration,
    /// Number of steps.
    pub steps: usize,
}

impl Timing {
    /// Wall time per step, in seconds.
    pub fn per_step(&self) -> f64 {
        self.total.as_secs_f64() / self.steps.max(1) as f64
    }

    /// Time per step outside the closure (the optimizer's own), in seconds.
    pub fn optimizer_per_step(&self) -> f64 {
        self.total.saturating_sub(self.closure).as_secs_f64() / self.steps.max(1) as f64
    }
}

/// What a whole run of the report times: the base optimiser of every
/// trainer and the AMP trainers' `interval`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Settings {
    /// `None`: SGD with Nesterov momentum 0.9; `Some`: Adam or AdamW.
    pub adam: Option<AdamConfig>,
    /// Perturb every `interval`-th step (1: every step).
    pub interval: u64,
    /// The MLPs in bf16 with f32 master weights (mixed precision; candle,
    /// and tch in the plain layout) instead of f32.
    pub bf16: bool,
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();

/// Sets the run's [`Settings`], once, before any trainer is built.
pub fn configure(settings: Settings) {
    let _ = SETTINGS.set(settings);
}

/// The run's [`Settings`].
pub fn current_settings() -> Settings {
    settings()
}

fn settings() -> Settings {
    SETTINGS.get().copied().unwrap_or(Settings {
        adam: None,
        interval: 1,
        bf16: false,
    })
}

/// Refuses a bf16 MLP on a backend without mixed precision.
pub fn f32_only(backend: &str) -> Result<(), BoxError> {
    if settings().bf16 {
        return Err(format!("bf16: not on {backend}").into());
    }
    Ok(())
}

/// The settings every timed run shares: no weight decay, ζ = 1,
/// copy-restore, the run's `interval`; `inner_iter` 0 is ERM, 1 is AMP.
/// With Adam the learning rate is a tenth of SGD's `lr` (Adam's steps are
/// about lr per weight: the MLPs' SGD rate makes the widest diverge).
pub fn amp_config(inner_iter: usize, lr: f64, epsilon: f64) -> AmpConfig {
    let lr = if settings().adam.is_some() {
        lr * 0.1
    } else {
        lr
    };
    AmpConfig::new(lr, epsilon)
        .inner_lr(1.0)
        .inner_iter(inner_iter)
        .weight_decay(0.0)
        .interval(settings().interval)
}

/// The run's base optimiser: SGD with Nesterov momentum 0.9, or the Adam
/// of [`Settings`].
fn base<S: ParamStore>() -> Result<Box<dyn BaseOptimizer<S>>, BoxError> {
    Ok(match settings().adam {
        None => Box::new(Sgd::new(SgdConfig::nesterov(0.9))?),
        Some(adam) => Box::new(Adam::new(adam)?),
    })
}

/// An optimiser with its closure.
pub struct Trainer<S: ParamStore> {
    /// The optimiser (ERM when `inner_iter` is 0).
    pub amp: Amp<S, Box<dyn BaseOptimizer<S>>>,
    closure: Closure<S>,
    sync: SyncFn<S>,
}

impl<S: ParamStore> Trainer<S> {
    /// Builds the optimiser over `store` with `config` and the run's base
    /// optimiser.
    pub fn new(
        store: S,
        config: AmpConfig,
        closure: Closure<S>,
        sync: SyncFn<S>,
    ) -> Result<Self, BoxError> {
        Ok(Trainer {
            amp: Amp::new(store, config, base()?)?,
            closure,
            sync,
        })
    }

    /// The same trainer as one rank of a data-parallel job: its optimiser
    /// rebuilt with `reduce` and joined to the other ranks by `link`.
    #[cfg(feature = "mpi")]
    pub fn joined(
        self,
        link: Box<dyn amp::Collective<S>>,
        reduce: amp::Reduce,
    ) -> Result<Self, BoxError> {
        let config = self.amp.config().clone().reduce(reduce);
        let (store, base) = self.amp.into_parts()?;
        Ok(Trainer {
            amp: Amp::new(store, config, base)?.with_collective(link)?,
            closure: self.closure,
            sync: self.sync,
        })
    }

    /// Runs `n` steps; returns their time with the closure's share.
    pub fn steps(&mut self, n: usize) -> Result<Timing, BoxError> {
        let sync = self.sync;
        let closure = &mut self.closure;
        let mut inside = Duration::ZERO;
        sync(self.amp.store());
        let start = Instant::now();
        for _ in 0..n {
            self.amp.step(|store: &mut S, pass| {
                let t = Instant::now();
                let out = closure(store, pass);
                sync(store);
                inside += t.elapsed();
                out
            })?;
        }
        sync(self.amp.store());
        Ok(Timing {
            total: start.elapsed(),
            closure: inside,
            steps: n,
        })
    }
}

/// A trainer of any backend, behind one object-safe interface.
pub trait Steps {
    /// Runs `n` steps and times them.
    fn run(&mut self, n: usize) -> Result<Timing, BoxError>;
    /// Parameter-sized buffers AMP holds beyond the base optimiser's.
    fn amp_buffers_held(&self) -> usize;
    /// All parameter-sized buffers held (AMP's and the base optimiser's).
    fn buffers_held(&self) -> usize;
    /// Total number of parameters.
    fn numel(&self) -> usize;
    /// Number of parameter tensors.
    fn tensors(&self) -> usize;
}

impl<S: ParamStore> Steps for Trainer<S> {
    fn run(&mut self, n: usize) -> Result<Timing, BoxError> {
        self.steps(n)
    }
    fn amp_buffers_held(&self) -> usize {
        self.amp.amp_buffers_held()
    }
    fn buffers_held(&self) -> usize {
        self.amp.buffers_held()
    }
    fn numel(&self) -> usize {
        self.amp.store().total_numel().unwrap_or(0)
    }
    fn tensors(&self) -> usize {
        self.amp.store().num_tensors()
    }
}

/// `tensors` sizes adding up to `total` (as equal as possible).
pub fn layout(total: usize, tensors: usize) -> Vec<usize> {
    let base = total / tensors;
    let extra = total % tensors;
    (0..tensors)
        .map(|i| base + usize::from(i < extra))
        .collect()
}

/// Hyper-parameters of the optimizer-only runs: ε is small enough that every
/// tensor is clipped (each gradient is 0.01 per element), so the projection
/// always multiplies; lr is small so the weights drift slowly.
pub const OPT_LR: f64 = 1e-3;
/// See [`OPT_LR`].
pub const OPT_EPSILON: f64 = 1e-4;
/// The value of every gradient element in the optimizer-only runs.
pub const OPT_GRAD: f32 = 0.01;

/// A backend's optimizer-only fixture: a store of the given layout and a
/// trivial closure; also how to meter one step's bytes.
pub trait OptFixture {
    /// The store type.
    type Store: ParamStore + 'static;
    /// The backend's name in reports and bench groups.
    const NAME: &'static str;
    /// A store with tensors of the given sizes (f32) and a closure that
    /// only hands over a constant gradient.
    fn build(sizes: &[usize]) -> Result<(Self::Store, Closure<Self::Store>), BoxError>;
    /// Waits for the device.
    fn sync(store: &Self::Store);
}

/// An AMP (or ERM, `inner_iter` 0) trainer over an optimizer-only fixture.
pub fn opt_trainer<F: OptFixture>(
    sizes: &[usize],
    inner_iter: usize,
) -> Result<Trainer<F::Store>, BoxError> {
    let (store, closure) = F::build(sizes)?;
    Trainer::new(
        store,
        amp_config(inner_iter, OPT_LR, OPT_EPSILON),
        closure,
        F::sync,
    )
}

/// Bytes the optimizer's primitives read and write in one step (after two
/// warm-up steps, so that the momentum buffer exists), with the per-primitive
/// breakdown; the time per primitive is measured over `timed_steps` steps.
pub fn metered_step<F: OptFixture>(
    sizes: &[usize],
    inner_iter: usize,
    timed_steps: usize,
) -> Result<crate::metered::Meter, BoxError> {
    let (store, mut closure) = F::build(sizes)?;
    let metered = crate::metered::metered(store, F::sync)?;
    let closure: Closure<Metered<F::Store>> =
        Box::new(move |m: &mut Metered<F::Store>, pass| closure(m.inner_mut(), pass));
    fn sync_metered<F: OptFixture>(m: &Metered<F::Store>) {
        F::sync(m.inner())
    }
    let mut trainer = Trainer::new(
        metered,
        amp_config(inner_iter, OPT_LR, OPT_EPSILON),
        closure,
        sync_metered::<F>,
    )?;
    trainer.steps(2)?;
    trainer.amp.store().hook().reset();
    trainer.steps(1)?;
    let bytes = trainer.amp.store().hook().meter();
    if timed_steps == 0 {
        return Ok(bytes);
    }
    let metering = trainer.amp.store().hook();
    metering.reset();
    metering.set_timed(true);
    trainer.steps(timed_steps)?;
    let mut meter = trainer.amp.store().hook().meter();
    for (b, one) in meter.bytes.iter_mut().zip(bytes.bytes) {
        *b = one;
    }
    for c in meter.calls.iter_mut() {
        *c /= timed_steps as u64;
    }
    for t in meter.time.iter_mut() {
        *t /= timed_steps as u32;
    }
    Ok(meter)
}

/// The ndarray reference backend, `NdStore<f32>`.
#[cfg(feature = "ndarray")]
pub mod nd {
    use super::*;
    use amp::backend::ndarray::NdStore;
    use ndarray::ArrayD;

    /// ndarray's optimizer-only fixture.
    pub struct Nd;

    impl OptFixture for Nd {
        type Store = NdStore<f32>;
        const NAME: &'static str = "ndarray";

        fn build(sizes: &[usize]) -> Result<(Self::Store, Closure<Self::Store>), BoxError> {
            let params = sizes
                .iter()
                .map(|&n| ArrayD::from_elem(ndarray::IxDyn(&[n]), 0.5f32))
                .collect();
            let n = sizes.len();
            // `grad_mut` zero-fills on first access after `zero_grads`, as
            // autograd would accumulate into zeroed storage; the fill is the
            // "backward". Both are closure time, not optimizer time.
            let closure: Closure<Self::Store> = Box::new(move |s: &mut NdStore<f32>, _| {
                for i in 0..n {
                    s.grad_mut(i)?.fill(OPT_GRAD);
                }
                Ok(((), 1.0))
            });
            Ok((NdStore::new(params), closure))
        }

        fn sync(_: &Self::Store) {}
    }
}

/// The candle backend on the CPU, `CandleStore` over f32 vars.
#[cfg(feature = "candle")]
pub mod cdl {
    use super::*;
    use amp::backend::candle::candle_core::{DType, Device, Tensor, Var};
    use amp::backend::candle::CandleStore;

    /// candle's optimizer-only fixture.
    pub struct Candle;

    /// Waits for candle's device.
    pub fn sync(store: &CandleStore) {
        let _ = store.device().synchronize();
    }

    impl OptFixture for Candle {
        type Store = CandleStore;
        const NAME: &'static str = "candle";

        fn build(sizes: &[usize]) -> Result<(Self::Store, Closure<Self::Store>), BoxError> {
            let device = Device::Cpu;
            let vars = sizes
                .iter()
                .map(|&n| Var::from_tensor(&(Tensor::ones(n, DType::F32, &device)? * 0.5)?))
                .collect::<Result<Vec<_>, _>>()?;
            // Gradients made once and handed over by reference each pass
            // (candle tensors are reference-counted and never written in
            // place), as `backward()` hands over fresh gradient tensors.
            let grads = sizes
                .iter()
                .map(|&n| Tensor::full(OPT_GRAD, n, &device))
                .collect::<Result<Vec<_>, _>>()?;
            let closure: Closure<Self::Store> = Box::new(move |s: &mut CandleStore, _| {
                for (i, g) in grads.iter().enumerate() {
                    s.set_grad(i, g)?;
                }
                Ok(((), 1.0))
            });
            Ok((CandleStore::from_vars(vars)?, closure))
        }

        fn sync(store: &Self::Store) {
            sync(store)
        }
    }
}

/// The libtorch backend, `TchStore` (CPU, or CUDA when `AMP_BENCH_CUDA` is
/// set and a GPU is visible).
#[cfg(feature = "tch")]
pub mod tc {
    use super::*;
    use amp::backend::tch::TchStore;
    use tch::{Device, Kind, Tensor};

    /// Waits for libtorch's device.
    pub fn sync(store: &TchStore) {
        if let Device::Cuda(i) = store.device() {
            tch::Cuda::synchronize(i as i64);
        }
    }

    /// The device the tch runs use: CUDA:0 when `AMP_BENCH_CUDA=1` and one
    /// is visible, else the CPU.
    pub fn device() -> Device {
        if std::env::var("AMP_BENCH_CUDA").is_ok_and(|v| v == "1") && tch::Cuda::is_available() {
            Device::Cuda(0)
        } else {
            Device::Cpu
        }
    }

    /// libtorch's optimizer-only fixture.
    pub struct Tch;

    impl OptFixture for Tch {
        type Store = TchStore;
        const NAME: &'static str = "tch";

        fn build(sizes: &[usize]) -> Result<(Self::Store, Closure<Self::Store>), BoxError> {
            build(sizes, false)
        }

        fn sync(store: &Self::Store) {
            sync(store)
        }
    }

    /// libtorch's optimizer-only fixture over a flattened store
    /// (`TchStore::flatten`): parameters and gradients each in one
    /// allocation.
    pub struct TchFlat;

    impl OptFixture for TchFlat {
        type Store = TchStore;
        const NAME: &'static str = "tch-flat";

        fn build(sizes: &[usize]) -> Result<(Self::Store, Closure<Self::Store>), BoxError> {
            build(sizes, true)
        }

        fn sync(store: &Self::Store) {
            sync(store)
        }
    }

    fn build(sizes: &[usize], flat: bool) -> Result<(TchStore, Closure<TchStore>), BoxError> {
        let device = device();
        let params: Vec<Tensor> = sizes
            .iter()
            .map(|&n| {
                (Tensor::ones([n as i64], (Kind::Float, device)) * 0.5).set_requires_grad(true)
            })
            .collect();
        // Gradients made once and copied in each pass (`set_grad` copies
        // them into freshly allocated gradients, as `backward()` would
        // allocate them; into the flat gradients of a flattened store),
        // with no autograd graph: the closure is trivial, as for the other
        // backends. (A closure running
        // `backward()` over 1000 tensors walks a 1000-node graph, which
        // evicts the parameters from the cache between passes; that cost
        // belongs to the model, not the optimiser.)
        let grads: Vec<Tensor> = sizes
            .iter()
            .map(|&n| Tensor::full([n as i64], f64::from(OPT_GRAD), (Kind::Float, device)))
            .collect();
        let closure: Closure<TchStore> = Box::new(move |s: &mut TchStore, _| {
            for (i, g) in grads.iter().enumerate() {
                s.set_grad(i, g)?;
            }
            Ok(((), 1.0))
        });
        let mut store = TchStore::from_tensors(params)?;
        if flat {
            store.flatten()?;
        }
        Ok((store, closure))
    }
}

/// The burn backend, `BurnStore` over a module of flat parameters on burn's
/// CPU device (flex).
#[cfg(feature = "burn")]
pub mod brn {
    use super::*;
    use amp::backend::burn::burn::module::Param;
    use amp::backend::burn::burn::tensor::{Device, Tensor};
    use amp::backend::burn::{BurnStore, Flat, ModuleStore};

    /// The module of the optimizer-only runs: one flat parameter per tensor.
    pub type Params = Vec<Param<Tensor<1>>>;

    /// burn's optimizer-only fixture.
    pub struct Burn;

    /// burn's CPU backend computes synchronously.
    pub fn sync<S>(_store: &S) {}

    impl OptFixture for Burn {
        type Store = BurnStore<Params>;
        const NAME: &'static str = "burn";

        fn build(sizes: &[usize]) -> Result<(Self::Store, Closure<Self::Store>), BoxError> {
            let device = Device::flex().autodiff();
            let params: Params = sizes
                .iter()
                .map(|&n| Param::from_tensor((Tensor::ones([n], &device) * 0.5).require_grad()))
                .collect();
            // Gradients made once and handed over each pass (burn tensors
            // are immutable and reference-counted, as `backward()` hands
            // over fresh gradient tensors).
            let grads: Vec<Flat> = sizes
                .iter()
                .map(|&n| Flat::new(Tensor::<1>::full([n], OPT_GRAD, &device)))
                .collect();
            let closure: Closure<Self::Store> = Box::new(move |s: &mut Self::Store, _| {
                for (i, g) in grads.iter().enumerate() {
                    s.set_grad(i, g.clone())?;
                }
                Ok(((), 1.0))
            });
            Ok((BurnStore::from_module(params)?, closure))
        }

        fn sync(store: &Self::Store) {
            sync(store)
        }
    }
}
