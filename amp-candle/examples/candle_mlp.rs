//! A `candle_nn` MLP trained with AMP (adversarial model perturbation) on
//! generated data: two interleaved spirals, 2 inputs, 2 classes.
//!
//! ```text
//! cargo run --release -p amp-candle --example candle_mlp            # CPU
//! cargo run --release -p amp-candle --example candle_mlp --features cuda -- --cuda
//! ```
//! With `--cuda` the first GPU is used when one is usable; otherwise the
//! example says so and runs on the CPU.
use amp_candle::candle_core::{DType, Device, Module, Tensor, D};
use amp_candle::candle_nn::{self, VarBuilder, VarMap};
use amp_candle::CandleStore;
use amp_core::{Amp, AmpConfig, BoxError, SgdConfig};

/// Two spirals of `per_class` points each, with a little deterministic
/// jitter.
fn spirals(per_class: usize, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let mut xs = Vec::with_capacity(per_class * 4);
    let mut ys = Vec::with_capacity(per_class * 2);
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    let mut jitter = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 40) as f32 / (1u64 << 24) as f32 * 0.1 - 0.05
    };
    for class in 0..2u32 {
        for i in 0..per_class {
            let r = i as f32 / per_class as f32;
            let angle = 3.0 * r * std::f32::consts::PI + class as f32 * std::f32::consts::PI;
            xs.push(r * angle.cos() + jitter());
            xs.push(r * angle.sin() + jitter());
            ys.push(class);
        }
    }
    let n = per_class * 2;
    Ok((
        Tensor::from_vec(xs, (n, 2), device)?,
        Tensor::from_vec(ys, n, device)?,
    ))
}

use amp_candle::candle_core;

fn main() -> Result<(), BoxError> {
    let prefer_cuda = std::env::args().any(|a| a == "--cuda");
    let device = amp_candle::device(prefer_cuda)?;
    if prefer_cuda && !device.is_cuda() {
        let reason = amp_candle::cuda_device(0).err().map(|e| e.to_string());
        eprintln!(
            "CUDA not usable, running on the CPU: {}",
            reason.unwrap_or_default()
        );
    }
    println!("device: {:?}", device.location());

    let (x, y) = spirals(256, &device)?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let model = candle_nn::seq()
        .add(candle_nn::linear(2, 64, vb.pp("l1"))?)
        .add(candle_nn::Activation::Relu)
        .add(candle_nn::linear(64, 64, vb.pp("l2"))?)
        .add(candle_nn::Activation::Relu)
        .add(candle_nn::linear(64, 2, vb.pp("l3"))?);

    // AMP over nesterov SGD, the paper's recipe scaled to a toy problem.
    let store = CandleStore::from_varmap(&varmap)?;
    println!("parameters: {:?}", store.names().unwrap_or_default());
    let config = AmpConfig::new(0.05, 0.1)
        .inner_lr(1.0)
        .inner_iter(1)
        .weight_decay(1e-4);
    let mut amp = Amp::sgd(store, config, SgdConfig::nesterov(0.9))?;

    for step in 0..=400 {
        let report = amp.step(|store: &mut CandleStore, _pass| {
            let logits = model.forward(&x)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
            // Runs backward and hands the gradients of the store's vars over.
            let loss = store.backward(&loss)?;
            Ok::<_, BoxError>((logits, loss))
        })?;
        if step % 50 == 0 {
            let hits = report.output.argmax(D::Minus1)?.eq(&y)?;
            let accuracy = hits.to_dtype(DType::F32)?.mean_all()?.to_scalar::<f32>()?;
            println!(
                "step {step:4}  loss {:.4}  perturbed loss {:.4}  ‖δ‖ max {:.3}  clipped {}  accuracy {:.3}",
                report.loss,
                report.perturbed_loss().unwrap_or(f64::NAN),
                report.perturbation_norms.iter().cloned().fold(0.0, f64::max),
                report.clipped,
                accuracy,
            );
        }
    }
    Ok(())
}
