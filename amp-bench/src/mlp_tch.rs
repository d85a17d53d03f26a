//! The benchmark MLP on libtorch: `tch::nn::linear` layers in a `VarStore`
//! that a `TchStore` holds; gradients from libtorch's autograd. With
//! `--precision bf16` the variables are bf16, the loss is taken in f32 and
//! the (plain) store steps f32 master weights.

use amp::backend::tch::TchStore;
use amp::BoxError;
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use crate::fixtures::{amp_config, Closure, Trainer, TrainerPair};
use crate::mlp::{Problem, EPSILON, LR};

fn trainer(
    problem: &Problem,
    inner_iter: usize,
    flat: bool,
) -> Result<Trainer<TchStore>, BoxError> {
    let device = crate::fixtures::tc::device();
    let vs = nn::VarStore::new(device);
    let mut model = nn::seq();
    let count = problem.layers.len();
    for (l, layer) in problem.layers.iter().enumerate() {
        let mut linear = nn::linear(
            vs.root() / format!("l{l}"),
            layer.inputs as i64,
            layer.outputs as i64,
            Default::default(),
        );
        tch::no_grad(|| -> Result<(), BoxError> {
            let w =
                Tensor::from_slice(&layer.weight).view([layer.outputs as i64, layer.inputs as i64]);
            linear.ws.f_copy_(&w.to_device(device))?;
            if let Some(bs) = linear.bs.as_mut() {
                bs.f_copy_(&Tensor::from_slice(&layer.bias).to_device(device))?;
            }
            Ok(())
        })?;
        model = model.add(linear);
        if l + 1 < count {
            model = model.add_fn(|t| t.relu());
        }
    }
    let bf16 = crate::fixtures::current_settings().bf16;
    let kind = if bf16 { Kind::BFloat16 } else { Kind::Float };
    let mut vs = vs;
    if bf16 {
        vs.bfloat16();
    }
    let x = Tensor::from_slice(&problem.x)
        .view([problem.spec.batch as i64, crate::mlp::INPUTS as i64])
        .to_kind(kind)
        .to_device(device);
    let labels: Vec<i64> = problem.y.iter().map(|&c| c as i64).collect();
    let y = Tensor::from_slice(&labels).to_device(device);
    let mut store = TchStore::from_var_store(&vs)?;
    if bf16 {
        store = store.with_master_weights()?;
    }
    if flat {
        store.flatten()?;
    }
    let closure: Closure<TchStore> = Box::new(move |_: &mut TchStore, _pass| {
        let _keep = &vs;
        let logits = model.forward(&x).to_kind(Kind::Float);
        let loss = logits.cross_entropy_for_logits(&y);
        loss.backward();
        Ok(((), loss.to_kind(Kind::Double).double_value(&[])))
    });
    Trainer::new(
        store,
        amp_config(inner_iter, LR, EPSILON),
        closure,
        crate::fixtures::tc::sync,
    )
}

/// The ERM (`inner_iter` 0) and AMP (`inner_iter` 1) trainers of `problem`.
pub fn trainers(problem: &Problem) -> Result<TrainerPair<TchStore>, BoxError> {
    Ok((trainer(problem, 0, false)?, trainer(problem, 1, false)?))
}

/// The same pair over flattened stores (`TchStore::flatten`).
pub fn flat_trainers(problem: &Problem) -> Result<TrainerPair<TchStore>, BoxError> {
    crate::fixtures::f32_only("tch flat (master weights need the plain layout)")?;
    Ok((trainer(problem, 0, true)?, trainer(problem, 1, true)?))
}
