//! The data-parallel test problem: least squares on 24 fixed rows, split
//! between ranks, over `amp-ndarray` stores in f32 or f64. With the rows
//! split evenly, the mean of the ranks' gradients is the gradient on all of
//! them, so N ranks reducing every pass must train as one process on the
//! concatenated batch.

use amp_core::{Amp, AmpError, StepReport};
use amp_ndarray::{Element, NdStore};
use ndarray::{arr1, Array1, ArrayD};

/// Rows of the problem.
pub const ROWS: usize = 24;

/// Row `i`: x_ij = sin(1.3 i + 0.7 j), y_i = cos(0.9 i).
pub fn row(i: usize) -> ([f64; 3], f64) {
    let x = std::array::from_fn(|j| (1.3 * i as f64 + 0.7 * j as f64).sin());
    (x, (0.9 * i as f64).cos())
}

/// ½ mean over `rows` of (x·w + b − y)² at the store's weights (`w`, then
/// `b`): returns it and writes its gradient into the store (computed in
/// f64, rounded to the store's element type).
pub fn least_squares<T: Element>(s: &mut NdStore<T>, rows: &[usize]) -> Result<f64, AmpError> {
    let to_f64 = |v: &T| v.to_f64().unwrap_or(f64::NAN);
    let w: Vec<f64> = s.params()[0].iter().map(to_f64).collect();
    let b = to_f64(&s.params()[1][[0]]);
    let n = rows.len() as f64;
    let (mut gw, mut gb, mut loss) = ([0.0; 3], 0.0, 0.0);
    for &i in rows {
        let (x, y) = row(i);
        let r = (0..3).map(|j| x[j] * w[j]).sum::<f64>() + b - y;
        loss += 0.5 * r * r / n;
        for j in 0..3 {
            gw[j] += r * x[j] / n;
        }
        gb += r / n;
    }
    let cast = |v: f64| T::from(v).unwrap_or_else(T::nan);
    s.grad_mut(0)?
        .assign(&Array1::from_iter(gw.iter().map(|&g| cast(g))).into_dyn());
    s.grad_mut(1)?.assign(&ArrayD::from_elem(vec![1], cast(gb)));
    Ok(loss)
}

/// The starting weights: `w` = (0.3, −0.2, 0.1), `b` = 0.05.
pub fn store<T: Element>() -> NdStore<T> {
    let c = |v: f64| T::from(v).unwrap_or_else(T::nan);
    NdStore::from_arrays([arr1(&[c(0.3), c(-0.2), c(0.1)]), arr1(&[c(0.05)])])
}

/// Rank `rank`'s rows of step `step`'s batch, the batch split evenly
/// between `world` ranks (each batch is `ROWS / world * world` rows).
pub fn share(step: usize, rank: usize, world: usize) -> Vec<usize> {
    let per = ROWS / world;
    (0..per)
        .map(|k| (step * 7 + rank * per + k) % ROWS)
        .collect()
}

/// One step of `amp` on `rows`; panics on error.
pub fn step<T: Element>(amp: &mut Amp<NdStore<T>>, rows: &[usize]) -> StepReport<()> {
    amp.step(|s: &mut NdStore<T>, _| Ok::<_, AmpError>(((), least_squares(s, rows)?)))
        .expect("a step of the least-squares problem")
}

/// Every weight, in store order, as `f64`.
pub fn weights<T: Element>(amp: &Amp<NdStore<T>>) -> Vec<f64> {
    amp.store()
        .params()
        .iter()
        .flat_map(|p| p.iter().map(|v| v.to_f64().unwrap_or(f64::NAN)))
        .collect()
}
