//! The framework-side properties ([`amp_testkit::autograd`]) on a store for
//! a functional framework — one whose model keeps its own copy of the
//! weights, rebuilt from the store in `TensorOps::prepare_pass` — and the
//! mistakes such an adapter can make, each of which the properties must
//! catch.

use amp_core::{
    AmpConfig, AmpError, DType, HostTensor, Pass, Result, SgdConfig, TensorOps, TensorStore,
};
use amp_testkit::autograd::{self, AutogradFactory};
use amp_testkit::{autograd_suite, Case, Objective, StoreFactory};

/// A host tensor.
#[derive(Clone, Debug)]
struct Dense {
    shape: Vec<usize>,
    data: Vec<f64>,
}

/// What the adapter gets wrong, if anything.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Bug {
    None,
    /// `prepare_pass` never rebuilds the model: it keeps the initial weights.
    NoRebuild,
    /// The model is rebuilt for the clean pass only, so the perturbed passes
    /// see θ instead of θ + δ.
    CleanPassOnly,
    /// The model handed back after a step is the one of the last pass
    /// (θ + δ_K), not rebuilt from θ.
    StaleAfterStep,
    /// Frozen tensors get a (zero) gradient.
    GradForFrozen,
}

/// The "framework": a model holding its own copy of every weight.
struct ModelOps {
    model: Vec<Vec<f64>>,
    bug: Bug,
}

impl ModelOps {
    fn rebuild(&mut self, params: &[Dense]) {
        self.model = params.iter().map(|p| p.data.clone()).collect();
    }
}

impl TensorOps for ModelOps {
    type Tensor = Dense;
    type Scalar = f64;

    fn dtype(&self) -> DType {
        DType::F64
    }

    fn shape(&self, tensor: &Dense) -> Vec<usize> {
        tensor.shape.clone()
    }

    fn scale(&self, tensor: &Dense, factor: f64) -> Result<Dense> {
        let data = tensor.data.iter().map(|x| factor * x).collect();
        Ok(Dense {
            shape: tensor.shape.clone(),
            data,
        })
    }

    fn axpy(&self, y: &Dense, alpha: f64, x: &Dense) -> Result<Dense> {
        let data = y
            .data
            .iter()
            .zip(&x.data)
            .map(|(y, x)| y + alpha * x)
            .collect();
        Ok(Dense {
            shape: y.shape.clone(),
            data,
        })
    }

    fn sum_of_squares(&self, tensor: &Dense) -> Result<f64> {
        Ok(tensor.data.iter().map(|x| x * x).sum())
    }

    fn to_host(&self, tensor: &Dense) -> Result<Vec<f64>> {
        Ok(tensor.data.clone())
    }

    fn tensor_like(&self, data: &[f64], like: &Dense) -> Result<Dense> {
        Ok(Dense {
            shape: like.shape.clone(),
            data: data.to_vec(),
        })
    }

    fn prepare_pass(&mut self, params: &[Dense], pass: Pass) -> Result<()> {
        match self.bug {
            Bug::NoRebuild => {}
            Bug::CleanPassOnly if pass.is_perturbed() => {}
            _ => self.rebuild(params),
        }
        Ok(())
    }
}

struct Functional(Bug);

impl StoreFactory for Functional {
    type Store = TensorStore<ModelOps>;

    fn make(&self, values: &[HostTensor], dtype: DType) -> Result<Self::Store> {
        if dtype != DType::F64 {
            return Err(AmpError::backend("this framework holds f64 only"));
        }
        let params: Vec<Dense> = values
            .iter()
            .map(|v| Dense {
                shape: v.shape().to_vec(),
                data: v.data().to_vec(),
            })
            .collect();
        let mut ops = ModelOps {
            model: Vec::new(),
            bug: self.0,
        };
        ops.rebuild(&params);
        Ok(TensorStore::new(ops, params))
    }

    fn name(&self) -> String {
        format!("functional model ({:?})", self.0)
    }

    fn zero_dim_tensors(&self) -> bool {
        false
    }
}

impl AutogradFactory for Functional {
    fn loss_and_grads(&self, store: &mut Self::Store, objective: &Objective) -> Result<f64> {
        let (loss, grads) = objective.evaluate(&store.ops().model);
        for (i, grad) in grads.into_iter().enumerate() {
            let shape = store.params()[i].shape.clone();
            let data = match grad {
                Some(g) => g,
                None if self.0 == Bug::GradForFrozen => vec![0.0; shape.iter().product()],
                None => continue,
            };
            store.set_grad(i, Dense { shape, data })?;
        }
        Ok(loss)
    }

    fn model_loss(&self, store: &mut Self::Store, objective: &Objective) -> Result<f64> {
        if self.0 != Bug::StaleAfterStep {
            let params = store.params().to_vec();
            store.ops_mut().rebuild(&params);
        }
        Ok(objective.evaluate(&store.ops().model).0)
    }
}

// The correct adapter passes both properties on generated cases.
autograd_suite!(functional_f64, Functional(Bug::None), DType::F64);

/// Two tensors (one frozen, one 0-d), K = 2 with ε large enough that δ
/// moves the weights, three steps.
fn case() -> Case {
    let init = vec![
        HostTensor::new(vec![2, 2], DType::F64, vec![0.5, -1.0, 2.0, 0.25]).unwrap(),
        HostTensor::new(vec![], DType::F64, vec![1.5]).unwrap(),
        HostTensor::new(vec![3], DType::F64, vec![0.1, 0.2, -0.3]).unwrap(),
    ];
    let sizes = [4, 1, 3];
    let fill = |value: f64| sizes.iter().map(|&n| vec![value; n]).collect::<Vec<_>>();
    let objective = Objective {
        curvature: fill(1.5),
        center: fill(0.2),
        coupling_weights: fill(0.3),
        coupling: 0.5,
        frozen: vec![false, false, true],
    };
    Case {
        init,
        objective,
        config: AmpConfig::new(0.1, 0.2).inner_lr(1.0).inner_iter(2),
        sgd: SgdConfig::nesterov(0.9),
        adam: None,
        steps: 3,
    }
}

#[test]
fn the_correct_adapter_passes_on_a_fixed_case() {
    let case = case().fitted_to(&Functional(Bug::None));
    autograd::model_sees_each_pass(&Functional(Bug::None), &case, DType::F64).unwrap();
    autograd::autograd_matches_oracle(&Functional(Bug::None), &case, DType::F64).unwrap();
}

#[test]
fn each_adapter_mistake_is_caught() {
    for (bug, says) in [
        (
            Bug::NoRebuild,
            "perturbed pass 1 of 2: the framework's loss",
        ),
        (
            Bug::CleanPassOnly,
            "perturbed pass 1 of 2: the framework's loss",
        ),
        (Bug::StaleAfterStep, "after step 0: the model's loss"),
        (Bug::GradForFrozen, "tensor 2 is frozen but has a gradient"),
    ] {
        let factory = Functional(bug);
        let case = case().fitted_to(&factory);
        let error = autograd::model_sees_each_pass(&factory, &case, DType::F64)
            .expect_err(&format!("{bug:?} passed"));
        assert!(error.contains(says), "{bug:?}: {error}");
    }
    // A model that never sees θ + δ trains on the clean gradient: the run
    // leaves the oracle's path too.
    let factory = Functional(Bug::CleanPassOnly);
    let case = case().fitted_to(&factory);
    autograd::autograd_matches_oracle(&factory, &case, DType::F64)
        .expect_err("a model blind to δ matched the oracle");
}
