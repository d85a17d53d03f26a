//! The `ParamStore` primitives of `CandleStore` one by one, with
//! hand-derived expected values, and its error paths.
mod common;

use amp_candle::candle_core::{DType as CDType, Device, Tensor, Var};
use amp_candle::candle_nn::{Init, VarMap};
use amp_candle::CandleStore;
use amp_core::{
    Amp, AmpConfig, AmpError, BufferId, DType, HostTensor, ParamStore, Pass, RestoreMode,
    SgdConfig, Slot,
};

const ALL: [DType; 4] = [DType::F64, DType::F32, DType::F16, DType::BF16];

fn host(shape: &[usize], dtype: DType, data: &[f64]) -> HostTensor {
    HostTensor::new(shape.to_vec(), dtype, data.to_vec()).unwrap()
}

/// θ₀ = (3, 4) (norm 5), θ₁ = 12 as a 0-d scalar (norm 12), θ₂ empty.
fn small(dtype: DType) -> CandleStore {
    CandleStore::from_host(
        &[
            host(&[2], dtype, &[3.0, 4.0]),
            host(&[], dtype, &[12.0]),
            host(&[0, 2], dtype, &[]),
        ],
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn host_round_trip_is_exact_for_every_dtype() {
    for dtype in ALL {
        let mut store = common::stores(dtype, &Device::Cpu).0;
        assert_eq!(store.dtype(), dtype);
        for i in 0..store.num_tensors() {
            let theta = store.read(Slot::Params, i).unwrap();
            assert_eq!(theta.dtype(), dtype);
            assert_eq!(theta.shape(), common::SHAPES[i]);
            // Values already rounded to the dtype come back bit for bit.
            store.write(Slot::Grads, i, &theta).unwrap();
            assert_eq!(store.read(Slot::Grads, i).unwrap(), theta);
            let b = store.alloc_buffer().unwrap();
            store.write(Slot::Buffer(b), i, &theta).unwrap();
            assert_eq!(store.read(Slot::Buffer(b), i).unwrap(), theta);
            store.free_buffer(b).unwrap();
        }
    }
}

#[test]
fn writes_round_to_the_dtype() {
    let mut store = small(DType::BF16);
    // 1 + 2⁻¹⁰ is below half an ulp of bf16 at 1 (2⁻⁸): rounds to 1.
    store
        .write(
            Slot::Params,
            0,
            &host(&[2], DType::F64, &[1.0 + 1.0 / 1024.0, 2.0]),
        )
        .unwrap();
    assert_eq!(store.read(Slot::Params, 0).unwrap().data(), [1.0, 2.0]);
}

#[test]
fn gradient_mask_follows_writes_and_zero_grads() {
    let mut store = small(DType::F32);
    assert_eq!(store.grad_mask().unwrap(), [false; 3]);
    // A missing gradient reads as zeros.
    assert_eq!(store.read(Slot::Grads, 0).unwrap().data(), [0.0, 0.0]);
    store
        .write(Slot::Grads, 1, &host(&[], DType::F32, &[2.0]))
        .unwrap();
    assert_eq!(store.grad_mask().unwrap(), [false, true, false]);
    assert!(store.grad(1).is_some() && store.grad(0).is_none());
    // Ops that write gradients do not add to the mask.
    store.scale(Slot::Grads, &[2.0; 3], &[true; 3]).unwrap();
    assert_eq!(store.grad_mask().unwrap(), [false, true, false]);
    assert_eq!(store.read(Slot::Grads, 1).unwrap().data(), [4.0]);
    store.zero_grads().unwrap();
    assert_eq!(store.grad_mask().unwrap(), [false; 3]);
    assert_eq!(store.read(Slot::Grads, 1).unwrap().data(), [0.0]);
}

#[test]
fn norms_and_projection_by_hand() {
    for dtype in ALL {
        let mut store = small(dtype);
        let mask = [true, true, true];
        let norms = store.norms(Slot::Params, &mask).unwrap();
        assert_eq!(norms.len(), 3);
        // ‖(3, 4)‖ = 5, ‖12‖ = 12, the empty tensor's norm is 0.
        assert_eq!(store.norms_to_host(&norms).unwrap(), [5.0, 12.0, 0.0]);
        // ε = 1 shrinks (3, 4) by 1/(5 + 1e-12) to (0.6, 0.8); ε = 24 > 12
        // leaves the scalar as it is (coefficient exactly 1).
        store
            .clip_to_norms(Slot::Params, &norms, &[1.0, 24.0, 1.0], &mask)
            .unwrap();
        let clipped = store.read(Slot::Params, 0).unwrap().into_data();
        let tol = match dtype {
            DType::F64 => 1e-12,
            DType::F32 => 1e-7,
            _ => 4e-3,
        };
        assert!((clipped[0] - 0.6).abs() < tol && (clipped[1] - 0.8).abs() < tol);
        assert_eq!(store.read(Slot::Params, 1).unwrap().data(), [12.0]);
        // Masked-out entries are 0 and stay untouched.
        let norms = store.norms(Slot::Params, &[false, true, false]).unwrap();
        assert_eq!(store.norms_to_host(&norms).unwrap(), [0.0, 12.0, 0.0]);
    }
}

#[test]
fn axpy_scale_copy_by_hand() {
    let mut store = small(DType::F64);
    let mask = [true, true, true];
    let b = store.alloc_buffer().unwrap();
    assert_eq!(store.read(Slot::Buffer(b), 0).unwrap().data(), [0.0, 0.0]);
    // b ← θ (a copy), then θ ← θ + 0.5·b = 1.5·θ: b must not follow θ.
    store.copy(Slot::Buffer(b), Slot::Params, &mask).unwrap();
    store
        .axpy(Slot::Params, &[0.5; 3], Slot::Buffer(b), &mask)
        .unwrap();
    assert_eq!(store.read(Slot::Params, 0).unwrap().data(), [4.5, 6.0]);
    assert_eq!(store.read(Slot::Buffer(b), 0).unwrap().data(), [3.0, 4.0]);
    // Masked-out tensors are left alone: only the scalar is scaled.
    store
        .scale(Slot::Params, &[2.0, -1.0, 2.0], &[false, true, false])
        .unwrap();
    assert_eq!(store.read(Slot::Params, 1).unwrap().data(), [-18.0]);
    assert_eq!(store.read(Slot::Params, 0).unwrap().data(), [4.5, 6.0]);
    // θ ← b back (copy into the vars, in place).
    store.copy(Slot::Params, Slot::Buffer(b), &mask).unwrap();
    assert_eq!(store.read(Slot::Params, 1).unwrap().data(), [12.0]);
    // ±1 coefficients take the add/sub path.
    store
        .axpy(Slot::Buffer(b), &[-1.0; 3], Slot::Params, &mask)
        .unwrap();
    assert_eq!(store.read(Slot::Buffer(b), 0).unwrap().data(), [0.0, 0.0]);
}

#[test]
fn all_finite_sees_inf_and_nan_and_does_not_overflow() {
    for dtype in ALL {
        let mut store = small(dtype);
        let mask = [true, true, true];
        store
            .write(Slot::Grads, 0, &host(&[2], dtype, &[1.0, 2.0]))
            .unwrap();
        assert!(store.all_finite(Slot::Grads, &mask).unwrap());
        store
            .write(Slot::Grads, 1, &host(&[], dtype, &[f64::INFINITY]))
            .unwrap();
        assert!(!store.all_finite(Slot::Grads, &mask).unwrap());
        // Masked out, the infinity does not count.
        assert!(store.all_finite(Slot::Grads, &[true, false, true]).unwrap());
        store
            .write(Slot::Grads, 1, &host(&[], dtype, &[f64::NAN]))
            .unwrap();
        assert!(!store.all_finite(Slot::Grads, &mask).unwrap());
    }
    // Large finite values whose plain sum overflows f16 (max 65504).
    let mut store = small(DType::F16);
    store
        .write(
            Slot::Params,
            0,
            &host(&[2], DType::F16, &[60000.0, 60000.0]),
        )
        .unwrap();
    assert!(store.all_finite(Slot::Params, &[true, true, true]).unwrap());
}

#[test]
fn errors_are_typed_and_write_nothing() {
    let mut store = small(DType::F32);
    let before = store.read(Slot::Params, 0).unwrap();
    let wrong = host(&[3], DType::F32, &[1.0, 2.0, 3.0]);
    assert!(matches!(
        store.write(Slot::Params, 0, &wrong),
        Err(AmpError::ShapeMismatch { index: 0, .. })
    ));
    assert_eq!(store.read(Slot::Params, 0).unwrap(), before);
    assert!(matches!(
        store.read(Slot::Params, 7),
        Err(AmpError::IndexOutOfRange { index: 7, len: 3 })
    ));
    assert!(matches!(
        store.scale(Slot::Params, &[1.0; 2], &[true; 2]),
        Err(AmpError::CountMismatch { .. })
    ));
    assert!(matches!(
        store.axpy(Slot::Params, &[1.0; 2], Slot::Grads, &[true; 3]),
        Err(AmpError::CountMismatch { .. })
    ));
    let ghost = Slot::Buffer(BufferId::new(9));
    assert!(matches!(
        store.copy(ghost, Slot::Params, &[true; 3]),
        Err(AmpError::UnknownBuffer(9))
    ));
    let b = store.alloc_buffer().unwrap();
    store.free_buffer(b).unwrap();
    assert!(matches!(
        store.free_buffer(b),
        Err(AmpError::UnknownBuffer(_))
    ));
    // Freed ids are reused.
    assert_eq!(store.alloc_buffer().unwrap(), b);
    assert!(store.copy(Slot::Params, Slot::Params, &[true; 3]).is_err());
    let norms = store.norms(Slot::Params, &[true; 3]).unwrap();
    assert!(matches!(
        store.clip_to_norms(Slot::Params, &norms, &[1.0], &[true; 3]),
        Err(AmpError::CountMismatch { .. })
    ));
    assert!(matches!(
        store.set_grad(0, &Tensor::zeros(3, CDType::F32, &Device::Cpu).unwrap()),
        Err(AmpError::ShapeMismatch { index: 0, .. })
    ));
    assert!(matches!(
        store.set_grad(0, &Tensor::zeros(2, CDType::F64, &Device::Cpu).unwrap()),
        Err(AmpError::DTypeMismatch { index: 0, .. })
    ));
    let loss = Tensor::zeros(2, CDType::F32, &Device::Cpu).unwrap();
    assert!(matches!(store.backward(&loss), Err(AmpError::Backend(_))));
}

#[test]
fn construction_checks_dtypes() {
    let a = Var::zeros(2, CDType::F32, &Device::Cpu).unwrap();
    let b = Var::zeros(2, CDType::F64, &Device::Cpu).unwrap();
    assert!(matches!(
        CandleStore::from_vars(vec![a.clone(), b]),
        Err(AmpError::DTypeMismatch { index: 1, .. })
    ));
    let ints = Var::zeros(2, CDType::U32, &Device::Cpu).unwrap();
    assert!(matches!(
        CandleStore::from_vars(vec![ints]),
        Err(AmpError::DTypeMismatch { index: 0, .. })
    ));
    let store = CandleStore::from_vars(vec![a]).unwrap();
    assert_eq!(store.num_tensors(), 1);
    // An empty store builds, and AMP refuses it with a typed error.
    let empty = CandleStore::from_vars(Vec::new()).unwrap();
    assert!(matches!(
        Amp::sgd(empty, AmpConfig::new(0.1, 0.5), SgdConfig::default()),
        Err(AmpError::EmptyStore)
    ));
}

#[test]
fn varmap_order_is_sorted_by_name_and_updates_are_shared() {
    let varmap = VarMap::new();
    let dev = Device::Cpu;
    let z = varmap
        .get(3, "z", Init::Const(1.0), CDType::F32, &dev)
        .unwrap();
    varmap
        .get((2, 2), "a.weight", Init::Const(2.0), CDType::F32, &dev)
        .unwrap();
    varmap
        .get(2, "a.bias", Init::Const(3.0), CDType::F32, &dev)
        .unwrap();
    let mut store = CandleStore::from_varmap(&varmap).unwrap();
    assert_eq!(store.names().unwrap(), ["a.bias", "a.weight", "z"]);
    assert_eq!(store.index_of("z"), Some(2));
    assert_eq!(store.shape(1).unwrap(), [2, 2]);
    // Writes land in the var's storage: the tensor the model holds sees them.
    store
        .write(Slot::Params, 2, &host(&[3], DType::F32, &[7.0, 8.0, 9.0]))
        .unwrap();
    assert_eq!(z.to_vec1::<f32>().unwrap(), [7.0, 8.0, 9.0]);
}

#[test]
fn a_gradient_aliasing_a_var_is_copied() {
    let var = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
    let mut store = CandleStore::from_vars(vec![var.clone()]).unwrap();
    // The var itself handed over as its own gradient.
    store.set_grad(0, var.as_tensor()).unwrap();
    store.scale(Slot::Params, &[10.0], &[true]).unwrap();
    assert_eq!(store.read(Slot::Params, 0).unwrap().data(), [10.0, 20.0]);
    assert_eq!(store.read(Slot::Grads, 0).unwrap().data(), [1.0, 2.0]);
}

#[test]
fn clip_grad_norm_uses_the_global_norm() {
    let mut store = small(DType::F64);
    store
        .write(Slot::Grads, 0, &host(&[2], DType::F64, &[3.0, 4.0]))
        .unwrap();
    store
        .write(Slot::Grads, 1, &host(&[], DType::F64, &[12.0]))
        .unwrap();
    // Global norm √(9 + 16 + 144) = 13; clipped to 6.5 the factor is
    // 6.5/(13 + 1e-6).
    let total = store.clip_grad_norm(6.5, &[true; 3]).unwrap();
    assert_eq!(total, 13.0);
    let g = store.read(Slot::Grads, 1).unwrap().data()[0];
    assert!((g - 12.0 * 6.5 / (13.0 + 1e-6)).abs() < 1e-12);
}

#[test]
fn zero_learning_rate_leaves_weights_bit_exact() {
    for dtype in ALL {
        for restore in [RestoreMode::Copy, RestoreMode::Subtract] {
            let (store, _) = common::stores(dtype, &Device::Cpu);
            let before: Vec<_> = (0..store.num_tensors())
                .map(|i| store.read(Slot::Params, i).unwrap())
                .collect();
            let config = AmpConfig::new(0.0, 0.5).inner_iter(2).restore(restore);
            let mut amp = Amp::sgd(store, config, SgdConfig::nesterov(0.9)).unwrap();
            for _ in 0..2 {
                amp.step(|s: &mut CandleStore, p| common::quartic(s, p))
                    .unwrap();
            }
            for (i, b) in before.iter().enumerate() {
                let after = amp.store().read(Slot::Params, i).unwrap();
                if restore == RestoreMode::Copy {
                    assert_eq!(&after, b, "{dtype} tensor {i}");
                } else {
                    // θ + δ − δ: within rounding at the scale of θ + δ.
                    let ulp = match dtype {
                        DType::F64 => 1e-15,
                        DType::F32 => 1e-6,
                        _ => 2e-2,
                    };
                    for (x, y) in after.data().iter().zip(b.data()) {
                        assert!((x - y).abs() <= ulp * 4.0, "{dtype} tensor {i}");
                    }
                }
            }
        }
    }
}

#[test]
fn a_failed_step_leaves_weights_and_state_as_they_were() {
    let (store, _) = common::stores(DType::F32, &Device::Cpu);
    let config = AmpConfig::new(0.1, 0.5).inner_iter(2);
    let mut amp = Amp::sgd(store, config, SgdConfig::nesterov(0.9)).unwrap();
    amp.step(|s: &mut CandleStore, p| common::quartic(s, p))
        .unwrap();
    let snapshot = |amp: &Amp<CandleStore>| {
        let weights: Vec<_> = (0..amp.store().num_tensors())
            .map(|i| amp.store().read(Slot::Params, i).unwrap())
            .collect();
        (weights, amp.state().unwrap().base.state)
    };
    let before = snapshot(&amp);
    // A non-finite gradient on the second perturbed pass.
    let err = amp
        .step(|s: &mut CandleStore, p| {
            let out = common::quartic(s, p)?;
            if p == (Pass::Perturbed { k: 2, of: 2 }) {
                s.write(Slot::Grads, 0, &host(&[3, 4], DType::F32, &[f64::NAN; 12]))?;
            }
            Ok::<_, AmpError>(out)
        })
        .unwrap_err();
    assert!(matches!(err, AmpError::NonFiniteGradient { .. }), "{err}");
    assert_eq!(snapshot(&amp), before);
    // A closure error on the first perturbed pass.
    let err = amp
        .step(|s: &mut CandleStore, p| {
            let out = common::quartic(s, p)?;
            if p.is_perturbed() {
                return Err(AmpError::backend("boom"));
            }
            Ok(out)
        })
        .unwrap_err();
    assert!(matches!(err, AmpError::Closure { .. }), "{err}");
    assert_eq!(snapshot(&amp), before);
}

#[test]
fn device_selection_never_panics() {
    let cpu = amp_candle::device(false).unwrap();
    assert!(cpu.is_cpu());
    // With CUDA preferred the result is a GPU or, explicitly, the CPU.
    let preferred = amp_candle::device(true).unwrap();
    match amp_candle::cuda_device(0) {
        Ok(_) => assert!(preferred.is_cuda()),
        Err(reason) => {
            assert!(preferred.is_cpu());
            eprintln!("CUDA not usable, device(true) fell back to the CPU: {reason}");
            if !cfg!(feature = "cuda") {
                assert!(reason.to_string().contains("`cuda` feature"), "{reason}");
            }
        }
    }
}

#[test]
fn the_same_var_twice_is_refused() {
    // Twice the same var would be perturbed twice (‖δ‖ = 2ε) and stepped
    // twice.
    let v = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
    let other = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
    let error = CandleStore::from_vars(vec![v.clone(), other.clone(), v.clone()]).unwrap_err();
    assert!(
        matches!(&error, AmpError::InvalidConfig { field: "vars", reason } if reason.contains("0 and 2")),
        "{error}"
    );
    assert_eq!(
        CandleStore::from_vars(vec![v, other])
            .unwrap()
            .num_tensors(),
        2
    );
}
