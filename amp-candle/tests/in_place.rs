//! On the CPU, an `f32` or `f64` store writes its results into existing
//! storage. These tests check that this changes nothing but memory traffic:
//! whole training runs give the bits of the allocating store
//! ([`CandleStore::allocating`]), and no tensor the caller holds changes
//! behind its back.
mod common;

use amp_candle::candle_core::{Device, Tensor};
use amp_candle::CandleStore;
use amp_core::{
    Adam, AdamConfig, Amp, AmpConfig, AmpError, BaseOptimizer, DType, HostTensor, LossScaleConfig,
    ParamStore, Pass, RestoreMode, Sgd, SgdConfig, Slot,
};

/// How the closure hands its gradients over.
#[derive(Clone, Copy, Debug)]
enum Grads {
    /// Written from the host: tensors the store makes (and may update in
    /// place from the first operation on).
    Written,
    /// Tensors the test made and keeps (`set_grad`): never written in place.
    Handed,
}

/// The weights and the base optimiser's buffers after `steps` steps of
/// `config` on the quartic loss.
fn train<O: BaseOptimizer<CandleStore>>(
    store: CandleStore,
    config: &AmpConfig,
    base: O,
    grads: Grads,
    steps: usize,
) -> Vec<HostTensor> {
    let mut amp = Amp::new(store, config.clone(), base).unwrap();
    let mut handed: Vec<(Tensor, HostTensor)> = Vec::new();
    for _ in 0..steps {
        amp.step(|s: &mut CandleStore, pass: Pass| {
            let out = common::quartic(s, pass)?;
            if let Grads::Handed = grads {
                for i in (0..s.num_tensors()).filter(|&i| i != common::NO_GRAD) {
                    let host = s.read(Slot::Grads, i)?;
                    let data: Vec<f64> = host.data().to_vec();
                    let t = Tensor::from_vec(data, host.shape().to_vec(), s.device())
                        .and_then(|t| t.to_dtype(s.candle_dtype()))
                        .map_err(AmpError::backend)?;
                    s.set_grad(i, &t)?;
                    handed.push((t, host));
                }
            }
            Ok::<_, AmpError>(out)
        })
        .unwrap();
    }
    // The tensors handed over are as the test made them.
    for (t, host) in &handed {
        let now: Vec<f64> = t
            .to_dtype(amp_candle::candle_core::DType::F64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .unwrap();
        let then: Vec<f64> = host.data().to_vec();
        assert_eq!(now, then, "a gradient handed to the store changed");
    }
    let state = amp.base().save_state(amp.store()).unwrap();
    let store = amp.store();
    let mut out: Vec<HostTensor> = (0..store.num_tensors())
        .map(|i| store.read(Slot::Params, i).unwrap())
        .collect();
    for (_, tensors) in state.buffers {
        out.extend(tensors.into_iter().flatten());
    }
    out
}

fn bits(tensors: &[HostTensor]) -> Vec<Vec<u64>> {
    tensors
        .iter()
        .map(|t| t.data().iter().map(|x| x.to_bits()).collect())
        .collect()
}

fn configs() -> Vec<AmpConfig> {
    let mut out = Vec::new();
    for restore in [RestoreMode::Copy, RestoreMode::Subtract] {
        for (inner_iter, inner_lr, epsilon) in [(1, 1.0, 0.05), (2, 0.5, 50.0), (1, 0.7, 0.3)] {
            out.push(
                AmpConfig::new(0.1, epsilon)
                    .inner_iter(inner_iter)
                    .inner_lr(inner_lr)
                    .weight_decay(1e-2)
                    .restore(restore),
            );
        }
    }
    out
}

#[test]
fn in_place_gives_the_bits_of_the_allocating_store() {
    for dtype in [DType::F32, DType::F64] {
        let init = common::initial_weights(dtype);
        let store = || CandleStore::from_host(&init, &Device::Cpu).unwrap();
        for config in configs() {
            for grads in [Grads::Written, Grads::Handed] {
                let what = format!("{dtype:?} {grads:?} {config:?}");
                let sgd = || Sgd::new(SgdConfig::nesterov(0.9)).unwrap();
                let a = train(store(), &config, sgd(), grads, 4);
                let b = train(store().allocating(), &config, sgd(), grads, 4);
                assert_eq!(bits(&a), bits(&b), "SGD, {what}");
                let adam = || Adam::new(AdamConfig::adamw().amsgrad(true)).unwrap();
                let a = train(store(), &config, adam(), grads, 4);
                let b = train(store().allocating(), &config, adam(), grads, 4);
                assert_eq!(bits(&a), bits(&b), "Adam, {what}");
                let plain = || Adam::new(AdamConfig::adam().eps(1e-3)).unwrap();
                let a = train(store(), &config, plain(), grads, 4);
                let b = train(store().allocating(), &config, plain(), grads, 4);
                assert_eq!(bits(&a), bits(&b), "Adam (L2), {what}");
            }
        }
    }
}

/// Every form of the SGD step's coefficients — lr 1 (a step of −1),
/// weight decay 1 and 0, momentum and none, dampening 0 and 0.5, Nesterov
/// and not, θ from AMP's snapshot (copy restore) and from θ itself
/// (subtract restore) — gives the bits of the allocating store: the fused
/// kernels pick their loop by coefficient (±1 are added apart), and each
/// loop is checked here.
#[test]
fn every_form_of_the_sgd_coefficients_gives_the_same_bits() {
    for dtype in [DType::F32, DType::F64] {
        let init = common::initial_weights(dtype);
        let store = || CandleStore::from_host(&init, &Device::Cpu).unwrap();
        for (lr, weight_decay) in [(1.0, 1.0), (0.1, 0.0), (1.0, 0.0)] {
            for (momentum, dampening, nesterov) in [
                (0.9, 0.0, true),
                (0.9, 0.5, false),
                (0.5, 0.0, false),
                (0.0, 0.0, false),
            ] {
                for restore in [RestoreMode::Copy, RestoreMode::Subtract] {
                    let config = AmpConfig::new(lr, 0.3)
                        .inner_lr(0.7)
                        .weight_decay(weight_decay)
                        .restore(restore);
                    let sgd = SgdConfig {
                        momentum,
                        dampening,
                        nesterov,
                    };
                    let what = format!("{dtype:?} {config:?} {sgd:?}");
                    let a = train(store(), &config, Sgd::new(sgd).unwrap(), Grads::Written, 3);
                    let b = train(
                        store().allocating(),
                        &config,
                        Sgd::new(sgd).unwrap(),
                        Grads::Written,
                        3,
                    );
                    assert_eq!(bits(&a), bits(&b), "{what}");
                }
            }
        }
    }
}

/// Tensors long enough for the loops to be split over threads (from 2^18
/// elements on, in blocks of 2^16: here a partial last block), and many
/// short tensors holding more than 2^18 elements between them (run over
/// threads tensor by tensor), give the same bits too.
#[test]
fn loops_split_over_threads_give_the_same_bits() {
    let n = (1 << 18) + 12_345;
    let long = vec![
        HostTensor::new(vec![n], DType::F32, common::values(7, n)).unwrap(),
        HostTensor::new(vec![3, 4], DType::F32, common::values(8, 12)).unwrap(),
    ];
    let many: Vec<HostTensor> = (0..40)
        .map(|i| HostTensor::new(vec![80, 100], DType::F32, common::values(i, 8000)).unwrap())
        .collect();
    for init in [long, many] {
        split_runs_match(&init);
    }
}

fn split_runs_match(init: &[HostTensor]) {
    let store = || CandleStore::from_host(init, &Device::Cpu).unwrap();
    let config = AmpConfig::new(0.1, 0.3).inner_lr(0.7).weight_decay(1e-2);
    for grads in [Grads::Written, Grads::Handed] {
        let sgd = || Sgd::new(SgdConfig::nesterov(0.9)).unwrap();
        let a = train(store(), &config, sgd(), grads, 2);
        let b = train(store().allocating(), &config, sgd(), grads, 2);
        assert!(bits(&a) == bits(&b), "SGD, {grads:?}");
        let adam = || Adam::new(AdamConfig::adamw().amsgrad(true)).unwrap();
        let a = train(store(), &config, adam(), grads, 2);
        let b = train(store().allocating(), &config, adam(), grads, 2);
        assert!(bits(&a) == bits(&b), "Adam, {grads:?}");
    }
}

/// A copy gives the destination its own storage: updating either in place
/// afterwards leaves the other as it was.
#[test]
fn a_copy_owns_its_storage() {
    let mut store =
        CandleStore::from_host(&common::initial_weights(DType::F32), &Device::Cpu).unwrap();
    let n = store.num_tensors();
    let mask = vec![true; n];
    let b = store.alloc_buffer().unwrap();
    for i in 0..n {
        let theta = store.read(Slot::Params, i).unwrap();
        store.write(Slot::Buffer(b), i, &theta).unwrap();
    }
    let theta: Vec<HostTensor> = (0..n)
        .map(|i| store.read(Slot::Params, i).unwrap())
        .collect();
    // Into gradients the caller handed over (which the store must not
    // write into), replacing them.
    for i in 0..n {
        let handed = Tensor::zeros(store.vars()[i].shape(), store.candle_dtype(), &Device::Cpu);
        store.set_grad(i, &handed.unwrap()).unwrap();
    }
    store.copy(Slot::Grads, Slot::Buffer(b), &mask).unwrap();
    store.scale(Slot::Buffer(b), &vec![4.0; n], &mask).unwrap();
    store.scale(Slot::Grads, &vec![2.0; n], &mask).unwrap();
    for (i, t) in theta.iter().enumerate() {
        let times = |k: f64| t.data().iter().map(|x| k * x).collect::<Vec<f64>>();
        assert_eq!(store.read(Slot::Grads, i).unwrap().data(), &times(2.0)[..]);
        assert_eq!(
            store.read(Slot::Buffer(b), i).unwrap().data(),
            &times(4.0)[..]
        );
    }
}

/// The scan for non-finite values finds one wherever it sits (inside the
/// vectorised blocks, in the remainder, past the first chunk) and is not
/// fooled by large finite values.
#[test]
fn all_finite_finds_every_non_finite_value() {
    for n in [1usize, 15, 16, 17, 4096, 5000, (1 << 18) + 5] {
        for dtype in [DType::F32, DType::F64] {
            let big = if dtype == DType::F32 {
                f32::MAX as f64
            } else {
                f64::MAX
            };
            let values: Vec<f64> = (0..n)
                .map(|j| if j % 3 == 0 { big } else { -1.5 })
                .collect();
            let host = HostTensor::new(vec![n], dtype, values.clone()).unwrap();
            let mut store = CandleStore::from_host(&[host], &Device::Cpu).unwrap();
            assert!(
                store.all_finite(Slot::Params, &[true]).unwrap(),
                "{dtype:?} n {n}"
            );
            for at in [0, n / 2, n - 1] {
                for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
                    let mut v = values.clone();
                    v[at] = bad;
                    let host = HostTensor::new(vec![n], dtype, v).unwrap();
                    store.write(Slot::Params, 0, &host).unwrap();
                    let finite = store.all_finite(Slot::Params, &[true]).unwrap();
                    assert!(!finite, "{dtype:?} n {n}: {bad} at {at}");
                }
            }
        }
    }
}

/// The address of a tensor's storage (equal for tensors sharing it).
fn storage_of(t: &Tensor) -> usize {
    let (storage, _) = t.storage_and_layout();
    std::ptr::from_ref(&*storage) as usize
}

/// One step of AMP with loss scaling (whose unscaling divides each pass's
/// gradient in place) over SGD on a one-tensor store whose closure hands
/// over `grad(pass)`.
fn step_handing(amp: &mut Amp<CandleStore, Sgd>, grad: &mut dyn FnMut(&CandleStore) -> Tensor) {
    amp.step(|s: &mut CandleStore, _pass: Pass| {
        let g = grad(s);
        s.set_grad(0, &g)?;
        Ok::<_, AmpError>(((), 1.0))
    })
    .unwrap();
}

fn one_tensor_amp(store: CandleStore) -> Amp<CandleStore, Sgd> {
    let config = AmpConfig::new(0.1, 0.05)
        .weight_decay(1e-2)
        .loss_scale(LossScaleConfig::default().init_scale(4.0));
    Amp::new(store, config, Sgd::new(SgdConfig::nesterov(0.9)).unwrap()).unwrap()
}

/// The first write into a gradient taken from the caller lands in the
/// storage of a gradient the store made in an earlier step (its spare),
/// not in freshly allocated memory: the gradient after a second step is
/// the storage of the first one, which a clone keeps alive (so that a new
/// allocation cannot take its address).
#[test]
fn gradients_written_in_place_reuse_the_storage_of_earlier_steps() {
    let init = [HostTensor::new(vec![4, 5], DType::F32, common::values(3, 20)).unwrap()];
    let mut amp = one_tensor_amp(CandleStore::from_host(&init, &Device::Cpu).unwrap());
    let handed = Tensor::full(0.25f32, (4, 5), &Device::Cpu).unwrap();
    step_handing(&mut amp, &mut |_| handed.clone());
    let first = amp.store().grad(0).unwrap().clone();
    assert_ne!(storage_of(&first), storage_of(&handed), "not written");
    step_handing(&mut amp, &mut |_| handed.clone());
    let second = amp.store().grad(0).unwrap();
    assert_eq!(storage_of(second), storage_of(&first));
    // The allocating store allocates instead.
    let store = CandleStore::from_host(&init, &Device::Cpu).unwrap();
    let mut amp = one_tensor_amp(store.allocating());
    step_handing(&mut amp, &mut |_| handed.clone());
    let first = amp.store().grad(0).unwrap().clone();
    step_handing(&mut amp, &mut |_| handed.clone());
    assert_ne!(storage_of(amp.store().grad(0).unwrap()), storage_of(&first));
}

/// A gradient the store made, handed back to it by the caller in the next
/// step, shares its storage with the store's spare: the store must neither
/// write into it nor copy it onto itself. The steps give the bits of the
/// allocating store handed the same values (what a gradient holds after a
/// step is left open by the store contract, so the allocating store is
/// handed a copy of the in-place store's).
#[test]
fn a_gradient_handed_back_is_not_written() {
    let init = [HostTensor::new(vec![6], DType::F64, common::values(5, 6)).unwrap()];
    let mut in_place = one_tensor_amp(CandleStore::from_host(&init, &Device::Cpu).unwrap());
    let store = CandleStore::from_host(&init, &Device::Cpu).unwrap();
    let mut allocating = one_tensor_amp(store.allocating());
    let start = Tensor::full(0.5f64, 6, &Device::Cpu).unwrap();
    step_handing(&mut in_place, &mut |_| start.clone());
    step_handing(&mut allocating, &mut |_| start.clone());
    for _ in 0..3 {
        // The store's gradient of the last step, handed back in each pass
        // of this one.
        let held = in_place.store().grad(0).unwrap().clone();
        let before = held.to_vec1::<f64>().unwrap();
        let copy = Tensor::new(before.as_slice(), &Device::Cpu).unwrap();
        step_handing(&mut in_place, &mut |_| held.clone());
        assert_eq!(held.to_vec1::<f64>().unwrap(), before, "written");
        step_handing(&mut allocating, &mut |_| copy.clone());
        let read = |amp: &Amp<CandleStore, Sgd>| amp.store().read(Slot::Params, 0).unwrap();
        assert_eq!(bits(&[read(&in_place)]), bits(&[read(&allocating)]));
    }
}

/// A gradient handed over in a layout that is not contiguous (a transposed
/// view) is taken in a contiguous copy: the operations that read it in
/// place (copy into a buffer, axpy, SGD's fused step) give the allocating
/// store's bits, and the tensor handed over is left as it was.
#[test]
fn a_gradient_that_is_not_contiguous_is_taken_contiguous() {
    let init = [HostTensor::new(vec![4, 5], DType::F32, common::values(9, 20)).unwrap()];
    let handed = Tensor::from_vec(common::values(4, 20), (5, 4), &Device::Cpu)
        .and_then(|t| t.to_dtype(amp_candle::candle_core::DType::F32))
        .and_then(|t| t.t())
        .unwrap();
    assert!(!handed.is_contiguous());
    let before = handed.to_vec2::<f32>().unwrap();
    let run = |mut store: CandleStore| -> Vec<HostTensor> {
        store.set_grad(0, &handed).unwrap();
        let b = Slot::Buffer(store.alloc_buffer().unwrap());
        store.copy(b, Slot::Grads, &[true]).unwrap();
        store
            .axpy(Slot::Params, &[0.5], Slot::Grads, &[true])
            .unwrap();
        let momentum = amp_core::SgdMomentum {
            buffer: b,
            momentum: 0.9,
            keep: 1.0,
            nesterov: true,
        };
        let c = amp_core::SgdCoefficients {
            weight_decay: 0.01,
            step: -0.1,
            first: false,
        };
        store
            .sgd_update(Slot::Params, Some(&momentum), &[c], &[true])
            .unwrap();
        vec![
            store.read(Slot::Params, 0).unwrap(),
            store.read(b, 0).unwrap(),
        ]
    };
    let a = run(CandleStore::from_host(&init, &Device::Cpu).unwrap());
    let b = run(CandleStore::from_host(&init, &Device::Cpu)
        .unwrap()
        .allocating());
    assert_eq!(bits(&a), bits(&b));
    assert_eq!(handed.to_vec2::<f32>().unwrap(), before);
}

/// The fused Adam step on values that are not finite (a NaN and an
/// infinity in the gradient, a NaN already in AMSGrad's maximum) gives the
/// allocating store's bits: θ, both moments and the maximum, with L2 and
/// decoupled decay.
#[test]
fn adam_on_values_that_are_not_finite_gives_the_same_bits() {
    let n = 6;
    let theta = HostTensor::new(vec![n], DType::F32, common::values(11, n)).unwrap();
    let grad = HostTensor::new(
        vec![n],
        DType::F32,
        vec![0.5, f64::NAN, -0.25, f64::INFINITY, 1e-3, -2.0],
    )
    .unwrap();
    let max =
        HostTensor::new(vec![n], DType::F32, vec![0.1, 0.2, f64::NAN, 0.0, 0.3, 4.0]).unwrap();
    let run = |mut store: CandleStore, shrink: f64, l2: f64| -> Vec<HostTensor> {
        store.write(Slot::Grads, 0, &grad).unwrap();
        let slots = amp_core::AdamSlots {
            exp_avg: Slot::Buffer(store.alloc_buffer().unwrap()),
            exp_avg_sq: Slot::Buffer(store.alloc_buffer().unwrap()),
            max_exp_avg_sq: Some(Slot::Buffer(store.alloc_buffer().unwrap())),
        };
        store.write(slots.exp_avg_sq, 0, &theta).unwrap();
        store.write(slots.max_exp_avg_sq.unwrap(), 0, &max).unwrap();
        let c = amp_core::AdamCoefficients {
            shrink,
            l2,
            beta1: (0.9, 0.1),
            beta2: (0.999, 1.0 - 0.999),
            step: -0.01,
            divisor: 0.3,
            eps: 1e-8,
        };
        store.adam_update(slots, &[c], &[true]).unwrap();
        let mut out = vec![store.read(Slot::Params, 0).unwrap()];
        for slot in [
            slots.exp_avg,
            slots.exp_avg_sq,
            slots.max_exp_avg_sq.unwrap(),
        ] {
            out.push(store.read(slot, 0).unwrap());
        }
        out
    };
    for (shrink, l2) in [(1.0, 0.0), (0.999, 0.0), (1.0, 0.01)] {
        let store = || CandleStore::from_host(std::slice::from_ref(&theta), &Device::Cpu).unwrap();
        let a = run(store(), shrink, l2);
        let b = run(store().allocating(), shrink, l2);
        assert_eq!(bits(&a), bits(&b), "shrink {shrink}, l2 {l2}");
    }
}

/// A mask that selects tensors without a gradient (read as zeros): the
/// fused SGD and Adam steps and AMP's fused first ascent run the others in
/// place and those through the composed sequences, with the allocating
/// store's bits for θ, the optimisers' buffers and the snapshot — over
/// three steps, so the buffers and the snapshot are written in place from
/// the second on.
#[test]
fn a_mask_with_missing_gradients_gives_the_same_bits() {
    for dtype in [DType::F32, DType::F64] {
        let init = common::initial_weights(dtype);
        let n = init.len();
        let run = |mut store: CandleStore| -> Vec<HostTensor> {
            let buffer = Slot::Buffer(store.alloc_buffer().unwrap());
            let snapshot = Slot::Buffer(store.alloc_buffer().unwrap());
            let mut buffer_slot = || Slot::Buffer(store.alloc_buffer().unwrap());
            let adam = amp_core::AdamSlots {
                exp_avg: buffer_slot(),
                exp_avg_sq: buffer_slot(),
                max_exp_avg_sq: Some(buffer_slot()),
            };
            let momentum = amp_core::SgdMomentum {
                buffer,
                momentum: 0.9,
                keep: 1.0,
                nesterov: true,
            };
            // The gradients of pass `pass` of step `step`: none for tensor
            // `step` and the frozen one. (AMP's ascent leaves the gradients
            // undefined; the update reads a new pass's.)
            let grads = |store: &mut CandleStore, step: usize, pass: u64| {
                store.zero_grads().unwrap();
                for i in (0..n).filter(|&i| i != step && i != common::NO_GRAD) {
                    let seed = 40 + 10 * pass + (step * n + i) as u64;
                    let values = common::values(seed, init[i].data().len());
                    let grad = HostTensor::new(init[i].shape().to_vec(), dtype, values).unwrap();
                    store.write(Slot::Grads, i, &grad).unwrap();
                }
            };
            for step in 0..3 {
                let all = vec![true; n];
                grads(&mut store, step, 0);
                store
                    .perturb_from_grads(Some(snapshot), None, &vec![0.5; n], &vec![0.3; n], &all)
                    .unwrap();
                grads(&mut store, step, 1);
                let c = amp_core::SgdCoefficients {
                    weight_decay: 0.01,
                    step: -0.1,
                    first: step == 0,
                };
                store
                    .sgd_update(snapshot, Some(&momentum), &vec![c; n], &all)
                    .unwrap();
                grads(&mut store, step, 2);
                let c = amp_core::AdamCoefficients {
                    shrink: 0.999,
                    l2: 0.01,
                    beta1: (0.9, 0.1),
                    beta2: (0.999, 1.0 - 0.999),
                    step: -0.01,
                    divisor: 0.3,
                    eps: 1e-8,
                };
                store.adam_update(adam, &vec![c; n], &all).unwrap();
            }
            let slots = [
                Slot::Params,
                buffer,
                snapshot,
                adam.exp_avg,
                adam.exp_avg_sq,
            ];
            let read = |(slot, i)| store.read(slot, i).unwrap();
            (slots.into_iter())
                .flat_map(|slot| (0..n).map(move |i| (slot, i)))
                .map(read)
                .collect()
        };
        let store = || CandleStore::from_host(&init, &Device::Cpu).unwrap();
        assert_eq!(
            bits(&run(store())),
            bits(&run(store().allocating())),
            "{dtype:?}"
        );
    }
}
