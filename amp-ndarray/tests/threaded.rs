//! Element-wise loops over tensors of 2^18 elements or more run on rayon's
//! threads; each element is computed on its own, so every operation must
//! give, bit for bit, what the same operation gives on the same values cut
//! into small tensors (which stay on one thread). One tensor of each pair
//! is not in standard layout (a transposed matrix).

use amp_core::{ParamStore, SgdCoefficients, SgdMomentum, Slot};
use amp_ndarray::{Element, NdStore};
use ndarray::{Array1, Array2, ArrayD};

/// Elements per tensor of the cut store: far below the threaded size.
const PIECE: usize = 1000;

fn wave<T: Element>(n: usize, k: f64) -> Vec<T> {
    (0..n)
        .map(|i| T::from_f64_rounded(((i as f64) * k).sin() * 3.0))
        .collect()
}

/// A 1-D tensor of 300 000 elements and a transposed 600 × 500 matrix.
fn big<T: Element>(k: f64) -> Vec<ArrayD<T>> {
    let line = Array1::from_vec(wave(300_000, k)).into_dyn();
    let square = Array2::from_shape_vec((600, 500), wave(300_000, k + 0.1)).unwrap();
    let transposed = square.reversed_axes().into_dyn();
    assert!(!transposed.is_standard_layout());
    vec![line, transposed]
}

/// The same values in logical order, cut into 1-D tensors of `PIECE`.
fn cut<T: Element>(tensors: &[ArrayD<T>]) -> Vec<ArrayD<T>> {
    tensors
        .iter()
        .flat_map(|t| {
            let values: Vec<T> = t.iter().copied().collect();
            values
                .chunks(PIECE)
                .map(|c| Array1::from_vec(c.to_vec()).into_dyn())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn store<T: Element>(params: Vec<ArrayD<T>>, grads: Vec<ArrayD<T>>) -> NdStore<T> {
    let mut s = NdStore::new(params);
    for (i, g) in grads.into_iter().enumerate() {
        s.set_grad(i, g).unwrap();
    }
    s
}

/// Every value of every tensor of `slots`, slot after slot, as bits.
fn bits<T: Element>(s: &NdStore<T>, slots: &[Slot]) -> Vec<u64> {
    let mut seen = Vec::new();
    for &slot in slots {
        for i in 0..s.num_tensors() {
            let values = s.read(slot, i).unwrap().into_data();
            seen.extend(values.iter().map(|x| x.to_bits()));
        }
    }
    seen
}

/// Every element-wise operation of the store, with one coefficient for
/// every tensor; then every slot's values, in logical order, end to end.
fn exercise<T: Element>(s: &mut NdStore<T>) -> Vec<u64> {
    let n = s.num_tensors();
    let all = vec![true; n];
    let c = |x: f64| vec![T::from_f64_rounded(x); n];
    let b = Slot::Buffer(s.alloc_buffer().unwrap());
    let d = Slot::Buffer(s.alloc_buffer().unwrap());
    s.copy(b, Slot::Params, &all).unwrap();
    s.scale(Slot::Params, &c(-0.37), &all).unwrap();
    s.axpy(Slot::Params, &c(0.113), Slot::Grads, &all).unwrap();
    s.maximum(b, Slot::Params, &all).unwrap();
    s.clip_to_norms(b, &c(10.0), &c(3.3), &all).unwrap();
    s.addcmul(b, &c(0.7), Slot::Params, Slot::Grads, &all)
        .unwrap();
    // A positive denominator: the squares of the gradients, plus one.
    s.copy(d, Slot::Grads, &all).unwrap();
    s.addcmul(d, &c(1.0), Slot::Grads, Slot::Grads, &all)
        .unwrap();
    s.addcdiv_sqrt(Slot::Params, &c(-0.01), b, d, &c(0.9), &c(1e-3), &all)
        .unwrap();
    bits(s, &[Slot::Params, Slot::Grads, b, d])
}

fn threaded_matches_cut<T: Element>() {
    let (params, grads) = (big::<T>(0.37), big::<T>(0.53));
    let mut whole = store(params.clone(), grads.clone());
    let mut pieces = store(cut(&params), cut(&grads));
    assert!(pieces.num_tensors() > 500);
    assert!(
        exercise(&mut whole) == exercise(&mut pieces),
        "{}: threaded loops differ from the same loops on small tensors",
        T::DTYPE
    );
}

#[test]
fn f32_threaded_loops_give_the_bits_of_small_tensors() {
    threaded_matches_cut::<f32>();
}

#[test]
fn f64_threaded_loops_give_the_bits_of_small_tensors() {
    threaded_matches_cut::<f64>();
}

/// The finiteness check, shared over threads with an early exit, finds an
/// inf or NaN wherever it is, and none in a masked-out tensor.
#[test]
fn threaded_finiteness_check_finds_every_bad_value() {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        for tensor in [0, 1] {
            for at in [0, 4095, 4096, 150_001, 299_999] {
                let mut params = big::<f32>(0.2);
                *params[tensor].iter_mut().nth(at).unwrap() = bad;
                let mut s = NdStore::new(params);
                let context = format!("{bad} in tensor {tensor} at {at}");
                assert!(
                    !s.all_finite(Slot::Params, &[true, true]).unwrap(),
                    "{context}"
                );
                let mut mask = [true, true];
                mask[tensor] = false;
                assert!(
                    s.all_finite(Slot::Params, &mask).unwrap(),
                    "{context}: masked out"
                );
            }
        }
    }
}

/// The finiteness check on short tensors (every length up to 40, so the
/// elements past the last whole group of sixteen are checked too, and a
/// length past one block of 4096) finds an inf, a NaN or a negative
/// infinity wherever it is, and finite values of every sign pass.
#[test]
fn finiteness_check_finds_every_bad_value_in_short_tensors() {
    let lengths = (1..=40).chain([4096 + 17]);
    for n in lengths {
        let values: Vec<f64> = (0..n).map(|i| -1.5 + i as f64 * 0.25).collect();
        let tensor = ArrayD::from_shape_vec(vec![n], values.clone()).unwrap();
        let mut fine = NdStore::new(vec![tensor]);
        assert!(fine.all_finite(Slot::Params, &[true]).unwrap(), "n {n}");
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            for at in 0..n {
                let mut v = values.clone();
                v[at] = bad;
                let mut s = NdStore::new(vec![ArrayD::from_shape_vec(vec![n], v).unwrap()]);
                assert!(
                    !s.all_finite(Slot::Params, &[true]).unwrap(),
                    "{bad} at {at} of {n}"
                );
            }
        }
    }
}

/// The fused ascent step and `axpy_from` against the composed sequences on
/// large tensors, bit for bit: every combination of snapshot and δ, with
/// clipping, on the standard-layout tensor alone (the fused loops, split
/// over threads) and with the transposed one too (laid out unlike the
/// buffers: the composed sequence runs).
#[test]
fn fused_operations_on_large_tensors_match_the_composed_ones() {
    use amp_core::composed;
    let run = |fused: bool, snap: bool, keep_delta: bool, mask: [bool; 2]| {
        let mut s = store(big::<f32>(0.37), big::<f32>(0.53));
        let (b, d) = (
            Slot::Buffer(s.alloc_buffer().unwrap()),
            Slot::Buffer(s.alloc_buffer().unwrap()),
        );
        let (snapshot, delta) = (snap.then_some(b), keep_delta.then_some(d));
        let (z, eps, alpha) = ([0.7f32, 1.0], [5.0f32, 1e4], [-0.01f32, 0.3]);
        let norms = if fused {
            s.perturb_from_grads(snapshot, delta, &z, &eps, &mask)
                .unwrap()
        } else {
            composed::perturb_from_grads(&mut s, snapshot, delta, &z, &eps, &mask).unwrap()
        };
        let base = if snap { b } else { Slot::Params };
        if fused {
            s.axpy_from(d, base, &alpha, Slot::Params, &mask).unwrap();
        } else {
            composed::axpy_from(&mut s, d, base, &alpha, Slot::Params, &mask).unwrap();
        }
        // SGD's step: Nesterov momentum from the snapshot (first step), then
        // dampened momentum on θ itself; weight decay on the first tensor.
        // The gradients are unspecified after perturb_from_grads and after
        // each step: set again before each.
        let e = Slot::Buffer(s.alloc_buffer().unwrap());
        for (round, (mu, keep, nesterov)) in [(0.9f32, 1.0f32, true), (0.8, 0.75, false)]
            .into_iter()
            .enumerate()
        {
            let momentum = SgdMomentum {
                buffer: e,
                momentum: mu,
                keep,
                nesterov,
            };
            let coefficients: Vec<_> = [0.01f32, 0.0]
                .iter()
                .zip(alpha)
                .map(|(&weight_decay, step)| SgdCoefficients {
                    weight_decay,
                    step,
                    first: round == 0,
                })
                .collect();
            let weights = if round == 0 { b } else { Slot::Params };
            for (i, g) in big::<f32>(0.53 + round as f64).into_iter().enumerate() {
                s.set_grad(i, g).unwrap();
            }
            if fused {
                s.sgd_update(weights, Some(&momentum), &coefficients, &mask)
                    .unwrap();
            } else {
                composed::sgd_update(&mut s, weights, Some(&momentum), &coefficients, &mask)
                    .unwrap();
            }
        }
        let mut seen: Vec<u64> = norms.iter().map(|x| f64::from(*x).to_bits()).collect();
        seen.extend(bits(&s, &[Slot::Params, b, d, e]));
        seen
    };
    for mask in [[true, false], [true, true]] {
        for snap in [false, true] {
            for keep_delta in [false, true] {
                assert!(
                    run(true, snap, keep_delta, mask) == run(false, snap, keep_delta, mask),
                    "snapshot {snap}, delta {keep_delta}, mask {mask:?}"
                );
            }
        }
    }
}

/// The sums of squares behind `norms` and the fused ascent step are split
/// over rayon's threads at fixed blocks whose sums are added in order: the
/// same bits on one thread as on several, for a tensor of many blocks and a
/// ragged last one. (An order of additions that follows the split changes
/// the sums in their last bits; the square root halves that, so several
/// tensors are needed for it to show in the norms.)
#[test]
fn norms_give_the_same_bits_on_any_number_of_threads() {
    fn norms<T: Element>(threads: usize, seeds: usize) -> Vec<u64> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        // Each block of 2^16 elements of its own magnitude, so that the
        // order in which the blocks' sums are added shows in the bits.
        let n = 1_000_003;
        let values = |k: f64| {
            let v = (0..n).map(|i| {
                let scale = 2f64.powi(((i >> 16) * 7 % 13) as i32 * 3 - 18);
                T::from_f64_rounded((i as f64 * k).sin() * scale)
            });
            ArrayD::from_shape_vec(vec![n], v.collect()).unwrap()
        };
        let tensors: Vec<_> = (0..seeds).map(|k| values(0.3 + 0.1 * k as f64)).collect();
        let mask = vec![true; seeds];
        let mut s = store(tensors.clone(), tensors);
        pool.install(|| {
            let plain = s.norms(Slot::Grads, &mask).unwrap();
            let z = vec![T::from_f64_rounded(0.9); seeds];
            let eps = vec![T::from_f64_rounded(1.0); seeds];
            let fused = s.perturb_from_grads(None, None, &z, &eps, &mask).unwrap();
            [plain, fused]
                .iter()
                .flat_map(|norms| s.norms_to_host(norms).unwrap())
                .map(f64::to_bits)
                .collect()
        })
    }
    let (one_f32, one_f64) = (norms::<f32>(1, 2), norms::<f64>(1, 8));
    for threads in [2, 3, 5] {
        assert_eq!(one_f32, norms::<f32>(threads, 2), "f32, {threads} threads");
        assert_eq!(one_f64, norms::<f64>(threads, 8), "f64, {threads} threads");
    }
}

/// Two Adam steps (AdamW's shrink and Adam's L2 term, with and without
/// AMSGrad's maximum), each tensor with coefficients of its own and some
/// tensors masked out: over 600 short tensors — shared out over rayon's
/// threads — and over two large ones — each split over the threads — the
/// same bits as the composed sequence of store operations on 1 thread.
#[test]
fn adam_over_many_tensors_and_large_ones_matches_the_composed_step() {
    use amp_core::{composed, AdamCoefficients, AdamSlots};
    fn run(tensors: Vec<ArrayD<f32>>, fused: bool, amsgrad: bool, threads: usize) -> Vec<u64> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let n = tensors.len();
            let grads: Vec<_> = tensors.iter().map(|t| t.mapv(|x| x * 0.3 - 0.1)).collect();
            let mut s = store(tensors.clone(), grads.clone());
            let mut slot = || Slot::Buffer(s.alloc_buffer().unwrap());
            let slots = AdamSlots {
                exp_avg: slot(),
                exp_avg_sq: slot(),
                max_exp_avg_sq: amsgrad.then(&mut slot),
            };
            // Every seventh tensor masked out; the rest with coefficients
            // that differ from one tensor to the next.
            let mask: Vec<bool> = (0..n).map(|i| i % 7 != 3).collect();
            for t in 1..=2 {
                let coefficients: Vec<_> = (0..n)
                    .map(|i| {
                        let k = 1.0 + i as f32 * 1e-3;
                        AdamCoefficients {
                            shrink: 1.0 - 1e-3 * k,
                            l2: if i % 2 == 0 { 0.0 } else { 1e-2 * k },
                            beta1: (0.9, 0.1),
                            beta2: (0.999, 0.001),
                            step: -1e-3 * k / (1.0 - 0.9f32.powi(t)),
                            divisor: (1.0 - 0.999f32.powi(t)).sqrt(),
                            eps: 1e-8 * k,
                        }
                    })
                    .collect();
                if fused {
                    s.adam_update(slots, &coefficients, &mask).unwrap();
                } else {
                    composed::adam_update(&mut s, slots, &coefficients, &mask).unwrap();
                }
                for (i, g) in grads.iter().enumerate() {
                    s.set_grad(i, g.mapv(|x| x * -0.7 + 0.05)).unwrap();
                }
            }
            let mut read = vec![Slot::Params, slots.exp_avg, slots.exp_avg_sq];
            read.extend(slots.max_exp_avg_sq);
            bits(&s, &read)
        })
    }
    let whole = big::<f32>(0.29);
    let pieces = cut(&whole);
    assert!(pieces.len() > 500);
    for amsgrad in [false, true] {
        for tensors in [&whole, &pieces] {
            let reference = run(tensors.clone(), false, amsgrad, 1);
            for threads in [1, 2, 5] {
                assert!(
                    run(tensors.clone(), true, amsgrad, threads) == reference,
                    "{} tensors, AMSGrad {amsgrad}, {threads} threads",
                    tensors.len()
                );
            }
        }
    }
}
