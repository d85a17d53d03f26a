//! [`BurnStore`] and [`ModuleStore`]: a burn module as an amp store —
//! module in, module out.

use amp_core::{AmpError, Result, TensorStore};
use burn::module::{Module, ParamId};
use burn::tensor::{Gradients, Tensor};

use crate::module;
use crate::ops::BurnOps;

/// A store over the float parameters of a burn module `M`: a
/// [`TensorStore`] of [`BurnOps`]. Build it with
/// [`ModuleStore::from_module`]; the closure reaches the module with
/// [`ModuleStore::module`] and hands its gradients over with
/// [`ModuleStore::backward`]; [`ModuleStore::into_module`] gives the
/// trained module back.
///
/// Parameter `i` of the store is the `i`-th float parameter burn visits
/// (the order of the module's fields, as `Module::visit` walks them);
/// [`ModuleStore::param_ids`] lists their `ParamId`s. Integer and boolean
/// parameters are not the optimiser's and stay as they are.
pub type BurnStore<M> = TensorStore<BurnOps<M>>;

/// What a [`BurnStore`] adds for burn modules. Bring it into scope with
/// `use amp_burn::ModuleStore;`.
pub trait ModuleStore<M: Module>: Sized {
    /// A store over `module`'s float parameters.
    ///
    /// Build the module on an autodiff device (`device.autodiff()`): only
    /// parameters that require a gradient there receive one, so a frozen
    /// parameter (`Module::freeze`, `Param::set_require_grad(false)`) or a
    /// module outside autodiff is never updated. An error when its float
    /// parameters are not all of one dtype among f32, f64, bf16 and f16.
    fn from_module(module: M) -> Result<Self>;

    /// The module at the store's current weights: inside the closure, the
    /// weights of the current pass (θ, or θ + δ on a perturbed pass);
    /// between steps, the updated θ. It is rebuilt only where a parameter
    /// changed since the last time.
    fn module(&mut self) -> Result<&M>;

    /// Runs burn's backward pass on `loss` (one element) and hands the
    /// gradients of the module's parameters to the store
    /// ([`ModuleStore::set_grads`]). Returns the loss's value.
    fn backward<const D: usize>(&mut self, loss: &Tensor<D>) -> Result<f64>;

    /// Takes the gradient of every parameter of the module out of `grads`
    /// and makes it the store's gradient. Parameters `grads` holds nothing
    /// for (frozen ones, or ones the loss does not depend on) have none, so
    /// the optimiser leaves them alone; a second call adds nothing new for
    /// parameters whose gradient was already taken.
    fn set_grads(&mut self, grads: Gradients) -> Result<()>;

    /// Takes `module`'s float parameters as the store's weights: for a
    /// module updated outside the store — by burn's own optimiser after
    /// the split step ([`amp_core::Amp::perturb`]), or loaded from a burn
    /// record. Its parameters must be the store's (same `ParamId`s, in the
    /// same order, same shapes); otherwise nothing changes and the error
    /// says which differs.
    fn set_module(&mut self, module: M) -> Result<()>;

    /// The trained module: the store's weights in the module's parameters,
    /// each with its `ParamId`, training state and device as before.
    fn into_module(self) -> Result<M>;

    /// The `ParamId` of every parameter, by store index.
    fn param_ids(&self) -> Vec<ParamId>;

    /// The store indices of `ids` (for
    /// [`amp_core::ParamGroup::new`]); an error for an id that is not a
    /// float parameter of the module.
    fn indices_of(&self, ids: &[ParamId]) -> Result<Vec<usize>> {
        let all = self.param_ids();
        ids.iter()
            .map(|id| {
                all.iter().position(|p| p == id).ok_or_else(|| {
                    AmpError::backend(format!("{id} is not a float parameter of the module"))
                })
            })
            .collect()
    }
}

impl<M: Module> ModuleStore<M> for BurnStore<M> {
    fn from_module(module: M) -> Result<Self> {
        let (ops, params) = BurnOps::new(module)?;
        Ok(TensorStore::new(ops, params))
    }

    fn module(&mut self) -> Result<&M> {
        let (ops, params) = self.ops_mut_and_params();
        ops.sync(params)?;
        Ok(self.ops().module())
    }

    fn backward<const D: usize>(&mut self, loss: &Tensor<D>) -> Result<f64> {
        if loss.shape().num_elements() != 1 {
            return Err(AmpError::backend(format!(
                "the loss must have one element, it has shape {:?}",
                loss.dims()
            )));
        }
        if !loss.is_tracked() {
            return Err(AmpError::backend(
                "the loss is not on autodiff's tape: build the module on `device.autodiff()` \
                 and compute the loss from `store.module()`",
            ));
        }
        let value = loss.clone().into_scalar::<f64>();
        self.set_grads(loss.backward())?;
        Ok(value)
    }

    fn set_grads(&mut self, mut grads: Gradients) -> Result<()> {
        let taken = module::take_grads(self.ops().module(), &mut grads);
        if taken.len() != self.params().len() {
            return Err(AmpError::backend(format!(
                "the module has {} float parameters, the store {}",
                taken.len(),
                self.params().len()
            )));
        }
        for (i, grad) in taken.into_iter().enumerate() {
            if let Some(grad) = grad {
                self.set_grad(i, grad)?;
            }
        }
        Ok(())
    }

    fn set_module(&mut self, module: M) -> Result<()> {
        let (params, contexts) = module::read_params(&module);
        let ids = self.param_ids();
        if contexts.len() != ids.len() {
            return Err(AmpError::backend(format!(
                "the module has {} float parameters, the store {}",
                contexts.len(),
                ids.len()
            )));
        }
        for (i, (context, id)) in contexts.iter().zip(&ids).enumerate() {
            if context.id != *id {
                return Err(AmpError::backend(format!(
                    "parameter {i} of the module is {}, the store's is {id}",
                    context.id
                )));
            }
            let dtype = crate::ops::amp_dtype(params[i].value().dtype());
            if dtype != Some(amp_core::TensorOps::dtype(self.ops())) {
                return Err(AmpError::backend(format!(
                    "parameter {i} of the module is {:?}, the store holds {:?}",
                    params[i].value().dtype(),
                    amp_core::TensorOps::dtype(self.ops())
                )));
            }
            if params[i].dims() != self.params()[i].dims() {
                return Err(AmpError::backend(format!(
                    "parameter {i} of the module has shape {:?}, the store's {:?}",
                    params[i].dims(),
                    self.params()[i].dims()
                )));
            }
        }
        for (i, param) in params.into_iter().enumerate() {
            self.set_param(i, param)?;
        }
        Ok(())
    }

    fn into_module(mut self) -> Result<M> {
        self.module()?;
        Ok(self.into_parts().0.module)
    }

    fn param_ids(&self) -> Vec<ParamId> {
        self.ops().param_ids()
    }
}
