//! The conformance suite on the libtorch backend: CPU in f32 and f64, and
//! CUDA (against the oracle and against libtorch's CPU) when a GPU is
//! present; otherwise the CUDA test prints that it was skipped.
#![cfg(feature = "tch")]

use amp_core::{AmpError, DType, HostTensor, ParamStore, Result};
use amp_tch::TchStore;
use amp_testkit::autograd::AutogradFactory;
use amp_testkit::{autograd_suite, conformance_suite, properties, Objective, StoreFactory};
use tch::{Device, Kind, Tensor};

/// libtorch stores on one device, in the flat layout of
/// [`TchStore::flatten`] when `flat` is set.
struct TchFactory {
    device: Device,
    flat: bool,
}

impl TchFactory {
    /// Stores of separately allocated tensors on `device`.
    fn on(device: Device) -> Self {
        TchFactory {
            device,
            flat: false,
        }
    }

    /// Flattened stores on `device`.
    fn flat(device: Device) -> Self {
        TchFactory { device, flat: true }
    }
}

impl StoreFactory for TchFactory {
    type Store = TchStore;

    fn make(&self, values: &[HostTensor], dtype: DType) -> Result<TchStore> {
        let values: Vec<HostTensor> = values.iter().map(|v| v.clone().with_dtype(dtype)).collect();
        let mut store = TchStore::from_host(&values, self.device)?;
        if self.flat {
            store.flatten()?;
        }
        Ok(store)
    }

    fn name(&self) -> String {
        let layout = if self.flat { " flat" } else { "" };
        format!("tch {:?}{layout}", self.device)
    }
}

/// The conformance objective written with libtorch's operations on the
/// store's tensors, in f64 (frozen tensors enter detached).
fn objective_loss(
    store: &TchStore,
    objective: &Objective,
) -> std::result::Result<Tensor, tch::TchError> {
    let device = store.device();
    let constant = |values: &[f64]| Tensor::f_from_slice(values)?.f_to_device(device);
    let mut loss = Tensor::f_zeros([], (Kind::Double, device))?;
    let mut s = Tensor::f_zeros([], (Kind::Double, device))?;
    for (i, tensor) in store.tensors().iter().enumerate() {
        let theta = if objective.frozen[i] {
            tensor.detach()
        } else {
            tensor.shallow_clone()
        };
        let theta = theta.f_to_kind(Kind::Double)?.f_reshape([-1])?;
        let d = theta.f_sub(&constant(&objective.center[i])?)?;
        let term = constant(&objective.curvature[i])?
            .f_mul(&d.f_square()?)?
            .f_sum(Kind::Double)?;
        loss = loss.f_add(&term.f_mul_scalar(0.5)?)?;
        let coupled = constant(&objective.coupling_weights[i])?
            .f_mul(&theta)?
            .f_sum(Kind::Double)?;
        s = s.f_add(&coupled)?;
    }
    loss.f_add(&s.f_square()?.f_mul_scalar(0.5 * objective.coupling)?)
}

impl AutogradFactory for TchFactory {
    fn loss_and_grads(&self, store: &mut TchStore, objective: &Objective) -> Result<f64> {
        let loss = objective_loss(store, objective).map_err(AmpError::backend)?;
        loss.f_backward().map_err(AmpError::backend)?;
        f64::try_from(&loss).map_err(AmpError::backend)
    }

    fn model_loss(&self, store: &mut TchStore, objective: &Objective) -> Result<f64> {
        let loss = tch::no_grad(|| objective_loss(store, objective)).map_err(AmpError::backend)?;
        f64::try_from(&loss).map_err(AmpError::backend)
    }
}

autograd_suite!(tch_autograd_f64, TchFactory::on(Device::Cpu), DType::F64);
autograd_suite!(tch_autograd_f32, TchFactory::on(Device::Cpu), DType::F32);
autograd_suite!(
    tch_autograd_flat_f64,
    TchFactory::flat(Device::Cpu),
    DType::F64
);
autograd_suite!(
    tch_autograd_flat_f32,
    TchFactory::flat(Device::Cpu),
    DType::F32
);

/// Half-precision (bf16 or f16) leaves with f32 master weights
/// ([`TchStore::with_master_weights`]); the suite's values are written into
/// the master copy, and gradients set on it directly.
struct MasterFactory(Kind);

impl StoreFactory for MasterFactory {
    type Store = TchStore;

    fn make(&self, values: &[HostTensor], dtype: DType) -> Result<TchStore> {
        if dtype != DType::F32 {
            return Err(AmpError::backend("master weights are f32"));
        }
        let half = amp_tch::dtype_of(self.0).ok_or_else(|| AmpError::backend("kind"))?;
        let model: Vec<HostTensor> = values.iter().map(|v| v.clone().with_dtype(half)).collect();
        let mut store = TchStore::from_host(&model, Device::Cpu)?.with_master_weights()?;
        for (i, value) in values.iter().enumerate() {
            store.write(amp_core::Slot::Params, i, value)?;
        }
        Ok(store)
    }

    fn name(&self) -> String {
        format!("tch {:?} with f32 master weights", self.0)
    }
}

conformance_suite!(tch_bf16_master, MasterFactory(Kind::BFloat16), DType::F32);
conformance_suite!(tch_f16_master, MasterFactory(Kind::Half), DType::F32);

conformance_suite!(tch_cpu_f64, TchFactory::on(Device::Cpu), DType::F64);
conformance_suite!(tch_cpu_f32, TchFactory::on(Device::Cpu), DType::F32);
conformance_suite!(tch_cpu_flat_f64, TchFactory::flat(Device::Cpu), DType::F64);
conformance_suite!(tch_cpu_flat_f32, TchFactory::flat(Device::Cpu), DType::F32);

#[test]
fn tch_cuda_conformance_and_agreement_with_cpu() {
    if !tch::Cuda::is_available() {
        amp_testkit::skip_notice("tch CUDA conformance", "tch::Cuda::is_available() is false");
        return;
    }
    for dtype in [DType::F32, DType::F64] {
        properties::device_suite(
            &TchFactory::on(Device::Cuda(0)),
            &TchFactory::on(Device::Cpu),
            dtype,
        );
        properties::device_suite(
            &TchFactory::flat(Device::Cuda(0)),
            &TchFactory::on(Device::Cpu),
            dtype,
        );
    }
}
