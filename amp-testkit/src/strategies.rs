//! proptest generators of [`Case`]s: random tensor counts and shapes (0-d
//! scalars, empty tensors, single elements, long vectors, 4-d conv kernels),
//! values of tiny, unit and large magnitude, random hyper-parameters
//! (ε = 0 included, K from 0 to 3), SGD or Adam as the base, parameter
//! groups, frozen tensors and multi-step runs.

use amp_core::{AdamConfig, AmpConfig, DType, HostTensor, ParamGroup, RestoreMode, SgdConfig};
use proptest::prelude::*;

use crate::{Case, Objective};

/// A tensor shape of one of the interesting kinds.
pub fn shape() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        2 => Just(vec![]),
        1 => Just(vec![0]),
        2 => Just(vec![1]),
        3 => (2usize..40).prop_map(|n| vec![n]),
        1 => (100usize..400).prop_map(|n| vec![n]),
        2 => (1usize..6, 1usize..6).prop_map(|(a, b)| vec![a, b]),
        1 => (1usize..4, 1usize..3).prop_map(|(o, i)| vec![o, i, 3, 3]),
    ]
}

/// A magnitude class for initial values and centres.
pub fn magnitude() -> impl Strategy<Value = f64> {
    prop_oneof![1 => Just(1e-4), 4 => Just(1.0), 1 => Just(1e3)]
}

fn values(n: usize, scale: f64) -> impl Strategy<Value = Vec<f64>> {
    proptest::collection::vec(-1.0f64..1.0, n)
        .prop_map(move |v| v.into_iter().map(|x| x * scale).collect())
}

/// One tensor: (shape, initial values, curvature, centre, coupling weights).
type TensorParts = (Vec<usize>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>);

fn tensor() -> impl Strategy<Value = TensorParts> {
    (shape(), magnitude()).prop_flat_map(|(shape, scale)| {
        let n: usize = shape.iter().product();
        (
            Just(shape),
            values(n, scale),
            proptest::collection::vec(0.1f64..2.0, n),
            values(n, scale),
            values(n, 1.0),
        )
    })
}

/// The SGD settings: momentum 0, 0.5 or 0.9, with Nesterov or dampening.
pub fn sgd() -> impl Strategy<Value = SgdConfig> {
    prop_oneof![
        Just(SgdConfig::default()),
        Just(SgdConfig::momentum(0.9)),
        Just(SgdConfig::nesterov(0.9)),
        Just(SgdConfig::nesterov(0.5)),
        Just(SgdConfig {
            momentum: 0.5,
            dampening: 0.1,
            nesterov: false
        }),
    ]
}

/// The base optimiser: SGD (`None`, two cases in three) or one of Adam,
/// AdamW, AMSGrad and Adam with other betas and eps.
pub fn adam() -> impl Strategy<Value = Option<AdamConfig>> {
    prop_oneof![
        6 => Just(None),
        1 => Just(Some(AdamConfig::adam())),
        1 => Just(Some(AdamConfig::adamw())),
        1 => Just(Some(AdamConfig::adamw().amsgrad(true))),
        1 => Just(Some(AdamConfig::adam().betas(0.5, 0.9).eps(1e-6))),
    ]
}

/// The cost-cutting recipes `(interval, start_step)`: mostly off (perturb
/// every step), else perturbing every second or third step, or from step 1
/// or 2 on.
pub fn recipes() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        4 => Just((1, 0)),
        1 => (2u64..=3, 0u64..=2),
    ]
}

/// ε, including 0 and radii that always or never clip.
pub fn epsilon() -> impl Strategy<Value = f64> {
    prop_oneof![
        1 => Just(0.0),
        1 => Just(1e-3),
        2 => 0.01f64..0.5,
        1 => Just(1.0),
        1 => Just(100.0),
    ]
}

fn group_override() -> impl Strategy<Value = (Option<f64>, Option<f64>, Option<f64>, Option<f64>)> {
    (
        proptest::option::of(0.0f64..0.3),
        proptest::option::of(epsilon()),
        proptest::option::of(0.0f64..2.0),
        proptest::option::of(prop_oneof![Just(0.0), Just(1e-2)]),
    )
}

/// A whole case with up to `max_tensors` tensors and up to `max_steps` steps.
pub fn case(max_tensors: usize, max_steps: usize) -> impl Strategy<Value = Case> {
    let tensors = proptest::collection::vec(tensor(), 1..=max_tensors.max(1));
    (
        tensors,
        proptest::collection::vec(proptest::bool::weighted(0.2), max_tensors.max(1)),
        prop_oneof![Just(0.0), Just(0.5)],
        (0.0f64..0.3, epsilon(), 0.0f64..2.0, 0usize..=3),
        prop_oneof![Just(0.0), Just(1e-4), Just(1e-2)],
        (
            prop_oneof![Just(RestoreMode::Copy), Just(RestoreMode::Subtract)],
            recipes(),
        ),
        (sgd(), adam()),
        1..=max_steps.max(1),
        (
            proptest::bool::ANY,
            proptest::collection::vec(proptest::bool::ANY, max_tensors.max(1)),
            group_override(),
            group_override(),
        ),
    )
        .prop_map(
            |(
                parts,
                frozen,
                coupling,
                (lr, epsilon, inner_lr, inner_iter),
                weight_decay,
                (restore, (interval, start_step)),
                (sgd, adam),
                steps,
                (use_groups, membership, g0, g1),
            )| {
                let n = parts.len();
                let total: usize = parts.iter().map(|p| p.1.len()).sum();
                let norm = (total.max(1) as f64).sqrt();
                let mut frozen: Vec<bool> = frozen[..n].to_vec();
                // At least one tensor must receive a gradient.
                frozen[0] = false;
                let init = parts
                    .iter()
                    .map(|(shape, v, ..)| {
                        HostTensor::new(shape.clone(), DType::F64, v.clone())
                            .expect("the strategy draws as many values as the shape has")
                    })
                    .collect();
                let objective = Objective {
                    curvature: parts.iter().map(|p| p.2.clone()).collect(),
                    center: parts.iter().map(|p| p.3.clone()).collect(),
                    coupling_weights: parts
                        .iter()
                        .map(|p| p.4.iter().map(|w| w / norm).collect())
                        .collect(),
                    coupling,
                    frozen,
                };
                let mut config = AmpConfig::new(lr, epsilon)
                    .inner_lr(inner_lr)
                    .inner_iter(inner_iter)
                    .weight_decay(weight_decay)
                    .restore(restore)
                    .interval(interval)
                    .start_step(start_step);
                if use_groups && n >= 2 {
                    let mut members = [Vec::new(), Vec::new()];
                    for (i, &second) in membership[..n].iter().enumerate() {
                        members[usize::from(second)].push(i);
                    }
                    // With both groups in use, the second is sometimes given
                    // as "the rest" instead of by its tensors.
                    let rest = members.iter().all(|m| !m.is_empty()) && members[1].len() % 2 == 1;
                    for (g, (tensors, (lr, eps, zeta, wd))) in
                        members.into_iter().zip([g0, g1]).enumerate()
                    {
                        if tensors.is_empty() {
                            continue;
                        }
                        let rest = rest && g == 1;
                        config.groups.push(ParamGroup {
                            tensors: if rest { Vec::new() } else { tensors },
                            rest,
                            lr,
                            epsilon: eps,
                            inner_lr: zeta,
                            weight_decay: wd,
                        });
                    }
                }
                Case {
                    init,
                    objective,
                    config,
                    sgd,
                    adam,
                    steps,
                }
            },
        )
}
