//! Interleaved measurement: blocks of two (or more) contenders run in turn,
//! A B A B …, after a warm-up, and the figure is the median of the per-round
//! ratios, so that a change of machine load during the run hits both sides
//! of each ratio alike.

use std::hint::black_box;
use std::time::Instant;

use amp::BoxError;

use crate::fixtures::Steps;

/// Median of `values` (mean of the middle two for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Smallest and largest finite value.
pub fn range(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .filter(|x| x.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

/// How long blocks are and how many rounds are run.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Seconds a block should last, at least.
    pub block_secs: f64,
    /// Interleaved rounds.
    pub rounds: usize,
    /// Warm-up seconds per contender (at least one step).
    pub warmup_secs: f64,
}

/// Runs `s` for about `secs` (at least one step) and returns seconds per step.
pub fn warm_up(s: &mut dyn Steps, secs: f64) -> Result<f64, BoxError> {
    let mut per = s.run(1)?.per_step();
    let mut spent = per;
    while spent < secs {
        let n = ((secs - spent) / per.max(1e-9)).ceil().clamp(1.0, 1e6) as usize;
        let t = s.run(n)?;
        per = t.per_step();
        spent += t.total.as_secs_f64();
    }
    Ok(per)
}

/// Steps per block so that a block of steps of `per_step` seconds lasts
/// `plan.block_secs`.
pub fn block_len(per_step: f64, plan: &Plan) -> usize {
    (plan.block_secs / per_step.max(1e-9))
        .ceil()
        .clamp(1.0, 1e7) as usize
}

/// Per-round results of an interleaved comparison of ERM (A) and AMP (B).
#[derive(Clone, Debug, Default)]
pub struct PairResult {
    /// Seconds per step of A, per round.
    pub a: Vec<f64>,
    /// Seconds per step of B, per round.
    pub b: Vec<f64>,
    /// B / A, per round.
    pub ratios: Vec<f64>,
    /// Seconds per step of A outside the closure (the optimiser's own), per
    /// round.
    pub a_opt: Vec<f64>,
    /// Seconds per step of B outside the closure, per round.
    pub b_opt: Vec<f64>,
}

/// Warms both up, then runs `plan.rounds` rounds of one A block and one B
/// block of the same number of steps; `optimizer_only` times only what is
/// outside the closure.
pub fn interleave(
    a: &mut dyn Steps,
    b: &mut dyn Steps,
    plan: &Plan,
    optimizer_only: bool,
) -> Result<PairResult, BoxError> {
    let per_a = warm_up(a, plan.warmup_secs)?;
    let per_b = warm_up(b, plan.warmup_secs)?;
    let n = block_len(per_a.max(per_b) * 0.5 + per_a.min(per_b) * 0.5, plan);
    let mut out = PairResult::default();
    for _ in 0..plan.rounds {
        let ta = a.run(n)?;
        let tb = b.run(n)?;
        let (sa, sb) = if optimizer_only {
            (ta.optimizer_per_step(), tb.optimizer_per_step())
        } else {
            (ta.per_step(), tb.per_step())
        };
        out.a.push(sa);
        out.b.push(sb);
        out.a_opt.push(ta.optimizer_per_step());
        out.b_opt.push(tb.optimizer_per_step());
        out.ratios.push(sb / sa);
    }
    Ok(out)
}

/// A plain copy of `n` f32, the memory-bandwidth floor: 8·n bytes (read and
/// written) per copy, on one thread (`memcpy`) or split over two.
pub struct CopyFloor {
    src: Vec<f32>,
    dst: Vec<f32>,
}

impl CopyFloor {
    /// Buffers of `n` elements, touched once so that pages are mapped.
    pub fn new(n: usize) -> Self {
        CopyFloor {
            src: vec![1.0; n],
            dst: vec![0.0; n],
        }
    }

    /// Bytes one copy reads and writes.
    pub fn bytes(&self) -> f64 {
        8.0 * self.src.len() as f64
    }

    /// Seconds per copy over `reps` copies, on `threads` threads (1 or 2).
    pub fn time(&mut self, reps: usize, threads: usize) -> f64 {
        let start = Instant::now();
        for _ in 0..reps {
            if threads <= 1 || self.src.len() < 1 << 16 {
                self.dst.copy_from_slice(&self.src);
            } else {
                let half = self.src.len() / 2;
                let (d0, d1) = self.dst.split_at_mut(half);
                let (s0, s1) = self.src.split_at(half);
                std::thread::scope(|scope| {
                    scope.spawn(|| d1.copy_from_slice(s1));
                    d0.copy_from_slice(s0);
                });
            }
            black_box(&mut self.dst);
        }
        start.elapsed().as_secs_f64() / reps as f64
    }

    /// Copies per block of `plan.block_secs`, from one timed copy.
    pub fn reps(&mut self, plan: &Plan) -> usize {
        let once = self.time(1, 1).min(self.time(1, 1));
        (plan.block_secs / once.max(1e-9)).ceil().clamp(1.0, 1e7) as usize
    }

    /// Bytes per second of the faster of one and two threads, timed now.
    pub fn bandwidth(&mut self, reps: usize) -> (f64, f64) {
        let one = self.bytes() / self.time(reps, 1);
        let two = self.bytes() / self.time(reps, 2);
        (one, two)
    }
}
