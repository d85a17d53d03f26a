//! Tensors to and from safetensors bytes, each in its own dtype,
//! little-endian; half-precision formats through the `half` crate.

use std::borrow::Cow;

use amp_core::{AmpError, DType, HostTensor, Result};
use half::{bf16, f16};
use safetensors::tensor::View;
use safetensors::Dtype;

/// A tensor encoded for safetensors.
pub(crate) struct Encoded {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl Encoded {
    pub(crate) fn new(tensor: &HostTensor) -> Result<Self> {
        // A HostTensor holds as many values as its shape has elements.
        let data = tensor.data();
        // Values come from a store of the dtype, so each is exactly
        // representable and every conversion below is exact.
        let (dtype, bytes): (Dtype, Vec<u8>) = match tensor.dtype() {
            DType::F64 => (
                Dtype::F64,
                data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
            DType::F32 => (
                Dtype::F32,
                data.iter()
                    .flat_map(|&x| (x as f32).to_le_bytes())
                    .collect(),
            ),
            DType::F16 => (
                Dtype::F16,
                data.iter()
                    .flat_map(|&x| f16::from_f64(x).to_le_bytes())
                    .collect(),
            ),
            DType::BF16 => (
                Dtype::BF16,
                data.iter()
                    .flat_map(|&x| bf16::from_f64(x).to_le_bytes())
                    .collect(),
            ),
            other => {
                return Err(AmpError::Checkpoint(format!(
                    "dtype {other} cannot be stored in a checkpoint"
                )))
            }
        };
        Ok(Encoded {
            dtype,
            shape: tensor.shape().to_vec(),
            bytes,
        })
    }
}

impl View for &Encoded {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }

    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// The dtype of a safetensors tensor, if a checkpoint may hold it.
pub(crate) fn dtype_of(dtype: Dtype) -> Option<DType> {
    match dtype {
        Dtype::F16 => Some(DType::F16),
        Dtype::BF16 => Some(DType::BF16),
        Dtype::F32 => Some(DType::F32),
        Dtype::F64 => Some(DType::F64),
        _ => None,
    }
}

/// Decodes little-endian `bytes` of `dtype`; `bytes.len()` is a multiple of
/// the element size (safetensors checked it against the shape).
pub(crate) fn decode(dtype: DType, bytes: &[u8]) -> Vec<f64> {
    match dtype {
        DType::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect(),
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        _ => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
    }
}

/// The smallest magnitude that rounds to infinity in `dtype` (the largest
/// finite value plus half an ulp); `None` for `f64`.
pub(crate) fn overflow_threshold(dtype: DType) -> Option<f64> {
    match dtype {
        DType::F16 => Some(65520.0),
        // (2 − 2⁻⁸)·2¹²⁷ and (2 − 2⁻²⁴)·2¹²⁷.
        DType::BF16 => Some((2.0 - 2f64.powi(-8)) * 2f64.powi(127)),
        DType::F32 => Some((2.0 - 2f64.powi(-24)) * 2f64.powi(127)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(dtype: DType, value: f64) -> f64 {
        let tensor = HostTensor::new(vec![1], dtype, vec![value]).expect("one value");
        let encoded = Encoded::new(&tensor).expect("encodes");
        decode(dtype, &encoded.bytes)[0]
    }

    #[test]
    fn half_formats_round_trip_every_bit_pattern() {
        for dtype in [DType::F16, DType::BF16] {
            for bits in 0..=u16::MAX {
                let value = decode(dtype, &bits.to_le_bytes())[0];
                let back = round_trip(dtype, value);
                if value.is_nan() {
                    assert!(back.is_nan());
                } else {
                    assert_eq!(back.to_bits(), value.to_bits(), "{dtype} bits {bits:#06x}");
                }
            }
        }
    }

    #[test]
    fn f16_rounds_to_nearest_even() {
        // IEEE 754 binary16 reference values.
        let f16_bits = |x: f64| f16::from_f64(x).to_bits();
        assert_eq!(f16_bits(1.0), 0x3c00);
        assert_eq!(f16_bits(65519.0), 0x7bff); // below the halfway point
        assert_eq!(f16_bits(65520.0), 0x7c00); // halfway: ties to even → ∞
        assert_eq!(f16_bits(2f64.powi(-25)), 0x0000); // tie to even (0)
        assert_eq!(f16_bits(1.5 * 2f64.powi(-24)), 0x0002); // tie to even (2)
        assert_eq!(f16_bits(0.1), 0x2e66);
    }

    #[test]
    fn overflow_thresholds_are_the_largest_finite_value_plus_half_an_ulp() {
        // (largest finite bit pattern, the one below it) per dtype.
        let f16_max = decode(DType::F16, &0x7bffu16.to_le_bytes())[0];
        let f16_prev = decode(DType::F16, &0x7bfeu16.to_le_bytes())[0];
        let bf16_max = decode(DType::BF16, &0x7f7fu16.to_le_bytes())[0];
        let bf16_prev = decode(DType::BF16, &0x7f7eu16.to_le_bytes())[0];
        let f32_max = f64::from(f32::MAX);
        let f32_prev = f64::from(f32::from_bits(f32::MAX.to_bits() - 1));
        for (dtype, max, prev) in [
            (DType::F16, f16_max, f16_prev),
            (DType::BF16, bf16_max, bf16_prev),
            (DType::F32, f32_max, f32_prev),
        ] {
            assert_eq!(
                overflow_threshold(dtype),
                Some(max + (max - prev) / 2.0),
                "{dtype}"
            );
        }
        assert_eq!(overflow_threshold(DType::F64), None);
        // f32 rounding (the one conversion not done through `half`) agrees.
        let limit = overflow_threshold(DType::F32).unwrap_or(0.0);
        assert!((limit as f32).is_infinite());
        assert!((f64::from_bits(limit.to_bits() - 1) as f32).is_finite());
    }
}
