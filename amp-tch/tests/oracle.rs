//! AMP steps on tch compared with the amp-ndarray f64 oracle over the
//! testkit's fixed grid of configurations (`amp_testkit::grid`: every SGD
//! variant, weight decay, K = 0, 1, 2, clipping and not, both restore
//! modes, parameter groups) on CUDA, at the testkit's tolerances
//! (`Tolerance::for_dtype`: 1e-10 in f64, 5e-5 in f32, relative to each
//! tensor's scale, per step). The CPU runs the same grid in the facade's
//! conformance suites (`tests/tch.rs`, test `oracle_grid`), in both
//! layouts; here it is the GPU's turn, and the bit-exact restore.

mod common;

use amp_core::{Amp, AmpConfig, DType, HostTensor, ParamStore, Result, SgdConfig, Slot};
use amp_tch::TchStore;
use amp_testkit::{grid, StoreFactory};
use common::{host_loss, initial_values};
use tch::Device;

/// Stores on one device, holding the case's values in the asked dtype.
struct OnDevice(Device);

impl StoreFactory for OnDevice {
    type Store = TchStore;

    fn make(&self, values: &[HostTensor], dtype: DType) -> Result<TchStore> {
        let values: Vec<HostTensor> = values.iter().map(|v| v.clone().with_dtype(dtype)).collect();
        let store = TchStore::from_host(&values, self.0)?;
        assert_eq!(store.dtype(), dtype);
        Ok(store)
    }

    fn name(&self) -> String {
        format!("tch {:?}", self.0)
    }
}

/// The grid on `device` in f64 and f32.
fn grid_on(device: Device) {
    for dtype in [DType::F64, DType::F32] {
        let cases =
            grid::matches_oracle(&OnDevice(device), dtype).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("{device:?} {dtype}: {cases} configurations agree with the oracle");
    }
}

#[test]
fn cuda_matches_oracle() {
    let Some(device) = common::cuda_or_skip("cuda_matches_oracle") else {
        return;
    };
    grid_on(device);
}

/// The CUDA test's own code, on the CPU (where the facade's suites cover
/// the grid too), so that it is known to run before a GPU runs it.
#[test]
fn cpu_matches_oracle() {
    grid_on(Device::Cpu);
}

/// With lr = 0 and no weight decay a step leaves θ bit-exactly unchanged
/// under copy-restore, on both dtypes.
#[test]
fn copy_restore_is_bit_exact() {
    for dtype in [DType::F32, DType::F64] {
        let values = initial_values(dtype);
        let store = TchStore::from_host(&values, Device::Cpu).unwrap();
        let config = AmpConfig::new(0.0, 0.3).inner_iter(2);
        let mut amp = Amp::sgd(store, config, SgdConfig::nesterov(0.9)).unwrap();
        for _ in 0..3 {
            amp.step(|s, _| host_loss(s)).unwrap();
        }
        for (i, v) in values.iter().enumerate() {
            assert_eq!(
                &amp.store().read(Slot::Params, i).unwrap(),
                v,
                "{dtype} tensor {i}"
            );
        }
    }
}
