//! Hostile inputs: values, states, files and closures that a careless or
//! malicious caller can hand to the public API. Each is refused with a typed
//! error and nothing changed, or handled as documented — never a panic, a
//! wrap-around or a silent success with broken weights.

use std::time::Duration;

mod support;
use support::edit_metadata;

use amp::backend::ndarray::NdStore;
use amp::checkpoint::{self, LoadOptions};
use amp::{Amp, AmpConfig, AmpError, AmpState, BufferId, ParamStore, Pass, SgdConfig, Slot};
use amp_testkit::faulty::FaultyStore;
use ndarray::array;

type Nd = NdStore<f32>;

fn store() -> Nd {
    NdStore::from_arrays([
        array![1.5f32, -2.0, 0.5].into_dyn(),
        array![0.25f32].into_dyn(),
    ])
}

/// ½‖θ‖²: the gradient is θ.
fn quadratic<S: ParamStore>(s: &mut S, _pass: Pass) -> Result<((), f64), AmpError> {
    let mut loss = 0.0;
    for i in 0..s.num_tensors() {
        let theta = s.read(Slot::Params, i)?;
        loss += 0.5 * theta.data().iter().map(|x| x * x).sum::<f64>();
        s.write(Slot::Grads, i, &theta)?;
    }
    Ok(((), loss))
}

fn trained(steps: usize) -> Amp<Nd> {
    let mut amp =
        Amp::sgd(store(), AmpConfig::new(0.1, 0.5), SgdConfig::nesterov(0.9)).expect("builds");
    for _ in 0..steps {
        amp.step(quadratic).expect("step");
    }
    amp
}

/// Weights and state, to compare before and after a refused input.
fn snapshot(amp: &Amp<Nd>) -> (Vec<Vec<f32>>, AmpState) {
    let weights = amp
        .store()
        .params()
        .iter()
        .map(|p| p.iter().copied().collect())
        .collect();
    (weights, amp.state().expect("state"))
}

#[test]
fn counters_at_their_limit_refuse_the_next_step_without_wrapping() {
    let bytes = checkpoint::to_bytes(&trained(2)).expect("save");
    for field in ["steps", "skipped_steps"] {
        let edited = edit_metadata(&bytes, |m| m[field] = serde_json::json!(u64::MAX));
        let mut amp = trained(0);
        checkpoint::from_bytes(&mut amp, &edited).expect("the counters load");
        let before = snapshot(&amp);
        let error = amp.step(quadratic).unwrap_err();
        assert!(
            matches!(error, AmpError::CounterOverflow(f) if f == field),
            "{error}"
        );
        assert_eq!(
            snapshot(&amp),
            before,
            "{field}: a refused step changed state"
        );
    }
}

#[test]
fn hyper_parameters_must_be_finite_in_the_store_dtype() {
    // 1e39 is a finite f64 but overflows f32.
    let error = Amp::sgd(store(), AmpConfig::new(1e39, 0.5), SgdConfig::default())
        .err()
        .expect("refused");
    assert!(
        matches!(error, AmpError::InvalidConfig { field: "lr", .. }),
        "{error}"
    );
    let error = Amp::sgd(
        store(),
        AmpConfig::new(0.1, 0.5).weight_decay(1e39),
        SgdConfig::default(),
    )
    .err()
    .expect("refused");
    assert!(
        matches!(
            error,
            AmpError::InvalidConfig {
                field: "weight_decay",
                ..
            }
        ),
        "{error}"
    );
    // The same values are fine for an f64 store.
    let wide = NdStore::from_arrays([array![1.0f64]]);
    Amp::sgd(wide, AmpConfig::new(1e39, 0.5), SgdConfig::default()).expect("finite in f64");

    let mut amp = trained(1);
    let before = snapshot(&amp);
    assert!(matches!(
        amp.set_lr(1e39),
        Err(AmpError::InvalidConfig { field: "lr", .. })
    ));
    assert!(matches!(
        amp.set_group_lr(0, f64::NAN),
        Err(AmpError::InvalidConfig { .. })
    ));
    assert_eq!(snapshot(&amp), before);

    // And a checkpoint's group lr goes through the same check.
    let bytes = checkpoint::to_bytes(&amp).expect("save");
    let edited = edit_metadata(&bytes, |m| m["groups"][0]["lr"] = serde_json::json!(1e39));
    let error = checkpoint::from_bytes(&mut amp, &edited).unwrap_err();
    assert!(matches!(error, AmpError::InvalidState(_)), "{error}");
    assert_eq!(snapshot(&amp), before);
}

#[test]
fn non_finite_optimiser_state_is_refused() {
    let mut amp = trained(2);
    let before = snapshot(&amp);
    for bad in [f64::NAN, f64::INFINITY, 1e39] {
        let mut state = amp.state().expect("state");
        let momentum = &mut state.base.state.buffers[0].1[0];
        momentum
            .as_mut()
            .expect("momentum after two steps")
            .data_mut()[1] = bad;
        let error = amp.load_state(&state).unwrap_err();
        assert!(matches!(error, AmpError::InvalidState(_)), "{bad}: {error}");
        assert_eq!(snapshot(&amp), before, "{bad}");
    }
}

/// An edit of a checkpoint's JSON metadata.
type Edit = Box<dyn Fn(&mut serde_json::Value)>;

#[test]
fn metadata_that_contradicts_the_file_is_refused_by_load_and_inspect_alike() {
    let bytes = checkpoint::to_bytes(&trained(1)).expect("save");
    let edits: [(&str, Edit); 4] = [
        ("dtype", Box::new(|m| m["dtype"] = serde_json::json!("f64"))),
        (
            "non_finite",
            Box::new(|m| m["config"]["non_finite"] = serde_json::json!("ignore")),
        ),
        (
            "restore",
            Box::new(|m| m["config"]["restore"] = serde_json::json!("teleport")),
        ),
        (
            "extra field",
            Box::new(|m| m["surprise"] = serde_json::json!(1)),
        ),
    ];
    for (what, edit) in edits {
        let edited = edit_metadata(&bytes, edit);
        let mut amp = trained(0);
        let before = snapshot(&amp);
        let loaded = checkpoint::from_bytes(&mut amp, &edited);
        let inspected = checkpoint::inspect(&edited);
        assert!(
            matches!(loaded, Err(AmpError::Checkpoint(_))),
            "{what}: load gave {loaded:?}"
        );
        assert!(inspected.is_err(), "{what}: inspect accepted it");
        assert_eq!(snapshot(&amp), before, "{what}");
    }
}

#[test]
fn base_optimiser_settings_are_recorded_and_checked() {
    let bytes = checkpoint::to_bytes(&trained(2)).expect("save");
    let info = checkpoint::inspect(&bytes).expect("inspect");
    assert_eq!(info.state.base.kind, "sgd");
    assert_eq!(
        info.state.base.settings,
        vec![
            ("momentum".to_string(), 0.9),
            ("dampening".to_string(), 0.0),
            ("nesterov".to_string(), 1.0)
        ]
    );
    let heavy_ball = SgdConfig::momentum(0.5).dampening(0.3);
    let mut other = Amp::sgd(store(), AmpConfig::new(0.1, 0.5), heavy_ball).expect("builds");
    let before = other.store().params().to_vec();
    let error = checkpoint::from_bytes(&mut other, &bytes).unwrap_err();
    assert!(
        matches!(&error, AmpError::InvalidState(m) if m.contains("momentum")),
        "{error}"
    );
    assert_eq!(other.store().params(), &before[..]);
    // Asked for, the optimiser keeps its own settings and takes the rest.
    let keep = LoadOptions::default().keep_hyperparameters(true);
    checkpoint::from_bytes_with(&mut other, &bytes, &keep).expect("loads on purpose");
    assert_eq!(other.base().config(), &heavy_ball);
    assert_eq!(other.steps(), 2);
}

#[test]
fn a_failed_state_load_leaves_the_momentum_whole() {
    let mut amp = Amp::sgd(
        FaultyStore::new(store()),
        AmpConfig::new(0.1, 0.5),
        SgdConfig::nesterov(0.9),
    )
    .expect("builds");
    for _ in 0..2 {
        amp.step(quadratic).expect("step");
    }
    let before = amp.state().expect("state");
    let mut next = before.clone();
    for tensor in next.base.state.buffers[0].1.iter_mut().flatten() {
        tensor.data_mut().iter_mut().for_each(|x| *x += 1.0);
    }
    // Each store operation of the load in turn fails.
    for n in 0..8 {
        amp.store().arm_error(n);
        let result = amp.load_state(&next);
        amp.store().count();
        match result {
            Err(_) => assert_eq!(
                amp.state().expect("state"),
                before,
                "failure at operation {n}"
            ),
            Ok(()) => {
                assert_eq!(amp.state().expect("state").base, next.base);
                break;
            }
        }
    }
}

#[test]
fn sgd_moved_to_a_larger_store_is_an_error_not_a_panic() {
    let amp = trained(2);
    let (_, sgd) = amp.into_parts().expect("parts");
    let larger = NdStore::from_arrays([
        array![1.0f32, 2.0, 3.0].into_dyn(),
        array![1.0f32].into_dyn(),
        array![4.0f32].into_dyn(),
    ]);
    let mut moved = Amp::new(larger, AmpConfig::new(0.1, 0.5), sgd).expect("builds");
    let before = moved.store().params().to_vec();
    let error = moved.step(quadratic).unwrap_err();
    assert!(matches!(error, AmpError::InvalidState(_)), "{error}");
    assert_eq!(moved.store().params(), &before[..]);
}

#[test]
fn a_closure_cannot_free_the_optimisers_buffers() {
    let mut plain = trained(1);
    let mut hostile = trained(1);
    plain.step(quadratic).expect("step");
    hostile
        .step(|s: &mut Nd, pass| {
            for id in 0..4 {
                let freed = s.free_buffer(BufferId::new(id));
                assert!(
                    matches!(
                        freed,
                        Err(AmpError::BufferInUse(_) | AmpError::UnknownBuffer(_))
                    ),
                    "buffer {id} was freed in the {pass}"
                );
            }
            quadratic(s, pass)
        })
        .expect("the step goes on");
    assert_eq!(hostile.store().params(), plain.store().params());
    assert_eq!(
        hostile.state().expect("state"),
        plain.state().expect("state")
    );
}

#[test]
fn loading_a_fifo_is_refused_instead_of_blocking() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("checkpoint.fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    if !matches!(made, Ok(status) if status.success()) {
        amp_testkit::skip_notice("loading_a_fifo", "mkfifo is not available");
        return;
    }
    let (done, result) = std::sync::mpsc::channel();
    let path = fifo.clone();
    std::thread::spawn(move || {
        let mut amp = trained(0);
        let _ = done.send(checkpoint::load(&mut amp, &path).map_err(|e| e.to_string()));
    });
    let outcome = result
        .recv_timeout(Duration::from_secs(20))
        .expect("load returned instead of blocking on the FIFO");
    let message = outcome.unwrap_err();
    assert!(message.contains("not a regular file"), "{message}");
    // A directory is refused the same way.
    let mut amp = trained(0);
    let error = checkpoint::load(&mut amp, dir.path()).unwrap_err();
    assert!(error.to_string().contains("not a regular file"), "{error}");
}

#[test]
fn crafted_data_offsets_are_refused_without_panicking() {
    // Offsets chained up to u64::MAX: the safetensors parser's own sum of
    // offsets and header length would overflow.
    let half = u64::MAX / 2;
    let header = format!(
        concat!(
            "{{\"a\":{{\"dtype\":\"U8\",\"shape\":[{h}],\"data_offsets\":[0,{h}]}},",
            "\"b\":{{\"dtype\":\"U8\",\"shape\":[{h}],\"data_offsets\":[{h},{m}]}}}}"
        ),
        h = half,
        m = half * 2
    );
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    let mut amp = trained(0);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        checkpoint::from_bytes(&mut amp, &bytes)
    }));
    let result = outcome.expect("no panic on crafted offsets");
    assert!(matches!(result, Err(AmpError::Checkpoint(_))), "{result:?}");
    let inspected = std::panic::catch_unwind(|| checkpoint::inspect(&bytes).is_err());
    assert!(matches!(inspected, Ok(true)));
}

#[test]
fn version_1_files_fail_with_a_clear_message() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/checkpoint-v1.safetensors"
    );
    let mut amp = trained(0);
    let before = snapshot(&amp);
    let error = checkpoint::load(&mut amp, path).unwrap_err();
    let message = error.to_string();
    assert!(message.contains("format version 1"), "{message}");
    assert!(message.contains("reads version 2"), "{message}");
    assert_eq!(snapshot(&amp), before);
}

/// A value of any kind: ordinary, huge, tiny, negative, zero, NaN, ±∞.
fn any_value() -> impl proptest::strategy::Strategy<Value = f64> {
    use proptest::prelude::*;
    prop_oneof![
        -10.0f64..10.0,
        proptest::num::f64::ANY,
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(1e39),
        Just(0.0),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

    /// Any state a file or a caller can hold: loading either refuses it with
    /// nothing changed, or the next step succeeds or is a typed error with
    /// nothing changed — never a panic. The weights it writes are finite
    /// whenever the values loaded are moderate (a finite lr times a finite
    /// momentum can still overflow the dtype; `Amp`'s docs say why the step
    /// does not check its result).
    #[test]
    fn arbitrary_states_are_refused_or_safe(
        lr in any_value(),
        epsilon in proptest::option::of(any_value()),
        momentum in proptest::collection::vec(any_value(), 4),
        setting in proptest::option::of(any_value()),
        steps in proptest::prelude::any::<u64>(),
        skipped in proptest::prelude::any::<u64>(),
        keep in proptest::prelude::any::<bool>(),
    ) {
        let mut amp = trained(2);
        let mut state = amp.state().expect("state");
        state.groups[0].lr = lr;
        if let Some(epsilon) = epsilon {
            state.groups[0].epsilon = epsilon;
        }
        let mut values = momentum.into_iter();
        for tensor in state.base.state.buffers[0].1.iter_mut().flatten() {
            for x in tensor.data_mut() {
                *x = values.next().unwrap_or(*x);
            }
        }
        if let Some(setting) = setting {
            state.base.settings[0].1 = setting;
        }
        state.steps = steps;
        state.skipped_steps = skipped;
        let options = amp::StateOptions::default().keep_hyperparameters(keep);
        let moderate = lr.abs() <= 1e6
            && state.groups[0].epsilon.abs() <= 1e6
            && state.base.state.buffers[0].1.iter().flatten().all(|t| t.data().iter().all(|x| x.abs() <= 1e6));
        let before = snapshot(&amp);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            match amp.load_state_with(&state, &options) {
                Err(_) => {
                    assert_eq!(snapshot(&amp), before, "a refused load changed state");
                }
                Ok(()) => {
                    let loaded = snapshot(&amp);
                    match amp.step(quadratic) {
                        Ok(_) if moderate => {
                            for p in amp.store().params() {
                                assert!(p.iter().all(|x| x.is_finite()), "non-finite weights");
                            }
                        }
                        Ok(_) => {}
                        Err(_) => assert_eq!(snapshot(&amp), loaded, "a failed step changed state"),
                    }
                }
            }
        }));
        proptest::prop_assert!(outcome.is_ok(), "panicked");
    }
}

#[test]
fn a_host_tensor_whose_data_does_not_fit_its_shape_cannot_be_deserialised() {
    let t = amp::HostTensor::new(vec![2, 2], amp::DType::F32, vec![1.0, 2.0, 3.0, 4.0]).unwrap();
    let mut json = serde_json::to_value(&t).unwrap();
    let back: amp::HostTensor = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(back, t);
    json["shape"] = serde_json::json!([2, 3]);
    let error = serde_json::from_value::<amp::HostTensor>(json.clone()).unwrap_err();
    assert!(
        error.to_string().contains("host tensor elements"),
        "{error}"
    );
    // A shape whose element count overflows is refused, not wrapped.
    json["shape"] = serde_json::json!([usize::MAX, 2]);
    assert!(serde_json::from_value::<amp::HostTensor>(json).is_err());
}
