//! What every backend shares: the MLP's shape, its seeded initial weights
//! (drawn on the host, so a seed gives the same network on every backend),
//! the settings of a run, and the small [`Model`] trait the training loop
//! drives.

use amp::{
    Adam, AdamConfig, AmpConfig, AmpError, BaseOptimizer, BoxError, ParamStore, Sgd, SgdConfig,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::data::Data;

/// Which tensor library trains the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    /// candle (`amp::backend::candle`), autograd through candle-nn `Var`s.
    Candle,
    /// libtorch through tch (`amp::backend::tch`); needs `--features tch`.
    Tch,
    /// ndarray (`amp::backend::ndarray`), the reference backend, with the
    /// MLP's backward pass written by hand.
    Ndarray,
    /// burn (`amp::backend::burn`), a burn module on burn's CPU device;
    /// needs `--features burn`.
    Burn,
}

impl BackendKind {
    /// The backend used when `--backend` is not given.
    pub fn default_kind() -> Self {
        if cfg!(feature = "candle") {
            BackendKind::Candle
        } else {
            BackendKind::Ndarray
        }
    }

    /// Name in messages.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Candle => "candle",
            BackendKind::Tch => "tch",
            BackendKind::Ndarray => "ndarray",
            BackendKind::Burn => "burn",
        }
    }
}

/// The base optimiser of a run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Base {
    /// SGD (the paper's: momentum, Nesterov).
    Sgd(SgdConfig),
    /// Adam or AdamW.
    Adam(AdamConfig),
}

impl Base {
    /// The optimiser, boxed, so that a backend's `Amp` type does not depend
    /// on the choice.
    pub fn build<S: ParamStore>(self) -> Result<Box<dyn BaseOptimizer<S>>, AmpError> {
        Ok(match self {
            Base::Sgd(sgd) => Box::new(Sgd::new(sgd)?),
            Base::Adam(adam) => Box::new(Adam::new(adam)?),
        })
    }
}

/// `Amp` over a backend's store with the run's base optimiser.
pub type AmpOf<S> = amp::Amp<S, Box<dyn BaseOptimizer<S>>>;

/// Where the tensors live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceKind {
    /// The CPU.
    Cpu,
    /// The first CUDA GPU (candle built with `--features cuda`, or tch).
    Cuda,
}

impl DeviceKind {
    /// Name in messages.
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
        }
    }
}

/// The precision of the model's weights and activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    /// f32 throughout.
    F32,
    /// bfloat16 weights and activations (mixed precision).
    Bf16,
    /// IEEE half weights and activations (mixed precision, with a dynamic
    /// loss scale).
    F16,
}

impl Precision {
    /// Name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }
}

/// Which split to predict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    /// The validation rows.
    Val,
    /// The test rows.
    Test,
}

/// One fully connected layer's initial weights, row-major `[outputs, inputs]`
/// as in PyTorch's and candle-nn's `Linear`.
#[derive(Clone, Debug, PartialEq)]
pub struct HostLayer {
    /// Fan-in.
    pub inputs: usize,
    /// Fan-out.
    pub outputs: usize,
    /// `outputs × inputs` values, row-major.
    pub weight: Vec<f32>,
    /// `outputs` values.
    pub bias: Vec<f32>,
}

/// Initial weights of an MLP with layer widths `sizes` (input, hidden…,
/// classes), drawn as PyTorch's `nn.Linear` does by default: weight and bias
/// uniform in `±1/√fan_in`.
pub fn init_layers(sizes: &[usize], seed: u64) -> Vec<HostLayer> {
    let mut rng = StdRng::seed_from_u64(seed);
    sizes
        .windows(2)
        .map(|w| {
            let (inputs, outputs) = (w[0], w[1]);
            let bound = 1.0 / (inputs as f32).sqrt();
            let mut draw =
                |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-bound..bound)).collect() };
            let weight = draw(outputs * inputs);
            let bias = draw(outputs);
            HostLayer {
                inputs,
                outputs,
                weight,
                bias,
            }
        })
        .collect()
}

/// Everything a backend needs to build one run's model and optimiser.
pub struct Setup<'a> {
    /// The standardised splits.
    pub data: &'a Data,
    /// Initial weights, first layer first.
    pub layers: Vec<HostLayer>,
    /// AMP's settings (`inner_iter = 0` for ERM).
    pub amp: AmpConfig,
    /// The base optimiser.
    pub base: Base,
    /// Clip the global gradient norm to this inside the closure, on every
    /// pass, with `ParamStore::clip_grads_to_norm` (the paper clips at 50).
    pub clip_norm: Option<f64>,
    /// Where the tensors live.
    pub device: DeviceKind,
    /// The model's precision.
    pub precision: Precision,
    /// With a half precision: whether the store steps f32 master weights.
    pub master_weights: bool,
    /// In a data-parallel job, what joins this rank's optimiser to the
    /// others (`None`: one process).
    pub link: Option<crate::ranks::Link>,
}

/// A network and its optimiser, as the training loop sees them.
pub trait Model {
    /// One optimiser step on the training rows `batch`; returns the loss of
    /// the clean pass, L(θ), averaged over the batch.
    fn step(&mut self, batch: &[usize]) -> Result<f64, BoxError>;

    /// Sets the outer learning rate (what the schedule calls each epoch).
    fn set_lr(&mut self, lr: f64) -> Result<(), BoxError>;

    /// The predicted class of every row of a split.
    fn predict(&mut self, which: Which) -> Result<Vec<usize>, BoxError>;

    /// Waits until queued device work is done, so that a clock read after it
    /// measures the work. CPU backends compute synchronously.
    fn synchronize(&mut self) -> Result<(), BoxError> {
        Ok(())
    }
}

/// Builds the model of `backend` for one run.
pub fn build<'a>(backend: BackendKind, setup: Setup<'a>) -> Result<Box<dyn Model + 'a>, BoxError> {
    match backend {
        #[cfg(feature = "ndarray")]
        BackendKind::Ndarray => Ok(Box::new(crate::mlp_ndarray::NdMlp::new(setup)?)),
        #[cfg(feature = "candle")]
        BackendKind::Candle => Ok(Box::new(crate::mlp_candle::CandleMlp::new(setup)?)),
        #[cfg(feature = "tch")]
        BackendKind::Tch => Ok(Box::new(crate::mlp_tch::TchMlp::new(setup)?)),
        #[cfg(feature = "burn")]
        BackendKind::Burn => Ok(Box::new(crate::mlp_burn::BurnMlp::new(setup)?)),
        #[allow(unreachable_patterns)]
        other => Err(format!(
            "this build has no {name} backend: rebuild with `--features {name}`{extra}",
            name = other.name(),
            extra = if other == BackendKind::Tch {
                " (needs libtorch 2.11, see the README)"
            } else {
                ""
            }
        )
        .into()),
    }
}

/// The layer widths of the small MLP the backends' step-for-step tests use.
#[cfg(test)]
pub const TEST_SIZES: [usize; 4] = [11, 16, 16, 2];

/// The settings of those tests: the small MLP from seed 5, SGD with
/// Nesterov 0.9, clipping at 50, f32 on the CPU, one process; and their
/// AMP configuration (lr 0.05, ε 0.2, inner lr 2, weight decay 1e-4).
#[cfg(test)]
#[cfg_attr(not(any(feature = "candle", feature = "burn")), allow(dead_code))]
pub fn test_setup(data: &Data) -> Setup<'_> {
    Setup {
        data,
        layers: init_layers(&TEST_SIZES, 5),
        amp: AmpConfig::new(0.05, 0.2).inner_lr(2.0).weight_decay(1e-4),
        base: Base::Sgd(SgdConfig::nesterov(0.9)),
        clip_norm: Some(50.0),
        device: DeviceKind::Cpu,
        precision: Precision::F32,
        master_weights: true,
        link: None,
    }
}

/// The mixed-precision check every backend with half precision runs.
#[cfg(test)]
#[cfg_attr(not(any(feature = "candle", feature = "tch")), allow(dead_code))]
pub mod mixed_precision {
    use super::*;

    /// ERM runs of the main job's recipe (60 epochs, lr 0.05 ×0.1 at
    /// epochs 30 and 45) for seeds 0, 1 and 2 on `backend`: the mean over
    /// them of the last epoch's training loss and of the test error.
    fn final_loss_and_test_error(
        backend: BackendKind,
        precision: Precision,
        master_weights: bool,
    ) -> (f64, f64) {
        let runs: Vec<(f64, f64)> = (0..3)
            .map(|seed| one_run(backend, precision, master_weights, seed))
            .collect();
        let mean = |f: fn(&(f64, f64)) -> f64| runs.iter().map(f).sum::<f64>() / 3.0;
        (mean(|r| r.0), mean(|r| r.1))
    }

    fn one_run(
        backend: BackendKind,
        precision: Precision,
        master_weights: bool,
        seed: u64,
    ) -> (f64, f64) {
        use amp::schedule::{LrSchedule, MultiStep};
        use rand::seq::SliceRandom;
        use rand::SeedableRng;

        let data = crate::data::load(crate::data::Task::Good, 0);
        let config = amp::AmpConfig::new(0.05, 0.2)
            .inner_iter(0)
            .weight_decay(1e-4);
        let setup = Setup {
            data: &data,
            layers: init_layers(&[11, 64, 64, 2], seed),
            amp: config,
            base: Base::Sgd(amp::SgdConfig::nesterov(0.9)),
            clip_norm: Some(50.0),
            device: DeviceKind::Cpu,
            precision,
            master_weights,
            link: None,
        };
        let mut net = build(backend, setup).unwrap();
        let schedule = MultiStep::new(vec![30, 45], 0.1).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 100);
        let mut order: Vec<usize> = (0..data.train.len()).collect();
        let mut loss = f64::NAN;
        for epoch in 0..60 {
            net.set_lr(schedule.lr(0.05, epoch)).unwrap();
            order.shuffle(&mut rng);
            let mut sum = 0.0;
            for batch in order.chunks(32) {
                sum += net.step(batch).unwrap() * batch.len() as f64;
            }
            loss = sum / order.len() as f64;
        }
        let error = data.test.error_rate(&net.predict(Which::Test).unwrap());
        (loss, error)
    }

    /// bf16 with f32 master weights trains as f32 does (mean final training
    /// loss within 0.01, mean test error within 2 points); bf16 without them
    /// loses the late, small updates (lr 5e-4: most are below half a bf16
    /// ulp) and ends with a mean training loss at least 0.02 higher.
    pub fn check_bf16(backend: BackendKind) {
        let (f32_loss, f32_error) = final_loss_and_test_error(backend, Precision::F32, true);
        let (master_loss, master_error) = final_loss_and_test_error(backend, Precision::Bf16, true);
        let (plain_loss, plain_error) = final_loss_and_test_error(backend, Precision::Bf16, false);
        let report = format!(
            "{}: final loss / test error: f32 {f32_loss:.4} / {f32_error:.4}, bf16 with \
             master weights {master_loss:.4} / {master_error:.4}, bf16 without \
             {plain_loss:.4} / {plain_error:.4}",
            backend.name()
        );
        println!("{report}");
        assert!((master_loss - f32_loss).abs() < 0.01, "{report}");
        assert!((master_error - f32_error).abs() < 0.02, "{report}");
        assert!(plain_loss - f32_loss > 0.02, "{report}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_is_seeded_and_bounded() {
        let a = init_layers(&[11, 8, 2], 3);
        assert_eq!(a, init_layers(&[11, 8, 2], 3));
        assert_ne!(a, init_layers(&[11, 8, 2], 4));
        assert_eq!((a[0].weight.len(), a[0].bias.len()), (88, 8));
        assert_eq!((a[1].inputs, a[1].outputs), (8, 2));
        let bound = 1.0 / 11f32.sqrt();
        assert!(a[0].weight.iter().all(|w| w.abs() <= bound));
    }
}
