//! The conformance suite on the libtorch backend: CPU in f32 and f64, and
//! CUDA (against the oracle and against libtorch's CPU) when a GPU is
//! present; otherwise the CUDA test prints that it was skipped.
#![cfg(feature = "tch")]

use amp_core::{DType, HostTensor, Result};
use amp_tch::TchStore;
use amp_testkit::{conformance_suite, properties, StoreFactory};
use tch::Device;

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
        let values: Vec<HostTensor> = values
            .iter()
            .map(|v| HostTensor { dtype, ..v.clone() })
            .collect();
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
