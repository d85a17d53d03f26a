//! `BurnOps`' own finiteness check: one sum on the device, settled on the
//! host when the sum alone cannot tell.

use amp_burn::burn::module::Param;
use amp_burn::burn::tensor::{Device, Tensor, TensorData};
use amp_burn::{BurnStore, Flat, ModuleStore};
use amp_core::TensorOps;

#[test]
fn all_finite_tells_overflow_from_nan_and_infinity() {
    let device = Device::flex();
    let store =
        BurnStore::from_module(vec![Param::from_tensor(Tensor::<1>::zeros([2], &device))]).unwrap();
    let flat = |values: Vec<f32>| {
        let n = values.len();
        Flat::new(Tensor::<1>::from_data(
            TensorData::new(values, [n]),
            &device,
        ))
    };
    let check = |values: Vec<f32>| store.ops().all_finite(&flat(values)).unwrap();
    assert!(check(vec![1.0, -2.0, 3.5]));
    // Finite elements whose f32 sum overflows.
    assert!(check(vec![3e38, 3e38, 3e38]));
    assert!(check(vec![-3e38, -3e38]));
    assert!(!check(vec![1.0, f32::NAN]));
    assert!(!check(vec![f32::INFINITY, 1.0]));
    assert!(!check(vec![f32::NEG_INFINITY, 2.0]));
    assert!(!check(vec![f32::INFINITY, f32::NEG_INFINITY]));
    assert!(!check(vec![3e38, 3e38, f32::NAN]));
    assert!(check(vec![]));
}
