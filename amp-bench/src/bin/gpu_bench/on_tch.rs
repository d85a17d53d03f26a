//! The GPU bench on libtorch: the MLPs and the conv model with libtorch's
//! autograd, the optimizer-only fixture, and the device-to-device copy that
//! is its floor. Stores are ordinary or flattened (`TchStore::flatten`).

use amp::backend::tch::TchStore;
use amp::BoxError;
use tch::{Device, Kind, Tensor};

use crate::cnn;
use crate::fixtures::{amp_config, Closure, Trainer, TrainerPair, OPT_EPSILON, OPT_GRAD, OPT_LR};
use crate::mlp::{self, Problem};

/// Waits for the device of `store`.
pub fn sync(store: &TchStore) {
    if let Device::Cuda(i) = store.device() {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Parameters that require gradients, on `device`, from host values.
fn leaf(values: &[f32], shape: &[usize], device: Device) -> Result<Tensor, BoxError> {
    let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    Ok(Tensor::f_from_slice(values)?
        .f_view(dims.as_slice())?
        .f_to_device(device)?
        .set_requires_grad(true))
}

/// The store over `params` (shallow clones, so the model keeps using the
/// very tensors the optimiser updates), flattened when `flat`.
fn store(params: &[Tensor], flat: bool) -> Result<TchStore, BoxError> {
    let mut store = TchStore::from_tensors(params.iter().map(|t| t.shallow_clone()).collect())?;
    if flat {
        store.flatten()?;
    }
    Ok(store)
}

fn labels(y: &[usize], device: Device) -> Result<Tensor, BoxError> {
    let y: Vec<i64> = y.iter().map(|&c| c as i64).collect();
    Ok(Tensor::f_from_slice(&y)?.f_to_device(device)?)
}

fn mlp_trainer(
    problem: &Problem,
    inner_iter: usize,
    flat: bool,
    device: Device,
) -> Result<Trainer<TchStore>, BoxError> {
    let mut params = Vec::new();
    for layer in &problem.layers {
        params.push(leaf(&layer.weight, &[layer.outputs, layer.inputs], device)?);
        params.push(leaf(&layer.bias, &[layer.outputs], device)?);
    }
    let x = Tensor::f_from_slice(&problem.x)?
        .f_view([problem.spec.batch as i64, mlp::INPUTS as i64])?
        .f_to_device(device)?;
    let y = labels(&problem.y, device)?;
    let store = store(&params, flat)?;
    let closure: Closure<TchStore> = Box::new(move |_: &mut TchStore, _pass| {
        let mut h = x.shallow_clone();
        let layers = params.len() / 2;
        for l in 0..layers {
            h = h.f_linear(&params[2 * l], Some(&params[2 * l + 1]))?;
            if l + 1 < layers {
                h = h.f_relu()?;
            }
        }
        let loss = h.cross_entropy_for_logits(&y);
        loss.f_backward()?;
        Ok(((), loss.f_double_value(&[])?))
    });
    Trainer::new(
        store,
        amp_config(inner_iter, mlp::LR, mlp::EPSILON),
        closure,
        sync,
    )
}

/// ERM and AMP trainers of an MLP on `device`.
pub fn mlp_pair(
    problem: &Problem,
    flat: bool,
    device: Device,
) -> Result<TrainerPair<TchStore>, BoxError> {
    Ok((
        mlp_trainer(problem, 0, flat, device)?,
        mlp_trainer(problem, 1, flat, device)?,
    ))
}

/// Batch norm over the batch's statistics (training mode, no running
/// averages), libtorch's own kernel.
fn bn(x: &Tensor, gamma: &Tensor, beta: &Tensor) -> Result<Tensor, BoxError> {
    Ok(x.f_batch_norm(
        Some(gamma),
        Some(beta),
        None::<&Tensor>,
        None::<&Tensor>,
        true,
        0.1,
        1e-5,
        true,
    )?)
}

fn conv(x: &Tensor, w: &Tensor, stride: i64) -> Result<Tensor, BoxError> {
    let pad = w.size()[2] / 2;
    Ok(x.f_conv2d(w, None::<&Tensor>, [stride, stride], [pad, pad], [1, 1], 1)?)
}

/// The conv model's forward pass over `p` (parameters in [`cnn::Problem`]
/// order): logits.
fn cnn_forward(x: &Tensor, p: &[Tensor]) -> Result<Tensor, BoxError> {
    let mut p = p;
    let mut next = |n: usize| crate::cnn::take(&mut p, n);
    let s = next(3);
    let mut h = bn(&conv(x, &s[0], 1)?, &s[1], &s[2])?.f_relu()?;
    for b in cnn::blocks() {
        let c1 = next(3);
        let c2 = next(3);
        let mut out = bn(&conv(&h, &c1[0], b.stride as i64)?, &c1[1], &c1[2])?.f_relu()?;
        out = bn(&conv(&out, &c2[0], 1)?, &c2[1], &c2[2])?;
        let short = if b.projects() {
            let sc = next(3);
            bn(&conv(&h, &sc[0], b.stride as i64)?, &sc[1], &sc[2])?
        } else {
            h.shallow_clone()
        };
        h = (out + short).f_relu()?;
    }
    let fc = next(2);
    let pooled = h.f_mean_dim([2i64, 3].as_slice(), false, Kind::Float)?;
    Ok(pooled.f_linear(&fc[0], Some(&fc[1]))?)
}

fn cnn_trainer(
    problem: &cnn::Problem,
    inner_iter: usize,
    flat: bool,
    device: Device,
) -> Result<Trainer<TchStore>, BoxError> {
    let params = problem
        .params
        .iter()
        .map(|p| leaf(&p.values, &p.shape, device))
        .collect::<Result<Vec<_>, _>>()?;
    let (c, side) = cnn::IMAGE;
    let x = Tensor::f_from_slice(&problem.x)?
        .f_view([problem.batch as i64, c as i64, side as i64, side as i64])?
        .f_to_device(device)?;
    let y = labels(&problem.y, device)?;
    let store = store(&params, flat)?;
    let closure: Closure<TchStore> = Box::new(move |_: &mut TchStore, _pass| {
        let loss = cnn_forward(&x, &params)?.cross_entropy_for_logits(&y);
        loss.f_backward()?;
        Ok(((), loss.f_double_value(&[])?))
    });
    Trainer::new(
        store,
        amp_config(inner_iter, cnn::LR, cnn::EPSILON),
        closure,
        sync,
    )
}

/// ERM and AMP trainers of the conv model on `device`.
pub fn cnn_pair(
    problem: &cnn::Problem,
    flat: bool,
    device: Device,
) -> Result<TrainerPair<TchStore>, BoxError> {
    Ok((
        cnn_trainer(problem, 0, flat, device)?,
        cnn_trainer(problem, 1, flat, device)?,
    ))
}

/// The optimizer-only fixture: f32 tensors of the given sizes and a closure
/// that only copies in a constant gradient (no autograd), on `device`.
pub fn opt_fixture(
    sizes: &[usize],
    flat: bool,
    device: Device,
) -> Result<(TchStore, Closure<TchStore>), BoxError> {
    let params = sizes
        .iter()
        .map(|&n| {
            Ok((Tensor::f_ones([n as i64], (Kind::Float, device))? * 0.5).set_requires_grad(true))
        })
        .collect::<Result<Vec<_>, BoxError>>()?;
    let grads = sizes
        .iter()
        .map(|&n| Tensor::f_full([n as i64], f64::from(OPT_GRAD), (Kind::Float, device)))
        .collect::<Result<Vec<_>, _>>()?;
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

/// An AMP (K = `inner_iter`) trainer over the optimizer-only fixture.
pub fn opt_trainer(
    sizes: &[usize],
    inner_iter: usize,
    flat: bool,
    device: Device,
) -> Result<Trainer<TchStore>, BoxError> {
    let (store, closure) = opt_fixture(sizes, flat, device)?;
    Trainer::new(
        store,
        amp_config(inner_iter, OPT_LR, OPT_EPSILON),
        closure,
        sync,
    )
}

/// A device-to-device copy of `n` f32 (`copy_` between two tensors).
pub struct CopyFloor {
    src: Tensor,
    dst: Tensor,
    device: Device,
}

impl CopyFloor {
    /// Two tensors of `n` elements on `device`.
    pub fn new(n: usize, device: Device) -> Result<Self, BoxError> {
        Ok(CopyFloor {
            src: Tensor::f_ones([n as i64], (Kind::Float, device))?,
            dst: Tensor::f_zeros([n as i64], (Kind::Float, device))?,
            device,
        })
    }

    /// Seconds per copy over `reps` copies, device synchronised at both ends.
    pub fn time(&mut self, reps: usize) -> Result<f64, BoxError> {
        let wait = |d: Device| {
            if let Device::Cuda(i) = d {
                tch::Cuda::synchronize(i as i64);
            }
        };
        wait(self.device);
        let start = std::time::Instant::now();
        for _ in 0..reps {
            self.dst.f_copy_(&self.src)?;
        }
        wait(self.device);
        Ok(start.elapsed().as_secs_f64() / reps.max(1) as f64)
    }
}
