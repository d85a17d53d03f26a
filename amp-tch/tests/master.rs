//! Master weights for half-precision models
//! (`TchStore::with_master_weights`): updates below the variables' ulp are
//! kept, the model sees θ + δ and θ in its own kind, its autograd gradients
//! are widened after each closure call, and what cannot work is refused.
//! On the CPU, and on CUDA when libtorch sees a GPU.

mod common;

use amp_core::{
    Amp, AmpConfig, AmpError, DType, HostTensor, LossScaleConfig, ParamStore, Pass, SgdConfig, Slot,
};
use amp_tch::TchStore;
use tch::{Device, Kind, Tensor};

fn devices(test: &str) -> Vec<Device> {
    let mut devices = vec![Device::Cpu];
    devices.extend(common::cuda_or_skip(test));
    devices
}

fn half_leaf(values: &[f32], kind: Kind, device: Device) -> Tensor {
    Tensor::from_slice(values)
        .to_kind(kind)
        .to_device(device)
        .set_requires_grad(true)
}

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(&t.to_kind(Kind::Float).to_device(Device::Cpu)).unwrap()
}

/// `x` rounded to `kind`, as libtorch rounds it.
fn rounded(x: &[f64], kind: Kind) -> Vec<f32> {
    let t = Tensor::from_slice(x).to_kind(Kind::Float).to_kind(kind);
    values(&t)
}

/// 100 plain SGD steps of lr 1e-4 on a constant gradient of 1 from
/// θ = (1, −2): the variables and the store's θ at the end.
fn hundred_small_steps(master: bool, kind: Kind, device: Device) -> (Vec<f32>, Vec<f64>) {
    let w = half_leaf(&[1.0, -2.0], kind, device);
    let mut store = TchStore::from_tensors(vec![w.shallow_clone()]).unwrap();
    if master {
        store = store.with_master_weights().unwrap();
    }
    let config = AmpConfig::new(1e-4, 0.0).inner_iter(0);
    let mut amp = Amp::sgd(store, config, SgdConfig::default()).unwrap();
    for _ in 0..100 {
        amp.step(|s: &mut TchStore, _pass: Pass| {
            // The loss Σθ on the model's own variables: a gradient of 1.
            let loss = s.tensors()[0].sum(Kind::Float);
            loss.backward();
            Ok::<_, AmpError>(((), loss.double_value(&[])))
        })
        .unwrap();
    }
    let theta = amp.store().read(Slot::Params, 0).unwrap().into_data();
    (values(&w), theta)
}

#[test]
fn updates_below_the_ulp_are_kept_by_the_master_weights_and_lost_without() {
    for device in devices("updates_below_the_ulp_are_kept_by_the_master_weights") {
        for kind in [Kind::BFloat16, Kind::Half] {
            let (vars, theta) = hundred_small_steps(false, kind, device);
            if kind == Kind::BFloat16 {
                // bf16 has 8 significant bits: 1 − 1e-4 rounds back to 1.
                assert_eq!(vars, [1.0, -2.0], "{device:?}");
                assert_eq!(theta, [1.0, -2.0]);
            }
            // With master weights the f32 copy takes every step (rounded as
            // f32 arithmetic rounds it) and the variable follows, rounded.
            let (vars, theta) = hundred_small_steps(true, kind, device);
            let mut want = [1.0f32, -2.0];
            for _ in 0..100 {
                for w in &mut want {
                    *w += -1e-4f32;
                }
            }
            let got: Vec<f32> = theta.iter().map(|&x| x as f32).collect();
            for (g, w) in got.iter().zip(want) {
                assert!(
                    (g - w).abs() <= 2.0 * f32::EPSILON * w.abs(),
                    "{got:?} {want:?}"
                );
            }
            assert!((theta[0] - 0.99).abs() < 1e-5, "{theta:?}");
            assert_eq!(vars, rounded(&theta, kind), "{device:?} {kind:?}");
        }
    }
}

#[test]
fn the_model_sees_theta_plus_delta_and_theta_in_its_kind_and_its_grads_are_widened() {
    for device in devices("the_model_sees_theta_plus_delta_and_theta_in_its_kind") {
        let w = half_leaf(&[0.3, -1.7, 2.5], Kind::BFloat16, device);
        let store = TchStore::from_tensors(vec![w.shallow_clone()])
            .unwrap()
            .with_master_weights()
            .unwrap();
        assert_eq!(store.tensors()[0].kind(), Kind::BFloat16);
        assert_eq!(store.master_tensors()[0].kind(), Kind::Float);
        // After a backward pass the store's gradient is the model's,
        // widened to f32; before it, there is none.
        let mut store = store;
        store.zero_grads().unwrap();
        (store.tensors()[0].square().sum(Kind::Float) * 3.0).backward();
        let model_grad = values(&w.grad());
        assert_eq!(store.grad_mask().unwrap(), [false]);
        store.collect_grads().unwrap();
        assert_eq!(store.grad_mask().unwrap(), [true]);
        let grad = store.grad(0).unwrap().expect("a gradient");
        assert_eq!(grad.kind(), Kind::Float);
        assert_eq!(values(&grad), model_grad);
        // Collected gradients leave the model: collecting again adds nothing,
        // and a second backward pass adds to what was collected.
        assert!(!w.grad().defined());
        store.collect_grads().unwrap();
        assert_eq!(values(&store.grad(0).unwrap().unwrap()), model_grad);
        (store.tensors()[0].square().sum(Kind::Float) * 3.0).backward();
        store.collect_grads().unwrap();
        let twice: Vec<f32> = model_grad.iter().map(|g| 2.0 * g).collect();
        assert_eq!(values(&store.grad(0).unwrap().unwrap()), twice);
        let config = AmpConfig::new(0.01, 0.1).inner_iter(2);
        let mut amp = Amp::sgd(store, config, SgdConfig::nesterov(0.9)).unwrap();
        for _ in 0..3 {
            let mut seen = Vec::new();
            amp.step(|s: &mut TchStore, pass: Pass| {
                // What the model holds against the master copy it came from.
                let master = s.read(Slot::Params, 0)?.into_data();
                seen.push((pass, values(&w) == rounded(&master, Kind::BFloat16)));
                // L = Σ θ², computed by the bf16 model: its gradient 2θ in bf16.
                let loss = s.tensors()[0].square().sum(Kind::Float);
                loss.backward();
                Ok::<_, AmpError>(((), loss.double_value(&[])))
            })
            .unwrap();
            assert_eq!(seen.len(), 3);
            assert!(seen.iter().all(|(_, same)| *same), "{seen:?}");
            // Between steps the model holds the new θ.
            let master = amp.store().read(Slot::Params, 0).unwrap().into_data();
            assert_eq!(values(&w), rounded(&master, Kind::BFloat16));
        }
    }
}

#[test]
fn a_loss_scale_divides_the_widened_gradients_and_an_overflow_skips_the_step() {
    for device in devices("a_loss_scale_divides_the_widened_gradients") {
        let run = |with_scale: bool, clip: bool| {
            let w = half_leaf(&[0.75, -0.5, 1.25], Kind::BFloat16, device);
            let store = TchStore::from_tensors(vec![w])
                .unwrap()
                .with_master_weights()
                .unwrap();
            let mut config = AmpConfig::new(0.05, 0.2).inner_iter(1);
            if with_scale {
                config = config.loss_scale(LossScaleConfig::default().init_scale(1024.0));
            }
            let mut amp = Amp::sgd(store, config, SgdConfig::nesterov(0.9)).unwrap();
            let handle = amp.loss_scale();
            for _ in 0..5 {
                amp.step(|s: &mut TchStore, _pass: Pass| {
                    let c = Tensor::from_slice(&[1.0f32, 4.0, 0.5]).to_device(s.device());
                    let loss = (s.tensors()[0].to_kind(Kind::Float).square() * c).sum(Kind::Float);
                    let factor = handle.as_ref().map_or(1.0, |h| h.scale());
                    (&loss * factor).backward();
                    if clip {
                        // Clipping sees unscaled gradients: unscale first
                        // (which collects the model's gradients).
                        if let Some(handle) = &handle {
                            handle.unscale_grads(s)?;
                        }
                        s.clip_grads_to_norm(4.0)?;
                    }
                    Ok::<_, AmpError>(((), loss.double_value(&[])))
                })
                .unwrap();
            }
            amp.store().read(Slot::Params, 0).unwrap().into_data()
        };
        // Scaling by a power of two and dividing again is exact in f32 (the
        // bf16 gradient times 1024 is exact too), so the runs agree bit for
        // bit, with clipping inside the closure too.
        for clip in [false, true] {
            assert_eq!(run(true, clip), run(false, clip), "{device:?} clip {clip}");
        }
        assert_ne!(run(true, true), run(true, false));

        // An infinite gradient on the model skips the step: θ, the model
        // and the scale's backoff as for any store.
        let w = half_leaf(&[0.75, -0.5, 1.25], Kind::BFloat16, device);
        let store = TchStore::from_tensors(vec![w.shallow_clone()])
            .unwrap()
            .with_master_weights()
            .unwrap();
        let config = AmpConfig::new(0.05, 0.2)
            .inner_iter(1)
            .loss_scale(LossScaleConfig::default().init_scale(1024.0));
        let mut amp = Amp::sgd(store, config, SgdConfig::nesterov(0.9)).unwrap();
        let before = values(&w);
        let report = amp
            .step(|s: &mut TchStore, pass: Pass| {
                let loss = s.tensors()[0]
                    .to_kind(Kind::Float)
                    .square()
                    .sum(Kind::Float);
                let factor = if pass.is_perturbed() {
                    f64::INFINITY
                } else {
                    1.0
                };
                (&loss * factor).backward();
                Ok::<_, AmpError>(((), loss.double_value(&[])))
            })
            .unwrap();
        assert!(report.skipped.is_some());
        assert_eq!(values(&w), before);
        assert_eq!(amp.loss_scale().unwrap().scale(), 512.0);
    }
}

#[test]
fn master_weights_are_refused_where_they_cannot_work() {
    let f32_leaf = Tensor::ones([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let refused = TchStore::from_tensors(vec![f32_leaf])
        .unwrap()
        .with_master_weights();
    assert!(matches!(refused, Err(AmpError::InvalidConfig { .. })));
    let bf16 = || half_leaf(&[1.0], Kind::BFloat16, Device::Cpu);
    let mut store = TchStore::from_tensors(vec![bf16()]).unwrap();
    store.alloc_buffer().unwrap();
    assert!(matches!(
        store.with_master_weights(),
        Err(AmpError::InvalidConfig { .. })
    ));
    let mut flat = TchStore::from_tensors(vec![bf16()]).unwrap();
    flat.flatten().unwrap();
    assert!(matches!(
        flat.with_master_weights(),
        Err(AmpError::InvalidConfig { .. })
    ));
    let mut store = TchStore::from_tensors(vec![bf16()])
        .unwrap()
        .with_master_weights()
        .unwrap();
    assert!(matches!(
        store.flatten(),
        Err(AmpError::InvalidConfig { .. })
    ));
    assert!(store.has_master_weights());
    assert_eq!(store.dtype(), DType::F32);
    assert_eq!(store.model_kind(), Kind::BFloat16);
    // A hand-set gradient is an f32 one, of the master copy.
    assert!(store
        .set_grad(0, &Tensor::ones([1], (Kind::BFloat16, Device::Cpu)))
        .is_err());
    store
        .set_grad(0, &Tensor::ones([1], (Kind::Float, Device::Cpu)))
        .unwrap();
    store
        .write(
            Slot::Params,
            0,
            &HostTensor::new(vec![1], DType::F32, vec![0.1]).unwrap(),
        )
        .unwrap();
    // The write reached the model, rounded.
    assert_eq!(values(&store.tensors()[0]), rounded(&[0.1], Kind::BFloat16));
    assert_eq!(store.read(Slot::Params, 0).unwrap().data(), [0.1f32 as f64]);
}
