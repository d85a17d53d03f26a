//! A fixed grid of configurations against the ndarray `f64` oracle: every
//! SGD variant (plain, momentum with dampening, Nesterov) with and without
//! weight decay, K = 0, 1, 2, an ε that always clips and one that never
//! does, copy and subtract restore, and parameter groups with their own lr,
//! ε, ζ and weight decay — four steps each, on one model with a matrix, a
//! vector, a 0-d scalar, a 3-d tensor, an empty tensor and a tensor that
//! never gets a gradient.
//!
//! The conformance suite's properties draw their cases at random; this grid
//! is the deterministic complement every backend runs the same way
//! ([`matches_oracle`]), at the tolerances of [`Tolerance::for_dtype`]
//! (`f16` and `bf16` included, for stores that compute in half precision).
//!
//! [`Tolerance::for_dtype`]: crate::Tolerance::for_dtype

use amp_core::{AmpConfig, DType, HostTensor, ParamGroup, RestoreMode, SgdConfig};

use crate::{properties, Case, Objective, StoreFactory};

/// Shapes of the grid's model; tensor [`FROZEN`] never gets a gradient.
pub const SHAPES: &[&[usize]] = &[&[3, 4], &[4], &[], &[2, 2, 3], &[0, 3], &[5]];
/// The tensor the loss does not depend on.
pub const FROZEN: usize = 5;
/// Steps of every case.
pub const STEPS: usize = 4;

/// `n` deterministic values in [-1, 1) from `seed` (a linear congruential
/// generator: the same values on every platform), for the grid's weights
/// and for tests that need fixed, irregular data.
pub fn values(seed: u64, n: usize) -> Vec<f64> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect()
}

/// The model's initial weights and its objective (curvature in [0.5, 1.5],
/// coupling 0.5 with weights normalised by the parameter count).
fn model() -> (Vec<HostTensor>, Objective) {
    let sizes: Vec<usize> = SHAPES.iter().map(|s| s.iter().product()).collect();
    let init = SHAPES
        .iter()
        .zip(&sizes)
        .enumerate()
        .map(|(i, (shape, &n))| {
            HostTensor::new(shape.to_vec(), DType::F64, values(i as u64 + 1, n))
                .expect("as many values as the shape has")
        })
        .collect();
    let norm = (sizes.iter().sum::<usize>() as f64).sqrt();
    let per_tensor = |seed: u64, f: &dyn Fn(f64) -> f64| -> Vec<Vec<f64>> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| values(seed + 10 * i as u64, n).into_iter().map(f).collect())
            .collect()
    };
    let objective = Objective {
        curvature: per_tensor(101, &|v| 1.0 + 0.5 * v),
        center: per_tensor(202, &|v| v),
        coupling_weights: per_tensor(303, &|v| v / norm),
        coupling: 0.5,
        frozen: (0..SHAPES.len()).map(|i| i == FROZEN).collect(),
    };
    (init, objective)
}

/// The grid: a name and a case per configuration.
pub fn cases() -> Vec<(String, Case)> {
    let (init, objective) = model();
    let case = |config: AmpConfig, sgd: SgdConfig| Case {
        init: init.clone(),
        objective: objective.clone(),
        config,
        sgd,
        adam: None,
        steps: STEPS,
    };
    let sgds = [
        ("sgd", SgdConfig::default()),
        (
            "momentum",
            SgdConfig {
                dampening: 0.1,
                ..SgdConfig::momentum(0.9)
            },
        ),
        ("nesterov", SgdConfig::nesterov(0.9)),
    ];
    let mut out = Vec::new();
    for (sgd_name, sgd) in sgds {
        for weight_decay in [0.0, 1e-2] {
            for inner_iter in [0, 1, 2] {
                // ε = 100 never clips (‖ζ g‖ stays below 20 here); ε = 0.05
                // always does.
                for epsilon in [100.0, 0.05] {
                    for restore in [RestoreMode::Copy, RestoreMode::Subtract] {
                        let inner_lr = if inner_iter == 2 { 0.5 } else { 1.0 };
                        let config = AmpConfig::new(0.1, epsilon)
                            .inner_lr(inner_lr)
                            .inner_iter(inner_iter)
                            .weight_decay(weight_decay)
                            .restore(restore);
                        let name = format!(
                            "{sgd_name} wd={weight_decay} K={inner_iter} eps={epsilon} \
                             zeta={inner_lr} {restore:?}"
                        );
                        out.push((name, case(config, sgd)));
                    }
                }
            }
        }
    }
    // Groups with their own lr, ε, ζ and weight decay: one batched call sees
    // several distinct coefficients.
    for (k, restore) in [
        (1, RestoreMode::Copy),
        (2, RestoreMode::Subtract),
        (2, RestoreMode::Copy),
    ] {
        let config = AmpConfig::new(0.05, 0.2)
            .inner_iter(k)
            .restore(restore)
            .group(ParamGroup::new([0, 5]).weight_decay(1e-3))
            .group(ParamGroup::new([1, 2]).lr(0.2).epsilon(0.01).inner_lr(0.7))
            .group(ParamGroup::new([3]).lr(0.01).epsilon(50.0).inner_lr(2.0))
            .group(ParamGroup::new([4]).lr(0.3).weight_decay(0.1));
        out.push((
            format!("groups K={k} {restore:?}"),
            case(config, SgdConfig::nesterov(0.8)),
        ));
    }
    out
}

/// Runs every case of the grid on `factory`'s stores of `dtype` and on the
/// oracle, and compares weights, the base optimiser's state, losses, ‖δ‖,
/// clip counts and closure calls
/// ([`properties::matches_oracle`]); the number of cases run, or the
/// first disagreement with its case's name.
pub fn matches_oracle<F: StoreFactory>(factory: &F, dtype: DType) -> Result<usize, String> {
    let cases = cases();
    for (name, case) in &cases {
        let case = case.clone().fitted_to(factory);
        properties::matches_oracle(factory, &case, dtype).map_err(|e| format!("{name}: {e}"))?;
    }
    Ok(cases.len())
}
