//! The conformance suite on the candle backend: CPU in f32 and f64, and CUDA
//! (against the oracle and against candle's CPU) when the `cuda` feature is on
//! and a GPU is present; otherwise the CUDA test prints that it was skipped.
#![cfg(feature = "candle")]

use amp_candle::CandleStore;
use amp_core::{AmpError, DType, HostTensor, ParamStore, Result};
use amp_testkit::autograd::AutogradFactory;
use amp_testkit::{autograd_suite, conformance_suite, properties, Objective, StoreFactory};
use candle_core::{DType as CDType, Device, Tensor};

/// candle stores on one device.
struct CandleFactory(Device);

impl StoreFactory for CandleFactory {
    type Store = CandleStore;

    fn make(&self, values: &[HostTensor], dtype: DType) -> Result<CandleStore> {
        let values: Vec<HostTensor> = values.iter().map(|v| v.clone().with_dtype(dtype)).collect();
        CandleStore::from_host(&values, &self.0)
    }

    fn name(&self) -> String {
        format!("candle {:?}", self.0)
    }
}

/// Stores of half-precision vars (`model`) with f32 master weights on the
/// CPU, started from the case's values rounded to f32: the optimiser works
/// in f32, so the whole suite holds at the f32 tolerance.
struct MasterFactory(CDType);

impl StoreFactory for MasterFactory {
    type Store = CandleStore;

    fn make(&self, values: &[HostTensor], dtype: DType) -> Result<CandleStore> {
        if dtype != DType::F32 {
            return Err(AmpError::backend("master weights are f32"));
        }
        let model = amp_candle::amp_dtype(self.0).ok_or_else(|| AmpError::backend("dtype"))?;
        let half: Vec<HostTensor> = values.iter().map(|v| v.clone().with_dtype(model)).collect();
        let mut store = CandleStore::from_host(&half, &Device::Cpu)?.with_master_weights()?;
        for (i, value) in values.iter().enumerate() {
            store.write(amp_core::Slot::Params, i, value)?;
        }
        Ok(store)
    }

    fn name(&self) -> String {
        format!("candle {:?} with f32 master weights", self.0)
    }
}

conformance_suite!(candle_bf16_master, MasterFactory(CDType::BF16), DType::F32);
conformance_suite!(candle_f16_master, MasterFactory(CDType::F16), DType::F32);

/// The conformance objective written with candle's operations on the
/// store's vars, in f64 (frozen tensors enter detached).
fn objective_loss(store: &CandleStore, objective: &Objective) -> candle_core::Result<Tensor> {
    let device = store.device();
    let constant = |values: &[f64]| Tensor::from_slice(values, values.len(), device);
    let mut loss = Tensor::zeros((), CDType::F64, device)?;
    let mut s = Tensor::zeros((), CDType::F64, device)?;
    for (i, var) in store.vars().iter().enumerate() {
        let theta = if objective.frozen[i] {
            var.as_tensor().detach()
        } else {
            var.as_tensor().clone()
        };
        let theta = theta.to_dtype(CDType::F64)?.flatten_all()?;
        let d = theta.sub(&constant(&objective.center[i])?)?;
        let term = constant(&objective.curvature[i])?
            .mul(&d.sqr()?)?
            .sum_all()?;
        loss = loss.add(&term.affine(0.5, 0.0)?)?;
        let coupled = constant(&objective.coupling_weights[i])?
            .mul(&theta)?
            .sum_all()?;
        s = s.add(&coupled)?;
    }
    loss.add(&s.sqr()?.affine(0.5 * objective.coupling, 0.0)?)
}

impl AutogradFactory for CandleFactory {
    fn loss_and_grads(&self, store: &mut CandleStore, objective: &Objective) -> Result<f64> {
        let loss = objective_loss(store, objective).map_err(AmpError::backend)?;
        store.backward(&loss)
    }

    fn model_loss(&self, store: &mut CandleStore, objective: &Objective) -> Result<f64> {
        objective_loss(store, objective)
            .and_then(|loss| loss.to_scalar::<f64>())
            .map_err(AmpError::backend)
    }
}

autograd_suite!(candle_autograd_f64, CandleFactory(Device::Cpu), DType::F64);
autograd_suite!(candle_autograd_f32, CandleFactory(Device::Cpu), DType::F32);

conformance_suite!(candle_cpu_f64, CandleFactory(Device::Cpu), DType::F64);
conformance_suite!(candle_cpu_f32, CandleFactory(Device::Cpu), DType::F32);

#[test]
fn candle_cuda_conformance_and_agreement_with_cpu() {
    let device = match amp_candle::cuda_device(0) {
        Ok(device) => device,
        Err(e) => {
            amp_testkit::skip_notice(
                "candle CUDA conformance",
                &format!("no usable CUDA device ({e})"),
            );
            return;
        }
    };
    for dtype in [DType::F32, DType::F64] {
        properties::device_suite(
            &CandleFactory(device.clone()),
            &CandleFactory(Device::Cpu),
            dtype,
        );
    }
}
