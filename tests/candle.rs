//! The conformance suite on the candle backend: CPU in f32 and f64, and CUDA
//! (against the oracle and against candle's CPU) when the `cuda` feature is on
//! and a GPU is present; otherwise the CUDA test prints that it was skipped.
#![cfg(feature = "candle")]

use amp_candle::CandleStore;
use amp_core::{DType, HostTensor, Result};
use amp_testkit::{conformance_suite, properties, StoreFactory};
use candle_core::Device;

/// candle stores on one device.
struct CandleFactory(Device);

impl StoreFactory for CandleFactory {
    type Store = CandleStore;

    fn make(&self, values: &[HostTensor], dtype: DType) -> Result<CandleStore> {
        let values: Vec<HostTensor> = values
            .iter()
            .map(|v| HostTensor { dtype, ..v.clone() })
            .collect();
        CandleStore::from_host(&values, &self.0)
    }

    fn name(&self) -> String {
        format!("candle {:?}", self.0)
    }
}

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
