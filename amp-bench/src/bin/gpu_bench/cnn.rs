//! The ResNet-18-sized convolutional model of the GPU bench, as data that
//! every backend builds the same network from: the CIFAR layout of
//! ResNet-18 (3×3 stem, four stages of two basic blocks, 64–512 channels,
//! 1×1 projection shortcuts where the shape changes, global average pool,
//! one linear layer), batch normalisation over the batch's own statistics
//! (training mode, no running averages), 62 parameter tensors and 11.2 M
//! parameters; seeded weights and one fixed synthetic batch.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Input channels and side of the synthetic images (CIFAR-sized).
pub const IMAGE: (usize, usize) = (3, 32);
/// Classes.
pub const CLASSES: usize = 10;
/// Outer learning rate of the conv runs.
pub const LR: f64 = 0.01;
/// ε of the conv runs.
pub const EPSILON: f64 = 0.5;

/// One basic block: two 3×3 convolutions, each followed by batch norm; a
/// projection shortcut (1×1 convolution and batch norm) when the channel
/// count or the stride changes.
#[derive(Clone, Copy, Debug)]
pub struct Block {
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Stride of the first convolution (and of the shortcut).
    pub stride: usize,
}

impl Block {
    /// Whether the block has a projection shortcut.
    pub fn projects(&self) -> bool {
        self.stride != 1 || self.cin != self.cout
    }
}

/// The eight blocks of ResNet-18 after the 64-channel stem.
pub fn blocks() -> Vec<Block> {
    let mut out = Vec::new();
    let mut cin = 64;
    for (cout, stride) in [(64, 1), (128, 2), (256, 2), (512, 2)] {
        out.push(Block { cin, cout, stride });
        out.push(Block {
            cin: cout,
            cout,
            stride: 1,
        });
        cin = cout;
    }
    out
}

/// One parameter tensor's shape and initial values.
#[derive(Clone, Debug)]
pub struct Param {
    /// Shape (convolutions: out, in, k, k; linear weight: out, in).
    pub shape: Vec<usize>,
    /// Row-major values.
    pub values: Vec<f32>,
}

/// Initial parameters in the order every backend's forward pass reads them
/// (stem conv, stem bn γ β; per block: conv1, bn1 γ β, conv2, bn2 γ β, then
/// shortcut conv, bn γ β when it projects; linear weight, bias), and one
/// fixed batch of inputs (`batch × 3 × 32 × 32`) and labels.
#[derive(Clone, Debug)]
pub struct Problem {
    /// Parameters, in forward order.
    pub params: Vec<Param>,
    /// Inputs, row-major `batch × 3 × 32 × 32`.
    pub x: Vec<f32>,
    /// Labels in `0..10`.
    pub y: Vec<usize>,
    /// Batch size.
    pub batch: usize,
}

impl Problem {
    /// Seeded weights (U(±1/√fan_in) for convolutions and the linear layer,
    /// γ = 1, β = 0) and a seeded batch of `batch` images.
    pub fn new(batch: usize, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut params = Vec::new();
        let weight = |rng: &mut StdRng, shape: Vec<usize>| {
            let fan_in: usize = shape[1..].iter().product();
            let bound = 1.0 / (fan_in as f32).sqrt();
            let n: usize = shape.iter().product();
            let values = (0..n).map(|_| rng.gen_range(-bound..bound)).collect();
            Param { shape, values }
        };
        let bn = |params: &mut Vec<Param>, c: usize| {
            params.push(Param {
                shape: vec![c],
                values: vec![1.0; c],
            });
            params.push(Param {
                shape: vec![c],
                values: vec![0.0; c],
            });
        };
        params.push(weight(&mut rng, vec![64, IMAGE.0, 3, 3]));
        bn(&mut params, 64);
        for b in blocks() {
            params.push(weight(&mut rng, vec![b.cout, b.cin, 3, 3]));
            bn(&mut params, b.cout);
            params.push(weight(&mut rng, vec![b.cout, b.cout, 3, 3]));
            bn(&mut params, b.cout);
            if b.projects() {
                params.push(weight(&mut rng, vec![b.cout, b.cin, 1, 1]));
                bn(&mut params, b.cout);
            }
        }
        let fc = weight(&mut rng, vec![CLASSES, 512]);
        let bound = 1.0 / (512f32).sqrt();
        params.push(fc);
        params.push(Param {
            shape: vec![CLASSES],
            values: (0..CLASSES).map(|_| rng.gen_range(-bound..bound)).collect(),
        });
        let n = batch * IMAGE.0 * IMAGE.1 * IMAGE.1;
        let x = (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let y = (0..batch).map(|_| rng.gen_range(0..CLASSES)).collect();
        Problem {
            params,
            x,
            y,
            batch,
        }
    }

    /// Number of parameters.
    pub fn numel(&self) -> usize {
        self.params.iter().map(|p| p.values.len()).sum()
    }
}

/// The next `n` of `params` (fewer at the end), advancing `params` past them:
/// how the forward passes walk the parameter list.
pub fn take<'a, T>(params: &mut &'a [T], n: usize) -> &'a [T] {
    let (head, tail) = params.split_at(n.min(params.len()));
    *params = tail;
    head
}
