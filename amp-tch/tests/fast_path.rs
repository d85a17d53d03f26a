//! The CPU fast path of `TchStore` (plain loops over contiguous f32/f64 CPU
//! tensors in the shim) against the reference store, bit for bit, and the
//! ATen path it falls back to for everything else.

use amp_core::{
    AdamCoefficients, AdamSlots, DType, HostTensor, ParamStore, Scalar, SgdCoefficients,
    SgdMomentum, Slot,
};
use amp_ndarray::{Element, NdStore};
use amp_tch::TchStore;
use ndarray::{ArrayD, IxDyn};
use tch::{Device, Kind, Tensor};

/// Shapes around the fast path's edges: empty, 0-d, shorter than the 8
/// partial sums, ragged tails, more than one 4096-element finite-check
/// block, and long enough for the loops to be split over threads (2^18
/// elements and more, in pieces of at least 2^16).
const SHAPES: [&[usize]; 13] = [
    &[0],
    &[],
    &[1],
    &[7],
    &[8],
    &[3, 3],
    &[17],
    &[4096],
    &[4097],
    &[3, 0, 2],
    &[5, 2001],
    &[3, 5],
    &[(1 << 18) + 4099],
];

/// Many tensors, none long enough to be split on its own, more than 2^18
/// elements between them: the loops take them as one range of elements
/// shared over threads, pieces starting and ending inside tensors; the
/// sums of squares share the tensors out whole.
fn many_small() -> Vec<Vec<usize>> {
    (0..120)
        .map(|k| match k % 40 {
            0 => vec![0],
            1 => vec![],
            2 => vec![3],
            _ => vec![3, 700 + 37 * k],
        })
        .collect()
}

/// Deterministic values of mixed magnitude, rounded to `dtype`.
fn values<S: AsRef<[usize]>>(shapes: &[S], dtype: DType, seed: u64) -> Vec<HostTensor> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        // Uniform in [-1, 1), times a scale between 1e-3 and 1e3.
        let u = (state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
        let scale = 10f64.powi(((state >> 3) % 7) as i32 - 3);
        u * scale
    };
    shapes
        .iter()
        .map(|shape| {
            let shape = shape.as_ref();
            let numel = shape.iter().product();
            let data = (0..numel)
                .map(|_| {
                    let v = next();
                    if dtype == DType::F32 {
                        v as f32 as f64
                    } else {
                        v
                    }
                })
                .collect();
            HostTensor::new(shape.to_vec(), dtype, data).unwrap()
        })
        .collect()
}

fn nd_store<T: Element>(values: &[HostTensor]) -> NdStore<T> {
    NdStore::new(
        values
            .iter()
            .map(|v| {
                ArrayD::from_shape_vec(
                    IxDyn(v.shape()),
                    v.data().iter().map(|&x| T::from_f64_rounded(x)).collect(),
                )
                .unwrap()
            })
            .collect(),
    )
}

/// Every tensor of every slot, as bit patterns of the f64-widened values.
fn snapshot<S: ParamStore>(store: &S, slots: &[Slot]) -> Vec<Vec<u64>> {
    slots
        .iter()
        .flat_map(|&slot| {
            (0..store.num_tensors()).map(move |i| {
                store
                    .read(slot, i)
                    .unwrap()
                    .data()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect()
            })
        })
        .collect()
}

/// A sequence of every batched primitive, with coefficients that round
/// differently in f32 and f64; returns the norms and finite checks read on
/// the way, as bit patterns.
fn exercise<S: ParamStore>(store: &mut S, grads: &[HostTensor], seed: u64) -> Vec<u64> {
    let n = store.num_tensors();
    let c = |x: f64| S::Scalar::from_f64_rounded(x);
    let mask: Vec<bool> = (0..n).map(|i| (i as u64 + seed) % 5 != 3).collect();
    let all = vec![true; n];
    for (i, g) in grads.iter().enumerate() {
        store.write(Slot::Grads, i, g).unwrap();
    }
    let b = store.alloc_buffer().unwrap();
    let d = store.alloc_buffer().unwrap();
    let mut seen = Vec::new();

    store.copy(Slot::Buffer(b), Slot::Params, &all).unwrap();
    let factor: Vec<_> = (0..n)
        .map(|i| {
            c(if i % 3 == 0 {
                1.0
            } else {
                0.1 * i as f64 - 0.35
            })
        })
        .collect();
    store.scale(Slot::Params, &factor, &mask).unwrap();
    let alpha: Vec<_> = (0..n).map(|i| c(-1.0 / (3.0 + i as f64))).collect();
    store
        .axpy(Slot::Params, &alpha, Slot::Grads, &mask)
        .unwrap();
    store
        .axpy(Slot::Buffer(d), &alpha, Slot::Params, &all)
        .unwrap();
    store.copy(Slot::Grads, Slot::Buffer(b), &mask).unwrap();

    let norms = store.norms(Slot::Buffer(d), &all).unwrap();
    let host = store.norms_to_host(&norms).unwrap();
    seen.extend(host.iter().map(|x| x.to_bits()));
    // Half the tensors are clipped hard, the others not at all (coefficient
    // 1), on a mask that differs from the norms' one.
    let limit: Vec<_> = host
        .iter()
        .enumerate()
        .map(|(i, &h)| c(if i % 2 == 0 { h * 0.37 } else { h * 4.0 + 1.0 }))
        .collect();
    store
        .clip_to_norms(Slot::Buffer(d), &norms, &limit, &mask)
        .unwrap();
    let masked = store.norms(Slot::Params, &mask).unwrap();
    seen.extend(
        store
            .norms_to_host(&masked)
            .unwrap()
            .iter()
            .map(|x| x.to_bits()),
    );
    store
        .clip_to_norms(Slot::Params, &masked, &limit, &mask)
        .unwrap();

    // The fused operations (ndarray runs the composed sequence), with and
    // without snapshot and δ, ζ of 1 and not, clipped tensors and not.
    let inner_lr: Vec<_> = (0..n)
        .map(|i| {
            c(if i % 2 == 0 {
                1.0
            } else {
                0.45 + 0.1 * i as f64
            })
        })
        .collect();
    let epsilon: Vec<_> = (0..n)
        .map(|i| c(if i % 3 == 0 { 1e-3 } else { 1e3 }))
        .collect();
    let e = store.alloc_buffer().unwrap();
    let (snap, delta) = match seed % 4 {
        0 => (Some(Slot::Buffer(e)), None),
        1 => (None, Some(Slot::Buffer(e))),
        2 => (Some(Slot::Buffer(e)), Some(Slot::Buffer(d))),
        _ => (None, None),
    };
    let norms = store
        .perturb_from_grads(snap, delta, &inner_lr, &epsilon, &mask)
        .unwrap();
    seen.extend(
        store
            .norms_to_host(&norms)
            .unwrap()
            .iter()
            .map(|x| x.to_bits()),
    );
    // The gradients are unspecified after perturb_from_grads: write them again.
    for (i, g) in grads.iter().enumerate() {
        store.write(Slot::Grads, i, g).unwrap();
    }
    store
        .axpy_from(Slot::Params, Slot::Buffer(b), &alpha, Slot::Grads, &mask)
        .unwrap();
    store
        .axpy_from(Slot::Buffer(d), Slot::Buffer(d), &alpha, Slot::Grads, &all)
        .unwrap();
    // SGD's fused step: Nesterov or not, reading θ from a snapshot, then
    // dampened momentum on θ itself (some tensors on their first step),
    // then none; weight decay on every other tensor. The gradients are
    // unspecified after each: written again.
    let sgd = |first: &dyn Fn(usize) -> bool| -> Vec<SgdCoefficients<S::Scalar>> {
        (0..n)
            .map(|i| SgdCoefficients {
                weight_decay: c(if i % 2 == 0 { 5e-3 } else { 0.0 }),
                step: alpha[i],
                first: first(i),
            })
            .collect()
    };
    let momenta = [
        Some((0.9, 1.0, seed % 2 == 0)),
        Some((0.8, 0.75, seed % 2 == 1)),
        None,
    ];
    for (round, momentum) in momenta.into_iter().enumerate() {
        let momentum = momentum.map(|(mu, keep, nesterov)| SgdMomentum {
            buffer: Slot::Buffer(d),
            momentum: c(mu),
            keep: c(keep),
            nesterov,
        });
        let weights = if round == 0 {
            Slot::Buffer(b)
        } else {
            Slot::Params
        };
        let coefficients = sgd(&|i| round == 0 || i % 3 == 1);
        store
            .sgd_update(weights, momentum.as_ref(), &coefficients, &mask)
            .unwrap();
        for (i, g) in grads.iter().enumerate() {
            store.write(Slot::Grads, i, g).unwrap();
        }
    }
    // Adam's fused step, with AMSGrad and without; decoupled decay on every
    // other tensor, L2 decay on the others. Moments start from θ (both
    // signs) and g² (the maximum at half of it).
    let (m, v, x) = (
        Slot::Buffer(store.alloc_buffer().unwrap()),
        Slot::Buffer(store.alloc_buffer().unwrap()),
        Slot::Buffer(store.alloc_buffer().unwrap()),
    );
    store.copy(m, Slot::Params, &all).unwrap();
    let ones = vec![c(1.0); n];
    store
        .addcmul(v, &ones, Slot::Grads, Slot::Grads, &all)
        .unwrap();
    store.copy(x, v, &all).unwrap();
    store.scale(x, &vec![c(0.5); n], &all).unwrap();
    let adam: Vec<_> = (0..n)
        .map(|i| AdamCoefficients {
            shrink: c(if i % 2 == 0 { 0.99 } else { 1.0 }),
            l2: c(if i % 2 == 0 { 0.0 } else { 0.01 }),
            beta1: (c(0.9), c(0.1)),
            beta2: (c(0.999), c(0.001)),
            step: c(-0.01 / 0.19),
            divisor: c(0.7),
            eps: c(1e-8),
        })
        .collect();
    for amsgrad in [true, false] {
        let slots = AdamSlots {
            exp_avg: m,
            exp_avg_sq: v,
            max_exp_avg_sq: amsgrad.then_some(x),
        };
        store.adam_update(slots, &adam, &mask).unwrap();
        for (i, g) in grads.iter().enumerate() {
            store.write(Slot::Grads, i, g).unwrap();
        }
    }
    for slot in [Slot::Params, m, v, x] {
        for i in 0..n {
            let t = store.read(slot, i).unwrap();
            seen.extend(t.data().iter().map(|x| x.to_bits()));
        }
    }
    for slot in [Slot::Params, Slot::Grads, Slot::Buffer(b), Slot::Buffer(d)] {
        seen.push(u64::from(store.all_finite(slot, &all).unwrap()));
    }
    seen
}

fn matches_reference<T: Element, S: AsRef<[usize]>>(shapes: &[S], dtype: DType) {
    let total: usize = shapes
        .iter()
        .map(|s| s.as_ref().iter().product::<usize>())
        .sum();
    assert!(total > 1 << 18, "the shapes reach the threaded loops");
    for seed in 0..4 {
        let params = values(shapes, dtype, 2 * seed);
        let grads = values(shapes, dtype, 2 * seed + 1);
        let mut tch = TchStore::from_host(&params, Device::Cpu).unwrap();
        let mut nd = nd_store::<T>(&params);
        let got = exercise(&mut tch, &grads, seed);
        let want = exercise(&mut nd, &grads, seed);
        assert_eq!(got, want, "{dtype} seed {seed}: norms and finite checks");
        let slots = [
            Slot::Params,
            Slot::Grads,
            Slot::Buffer(amp_core::BufferId::new(0)),
            Slot::Buffer(amp_core::BufferId::new(1)),
            Slot::Buffer(amp_core::BufferId::new(2)),
        ];
        let (a, e) = (snapshot(&tch, &slots), snapshot(&nd, &slots));
        for (k, (x, y)) in a.iter().zip(&e).enumerate() {
            assert_eq!(
                x,
                y,
                "{dtype} seed {seed}: slot {} tensor {}",
                k / shapes.len(),
                k % shapes.len()
            );
        }
    }
}

#[test]
fn f32_matches_reference_bit_for_bit() {
    matches_reference::<f32, _>(&SHAPES, DType::F32);
}

#[test]
fn f64_matches_reference_bit_for_bit() {
    matches_reference::<f64, _>(&SHAPES, DType::F64);
}

/// One tensor alone: its sums of squares are split over threads at their
/// blocks (with several tensors, the tensors are shared out whole).
#[test]
fn one_large_tensor_matches_reference_bit_for_bit() {
    matches_reference::<f32, _>(&[[1_000_003]], DType::F32);
    matches_reference::<f64, _>(&[[1_000_003]], DType::F64);
}

#[test]
fn many_small_tensors_match_reference_bit_for_bit() {
    matches_reference::<f32, _>(&many_small(), DType::F32);
    matches_reference::<f64, _>(&many_small(), DType::F64);
}

#[test]
fn all_finite_finds_every_bad_value() {
    let sizes = [1usize, 7, 4096, 2 * 4096 + 3, (1 << 18) + 4099];
    for kind in [Kind::Float, Kind::Double, Kind::Half, Kind::BFloat16] {
        for contiguous in [true, false] {
            for &len in &sizes {
                for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
                    for at in [0, len / 2, len.saturating_sub(4096), len - 1] {
                        let mut data = vec![0.5f64; len];
                        data[at] = bad;
                        // Store tensor 1 holds the bad value; a non-contiguous
                        // one is a strided view (every other element).
                        let base = Tensor::from_slice(&data).to_kind(kind);
                        let t = if contiguous {
                            base
                        } else {
                            Tensor::stack(&[&base, &base], 1).select(1, 0)
                        };
                        assert_eq!(t.is_contiguous(), contiguous || len == 1);
                        let ok = Tensor::ones([3, 2], (kind, Device::Cpu));
                        let empty = Tensor::zeros([0], (kind, Device::Cpu));
                        let mut s = TchStore::from_tensors(vec![ok, t, empty]).unwrap();
                        let context =
                            format!("{kind:?} contiguous {contiguous} len {len} {bad} at {at}");
                        assert!(
                            !s.all_finite(Slot::Params, &[true, true, true]).unwrap(),
                            "{context}"
                        );
                        assert!(
                            s.all_finite(Slot::Params, &[true, false, true]).unwrap(),
                            "{context}: masked out"
                        );
                    }
                }
            }
        }
        let mut s = TchStore::from_tensors(vec![
            Tensor::zeros([0], (kind, Device::Cpu)),
            Tensor::full([5000], 1e30, (Kind::Double, Device::Cpu)).to_kind(kind),
        ])
        .unwrap();
        // 1e30 overflows f16 and bf16 keeps it: whatever the kind, the answer
        // is the finiteness of what is stored.
        let stored_finite = s.read(Slot::Params, 1).unwrap().data()[0].is_finite();
        assert_eq!(
            s.all_finite(Slot::Params, &[true, true]).unwrap(),
            stored_finite,
            "{kind:?}"
        );
    }
}

/// More than 2^18 elements in small tensors, shared over threads as one
/// range: an inf or NaN anywhere in any of them is found, and one in a
/// masked-out tensor is not.
#[test]
fn all_finite_finds_bad_values_among_many_small_tensors() {
    const TENSORS: usize = 150;
    const LEN: usize = 2003;
    for kind in [Kind::Float, Kind::Double] {
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            for (tensor, at) in [(0, 0), (1, LEN - 1), (74, 1000), (149, LEN - 1), (149, 0)] {
                let tensors = (0..TENSORS)
                    .map(|k| {
                        let mut data = vec![0.25f64; LEN];
                        if k == tensor {
                            data[at] = bad;
                        }
                        Tensor::from_slice(&data).to_kind(kind)
                    })
                    .collect();
                let mut s = TchStore::from_tensors(tensors).unwrap();
                let context = format!("{kind:?} {bad} in tensor {tensor} at {at}");
                assert!(
                    !s.all_finite(Slot::Params, &[true; TENSORS]).unwrap(),
                    "{context}"
                );
                let mut mask = [true; TENSORS];
                mask[tensor] = false;
                assert!(
                    s.all_finite(Slot::Params, &mask).unwrap(),
                    "{context}: masked out"
                );
            }
        }
    }
}

/// One strided tensor sends a whole batched operation down the ATen path;
/// its results are still the reference's (exactly, on these values).
#[test]
fn strided_tensors_take_the_aten_path() {
    let strided = Tensor::from_slice(&[1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0])
        .view([2, 3])
        .tr();
    assert!(!strided.is_contiguous());
    let plain = Tensor::from_slice(&[3.0f64, 4.0]);
    let mut s =
        TchStore::from_tensors(vec![plain.shallow_clone(), strided.shallow_clone()]).unwrap();
    let b = s.alloc_buffer().unwrap();
    let all = [true, true];
    s.copy(Slot::Buffer(b), Slot::Params, &all).unwrap();
    s.scale(Slot::Params, &[2.0, 0.5], &all).unwrap();
    s.axpy(Slot::Params, &[1.0, -1.0], Slot::Buffer(b), &all)
        .unwrap();
    // θ₀ = 2·θ₀ + θ₀ = 3·θ₀, θ₁ = θ₁/2 − θ₁ = −θ₁/2.
    assert_eq!(s.read(Slot::Params, 0).unwrap().data(), vec![9.0, 12.0]);
    assert_eq!(
        s.read(Slot::Params, 1).unwrap().data(),
        vec![-0.5, -2.0, -1.0, -2.5, -1.5, -3.0]
    );
    let norms = s.norms(Slot::Params, &all).unwrap();
    assert_eq!(norms.values().device(), Device::Cpu);
    let host = s.norms_to_host(&norms).unwrap();
    assert_eq!(host[0], 15.0);
    s.clip_to_norms(Slot::Params, &norms, &[5.0, 1e3], &all)
        .unwrap();
    let clipped = s.read(Slot::Params, 0).unwrap().into_data();
    assert!((clipped[0] - 3.0).abs() < 1e-12 && (clipped[1] - 4.0).abs() < 1e-12);
    assert!(s.all_finite(Slot::Params, &all).unwrap());
    // The writes went to the caller's tensors.
    assert_eq!(strided.double_value(&[0, 0]), -0.5);
    assert!((plain.double_value(&[1]) - 4.0).abs() < 1e-12);
}

/// In-place writes of the fast path count for autograd's version counter,
/// as an in-place ATen op does.
#[test]
fn fast_path_bumps_versions() {
    let mut s = TchStore::from_host(
        &[HostTensor::new(vec![4], DType::F32, vec![1.0, 2.0, 3.0, 4.0]).unwrap()],
        Device::Cpu,
    )
    .unwrap();
    let before = s.tensors()[0].internal_version();
    s.scale(Slot::Params, &[2.0], &[true]).unwrap();
    let after = s.tensors()[0].internal_version();
    assert!(after > before, "version {before} -> {after}");
    assert_eq!(
        s.read(Slot::Params, 0).unwrap().data(),
        vec![2.0, 4.0, 6.0, 8.0]
    );
}

/// A NaN norm gives the coefficient 1 (Rust's `min`, as the reference
/// store computes it): the tensor is left as it is.
#[test]
fn nan_norm_leaves_the_tensor_alone() {
    for dtype in [DType::F32, DType::F64] {
        let values = [HostTensor::new(vec![3], dtype, vec![1.0, f64::NAN, 2.0]).unwrap()];
        let mut s = TchStore::from_host(&values, Device::Cpu).unwrap();
        let norms = s.norms(Slot::Params, &[true]).unwrap();
        assert!(s.norms_to_host(&norms).unwrap()[0].is_nan());
        s.clip_to_norms(Slot::Params, &norms, &[0.5], &[true])
            .unwrap();
        let data = s.read(Slot::Params, 0).unwrap().into_data();
        assert_eq!((data[0], data[2]), (1.0, 2.0), "{dtype}");
        assert!(data[1].is_nan());
    }
}
