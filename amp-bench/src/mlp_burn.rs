//! The benchmark MLP on burn (flex, burn's CPU backend): a module of burn
//! `Linear` layers that a `BurnStore` holds and rebuilds before each pass;
//! gradients from burn's autograd.

use amp::backend::burn::burn::module::{Module, Param};
use amp::backend::burn::burn::nn::loss::CrossEntropyLossConfig;
use amp::backend::burn::burn::nn::Linear;
use amp::backend::burn::burn::tensor::{Device, Int, Tensor, TensorData};
// `burn` is in scope for `#[derive(Module)]`.
use amp::backend::burn::{burn, BurnStore, ModuleStore};
use amp::BoxError;

use crate::fixtures::{amp_config, Closure, Trainer, TrainerPair};
use crate::mlp::{Problem, EPSILON, INPUTS, LR};

/// Linear → ReLU → … → Linear; burn's `Linear` holds its weight `[in, out]`.
#[derive(Module, Debug)]
pub struct Mlp {
    layers: Vec<Linear>,
}

impl Mlp {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let last = self.layers.len() - 1;
        let mut h = x;
        for (l, layer) in self.layers.iter().enumerate() {
            h = layer.forward(h);
            if l < last {
                h = h.clamp_min(0.0);
            }
        }
        h
    }
}

fn model(problem: &Problem, device: &Device) -> Mlp {
    let layers = problem
        .layers
        .iter()
        .map(|layer| {
            let weight = TensorData::new(layer.weight.clone(), [layer.outputs, layer.inputs]);
            let weight = Tensor::<2>::from_data(weight, device).transpose();
            let bias = Tensor::<1>::from_data(
                TensorData::new(layer.bias.clone(), [layer.outputs]),
                device,
            );
            Linear {
                weight: Param::from_tensor(weight.detach().require_grad()),
                bias: Some(Param::from_tensor(bias.require_grad())),
            }
        })
        .collect();
    Mlp { layers }
}

fn trainer(problem: &Problem, inner_iter: usize) -> Result<Trainer<BurnStore<Mlp>>, BoxError> {
    let device = Device::flex().autodiff();
    let store = BurnStore::from_module(model(problem, &device))?;
    let batch = problem.spec.batch;
    let x = Tensor::<2>::from_data(TensorData::new(problem.x.clone(), [batch, INPUTS]), &device);
    let labels: Vec<i64> = problem.y.iter().map(|&c| c as i64).collect();
    let y = Tensor::<1, Int>::from_data(TensorData::new(labels, [batch]), &device);
    let loss = CrossEntropyLossConfig::new().init(&device);
    let closure: Closure<BurnStore<Mlp>> = Box::new(move |store: &mut BurnStore<Mlp>, _pass| {
        let logits = store.module()?.forward(x.clone());
        let value = store.backward(&loss.forward(logits, y.clone()))?;
        Ok(((), value))
    });
    Trainer::new(
        store,
        amp_config(inner_iter, LR, EPSILON),
        closure,
        crate::fixtures::brn::sync,
    )
}

/// The ERM (`inner_iter` 0) and AMP (`inner_iter` 1) trainers of `problem`.
pub fn trainers(problem: &Problem) -> Result<TrainerPair<BurnStore<Mlp>>, BoxError> {
    crate::fixtures::f32_only("burn")?;
    Ok((trainer(problem, 0)?, trainer(problem, 1)?))
}
