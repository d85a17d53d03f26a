//! The algorithm of `algorithm.md`, transcribed loop by loop in plain `f64`,
//! with no `ParamStore` in between. It is the specification the ndarray
//! oracle is checked against.
//!
//! It keeps the index loops and the explicit `x + (−1)·δ` / `x + 1·δ` forms of
//! the specification on purpose: they are the operations, in the order, that
//! a store performs.
#![allow(
    clippy::needless_range_loop,
    clippy::assign_op_pattern,
    clippy::neg_multiply,
    clippy::identity_op
)]

use amp_core::{AdamConfig, AmpConfig, RestoreMode, SgdConfig};

use crate::Objective;

/// Per-tensor hyper-parameters resolved from the groups.
#[derive(Clone, Debug)]
pub struct PerTensor {
    /// Outer learning rate.
    pub lr: Vec<f64>,
    /// Perturbation radius ε.
    pub epsilon: Vec<f64>,
    /// Inner learning rate ζ.
    pub inner_lr: Vec<f64>,
    /// Weight decay.
    pub weight_decay: Vec<f64>,
}

impl PerTensor {
    /// Resolves `config`'s groups for `n` tensors (the groups are assumed
    /// valid).
    pub fn resolve(config: &AmpConfig, n: usize) -> Self {
        let mut out = PerTensor {
            lr: vec![config.lr; n],
            epsilon: vec![config.epsilon; n],
            inner_lr: vec![config.inner_lr; n],
            weight_decay: vec![config.weight_decay; n],
        };
        let listed: Vec<usize> = config
            .groups
            .iter()
            .flat_map(|g| g.tensors.clone())
            .collect();
        for group in &config.groups {
            let rest = (0..n).filter(|i| group.rest && !listed.contains(i));
            for i in group.tensors.iter().copied().chain(rest) {
                out.lr[i] = group.lr.unwrap_or(config.lr);
                out.epsilon[i] = group.epsilon.unwrap_or(config.epsilon);
                out.inner_lr[i] = group.inner_lr.unwrap_or(config.inner_lr);
                out.weight_decay[i] = group.weight_decay.unwrap_or(config.weight_decay);
            }
        }
        out
    }
}

/// The state of a reference run.
#[derive(Clone, Debug, PartialEq)]
pub struct State {
    /// The weights θ.
    pub params: Vec<Vec<f64>>,
    /// The momentum buffers (`None` before a tensor's first step).
    pub momentum: Vec<Option<Vec<f64>>>,
    /// Adam's first moments (`None` before a tensor's first step).
    pub exp_avg: Vec<Option<Vec<f64>>>,
    /// Adam's second moments.
    pub exp_avg_sq: Vec<Option<Vec<f64>>>,
    /// AMSGrad's running maximum of the second moments.
    pub max_exp_avg_sq: Vec<Option<Vec<f64>>>,
    /// Adam's per-tensor step counts.
    pub adam_steps: Vec<u64>,
    /// Steps taken.
    pub steps_taken: u64,
}

impl State {
    /// The state before the first step: weights `params`, no optimiser
    /// state.
    pub fn new(params: Vec<Vec<f64>>) -> Self {
        let n = params.len();
        State {
            params,
            momentum: vec![None; n],
            exp_avg: vec![None; n],
            exp_avg_sq: vec![None; n],
            max_exp_avg_sq: vec![None; n],
            adam_steps: vec![0; n],
            steps_taken: 0,
        }
    }
}

/// What one reference step reports.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// L(θ).
    pub loss: f64,
    /// L(θ + δₖ), k = 1..K.
    pub perturbed_losses: Vec<f64>,
    /// ‖δ_K‖ per tensor after the last projection.
    pub perturbation_norms: Vec<f64>,
    /// Closure calls.
    pub calls: usize,
}

/// One AMP step followed by one step of the base optimiser (SGD, or Adam
/// when `adam` is given), exactly as specified.
pub fn step(
    state: &mut State,
    objective: &Objective,
    config: &AmpConfig,
    sgd: &SgdConfig,
    adam: Option<&AdamConfig>,
) -> Report {
    let n = state.params.len();
    let hyper = PerTensor::resolve(config, n);
    let theta = state.params.clone();

    // 1. Clean pass.
    let (loss, mut grads) = objective.evaluate(&state.params);
    let active: Vec<bool> = grads.iter().map(Option::is_some).collect();
    let mut report = Report {
        loss,
        perturbed_losses: Vec::new(),
        perturbation_norms: vec![0.0; n],
        calls: 1,
    };

    // 2.–3. Inner loop, on the steps the recipes (start_step, interval)
    // perturb.
    let taken = state.steps_taken;
    state.steps_taken += 1;
    let perturb = taken >= config.start_step && (taken - config.start_step) % config.interval == 0;
    let k_max = if perturb { config.inner_iter } else { 0 };
    let mut delta: Vec<Vec<f64>> = state.params.iter().map(|p| vec![0.0; p.len()]).collect();
    for k in 1..=k_max {
        for i in 0..n {
            let Some(g) = &grads[i] else { continue };
            if config.restore == RestoreMode::Subtract && k > 1 {
                for j in 0..g.len() {
                    state.params[i][j] = state.params[i][j] + (-1.0) * delta[i][j];
                }
            }
            for j in 0..g.len() {
                // δ starts at zero; the first ascent is δ = ζ·g.
                delta[i][j] = if k == 1 {
                    hyper.inner_lr[i] * g[j]
                } else {
                    delta[i][j] + hyper.inner_lr[i] * g[j]
                };
            }
            let norm = delta[i].iter().map(|x| x * x).sum::<f64>().sqrt();
            let coefficient = (hyper.epsilon[i] / (norm + 1e-12)).min(1.0);
            for x in &mut delta[i] {
                *x *= coefficient;
            }
            report.perturbation_norms[i] = norm * coefficient;
            if config.restore == RestoreMode::Copy {
                state.params[i].clone_from(&theta[i]);
            }
            for j in 0..g.len() {
                state.params[i][j] = state.params[i][j] + 1.0 * delta[i][j];
            }
        }
        let (loss, g) = objective.evaluate(&state.params);
        report.perturbed_losses.push(loss);
        report.calls += 1;
        grads = g;
    }

    // 4. Restore.
    if k_max > 0 {
        for i in 0..n {
            if !active[i] {
                continue;
            }
            match config.restore {
                RestoreMode::Copy => state.params[i].clone_from(&theta[i]),
                RestoreMode::Subtract => {
                    for j in 0..delta[i].len() {
                        state.params[i][j] = state.params[i][j] + (-1.0) * delta[i][j];
                    }
                }
            }
        }
    }

    // 5. The base step.
    if let Some(adam) = adam {
        adam_step(state, &grads, &active, &hyper, adam);
        return report;
    }
    // SGD with PyTorch semantics.
    for i in 0..n {
        if !active[i] {
            continue;
        }
        let g = grads[i].as_ref().expect("active tensors keep a gradient");
        let wd = hyper.weight_decay[i];
        let mut d: Vec<f64> = g
            .iter()
            .zip(&state.params[i])
            .map(|(g, p)| if wd != 0.0 { g + wd * p } else { *g })
            .collect();
        if sgd.momentum != 0.0 {
            let buf = match state.momentum[i].take() {
                None => d.clone(),
                Some(mut buf) => {
                    for (b, x) in buf.iter_mut().zip(&d) {
                        *b = *b * sgd.momentum;
                        *b = *b + (1.0 - sgd.dampening) * x;
                    }
                    buf
                }
            };
            if sgd.nesterov {
                for (x, b) in d.iter_mut().zip(&buf) {
                    *x = *x + sgd.momentum * b;
                }
            } else {
                d.clone_from(&buf);
            }
            state.momentum[i] = Some(buf);
        }
        for (p, x) in state.params[i].iter_mut().zip(&d) {
            *p = *p + (-hyper.lr[i]) * x;
        }
    }
    report
}

/// Adam / AdamW with PyTorch's semantics, element by element, in the order
/// of libtorch's C++ implementation.
fn adam_step(
    state: &mut State,
    grads: &[Option<Vec<f64>>],
    active: &[bool],
    hyper: &PerTensor,
    adam: &AdamConfig,
) {
    for i in 0..state.params.len() {
        if !active[i] {
            continue;
        }
        let mut g = grads[i].clone().expect("active tensors keep a gradient");
        let len = g.len();
        let (lr, wd) = (hyper.lr[i], hyper.weight_decay[i]);
        let p = &mut state.params[i];
        if wd != 0.0 {
            if adam.decoupled_weight_decay {
                let shrink = 1.0 - lr * wd;
                for x in p.iter_mut() {
                    *x = *x * shrink;
                }
            } else {
                for j in 0..len {
                    g[j] = g[j] + wd * p[j];
                }
            }
        }
        let m = state.exp_avg[i].get_or_insert_with(|| vec![0.0; len]);
        for j in 0..len {
            m[j] = m[j] * adam.beta1;
            m[j] = m[j] + (1.0 - adam.beta1) * g[j];
        }
        let v = state.exp_avg_sq[i].get_or_insert_with(|| vec![0.0; len]);
        for j in 0..len {
            v[j] = v[j] * adam.beta2;
            v[j] = v[j] + (1.0 - adam.beta2) * g[j] * g[j];
        }
        let mut den = v.clone();
        if adam.amsgrad {
            let max = state.max_exp_avg_sq[i].get_or_insert_with(|| vec![0.0; len]);
            for j in 0..len {
                max[j] = if max[j].is_nan() || v[j].is_nan() {
                    f64::NAN
                } else if max[j] < v[j] {
                    v[j]
                } else {
                    max[j]
                };
            }
            den.clone_from(max);
        }
        state.adam_steps[i] += 1;
        let t = state.adam_steps[i] as f64;
        let step_size = lr / (1.0 - adam.beta1.powf(t));
        let correction2 = (1.0 - adam.beta2.powf(t)).sqrt();
        let m = state.exp_avg[i].as_ref().expect("set above");
        for j in 0..len {
            p[j] = p[j] + (-step_size) * m[j] / (den[j].sqrt() / correction2 + adam.eps);
        }
    }
}
