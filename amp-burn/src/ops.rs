//! [`BurnOps`]: the per-tensor operations on burn tensors, and the module
//! they rebuild before each pass.

use amp_core::{AmpError, DType, Pass, Result, TensorOps};
use burn::module::{Module, ParamId};
use burn::tensor::{DType as BurnDType, Tensor, TensorData};

use crate::flat::Flat;
use crate::module::{self, ParamContext};

/// [`TensorOps`] over burn tensors ([`Flat`]), holding the module whose
/// float parameters the store updates.
///
/// Wrapped in a [`TensorStore`](amp_core::TensorStore) it is a
/// [`BurnStore`](crate::BurnStore); build one with
/// [`ModuleStore::from_module`](crate::ModuleStore::from_module). Before
/// every closure call ([`TensorOps::prepare_pass`]) it rebuilds the module
/// from the weights that pass must see, replacing only the parameters whose
/// value changed since the last rebuild.
#[derive(Clone, Debug)]
pub struct BurnOps<M: Module> {
    pub(crate) module: M,
    pub(crate) contexts: Vec<ParamContext>,
    /// The version of each parameter the module holds now.
    pub(crate) built: Vec<u64>,
    dtype: DType,
}

impl<M: Module> BurnOps<M> {
    /// The operations and the module's parameters (flat, in burn's visiting
    /// order). An error when the module has a float parameter of a dtype
    /// amp does not handle, or parameters of two dtypes.
    pub(crate) fn new(module: M) -> Result<(Self, Vec<Flat>)> {
        let (params, contexts) = module::read_params(&module);
        let mut dtype = None;
        for (i, p) in params.iter().enumerate() {
            let this = amp_dtype(p.value().dtype()).ok_or_else(|| {
                AmpError::backend(format!(
                    "parameter {i} of the module has dtype {:?}; amp handles f32, f64, bf16 and f16",
                    p.value().dtype()
                ))
            })?;
            if *dtype.get_or_insert(this) != this {
                return Err(AmpError::backend(format!(
                    "parameter {i} of the module is {this:?}, the ones before it {:?}: \
                     one store holds one dtype",
                    dtype.unwrap_or(this)
                )));
            }
        }
        let built = params.iter().map(Flat::version).collect();
        let ops = Self {
            module,
            contexts,
            built,
            dtype: dtype.unwrap_or(DType::F32),
        };
        Ok((ops, params))
    }

    /// The module as last rebuilt (inside the closure: at the weights of
    /// the current pass).
    pub fn module(&self) -> &M {
        &self.module
    }

    /// The `ParamId` of every parameter, by store index.
    pub fn param_ids(&self) -> Vec<ParamId> {
        self.contexts.iter().map(|c| c.id).collect()
    }

    /// Rebuilds the module where it does not hold `params` yet.
    pub(crate) fn sync(&mut self, params: &[Flat]) -> Result<()> {
        if params
            .iter()
            .zip(&self.built)
            .all(|(p, &v)| p.version() == v)
        {
            return Ok(());
        }
        let mut built = self.built.clone();
        let module = module::rebuild(self.module.clone(), params, &self.contexts, &mut built)?;
        self.module = module;
        self.built = built;
        Ok(())
    }
}

/// amp's name for a burn float dtype.
pub fn amp_dtype(dtype: BurnDType) -> Option<DType> {
    match dtype {
        BurnDType::F64 => Some(DType::F64),
        BurnDType::F32 | BurnDType::Flex32 => Some(DType::F32),
        BurnDType::BF16 => Some(DType::BF16),
        BurnDType::F16 => Some(DType::F16),
        _ => None,
    }
}

impl<M: Module> TensorOps for BurnOps<M> {
    type Tensor = Flat;
    type Scalar = f64;

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn shape(&self, tensor: &Flat) -> Vec<usize> {
        tensor.dims().to_vec()
    }

    fn scale(&self, tensor: &Flat, factor: f64) -> Result<Flat> {
        if tensor.numel() == 0 {
            return Ok(tensor.clone());
        }
        Ok(tensor.with_value(tensor.value().clone().mul_scalar(factor)))
    }

    fn axpy(&self, y: &Flat, alpha: f64, x: &Flat) -> Result<Flat> {
        if y.numel() == 0 {
            return Ok(y.clone());
        }
        let product = x.value().clone().mul_scalar(alpha);
        Ok(y.with_value(y.value().clone().add(product)))
    }

    fn sum_of_squares(&self, tensor: &Flat) -> Result<f64> {
        if tensor.numel() == 0 {
            return Ok(0.0);
        }
        let value = tensor.value().clone();
        Ok(value.square().sum().into_scalar::<f64>())
    }

    /// One read of the tensor and no temporary: a finite sum means every
    /// element is finite. A sum that is not (a NaN, an infinity, or an
    /// overflow of finite values beyond about 3e38 in f32) is settled on
    /// the host.
    fn all_finite(&self, tensor: &Flat) -> Result<bool> {
        if tensor.numel() == 0 {
            return Ok(true);
        }
        let sum = tensor.value().clone().sum().into_scalar::<f64>();
        if sum.is_finite() {
            return Ok(true);
        }
        Ok(self.to_host(tensor)?.iter().all(|x| x.is_finite()))
    }

    /// Every tensor's sum of squares on the device, read in one transfer
    /// (one synchronisation instead of one per tensor).
    fn sums_of_squares(&self, tensors: &[&Flat]) -> Result<Vec<f64>> {
        let sums = tensors
            .iter()
            .filter(|t| t.numel() > 0)
            .map(|t| t.value().clone().square().sum())
            .collect();
        let mut read = read_all(sums).into_iter();
        // An empty tensor's sum is 0; the others come in order.
        Ok(tensors
            .iter()
            .map(|t| match t.numel() {
                0 => 0.0,
                _ => read.next().unwrap_or(f64::NAN),
            })
            .collect())
    }

    /// One number for all the tensors: the sum of their sums is finite
    /// only when every element is (or, for finite elements whose sums
    /// overflow, settled tensor by tensor).
    fn all_finite_in(&self, tensors: &[&Flat]) -> Result<bool> {
        let sums: Vec<_> = tensors
            .iter()
            .filter(|t| t.numel() > 0)
            .map(|t| t.value().clone().sum())
            .collect();
        if sums.is_empty() {
            return Ok(true);
        }
        let total = Tensor::cat(sums, 0).sum().into_scalar::<f64>();
        if total.is_finite() {
            return Ok(true);
        }
        for tensor in tensors {
            if !self.all_finite(tensor)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn to_host(&self, tensor: &Flat) -> Result<Vec<f64>> {
        if tensor.numel() == 0 {
            return Ok(Vec::new());
        }
        // `iter` widens each element to f64 (exactly, from f32, bf16 or f16).
        let data = tensor.value().to_data().iter::<f64>().collect();
        Ok(data)
    }

    fn tensor_like(&self, data: &[f64], like: &Flat) -> Result<Flat> {
        let dtype = like.value().dtype();
        let host = TensorData::new(data.to_vec(), [data.len()]).convert_dtype(dtype);
        let value = Tensor::<1>::from_data(host, (&like.value().device(), dtype));
        Ok(like.with_value(value))
    }

    /// Adam's second moment on the device: `y + (alpha · a) · b`, one
    /// rounding per operation as in [`amp_core::elementwise::addcmul`].
    fn addcmul(&self, y: &Flat, alpha: f64, a: &Flat, b: &Flat) -> Result<Flat> {
        if y.numel() == 0 {
            return Ok(y.clone());
        }
        let product = a.value().clone().mul_scalar(alpha).mul(b.value().clone());
        Ok(y.with_value(y.value().clone().add(product)))
    }

    /// Adam's update on the device: `y + (alpha · num) / (√den / divisor +
    /// eps)`, in the order of [`amp_core::elementwise::addcdiv_sqrt`].
    fn addcdiv_sqrt(
        &self,
        y: &Flat,
        alpha: f64,
        num: &Flat,
        den: &Flat,
        divisor: f64,
        eps: f64,
    ) -> Result<Flat> {
        if y.numel() == 0 {
            return Ok(y.clone());
        }
        let denominator = den
            .value()
            .clone()
            .sqrt()
            .div_scalar(divisor)
            .add_scalar(eps);
        let step = num.value().clone().mul_scalar(alpha).div(denominator);
        Ok(y.with_value(y.value().clone().add(step)))
    }

    fn prepare_pass(&mut self, params: &[Flat], _pass: Pass) -> Result<()> {
        self.sync(params)
    }
}

/// One-element tensors read back in one transfer, each widened to `f64`.
fn read_all(scalars: Vec<Tensor<1>>) -> Vec<f64> {
    if scalars.is_empty() {
        return Vec::new();
    }
    Tensor::cat(scalars, 0).to_data().iter::<f64>().collect()
}
