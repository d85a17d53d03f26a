//! AMP with real candle autograd: gradients come from `backward()` on
//! `candle_nn` models and are handed to the store inside the closure.
mod common;

use amp_candle::candle_core::{DType as CDType, Device, Module, Tensor};
use amp_candle::candle_nn::{self, Init, VarBuilder, VarMap};
use amp_candle::CandleStore;
use amp_core::{
    Amp, AmpConfig, AmpError, BoxError, HostTensor, ParamStore, RestoreMode, SgdConfig, Slot,
};
use amp_ndarray::NdStore;
use ndarray::{Array2, Ix1, Ix2};

const N: usize = 16;

fn regression_data() -> (Vec<f64>, Vec<f64>) {
    (common::values(11, N * 3), common::values(12, N * 2))
}

/// MSE of a `Linear(3 → 2)` computed by hand, with its gradient: with
/// r = X Wᵀ + b − Y and L = Σ r² / (2N), ∂L/∂r = r / N, so
/// ∂L/∂W = (r / N)ᵀ X and ∂L/∂b = Σ_rows r / N. Store order is the
/// VarMap's sorted order: 0 = "bias" (2), 1 = "weight" (2×3).
fn mse_by_hand(s: &mut NdStore<f64>, x: &Array2<f64>, y: &Array2<f64>) -> Result<f64, AmpError> {
    let b = s.params()[0]
        .view()
        .into_dimensionality::<Ix1>()
        .unwrap()
        .to_owned();
    let w = s.params()[1]
        .view()
        .into_dimensionality::<Ix2>()
        .unwrap()
        .to_owned();
    let r = x.dot(&w.t()) + &b - y;
    let loss = r.iter().map(|v| v * v).sum::<f64>() / (2.0 * N as f64);
    let dr = r / N as f64;
    s.set_grad(0, dr.sum_axis(ndarray::Axis(0)).into_dyn())?;
    s.set_grad(1, dr.t().dot(x).into_dyn())?;
    Ok(loss)
}

/// AMP on a candle_nn `Linear` with autograd gradients matches the ndarray
/// oracle with hand-derived gradients, in f64 at 1e-12 (the only
/// differences are summation orders inside matmul and the norms).
#[test]
fn linear_regression_autograd_matches_oracle() {
    let dev = Device::Cpu;
    let (xs, ys) = regression_data();
    let x = Tensor::from_vec(xs.clone(), (N, 3), &dev).unwrap();
    let y = Tensor::from_vec(ys.clone(), (N, 2), &dev).unwrap();
    let x_h = Array2::from_shape_vec((N, 3), xs).unwrap();
    let y_h = Array2::from_shape_vec((N, 2), ys).unwrap();

    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, CDType::F64, &dev);
    let model = candle_nn::linear(3, 2, vb).unwrap();
    let store = CandleStore::from_varmap(&varmap).unwrap();
    assert_eq!(store.names().unwrap(), ["bias", "weight"]);
    let initial: Vec<HostTensor> = (0..2)
        .map(|i| store.read(Slot::Params, i).unwrap())
        .collect();

    for restore in [RestoreMode::Copy, RestoreMode::Subtract] {
        for inner_iter in [1, 2] {
            // Same start for every configuration.
            let mut store = CandleStore::from_varmap(&varmap).unwrap();
            for (i, t) in initial.iter().enumerate() {
                store.write(Slot::Params, i, t).unwrap();
            }
            let config = AmpConfig::new(0.2, 0.05)
                .inner_iter(inner_iter)
                .weight_decay(1e-3)
                .restore(restore);
            let sgd = SgdConfig::nesterov(0.9);
            let mut amp_c = Amp::sgd(store, config.clone(), sgd).unwrap();
            let mut amp_o = Amp::sgd(common::oracle_from(&initial), config, sgd).unwrap();
            for step in 0..6 {
                let rc = amp_c
                    .step(|s: &mut CandleStore, _| {
                        let pred = model.forward(&x)?;
                        let loss = ((pred - &y)?.sqr()?.sum_all()? / (2.0 * N as f64))?;
                        Ok::<_, BoxError>(((), s.backward(&loss)?))
                    })
                    .unwrap();
                let ro = amp_o
                    .step(|s: &mut NdStore<f64>, _| {
                        Ok::<_, AmpError>(((), mse_by_hand(s, &x_h, &y_h)?))
                    })
                    .unwrap();
                let tol = common::Tol::elementwise(1e-12);
                common::compare_reports(&format!("step {step}"), &rc, &ro, tol);
                for i in 0..2 {
                    let c = amp_c.store().read(Slot::Params, i).unwrap();
                    let o = amp_o.store().read(Slot::Params, i).unwrap();
                    assert!(
                        common::excess(&c, &o, tol) <= 1.0,
                        "step {step}: {c:?} vs {o:?}"
                    );
                }
            }
        }
    }
}

/// `backward` captures exactly the gradients `loss.backward()` gives, and a
/// var the loss does not use gets none, so AMP neither perturbs nor steps it.
#[test]
fn backward_captures_the_grads_of_the_stores_vars() {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, CDType::F32, &dev);
    let model = candle_nn::linear(3, 2, vb.pp("used")).unwrap();
    let unused = vb.get_with_hints(4, "unused", Init::Const(0.5)).unwrap();
    let x = Tensor::from_vec(
        common::values(3, 12).iter().map(|&v| v as f32).collect(),
        (4, 3),
        &dev,
    )
    .unwrap();
    let mut store = CandleStore::from_varmap(&varmap).unwrap();
    assert_eq!(
        store.names().unwrap(),
        ["unused", "used.bias", "used.weight"]
    );

    let loss = model
        .forward(&x)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    let expected = loss.backward().unwrap();
    let value = store.backward(&loss).unwrap();
    assert_eq!(value, f64::from(loss.to_scalar::<f32>().unwrap()));
    assert_eq!(store.grad_mask().unwrap(), [false, true, true]);
    for i in 1..3 {
        let want = expected.get(store.vars()[i].as_tensor()).unwrap();
        let got = store.grad(i).unwrap();
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    }
    // Accumulating the same gradients doubles them; absorbing replaces.
    store.accumulate_grads(&expected).unwrap();
    let doubled = store.read(Slot::Grads, 1).unwrap();
    store.absorb_grads(&expected).unwrap();
    let single = store.read(Slot::Grads, 1).unwrap();
    for (d, s) in doubled.data().iter().zip(single.data()) {
        assert_eq!(*d, 2.0 * s);
    }

    let mut amp = Amp::sgd(store, AmpConfig::new(0.1, 0.5), SgdConfig::momentum(0.9)).unwrap();
    for _ in 0..3 {
        amp.step(|s: &mut CandleStore, _| {
            let loss = model.forward(&x)?.sqr()?.mean_all()?;
            Ok::<_, BoxError>(((), s.backward(&loss)?))
        })
        .unwrap();
    }
    assert_eq!(unused.to_vec1::<f32>().unwrap(), [0.5; 4]);
}

#[test]
fn mlp_trains_in_f32() {
    let (first, last, accuracy) = common::train_mlp(&Device::Cpu, CDType::F32, 60);
    assert!(last < 0.5 * first, "loss {first} -> {last}");
    assert!(accuracy > 0.9, "accuracy {accuracy}");
}

#[test]
fn mlp_trains_in_f64() {
    let (first, last, accuracy) = common::train_mlp(&Device::Cpu, CDType::F64, 60);
    assert!(last < 0.5 * first, "loss {first} -> {last}");
    assert!(accuracy > 0.9, "accuracy {accuracy}");
}

/// bf16 weights: candle runs the model in bf16, the store computes its
/// updates in f32 and rounds them back.
#[test]
fn mlp_trains_in_bf16() {
    let (first, last, accuracy) = common::train_mlp(&Device::Cpu, CDType::BF16, 60);
    assert!(last < 0.7 * first, "loss {first} -> {last}");
    assert!(accuracy > 0.85, "accuracy {accuracy}");
}
