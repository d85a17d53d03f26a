//! Conversions between libtorch's kinds, devices and tensors and
//! amp-core's dtypes and host tensors.

use amp_core::{AmpError, DType, HostTensor, Result};
use tch::{Device, Kind, Tensor};

/// The [`DType`] of a libtorch kind, if it is a floating-point one.
pub fn dtype_of(kind: Kind) -> Option<DType> {
    match kind {
        Kind::Half => Some(DType::F16),
        Kind::BFloat16 => Some(DType::BF16),
        Kind::Float => Some(DType::F32),
        Kind::Double => Some(DType::F64),
        _ => None,
    }
}

/// The libtorch kind of a [`DType`].
pub fn kind_of(dtype: DType) -> Result<Kind> {
    match dtype {
        DType::F16 => Ok(Kind::Half),
        DType::BF16 => Ok(Kind::BFloat16),
        DType::F32 => Ok(Kind::Float),
        DType::F64 => Ok(Kind::Double),
        other => Err(AmpError::backend(format!(
            "dtype {other} has no libtorch equivalent here"
        ))),
    }
}

pub(crate) fn tch_error(error: tch::TchError) -> AmpError {
    AmpError::backend(error)
}

pub(crate) fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// A tensor's shape as amp-core's `usize` dimensions.
pub(crate) fn shape_of(tensor: &Tensor) -> Result<Vec<usize>> {
    tensor
        .size()
        .into_iter()
        .map(|d| usize::try_from(d).map_err(AmpError::backend))
        .collect()
}

/// Builds a tensor of `kind` on `device` from host values (rounded to
/// `kind`); it does not require grad.
/// (A `HostTensor` holds as many values as its shape has elements.)
pub(crate) fn host_to_tensor(value: &HostTensor, kind: Kind, device: Device) -> Result<Tensor> {
    let shape = value
        .shape()
        .iter()
        .map(|&d| i64::try_from(d).map_err(AmpError::backend))
        .collect::<Result<Vec<i64>>>()?;
    Tensor::f_from_slice(value.data())
        .and_then(|t| t.f_view(shape.as_slice()))
        .and_then(|t| t.f_to_kind(kind))
        .and_then(|t| t.f_to_device(device))
        .map_err(tch_error)
}
