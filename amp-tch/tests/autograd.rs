//! AMP with gradients computed by libtorch's autograd.

mod common;

use amp_core::{
    Amp, AmpConfig, AmpError, DType, HostTensor, ParamStore, RestoreMode, SgdConfig, Slot,
};
use amp_tch::TchStore;
use ndarray::{Array1, Array2, ArrayD, Ix0, Ix1};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

const N: usize = 16;
const D: usize = 3;

/// Regression data: x_ij = sin(1.3 i + 0.7 j), y_i = cos(0.9 i).
fn data() -> (Array2<f64>, Array1<f64>) {
    let x = Array2::from_shape_fn((N, D), |(i, j)| (1.3 * i as f64 + 0.7 * j as f64).sin());
    let y = Array1::from_shape_fn(N, |i| (0.9 * i as f64).cos());
    (x, y)
}

/// Linear least squares, L = ½ mean((x·w + b − y)²), with its gradient taken
/// by autograd on tch and derived by hand (∇w = xᵀr / n, ∇b = mean r) on the
/// oracle: the two AMP runs must agree.
fn linear_regression_matches_oracle(device: Device) {
    let (x, y) = data();
    let w0 = HostTensor::new(vec![D], DType::F64, vec![0.3, -0.2, 0.1]).unwrap();
    let b0 = HostTensor::new(vec![], DType::F64, vec![0.05]).unwrap();
    let config = AmpConfig::new(0.2, 0.05)
        .inner_lr(1.0)
        .inner_iter(2)
        .weight_decay(1e-3)
        .restore(RestoreMode::Subtract);
    let sgd = SgdConfig::nesterov(0.9);

    let oracle = common::oracle(&[w0.clone(), b0.clone()]);
    let mut expected = Amp::sgd(oracle, config.clone(), sgd).unwrap();
    let store = TchStore::from_host(&[w0, b0], device).unwrap();
    let mut actual = Amp::sgd(store, config, sgd).unwrap();

    let xt = Tensor::from_slice(x.as_slice().unwrap())
        .view([N as i64, D as i64])
        .to_device(device);
    let yt = Tensor::from_slice(y.as_slice().unwrap()).to_device(device);

    for step in 0..10 {
        let e = expected
            .step(|s: &mut amp_ndarray::NdStore<f64>, _| {
                let w = s.params()[0].clone().into_dimensionality::<Ix1>().unwrap();
                let b = *s.params()[1]
                    .clone()
                    .into_dimensionality::<Ix0>()
                    .unwrap()
                    .first()
                    .unwrap();
                let r = x.dot(&w) + b - &y;
                let loss = 0.5 * r.mapv(|v| v * v).mean().unwrap();
                s.set_grad(0, (x.t().dot(&r) / N as f64).into_dyn())?;
                s.set_grad(1, ArrayD::from_elem(vec![], r.mean().unwrap()))?;
                Ok::<_, AmpError>(((), loss))
            })
            .unwrap();
        let a = actual
            .step(|s: &mut TchStore, _| {
                let (w, b) = (&s.tensors()[0], &s.tensors()[1]);
                let r = xt.matmul(w) + b - &yt;
                let loss = r.square().mean(Kind::Double) * 0.5;
                loss.f_backward()?;
                Ok::<_, tch::TchError>(((), loss.f_double_value(&[])?))
            })
            .unwrap();
        assert_eq!(a.closure_calls, 3);
        // f64 throughout; matmul and mean sum in a different order than
        // ndarray's dot: a few ulps per step, so 1e-12 relative.
        assert!(
            (a.loss - e.loss).abs() <= 1e-12 * e.loss.abs().max(1.0),
            "step {step}"
        );
        let d = common::max_relative_difference(actual.store(), expected.store(), Slot::Params);
        assert!(d <= 1e-12, "step {step}: {d:e}");
    }
}

#[test]
fn linear_regression_matches_oracle_cpu() {
    linear_regression_matches_oracle(Device::Cpu);
}

#[test]
fn linear_regression_matches_oracle_cuda() {
    if let Some(device) = common::cuda_or_skip("linear_regression_matches_oracle_cuda") {
        linear_regression_matches_oracle(device);
    }
}

/// A two-class problem: is the point inside the unit circle?
fn circle_data(device: Device) -> (Tensor, Tensor) {
    tch::manual_seed(7);
    let x = (Tensor::rand([200, 2], (Kind::Float, Device::Cpu)) * 3.0 - 1.5).to_device(device);
    let y = x
        .square()
        .sum_dim_intlist(1, false, Kind::Float)
        .gt(1.0)
        .to_kind(Kind::Int64);
    (x, y)
}

fn mlp(vs: &nn::VarStore) -> nn::Sequential {
    nn::seq()
        .add(nn::linear(vs.root() / "l1", 2, 16, Default::default()))
        .add_fn(|t| t.tanh())
        .add(nn::linear(vs.root() / "l2", 16, 2, Default::default()))
}

fn snapshot(store: &TchStore) -> Vec<HostTensor> {
    (0..store.num_tensors())
        .map(|i| store.read(Slot::Params, i).unwrap())
        .collect()
}

fn mlp_trains(device: Device, flat: bool) {
    let (x, y) = circle_data(device);
    let vs = nn::VarStore::new(device);
    let model = mlp(&vs);
    // A trainable variable the loss never reaches: it has no gradient, so it
    // is neither perturbed nor stepped (nor decayed).
    let unused = vs.root().ones("unused", &[3]);
    let mut store = TchStore::from_var_store(&vs).unwrap();
    if flat {
        store.flatten().unwrap();
    }
    assert_eq!(store.num_tensors(), 5);
    let config = AmpConfig::new(0.2, 0.1).inner_iter(2).weight_decay(1e-4);
    let mut amp = Amp::sgd(store, config, SgdConfig::nesterov(0.9)).unwrap();
    let mut first = None;
    let mut last = f64::NAN;
    for _ in 0..300 {
        let report = amp
            .step(|_store, _pass| {
                let logits = model.forward(&x);
                let loss = logits.cross_entropy_for_logits(&y);
                loss.backward();
                Ok::<_, AmpError>((logits, loss.double_value(&[])))
            })
            .unwrap();
        assert_eq!(report.closure_calls, 3);
        assert!(report.perturbation_norms.iter().all(|&n| n <= 0.1 + 1e-6));
        assert_eq!(report.perturbation_norms[4], 0.0);
        first.get_or_insert(report.loss);
        last = report.loss;
    }
    let first = first.unwrap();
    assert!(last < 0.5 * first, "loss {first} -> {last}");
    let accuracy = model
        .forward(&x)
        .argmax(1, false)
        .eq_tensor(&y)
        .to_kind(Kind::Double)
        .mean(Kind::Double)
        .double_value(&[]);
    assert!(accuracy > 0.85, "accuracy {accuracy}");
    assert_eq!(
        Vec::<f32>::try_from(&unused.to_device(Device::Cpu)).unwrap(),
        vec![1.0; 3]
    );
}

#[test]
fn mlp_trains_cpu() {
    mlp_trains(Device::Cpu, false);
}

#[test]
fn mlp_trains_cpu_flat() {
    mlp_trains(Device::Cpu, true);
}

#[test]
fn mlp_trains_cuda() {
    if let Some(device) = common::cuda_or_skip("mlp_trains_cuda") {
        mlp_trains(device, false);
        mlp_trains(device, true);
    }
}

/// The flat layout changes where the tensors live, not what training
/// computes: the same model trained with and without it ends bit for bit
/// equal, and after `flatten` the model's own variables lie in one
/// allocation.
#[test]
fn flat_layout_trains_like_separate_tensors() {
    let (x, y) = circle_data(Device::Cpu);
    let run = |flat: bool| {
        tch::manual_seed(11);
        let vs = nn::VarStore::new(Device::Cpu);
        let model = mlp(&vs);
        let mut store = TchStore::from_var_store(&vs).unwrap();
        let before = snapshot(&store);
        if flat {
            store.flatten().unwrap();
            assert!(store.is_flat());
            assert_eq!(snapshot(&store), before, "flatten keeps the values");
            // The VarStore's variables are the store's tensors: one run of
            // memory, in store order.
            let vars = vs.trainable_variables();
            let mut next = vars[0].data_ptr() as usize;
            for v in &vars {
                assert_eq!(v.data_ptr() as usize, next);
                next += v.numel() * 4;
            }
        }
        let config = AmpConfig::new(0.1, 0.2).inner_iter(1);
        let mut amp = Amp::sgd(store, config, SgdConfig::nesterov(0.9)).unwrap();
        for _ in 0..20 {
            amp.step(|_s, _p| {
                let loss = model.forward(&x).cross_entropy_for_logits(&y);
                loss.backward();
                Ok::<_, AmpError>(((), loss.double_value(&[])))
            })
            .unwrap();
        }
        snapshot(amp.store())
    };
    assert_eq!(run(true), run(false));
}

/// lr = 0, no weight decay, copy-restore: θ is bit-exactly unchanged after
/// steps whose perturbed passes really moved the weights.
#[test]
fn autograd_copy_restore_is_bit_exact() {
    let (x, y) = circle_data(Device::Cpu);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = mlp(&vs);
    let store = TchStore::from_var_store(&vs).unwrap();
    let before = snapshot(&store);
    let config = AmpConfig::new(0.0, 0.5).inner_iter(2);
    let mut amp = Amp::sgd(store, config, SgdConfig::momentum(0.9)).unwrap();
    for _ in 0..3 {
        let report = amp
            .step(|_s, _p| {
                let loss = model.forward(&x).cross_entropy_for_logits(&y);
                loss.backward();
                Ok::<_, AmpError>(((), loss.double_value(&[])))
            })
            .unwrap();
        assert!(report.perturbed_loss().unwrap() != report.loss);
    }
    assert_eq!(snapshot(amp.store()), before);
}

/// A failing closure or a NaN gradient leaves θ as it was, bit for bit.
#[test]
fn errors_leave_weights_untouched() {
    let (x, y) = circle_data(Device::Cpu);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = mlp(&vs);
    let store = TchStore::from_var_store(&vs).unwrap();
    let config = AmpConfig::new(0.1, 0.5).inner_iter(1);
    let mut amp = Amp::sgd(store, config, SgdConfig::nesterov(0.9)).unwrap();
    // One good step so that the momentum buffer exists.
    amp.step(|_s, _p| {
        let loss = model.forward(&x).cross_entropy_for_logits(&y);
        loss.backward();
        Ok::<_, AmpError>(((), loss.double_value(&[])))
    })
    .unwrap();
    let before = snapshot(amp.store());

    let failed = amp.step(|_s, pass| {
        let loss = model.forward(&x).cross_entropy_for_logits(&y);
        loss.backward();
        if pass.is_perturbed() {
            return Err(AmpError::backend("closure failed on purpose"));
        }
        Ok::<_, AmpError>(((), loss.double_value(&[])))
    });
    assert!(matches!(failed, Err(AmpError::Closure { .. })));
    assert_eq!(snapshot(amp.store()), before);

    let nan = amp.step(|_s, pass| {
        let loss = model.forward(&x).cross_entropy_for_logits(&y);
        let loss = if pass.is_perturbed() {
            loss * f64::NAN
        } else {
            loss
        };
        loss.backward();
        Ok::<_, AmpError>(((), 1.0))
    });
    assert!(
        matches!(nan, Err(AmpError::NonFiniteGradient { .. })),
        "{nan:?}"
    );
    assert_eq!(snapshot(amp.store()), before);
}
