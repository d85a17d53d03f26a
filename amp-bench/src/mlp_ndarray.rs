//! The benchmark MLP on `NdStore<f32>`, forward and backward written by hand
//! (ndarray has no autograd). Tensor `2l` is layer `l`'s weight
//! `[outputs, inputs]`, tensor `2l + 1` its bias.

use amp::backend::ndarray::NdStore;
use amp::{BoxError, ParamStore};
use ndarray::linalg::general_mat_mul;
use ndarray::{Array1, Array2, ArrayView2, Axis, Ix1, Ix2};

use crate::fixtures::{amp_config, Closure, Trainer, TrainerPair};
use crate::mlp::{Problem, EPSILON, LR};

/// The store holding `problem`'s initial weights.
fn store(problem: &Problem) -> Result<NdStore<f32>, BoxError> {
    let mut params = Vec::new();
    for layer in &problem.layers {
        params.push(
            Array2::from_shape_vec((layer.outputs, layer.inputs), layer.weight.clone())?.into_dyn(),
        );
        params.push(Array1::from(layer.bias.clone()).into_dyn());
    }
    Ok(NdStore::new(params))
}

/// Mean softmax cross-entropy of `logits` against `y`; turns `logits` into
/// its gradient `(softmax − onehot) / batch` in place.
fn cross_entropy_backward(logits: &mut Array2<f32>, y: &[usize]) -> f64 {
    let batch = logits.nrows() as f32;
    let mut loss = 0.0f64;
    for (mut row, &label) in logits.rows_mut().into_iter().zip(y) {
        let max = row.fold(f32::NEG_INFINITY, |a, &v| a.max(v));
        row.mapv_inplace(|v| (v - max).exp());
        let sum = row.sum();
        loss -= f64::from((row[label] / sum).ln());
        row.mapv_inplace(|v| v / sum / batch);
        row[label] -= 1.0 / batch;
    }
    loss / f64::from(batch)
}

/// The closure: forward, loss, hand-written backward into the store's
/// gradient buffers (matrix products write straight into them).
fn closure(problem: &Problem) -> Result<Closure<NdStore<f32>>, BoxError> {
    let x = Array2::from_shape_vec((problem.spec.batch, crate::mlp::INPUTS), problem.x.clone())?;
    let y = problem.y.clone();
    let layers = problem.layers.len();
    Ok(Box::new(move |store: &mut NdStore<f32>, _pass| {
        // Forward, keeping every layer's input (post-ReLU activation).
        let mut acts: Vec<Array2<f32>> = Vec::with_capacity(layers + 1);
        acts.push(x.clone());
        for l in 0..layers {
            let params = store.params();
            let w: ArrayView2<f32> = params[2 * l].view().into_dimensionality::<Ix2>()?;
            let b = params[2 * l + 1].view().into_dimensionality::<Ix1>()?;
            let mut z = acts[l].dot(&w.t());
            z += &b;
            if l + 1 < layers {
                z.mapv_inplace(|v| v.max(0.0));
            }
            acts.push(z);
        }
        let mut dz = acts.pop().expect("one layer at least");
        let loss = cross_entropy_backward(&mut dz, &y);
        // Backward, last layer first.
        for l in (0..layers).rev() {
            // dL/dinput first, while the weights are borrowed immutably.
            let dh = if l > 0 {
                let w = store.params()[2 * l].view().into_dimensionality::<Ix2>()?;
                let mut dh = dz.dot(&w);
                ndarray::Zip::from(&mut dh).and(&acts[l]).for_each(|d, &a| {
                    if a <= 0.0 {
                        *d = 0.0
                    }
                });
                Some(dh)
            } else {
                None
            };
            {
                let mut gw = store.grad_mut(2 * l)?;
                let mut gw = gw.view_mut().into_dimensionality::<Ix2>()?;
                general_mat_mul(1.0, &dz.t(), &acts[l], 0.0, &mut gw);
            }
            {
                let mut gb = store.grad_mut(2 * l + 1)?;
                gb.assign(&dz.sum_axis(Axis(0)).into_dyn());
            }
            if let Some(dh) = dh {
                dz = dh;
            }
        }
        debug_assert_eq!(store.num_tensors(), 2 * layers);
        Ok(((), loss))
    }))
}

/// The ERM (`inner_iter` 0) and AMP (`inner_iter` 1) trainers of `problem`.
pub fn trainers(problem: &Problem) -> Result<TrainerPair<NdStore<f32>>, BoxError> {
    crate::fixtures::f32_only("ndarray")?;
    let erm = Trainer::new(
        store(problem)?,
        amp_config(0, LR, EPSILON),
        closure(problem)?,
        |_| {},
    )?;
    let amp = Trainer::new(
        store(problem)?,
        amp_config(1, LR, EPSILON),
        closure(problem)?,
        |_| {},
    )?;
    Ok((erm, amp))
}
