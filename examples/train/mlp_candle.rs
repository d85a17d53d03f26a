//! The MLP on the candle backend: candle-nn `Linear` layers over the `Var`s of
//! a `CandleStore`, gradients by candle's autograd, handed to the store inside
//! the closure with `CandleStore::backward`.

use amp::backend::candle::CandleStore;
use amp::{Amp, BoxError, DType, HostTensor, ParamStore};
use candle_core::{DType as CDType, Device, Module, Tensor, D};
use candle_nn::Linear;

use crate::data::{Data, Split};
use crate::model::{AmpOf, DeviceKind, Model, Precision, Setup, Which};

/// An MLP (linear → ReLU → … → linear) trained by AMP over a `CandleStore`.
/// Tensor `2l` is layer `l`'s weight `[out, in]`, tensor `2l + 1` its bias.
pub struct CandleMlp {
    amp: AmpOf<CandleStore>,
    layers: Vec<Linear>,
    device: Device,
    train_x: Tensor,
    train_y: Tensor,
    val_x: Tensor,
    test_x: Tensor,
    clip_norm: Option<f64>,
}

fn features(split: &Split, device: &Device, dtype: CDType) -> candle_core::Result<Tensor> {
    let (rows, cols) = split.x.dim();
    let values: Vec<f32> = split.x.iter().copied().collect();
    Tensor::from_vec(values, (rows, cols), device)?.to_dtype(dtype)
}

impl CandleMlp {
    /// Uploads the data and the shared initial weights to the device.
    pub fn new(setup: Setup<'_>) -> Result<Self, BoxError> {
        let device = match setup.device {
            DeviceKind::Cpu => Device::Cpu,
            DeviceKind::Cuda => amp::backend::candle::cuda_device(0).map_err(|e| {
                format!("{e} (CUDA needs the example built with `--features cuda`)")
            })?,
        };
        let (dtype, cdtype) = match setup.precision {
            Precision::F32 => (DType::F32, CDType::F32),
            Precision::Bf16 => (DType::BF16, CDType::BF16),
            Precision::F16 => (DType::F16, CDType::F16),
        };
        let mut host = Vec::new();
        for layer in &setup.layers {
            let weight = layer.weight.iter().map(|&v| f64::from(v)).collect();
            let bias = layer.bias.iter().map(|&v| f64::from(v)).collect();
            host.push(HostTensor::new(
                vec![layer.outputs, layer.inputs],
                dtype,
                weight,
            )?);
            host.push(HostTensor::new(vec![layer.outputs], dtype, bias)?);
        }
        let mut store = CandleStore::from_host(&host, &device)?;
        if setup.precision != Precision::F32 && setup.master_weights {
            store = store.with_master_weights()?;
        }
        // The layers hold tensors that share storage with the store's vars,
        // so every update of the store is seen by the forward pass.
        let layers = store
            .vars()
            .chunks(2)
            .map(|wb| Linear::new(wb[0].as_tensor().clone(), Some(wb[1].as_tensor().clone())))
            .collect();
        let data: &Data = setup.data;
        let train_y: Vec<u32> = data.train.y.iter().map(|&y| y as u32).collect();
        Ok(CandleMlp {
            amp: crate::ranks::join(Amp::new(store, setup.amp, setup.base.build()?)?, setup.link)?,
            layers,
            train_x: features(&data.train, &device, cdtype)?,
            train_y: Tensor::from_vec(train_y, data.train.len(), &device)?,
            val_x: features(&data.val, &device, cdtype)?,
            test_x: features(&data.test, &device, cdtype)?,
            device,
            clip_norm: setup.clip_norm,
        })
    }
}

/// Logits of `x` through every layer, ReLU between them.
fn forward(layers: &[Linear], x: &Tensor) -> candle_core::Result<Tensor> {
    let mut a = x.clone();
    for (l, layer) in layers.iter().enumerate() {
        a = layer.forward(&a)?;
        if l + 1 < layers.len() {
            a = a.relu()?;
        }
    }
    Ok(a)
}

impl Model for CandleMlp {
    fn step(&mut self, batch: &[usize]) -> Result<f64, BoxError> {
        let index: Vec<u32> = batch.iter().map(|&i| i as u32).collect();
        let index = Tensor::from_vec(index, batch.len(), &self.device)?;
        let x = self.train_x.index_select(&index, 0)?;
        let y = self.train_y.index_select(&index, 0)?;
        let (layers, clip_norm) = (&self.layers, self.clip_norm);
        // Mixed precision: the loss in f32 from half-precision logits, and,
        // with a loss scale, scaled before the backward pass and unscaled
        // before clipping.
        let scale = self.amp.loss_scale();
        let report = self.amp.step(|store: &mut CandleStore, _pass| {
            let logits = forward(layers, &x)?.to_dtype(CDType::F32)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
            let loss = match &scale {
                None => store.backward(&loss)?,
                Some(scale) => {
                    store.backward(&loss.affine(scale.scale(), 0.0)?)?;
                    scale.unscale_grads(store)?;
                    f64::from(loss.to_scalar::<f32>()?)
                }
            };
            if let Some(max_norm) = clip_norm {
                store.clip_grads_to_norm(max_norm)?;
            }
            Ok::<_, BoxError>(((), loss))
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
        let classes = forward(&self.layers, x)?
            .argmax(D::Minus1)?
            .to_vec1::<u32>()?;
        Ok(classes.into_iter().map(|c| c as usize).collect())
    }

    fn synchronize(&mut self) -> Result<(), BoxError> {
        Ok(self.device.synchronize()?)
    }
}

#[cfg(all(test, feature = "ndarray"))]
mod tests {
    use super::*;
    use crate::model::test_setup;

    /// One AMP step on candle lands where the same step on the hand-written
    /// ndarray MLP lands: same initial weights, same batch, f32 on both.
    #[test]
    fn candle_step_matches_ndarray() {
        let data = crate::data::load(crate::data::Task::Good, 0);
        let mut candle = CandleMlp::new(test_setup(&data)).unwrap();
        let mut nd = crate::mlp_ndarray::NdMlp::new(test_setup(&data)).unwrap();
        let batch: Vec<usize> = (0..32).map(|i| i * 7).collect();
        for _ in 0..3 {
            let a = candle.step(&batch).unwrap();
            let b = nd.step(&batch).unwrap();
            assert!((a - b).abs() < 1e-5, "loss {a} vs {b}");
        }
        for t in 0..6 {
            let a = candle.amp.store().read(amp::Slot::Params, t).unwrap();
            let b = nd.store().read(amp::Slot::Params, t).unwrap();
            for (x, y) in a.data().iter().zip(b.data()) {
                assert!((x - y).abs() < 1e-5, "tensor {t}: {x} vs {y}");
            }
        }
        assert_eq!(
            candle.predict(Which::Val).unwrap(),
            nd.predict(Which::Val).unwrap()
        );
    }

    /// bf16 with f32 master weights trains as f32 does, and without them
    /// falls behind (`crate::model::mixed_precision`).
    #[test]
    fn bf16_with_master_weights_tracks_f32_and_without_falls_behind() {
        crate::model::mixed_precision::check_bf16(crate::model::BackendKind::Candle);
    }
}
