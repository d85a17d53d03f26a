//! The MLP on the ndarray reference backend: `NdStore<f32>` holds the weights,
//! and the backward pass is written by hand (ndarray has no autograd).

use amp::backend::ndarray::NdStore;
use amp::{Amp, AmpError, BoxError, ParamStore};
use ndarray::{Array2, ArrayD, ArrayView2, Axis, Ix1, Ix2};

use crate::data::Data;
use crate::model::{AmpOf, Model, Setup, Which};

/// An MLP (linear → ReLU → … → linear) trained by AMP over `NdStore<f32>`.
/// Tensor `2l` is layer `l`'s weight `[out, in]`, tensor `2l + 1` its bias.
pub struct NdMlp<'a> {
    amp: AmpOf<NdStore<f32>>,
    data: &'a Data,
    clip_norm: Option<f64>,
}

impl<'a> NdMlp<'a> {
    /// Builds the store from the shared initial weights.
    pub fn new(setup: Setup<'a>) -> Result<Self, BoxError> {
        if setup.device != crate::model::DeviceKind::Cpu {
            return Err("the ndarray backend runs on the CPU only; use `--device cpu`".into());
        }
        let mut params = Vec::new();
        for layer in &setup.layers {
            params.push(
                Array2::from_shape_vec((layer.outputs, layer.inputs), layer.weight.clone())?
                    .into_dyn(),
            );
            params.push(ndarray::Array1::from(layer.bias.clone()).into_dyn());
        }
        let amp = Amp::new(NdStore::new(params), setup.amp, setup.base.build()?)?;
        let amp = crate::ranks::join(amp, setup.link)?;
        Ok(NdMlp {
            amp,
            data: setup.data,
            clip_norm: setup.clip_norm,
        })
    }

    /// The weights (for the cross-backend test).
    #[cfg(test)]
    pub fn store(&self) -> &NdStore<f32> {
        self.amp.store()
    }
}

impl Model for NdMlp<'_> {
    fn step(&mut self, batch: &[usize]) -> Result<f64, BoxError> {
        let x = self.data.train.x.select(Axis(0), batch);
        let y: Vec<usize> = batch.iter().map(|&i| self.data.train.y[i]).collect();
        let clip_norm = self.clip_norm;
        let report = self.amp.step(|store: &mut NdStore<f32>, _pass| {
            let (loss, grads) = loss_and_grads(store.params(), x.view(), &y)?;
            for (i, grad) in grads.into_iter().enumerate() {
                store.set_grad(i, grad)?;
            }
            if let Some(max_norm) = clip_norm {
                store.clip_grads_to_norm(max_norm)?;
            }
            Ok::<_, AmpError>(((), loss))
        })?;
        Ok(report.loss)
    }

    fn set_lr(&mut self, lr: f64) -> Result<(), BoxError> {
        Ok(self.amp.set_lr(lr)?)
    }

    fn predict(&mut self, which: Which) -> Result<Vec<usize>, BoxError> {
        let split = match which {
            Which::Val => &self.data.val,
            Which::Test => &self.data.test,
        };
        let (logits, _) = forward(self.amp.store().params(), split.x.view())?;
        Ok(logits
            .rows()
            .into_iter()
            .map(|row| {
                row.iter()
                    .enumerate()
                    .fold((0, f32::NEG_INFINITY), |best, (c, &v)| {
                        if v > best.1 {
                            (c, v)
                        } else {
                            best
                        }
                    })
                    .0
            })
            .collect())
    }
}

fn layer(
    params: &[ArrayD<f32>],
    l: usize,
) -> Result<(ArrayView2<'_, f32>, ndarray::ArrayView1<'_, f32>), AmpError> {
    let w = params[2 * l]
        .view()
        .into_dimensionality::<Ix2>()
        .map_err(AmpError::backend)?;
    let b = params[2 * l + 1]
        .view()
        .into_dimensionality::<Ix1>()
        .map_err(AmpError::backend)?;
    Ok((w, b))
}

/// Forward pass: the logits, and every layer's input (the ReLU outputs; the
/// first is `x` itself) for the backward pass.
fn forward(
    params: &[ArrayD<f32>],
    x: ArrayView2<'_, f32>,
) -> Result<(Array2<f32>, Vec<Array2<f32>>), AmpError> {
    let layers = params.len() / 2;
    let mut inputs = Vec::with_capacity(layers);
    let mut a = x.to_owned();
    for l in 0..layers {
        let (w, b) = layer(params, l)?;
        let mut z = a.dot(&w.t());
        z += &b;
        inputs.push(a);
        if l + 1 < layers {
            z.mapv_inplace(|v| v.max(0.0));
        }
        a = z;
    }
    Ok((a, inputs))
}

/// Mean softmax cross-entropy of the batch and its gradient with respect to
/// every parameter, in store order.
pub fn loss_and_grads(
    params: &[ArrayD<f32>],
    x: ArrayView2<'_, f32>,
    y: &[usize],
) -> Result<(f64, Vec<ArrayD<f32>>), AmpError> {
    let (logits, inputs) = forward(params, x)?;
    let n = y.len() as f32;
    // Softmax probabilities, shifted by the row maximum for stability;
    // d loss / d logits = (p − onehot(y)) / n.
    let mut loss = 0.0f64;
    let mut delta = logits;
    for (mut row, &label) in delta.rows_mut().into_iter().zip(y) {
        let max = row.fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        row.mapv_inplace(|v| (v - max).exp());
        let sum = row.sum();
        loss -= f64::from((row[label] / sum).ln());
        row.mapv_inplace(|v| v / sum / n);
        row[label] -= 1.0 / n;
    }
    loss /= f64::from(n);

    let layers = params.len() / 2;
    let mut grads = vec![ArrayD::zeros(ndarray::IxDyn(&[])); params.len()];
    for l in (0..layers).rev() {
        let a = &inputs[l];
        grads[2 * l] = delta.t().dot(a).into_dyn();
        grads[2 * l + 1] = delta.sum_axis(Axis(0)).into_dyn();
        if l > 0 {
            let (w, _) = layer(params, l)?;
            let mut back = delta.dot(&w);
            // ReLU: a > 0 exactly where its pre-activation was > 0.
            ndarray::Zip::from(&mut back).and(a).for_each(|d, &a| {
                if a <= 0.0 {
                    *d = 0.0
                }
            });
            delta = back;
        }
    }
    Ok((loss, grads))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::init_layers;

    fn params_of(sizes: &[usize], seed: u64) -> Vec<ArrayD<f32>> {
        init_layers(sizes, seed)
            .into_iter()
            .flat_map(|l| {
                [
                    Array2::from_shape_vec((l.outputs, l.inputs), l.weight)
                        .unwrap()
                        .into_dyn(),
                    ndarray::Array1::from(l.bias).into_dyn(),
                ]
            })
            .collect()
    }

    /// The hand-written backward pass against central finite differences of
    /// the f32 loss, h = 1e-3 (f32 rounding then costs about 1e-7 / 2e-3 =
    /// 5e-5; a much larger h lets a ReLU kink fall inside ±h on this data).
    #[test]
    fn gradients_match_finite_differences() {
        let params = params_of(&[3, 5, 4, 3], 11);
        let x = Array2::from_shape_fn((6, 3), |(i, j)| ((i * 3 + j) as f32 * 0.37).sin());
        let y = [0usize, 2, 1, 1, 0, 2];
        let (loss, grads) = loss_and_grads(&params, x.view(), &y).unwrap();
        assert!(loss.is_finite() && loss > 0.0);
        let h = 1e-3f32;
        for (t, grad) in grads.iter().enumerate() {
            assert_eq!(grad.shape(), params[t].shape());
            for k in 0..params[t].len() {
                let mut plus = params.clone();
                let mut minus = params.clone();
                plus[t].as_slice_mut().unwrap()[k] += h;
                minus[t].as_slice_mut().unwrap()[k] -= h;
                let (lp, _) = loss_and_grads(&plus, x.view(), &y).unwrap();
                let (lm, _) = loss_and_grads(&minus, x.view(), &y).unwrap();
                let numeric = (lp - lm) / (2.0 * f64::from(h));
                let analytic = f64::from(grad.as_slice().unwrap()[k]);
                assert!(
                    (numeric - analytic).abs() < 2e-4 + 1e-2 * analytic.abs(),
                    "tensor {t} element {k}: numeric {numeric}, analytic {analytic}"
                );
            }
        }
    }

    /// Uniform logits over C classes give loss ln C.
    #[test]
    fn zero_weights_give_log_classes() {
        let params: Vec<ArrayD<f32>> = params_of(&[2, 3], 0).into_iter().map(|p| p * 0.0).collect();
        let x = Array2::from_elem((4, 2), 1.0f32);
        let (loss, _) = loss_and_grads(&params, x.view(), &[0, 1, 2, 0]).unwrap();
        assert!((loss - 3f64.ln()).abs() < 1e-6);
    }
}
