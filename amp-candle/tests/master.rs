//! Master weights for half-precision models
//! (`CandleStore::with_master_weights`): updates below the vars' ulp are
//! kept, the model sees θ + δ and θ in its own dtype, its gradients are
//! widened, and what cannot work is refused.

use amp_candle::candle_core::{DType as CDType, Device, Tensor, Var};
use amp_candle::CandleStore;
use amp_core::{Amp, AmpConfig, AmpError, DType, HostTensor, ParamStore, Pass, SgdConfig, Slot};

fn bf16_var(values: &[f32]) -> Var {
    let t = Tensor::from_slice(values, values.len(), &Device::Cpu)
        .and_then(|t| t.to_dtype(CDType::BF16))
        .unwrap();
    Var::from_tensor(&t).unwrap()
}

fn var_values(var: &Var) -> Vec<f32> {
    var.as_tensor()
        .to_dtype(CDType::F32)
        .and_then(|t| t.to_vec1::<f32>())
        .unwrap()
}

/// The bf16 rounding of an f32 value, as candle does it.
fn bf16(x: f32) -> f32 {
    Tensor::new(x, &Device::Cpu)
        .and_then(|t| t.to_dtype(CDType::BF16))
        .and_then(|t| t.to_dtype(CDType::F32))
        .and_then(|t| t.to_scalar::<f32>())
        .unwrap()
}

/// 100 plain SGD steps of lr 1e-4 on a constant gradient of 1 from θ = 1.
fn hundred_small_steps(master: bool) -> (Vec<f32>, Vec<f64>) {
    let w = bf16_var(&[1.0, -2.0]);
    let mut store = CandleStore::from_vars(vec![w.clone()]).unwrap();
    if master {
        store = store.with_master_weights().unwrap();
    }
    let config = AmpConfig::new(1e-4, 0.0).inner_iter(0);
    let mut amp = Amp::sgd(store, config, SgdConfig::default()).unwrap();
    for _ in 0..100 {
        amp.step(|s: &mut CandleStore, _pass: Pass| {
            let dtype = s.dtype();
            s.write_grad(0, &HostTensor::new(vec![2], dtype, vec![1.0, 1.0])?)?;
            Ok::<_, AmpError>(((), 0.0))
        })
        .unwrap();
    }
    let theta = amp.store().read(Slot::Params, 0).unwrap().into_data();
    (var_values(&w), theta)
}

#[test]
fn updates_below_the_ulp_of_bf16_are_kept_by_the_master_weights_and_lost_without() {
    // bf16 has 8 significant bits: 1 − 1e-4 rounds back to 1, every step.
    let (vars, theta) = hundred_small_steps(false);
    assert_eq!(vars, [1.0, -2.0]);
    assert_eq!(theta, [1.0, -2.0]);
    // With master weights the f32 copy takes each step of 1e-4 (rounded
    // as f32 arithmetic rounds it) and the var follows, rounded to bf16.
    let (vars, theta) = hundred_small_steps(true);
    let mut want = [1.0f32, -2.0];
    for _ in 0..100 {
        for w in &mut want {
            *w += -1e-4f32 * 1.0;
        }
    }
    assert_eq!(theta, [want[0] as f64, want[1] as f64]);
    assert!((theta[0] - 0.99).abs() < 1e-5, "{theta:?}");
    assert_eq!(vars, [bf16(theta[0] as f32), bf16(theta[1] as f32)]);
    assert_ne!(vars, [1.0, -2.0]);
}

#[test]
fn the_model_sees_theta_plus_delta_and_theta_in_its_dtype_and_its_grads_are_widened() {
    let w = bf16_var(&[0.3, -1.7, 2.5]);
    let store = CandleStore::from_vars(vec![w.clone()])
        .unwrap()
        .with_master_weights()
        .unwrap();
    let config = AmpConfig::new(0.01, 0.1).inner_iter(2);
    let mut amp = Amp::sgd(store, config, SgdConfig::nesterov(0.9)).unwrap();
    for _ in 0..3 {
        let mut seen = Vec::new();
        amp.step(|s: &mut CandleStore, pass: Pass| {
            // What the model holds against the master copy it was written from.
            let master = s.read(Slot::Params, 0)?.into_data();
            let model = var_values(&w);
            let rounded: Vec<f32> = master.iter().map(|&x| bf16(x as f32)).collect();
            seen.push((pass, model == rounded));
            // L = Σ θ², computed by the bf16 model; its gradient 2θ in bf16.
            let loss = w.as_tensor().sqr()?.sum_all()?;
            let grads = loss.backward()?;
            s.absorb_grads(&grads)?;
            assert_eq!(s.grad(0).map(Tensor::dtype), Some(CDType::F32));
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((
                (),
                loss.to_dtype(CDType::F32)?.to_scalar::<f32>()? as f64,
            ))
        })
        .unwrap();
        assert_eq!(seen.len(), 3);
        assert!(seen.iter().all(|(_, same)| *same), "{seen:?}");
        // Between steps the model holds the new θ.
        let master = amp.store().read(Slot::Params, 0).unwrap().into_data();
        let rounded: Vec<f32> = master.iter().map(|&x| bf16(x as f32)).collect();
        assert_eq!(var_values(&w), rounded);
    }
}

#[test]
fn master_weights_are_refused_for_full_precision_vars_and_after_buffers_exist() {
    let f32_var = Var::from_tensor(&Tensor::ones(2, CDType::F32, &Device::Cpu).unwrap()).unwrap();
    let refused = CandleStore::from_vars(vec![f32_var])
        .unwrap()
        .with_master_weights();
    assert!(matches!(refused, Err(AmpError::InvalidConfig { .. })));
    let mut store = CandleStore::from_vars(vec![bf16_var(&[1.0])]).unwrap();
    store.alloc_buffer().unwrap();
    let refused = store.with_master_weights();
    assert!(matches!(refused, Err(AmpError::InvalidConfig { .. })));
    // A store that keeps them says so, and reports f32.
    let store = CandleStore::from_vars(vec![bf16_var(&[1.0])])
        .unwrap()
        .with_master_weights()
        .unwrap();
    assert!(store.has_master_weights());
    assert_eq!(store.dtype(), DType::F32);
}
