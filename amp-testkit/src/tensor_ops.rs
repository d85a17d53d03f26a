//! The per-tensor tier checked on its own: whatever a [`TensorOps`]
//! implementation computes with its framework's kernels must give, bit for
//! bit, what the element formulas of [`amp_core::elementwise`] give on the
//! host — one rounding per operation, in the order written, no fused
//! multiply-add. The store-level suites cannot see this: both sides of
//! their comparisons call the same `TensorOps` methods.

use amp_core::{elementwise, DType, Scalar, TensorOps};

/// Deterministic test values: magnitudes from 1e-3 to 1e3, both signs,
/// zeros of both signs, and a subnormal-free tiny value.
fn values(n: usize, seed: u64, positive: bool) -> Vec<f64> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|i| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let unit = (state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
            let scale = [1e-3, 1.0, 1e3, 0.37][i % 4];
            let v = match i % 29 {
                0 => 0.0,
                1 => -0.0,
                2 => 1e-30,
                _ => unit * scale,
            };
            if positive {
                v.abs()
            } else {
                v
            }
        })
        .collect()
}

/// `f` in the tensors' arithmetic: `f64`, or `f32` on values and
/// coefficients rounded to `f32`.
fn formula(dtype: DType, args: &[f64], f32: fn(&[f32]) -> f32, f64: fn(&[f64]) -> f64) -> f64 {
    if dtype == DType::F64 {
        f64(args)
    } else {
        let narrow: Vec<f32> = args.iter().map(|&a| a as f32).collect();
        f32(&narrow) as f64
    }
}

/// Compares `got` with `want` bit for bit (as the tensor's dtype holds
/// them); the first difference, named.
fn same(what: &str, got: &[f64], want: &[f64]) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: {} values, expected {}",
            got.len(),
            want.len()
        ));
    }
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let equal = g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan());
        if !equal {
            return Err(format!(
                "{what}: element {i} is {g:e}, the formula gives {w:e}"
            ));
        }
    }
    Ok(())
}

/// Checks `scale`, `axpy`, `addcmul`, `addcdiv_sqrt` and `maximum` of
/// `ops` against the element formulas, on tensors made with
/// `ops.tensor_like(…, like)` (`like` fixes shape, dtype and device; any
/// shape with a few dozen elements or more serves). For `f32` and `f64`
/// tensors; an error names the first operation and element that differ.
pub fn elementwise_overrides_match<O: TensorOps>(ops: &O, like: &O::Tensor) -> Result<(), String> {
    let dtype = ops.dtype();
    if !matches!(dtype, DType::F32 | DType::F64) {
        return Err(format!(
            "only f32 and f64 tensors are checked, not {dtype:?}"
        ));
    }
    let err = |e: amp_core::AmpError| e.to_string();
    let n: usize = ops.shape(like).iter().product();
    let tensor = |data: &[f64]| ops.tensor_like(data, like).map_err(err);
    let host = |t: &O::Tensor| ops.to_host(t).map_err(err);
    // The values as the tensors hold them (rounded to the dtype).
    let (y, a) = (tensor(&values(n, 1, false))?, tensor(&values(n, 2, false))?);
    let (b, den) = (tensor(&values(n, 3, false))?, tensor(&values(n, 4, true))?);
    let (hy, ha, hb, hden) = (host(&y)?, host(&a)?, host(&b)?, host(&den)?);
    let coefficient = |c: f64| O::Scalar::from_f64_rounded(c);
    let (alpha, divisor, eps) = (-0.012_345_678_9, 0.7, 1e-8);
    // Coefficients as the store passes them: rounded to `O::Scalar`.
    let c = |v: f64| coefficient(v).widen();

    let got = host(&ops.scale(&a, coefficient(alpha)).map_err(err)?)?;
    let want: Vec<f64> = ha
        .iter()
        .map(|&x| formula(dtype, &[c(alpha), x], |v| v[0] * v[1], |v| v[0] * v[1]))
        .collect();
    same("scale", &got, &want)?;

    let got = host(&ops.axpy(&y, coefficient(alpha), &a).map_err(err)?)?;
    let want: Vec<f64> = hy
        .iter()
        .zip(&ha)
        .map(|(&y, &x)| {
            formula(
                dtype,
                &[y, c(alpha), x],
                |v| v[0] + v[1] * v[2],
                |v| v[0] + v[1] * v[2],
            )
        })
        .collect();
    same("axpy", &got, &want)?;

    let got = host(&ops.addcmul(&y, coefficient(alpha), &a, &b).map_err(err)?)?;
    let want: Vec<f64> = (0..n)
        .map(|i| {
            formula(
                dtype,
                &[hy[i], c(alpha), ha[i], hb[i]],
                |v| elementwise::addcmul(v[0], v[1], v[2], v[3]),
                |v| elementwise::addcmul(v[0], v[1], v[2], v[3]),
            )
        })
        .collect();
    same("addcmul", &got, &want)?;

    let got = ops
        .addcdiv_sqrt(
            &y,
            coefficient(alpha),
            &a,
            &den,
            coefficient(divisor),
            coefficient(eps),
        )
        .map_err(err)?;
    let want: Vec<f64> = (0..n)
        .map(|i| {
            formula(
                dtype,
                &[hy[i], c(alpha), ha[i], hden[i], c(divisor), c(eps)],
                |v| elementwise::addcdiv_sqrt(v[0], v[1], v[2], v[3], v[4], v[5]),
                |v| elementwise::addcdiv_sqrt(v[0], v[1], v[2], v[3], v[4], v[5]),
            )
        })
        .collect();
    same("addcdiv_sqrt", &host(&got)?, &want)?;

    let got = host(&ops.maximum(&a, &b).map_err(err)?)?;
    let want: Vec<f64> = (0..n).map(|i| elementwise::maximum(ha[i], hb[i])).collect();
    same("maximum", &got, &want)
}

/// Checks the batched reductions of `ops` against their per-tensor
/// definitions, on tensors made with `ops.tensor_like(…, like)`:
/// [`TensorOps::sums_of_squares`] must give, bit for bit, what
/// [`TensorOps::sum_of_squares`] gives tensor by tensor, and
/// [`TensorOps::all_finite_in`] what [`TensorOps::all_finite`] decides for
/// each — with a NaN or an infinity in one tensor among finite ones, and
/// with finite elements so large that their sums overflow. For any dtype;
/// an error names the first disagreement.
pub fn batched_reductions_match<O: TensorOps>(ops: &O, like: &O::Tensor) -> Result<(), String> {
    let err = |e: amp_core::AmpError| e.to_string();
    let n: usize = ops.shape(like).iter().product();
    if n == 0 {
        return Err("`like` must have elements".into());
    }
    let tensor = |data: &[f64]| ops.tensor_like(data, like).map_err(err);
    // The largest finite values of the dtype: any sum of two overflows.
    let huge = match ops.dtype() {
        DType::F64 => f64::MAX,
        DType::F32 => f32::MAX as f64,
        DType::F16 => 65504.0,
        DType::BF16 => 3.3e38,
        other => return Err(format!("no largest finite value known for {other:?}")),
    };
    let with = |value: f64, seed: u64| {
        let mut data = values(n, seed, false);
        data[n / 2] = value;
        tensor(&data)
    };
    let finite = [tensor(&values(n, 5, false))?, tensor(&values(n, 6, false))?];
    let cases: Vec<(&str, Vec<O::Tensor>)> = vec![
        ("no tensors", vec![]),
        ("finite tensors", finite.to_vec()),
        (
            "a NaN in the second",
            vec![finite[0].clone(), with(f64::NAN, 7)?, finite[1].clone()],
        ),
        (
            "+inf in the first",
            vec![with(f64::INFINITY, 8)?, finite[1].clone()],
        ),
        (
            "-inf and +inf",
            vec![with(f64::NEG_INFINITY, 9)?, with(f64::INFINITY, 10)?],
        ),
        (
            "finite, sums overflow",
            vec![
                tensor(&vec![huge; n])?,
                finite[0].clone(),
                tensor(&vec![-huge; n])?,
            ],
        ),
        (
            "huge and a NaN",
            vec![tensor(&vec![huge; n])?, with(f64::NAN, 11)?],
        ),
    ];
    for (name, tensors) in &cases {
        let refs: Vec<&O::Tensor> = tensors.iter().collect();
        let got = ops.sums_of_squares(&refs).map_err(err)?;
        let want = refs
            .iter()
            .map(|t| ops.sum_of_squares(t))
            .collect::<amp_core::Result<Vec<f64>>>()
            .map_err(err)?;
        same(&format!("sums_of_squares ({name})"), &got, &want)?;
        let got = ops.all_finite_in(&refs).map_err(err)?;
        let mut want = true;
        for t in &refs {
            want &= ops.all_finite(t).map_err(err)?;
        }
        if got != want {
            return Err(format!(
                "all_finite_in ({name}) is {got}, tensor by tensor {want}"
            ));
        }
    }
    Ok(())
}
