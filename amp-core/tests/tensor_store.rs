//! `TensorStore` over a small host tensor type: masks, typed errors,
//! gradient presence, 0-d and empty tensors, and failing operations.

use std::cell::Cell;
use std::marker::PhantomData;

use amp_core::{
    Amp, AmpConfig, AmpError, DType, HostTensor, ParamStore, Result, Scalar, SgdConfig, Slot,
    TensorOps, TensorStore,
};

/// A dense host tensor of `f32` or `f64`.
#[derive(Clone, Debug, PartialEq)]
struct Dense<T> {
    shape: Vec<usize>,
    data: Vec<T>,
}

/// The operations on [`Dense`] of `T`; `fail_axpy_after` makes every `axpy`
/// after that many succeeded ones fail, to test failing backends.
#[derive(Debug)]
struct DenseOps<T> {
    axpy_calls: Cell<usize>,
    fail_axpy_after: Option<usize>,
    element: PhantomData<T>,
}

impl<T: Scalar> TensorOps for DenseOps<T> {
    type Tensor = Dense<T>;
    type Scalar = T;
    fn dtype(&self) -> DType {
        if std::mem::size_of::<T>() == 4 {
            DType::F32
        } else {
            DType::F64
        }
    }
    fn shape(&self, t: &Dense<T>) -> Vec<usize> {
        t.shape.clone()
    }
    fn scale(&self, t: &Dense<T>, factor: T) -> Result<Dense<T>> {
        let data = t.data.iter().map(|&x| x * factor).collect();
        Ok(Dense {
            shape: t.shape.clone(),
            data,
        })
    }
    fn axpy(&self, y: &Dense<T>, alpha: T, x: &Dense<T>) -> Result<Dense<T>> {
        let calls = self.axpy_calls.get();
        self.axpy_calls.set(calls + 1);
        if self.fail_axpy_after.is_some_and(|n| calls >= n) {
            return Err(AmpError::backend("injected axpy failure"));
        }
        let data = y.data.iter().zip(&x.data).map(|(&y, &x)| y + alpha * x);
        Ok(Dense {
            shape: y.shape.clone(),
            data: data.collect(),
        })
    }
    fn sum_of_squares(&self, t: &Dense<T>) -> Result<f64> {
        Ok(t.data.iter().map(|x| x.widen() * x.widen()).sum())
    }
    fn to_host(&self, t: &Dense<T>) -> Result<Vec<f64>> {
        Ok(t.data.iter().map(|x| x.widen()).collect())
    }
    fn tensor_like(&self, data: &[f64], like: &Dense<T>) -> Result<Dense<T>> {
        Ok(Dense {
            shape: like.shape.clone(),
            data: data.iter().map(|&x| T::from_f64_rounded(x)).collect(),
        })
    }
}

type Store<T> = TensorStore<DenseOps<T>>;

fn dense<T: Scalar>(shape: &[usize], data: &[f64]) -> Dense<T> {
    Dense {
        shape: shape.to_vec(),
        data: data.iter().map(|&x| T::from_f64_rounded(x)).collect(),
    }
}

fn ops<T>() -> DenseOps<T> {
    DenseOps {
        axpy_calls: Cell::new(0),
        fail_axpy_after: None,
        element: PhantomData,
    }
}

/// A 2×2 matrix, a 0-d scalar, an empty tensor and a vector.
fn store<T: Scalar>() -> Store<T> {
    TensorStore::new(
        ops(),
        vec![
            dense(&[2, 2], &[3.0, 0.0, 0.0, 4.0]),
            dense(&[], &[-2.0]),
            dense(&[0], &[]),
            dense(&[3], &[1.0, 2.0, 2.0]),
        ],
    )
}

fn slot_bits<S: ParamStore>(store: &S, slot: Slot) -> Vec<Vec<u64>> {
    (0..store.num_tensors())
        .map(|i| {
            let t = store.read(slot, i).unwrap();
            t.data().iter().map(|x| x.to_bits()).collect()
        })
        .collect()
}

#[test]
fn norms_and_projection_match_hand_values() {
    // Tensor 0: ‖(3, 0, 0, 4)‖ = 5; tensor 1: |−2| = 2; tensor 2: empty, 0;
    // tensor 3: ‖(1, 2, 2)‖ = 3.
    let mut s = store::<f64>();
    let mask = [true; 4];
    let norms = s.norms(Slot::Params, &mask).unwrap();
    assert_eq!(norms, vec![5.0, 2.0, 0.0, 3.0]);
    // Clip to radius 1: tensor 0 times 1/(5 + 1e-12), tensor 1 times
    // 1/(2 + 1e-12); tensor 3 is clipped to radius 6 > 3, so untouched.
    s.clip_to_norms(Slot::Params, &norms, &[1.0, 1.0, 1.0, 6.0], &mask)
        .unwrap();
    let p = s.params();
    assert_eq!(
        p[0].data,
        vec![
            3.0 * (1.0 / (5.0 + 1e-12)),
            0.0,
            0.0,
            4.0 * (1.0 / (5.0 + 1e-12))
        ]
    );
    assert_eq!(p[1].data, vec![-2.0 * (1.0 / (2.0 + 1e-12))]);
    assert!(p[2].data.is_empty());
    assert_eq!(p[3].data, vec![1.0, 2.0, 2.0]);
}

#[test]
fn f32_norms_are_rounded_once_from_an_f64_sum() {
    // ‖(0.1, 0.2)‖ in f32: the f64 root of the f64 sum of the f32 squares,
    // rounded to f32 once, as the ndarray oracle computes it.
    let mut s: Store<f32> = TensorStore::new(ops(), vec![dense(&[2], &[0.1, 0.2])]);
    let norms = s.norms(Slot::Params, &[true]).unwrap();
    let (a, b) = (0.1f32 as f64, 0.2f32 as f64);
    assert_eq!(norms, vec![(a * a + b * b).sqrt() as f32]);
    assert_eq!(s.dtype(), DType::F32);
}

#[test]
fn masked_out_tensors_are_untouched_by_every_operation() {
    let mut s = store::<f64>();
    for i in 0..4 {
        let g = s.params()[i].clone();
        s.set_grad(i, s.ops().scale(&g, 0.5).unwrap()).unwrap();
    }
    let b = s.alloc_buffer().unwrap();
    let c = s.alloc_buffer().unwrap();
    let (buf, other) = (Slot::Buffer(b), Slot::Buffer(c));
    s.copy(buf, Slot::Grads, &[true; 4]).unwrap();
    // Only tensor 3 is masked in; 0, 1 and 2 must keep their bits in every slot.
    let mask = [false, false, false, true];
    let before: Vec<_> = [Slot::Params, Slot::Grads, buf, other]
        .iter()
        .map(|&slot| slot_bits(&s, slot))
        .collect();
    let c4 = [2.0; 4];
    s.copy(other, Slot::Params, &mask).unwrap();
    s.scale(Slot::Params, &c4, &mask).unwrap();
    s.axpy(Slot::Params, &c4, Slot::Grads, &mask).unwrap();
    s.axpy_from(buf, Slot::Params, &c4, Slot::Grads, &mask)
        .unwrap();
    let norms = s.norms(Slot::Grads, &mask).unwrap();
    assert_eq!(&norms[..3], &[0.0; 3]);
    s.clip_to_norms(Slot::Grads, &norms, &[1e-3; 4], &mask)
        .unwrap();
    s.perturb_from_grads(Some(other), Some(buf), &c4, &[1e-3; 4], &mask)
        .unwrap();
    s.clip_grad_norm(1e-6, &mask).unwrap();
    for (k, &slot) in [Slot::Params, Slot::Grads, buf, other].iter().enumerate() {
        let after = slot_bits(&s, slot);
        assert_eq!(&after[..3], &before[k][..3], "{slot:?}");
        assert_ne!(after[3], before[k][3], "{slot:?}: tensor 3 was masked in");
    }
}

#[test]
fn wrong_lengths_are_count_mismatches() {
    let mut s = store::<f64>();
    let b = Slot::Buffer(s.alloc_buffer().unwrap());
    let (short, ok, c) = ([true; 3], [true; 4], [1.0; 4]);
    let is_count = |r: Result<()>, what: &str| match r {
        Err(AmpError::CountMismatch { .. }) => {}
        other => panic!("{what}: {other:?}"),
    };
    is_count(s.copy(b, Slot::Params, &short), "copy mask");
    is_count(s.scale(b, &c, &short), "scale mask");
    is_count(s.scale(b, &c[..3], &ok), "scale factors");
    is_count(s.axpy(b, &c, Slot::Params, &short), "axpy mask");
    is_count(s.axpy(b, &c[..3], Slot::Params, &ok), "axpy alphas");
    is_count(s.norms(b, &short).map(drop), "norms mask");
    is_count(s.all_finite(b, &short).map(drop), "all_finite mask");
    let norms = s.norms(b, &ok).unwrap();
    is_count(s.clip_to_norms(b, &norms, &c, &short), "clip mask");
    is_count(
        s.clip_to_norms(b, &norms[..3].to_vec(), &c, &ok),
        "clip norms",
    );
    is_count(s.clip_to_norms(b, &norms, &c[..3], &ok), "clip radii");
    // A host tensor whose data does not fit its shape cannot be built.
    assert!(matches!(
        HostTensor::new(vec![3], DType::F64, vec![1.0; 2]),
        Err(AmpError::CountMismatch { .. })
    ));
}

#[test]
fn unknown_buffers_same_slots_and_bad_shapes_are_typed_errors() {
    let mut s = store::<f64>();
    let id = s.alloc_buffer().unwrap();
    s.free_buffer(id).unwrap();
    let freed = Slot::Buffer(id);
    let mask = [true; 4];
    let unknown = |r: Result<()>| matches!(r, Err(AmpError::UnknownBuffer(0)));
    assert!(unknown(s.copy(freed, Slot::Params, &mask)));
    assert!(unknown(s.copy(Slot::Params, freed, &mask)));
    assert!(unknown(s.scale(freed, &[2.0; 4], &mask)));
    assert!(unknown(s.norms(freed, &mask).map(drop)));
    assert!(unknown(s.read(freed, 0).map(drop)));
    assert!(unknown(s.free_buffer(id)));

    let b = Slot::Buffer(s.alloc_buffer().unwrap());
    for r in [
        s.copy(b, b, &mask),
        s.axpy(Slot::Params, &[1.0; 4], Slot::Params, &mask),
        s.axpy_from(b, Slot::Params, &[1.0; 4], b, &mask),
    ] {
        assert!(matches!(r, Err(AmpError::Backend(_))), "{r:?}");
    }

    let before = slot_bits(&s, Slot::Params);
    let wrong = HostTensor::new(vec![4], DType::F64, vec![0.0; 4]).unwrap();
    let r = s.write(Slot::Params, 0, &wrong);
    assert!(
        matches!(&r, Err(AmpError::ShapeMismatch { index: 0, expected, found })
            if expected == &[2, 2] && found == &[4]),
        "{r:?}"
    );
    let r = s.set_grad(3, dense(&[1, 3], &[0.0; 3]));
    assert!(
        matches!(r, Err(AmpError::ShapeMismatch { index: 3, .. })),
        "{r:?}"
    );
    let r = s.set_param(1, dense(&[1], &[0.0]));
    assert!(
        matches!(r, Err(AmpError::ShapeMismatch { index: 1, .. })),
        "{r:?}"
    );
    let r = s.set_grad(4, dense(&[], &[0.0]));
    assert!(
        matches!(r, Err(AmpError::IndexOutOfRange { index: 4, len: 4 })),
        "{r:?}"
    );
    assert!(matches!(
        s.read(Slot::Params, 9),
        Err(AmpError::IndexOutOfRange { .. })
    ));
    assert_eq!(slot_bits(&s, Slot::Params), before, "nothing was written");
    assert!(s.grad_mask().unwrap().iter().all(|&g| !g));
}

#[test]
fn gradient_presence_follows_set_grad_write_and_zero_grads() {
    let mut s = store::<f64>();
    assert_eq!(s.grad_mask().unwrap(), vec![false; 4]);
    s.set_grad(1, dense(&[], &[7.0])).unwrap();
    let g = HostTensor::new(vec![3], DType::F64, vec![1.0, 1.0, 1.0]).unwrap();
    s.write(Slot::Grads, 3, &g).unwrap();
    assert_eq!(s.grad_mask().unwrap(), vec![false, true, false, true]);
    assert_eq!(s.grad(1), Some(&dense(&[], &[7.0])));
    // A missing gradient reads as zeros, copies as zeros, has norm 0, and no
    // operation makes it present.
    assert_eq!(s.read(Slot::Grads, 0).unwrap().data(), vec![0.0; 4]);
    let b = Slot::Buffer(s.alloc_buffer().unwrap());
    s.copy(b, Slot::Params, &[true; 4]).unwrap();
    s.copy(b, Slot::Grads, &[true; 4]).unwrap();
    assert_eq!(s.read(b, 0).unwrap().data(), vec![0.0; 4]);
    assert_eq!(s.read(b, 1).unwrap().data(), vec![7.0]);
    let norms = s.norms(Slot::Grads, &[true; 4]).unwrap();
    assert_eq!(norms, vec![0.0, 7.0, 0.0, 3f64.sqrt()]);
    s.copy(Slot::Grads, Slot::Params, &[true; 4]).unwrap();
    s.scale(Slot::Grads, &[3.0; 4], &[true; 4]).unwrap();
    assert_eq!(s.grad_mask().unwrap(), vec![false, true, false, true]);
    assert_eq!(s.read(Slot::Grads, 1).unwrap().data(), vec![-6.0]);
    s.zero_grads().unwrap();
    assert_eq!(s.grad_mask().unwrap(), vec![false; 4]);
    assert_eq!(s.grad(1), None);
}

#[test]
fn all_finite_tells_overflow_from_nan_and_infinity() {
    let mut s: Store<f64> =
        TensorStore::new(ops(), vec![dense(&[2], &[1e200, 1.0]), dense(&[], &[0.0])]);
    // 1e200² overflows the sum of squares, yet every element is finite.
    assert!(s.all_finite(Slot::Params, &[true, true]).unwrap());
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        s.set_param(1, dense(&[], &[bad])).unwrap();
        assert!(!s.all_finite(Slot::Params, &[true, true]).unwrap(), "{bad}");
        assert!(s.all_finite(Slot::Params, &[true, false]).unwrap(), "{bad}");
    }
}

#[test]
fn a_failing_operation_leaves_the_weights_as_they_were() {
    // L(θ) = ½‖θ‖², ∇L = θ. The store calls `axpy` once per tensor with a
    // gradient (4 here): axpy calls 1–4 move θ to θ + δ, 5–8 are SGD's
    // update. A failure in either, on the first tensor or midway, must leave
    // θ bit for bit as it was (copy-restore).
    for fail_after in [0, 2, 4, 5] {
        let mut s = store::<f64>();
        let failing = DenseOps {
            fail_axpy_after: Some(fail_after),
            ..ops()
        };
        s = TensorStore::new(failing, s.into_params());
        let before = slot_bits(&s, Slot::Params);
        let mut amp = Amp::sgd(s, AmpConfig::new(0.1, 0.5), SgdConfig::momentum(0.9)).unwrap();
        let r = amp.step(|s: &mut Store<f64>, _pass| {
            for i in 0..4 {
                let p = s.params()[i].clone();
                s.set_grad(i, p)?;
            }
            Ok::<_, AmpError>(((), 1.0))
        });
        assert!(
            matches!(r, Err(AmpError::Backend(_))),
            "{fail_after}: {r:?}"
        );
        assert_eq!(slot_bits(amp.store(), Slot::Params), before, "{fail_after}");
        assert_eq!(amp.store().ops().axpy_calls.get(), fail_after + 1);
    }
}
