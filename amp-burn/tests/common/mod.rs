//! A burn module of any shapes (the conformance cases' tensors) and the
//! conformance objective written with burn's operations.

use amp_burn::burn::module::{Module, Param};
use amp_burn::burn::tensor::{DType as BurnDType, Device, Tensor, TensorData};
use amp_burn::{BurnStore, ModuleStore};
use amp_core::{AmpError, DType, HostTensor, Result};
use amp_testkit::autograd::AutogradFactory;
use amp_testkit::{Objective, StoreFactory};

/// One weight of any rank the cases use (burn has no 0-d tensors).
#[derive(Module, Debug)]
pub enum Weight {
    /// A vector.
    R1(Param<Tensor<1>>),
    /// A matrix.
    R2(Param<Tensor<2>>),
    /// A rank-3 tensor.
    R3(Param<Tensor<3>>),
    /// A convolution kernel.
    R4(Param<Tensor<4>>),
}

impl Weight {
    /// The weight flattened, still on autodiff's tape.
    pub fn flat(&self) -> Tensor<1> {
        fn flatten<const D: usize>(p: &Param<Tensor<D>>) -> Tensor<1> {
            let n = p.val().dims().iter().product::<usize>();
            p.val().reshape([n])
        }
        match self {
            Weight::R1(p) => flatten(p),
            Weight::R2(p) => flatten(p),
            Weight::R3(p) => flatten(p),
            Weight::R4(p) => flatten(p),
        }
    }
}

/// Weights of the given shapes as one module.
#[derive(Module, Debug)]
pub struct Bag {
    /// The weights, in store order.
    pub weights: Vec<Weight>,
}

/// burn's dtype for amp's.
pub fn burn_dtype(dtype: DType) -> Result<BurnDType> {
    match dtype {
        DType::F32 => Ok(BurnDType::F32),
        DType::F64 => Ok(BurnDType::F64),
        other => Err(AmpError::backend(format!("no {other:?} in these tests"))),
    }
}

fn param<const D: usize>(
    value: &HostTensor,
    dtype: BurnDType,
    device: &Device,
) -> Param<Tensor<D>> {
    let data = TensorData::new(value.data().to_vec(), value.shape().to_vec()).convert_dtype(dtype);
    Param::from_tensor(Tensor::<D>::from_data(data, (device, dtype)).require_grad())
}

/// A module holding `values` (their shapes; 0-d tensors must have been
/// fitted to `[1]`) on `device`, in `dtype`.
pub fn bag(values: &[HostTensor], dtype: DType, device: &Device) -> Result<Bag> {
    let dtype = burn_dtype(dtype)?;
    let weights = values
        .iter()
        .map(|v| match v.shape().len() {
            1 => Ok(Weight::R1(param(v, dtype, device))),
            2 => Ok(Weight::R2(param(v, dtype, device))),
            3 => Ok(Weight::R3(param(v, dtype, device))),
            4 => Ok(Weight::R4(param(v, dtype, device))),
            r => Err(AmpError::backend(format!(
                "no rank-{r} weights in these tests"
            ))),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Bag { weights })
}

/// Stores over a [`Bag`] on burn's CPU backend (flex), with autodiff.
pub struct BurnFactory;

/// The device the tests run on.
pub fn device() -> Device {
    Device::flex().autodiff()
}

impl StoreFactory for BurnFactory {
    type Store = BurnStore<Bag>;

    fn make(&self, values: &[HostTensor], dtype: DType) -> Result<Self::Store> {
        BurnStore::from_module(bag(values, dtype, &device())?)
    }

    fn name(&self) -> String {
        "burn flex".into()
    }

    fn zero_dim_tensors(&self) -> bool {
        false
    }
}

/// The conformance objective with burn's operations, in f64, on `bag`'s
/// weights (frozen ones detached).
pub fn objective_loss(bag: &Bag, objective: &Objective) -> Tensor<1> {
    let device = device();
    let constant = |values: &[f64]| {
        Tensor::<1>::from_data(
            TensorData::new(values.to_vec(), [values.len()]),
            (&device, BurnDType::F64),
        )
    };
    let zero = || constant(&[0.0]);
    let (mut loss, mut s) = (zero(), zero());
    for (i, weight) in bag.weights.iter().enumerate() {
        let mut theta = weight.flat();
        if objective.frozen[i] {
            theta = theta.detach();
        }
        let theta = theta.cast(BurnDType::F64);
        let d = theta.clone() - constant(&objective.center[i]);
        let term = (constant(&objective.curvature[i]) * d.square()).sum();
        loss = loss + term.mul_scalar(0.5);
        s = s + (constant(&objective.coupling_weights[i]) * theta).sum();
    }
    loss + s.square().mul_scalar(0.5 * objective.coupling)
}

impl AutogradFactory for BurnFactory {
    fn loss_and_grads(&self, store: &mut Self::Store, objective: &Objective) -> Result<f64> {
        let loss = objective_loss(store.module()?, objective);
        store.backward(&loss)
    }

    fn model_loss(&self, store: &mut Self::Store, objective: &Objective) -> Result<f64> {
        let bag = store.module()?.clone().valid();
        Ok(objective_loss(&bag, objective).into_scalar::<f64>())
    }
}
