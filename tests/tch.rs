//! The conformance suite on the libtorch backend: CPU in f32 and f64, and
//! CUDA (against the oracle and against libtorch's CPU) when a GPU is
//! present; otherwise the CUDA test prints that it was skipped.
#![cfg(feature = "tch")]

use amp_core::{DType, HostTensor, Result};
use amp_tch::TchStore;
use amp_testkit::{conformance_suite, properties, StoreFactory};
use tch::Device;

/// libtorch stores on one device.
struct TchFactory(Device);

impl StoreFactory for TchFactory {
    type Store = TchStore;

    fn make(&self, values: &[HostTensor], dtype: DType) -> Result<TchStore> {
        let values: Vec<HostTensor> = values
            .iter()
            .map(|v| HostTensor { dtype, ..v.clone() })
            .collect();
        TchStore::from_host(&values, self.0)
    }

    fn name(&self) -> String {
        format!("tch {:?}", self.0)
    }
}

conformance_suite!(tch_cpu_f64, TchFactory(Device::Cpu), DType::F64);
conformance_suite!(tch_cpu_f32, TchFactory(Device::Cpu), DType::F32);

#[test]
fn tch_cuda_conformance_and_agreement_with_cpu() {
    if !tch::Cuda::is_available() {
        amp_testkit::skip_notice("tch CUDA conformance", "tch::Cuda::is_available() is false");
        return;
    }
    for dtype in [DType::F32, DType::F64] {
        properties::device_suite(
            &TchFactory(Device::Cuda(0)),
            &TchFactory(Device::Cpu),
            dtype,
        );
    }
}
