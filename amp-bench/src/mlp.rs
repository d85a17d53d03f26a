//! The three benchmark MLPs (64 inputs, 10 classes, ReLU), their shared
//! initial weights and data, and one builder per backend.
//!
//! Every backend trains the same network from the same weights on the same
//! fixed batch, so that step times compare like for like. The ERM and AMP
//! trainers of a pair are two copies of the same model with the same
//! closure; only `inner_iter` differs (0 and 1).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Inputs of every MLP.
pub const INPUTS: usize = 64;
/// Classes of every MLP.
pub const CLASSES: usize = 10;
/// Outer learning rate of the MLP runs.
pub const LR: f64 = 0.01;
/// ε of the MLP runs (the paper's CIFAR value).
pub const EPSILON: f64 = 0.5;

/// One benchmark MLP: `Linear(64, w)`, `hidden` × `Linear(w, w)`,
/// `Linear(w, 10)`, ReLU between layers; `2 · (hidden + 2)` tensors.
#[derive(Clone, Copy, Debug)]
pub struct MlpSpec {
    /// Short name (`40x32`, …).
    pub name: &'static str,
    /// Hidden-to-hidden layers.
    pub hidden: usize,
    /// Hidden width.
    pub width: usize,
    /// Batch size.
    pub batch: usize,
}

/// The three models of issue 8 (84 tensors / 44.6 k parameters, 1.09 M, 8.5 M).
pub const SPECS: [MlpSpec; 3] = [
    MlpSpec {
        name: "40x32",
        hidden: 40,
        width: 32,
        batch: 16,
    },
    MlpSpec {
        name: "4x512",
        hidden: 4,
        width: 512,
        batch: 128,
    },
    MlpSpec {
        name: "2x2048",
        hidden: 2,
        width: 2048,
        batch: 256,
    },
];

/// One linear layer's initial values, PyTorch layout: `weight` is
/// `[outputs, inputs]` row-major.
#[derive(Clone, Debug)]
pub struct Layer {
    /// Fan-in.
    pub inputs: usize,
    /// Fan-out.
    pub outputs: usize,
    /// `outputs × inputs` values.
    pub weight: Vec<f32>,
    /// `outputs` values.
    pub bias: Vec<f32>,
}

/// Initial weights, inputs and labels of one MLP run.
#[derive(Clone, Debug)]
pub struct Problem {
    /// The model.
    pub spec: MlpSpec,
    /// Layers, input to output.
    pub layers: Vec<Layer>,
    /// `batch × 64` inputs, row-major.
    pub x: Vec<f32>,
    /// `batch` labels in `0..10`.
    pub y: Vec<usize>,
}

impl MlpSpec {
    /// Layer widths, input to output.
    pub fn dims(&self) -> Vec<usize> {
        let mut dims = vec![INPUTS];
        dims.extend(std::iter::repeat_n(self.width, self.hidden + 1));
        dims.push(CLASSES);
        dims
    }

    /// Number of parameter tensors.
    pub fn tensors(&self) -> usize {
        2 * (self.hidden + 2)
    }

    /// Number of parameters.
    pub fn numel(&self) -> usize {
        self.dims().windows(2).map(|w| w[0] * w[1] + w[1]).sum()
    }

    /// Seeded weights (PyTorch's default `Linear` init, U(±1/√fan_in)) and
    /// a fixed random batch.
    pub fn problem(&self, seed: u64) -> Problem {
        let mut rng = StdRng::seed_from_u64(seed);
        let layers = self
            .dims()
            .windows(2)
            .map(|w| {
                let bound = 1.0 / (w[0] as f32).sqrt();
                Layer {
                    inputs: w[0],
                    outputs: w[1],
                    weight: (0..w[0] * w[1])
                        .map(|_| rng.gen_range(-bound..bound))
                        .collect(),
                    bias: (0..w[1]).map(|_| rng.gen_range(-bound..bound)).collect(),
                }
            })
            .collect();
        let x = (0..self.batch * INPUTS)
            .map(|_| rng.gen_range(-1.0f32..1.0))
            .collect();
        let y = (0..self.batch).map(|_| rng.gen_range(0..CLASSES)).collect();
        Problem {
            spec: *self,
            layers,
            x,
            y,
        }
    }
}
