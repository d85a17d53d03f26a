//! The `ParamStore` primitives of `TchStore`, one by one, with hand-derived
//! expected values, and the error cases.

mod common;

use amp_core::{AmpError, DType, HostTensor, ParamStore, Slot};
use amp_tch::TchStore;
use tch::{Device, Kind, Tensor};

fn host(shape: &[usize], dtype: DType, data: &[f64]) -> HostTensor {
    HostTensor::new(shape.to_vec(), dtype, data.to_vec()).unwrap()
}

/// θ₀ = [[3, 4]] (norm 5), θ₁ = [1, 2, 2] (norm 3), θ₂ = 0-d 7.
fn small(dtype: DType, device: Device) -> TchStore {
    TchStore::from_host(
        &[
            host(&[1, 2], dtype, &[3.0, 4.0]),
            host(&[3], dtype, &[1.0, 2.0, 2.0]),
            host(&[], dtype, &[7.0]),
        ],
        device,
    )
    .unwrap()
}

fn data(store: &TchStore, slot: Slot, i: usize) -> Vec<f64> {
    store.read(slot, i).unwrap().into_data()
}

fn primitives(dtype: DType, device: Device) {
    let mut s = small(dtype, device);
    assert_eq!(s.num_tensors(), 3);
    assert_eq!(s.dtype(), dtype);
    assert_eq!(s.device(), device);
    assert_eq!(s.shape(0).unwrap(), vec![1, 2]);
    assert_eq!(s.shape(2).unwrap(), Vec::<usize>::new());
    assert_eq!(s.total_numel().unwrap(), 6);
    assert!(s.tensors().iter().all(|t| t.requires_grad()));

    // No gradients yet; an absent gradient reads as zeros.
    assert_eq!(s.grad_mask().unwrap(), vec![false; 3]);
    assert_eq!(data(&s, Slot::Grads, 1), vec![0.0; 3]);
    assert!(s.grad(1).unwrap().is_none());

    // write(Grads) defines .grad.
    s.write(Slot::Grads, 1, &host(&[3], dtype, &[0.5, -1.0, 2.0]))
        .unwrap();
    assert_eq!(s.grad_mask().unwrap(), vec![false, true, false]);
    assert_eq!(data(&s, Slot::Grads, 1), vec![0.5, -1.0, 2.0]);
    let g = s.grad(1).unwrap().unwrap();
    assert_eq!(g.kind(), s.kind());
    assert_eq!(g.device(), device);

    // zero_grads forgets them.
    s.zero_grads().unwrap();
    assert_eq!(s.grad_mask().unwrap(), vec![false; 3]);

    // Buffers start at zero.
    let b = s.alloc_buffer().unwrap();
    let all = [true; 3];
    assert_eq!(data(&s, Slot::Buffer(b), 0), vec![0.0, 0.0]);
    assert_eq!(data(&s, Slot::Buffer(b), 2), vec![0.0]);

    // copy, masked.
    s.copy(Slot::Buffer(b), Slot::Params, &[true, false, true])
        .unwrap();
    assert_eq!(data(&s, Slot::Buffer(b), 0), vec![3.0, 4.0]);
    assert_eq!(data(&s, Slot::Buffer(b), 1), vec![0.0; 3]);
    assert_eq!(data(&s, Slot::Buffer(b), 2), vec![7.0]);

    // scale by per-tensor factors.
    s.scale(Slot::Buffer(b), &[2.0, 10.0, -0.5], &all).unwrap();
    assert_eq!(data(&s, Slot::Buffer(b), 0), vec![6.0, 8.0]);
    assert_eq!(data(&s, Slot::Buffer(b), 2), vec![-3.5]);

    // axpy with one coefficient, with two, and with more than four distinct
    // ones (the mul + add path); here b = [[6, 8]], [0, 0, 0], -3.5.
    s.axpy(Slot::Buffer(b), &[1.0, 1.0, 1.0], Slot::Params, &all)
        .unwrap();
    assert_eq!(data(&s, Slot::Buffer(b), 0), vec![9.0, 12.0]);
    assert_eq!(data(&s, Slot::Buffer(b), 1), vec![1.0, 2.0, 2.0]);
    assert_eq!(data(&s, Slot::Buffer(b), 2), vec![3.5]);
    s.axpy(
        Slot::Buffer(b),
        &[-1.0, 0.5, 0.5],
        Slot::Params,
        &[true, true, false],
    )
    .unwrap();
    assert_eq!(data(&s, Slot::Buffer(b), 0), vec![6.0, 8.0]);
    assert_eq!(data(&s, Slot::Buffer(b), 1), vec![1.5, 3.0, 3.0]);
    assert_eq!(data(&s, Slot::Buffer(b), 2), vec![3.5]);

    // Norms stay on the device; masked-out entries read as 0.
    let norms = s.norms(Slot::Params, &[true, false, true]).unwrap();
    assert_eq!(norms.values().device(), device);
    assert_eq!(norms.values().size(), vec![2]);
    assert_eq!(s.norms_to_host(&norms).unwrap(), vec![5.0, 0.0, 7.0]);

    // Projection: ‖θ₀‖ = 5 clipped to 1 → [[0.6, 0.8]]; ‖θ₂‖ = 7 < 10 is kept.
    s.copy(Slot::Buffer(b), Slot::Params, &all).unwrap();
    let norms = s.norms(Slot::Buffer(b), &all).unwrap();
    s.clip_to_norms(
        Slot::Buffer(b),
        &norms,
        &[1.0, 1.0, 10.0],
        &[true, false, true],
    )
    .unwrap();
    // The coefficient is 1 / (5 + 1e-12) (the guard is below f32's
    // resolution at 5, not at f64's).
    let clipped = data(&s, Slot::Buffer(b), 0);
    let coefficient = 1.0 / (5.0 + amp_core::PROJECTION_GUARD);
    let tol = if dtype == DType::F32 { 1e-7 } else { 1e-16 };
    assert!(
        (clipped[0] - 3.0 * coefficient).abs() < tol
            && (clipped[1] - 4.0 * coefficient).abs() < tol,
        "{clipped:?}"
    );
    assert_eq!(data(&s, Slot::Buffer(b), 1), vec![1.0, 2.0, 2.0]);
    assert_eq!(data(&s, Slot::Buffer(b), 2), vec![7.0]);

    // all_finite: one read for the whole slot.
    assert!(s.all_finite(Slot::Params, &all).unwrap());
    s.write(
        Slot::Buffer(b),
        1,
        &host(&[3], dtype, &[1.0, f64::NAN, 0.0]),
    )
    .unwrap();
    assert!(!s.all_finite(Slot::Buffer(b), &all).unwrap());
    assert!(s.all_finite(Slot::Buffer(b), &[true, false, true]).unwrap());
    s.write(
        Slot::Buffer(b),
        1,
        &host(&[3], dtype, &[1.0, f64::INFINITY, 0.0]),
    )
    .unwrap();
    assert!(!s.all_finite(Slot::Buffer(b), &all).unwrap());
    // Gradients: undefined ones count as zeros, so as finite.
    assert!(s.all_finite(Slot::Grads, &all).unwrap());

    // write(Params) rounds to the store's dtype, in place (the tensor the
    // caller holds sees it).
    let held = s.tensors()[1].shallow_clone();
    s.write(Slot::Params, 1, &host(&[3], DType::F64, &[0.1, 0.2, 0.3]))
        .unwrap();
    let expected: Vec<f64> = if dtype == DType::F32 {
        vec![0.1f32 as f64, 0.2f32 as f64, 0.3f32 as f64]
    } else {
        vec![0.1, 0.2, 0.3]
    };
    assert_eq!(data(&s, Slot::Params, 1), expected);
    assert_eq!(
        Vec::<f64>::try_from(&held.to_kind(Kind::Double).to_device(Device::Cpu)).unwrap(),
        expected
    );
    assert!(held.requires_grad());

    // Gradients produced by autograd are seen by the store.
    s.zero_grads().unwrap();
    let loss = (&s.tensors()[0] * &s.tensors()[0]).sum(s.kind());
    loss.backward();
    assert_eq!(s.grad_mask().unwrap(), vec![true, false, false]);
    assert_eq!(data(&s, Slot::Grads, 0), vec![6.0, 8.0]);
    // In-place batched ops on the gradients reach `.grad()` itself.
    s.scale(Slot::Grads, &[0.5, 1.0, 1.0], &[true, false, false])
        .unwrap();
    let g = s.tensors()[0]
        .grad()
        .to_kind(Kind::Double)
        .to_device(Device::Cpu);
    assert_eq!(
        Vec::<f64>::try_from(&g.flatten(0, -1)).unwrap(),
        vec![3.0, 4.0]
    );

    s.free_buffer(b).unwrap();
    assert!(matches!(s.free_buffer(b), Err(AmpError::UnknownBuffer(_))));
    // A freed slot is reused.
    assert_eq!(s.alloc_buffer().unwrap(), b);
}

#[test]
fn primitives_cpu() {
    primitives(DType::F64, Device::Cpu);
    primitives(DType::F32, Device::Cpu);
}

#[test]
fn primitives_cuda() {
    if let Some(device) = common::cuda_or_skip("primitives_cuda") {
        primitives(DType::F64, device);
        primitives(DType::F32, device);
    }
}

#[test]
fn axpy_with_many_distinct_coefficients() {
    // Six tensors, six different α: the shim switches to _foreach_mul +
    // _foreach_add_. dst_i = i + α_i · 1 with α_i = i/4 − 1.
    let values: Vec<HostTensor> = (0..6)
        .map(|i| host(&[2], DType::F64, &[i as f64, i as f64]))
        .collect();
    let mut s = TchStore::from_host(&values, Device::Cpu).unwrap();
    let b = s.alloc_buffer().unwrap();
    let ones: Vec<HostTensor> = (0..6)
        .map(|_| host(&[2], DType::F64, &[1.0, 1.0]))
        .collect();
    for (i, one) in ones.iter().enumerate() {
        s.write(Slot::Buffer(b), i, one).unwrap();
    }
    let alpha: Vec<f64> = (0..6).map(|i| i as f64 / 4.0 - 1.0).collect();
    let mask = [true, true, true, false, true, true];
    s.axpy(Slot::Params, &alpha, Slot::Buffer(b), &mask)
        .unwrap();
    for i in 0..6 {
        let expected = if mask[i] {
            i as f64 + alpha[i]
        } else {
            i as f64
        };
        assert_eq!(data(&s, Slot::Params, i), vec![expected; 2], "tensor {i}");
    }
}

#[test]
fn errors_are_typed() {
    let mut s = small(DType::F64, Device::Cpu);
    let all = [true; 3];
    assert!(matches!(
        s.scale(Slot::Params, &[1.0], &all),
        Err(AmpError::CountMismatch { .. })
    ));
    assert!(matches!(
        s.copy(Slot::Params, Slot::Grads, &[true]),
        Err(AmpError::CountMismatch { .. })
    ));
    assert!(matches!(
        s.copy(Slot::Params, Slot::Params, &all),
        Err(AmpError::Backend(_))
    ));
    let unknown = amp_core::BufferId::new(7);
    assert!(matches!(
        s.axpy(Slot::Params, &[1.0; 3], Slot::Buffer(unknown), &all),
        Err(AmpError::UnknownBuffer(7))
    ));
    assert!(matches!(
        s.shape(3),
        Err(AmpError::IndexOutOfRange { index: 3, len: 3 })
    ));
    assert!(matches!(
        s.read(Slot::Params, 9),
        Err(AmpError::IndexOutOfRange { .. })
    ));
    // A wrong shape writes nothing.
    let before = data(&s, Slot::Params, 0);
    assert!(matches!(
        s.write(Slot::Params, 0, &host(&[2], DType::F64, &[1.0, 2.0])),
        Err(AmpError::ShapeMismatch { index: 0, .. })
    ));
    assert_eq!(data(&s, Slot::Params, 0), before);
    // Inconsistent host data cannot be built.
    assert!(matches!(
        HostTensor::new(vec![2, 2], DType::F64, vec![1.0]),
        Err(AmpError::CountMismatch { .. })
    ));
    // clip_to_norms needs norms of every tensor it clips.
    let norms = s.norms(Slot::Params, &[true, false, false]).unwrap();
    assert!(s
        .clip_to_norms(Slot::Params, &norms, &[1.0; 3], &all)
        .is_err());
}

#[test]
fn mixed_dtypes_and_devices_are_rejected() {
    let a = Tensor::zeros([2], (Kind::Float, Device::Cpu));
    let b = Tensor::zeros([2], (Kind::Double, Device::Cpu));
    match TchStore::from_tensors(vec![a.shallow_clone(), b]) {
        Err(AmpError::DTypeMismatch {
            index,
            expected,
            found,
        }) => {
            assert_eq!(
                (index, expected.as_str(), found.as_str()),
                (1, "f32", "f64")
            );
        }
        other => panic!("expected a dtype mismatch, got {other:?}"),
    }
    let int = Tensor::zeros([2], (Kind::Int64, Device::Cpu));
    assert!(matches!(
        TchStore::from_tensors(vec![int]),
        Err(AmpError::DTypeMismatch { index: 0, .. })
    ));
    if let Some(cuda) = common::cuda_or_skip("mixed_dtypes_and_devices_are_rejected") {
        let c = Tensor::zeros([2], (Kind::Float, cuda));
        assert!(matches!(
            TchStore::from_tensors(vec![a, c]),
            Err(AmpError::DeviceMismatch { index: 1, .. })
        ));
    }
    // An empty store is allowed here and rejected by Amp.
    let empty = TchStore::from_tensors(Vec::new()).unwrap();
    assert!(matches!(
        amp_core::Amp::sgd(
            empty,
            amp_core::AmpConfig::new(0.1, 0.5),
            Default::default()
        ),
        Err(AmpError::EmptyStore)
    ));
}

#[test]
fn var_store_variables_are_shared() {
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let w = vs.root().ones("w", &[2, 2]);
    let mut s = TchStore::from_var_store(&vs).unwrap();
    assert_eq!(s.num_tensors(), 1);
    assert_eq!(s.dtype(), DType::F32);
    s.scale(Slot::Params, &[3.0], &[true]).unwrap();
    assert_eq!(
        Vec::<f32>::try_from(&w.flatten(0, -1)).unwrap(),
        vec![3.0; 4]
    );
}

#[test]
fn half_precision_store() {
    for dtype in [DType::F16, DType::BF16] {
        let mut s = TchStore::from_host(&[host(&[2], dtype, &[3.0, 4.0])], Device::Cpu).unwrap();
        assert_eq!(s.dtype(), dtype);
        let norms = s.norms(Slot::Params, &[true]).unwrap();
        assert_eq!(s.norms_to_host(&norms).unwrap(), vec![5.0]);
        s.axpy(Slot::Params, &[0.5], Slot::Grads, &[true]).unwrap();
        assert_eq!(s.read(Slot::Params, 0).unwrap().dtype(), dtype);
    }
}

#[test]
fn set_grad_copies_and_checks() {
    let mut s = small(DType::F32, Device::Cpu);
    let mut source = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
    s.set_grad(1, &source).unwrap();
    assert_eq!(s.grad_mask().unwrap(), vec![false, true, false]);
    // The store holds a copy: changing the source changes nothing.
    let _ = source.fill_(9.0);
    assert_eq!(data(&s, Slot::Grads, 1), vec![1.0, 2.0, 3.0]);
    // An existing gradient is overwritten in place.
    let before = s.grad(1).unwrap().unwrap().data_ptr();
    s.set_grad(1, &Tensor::from_slice(&[4.0f32, 5.0, 6.0]))
        .unwrap();
    assert_eq!(s.grad(1).unwrap().unwrap().data_ptr(), before);
    assert_eq!(data(&s, Slot::Grads, 1), vec![4.0, 5.0, 6.0]);
    // Wrong shape, dtype or index: typed errors, nothing changed.
    assert!(matches!(
        s.set_grad(1, &Tensor::from_slice(&[1.0f32])),
        Err(AmpError::ShapeMismatch { index: 1, .. })
    ));
    assert!(matches!(
        s.set_grad(1, &Tensor::from_slice(&[1.0f64, 2.0, 3.0])),
        Err(AmpError::DTypeMismatch { index: 1, .. })
    ));
    assert!(matches!(
        s.set_grad(7, &Tensor::from_slice(&[1.0f32])),
        Err(AmpError::IndexOutOfRange { index: 7, len: 3 })
    ));
    assert_eq!(data(&s, Slot::Grads, 1), vec![4.0, 5.0, 6.0]);
    assert_eq!(s.grad_mask().unwrap(), vec![false, true, false]);
}

/// After `flatten`, a parameter given new storage behind the store's back is
/// still trained correctly: the same steps as on a store that was never
/// flattened, bit for bit.
#[test]
fn flat_store_survives_new_parameter_storage() {
    use amp_core::{Amp, AmpConfig, SgdConfig};
    let run = |flat: bool| {
        let a = Tensor::from_slice(&[1.0f32, -2.0, 0.5]).set_requires_grad(true);
        let b = Tensor::from_slice(&[3.0f32, 4.0]).set_requires_grad(true);
        let mut store = TchStore::from_tensors(vec![a.shallow_clone(), b.shallow_clone()]).unwrap();
        if flat {
            store.flatten().unwrap();
        }
        let config = AmpConfig::new(0.1, 0.3).inner_iter(1);
        let mut amp = Amp::sgd(store, config, SgdConfig::nesterov(0.9)).unwrap();
        let step = |amp: &mut Amp<TchStore>| {
            amp.step(|_s, _p| {
                let loss = (&a * &a).sum(Kind::Float) + (&b * &b * &b).sum(Kind::Float);
                loss.backward();
                Ok::<_, AmpError>(((), loss.double_value(&[])))
            })
            .unwrap();
        };
        step(&mut amp);
        // New storage for `a` (same values), as `a.data = …` would give.
        let fresh = tch::no_grad(|| a.detach().copy());
        let mut handle = a.shallow_clone();
        handle.set_data(&fresh);
        for _ in 0..3 {
            step(&mut amp);
        }
        (0..2)
            .map(|i| data(amp.store(), Slot::Params, i))
            .collect::<Vec<_>>()
    };
    assert_eq!(run(true), run(false));
}

/// `zero_grads` of the flat layout clears the whole flat gradient in place,
/// to +0.0, past the size from which the fill is shared over libtorch's
/// threads too (tensors of 300 001, 5 and 77 777 elements: the pieces of
/// the fill do not line up with the tensors); every parameter keeps its
/// view and counts as having no gradient until one is written.
#[test]
fn flat_zero_grads_clears_every_element_of_a_large_store() {
    tch::set_num_threads(2);
    for kind in [Kind::Float, Kind::Double] {
        let sizes = [300_001i64, 5, 77_777];
        let params: Vec<Tensor> = sizes
            .iter()
            .map(|&n| Tensor::ones([n], (kind, Device::Cpu)).set_requires_grad(true))
            .collect();
        let mut store = TchStore::from_tensors(params).unwrap();
        store.flatten().unwrap();
        for round in 0..2 {
            for (i, &n) in sizes.iter().enumerate() {
                let g = Tensor::full([n], -1.5 - round as f64, (kind, Device::Cpu));
                store.set_grad(i, &g).unwrap();
            }
            assert_eq!(store.grad_mask().unwrap(), vec![true; 3]);
            store.zero_grads().unwrap();
            assert_eq!(store.grad_mask().unwrap(), vec![false; 3], "{kind:?}");
            for (i, t) in store.tensors().iter().enumerate() {
                let g = t.grad();
                assert!(g.defined(), "{kind:?}: tensor {i} lost its view");
                let values = Vec::<f64>::try_from(g.to_kind(Kind::Double)).unwrap();
                let stray = values.iter().position(|v| v.to_bits() != 0);
                assert_eq!(stray, None, "{kind:?}, round {round}: tensor {i}");
            }
        }
    }
}

/// A store can move to another thread (a training loop on a worker), with
/// or without the flat layout.
#[test]
fn store_is_send() {
    fn assert_send<T: Send>(_: &T) {}
    let mut s = small(DType::F32, Device::Cpu);
    assert_send(&s);
    s.flatten().unwrap();
    let handle = std::thread::spawn(move || {
        s.zero_grads().unwrap();
        s.grad_mask().unwrap()
    });
    assert_eq!(handle.join().unwrap(), vec![false; 3]);
}

/// Entries that share memory — the same tensor twice, or views of one
/// storage whose ranges overlap — are refused with a typed error that names
/// both; disjoint parts of one storage (a flattened store's tensors) are
/// accepted.
#[test]
fn shared_memory_is_refused() {
    let refused =
        |tensors: Vec<Tensor>, first: usize, second: usize| match TchStore::from_tensors(tensors) {
            Err(AmpError::InvalidConfig {
                field: "tensors",
                reason,
            }) => assert!(
                reason.contains(&format!("tensors {first} and {second} ")),
                "{reason}"
            ),
            other => panic!("expected a refusal of {first} and {second}, got {other:?}"),
        };
    let w = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).set_requires_grad(true);
    let other = Tensor::from_slice(&[5.0f32]).set_requires_grad(true);
    refused(
        vec![w.shallow_clone(), other.shallow_clone(), w.shallow_clone()],
        0,
        2,
    );
    let base = Tensor::zeros([6], (Kind::Float, Device::Cpu));
    refused(vec![base.narrow(0, 0, 4), base.narrow(0, 3, 3)], 0, 1);
    // A strided view spans the range between its first and last element.
    refused(
        vec![
            other.shallow_clone(),
            base.slice(0, 0, 6, 2),
            base.narrow(0, 3, 1),
        ],
        1,
        2,
    );
    // An empty tensor given twice is still the same tensor twice.
    let empty = Tensor::zeros([0], (Kind::Float, Device::Cpu));
    refused(vec![empty.shallow_clone(), empty.shallow_clone()], 0, 1);

    let halves = TchStore::from_tensors(vec![base.narrow(0, 0, 3), base.narrow(0, 3, 3)]);
    assert!(halves.is_ok(), "{halves:?}");
    let mut s = small(DType::F32, Device::Cpu);
    s.flatten().unwrap();
    let again = TchStore::from_tensors(s.tensors().iter().map(Tensor::shallow_clone).collect());
    assert!(again.is_ok(), "{again:?}");
}
