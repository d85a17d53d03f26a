//! The module side: reading a burn module's float parameters, rebuilding
//! the module from the store's weights, and collecting gradients from
//! burn's autograd — each a walk over the module in burn's own visiting
//! order, which is what gives a parameter its index in the store.

use amp_core::{AmpError, Result};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::{GradientCheckpointingStrategy, Gradients, Tensor};

use crate::flat::Flat;

/// What a parameter carries besides its value, kept so that a rebuilt
/// parameter trains exactly as the original did: whether it is on an
/// autodiff device and requires a gradient (frozen parameters do not), its
/// gradient-checkpointing strategy, and whether burn's data-parallel
/// training marked it as distributed.
#[derive(Clone, Debug)]
pub(crate) struct ParamContext {
    pub(crate) id: ParamId,
    autodiff: bool,
    require_grad: bool,
    checkpointing: Option<GradientCheckpointingStrategy>,
    distributed: bool,
}

/// Whether burn's backward pass gives `tensor` a gradient: it is on an
/// autodiff device and requires one (asking a tensor outside autodiff
/// about gradients panics in burn).
fn takes_grad<const D: usize>(tensor: &Tensor<D>) -> bool {
    tensor.is_autodiff() && tensor.is_require_grad()
}

impl ParamContext {
    fn capture<const D: usize>(id: ParamId, tensor: &Tensor<D>) -> Self {
        let autodiff = tensor.is_autodiff();
        Self {
            id,
            autodiff,
            require_grad: takes_grad(tensor),
            checkpointing: if autodiff {
                tensor.gradient_checkpointing_strategy()
            } else {
                None
            },
            distributed: autodiff && tensor.is_distributed(),
        }
    }

    /// `value` (no autodiff) as the parameter it stands for.
    fn restore<const D: usize>(&self, value: Tensor<D>) -> Tensor<D> {
        if !self.autodiff {
            return value;
        }
        let mut tensor = value.autodiff();
        if let Some(strategy) = self.checkpointing {
            tensor = tensor.with_gradient_checkpointing_strategy(strategy);
        }
        if self.require_grad {
            tensor = tensor.require_grad();
        }
        if self.distributed {
            tensor = tensor.set_distributed(self.id);
        }
        tensor
    }
}

/// Every float parameter of `module`, in visiting order, with its context.
pub(crate) fn read_params<M: Module>(module: &M) -> (Vec<Flat>, Vec<ParamContext>) {
    struct Reader(Vec<Flat>, Vec<ParamContext>);
    impl ModuleVisitor for Reader {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let tensor = param.base();
            self.1.push(ParamContext::capture(param.id, &tensor));
            self.0.push(Flat::new(tensor));
        }
    }
    let mut reader = Reader(Vec::new(), Vec::new());
    module.visit(&mut reader);
    (reader.0, reader.1)
}

/// `module` with every parameter whose version in `built` differs from the
/// store's replaced by the store's value; `built` records the new versions.
pub(crate) fn rebuild<M: Module>(
    module: M,
    params: &[Flat],
    contexts: &[ParamContext],
    built: &mut [u64],
) -> Result<M> {
    struct Rebuild<'a> {
        params: &'a [Flat],
        contexts: &'a [ParamContext],
        built: &'a mut [u64],
        index: usize,
        error: Option<AmpError>,
    }
    impl ModuleMapper for Rebuild<'_> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let index = self.index;
            self.index += 1;
            let (Some(flat), Some(context)) = (self.params.get(index), self.contexts.get(index))
            else {
                self.error.get_or_insert_with(|| {
                    AmpError::backend("the module has more float parameters than the store")
                });
                return param;
            };
            if self.built[index] == flat.version() || self.error.is_some() {
                return param;
            }
            if param.id != context.id {
                self.error.get_or_insert_with(|| {
                    AmpError::backend(format!(
                        "parameter {index} of the module is {}, the store's is {}",
                        param.id, context.id
                    ))
                });
                return param;
            }
            match flat.to_tensor::<D>() {
                Ok(value) => {
                    self.built[index] = flat.version();
                    let (id, _, mapper) = param.consume();
                    Param::from_mapped_value(id, context.restore(value), mapper)
                }
                Err(e) => {
                    self.error = Some(e);
                    param
                }
            }
        }
    }
    let mut mapper = Rebuild {
        params,
        contexts,
        built,
        index: 0,
        error: None,
    };
    let module = module.map(&mut mapper);
    match mapper.error {
        Some(e) => Err(e),
        None if mapper.index != params.len() => Err(AmpError::backend(format!(
            "the module has {} float parameters, the store {}",
            mapper.index,
            params.len()
        ))),
        None => Ok(module),
    }
}

/// The gradient of every float parameter of `module` that `grads` holds,
/// in visiting order (`None` where it holds none), taken out of `grads`.
pub(crate) fn take_grads<M: Module>(module: &M, grads: &mut Gradients) -> Vec<Option<Flat>> {
    struct Taker<'a>(&'a mut Gradients, Vec<Option<Flat>>);
    impl ModuleVisitor for Taker<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let tensor = param.base();
            let grad = if takes_grad(&tensor) {
                tensor.grad_remove(self.0).map(Flat::new)
            } else {
                None
            };
            self.1.push(grad);
        }
    }
    let mut taker = Taker(grads, Vec::new());
    module.visit(&mut taker);
    taker.1
}
