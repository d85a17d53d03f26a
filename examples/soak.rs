//! Soak test (a program, not a test): 10 000 AMP steps per CPU backend
//! compiled in, reporting resident memory at the start and the end, to catch
//! leaks in long runs — buffers, host copies, checkpoint round trips and
//! skipped steps included.
//!
//! ```text
//! cargo run --release --example soak            # every backend compiled in
//! cargo run --release --example soak -- 2000    # fewer steps
//! ```
//!
//! Each backend trains the same small model (about 17 k parameters in four
//! tensors) through the backend-neutral `ParamStore::read`/`write`, so the
//! host-side gradient code is shared. Every 500th step injects a NaN loss
//! (skipped under `NonFinitePolicy::Skip`), and every 1000th step serialises
//! a checkpoint and loads it back. Resident memory (VmRSS from
//! /proc/self/status, Linux only) is read before the store is built, after a
//! 100-step warm-up (once every buffer is allocated), midway and at the end.
//! A leak grows with the step count, so the growth over the second half is
//! the number that shows one; growth before it is allocator caching (the
//! first checkpoint round trip, for example).

use std::time::Instant;

use amp::{
    checkpoint, Amp, AmpConfig, AmpError, DType, HostTensor, NonFinitePolicy, ParamStore, Result,
    SgdConfig, Slot,
};

const SHAPES: [&[usize]; 4] = [&[256, 64], &[64], &[64, 10], &[10]];
const WARM_UP: u64 = 100;

/// Resident set size in KiB, from /proc/self/status (`None` off Linux).
fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn fmt_kib(kib: Option<u64>) -> String {
    kib.map_or_else(
        || "n/a".to_string(),
        |k| format!("{:.1} MiB", k as f64 / 1024.0),
    )
}

fn growth(from: Option<u64>, to: Option<u64>) -> String {
    match (from, to) {
        (Some(a), Some(b)) => format!("{:+} KiB", b as i64 - a as i64),
        _ => "n/a".to_string(),
    }
}

/// The initial weights, in `dtype`'s declared type (values are f64 on the
/// host; each store rounds them).
fn init(dtype: DType) -> Vec<HostTensor> {
    SHAPES
        .iter()
        .enumerate()
        .map(|(i, shape)| {
            let numel: usize = shape.iter().product();
            let scale = 1.0 / (shape[0] as f64).sqrt();
            let data = (0..numel)
                .map(|j| scale * ((i * 7919 + j) as f64 * 0.618).sin())
                .collect();
            HostTensor::new(shape.to_vec(), dtype, data)
        })
        .collect::<Result<Vec<_>>>()
        .unwrap_or_default()
}

/// Runs `steps` AMP steps on `store` and prints the memory report.
fn soak<S: ParamStore>(name: &str, make: impl FnOnce() -> Result<S>, steps: u64) -> Result<()> {
    let start = rss_kib();
    let clock = Instant::now();
    let config = AmpConfig::new(0.01, 0.5)
        .weight_decay(1e-4)
        .non_finite(NonFinitePolicy::Skip);
    let mut amp = Amp::sgd(make()?, config, SgdConfig::nesterov(0.9))?;
    let mut warm = None;
    let mut midway = None;
    let mut loss = f64::NAN;
    for t in 0..steps {
        let poisoned = t % 500 == 499;
        let report = amp.step(|store: &mut S, _pass| -> Result<((), f64)> {
            // Loss Σ ½·a·θ² + c_t·θ with a step-dependent c_t: gradient a·θ + c_t.
            let mut loss = 0.0;
            for i in 0..store.num_tensors() {
                let theta = store.read(Slot::Params, i)?;
                let a = 1.0 + i as f64 * 0.25;
                let c = 0.1 * (t as f64 * 0.01 + i as f64).sin();
                let grad = theta
                    .data()
                    .iter()
                    .map(|&x| {
                        loss += 0.5 * a * x * x + c * x;
                        a * x + c
                    })
                    .collect();
                store.write(
                    Slot::Grads,
                    i,
                    &HostTensor::new(theta.shape().to_vec(), theta.dtype(), grad)?,
                )?;
            }
            Ok(((), if poisoned { f64::NAN } else { loss }))
        })?;
        if report.skipped.is_none() {
            loss = report.loss;
        }
        if t % 1000 == 999 {
            let bytes = checkpoint::to_bytes(&amp)?;
            checkpoint::from_bytes(&mut amp, &bytes)?;
        }
        if t + 1 == WARM_UP {
            warm = rss_kib();
        }
        if t + 1 == steps / 2 {
            midway = rss_kib();
        }
    }
    let end = rss_kib();
    println!(
        "{name:<14} {steps} steps ({} skipped) in {:.2?}, final loss {loss:.6}",
        amp.skipped_steps(),
        clock.elapsed()
    );
    println!(
        "{:<14} RSS start {}, after {WARM_UP}-step warm-up {}, midway {}, end {}",
        "",
        fmt_kib(start),
        fmt_kib(warm),
        fmt_kib(midway),
        fmt_kib(end),
    );
    println!(
        "{:<14} growth: {} since start, {} since warm-up, {} over the second half",
        "",
        growth(start, end),
        growth(warm, end),
        growth(midway, end),
    );
    Ok(())
}

fn main() -> std::result::Result<(), AmpError> {
    let steps = match std::env::args().nth(1) {
        Some(arg) => arg
            .parse()
            .map_err(|_| AmpError::config("steps", format!("not a number: {arg:?}")))?,
        None => 10_000,
    };
    println!("process RSS at start: {}", fmt_kib(rss_kib()));

    // One call per CPU backend compiled in. To add a backend, add a block
    // behind its cargo feature that builds its store from `init(dtype)`.
    #[cfg(feature = "ndarray")]
    {
        use amp::backend::ndarray::NdStore;
        fn nd<T: amp::backend::ndarray::Element>(init: Vec<HostTensor>) -> Result<NdStore<T>> {
            let arrays = init
                .into_iter()
                .map(|t| {
                    let data = t.data().iter().map(|&x| T::from_f64_rounded(x)).collect();
                    ndarray::ArrayD::from_shape_vec(t.shape(), data).map_err(AmpError::backend)
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(NdStore::new(arrays))
        }
        soak("ndarray/f32", || nd::<f32>(init(DType::F32)), steps)?;
        soak("ndarray/f64", || nd::<f64>(init(DType::F64)), steps)?;
    }

    #[cfg(feature = "candle")]
    {
        use amp::backend::candle::CandleStore;
        let cpu = candle_core::Device::Cpu;
        soak(
            "candle/f32",
            || CandleStore::from_host(&init(DType::F32), &cpu),
            steps,
        )?;
        soak(
            "candle/f64",
            || CandleStore::from_host(&init(DType::F64), &cpu),
            steps,
        )?;
    }

    // Feature `tch` (libtorch, being written in amp-tch): add its CPU store
    // here, behind `#[cfg(feature = "tch")]`, in the same way.

    println!("process RSS at end: {}", fmt_kib(rss_kib()));
    Ok(())
}
