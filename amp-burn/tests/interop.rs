//! burn's own ecosystem around a `BurnStore`: burn's optimisers through the
//! split step, and burn records of the trained module.

use amp_burn::burn::module::Module;
use amp_burn::burn::nn::{Linear, LinearConfig};
use amp_burn::burn::optim::{GradientsParams, SgdConfig as BurnSgd};
use amp_burn::burn::tensor::{Device, Tensor, TensorData};
use amp_burn::{burn, BurnStore, ModuleStore};
use amp_core::{Amp, AmpConfig, AmpError, ParamStore, SgdConfig};

#[derive(Module, Debug)]
struct Net {
    first: Linear,
    second: Linear,
}

impl Net {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.second.forward(self.first.forward(x).tanh())
    }
}

fn device() -> Device {
    Device::flex().autodiff()
}

fn input() -> Tensor<2> {
    let values: Vec<f32> = (0..24).map(|i| ((i * 5 % 13) as f32 - 6.0) / 6.0).collect();
    Tensor::from_data(TensorData::new(values, [8, 3]), &device())
}

fn net() -> Net {
    let device = device();
    Net {
        first: LinearConfig::new(3, 5).init(&device),
        second: LinearConfig::new(5, 2).init(&device),
    }
}

fn loss(net: &Net, x: &Tensor<2>) -> Tensor<1> {
    net.forward(x.clone()).square().mean()
}

fn weights(net: &Net) -> Vec<f32> {
    let mut all = Vec::new();
    for layer in [&net.first, &net.second] {
        all.extend(layer.weight.val().into_data().iter::<f32>());
        all.extend(layer.bias.as_ref().unwrap().val().into_data().iter::<f32>());
    }
    all
}

/// AMP's perturbation with burn's SGD as the base (the split step) takes
/// the same steps as amp's own SGD: both step θ with the gradient at θ + δ.
#[test]
fn burn_sgd_through_the_split_step_matches_amp_sgd() {
    let (x, lr, steps) = (input(), 0.1, 4);
    let config = AmpConfig::new(lr, 0.3);
    let start = net();

    let mut own = Amp::sgd(
        BurnStore::from_module(start.clone()).unwrap(),
        config.clone(),
        SgdConfig::default(),
    )
    .unwrap();
    for _ in 0..steps {
        own.step(|store: &mut BurnStore<Net>, _pass| {
            let l = loss(store.module()?, &x);
            let value = store.backward(&l)?;
            Ok::<_, AmpError>(((), value))
        })
        .unwrap();
    }
    let own = own.into_parts().unwrap().0.into_module().unwrap();

    let mut split = Amp::external(BurnStore::from_module(start.clone()).unwrap(), config).unwrap();
    let mut optimizer = BurnSgd::new().init();
    for _ in 0..steps {
        let store = split.store_mut();
        store.zero_grads().unwrap();
        let l = loss(store.module().unwrap(), &x);
        store.backward(&l).unwrap();
        let mut guard = split.perturb().unwrap();
        let store = guard.store_mut();
        let perturbed = store.module().unwrap().clone();
        let grads = GradientsParams::from_grads(loss(&perturbed, &x).backward(), &perturbed);
        guard.restore().unwrap();
        let store = split.store_mut();
        let theta = store.module().unwrap().clone();
        let stepped = optimizer.step(lr, theta, grads);
        store.set_module(stepped).unwrap();
    }
    let split = split.into_parts().unwrap().0.into_module().unwrap();

    let (a, b, s) = (weights(&own), weights(&split), weights(&start));
    assert_ne!(a, s, "the steps moved the weights");
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-6 * (1.0 + x.abs()),
            "weight {i}: {x} vs {y}"
        );
    }
}

/// The trained module is a plain burn module: its record loads into a
/// fresh one, and a module from elsewhere loads into the store only when
/// its parameters are the store's.
#[test]
fn records_of_the_trained_module_and_set_module() {
    let start = net();
    let mut amp = Amp::sgd(
        BurnStore::from_module(start.clone()).unwrap(),
        AmpConfig::new(0.1, 0.3),
        SgdConfig::nesterov(0.9),
    )
    .unwrap();
    let x = input();
    for _ in 0..2 {
        amp.step(|store: &mut BurnStore<Net>, _pass| {
            let l = loss(store.module()?, &x);
            let value = store.backward(&l)?;
            Ok::<_, AmpError>(((), value))
        })
        .unwrap();
    }
    let trained = amp.into_parts().unwrap().0.into_module().unwrap();
    let restored = start.clone().load_record(trained.clone().into_record());
    assert_eq!(weights(&restored), weights(&trained));

    // The restored module has the start's ids: it loads into a store of the
    // start; a module of other parameters does not, and changes nothing.
    let mut store = BurnStore::from_module(start.clone()).unwrap();
    store.set_module(restored).unwrap();
    assert_eq!(weights(store.module().unwrap()), weights(&trained));
    let err = store.set_module(net()).unwrap_err();
    assert!(err.to_string().contains("the store's is"), "{err}");
    assert_eq!(weights(store.module().unwrap()), weights(&trained));
}
