//! A flattened libtorch store whose parameters are given new storage
//! (`set_data`, which `TchStore::flatten` allows) and then a checkpoint load
//! that is refused after the parameters were written: the load must read
//! and roll back the tensors where they are now, so the weights end as they
//! were before the load. (The flat allocation the parameters left is freed
//! by then; touching it would be a use after free.)
#![cfg(feature = "tch")]

use amp::backend::tch::TchStore;
use amp::checkpoint;
use amp::{Amp, AmpConfig, AmpError, ParamStore, SgdConfig, Slot};
use tch::{Kind, Tensor};

/// The model: two leaf tensors.
fn leaves() -> (Tensor, Tensor) {
    let a = Tensor::from_slice(&[1.0f32, -2.0, 0.5, 0.25]).set_requires_grad(true);
    let b = Tensor::from_slice(&[3.0f32, 4.0, -1.5]).set_requires_grad(true);
    (a, b)
}

fn config() -> AmpConfig {
    AmpConfig::new(0.1, 0.3).inner_iter(1)
}

fn step(amp: &mut Amp<TchStore>, a: &Tensor, b: &Tensor) {
    amp.step(|_store, _pass| {
        let loss = (a * a).sum(Kind::Float) + (b * b * b).sum(Kind::Float);
        loss.backward();
        Ok::<_, AmpError>(((), loss.double_value(&[])))
    })
    .expect("step");
}

fn values(tensors: &[&Tensor]) -> Vec<Vec<f32>> {
    tensors
        .iter()
        .map(|t| Vec::<f32>::try_from(&t.detach()).expect("f32 values"))
        .collect()
}

#[test]
fn refused_load_after_new_storage_keeps_the_pre_load_weights() {
    // A checkpoint with momentum buffers, loaded keeping this optimiser's
    // own settings into an SGD without momentum: SGD refuses the buffers
    // only after the parameters were written.
    let bytes = {
        let (a, b) = leaves();
        let store = TchStore::from_tensors(vec![a.shallow_clone(), b.shallow_clone()]).unwrap();
        let mut amp = Amp::sgd(store, config(), SgdConfig::nesterov(0.9)).unwrap();
        for _ in 0..3 {
            step(&mut amp, &a, &b);
        }
        checkpoint::to_bytes(&amp).unwrap()
    };

    let (a, b) = leaves();
    let mut store = TchStore::from_tensors(vec![a.shallow_clone(), b.shallow_clone()]).unwrap();
    store.flatten().unwrap();
    let mut amp = Amp::sgd(store, config(), SgdConfig::default()).unwrap();
    step(&mut amp, &a, &b);

    // New storage for every parameter, with new values: nothing holds the
    // flat allocation of the parameters any more.
    for p in [&a, &b] {
        let fresh = tch::no_grad(|| p.detach() * 3.0 + 1.0);
        p.shallow_clone().set_data(&fresh);
    }
    let before = values(&[&a, &b]);
    let seen_before: Vec<Vec<f64>> = (0..2)
        .map(|i| amp.store().read(Slot::Params, i).unwrap().into_data())
        .collect();

    let keep = checkpoint::LoadOptions::default().keep_hyperparameters(true);
    let error = checkpoint::from_bytes_with(&mut amp, &bytes, &keep)
        .expect_err("momentum state is refused");
    assert!(matches!(error, AmpError::InvalidState(_)), "{error}");
    assert_eq!(
        values(&[&a, &b]),
        before,
        "a refused load changed the weights"
    );
    let seen_after: Vec<Vec<f64>> = (0..2)
        .map(|i| amp.store().read(Slot::Params, i).unwrap().into_data())
        .collect();
    assert_eq!(seen_after, seen_before);

    // Training goes on from there, as on a store that was never flattened.
    let (c, d) = leaves();
    for (p, q) in [(&c, &a), (&d, &b)] {
        let same = tch::no_grad(|| q.detach().copy());
        p.shallow_clone().set_data(&same);
    }
    let store = TchStore::from_tensors(vec![c.shallow_clone(), d.shallow_clone()]).unwrap();
    let mut plain = Amp::sgd(store, config(), SgdConfig::default()).unwrap();
    for _ in 0..2 {
        step(&mut amp, &a, &b);
        step(&mut plain, &c, &d);
    }
    assert_eq!(values(&[&a, &b]), values(&[&c, &d]));
}
