//! The MLP on the libtorch backend (feature `tch`): leaf tensors of a
//! `TchStore`, gradients by libtorch's autograd (left in each tensor's
//! `.grad()`, where the store reads them). In bf16 or f16 (mixed precision)
//! the leaves are half-precision and the store steps f32 master weights
//! unless told not to.

use amp::backend::tch::tch::{self, Device, Kind, Tensor};
use amp::backend::tch::TchStore;
use amp::{Amp, AmpError, BoxError, DType, HostTensor, ParamStore};

use crate::data::Split;
use crate::model::{AmpOf, DeviceKind, Model, Precision, Setup, Which};

/// An MLP (linear → ReLU → … → linear) trained by AMP over a `TchStore`.
/// Tensor `2l` is layer `l`'s weight `[out, in]`, tensor `2l + 1` its bias.
pub struct TchMlp {
    amp: AmpOf<TchStore>,
    device: Device,
    train_x: Tensor,
    train_y: Tensor,
    val_x: Tensor,
    test_x: Tensor,
    clip_norm: Option<f64>,
}

fn features(split: &Split, device: Device, kind: Kind) -> Tensor {
    let (rows, cols) = split.x.dim();
    let values: Vec<f32> = split.x.iter().copied().collect();
    Tensor::from_slice(&values)
        .reshape([rows as i64, cols as i64])
        .to_kind(kind)
        .to_device(device)
}

/// Logits of `x` through every layer, ReLU between them.
fn forward(params: &[Tensor], x: &Tensor) -> Tensor {
    let layers = params.len() / 2;
    let mut a = x.shallow_clone();
    for l in 0..layers {
        a = a.linear(&params[2 * l], Some(&params[2 * l + 1]));
        if l + 1 < layers {
            a = a.relu();
        }
    }
    a
}

impl TchMlp {
    /// Uploads the data and the shared initial weights to the device.
    pub fn new(setup: Setup<'_>) -> Result<Self, BoxError> {
        let device = match setup.device {
            DeviceKind::Cpu => Device::Cpu,
            DeviceKind::Cuda if tch::Cuda::is_available() => Device::Cuda(0),
            DeviceKind::Cuda => return Err("libtorch sees no CUDA device".into()),
        };
        let (dtype, kind) = match setup.precision {
            Precision::F32 => (DType::F32, Kind::Float),
            Precision::Bf16 => (DType::BF16, Kind::BFloat16),
            Precision::F16 => (DType::F16, Kind::Half),
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
        let mut store = TchStore::from_host(&host, device)?;
        if setup.precision != Precision::F32 && setup.master_weights {
            store = store.with_master_weights()?;
        }
        let data = setup.data;
        let train_y: Vec<i64> = data.train.y.iter().map(|&y| y as i64).collect();
        Ok(TchMlp {
            amp: crate::ranks::join(Amp::new(store, setup.amp, setup.base.build()?)?, setup.link)?,
            train_x: features(&data.train, device, kind),
            train_y: Tensor::from_slice(&train_y).to_device(device),
            val_x: features(&data.val, device, kind),
            test_x: features(&data.test, device, kind),
            device,
            clip_norm: setup.clip_norm,
        })
    }
}

impl Model for TchMlp {
    fn step(&mut self, batch: &[usize]) -> Result<f64, BoxError> {
        let index: Vec<i64> = batch.iter().map(|&i| i as i64).collect();
        let index = Tensor::from_slice(&index).to_device(self.device);
        let x = self.train_x.index_select(0, &index);
        let y = self.train_y.index_select(0, &index);
        let clip_norm = self.clip_norm;
        // Mixed precision: the loss in f32 from half-precision logits, and,
        // with a loss scale, scaled before the backward pass and unscaled
        // before clipping.
        let scale = self.amp.loss_scale();
        let report = self.amp.step(|store: &mut TchStore, _pass| {
            let logits = forward(store.tensors(), &x).to_kind(Kind::Float);
            let loss = logits.cross_entropy_for_logits(&y);
            match &scale {
                None => loss.backward(),
                Some(scale) => {
                    (&loss * scale.scale()).backward();
                    scale.unscale_grads(store)?;
                }
            }
            if let Some(max_norm) = clip_norm {
                store.clip_grads_to_norm(max_norm)?;
            }
            Ok::<_, AmpError>(((), loss.double_value(&[])))
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
        let classes = tch::no_grad(|| forward(self.amp.store().tensors(), x).argmax(-1, false))
            .to_kind(Kind::Int64)
            .to_device(Device::Cpu);
        let classes = Vec::<i64>::try_from(&classes)?;
        Ok(classes.into_iter().map(|c| c as usize).collect())
    }

    fn synchronize(&mut self) -> Result<(), BoxError> {
        if let Device::Cuda(ordinal) = self.device {
            tch::Cuda::synchronize(ordinal as i64);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    /// bf16 with f32 master weights trains as f32 does, and without them
    /// falls behind (`crate::model::mixed_precision`).
    #[test]
    fn bf16_with_master_weights_tracks_f32_and_without_falls_behind() {
        crate::model::mixed_precision::check_bf16(crate::model::BackendKind::Tch);
    }
}
