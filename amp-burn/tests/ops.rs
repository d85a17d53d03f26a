//! `BurnOps`' own operations: the finiteness check (one sum on the device,
//! settled on the host when the sum alone cannot tell), the batched
//! reductions (one read for all tensors) against the per-tensor ones, and
//! the arithmetic overrides, bit for bit against amp-core's element
//! formulas.

use amp_burn::burn::module::Param;
use amp_burn::burn::tensor::{DType as BurnDType, Device, Tensor, TensorData};
use amp_burn::{BurnStore, Flat, ModuleStore};
use amp_core::TensorOps;
use amp_testkit::tensor_ops::{batched_reductions_match, elementwise_overrides_match};

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

/// burn's kernels give the element formulas' bits: scale, axpy and Adam's
/// addcmul / addcdiv_sqrt (overridden with burn operations) and maximum.
#[test]
fn burn_operations_round_as_the_element_formulas() {
    let device = Device::flex();
    for dtype in [BurnDType::F32, BurnDType::F64] {
        let zeros = Tensor::<1>::zeros([257], (&device, dtype));
        let store = BurnStore::from_module(vec![Param::from_tensor(zeros)]).unwrap();
        let like = &store.params()[0];
        elementwise_overrides_match(store.ops(), like).unwrap_or_else(|e| panic!("{dtype:?}: {e}"));
    }
}

/// The batched sums of squares and finiteness check (one read for all the
/// tensors) agree with the per-tensor ones, bit for bit.
#[test]
fn batched_reductions_agree_with_the_per_tensor_ones() {
    let device = Device::flex();
    for dtype in [BurnDType::F32, BurnDType::F64] {
        let zeros = Tensor::<1>::zeros([131], (&device, dtype));
        let store = BurnStore::from_module(vec![Param::from_tensor(zeros)]).unwrap();
        let like = &store.params()[0];
        batched_reductions_match(store.ops(), like).unwrap_or_else(|e| panic!("{dtype:?}: {e}"));
        // Empty tensors count 0 and are finite, among the others.
        let empty = Flat::new(Tensor::<1>::zeros([0], (&device, dtype)));
        let sums = store
            .ops()
            .sums_of_squares(&[&empty, like, &empty])
            .unwrap();
        assert_eq!(sums, vec![0.0; 3]);
        assert!(store.ops().all_finite_in(&[&empty, &empty]).unwrap());
    }
}
