//! The MLP on the burn backend (feature `burn`): a burn module of `Linear`
//! layers on burn's CPU device (flex) with autodiff, rebuilt by the store
//! from its weights before every pass; gradients by burn's autograd,
//! collected with `ModuleStore::backward`.

use amp::backend::burn::burn::module::{Module, Param};
// `burn` is in scope for `#[derive(Module)]`.
use amp::backend::burn::burn::nn::loss::{CrossEntropyLoss, CrossEntropyLossConfig};
use amp::backend::burn::burn::nn::Linear;
use amp::backend::burn::burn::tensor::{Device, Int, Tensor, TensorData};
use amp::backend::burn::{burn, BurnStore, ModuleStore};
use amp::{Amp, AmpError, BoxError};

use crate::data::Split;
use crate::model::{AmpOf, DeviceKind, Model, Precision, Setup, Which};

/// Linear → ReLU → … → Linear, as a burn module. burn's `Linear` holds its
/// weight as `[in, out]`; store tensor `2l` is layer `l`'s weight, `2l + 1`
/// its bias.
#[derive(Module, Debug)]
pub struct Mlp {
    layers: Vec<Linear>,
}

impl Mlp {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let last = self.layers.len() - 1;
        let mut a = x;
        for (l, layer) in self.layers.iter().enumerate() {
            a = layer.forward(a);
            if l < last {
                a = a.clamp_min(0.0);
            }
        }
        a
    }
}

/// The MLP trained by AMP over a `BurnStore`.
pub struct BurnMlp {
    amp: AmpOf<BurnStore<Mlp>>,
    loss: CrossEntropyLoss,
    train_x: Tensor<2>,
    train_y: Tensor<1, Int>,
    val_x: Tensor<2>,
    test_x: Tensor<2>,
    device: Device,
    clip_norm: Option<f64>,
}

fn features(split: &Split, device: &Device) -> Tensor<2> {
    let (rows, cols) = split.x.dim();
    let values: Vec<f32> = split.x.iter().copied().collect();
    Tensor::from_data(TensorData::new(values, [rows, cols]), device)
}

impl BurnMlp {
    /// Builds the module from the shared initial weights on burn's CPU
    /// device.
    pub fn new(setup: Setup<'_>) -> Result<Self, BoxError> {
        if setup.device == DeviceKind::Cuda {
            return Err("the burn backend here runs on burn's CPU device (flex); \
                        amp-burn's `cuda` feature is compile-checked only"
                .into());
        }
        if setup.precision != Precision::F32 {
            return Err("the burn backend trains in f32".into());
        }
        let device = Device::flex().autodiff();
        let layers = setup
            .layers
            .iter()
            .map(|layer| {
                // [out, in] row-major on the host; burn's Linear wants [in, out].
                let weight = TensorData::new(layer.weight.clone(), [layer.outputs, layer.inputs]);
                let weight = Tensor::<2>::from_data(weight, &device).transpose();
                let bias = TensorData::new(layer.bias.clone(), [layer.outputs]);
                let bias = Tensor::<1>::from_data(bias, &device);
                Linear {
                    weight: Param::from_tensor(weight.detach().require_grad()),
                    bias: Some(Param::from_tensor(bias.require_grad())),
                }
            })
            .collect();
        let store = BurnStore::from_module(Mlp { layers })?;
        let data = setup.data;
        let train_y: Vec<i64> = data.train.y.iter().map(|&y| y as i64).collect();
        let train_y = TensorData::new(train_y, [data.train.len()]);
        Ok(BurnMlp {
            amp: crate::ranks::join(Amp::new(store, setup.amp, setup.base.build()?)?, setup.link)?,
            loss: CrossEntropyLossConfig::new().init(&device),
            train_x: features(&data.train, &device),
            train_y: Tensor::from_data(train_y, &device),
            val_x: features(&data.val, &device),
            test_x: features(&data.test, &device),
            device,
            clip_norm: setup.clip_norm,
        })
    }
}

impl Model for BurnMlp {
    fn step(&mut self, batch: &[usize]) -> Result<f64, BoxError> {
        let index: Vec<i64> = batch.iter().map(|&i| i as i64).collect();
        let index =
            Tensor::<1, Int>::from_data(TensorData::new(index, [batch.len()]), &self.device);
        let x = self.train_x.clone().select(0, index.clone());
        let y = self.train_y.clone().select(0, index);
        let (loss_fn, clip_norm) = (&self.loss, self.clip_norm);
        let report = self.amp.step(|store: &mut BurnStore<Mlp>, _pass| {
            let logits = store.module()?.forward(x.clone());
            let value = store.backward(&loss_fn.forward(logits, y.clone()))?;
            if let Some(max_norm) = clip_norm {
                amp::ParamStore::clip_grads_to_norm(store, max_norm)?;
            }
            Ok::<_, AmpError>(((), value))
        })?;
        Ok(report.loss)
    }

    fn set_lr(&mut self, lr: f64) -> Result<(), BoxError> {
        Ok(self.amp.set_lr(lr)?)
    }

    fn predict(&mut self, which: Which) -> Result<Vec<usize>, BoxError> {
        let x = match which {
            Which::Val => &self.val_x,
            Which::Test => &self.test_x,
        };
        let model = self.amp.store_mut().module()?.valid();
        let classes = model.forward(x.clone().inner()).argmax(1);
        Ok(classes
            .into_data()
            .iter::<i64>()
            .map(|c| c as usize)
            .collect())
    }
}

#[cfg(all(test, feature = "ndarray"))]
mod tests {
    use super::*;
    use crate::model::test_setup;
    use amp::ParamStore;

    /// Three AMP steps on burn land where the same steps on the
    /// hand-written ndarray MLP land: same initial weights, same batch, f32
    /// on both (burn holds each weight transposed, `[in, out]`).
    #[test]
    fn burn_step_matches_ndarray() {
        let data = crate::data::load(crate::data::Task::Good, 0);
        let sizes = crate::model::TEST_SIZES;
        let mut burn = BurnMlp::new(test_setup(&data)).unwrap();
        let mut nd = crate::mlp_ndarray::NdMlp::new(test_setup(&data)).unwrap();
        let batch: Vec<usize> = (0..32).map(|i| i * 7).collect();
        for _ in 0..3 {
            let a = burn.step(&batch).unwrap();
            let b = nd.step(&batch).unwrap();
            assert!((a - b).abs() < 1e-5, "loss {a} vs {b}");
        }
        for (l, &inputs) in sizes[..3].iter().enumerate() {
            let w = burn.amp.store().read(amp::Slot::Params, 2 * l).unwrap();
            let want = nd.store().read(amp::Slot::Params, 2 * l).unwrap();
            let outputs = sizes[l + 1];
            for o in 0..outputs {
                for i in 0..inputs {
                    let (x, y) = (w.data()[i * outputs + o], want.data()[o * inputs + i]);
                    assert!((x - y).abs() < 1e-5, "layer {l} [{o}, {i}]: {x} vs {y}");
                }
            }
            let b = burn.amp.store().read(amp::Slot::Params, 2 * l + 1).unwrap();
            let want = nd.store().read(amp::Slot::Params, 2 * l + 1).unwrap();
            for (x, y) in b.data().iter().zip(want.data()) {
                assert!((x - y).abs() < 1e-5, "bias {l}: {x} vs {y}");
            }
        }
        assert_eq!(
            burn.predict(Which::Val).unwrap(),
            nd.predict(Which::Val).unwrap()
        );
    }
}
