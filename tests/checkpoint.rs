//! Checkpoints (`amp::checkpoint`): bit-exact resume, validation, corruption,
//! atomic saves and dtype conversion.
//!
//! The backend-generic tests are written once over `ParamStore` and
//! instantiated per backend by `checkpoint_suite!` with a factory that builds
//! the backend's store from host tensors; a new backend adds one line at the
//! bottom.

use std::path::Path;

mod support;
use support::edit_metadata;

use amp::backend::ndarray::NdStore;
use amp::checkpoint::{self, DTypeConversion, LoadOptions};
use amp::{
    Amp, AmpConfig, AmpError, BufferId, DType, HostTensor, NonFinitePolicy, OptimizerState,
    ParamGroup, ParamStore, RestoreMode, Result, SgdConfig, Slot,
};
use proptest::prelude::*;

/// The model: a matrix, a vector, a 0-d scalar and an empty tensor.
const SHAPES: [&[usize]; 4] = [&[4, 3], &[3], &[], &[0, 2]];

/// Tensor 2 receives its first gradient at this step, so early checkpoints
/// hold momentum for some tensors only.
const LATE_START: u64 = 5;

/// Initial values: a deterministic function of the seed.
fn init(seed: u64) -> Vec<HostTensor> {
    SHAPES
        .iter()
        .enumerate()
        .map(|(i, shape)| {
            let numel: usize = shape.iter().product();
            let data = (0..numel)
                .map(|j| ((seed as f64 + 1.0) * 0.37 + i as f64 * 1.1 + j as f64 * 0.53).sin())
                .collect();
            HostTensor::new(shape.to_vec(), DType::F64, data).expect("numel matches")
        })
        .collect()
}

/// How the optimiser is built; `Setup::build` must give the same optimiser
/// every time, as a resumed run requires.
#[derive(Clone, Copy, Debug)]
struct Setup {
    inner_iter: usize,
    restore: RestoreMode,
    sgd: SgdConfig,
}

const SETUPS: [Setup; 4] = [
    Setup {
        inner_iter: 1,
        restore: RestoreMode::Copy,
        sgd: SgdConfig {
            momentum: 0.9,
            dampening: 0.0,
            nesterov: true,
        },
    },
    Setup {
        inner_iter: 2,
        restore: RestoreMode::Subtract,
        sgd: SgdConfig {
            momentum: 0.8,
            dampening: 0.1,
            nesterov: false,
        },
    },
    Setup {
        inner_iter: 3,
        restore: RestoreMode::Copy,
        sgd: SgdConfig {
            momentum: 0.0,
            dampening: 0.0,
            nesterov: false,
        },
    },
    Setup {
        inner_iter: 0,
        restore: RestoreMode::Copy,
        sgd: SgdConfig {
            momentum: 0.9,
            dampening: 0.0,
            nesterov: true,
        },
    },
];

impl Setup {
    fn config(&self) -> AmpConfig {
        AmpConfig::new(0.1, 0.3)
            .weight_decay(1e-4)
            .inner_iter(self.inner_iter)
            .restore(self.restore)
            .group(ParamGroup::new([0, 2, 3]))
            .group(
                ParamGroup::new([1])
                    .epsilon(0.05)
                    .inner_lr(0.7)
                    .weight_decay(1e-3),
            )
    }

    fn build<S: ParamStore>(&self, store: S) -> Amp<S> {
        Amp::sgd(store, self.config(), self.sgd).expect("valid setup")
    }
}

/// One training step at step index `t`. The loss per element is
/// `½·a·θ² − cos(θ)/1 + c_t·θ` with a data-dependent `c_t`, so the gradient
/// `a·θ + sin(θ) + c_t` changes with the step and is non-linear in θ. It is
/// computed on the host in f64, through `ParamStore::read`/`write`, so it is
/// the same for every backend and deterministic.
fn train_step<S: ParamStore>(amp: &mut Amp<S>, t: u64) -> Result<()> {
    if t == 2 {
        // A learning-rate change that only the checkpoint can carry over.
        amp.set_group_lr(0, 0.05)?;
    }
    amp.step(|store: &mut S, _pass| -> Result<((), f64)> {
        let mut loss = 0.0;
        for i in 0..store.num_tensors() {
            if i == 2 && t < LATE_START {
                continue;
            }
            let theta = store.read(Slot::Params, i)?;
            let a = 1.0 + i as f64 * 0.5;
            let mut grad = Vec::with_capacity(theta.numel());
            for (j, &x) in theta.data().iter().enumerate() {
                let c = 0.2 * (t as f64 * 1.3 + i as f64 * 0.7 + j as f64 * 0.11).sin();
                loss += 0.5 * a * x * x - x.cos() + c * x;
                grad.push(a * x + x.sin() + c);
            }
            store.write(
                Slot::Grads,
                i,
                &HostTensor::new(theta.shape().to_vec(), theta.dtype(), grad)?,
            )?;
        }
        Ok(((), loss))
    })?;
    Ok(())
}

/// Everything a checkpoint must carry, as bits.
#[derive(Debug, PartialEq)]
struct Fingerprint {
    params: Vec<Vec<u64>>,
    state: Vec<(String, Vec<Option<Vec<u64>>>)>,
    scalars: Vec<(String, Vec<u64>)>,
    steps: u64,
    skipped_steps: u64,
    group_lr: Vec<u64>,
}

fn bits(tensor: &HostTensor) -> Vec<u64> {
    tensor.data().iter().map(|x| x.to_bits()).collect()
}

fn fingerprint<S: ParamStore>(amp: &Amp<S>) -> Fingerprint {
    let store = amp.store();
    let state: OptimizerState = amp.state().expect("state reads").base.state;
    Fingerprint {
        params: (0..store.num_tensors())
            .map(|i| bits(&store.read(Slot::Params, i).expect("param reads")))
            .collect(),
        state: state
            .buffers
            .iter()
            .map(|(name, list)| {
                (
                    name.clone(),
                    list.iter().map(|t| t.as_ref().map(bits)).collect(),
                )
            })
            .collect(),
        scalars: state
            .scalars
            .iter()
            .map(|(name, v)| (name.clone(), v.iter().map(|x| x.to_bits()).collect()))
            .collect(),
        steps: amp.steps(),
        skipped_steps: amp.skipped_steps(),
        group_lr: (0..amp.num_groups())
            .map(|g| amp.group_lr(g).expect("group exists").to_bits())
            .collect(),
    }
}

/// n steps straight, against k steps, checkpoint, load into a fresh
/// optimiser, n − k steps: identical bit for bit.
fn check_resume<S: ParamStore>(
    make: &dyn Fn(&[HostTensor]) -> S,
    setup: Setup,
    seed: u64,
    n: u64,
    k: u64,
    through_file: Option<&Path>,
) {
    let mut straight = setup.build(make(&init(seed)));
    for t in 0..n {
        train_step(&mut straight, t).expect("step");
    }

    let mut first = setup.build(make(&init(seed)));
    for t in 0..k {
        train_step(&mut first, t).expect("step");
    }
    // The fresh optimiser starts from other weights: all must come from the
    // checkpoint.
    let mut resumed = setup.build(make(&init(seed + 1000)));
    match through_file {
        Some(path) => {
            checkpoint::save(&first, path).expect("save");
            drop(first);
            checkpoint::load(&mut resumed, path).expect("load");
        }
        None => {
            let bytes = checkpoint::to_bytes(&first).expect("to_bytes");
            checkpoint::from_bytes(&mut resumed, &bytes).expect("from_bytes");
        }
    }
    assert_eq!(resumed.steps(), k);
    for t in k..n {
        train_step(&mut resumed, t).expect("step");
    }
    assert_eq!(
        fingerprint(&resumed),
        fingerprint(&straight),
        "{setup:?}, n = {n}, k = {k}"
    );
    // The whole serialised state agrees too.
    assert_eq!(
        checkpoint::to_bytes(&resumed).expect("to_bytes"),
        checkpoint::to_bytes(&straight).expect("to_bytes")
    );
}

fn resume_is_bit_exact<S: ParamStore>(make: &dyn Fn(&[HostTensor]) -> S) {
    for setup in SETUPS {
        for k in [0, 1, 3, 7, 12] {
            check_resume(make, setup, 1, 12, k, None);
        }
    }
    let dir = tempfile::tempdir().expect("temp dir");
    check_resume(
        make,
        SETUPS[0],
        2,
        10,
        6,
        Some(&dir.path().join("ckpt.safetensors")),
    );
}

/// A trained optimiser (momentum initialised for some tensors only) and its
/// checkpoint.
fn trained<S: ParamStore>(make: &dyn Fn(&[HostTensor]) -> S, steps: u64) -> (Amp<S>, Vec<u8>) {
    let mut amp = SETUPS[0].build(make(&init(3)));
    for t in 0..steps {
        train_step(&mut amp, t).expect("step");
    }
    let bytes = checkpoint::to_bytes(&amp).expect("to_bytes");
    (amp, bytes)
}

/// Loads `bytes` into `amp`, expecting an error that `matches`, and checks
/// that nothing changed.
fn refused<S: ParamStore>(
    amp: &mut Amp<S>,
    bytes: &[u8],
    options: &LoadOptions,
    matches: impl Fn(&AmpError) -> bool,
) {
    let before = fingerprint(amp);
    let error = checkpoint::from_bytes_with(amp, bytes, options).expect_err("must be refused");
    assert!(matches(&error), "unexpected error: {error}");
    assert_eq!(
        fingerprint(amp),
        before,
        "a refused load changed state ({error})"
    );
}

fn mismatches_are_refused<S: ParamStore>(make: &dyn Fn(&[HostTensor]) -> S) {
    // Four steps: tensor 2 has no momentum yet.
    let (_, bytes) = trained(make, 4);
    let strict = LoadOptions::default();
    let is_checkpoint = |e: &AmpError| matches!(e, AmpError::Checkpoint(_));
    let is_invalid_state = |e: &AmpError| matches!(e, AmpError::InvalidState(_));

    // Another number of tensors.
    let mut fewer = Amp::sgd(
        make(&init(4)[..3]),
        AmpConfig::new(0.1, 0.5).group(ParamGroup::new([0, 1, 2])),
        SETUPS[0].sgd,
    )
    .expect("valid");
    refused(&mut fewer, &bytes, &strict, |e| {
        matches!(
            e,
            AmpError::CountMismatch {
                expected: 3,
                found: 4,
                ..
            }
        )
    });

    // Another shape.
    let mut reshaped = init(4);
    reshaped[1] = HostTensor::new(vec![1, 3], DType::F64, vec![0.0; 3]).expect("numel");
    let mut amp = SETUPS[0].build(make(&reshaped));
    refused(&mut amp, &bytes, &strict, |e| {
        matches!(e, AmpError::ShapeMismatch { index: 1, .. })
    });

    // Configuration that changes the numbers; the optimiser has stepped, so
    // a partial write would show.
    let mut amp = SETUPS[0].build(make(&init(4)));
    train_step(&mut amp, 0).expect("step");
    for (config, what) in [
        (SETUPS[0].config().epsilon(0.31), "epsilon"),
        (SETUPS[0].config().inner_iter(2), "inner_iter"),
        (SETUPS[0].config().restore(RestoreMode::Subtract), "restore"),
        (
            AmpConfig {
                groups: vec![ParamGroup::new([0, 1, 2, 3])],
                ..SETUPS[0].config()
            },
            "groups",
        ),
        (
            AmpConfig {
                groups: vec![ParamGroup::new([0, 2, 3]), ParamGroup::new([1])],
                ..SETUPS[0].config()
            },
            "group 1 hyper-parameters",
        ),
    ] {
        let mut other = Amp::sgd(make(&init(4)), config, SETUPS[0].sgd).expect("valid");
        train_step(&mut other, 0).expect("step");
        let before = fingerprint(&other);
        let error = checkpoint::from_bytes(&mut other, &bytes).expect_err(what);
        assert!(is_invalid_state(&error), "{what}: {error}");
        assert_eq!(fingerprint(&other), before, "{what}");
    }
    // … unless asked to keep the optimiser's own hyper-parameters.
    let mut other = Amp::sgd(
        make(&init(4)),
        SETUPS[0].config().epsilon(0.31),
        SETUPS[0].sgd,
    )
    .expect("valid");
    checkpoint::from_bytes_with(
        &mut other,
        &bytes,
        &LoadOptions::default().keep_hyperparameters(true),
    )
    .expect("keeps its ε");
    assert_eq!(other.groups()[0].epsilon, 0.31);
    assert_eq!(other.steps(), 4);

    // Non-finite policy does not matter.
    let mut other = Amp::sgd(
        make(&init(4)),
        SETUPS[0].config().non_finite(NonFinitePolicy::Skip),
        SETUPS[0].sgd,
    )
    .expect("valid");
    checkpoint::from_bytes(&mut other, &bytes).expect("policy is not compared");

    // The base optimiser refuses the state (momentum buffers for an SGD
    // without momentum) after the parameters passed every check: the
    // parameters written so far are rolled back.
    let mut plain =
        Amp::sgd(make(&init(4)), SETUPS[0].config(), SgdConfig::default()).expect("valid");
    train_step(&mut plain, 0).expect("step");
    refused(&mut plain, &bytes, &strict, is_invalid_state);

    // Another format version, and metadata that does not parse.
    let mut amp = SETUPS[0].build(make(&init(4)));
    let newer = edit_metadata(&bytes, |m| m["format_version"] = 3.into());
    refused(
        &mut amp,
        &newer,
        &strict,
        |e| matches!(e, AmpError::Checkpoint(m) if m.contains("format version 3")),
    );
    let no_version = edit_metadata(&bytes, |m| {
        m.as_object_mut().expect("object").remove("format_version");
    });
    refused(&mut amp, &no_version, &strict, is_checkpoint);
    let bad_lr = edit_metadata(&bytes, |m| m["groups"][0]["lr"] = (-1.0).into());
    refused(&mut amp, &bad_lr, &strict, is_invalid_state);
    let not_a_number = edit_metadata(&bytes, |m| m["groups"][0]["lr"] = "fast".into());
    refused(&mut amp, &not_a_number, &strict, is_checkpoint);
    let missing_state = edit_metadata(&bytes, |m| {
        m["base"]["buffers"][0]["present"][2] = true.into()
    });
    refused(&mut amp, &missing_state, &strict, is_checkpoint);
    let extra_tensor = edit_metadata(&bytes, |m| {
        m["base"]["buffers"][0]["present"][0] = false.into()
    });
    refused(&mut amp, &extra_tensor, &strict, is_checkpoint);
    let short_list = edit_metadata(&bytes, |m| {
        m["base"]["buffers"][0]["present"] = serde_json::json!([true]);
    });
    refused(&mut amp, &short_list, &strict, |e| {
        matches!(e, AmpError::CountMismatch { .. })
    });

    // Not a checkpoint at all; a safetensors file without our metadata.
    refused(&mut amp, b"", &strict, is_checkpoint);
    refused(&mut amp, b"\x02\0\0\0\0\0\0\0{}", &strict, is_checkpoint);
    let foreign = safetensors::serialize(
        safetensors::SafeTensors::deserialize(&bytes)
            .expect("valid")
            .tensors(),
        None,
    )
    .expect("serialise");
    refused(&mut amp, &foreign, &strict, is_checkpoint);
    // Every proper prefix.
    for len in 0..bytes.len() {
        refused(&mut amp, &bytes[..len], &strict, is_checkpoint);
    }
}

/// Truncated or bit-flipped files never panic: they load (the flip hit a
/// value) or are refused with nothing changed.
fn corruption_never_panics<S: ParamStore>(make: &dyn Fn(&[HostTensor]) -> S) {
    let (_, bytes) = trained(make, 7);
    // Shared across cases (the proptest closure is `Fn`).
    let amp = std::cell::RefCell::new(SETUPS[0].build(make(&init(5))));
    let config = ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let len = bytes.len();
    proptest!(config, |(
        // Half the cases keep the whole file, so that the flips are what
        // the reader sees.
        cut in prop_oneof![Just(len), 0..=len],
        flips in proptest::collection::vec((0..len, 0u8..8), 0..6),
    )| {
        let mut corrupted = bytes.clone();
        for (at, bit) in flips {
            corrupted[at] ^= 1 << bit;
        }
        corrupted.truncate(cut);
        let mut amp = amp.borrow_mut();
        let before = fingerprint(&amp);
        if checkpoint::from_bytes(&mut amp, &corrupted).is_err() {
            prop_assert_eq!(fingerprint(&amp), before);
        }
        // Also the metadata-only reader.
        let _ = checkpoint::inspect(&corrupted);
    });
}

/// Random seeds and split points.
fn resume_property<S: ParamStore>(make: &dyn Fn(&[HostTensor]) -> S) {
    let config = ProptestConfig {
        cases: 24,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(seed in 0u64..1000, setup in 0usize..SETUPS.len(), k in 0u64..=9)| {
        check_resume(make, SETUPS[setup], seed, 9, k, None);
    });
}

/// Instantiates the backend-generic tests for one backend, given a factory
/// `fn(&[HostTensor]) -> Store` (values are f64 and rounded to the store's
/// dtype).
macro_rules! checkpoint_suite {
    ($name:ident, $make:expr) => {
        mod $name {
            use super::*;

            #[test]
            fn resume_is_bit_exact() {
                super::resume_is_bit_exact(&$make);
            }

            #[test]
            fn resume_is_bit_exact_for_random_splits() {
                super::resume_property(&$make);
            }

            #[test]
            fn mismatches_are_refused_and_change_nothing() {
                super::mismatches_are_refused(&$make);
            }

            #[test]
            fn corrupted_files_never_panic() {
                super::corruption_never_panics(&$make);
            }
        }
    };
}

fn nd<T: amp::backend::ndarray::Element>(init: &[HostTensor]) -> NdStore<T> {
    NdStore::new(
        init.iter()
            .map(|t| {
                ndarray::ArrayD::from_shape_vec(
                    t.shape().to_vec(),
                    t.data().iter().map(|&x| T::from_f64_rounded(x)).collect(),
                )
                .expect("shape matches")
            })
            .collect(),
    )
}

checkpoint_suite!(ndarray_f32, nd::<f32>);
checkpoint_suite!(ndarray_f64, nd::<f64>);

/// Host values with their dtype set, for the backends' `from_host`.
#[cfg(any(feature = "candle", feature = "tch"))]
fn as_dtype(init: &[HostTensor], dtype: DType) -> Vec<HostTensor> {
    init.iter().map(|t| t.clone().with_dtype(dtype)).collect()
}

#[cfg(feature = "candle")]
fn candle(dtype: DType) -> impl Fn(&[HostTensor]) -> amp::backend::candle::CandleStore {
    move |init| {
        amp::backend::candle::CandleStore::from_host(
            &as_dtype(init, dtype),
            &candle_core::Device::Cpu,
        )
        .expect("candle store")
    }
}

#[cfg(feature = "candle")]
checkpoint_suite!(candle_cpu_f32, candle(DType::F32));
#[cfg(feature = "candle")]
checkpoint_suite!(candle_cpu_f64, candle(DType::F64));

#[cfg(feature = "tch")]
fn tch_cpu(dtype: DType) -> impl Fn(&[HostTensor]) -> amp::backend::tch::TchStore {
    move |init| {
        amp::backend::tch::TchStore::from_host(&as_dtype(init, dtype), tch::Device::Cpu)
            .expect("tch store")
    }
}

#[cfg(feature = "tch")]
checkpoint_suite!(tch_cpu_f32, tch_cpu(DType::F32));
#[cfg(feature = "tch")]
checkpoint_suite!(tch_cpu_f64, tch_cpu(DType::F64));

/// Saves after some steps on one backend and loads into another: the loaded
/// weights, momentum, counters and learning rates are bit-identical to the
/// saved ones, and training continues from there.
#[cfg(any(feature = "candle", feature = "tch"))]
fn loads_across_backends<A: ParamStore, B: ParamStore>(
    from: &dyn Fn(&[HostTensor]) -> A,
    to: &dyn Fn(&[HostTensor]) -> B,
) {
    let (saved, bytes) = trained(from, 7);
    let mut loaded = SETUPS[0].build(to(&init(99)));
    checkpoint::from_bytes(&mut loaded, &bytes).expect("cross-backend load");
    assert_eq!(fingerprint(&loaded), fingerprint(&saved));
    train_step(&mut loaded, 7).expect("step after load");
    assert_eq!(loaded.steps(), 8);
}

#[cfg(feature = "candle")]
#[test]
fn ndarray_checkpoints_load_into_candle_and_back() {
    for dtype in [DType::F32, DType::F64] {
        match dtype {
            DType::F32 => {
                loads_across_backends(&nd::<f32>, &candle(dtype));
                loads_across_backends(&candle(dtype), &nd::<f32>);
            }
            _ => {
                loads_across_backends(&nd::<f64>, &candle(dtype));
                loads_across_backends(&candle(dtype), &nd::<f64>);
            }
        }
    }
}

#[cfg(all(feature = "candle", feature = "tch"))]
#[test]
fn candle_checkpoints_load_into_tch_and_back() {
    loads_across_backends(&candle(DType::F32), &tch_cpu(DType::F32));
    loads_across_backends(&tch_cpu(DType::F32), &candle(DType::F32));
}

// ---------------------------------------------------------------------------
// Backend-specific and file-level tests.

fn nd_amp<T: amp::backend::ndarray::Element>(steps: u64) -> Amp<NdStore<T>> {
    let mut amp = SETUPS[0].build(nd::<T>(&init(6)));
    for t in 0..steps {
        train_step(&mut amp, t).expect("step");
    }
    amp
}

#[test]
fn tensors_are_stored_in_their_own_dtype_with_momentum() {
    let f32_bytes = checkpoint::to_bytes(&nd_amp::<f32>(7)).expect("to_bytes");
    let f64_bytes = checkpoint::to_bytes(&nd_amp::<f64>(7)).expect("to_bytes");
    for (bytes, dtype) in [
        (&f32_bytes, safetensors::Dtype::F32),
        (&f64_bytes, safetensors::Dtype::F64),
    ] {
        let file = safetensors::SafeTensors::deserialize(bytes).expect("valid safetensors");
        let mut names: Vec<_> = file.names().into_iter().map(str::to_string).collect();
        names.sort();
        // Tensor 2 has had gradients since step 5, so it has momentum too.
        assert_eq!(
            names,
            [
                "optimizer.0.0",
                "optimizer.0.1",
                "optimizer.0.2",
                "optimizer.0.3",
                "param.0",
                "param.1",
                "param.2",
                "param.3"
            ]
        );
        for (_, view) in file.tensors() {
            assert_eq!(view.dtype(), dtype);
        }
    }
    let info = checkpoint::inspect(&f32_bytes).expect("inspect");
    assert_eq!(info.format_version, checkpoint::FORMAT_VERSION);
    assert_eq!(info.dtype, DType::F32);
    assert_eq!(info.state.steps, 7);
    assert_eq!(info.state.skipped_steps, 0);
    assert_eq!(info.config(), &SETUPS[0].config());
    let lrs: Vec<f64> = info.groups().iter().map(|g| g.lr).collect();
    assert_eq!(lrs, vec![0.05, 0.1]);
    let buffers: Vec<&str> = info
        .state
        .base
        .state
        .buffers
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(buffers, vec!["momentum_buffer"]);
    assert_eq!(
        info.shapes,
        SHAPES.iter().map(|s| s.to_vec()).collect::<Vec<_>>()
    );
}

#[test]
fn checkpoints_load_across_dtypes_by_the_documented_rules() {
    let narrow = nd_amp::<f32>(7);
    let wide = nd_amp::<f64>(7);
    let from_f32 = checkpoint::to_bytes(&narrow).expect("to_bytes");
    let from_f64 = checkpoint::to_bytes(&wide).expect("to_bytes");

    // f32 → f64 widens exactly, momentum included.
    let mut amp = SETUPS[0].build(nd::<f64>(&init(9)));
    checkpoint::from_bytes(&mut amp, &from_f32).expect("lossless");
    // Host reads widen to f64 already, so the fingerprints compare directly.
    assert_eq!(fingerprint(&amp), fingerprint(&narrow));
    let reread = checkpoint::to_bytes(&amp).expect("to_bytes");
    assert_eq!(
        checkpoint::inspect(&reread).expect("inspect").dtype,
        DType::F64
    );

    // … but not under `Exact`.
    let mut amp = SETUPS[0].build(nd::<f64>(&init(9)));
    refused(
        &mut amp,
        &from_f32,
        &LoadOptions::default().dtype(DTypeConversion::Exact),
        |e| matches!(e, AmpError::DTypeMismatch { index: 0, .. }),
    );

    // f64 → f32 narrows: refused by default, rounded to nearest on request.
    let mut amp = SETUPS[0].build(nd::<f32>(&init(9)));
    refused(
        &mut amp,
        &from_f64,
        &LoadOptions::default(),
        |e| matches!(e, AmpError::DTypeMismatch { index: 0, expected, found } if expected == "f32" && found == "f64"),
    );
    checkpoint::from_bytes_with(
        &mut amp,
        &from_f64,
        &LoadOptions::default().dtype(DTypeConversion::Rounding),
    )
    .expect("rounding");
    for (got, want) in amp.store().params().iter().zip(wide.store().params()) {
        for (&g, &w) in got.iter().zip(want) {
            assert_eq!(g, w as f32);
        }
    }

    // A value too large for f32 is an error under rounding, not an infinity.
    let mut huge = nd::<f64>(&init(9));
    huge.param_mut(1).expect("tensor 1")[[0]] = 1e300;
    let huge = SETUPS[0].build(huge);
    let mut amp = SETUPS[0].build(nd::<f32>(&init(9)));
    refused(
        &mut amp,
        &checkpoint::to_bytes(&huge).expect("to_bytes"),
        &LoadOptions::default().dtype(DTypeConversion::Rounding),
        |e| matches!(e, AmpError::Checkpoint(m) if m.contains("out of the range")),
    );
}

/// A store of host vectors with a declared dtype: the checkpoint's view of a
/// half-precision backend. Values in these tests are exact in every dtype,
/// so `write` stores them as given.
struct HostStore {
    dtype: DType,
    shapes: Vec<Vec<usize>>,
    slots: Vec<Option<Vec<Vec<f64>>>>,
}

impl HostStore {
    fn new(dtype: DType, values: &[(Vec<usize>, Vec<f64>)]) -> Self {
        HostStore {
            dtype,
            shapes: values.iter().map(|(s, _)| s.clone()).collect(),
            // Slot 0 holds the parameters, 1 the gradients, then buffers.
            slots: vec![
                Some(values.iter().map(|(_, v)| v.clone()).collect()),
                Some(values.iter().map(|(_, v)| vec![0.0; v.len()]).collect()),
            ],
        }
    }

    fn index(slot: Slot) -> usize {
        match slot {
            Slot::Params => 0,
            Slot::Grads => 1,
            Slot::Buffer(id) => id.index() + 2,
        }
    }

    fn tensors(&self, slot: Slot) -> Result<&Vec<Vec<f64>>> {
        self.slots
            .get(Self::index(slot))
            .and_then(Option::as_ref)
            .ok_or(AmpError::UnknownBuffer(Self::index(slot)))
    }
}

impl ParamStore for HostStore {
    type Scalar = f32;
    type Norms = Vec<f32>;

    fn num_tensors(&self) -> usize {
        self.shapes.len()
    }
    fn shape(&self, index: usize) -> Result<Vec<usize>> {
        self.shapes
            .get(index)
            .cloned()
            .ok_or(AmpError::IndexOutOfRange {
                index,
                len: self.shapes.len(),
            })
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn zero_grads(&mut self) -> Result<()> {
        Ok(())
    }
    fn grad_mask(&self) -> Result<Vec<bool>> {
        Ok(vec![false; self.shapes.len()])
    }
    fn alloc_buffer(&mut self) -> Result<BufferId> {
        let zeros = self
            .tensors(Slot::Params)?
            .iter()
            .map(|t| vec![0.0; t.len()])
            .collect();
        self.slots.push(Some(zeros));
        Ok(BufferId::new(self.slots.len() - 3))
    }
    fn free_buffer(&mut self, id: BufferId) -> Result<()> {
        self.slots
            .get_mut(id.index() + 2)
            .and_then(Option::take)
            .map(drop)
            .ok_or(AmpError::UnknownBuffer(id.index()))
    }
    fn copy(&mut self, dst: Slot, src: Slot, mask: &[bool]) -> Result<()> {
        let src = self.tensors(src)?.clone();
        let dst = self.slots[Self::index(dst)]
            .as_mut()
            .ok_or(AmpError::UnknownBuffer(0))?;
        for (i, &m) in mask.iter().enumerate() {
            if m {
                dst[i] = src[i].clone();
            }
        }
        Ok(())
    }
    fn scale(&mut self, _: Slot, _: &[f32], _: &[bool]) -> Result<()> {
        Err(AmpError::backend("this test store only saves and loads"))
    }
    fn axpy(&mut self, _: Slot, _: &[f32], _: Slot, _: &[bool]) -> Result<()> {
        Err(AmpError::backend("this test store only saves and loads"))
    }
    fn norms(&mut self, _: Slot, mask: &[bool]) -> Result<Vec<f32>> {
        Ok(vec![0.0; mask.len()])
    }
    fn clip_to_norms(&mut self, _: Slot, _: &Vec<f32>, _: &[f32], _: &[bool]) -> Result<()> {
        Ok(())
    }
    fn norms_to_host(&self, norms: &Vec<f32>) -> Result<Vec<f64>> {
        Ok(norms.iter().map(|&x| f64::from(x)).collect())
    }
    fn all_finite(&mut self, _: Slot, _: &[bool]) -> Result<bool> {
        Ok(true)
    }
    fn read(&self, slot: Slot, index: usize) -> Result<HostTensor> {
        HostTensor::new(
            self.shape(index)?,
            self.dtype,
            self.tensors(slot)?[index].clone(),
        )
    }
    fn write(&mut self, slot: Slot, index: usize, value: &HostTensor) -> Result<()> {
        let expected = self.shape(index)?;
        if value.shape() != expected {
            return Err(AmpError::ShapeMismatch {
                index,
                expected,
                found: value.shape().to_vec(),
            });
        }
        let tensors = self.slots[Self::index(slot)]
            .as_mut()
            .ok_or(AmpError::UnknownBuffer(0))?;
        tensors[index] = value.data().to_vec();
        Ok(())
    }
}

#[test]
fn half_precision_tensors_are_stored_as_f16_and_bf16() {
    // 1, −2, 0.5 and 2⁻¹⁴ (the smallest normal f16) are exact in every dtype.
    let values = vec![
        (vec![2, 2], vec![1.0, -2.0, 0.5, 2f64.powi(-14)]),
        (vec![], vec![-0.0]),
    ];
    for (dtype, safetensors_dtype, bits) in [
        (
            DType::F16,
            safetensors::Dtype::F16,
            [0x3c00u16, 0xc000, 0x3800, 0x0400],
        ),
        (
            DType::BF16,
            safetensors::Dtype::BF16,
            [0x3f80u16, 0xc000, 0x3f00, 0x3880],
        ),
    ] {
        let amp = Amp::sgd(
            HostStore::new(dtype, &values),
            AmpConfig::new(0.1, 0.5),
            SgdConfig::default(),
        )
        .expect("valid");
        let bytes = checkpoint::to_bytes(&amp).expect("to_bytes");
        let file = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
        let view = file.tensor("param.0").expect("param.0");
        assert_eq!(view.dtype(), safetensors_dtype);
        let stored: Vec<u16> = view
            .data()
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(stored, bits, "{dtype}");
        assert_eq!(
            file.tensor("param.1").expect("param.1").data(),
            &[0x00, 0x80]
        );

        // Round trip into the same dtype.
        let mut back = Amp::sgd(
            HostStore::new(dtype, &[(vec![2, 2], vec![0.0; 4]), (vec![], vec![0.0])]),
            AmpConfig::new(0.1, 0.5),
            SgdConfig::default(),
        )
        .expect("valid");
        checkpoint::from_bytes(&mut back, &bytes).expect("same dtype");
        let loaded = back.store().read(Slot::Params, 0).expect("read");
        assert_eq!(loaded.data(), values[0].1);
        assert!(back.store().read(Slot::Params, 1).expect("read").data()[0].is_sign_negative());

        // Half → f32 is lossless.
        let mut wide = Amp::sgd(
            NdStore::from_arrays([
                ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&[2, 2])),
                ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&[])),
            ]),
            AmpConfig::new(0.1, 0.5),
            SgdConfig::default(),
        )
        .expect("valid");
        checkpoint::from_bytes(&mut wide, &bytes).expect("widening");
        let got: Vec<f64> = wide.store().params()[0]
            .iter()
            .map(|&x| f64::from(x))
            .collect();
        assert_eq!(got, values[0].1);

        // f32 → half, and f16 ↔ bf16, narrow: refused by default.
        let other = if dtype == DType::F16 {
            DType::BF16
        } else {
            DType::F16
        };
        let mut half = Amp::sgd(
            HostStore::new(other, &values),
            AmpConfig::new(0.1, 0.5),
            SgdConfig::default(),
        )
        .expect("valid");
        let error = checkpoint::from_bytes(&mut half, &bytes).expect_err("narrowing");
        assert!(matches!(error, AmpError::DTypeMismatch { .. }), "{error}");
        let wide_bytes = checkpoint::to_bytes(&wide).expect("to_bytes");
        let mut half = Amp::sgd(
            HostStore::new(dtype, &values),
            AmpConfig::new(0.1, 0.5),
            SgdConfig::default(),
        )
        .expect("valid");
        let error = checkpoint::from_bytes(&mut half, &wide_bytes).expect_err("narrowing");
        assert!(matches!(error, AmpError::DTypeMismatch { .. }), "{error}");
        checkpoint::from_bytes_with(
            &mut half,
            &wide_bytes,
            &LoadOptions::default().dtype(DTypeConversion::Rounding),
        )
        .expect("rounding");
    }
}

#[test]
fn saves_are_atomic_and_replace_the_previous_checkpoint() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("amp.safetensors");
    let early = nd_amp::<f64>(3);
    let late = nd_amp::<f64>(8);

    checkpoint::save(&early, &path).expect("save");
    checkpoint::save(&late, &path).expect("save over");
    let mut amp = SETUPS[0].build(nd::<f64>(&init(0)));
    checkpoint::load(&mut amp, &path).expect("load");
    assert_eq!(fingerprint(&amp), fingerprint(&late));
    // No temporary file is left behind.
    let entries: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(entries, vec![std::ffi::OsString::from("amp.safetensors")]);

    // A save that cannot complete (the target is a non-empty directory, so
    // the final rename fails) reports an error and removes its temporary file.
    let blocked = dir.path().join("blocked");
    std::fs::create_dir(&blocked).expect("mkdir");
    std::fs::write(blocked.join("keep"), b"x").expect("write");
    let error = checkpoint::save(&late, &blocked).expect_err("cannot replace a directory");
    assert!(matches!(error, AmpError::Checkpoint(_)), "{error}");
    let mut names: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    names.sort();
    assert_eq!(names, ["amp.safetensors", "blocked"]);

    // A crash between writing the temporary file and the rename leaves the
    // previous checkpoint as it was: simulate the debris and load.
    std::fs::write(dir.path().join(".amp.safetensors.tmp-1-0"), b"partial").expect("write");
    let mut amp = SETUPS[0].build(nd::<f64>(&init(0)));
    checkpoint::load(&mut amp, &path).expect("previous checkpoint intact");
    assert_eq!(fingerprint(&amp), fingerprint(&late));

    // Saving into a missing directory fails cleanly.
    let error = checkpoint::save(&late, dir.path().join("missing/amp.safetensors"))
        .expect_err("no such directory");
    assert!(matches!(error, AmpError::Checkpoint(_)), "{error}");
    // A path without a file name.
    assert!(checkpoint::save(&late, "/").is_err());
}

#[test]
fn a_fresh_optimiser_round_trips_and_clears_momentum() {
    // A checkpoint taken before any step holds no momentum: loading it into
    // an optimiser that has stepped resets its momentum, so both continue
    // identically.
    let fresh = SETUPS[0].build(nd::<f64>(&init(1)));
    let bytes = checkpoint::to_bytes(&fresh).expect("to_bytes");
    let mut stepped = nd_amp::<f64>(4);
    checkpoint::from_bytes(&mut stepped, &bytes).expect("load");
    assert_eq!(fingerprint(&stepped), fingerprint(&fresh));
    let mut fresh = fresh;
    for t in 0..6 {
        train_step(&mut fresh, t).expect("step");
        train_step(&mut stepped, t).expect("step");
    }
    assert_eq!(fingerprint(&stepped), fingerprint(&fresh));
}
