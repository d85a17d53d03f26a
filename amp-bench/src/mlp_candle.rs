//! The benchmark MLP on candle (CPU): `candle_nn::Linear` layers over vars
//! that a `CandleStore` holds; gradients from candle's autograd.

use amp::backend::candle::candle_core::{DType, Device, Module, Tensor, Var};
use amp::backend::candle::candle_nn::{self, Linear};
use amp::backend::candle::CandleStore;
use amp::BoxError;

use crate::fixtures::{amp_config, Closure, Trainer, TrainerPair};
use crate::mlp::{Problem, EPSILON, LR};

/// The dtype of the model's vars and activations.
fn dtype() -> DType {
    if crate::fixtures::current_settings().bf16 {
        DType::BF16
    } else {
        DType::F32
    }
}

/// The model's layers and the store over their vars (bf16 ones with f32
/// master weights).
fn model(problem: &Problem, device: &Device) -> Result<(Vec<Linear>, CandleStore), BoxError> {
    let mut vars = Vec::new();
    let mut layers = Vec::new();
    for layer in &problem.layers {
        let w = Var::from_tensor(
            &Tensor::from_vec(layer.weight.clone(), (layer.outputs, layer.inputs), device)?
                .to_dtype(dtype())?,
        )?;
        let b = Var::from_tensor(
            &Tensor::from_vec(layer.bias.clone(), layer.outputs, device)?.to_dtype(dtype())?,
        )?;
        layers.push(Linear::new(
            w.as_tensor().clone(),
            Some(b.as_tensor().clone()),
        ));
        vars.push(w);
        vars.push(b);
    }
    let store = CandleStore::from_vars(vars)?;
    if dtype() == DType::F32 {
        Ok((layers, store))
    } else {
        Ok((layers, store.with_master_weights()?))
    }
}

/// The closure: forward, cross-entropy, `backward` into the store.
fn closure(
    problem: &Problem,
    layers: Vec<Linear>,
    device: &Device,
) -> Result<Closure<CandleStore>, BoxError> {
    let x = Tensor::from_vec(
        problem.x.clone(),
        (problem.spec.batch, crate::mlp::INPUTS),
        device,
    )?
    .to_dtype(dtype())?;
    let labels: Vec<u32> = problem.y.iter().map(|&c| c as u32).collect();
    let y = Tensor::from_vec(labels, problem.spec.batch, device)?;
    Ok(Box::new(move |store: &mut CandleStore, _pass| {
        let mut h = x.clone();
        for (l, layer) in layers.iter().enumerate() {
            h = layer.forward(&h)?;
            if l + 1 < layers.len() {
                h = h.relu()?;
            }
        }
        let loss = candle_nn::loss::cross_entropy(&h.to_dtype(DType::F32)?, &y)?;
        let value = store.backward(&loss)?;
        Ok(((), value))
    }))
}

fn trainer(problem: &Problem, inner_iter: usize) -> Result<Trainer<CandleStore>, BoxError> {
    let device = Device::Cpu;
    let (layers, store) = model(problem, &device)?;
    let closure = closure(problem, layers, &device)?;
    Trainer::new(
        store,
        amp_config(inner_iter, LR, EPSILON),
        closure,
        crate::fixtures::cdl::sync,
    )
}

/// The ERM (`inner_iter` 0) and AMP (`inner_iter` 1) trainers of `problem`.
pub fn trainers(problem: &Problem) -> Result<TrainerPair<CandleStore>, BoxError> {
    Ok((trainer(problem, 0)?, trainer(problem, 1)?))
}
