//! The backends the bench can run on the requested device, and the generic
//! probes every backend shares: the logical bytes of one optimizer step
//! (through bench_report's `Metered`) and its host reads (through
//! [`Counted`]).

use std::cell::Cell;
use std::rc::Rc;

use amp::{BoxError, ParamStore, Pass};

use crate::fixtures::{amp_config, Closure, Trainer, OPT_EPSILON, OPT_LR};
use crate::metered::Metered;
use crate::syncs::Counted;
use crate::{Backend, Where};

/// A device-to-device copy: `time(reps)` gives seconds per copy.
pub struct CopyTimer(Box<dyn FnMut(usize) -> Result<f64, BoxError>>);

impl CopyTimer {
    /// Seconds per copy over `reps` copies.
    pub fn time(&mut self, reps: usize) -> Result<f64, BoxError> {
        (self.0)(reps)
    }
}

fn no_sync<T>(_: &T) {}

/// Logical bytes the batched primitives move in one AMP (K = 1) step, after
/// two warm-up steps (so that the momentum buffer exists).
pub fn bytes_per_step<S: ParamStore + 'static>(
    store: S,
    mut closure: Closure<S>,
) -> Result<u64, BoxError> {
    let metered = crate::metered::metered(store, no_sync::<S>)?;
    let closure: Closure<Metered<S>> =
        Box::new(move |m: &mut Metered<S>, pass: Pass| closure(m.inner_mut(), pass));
    let config = amp_config(1, OPT_LR, OPT_EPSILON);
    let mut trainer = Trainer::new(metered, config, closure, no_sync::<Metered<S>>)?;
    trainer.steps(2)?;
    trainer.amp.store().hook().reset();
    trainer.steps(1)?;
    Ok(trainer.amp.store().hook().meter().total_bytes())
}

/// Host reads per AMP (K = 1) step over ten steps after two warm-up steps:
/// store calls that return host data, and closure calls (each of which reads
/// its loss once in a real training closure).
pub fn host_reads_per_step<S: ParamStore + 'static>(
    store: S,
    mut closure: Closure<S>,
) -> Result<(f64, f64), BoxError> {
    let calls = Rc::new(Cell::new(0u64));
    let seen = Rc::clone(&calls);
    let closure: Closure<Counted<S>> = Box::new(move |c: &mut Counted<S>, pass: Pass| {
        seen.set(seen.get() + 1);
        closure(c.inner_mut(), pass)
    });
    let config = amp_config(1, OPT_LR, OPT_EPSILON);
    let counted = crate::syncs::counted(store);
    let mut trainer = Trainer::new(counted, config, closure, no_sync::<Counted<S>>)?;
    trainer.steps(2)?;
    trainer.amp.store().hook().reset();
    calls.set(0);
    let steps = 10;
    trainer.steps(steps)?;
    let per = |n: u64| n as f64 / steps as f64;
    Ok((per(trainer.amp.store().hook().reads()), per(calls.get())))
}

/// The compiled-in backends that can run on `device`, and for the others
/// why not.
pub fn backends(device: Where) -> (Vec<Backend>, Vec<(&'static str, String)>) {
    #[allow(unused_mut)]
    let mut ok = Vec::new();
    #[allow(unused_mut)]
    let mut not = Vec::new();
    #[cfg(feature = "candle")]
    match candle_device(device) {
        Ok(d) => {
            ok.push(candle(d.clone(), false));
            ok.push(candle(d, true));
        }
        Err(e) => not.push(("candle", e)),
    }
    #[cfg(not(feature = "candle"))]
    not.push(("candle", "not compiled in (feature `candle`)".to_string()));
    #[cfg(feature = "tch")]
    match tch_device(device) {
        Ok(d) => {
            ok.push(tch(d, false));
            ok.push(tch(d, true));
        }
        Err(e) => not.push(("tch", e)),
    }
    #[cfg(not(feature = "tch"))]
    not.push(("tch", "not compiled in (feature `tch`)".to_string()));
    (ok, not)
}

#[cfg(feature = "candle")]
fn candle_device(device: Where) -> Result<amp::backend::candle::candle_core::Device, String> {
    match device {
        Where::Cpu => Ok(amp::backend::candle::candle_core::Device::Cpu),
        Where::Cuda => amp::backend::candle::cuda_device(0).map_err(|e| e.to_string()),
    }
}

#[cfg(feature = "candle")]
fn candle(device: amp::backend::candle::candle_core::Device, in_place: bool) -> Backend {
    use crate::on_candle as c;
    let on = c::On {
        device: device.clone(),
        in_place,
    };
    let (o1, o2, o3, o4, o5) = (on.clone(), on.clone(), on.clone(), on.clone(), on);
    Backend {
        name: if in_place {
            "candle-in-place"
        } else {
            "candle"
        },
        mlp: Box::new(move |p| {
            let (erm, amp) = c::mlp_pair(p, &o1)?;
            Ok((Box::new(erm), Box::new(amp)))
        }),
        cnn: Box::new(move |p| {
            let (erm, amp) = c::cnn_pair(p, &o2)?;
            Ok((Box::new(erm), Box::new(amp)))
        }),
        opt: Box::new(move |sizes| Ok(Box::new(c::opt_trainer(sizes, 1, &o3)?))),
        bytes: Box::new(move |sizes| {
            let (store, closure) = c::opt_fixture(sizes, &o4)?;
            bytes_per_step(store, closure)
        }),
        syncs: Box::new(move |sizes| {
            let (store, closure) = c::opt_fixture(sizes, &o5)?;
            host_reads_per_step(store, closure)
        }),
        launches: in_place.then_some(amp::backend::candle::cuda_kernel_launches as fn() -> u64),
        copy: Box::new(move |n| {
            let mut floor = c::CopyFloor::new(n, &device)?;
            Ok(CopyTimer(Box::new(move |reps| floor.time(reps))))
        }),
    }
}

#[cfg(feature = "tch")]
fn tch_device(device: Where) -> Result<tch::Device, String> {
    match device {
        Where::Cpu => Ok(tch::Device::Cpu),
        Where::Cuda if tch::Cuda::is_available() => Ok(tch::Device::Cuda(0)),
        Where::Cuda => Err(
            "tch::Cuda::is_available() is false (no GPU, or libtorch without its CUDA part loaded)"
                .into(),
        ),
    }
}

#[cfg(feature = "tch")]
fn tch(device: tch::Device, flat: bool) -> Backend {
    use crate::on_tch as t;
    Backend {
        name: if flat { "tch-flat" } else { "tch" },
        mlp: Box::new(move |p| {
            let (erm, amp) = t::mlp_pair(p, flat, device)?;
            Ok((Box::new(erm), Box::new(amp)))
        }),
        cnn: Box::new(move |p| {
            let (erm, amp) = t::cnn_pair(p, flat, device)?;
            Ok((Box::new(erm), Box::new(amp)))
        }),
        opt: Box::new(move |sizes| Ok(Box::new(t::opt_trainer(sizes, 1, flat, device)?))),
        bytes: Box::new(move |sizes| {
            let (store, closure) = t::opt_fixture(sizes, flat, device)?;
            bytes_per_step(store, closure)
        }),
        syncs: Box::new(move |sizes| {
            let (store, closure) = t::opt_fixture(sizes, flat, device)?;
            host_reads_per_step(store, closure)
        }),
        launches: None,
        copy: Box::new(move |n| {
            let mut floor = t::CopyFloor::new(n, device)?;
            Ok(CopyTimer(Box::new(move |reps| floor.time(reps))))
        }),
    }
}
