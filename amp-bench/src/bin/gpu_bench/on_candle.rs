//! The GPU bench on candle: the MLPs and the conv model with candle's
//! autograd (batch norm written with tensor ops: candle has no training-mode
//! kernel), the optimizer-only fixture, and the device-to-device copy that is
//! its floor.

use amp::backend::candle::candle_core::{DType, Device, Result as CResult, Tensor, Var, D};
use amp::backend::candle::candle_nn;
use amp::backend::candle::CandleStore;
use amp::BoxError;

use crate::cnn;
use crate::fixtures::{amp_config, Closure, Trainer, TrainerPair, OPT_EPSILON, OPT_GRAD, OPT_LR};
use crate::mlp::{self, Problem};

/// Waits for the device of `store`.
pub fn sync(store: &CandleStore) {
    let _ = store.device().synchronize();
}

fn var(values: &[f32], shape: &[usize], device: &Device) -> Result<Var, BoxError> {
    Ok(Var::from_tensor(&Tensor::from_slice(
        values, shape, device,
    )?)?)
}

fn labels(y: &[usize], device: &Device) -> Result<Tensor, BoxError> {
    let y: Vec<u32> = y.iter().map(|&c| c as u32).collect();
    let n = y.len();
    Ok(Tensor::from_vec(y, n, device)?)
}

/// `x · wᵀ + b`.
fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> CResult<Tensor> {
    x.matmul(&w.t()?)?.broadcast_add(b)
}

/// Where and how a candle store runs: its device, and whether its
/// optimiser writes in place on CUDA through amp-candle's kernels
/// ([`CandleStore::in_place_on_cuda`]) or allocates through candle's
/// operations (the default on CUDA).
#[derive(Clone)]
pub struct On {
    /// The device.
    pub device: Device,
    /// In place on CUDA.
    pub in_place: bool,
}

impl On {
    /// A store over `vars`, in place on CUDA when asked.
    fn store(&self, vars: Vec<Var>) -> Result<CandleStore, BoxError> {
        let store = CandleStore::from_vars(vars)?;
        Ok(match self.in_place {
            true => store.in_place_on_cuda(),
            false => store,
        })
    }
}

fn mlp_trainer(
    problem: &Problem,
    inner_iter: usize,
    on: &On,
) -> Result<Trainer<CandleStore>, BoxError> {
    let device = &on.device;
    let mut vars = Vec::new();
    for layer in &problem.layers {
        vars.push(var(&layer.weight, &[layer.outputs, layer.inputs], device)?);
        vars.push(var(&layer.bias, &[layer.outputs], device)?);
    }
    let params: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let x = Tensor::from_slice(&problem.x, (problem.spec.batch, mlp::INPUTS), device)?;
    let y = labels(&problem.y, device)?;
    let store = on.store(vars)?;
    let closure: Closure<CandleStore> = Box::new(move |s: &mut CandleStore, _pass| {
        let layers = params.len() / 2;
        let mut h = x.clone();
        for l in 0..layers {
            h = linear(&h, &params[2 * l], &params[2 * l + 1])?;
            if l + 1 < layers {
                h = h.relu()?;
            }
        }
        let loss = candle_nn::loss::cross_entropy(&h, &y)?;
        Ok(((), s.backward(&loss)?))
    });
    Trainer::new(
        store,
        amp_config(inner_iter, mlp::LR, mlp::EPSILON),
        closure,
        sync,
    )
}

/// ERM and AMP trainers of an MLP on `device`.
pub fn mlp_pair(problem: &Problem, on: &On) -> Result<TrainerPair<CandleStore>, BoxError> {
    Ok((mlp_trainer(problem, 0, on)?, mlp_trainer(problem, 1, on)?))
}

/// Batch norm over the batch's statistics of an `N × C × H × W` tensor.
fn bn(x: &Tensor, gamma: &Tensor, beta: &Tensor) -> CResult<Tensor> {
    let c = gamma.dim(0)?;
    let mean = x.mean_keepdim((0, 2, 3))?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim((0, 2, 3))?;
    let normed = centred.broadcast_div(&(var + 1e-5)?.sqrt()?)?;
    normed
        .broadcast_mul(&gamma.reshape((1, c, 1, 1))?)?
        .broadcast_add(&beta.reshape((1, c, 1, 1))?)
}

fn conv(x: &Tensor, w: &Tensor, stride: usize) -> CResult<Tensor> {
    let pad = w.dim(2)? / 2;
    x.conv2d(w, pad, stride, 1, 1)
}

/// The conv model's forward pass over `p` ([`cnn::Problem`] order): logits.
fn cnn_forward(x: &Tensor, p: &[Tensor]) -> CResult<Tensor> {
    let mut p = p;
    let mut next = |n: usize| crate::cnn::take(&mut p, n);
    let s = next(3);
    let mut h = bn(&conv(x, &s[0], 1)?, &s[1], &s[2])?.relu()?;
    for b in cnn::blocks() {
        let c1 = next(3);
        let c2 = next(3);
        let mut out = bn(&conv(&h, &c1[0], b.stride)?, &c1[1], &c1[2])?.relu()?;
        out = bn(&conv(&out, &c2[0], 1)?, &c2[1], &c2[2])?;
        let short = if b.projects() {
            let sc = next(3);
            bn(&conv(&h, &sc[0], b.stride)?, &sc[1], &sc[2])?
        } else {
            h.clone()
        };
        h = (out + short)?.relu()?;
    }
    let fc = next(2);
    let pooled = h.mean(D::Minus1)?.mean(D::Minus1)?;
    linear(&pooled, &fc[0], &fc[1])
}

fn cnn_trainer(
    problem: &cnn::Problem,
    inner_iter: usize,
    on: &On,
) -> Result<Trainer<CandleStore>, BoxError> {
    let device = &on.device;
    let vars = problem
        .params
        .iter()
        .map(|p| var(&p.values, &p.shape, device))
        .collect::<Result<Vec<_>, _>>()?;
    let params: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let (c, side) = cnn::IMAGE;
    let x = Tensor::from_slice(&problem.x, (problem.batch, c, side, side), device)?;
    let y = labels(&problem.y, device)?;
    let store = on.store(vars)?;
    let closure: Closure<CandleStore> = Box::new(move |s: &mut CandleStore, _pass| {
        let logits = cnn_forward(&x, &params)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
        Ok(((), s.backward(&loss)?))
    });
    Trainer::new(
        store,
        amp_config(inner_iter, cnn::LR, cnn::EPSILON),
        closure,
        sync,
    )
}

/// ERM and AMP trainers of the conv model on `device`.
pub fn cnn_pair(problem: &cnn::Problem, on: &On) -> Result<TrainerPair<CandleStore>, BoxError> {
    Ok((cnn_trainer(problem, 0, on)?, cnn_trainer(problem, 1, on)?))
}

/// The optimizer-only fixture: f32 vars of the given sizes and a closure
/// that hands over constant gradients made once, on `on`.
pub fn opt_fixture(
    sizes: &[usize],
    on: &On,
) -> Result<(CandleStore, Closure<CandleStore>), BoxError> {
    let device = &on.device;
    let vars = sizes
        .iter()
        .map(|&n| Var::from_tensor(&(Tensor::ones(n, DType::F32, device)? * 0.5)?))
        .collect::<Result<Vec<_>, _>>()?;
    let grads = sizes
        .iter()
        .map(|&n| Tensor::full(OPT_GRAD, n, device))
        .collect::<Result<Vec<_>, _>>()?;
    let closure: Closure<CandleStore> = Box::new(move |s: &mut CandleStore, _| {
        for (i, g) in grads.iter().enumerate() {
            s.set_grad(i, g)?;
        }
        Ok(((), 1.0))
    });
    Ok((on.store(vars)?, closure))
}

/// An AMP (K = `inner_iter`) trainer over the optimizer-only fixture.
pub fn opt_trainer(
    sizes: &[usize],
    inner_iter: usize,
    on: &On,
) -> Result<Trainer<CandleStore>, BoxError> {
    let (store, closure) = opt_fixture(sizes, on)?;
    Trainer::new(
        store,
        amp_config(inner_iter, OPT_LR, OPT_EPSILON),
        closure,
        sync,
    )
}

/// A device-to-device copy of `n` f32 into an existing var (`Var::set`).
pub struct CopyFloor {
    src: Tensor,
    dst: Var,
}

impl CopyFloor {
    /// Two buffers of `n` elements on `device`.
    pub fn new(n: usize, device: &Device) -> Result<Self, BoxError> {
        Ok(CopyFloor {
            src: Tensor::ones(n, DType::F32, device)?,
            dst: Var::zeros(n, DType::F32, device)?,
        })
    }

    /// Seconds per copy over `reps` copies, device synchronised at both ends.
    pub fn time(&mut self, reps: usize) -> Result<f64, BoxError> {
        self.src.device().synchronize()?;
        let start = std::time::Instant::now();
        for _ in 0..reps {
            self.dst.set(&self.src)?;
        }
        self.src.device().synchronize()?;
        Ok(start.elapsed().as_secs_f64() / reps.max(1) as f64)
    }
}
