//! AMP with a framework's own optimiser, through the split step: candle-nn's
//! `AdamW` here (and tch's `nn::AdamW` with `--features tch`), stepping a
//! small MLP on a two-class problem.
//!
//! ```text
//! cargo run --release --example split_step
//! cargo run --release --example split_step --features tch
//! ```
//!
//! Each step: a clean forward and backward at θ by the framework; then
//! `Amp::perturb` moves the weights to θ + δ; the framework's backward there
//! gives ∇L(θ + δ); `restore` brings θ back; the framework's optimiser
//! steps θ with that gradient. Were anything to fail or panic between
//! `perturb` and `restore`, the guard would bring θ back on its own.

use amp::backend::candle::CandleStore;
use amp::{Amp, AmpConfig, AmpError, ParamStore};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{linear, Optimizer, VarBuilder, VarMap};

const POINTS: usize = 256;
const STEPS: usize = 300;

/// Points of the plane, labelled 1 inside the circle of radius 1.
fn circle() -> (Vec<f32>, Vec<u32>) {
    let mut xs = Vec::with_capacity(2 * POINTS);
    let mut ys = Vec::with_capacity(POINTS);
    for i in 0..POINTS {
        let (a, b) = ((i as f32 * 0.61).sin() * 1.6, (i as f32 * 1.37).cos() * 1.6);
        xs.extend([a, b]);
        ys.push(u32::from(a * a + b * b < 1.0));
    }
    (xs, ys)
}

fn accuracy(logits: &Tensor, y: &Tensor) -> candle_core::Result<f32> {
    let hits = logits
        .argmax(D::Minus1)?
        .eq(y)?
        .to_dtype(DType::F32)?
        .mean_all()?;
    hits.to_scalar::<f32>()
}

fn candle_run() -> Result<(), Box<dyn std::error::Error>> {
    let device = Device::Cpu;
    let (xs, ys) = circle();
    let x = Tensor::from_vec(xs, (POINTS, 2), &device)?;
    let y = Tensor::from_vec(ys, POINTS, &device)?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let (l1, l2) = (linear(2, 32, vb.pp("l1"))?, linear(32, 2, vb.pp("l2"))?);
    let forward =
        |x: &Tensor| -> candle_core::Result<Tensor> { l2.forward(&l1.forward(x)?.tanh()?) };
    let loss_of = |x: &Tensor| -> candle_core::Result<Tensor> {
        candle_nn::loss::cross_entropy(&forward(x)?, &y)
    };

    // The framework's own optimiser, over the same variables.
    let params = candle_nn::ParamsAdamW {
        lr: 1e-2,
        weight_decay: 1e-2,
        ..Default::default()
    };
    let mut adamw = candle_nn::AdamW::new(varmap.all_vars(), params)?;
    // AMP without a base optimiser: lr and weight decay belong to AdamW.
    let store = CandleStore::from_varmap(&varmap)?;
    let mut amp = Amp::external(store, AmpConfig::new(0.0, 0.05))?;

    let first = loss_of(&x)?.to_scalar::<f32>()?;
    for _ in 0..STEPS {
        amp.store_mut().zero_grads()?;
        amp.store_mut().backward(&loss_of(&x)?)?; // clean pass at θ
        let guard = amp.perturb()?; // weights at θ + δ
        let grads = loss_of(&x)?.backward()?; // ∇L(θ + δ), by candle
        guard.restore()?; // weights back at θ
        adamw.step(&grads)?; // candle-nn's AdamW steps θ
    }
    let last = loss_of(&x)?.to_scalar::<f32>()?;
    let acc = accuracy(&forward(&x)?, &y)?;
    println!(
        "candle-nn AdamW + AMP: loss {first:.4} → {last:.4}, accuracy {acc:.3}, {} steps",
        amp.steps()
    );
    if last.is_nan() || last >= first {
        return Err(Box::new(AmpError::backend("the loss did not decrease")));
    }
    Ok(())
}

#[cfg(feature = "tch")]
fn tch_run() -> Result<(), Box<dyn std::error::Error>> {
    use amp::backend::tch::TchStore;
    use tch::nn::{self, Module as _, OptimizerConfig};
    use tch::{Device, Kind, Tensor};

    let (xs, ys) = circle();
    let x = Tensor::from_slice(&xs).view([POINTS as i64, 2]);
    let y = Tensor::from_slice(&ys.iter().map(|&c| i64::from(c)).collect::<Vec<_>>());
    let vs = nn::VarStore::new(Device::Cpu);
    let net = nn::seq()
        .add(nn::linear(vs.root() / "l1", 2, 32, Default::default()))
        .add_fn(|t| t.tanh())
        .add(nn::linear(vs.root() / "l2", 32, 2, Default::default()));
    let mut adamw = nn::AdamW {
        wd: 1e-2,
        ..Default::default()
    }
    .build(&vs, 1e-2)?;
    let mut amp = Amp::external(TchStore::from_var_store(&vs)?, AmpConfig::new(0.0, 0.05))?;
    let loss_of = || net.forward(&x).cross_entropy_for_logits(&y);

    let first = loss_of().double_value(&[]);
    for _ in 0..STEPS {
        adamw.zero_grad();
        loss_of().backward(); // clean pass at θ, into each tensor's .grad
        let guard = amp.perturb()?; // weights at θ + δ, gradients cleared
        loss_of().backward(); // ∇L(θ + δ), by libtorch
        guard.restore()?; // weights back at θ, gradients kept
        adamw.step(); // libtorch's AdamW steps θ
    }
    let last = loss_of().double_value(&[]);
    let acc = net
        .forward(&x)
        .argmax(-1, false)
        .eq_tensor(&y)
        .to_kind(Kind::Float)
        .mean(Kind::Float)
        .double_value(&[]);
    println!(
        "tch nn::AdamW + AMP:   loss {first:.4} → {last:.4}, accuracy {acc:.3}, {} steps",
        amp.steps()
    );
    if last.is_nan() || last >= first {
        return Err(Box::new(AmpError::backend("the loss did not decrease")));
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    candle_run()?;
    #[cfg(feature = "tch")]
    tch_run()?;
    Ok(())
}
