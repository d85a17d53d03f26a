//! Gradient accumulation: a closure that runs n micro-batches per pass and
//! sums their gradients gives what one batch of all their rows gives, at
//! every pass (clean and perturbed), on every CPU backend. Each micro-batch
//! loss is the batch's mean loss weighted by its share of the rows, so the
//! summed gradient is the whole batch's.
//!
//! Tolerance: 1e-12 relative (f64; only the order of the sums differs).

use amp::{Amp, AmpConfig, AmpError, SgdConfig, StepReport};

const ROWS: usize = 16;
const MICRO: usize = 4;

/// x_ij = sin(1.3 i + 0.7 j), y_i = cos(0.9 i).
fn data() -> (Vec<[f64; 3]>, Vec<f64>) {
    let x = (0..ROWS)
        .map(|i| std::array::from_fn(|j| (1.3 * i as f64 + 0.7 * j as f64).sin()))
        .collect();
    let y = (0..ROWS).map(|i| (0.9 * i as f64).cos()).collect();
    (x, y)
}

fn config() -> AmpConfig {
    AmpConfig::new(0.2, 0.05).inner_iter(2).weight_decay(1e-3)
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * a.abs().max(b.abs()).max(1.0)
}

/// The two runs' reports agree at every pass.
fn same_passes<O>(whole: &StepReport<O>, parts: &StepReport<O>) {
    assert!(
        close(whole.loss, parts.loss),
        "{} vs {}",
        whole.loss,
        parts.loss
    );
    assert_eq!(whole.perturbed_losses.len(), parts.perturbed_losses.len());
    for (a, b) in whole.perturbed_losses.iter().zip(&parts.perturbed_losses) {
        assert!(close(*a, *b), "perturbed loss {a} vs {b}");
    }
}

#[test]
fn ndarray_micro_batches_sum_to_the_batch() {
    use amp::backend::ndarray::NdStore;
    use ndarray::{arr1, Array1, ArrayD};

    let (x, y) = data();
    // ½ mean over `rows` of (x·w + b − y)², weighted by `weight`, with its
    // gradient added into the store's.
    let pass = |s: &mut NdStore<f64>, rows: std::ops::Range<usize>, weight: f64| {
        let (w, b) = (s.params()[0].clone(), s.params()[1][[0]]);
        let n = rows.len() as f64;
        let (mut gw, mut gb, mut loss) = (Array1::<f64>::zeros(3), 0.0, 0.0);
        for i in rows {
            let r = (0..3).map(|j| x[i][j] * w[[j]]).sum::<f64>() + b - y[i];
            loss += 0.5 * r * r / n;
            for j in 0..3 {
                gw[j] += r * x[i][j] / n;
            }
            gb += r / n;
        }
        s.grad_mut(0)?.scaled_add(weight, &gw.into_dyn());
        s.grad_mut(1)?
            .scaled_add(weight, &ArrayD::from_elem(vec![1], gb));
        Ok::<_, AmpError>(weight * loss)
    };
    let store = || NdStore::from_arrays([arr1(&[0.3, -0.2, 0.1]), arr1(&[0.05])]);
    let mut whole = Amp::sgd(store(), config(), SgdConfig::nesterov(0.9)).unwrap();
    let mut parts = Amp::sgd(store(), config(), SgdConfig::nesterov(0.9)).unwrap();
    for _ in 0..5 {
        let a = whole
            .step(|s: &mut NdStore<f64>, _| Ok::<_, AmpError>(((), pass(s, 0..ROWS, 1.0)?)))
            .unwrap();
        let b = parts
            .step(|s: &mut NdStore<f64>, _| {
                let mut loss = 0.0;
                for start in (0..ROWS).step_by(MICRO) {
                    loss += pass(s, start..start + MICRO, (MICRO as f64) / ROWS as f64)?;
                }
                Ok::<_, AmpError>(((), loss))
            })
            .unwrap();
        same_passes(&a, &b);
        for i in 0..2 {
            for (p, q) in whole.store().params()[i]
                .iter()
                .zip(parts.store().params()[i].iter())
            {
                assert!(close(*p, *q), "{p} vs {q}");
            }
        }
    }
}

#[test]
fn candle_micro_batches_sum_to_the_batch() {
    use amp::backend::candle::CandleStore;
    use candle_core::{DType, Device, Tensor, Var};

    let (x, y) = data();
    let flat: Vec<f64> = x.iter().flatten().copied().collect();
    let xt = Tensor::from_vec(flat, (ROWS, 3), &Device::Cpu).unwrap();
    let yt = Tensor::from_vec(y, (ROWS, 1), &Device::Cpu).unwrap();
    let vars = || {
        let w = Var::from_vec(vec![0.3f64, -0.2, 0.1], (3, 1), &Device::Cpu).unwrap();
        let b = Var::from_vec(vec![0.05f64], 1, &Device::Cpu).unwrap();
        vec![w, b]
    };
    let loss =
        |s: &CandleStore, start: usize, rows: usize, weight: f64| -> candle_core::Result<Tensor> {
            let (w, b) = (s.vars()[0].as_tensor(), s.vars()[1].as_tensor());
            let r = xt
                .narrow(0, start, rows)?
                .matmul(w)?
                .broadcast_add(b)?
                .sub(&yt.narrow(0, start, rows)?)?;
            r.sqr()?.mean_all()?.affine(0.5 * weight, 0.0)
        };
    let build = || {
        Amp::sgd(
            CandleStore::from_vars(vars()).unwrap(),
            config(),
            SgdConfig::nesterov(0.9),
        )
        .unwrap()
    };
    let (mut whole, mut parts) = (build(), build());
    assert_eq!(whole.store().vars()[0].dtype(), DType::F64);
    for _ in 0..5 {
        let a = whole
            .step(|s: &mut CandleStore, _| {
                let l = loss(s, 0, ROWS, 1.0).map_err(AmpError::backend)?;
                Ok::<_, AmpError>(((), s.backward(&l)?))
            })
            .unwrap();
        let b = parts
            .step(|s: &mut CandleStore, _| {
                let mut total = 0.0;
                for start in (0..ROWS).step_by(MICRO) {
                    let l = loss(s, start, MICRO, MICRO as f64 / ROWS as f64)
                        .map_err(AmpError::backend)?;
                    let grads = l.backward().map_err(AmpError::backend)?;
                    s.accumulate_grads(&grads)?;
                    total += l.to_scalar::<f64>().map_err(AmpError::backend)?;
                }
                Ok::<_, AmpError>(((), total))
            })
            .unwrap();
        same_passes(&a, &b);
        for i in 0..2 {
            let p = whole.store().vars()[i]
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let q = parts.store().vars()[i]
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for (p, q) in p.iter().zip(&q) {
                assert!(close(*p, *q), "{p} vs {q}");
            }
        }
    }
}

#[cfg(feature = "tch")]
#[test]
fn tch_micro_batches_sum_to_the_batch() {
    use amp::backend::tch::TchStore;
    use tch::{Device, Kind, Tensor};

    let (x, y) = data();
    let flat: Vec<f64> = x.iter().flatten().copied().collect();
    let xt = Tensor::from_slice(&flat).view([ROWS as i64, 3]);
    let yt = Tensor::from_slice(&y).view([ROWS as i64, 1]);
    let store = || {
        let w = Tensor::from_slice(&[0.3f64, -0.2, 0.1])
            .view([3, 1])
            .set_requires_grad(true);
        let b = Tensor::from_slice(&[0.05f64]).set_requires_grad(true);
        TchStore::from_tensors(vec![w, b]).unwrap()
    };
    // libtorch's autograd adds every backward pass into `.grad`: calling
    // backward once per micro-batch accumulates by itself.
    let loss = |s: &TchStore, start: i64, rows: i64, weight: f64| {
        let (w, b) = (&s.tensors()[0], &s.tensors()[1]);
        let r = xt.narrow(0, start, rows).matmul(w) + b - yt.narrow(0, start, rows);
        r.square().mean(Kind::Double) * (0.5 * weight)
    };
    let build = || Amp::sgd(store(), config(), SgdConfig::nesterov(0.9)).unwrap();
    let (mut whole, mut parts) = (build(), build());
    for _ in 0..5 {
        let a = whole
            .step(|s: &mut TchStore, _| {
                let l = loss(s, 0, ROWS as i64, 1.0);
                l.backward();
                Ok::<_, AmpError>(((), l.double_value(&[])))
            })
            .unwrap();
        let b = parts
            .step(|s: &mut TchStore, _| {
                let mut total = 0.0;
                for start in (0..ROWS as i64).step_by(MICRO) {
                    let l = loss(s, start, MICRO as i64, MICRO as f64 / ROWS as f64);
                    l.backward();
                    total += l.double_value(&[]);
                }
                Ok::<_, AmpError>(((), total))
            })
            .unwrap();
        same_passes(&a, &b);
        for i in 0..2 {
            let d = (&whole.store().tensors()[i] - &parts.store().tensors()[i])
                .abs()
                .max()
                .double_value(&[]);
            assert!(d <= 1e-12, "{d:e}");
        }
        let _ = Device::Cpu;
    }
}
