//! Data-parallel AMP on burn modules: ranks are threads, each with its own
//! copy of a burn `Linear` and its own `BurnStore`, joined by amp's
//! in-process collective. Reducing every pass trains as one process on the
//! concatenated batch (f32; only the order of the sums differs: 1e-5
//! relative), and the ranks' modules stay bit-identical.

use std::sync::Arc;
use std::time::Duration;

use amp_burn::burn::module::Param;
use amp_burn::burn::nn::Linear;
use amp_burn::burn::tensor::{Device, Tensor, TensorData};
use amp_burn::{BurnStore, ModuleStore};
use amp_core::{Amp, AmpConfig, AmpError, InProcess, Reduce, SgdConfig};
use amp_testkit::data_parallel::{row, share};

fn device() -> Device {
    Device::flex().autodiff()
}

/// `Linear(3 → 1)` from w = (0.3, −0.2, 0.1), b = 0.05.
fn linear() -> Linear {
    let device = device();
    let w = TensorData::new(vec![0.3f32, -0.2, 0.1], [3, 1]);
    let b = TensorData::new(vec![0.05f32], [1]);
    Linear {
        weight: Param::from_tensor(Tensor::<2>::from_data(w, &device).require_grad()),
        bias: Some(Param::from_tensor(
            Tensor::<1>::from_data(b, &device).require_grad(),
        )),
    }
}

/// ½ mean of (x·w + b − y)² over `rows`, by burn, and its gradients into
/// the store.
fn least_squares(store: &mut BurnStore<Linear>, rows: &[usize]) -> Result<((), f64), AmpError> {
    let (xs, ys): (Vec<[f64; 3]>, Vec<f64>) = rows.iter().map(|&i| row(i)).unzip();
    let xs: Vec<f32> = xs.iter().flatten().map(|&v| v as f32).collect();
    let ys: Vec<f32> = ys.iter().map(|&v| v as f32).collect();
    let device = device();
    let x = Tensor::<2>::from_data(TensorData::new(xs, [rows.len(), 3]), &device);
    let y = Tensor::<2>::from_data(TensorData::new(ys, [rows.len(), 1]), &device);
    let r = store.module()?.forward(x) - y;
    let loss = r.square().mean().mul_scalar(0.5);
    Ok(((), store.backward(&loss)?))
}

fn weights(linear: &Linear) -> Vec<f32> {
    let mut all: Vec<f32> = linear.weight.val().into_data().iter::<f32>().collect();
    all.extend(
        linear
            .bias
            .as_ref()
            .unwrap()
            .val()
            .into_data()
            .iter::<f32>(),
    );
    all
}

#[test]
fn every_pass_on_burn_ranks_equals_one_process() {
    let (world, steps) = (2, 8);
    let config = AmpConfig::new(0.2, 0.05)
        .inner_iter(2)
        .reduce(Reduce::EveryPass);

    let store = BurnStore::from_module(linear()).unwrap();
    let mut single = Amp::sgd(store, config.clone(), SgdConfig::nesterov(0.9)).unwrap();
    for step in 0..steps {
        let rows: Vec<usize> = (0..world).flat_map(|r| share(step, r, world)).collect();
        single
            .step(|s: &mut BurnStore<Linear>, _| least_squares(s, &rows))
            .unwrap();
    }
    let single = weights(&single.into_parts().unwrap().0.into_module().unwrap());

    let config = Arc::new(config);
    let ranks: Vec<Vec<f32>> = InProcess::group_with_timeout(world, Duration::from_secs(20))
        .into_iter()
        .enumerate()
        .map(|(rank, collective)| {
            let config = Arc::clone(&config);
            std::thread::spawn(move || {
                let store = BurnStore::from_module(linear()).unwrap();
                let amp = Amp::sgd(store, (*config).clone(), SgdConfig::nesterov(0.9)).unwrap();
                let mut amp = amp.with_collective(Box::new(collective)).unwrap();
                for step in 0..steps {
                    let rows = share(step, rank, world);
                    amp.step(|s: &mut BurnStore<Linear>, _| least_squares(s, &rows))
                        .unwrap();
                }
                weights(&amp.into_parts().unwrap().0.into_module().unwrap())
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();

    assert_eq!(ranks[0], ranks[1], "the ranks' modules are bit-identical");
    let start = weights(&linear());
    assert_ne!(ranks[0], start);
    for (i, (a, b)) in ranks[0].iter().zip(&single).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
            "weight {i}: {a} vs {b}"
        );
    }
}
