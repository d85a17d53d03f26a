//! Trains a small MLP (tch::nn) with AMP on a synthetic two-class problem and
//! compares it with plain SGD (AMP with `inner_iter = 0`) on held-out data.
//!
//! ```text
//! cargo run -p amp-tch --release --example tch_mlp            # CPU
//! cargo run -p amp-tch --release --example tch_mlp -- cuda    # GPU, if any
//! ```

use amp_core::{Amp, AmpConfig, AmpError, SgdConfig};
use amp_tch::TchStore;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

/// Noisy two-spirals-like data: label 1 when sin(3x₀) + x₁ > 0, with 10% of
/// the labels flipped so that there is something to overfit.
fn dataset(n: i64, device: Device) -> (Tensor, Tensor) {
    let x = Tensor::rand([n, 2], (Kind::Float, Device::Cpu)) * 4.0 - 2.0;
    let clean = ((x.select(1, 0) * 3.0).sin() + x.select(1, 1)).gt(0.0);
    let flip = Tensor::rand([n], (Kind::Float, Device::Cpu)).lt(0.1);
    let y = clean.logical_xor(&flip).to_kind(Kind::Int64);
    (x.to_device(device), y.to_device(device))
}

fn model(vs: &nn::VarStore) -> nn::Sequential {
    let root = vs.root();
    nn::seq()
        .add(nn::linear(&root / "l1", 2, 64, Default::default()))
        .add_fn(|t| t.relu())
        .add(nn::linear(&root / "l2", 64, 64, Default::default()))
        .add_fn(|t| t.relu())
        .add(nn::linear(&root / "l3", 64, 2, Default::default()))
}

fn accuracy(model: &nn::Sequential, x: &Tensor, y: &Tensor) -> f64 {
    tch::no_grad(|| {
        model
            .forward(x)
            .argmax(1, false)
            .eq_tensor(y)
            .to_kind(Kind::Double)
            .mean(Kind::Double)
            .double_value(&[])
    })
}

fn train(inner_iter: usize, device: Device) -> Result<(f64, f64, f64), AmpError> {
    tch::manual_seed(1);
    let (x, y) = dataset(512, device);
    let (x_test, y_test) = dataset(2048, device);
    let vs = nn::VarStore::new(device);
    let net = model(&vs);
    let mut store = TchStore::from_var_store(&vs)?;
    // Parameters and gradients each in one allocation: the optimiser's
    // batched operations then walk contiguous memory (same results).
    store.flatten()?;
    let config = AmpConfig::new(0.05, 0.5)
        .inner_lr(1.0)
        .inner_iter(inner_iter)
        .weight_decay(1e-4);
    let mut amp = Amp::sgd(store, config, SgdConfig::nesterov(0.9))?;
    let batch = 64;
    let mut loss = f64::NAN;
    for step in 0..400i64 {
        let start = (step * batch) % 512;
        let xb = x.narrow(0, start, batch);
        let yb = y.narrow(0, start, batch);
        // The store clears the gradients before each call of the closure.
        let report = amp.step(|_store, _pass| {
            let logits = net.forward(&xb);
            let loss = logits.cross_entropy_for_logits(&yb);
            loss.backward();
            Ok::<_, AmpError>((logits, loss.double_value(&[])))
        })?;
        loss = report.loss;
    }
    Ok((
        loss,
        accuracy(&net, &x, &y),
        accuracy(&net, &x_test, &y_test),
    ))
}

fn main() -> Result<(), AmpError> {
    let device = match std::env::args().nth(1).as_deref() {
        Some("cuda") => Device::cuda_if_available(),
        _ => Device::Cpu,
    };
    println!("device: {device:?}");
    for (name, inner_iter) in [("SGD (K = 0)", 0), ("AMP (K = 1)", 1)] {
        let (loss, train_acc, test_acc) = train(inner_iter, device)?;
        println!(
            "{name:12} final batch loss {loss:.4}  train accuracy {train_acc:.3}  \
             test accuracy {test_acc:.3}"
        );
    }
    Ok(())
}
