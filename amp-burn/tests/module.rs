//! A burn module through the store and back: frozen parameters, ids and
//! training state kept, groups by `ParamId`, and what is refused.

use amp_burn::burn::module::{Module, Param};
use amp_burn::burn::nn::{Linear, LinearConfig};
use amp_burn::burn::tensor::{DType as BurnDType, Device, Tensor, TensorData};
use amp_burn::{BurnStore, ModuleStore};
use amp_core::{Amp, AmpConfig, AmpError, ParamGroup, SgdConfig};

#[derive(Module, Debug)]
struct Net {
    first: Linear,
    second: Linear,
}

impl Net {
    fn new(device: &Device) -> Self {
        Net {
            first: LinearConfig::new(3, 4).init(device),
            second: LinearConfig::new(4, 2).init(device),
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.second.forward(self.first.forward(x).tanh())
    }
}

fn device() -> Device {
    Device::flex().autodiff()
}

fn input(device: &Device) -> Tensor<2> {
    let values: Vec<f32> = (0..24).map(|i| ((i * 7 % 11) as f32 - 5.0) / 5.0).collect();
    Tensor::from_data(TensorData::new(values, [8, 3]), device)
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

/// `steps` AMP steps on the mean square of the output; the module back.
fn train(net: Net, config: AmpConfig, steps: usize) -> Result<Net, AmpError> {
    let x = input(&device());
    let store = BurnStore::from_module(net)?;
    let mut amp = Amp::sgd(store, config, SgdConfig::nesterov(0.9))?;
    for _ in 0..steps {
        amp.step(|store: &mut BurnStore<Net>, _pass| {
            let loss = store.module()?.forward(x.clone()).square().mean();
            let value = store.backward(&loss)?;
            Ok::<_, AmpError>(((), value))
        })?;
    }
    amp.into_parts()?.0.into_module()
}

#[test]
fn module_in_module_out_keeps_ids_and_frozen_parameters() {
    let device = device();
    let mut net = Net::new(&device);
    net.first = net.first.freeze();
    let before = net.clone();
    let trained = train(net, AmpConfig::new(0.1, 0.5).inner_iter(2), 3).unwrap();

    // The frozen layer got no gradient, so it is exactly as it was, and
    // still frozen; the other one moved and still trains.
    assert_eq!(
        values(trained.first.weight.val()),
        values(before.first.weight.val())
    );
    assert!(!trained.first.weight.val().is_require_grad());
    assert_ne!(
        values(trained.second.weight.val()),
        values(before.second.weight.val())
    );
    assert!(trained.second.weight.val().is_require_grad());
    let ids = |n: &Net| {
        let b = |l: &Linear| l.bias.as_ref().map(|b| b.id);
        (
            n.first.weight.id,
            b(&n.first),
            n.second.weight.id,
            b(&n.second),
        )
    };
    assert_eq!(ids(&trained), ids(&before));
    // The trained module trains on, with burn's own autograd.
    let loss = trained.forward(input(&device)).square().mean();
    let grads = loss.backward();
    assert!(trained.second.weight.val().grad(&grads).is_some());
}

#[test]
fn groups_by_param_id() {
    let net = Net::new(&device());
    let before = net.clone();
    let store = BurnStore::from_module(net.clone()).unwrap();
    assert_eq!(store.param_ids().len(), 4);
    let second: Vec<_> = [
        Some(net.second.weight.id),
        net.second.bias.as_ref().map(|b| b.id),
    ]
    .into_iter()
    .flatten()
    .collect();
    let indices = store.indices_of(&second).unwrap();
    assert_eq!(
        indices,
        [2, 3],
        "burn visits first.weight, first.bias, second.*"
    );
    // lr 0 for the second layer: only the first one moves.
    let config = AmpConfig::new(0.1, 0.5)
        .group(ParamGroup::new(indices).lr(0.0))
        .group(ParamGroup::rest());
    let trained = train(net, config, 2).unwrap();
    assert_eq!(
        values(trained.second.weight.val()),
        values(before.second.weight.val())
    );
    assert_ne!(
        values(trained.first.weight.val()),
        values(before.first.weight.val())
    );

    let stranger = Param::from_tensor(Tensor::<1>::zeros([2], &device())).id;
    let err = store.indices_of(&[stranger]).unwrap_err();
    assert!(err.to_string().contains("not a float parameter"), "{err}");
}

#[test]
fn what_cannot_work_is_refused() {
    let device = device();
    // Two dtypes in one module.
    let mut net = Net::new(&device);
    let wide = net
        .second
        .weight
        .val()
        .cast(BurnDType::F64)
        .detach()
        .require_grad();
    net.second.weight = Param::from_tensor(wide);
    let err = BurnStore::from_module(net).unwrap_err();
    assert!(
        err.to_string().contains("one store holds one dtype"),
        "{err}"
    );

    // A loss of more than one element, and one off autodiff's tape.
    let mut store = BurnStore::from_module(Net::new(&device)).unwrap();
    let output = store.module().unwrap().forward(input(&device));
    let err = store.backward(&output).unwrap_err();
    assert!(err.to_string().contains("one element"), "{err}");
    let constant = Tensor::<1>::from_data(TensorData::new(vec![1.0f32], [1]), &device);
    let err = store.backward(&constant).unwrap_err();
    assert!(err.to_string().contains("autodiff"), "{err}");
}

#[test]
fn a_panic_in_the_closure_leaves_the_module_as_it_was() {
    let net = Net::new(&device());
    let before = net.clone();
    let store = BurnStore::from_module(net).unwrap();
    let mut amp = Amp::sgd(store, AmpConfig::new(0.1, 0.5), SgdConfig::default()).unwrap();
    let x = input(&device());
    let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        amp.step(|store: &mut BurnStore<Net>, pass| {
            let loss = store.module()?.forward(x.clone()).square().mean();
            let value = store.backward(&loss)?;
            assert!(pass.is_clean(), "a shape assertion in the model");
            Ok::<_, AmpError>(((), value))
        })
    }));
    assert!(unwound.is_err());
    // The panic came on the perturbed pass, with the module at θ + δ.
    let after = amp.into_parts().unwrap().0.into_module().unwrap();
    let same = |a: &Linear, b: &Linear| values(a.weight.val()) == values(b.weight.val());
    assert!(same(&after.first, &before.first) && same(&after.second, &before.second));
}
