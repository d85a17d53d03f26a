//! `tensor_ops::elementwise_overrides_match` passes the trait's own
//! defaults and catches overrides that round differently;
//! `tensor_ops::batched_reductions_match` catches batched reductions that
//! disagree with the per-tensor ones.

use amp_core::{DType, Result, TensorOps};
use amp_testkit::tensor_ops::{batched_reductions_match, elementwise_overrides_match};

/// What a host "framework" does differently, if anything.
#[derive(Clone, Copy, PartialEq)]
enum Bug {
    None,
    /// `axpy` as one fused multiply-add.
    FusedAxpy,
    /// Adam's denominator multiplied by `1 / divisor`.
    Reciprocal,
    /// Batched sums of squares accumulated from the last element.
    SumsBackwards,
    /// A batched finiteness check that takes an overflowing sum for a NaN.
    FiniteBySumOnly,
}

struct Host(DType, Bug);

impl Host {
    fn round(&self, v: f64) -> f64 {
        if self.0 == DType::F32 {
            v as f32 as f64
        } else {
            v
        }
    }
}

impl TensorOps for Host {
    type Tensor = Vec<f64>;
    type Scalar = f64;
    fn dtype(&self) -> DType {
        self.0
    }
    fn shape(&self, t: &Vec<f64>) -> Vec<usize> {
        vec![t.len()]
    }
    fn scale(&self, t: &Vec<f64>, f: f64) -> Result<Vec<f64>> {
        Ok(t.iter().map(|x| self.round(self.round(f) * x)).collect())
    }
    fn axpy(&self, y: &Vec<f64>, a: f64, x: &Vec<f64>) -> Result<Vec<f64>> {
        let a = self.round(a);
        Ok(y.iter()
            .zip(x)
            .map(|(y, x)| match self.1 {
                Bug::FusedAxpy => self.round(a.mul_add(*x, *y)),
                _ => self.round(y + self.round(a * x)),
            })
            .collect())
    }
    fn sum_of_squares(&self, t: &Vec<f64>) -> Result<f64> {
        Ok(t.iter().map(|x| x * x).sum())
    }
    fn sums_of_squares(&self, tensors: &[&Vec<f64>]) -> Result<Vec<f64>> {
        match self.1 {
            Bug::SumsBackwards => Ok(tensors
                .iter()
                .map(|t| t.iter().rev().map(|x| x * x).sum())
                .collect()),
            _ => tensors.iter().map(|t| self.sum_of_squares(t)).collect(),
        }
    }
    fn all_finite_in(&self, tensors: &[&Vec<f64>]) -> Result<bool> {
        // Sums in the tensors' own arithmetic, as a framework's would be.
        let sum = |t: &Vec<f64>| t.iter().fold(0.0, |a, x| self.round(a + x));
        let total = tensors.iter().fold(0.0, |a, t| self.round(a + sum(t)));
        if self.1 == Bug::FiniteBySumOnly {
            return Ok(total.is_finite());
        }
        if total.is_finite() {
            return Ok(true);
        }
        Ok(tensors.iter().all(|t| t.iter().all(|x| x.is_finite())))
    }
    fn to_host(&self, t: &Vec<f64>) -> Result<Vec<f64>> {
        Ok(t.clone())
    }
    fn tensor_like(&self, data: &[f64], _like: &Vec<f64>) -> Result<Vec<f64>> {
        Ok(data.iter().map(|&v| self.round(v)).collect())
    }
    fn addcdiv_sqrt(
        &self,
        y: &Vec<f64>,
        alpha: f64,
        num: &Vec<f64>,
        den: &Vec<f64>,
        divisor: f64,
        eps: f64,
    ) -> Result<Vec<f64>> {
        if self.1 != Bug::Reciprocal {
            // Route the other cases through the element formula itself.
            let f = |v: f64| v as f32;
            return Ok((0..y.len())
                .map(|i| {
                    if self.0 == DType::F64 {
                        amp_core::elementwise::addcdiv_sqrt(
                            y[i], alpha, num[i], den[i], divisor, eps,
                        )
                    } else {
                        amp_core::elementwise::addcdiv_sqrt(
                            f(y[i]),
                            f(alpha),
                            f(num[i]),
                            f(den[i]),
                            f(divisor),
                            f(eps),
                        ) as f64
                    }
                })
                .collect());
        }
        let inverse = self.round(1.0 / divisor);
        Ok((0..y.len())
            .map(|i| {
                let d = self.round(self.round(den[i].sqrt()) * inverse);
                let step = self.round(self.round(alpha * num[i]) / self.round(d + eps));
                self.round(y[i] + step)
            })
            .collect())
    }
}

#[test]
fn the_defaults_pass_and_other_roundings_do_not() {
    let like = vec![0.0; 97];
    for dtype in [DType::F32, DType::F64] {
        elementwise_overrides_match(&Host(dtype, Bug::None), &like).unwrap();
        let err = elementwise_overrides_match(&Host(dtype, Bug::FusedAxpy), &like).unwrap_err();
        assert!(err.starts_with("axpy"), "{err}");
        let err = elementwise_overrides_match(&Host(dtype, Bug::Reciprocal), &like).unwrap_err();
        assert!(err.starts_with("addcdiv_sqrt"), "{err}");
    }
    let err = elementwise_overrides_match(&Host(DType::BF16, Bug::None), &like).unwrap_err();
    assert!(err.contains("only f32 and f64"), "{err}");
}

#[test]
fn batched_reductions_must_agree_with_the_per_tensor_ones() {
    let like = vec![0.0; 97];
    for dtype in [DType::F32, DType::F64] {
        batched_reductions_match(&Host(dtype, Bug::None), &like).unwrap();
        let err = batched_reductions_match(&Host(dtype, Bug::SumsBackwards), &like).unwrap_err();
        assert!(err.starts_with("sums_of_squares"), "{err}");
        let err = batched_reductions_match(&Host(dtype, Bug::FiniteBySumOnly), &like).unwrap_err();
        assert!(
            err.contains("all_finite_in (finite, sums overflow)"),
            "{err}"
        );
    }
}
