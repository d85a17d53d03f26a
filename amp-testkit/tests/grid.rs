//! The fixed oracle grid runs every configuration it names and catches a
//! store whose arithmetic is off by a rounding.

use amp_core::{DType, HostTensor, Result, TensorOps, TensorStore};
use amp_testkit::{grid, run_case, NdFactory, StoreFactory};

/// Dense `f64` tensors on the host; `coarse_axpy` rounds `axpy`'s
/// coefficient to `f32` (a 1e-8 relative slip).
struct Dense {
    coarse_axpy: bool,
}

type Tensor = (Vec<usize>, Vec<f64>);

impl TensorOps for Dense {
    type Tensor = Tensor;
    type Scalar = f64;
    fn dtype(&self) -> DType {
        DType::F64
    }
    fn shape(&self, t: &Tensor) -> Vec<usize> {
        t.0.clone()
    }
    fn scale(&self, t: &Tensor, f: f64) -> Result<Tensor> {
        Ok((t.0.clone(), t.1.iter().map(|x| f * x).collect()))
    }
    fn axpy(&self, y: &Tensor, a: f64, x: &Tensor) -> Result<Tensor> {
        let a = if self.coarse_axpy { a as f32 as f64 } else { a };
        Ok((
            y.0.clone(),
            y.1.iter().zip(&x.1).map(|(y, x)| y + a * x).collect(),
        ))
    }
    fn sum_of_squares(&self, t: &Tensor) -> Result<f64> {
        Ok(t.1.iter().map(|x| x * x).sum())
    }
    fn to_host(&self, t: &Tensor) -> Result<Vec<f64>> {
        Ok(t.1.clone())
    }
    fn tensor_like(&self, data: &[f64], like: &Tensor) -> Result<Tensor> {
        Ok((like.0.clone(), data.to_vec()))
    }
}

struct DenseFactory {
    coarse_axpy: bool,
}

impl StoreFactory for DenseFactory {
    type Store = TensorStore<Dense>;
    fn make(&self, values: &[HostTensor], _dtype: DType) -> Result<Self::Store> {
        let params = values
            .iter()
            .map(|v| (v.shape().to_vec(), v.data().to_vec()))
            .collect();
        let ops = Dense {
            coarse_axpy: self.coarse_axpy,
        };
        Ok(TensorStore::new(ops, params))
    }
    fn name(&self) -> String {
        "dense host tensors".into()
    }
}

#[test]
fn every_configuration_runs_and_names_are_distinct() {
    let cases = grid::cases();
    let mut names: Vec<&str> = cases.iter().map(|(n, _)| n.as_str()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), cases.len());
    let factory = DenseFactory { coarse_axpy: false };
    assert_eq!(grid::matches_oracle(&factory, DType::F64), Ok(cases.len()));
}

#[test]
fn a_coefficient_rounded_to_f32_is_caught() {
    let factory = DenseFactory { coarse_axpy: true };
    let err = grid::matches_oracle(&factory, DType::F64).unwrap_err();
    assert!(err.contains("dense host tensors"), "{err}");
}

/// ε = 0.05 clips every tensor with a gradient on every perturbing step;
/// ε = 100 clips none.
#[test]
fn the_two_radii_clip_always_and_never() {
    for (name, case) in grid::cases() {
        if case.config.inner_iter == 0 || name.starts_with("groups") {
            continue;
        }
        let outcome = run_case(&NdFactory, &case, DType::F64).unwrap();
        // The empty tensor and the frozen one have nothing to clip.
        let want = if case.config.epsilon < 1.0 { 4 } else { 0 };
        assert!(
            outcome.clipped.iter().all(|&c| c == want),
            "{name}: {:?}",
            outcome.clipped
        );
    }
}
