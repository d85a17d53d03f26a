//! A framework author's view, per-tensor tier: `TensorOps` implemented for a
//! tensor type that lives outside every crate of the workspace (a plain
//! host tensor of `f64` with a shape), wrapped in `amp_core::TensorStore`,
//! trained with AMP, and checked with the same conformance suite as the
//! shipped backends. `tests/custom_store.rs` shows the batched tier.

use amp_core::{
    Amp, AmpConfig, AmpError, DType, HostTensor, Pass, Result, SgdConfig, TensorOps, TensorStore,
};
use amp_testkit::{conformance_suite, StoreFactory};

/// The author's tensor: values in row-major order and a shape.
#[derive(Clone, Debug)]
struct Dense {
    shape: Vec<usize>,
    data: Vec<f64>,
}

impl Dense {
    fn map(&self, f: impl Fn(f64) -> f64) -> Dense {
        let data = self.data.iter().map(|&x| f(x)).collect();
        Dense {
            shape: self.shape.clone(),
            data,
        }
    }
}

/// Everything AMP needs from the author: seven operations on one tensor.
struct DenseOps;

impl TensorOps for DenseOps {
    type Tensor = Dense;
    type Scalar = f64;

    fn dtype(&self) -> DType {
        DType::F64
    }
    fn shape(&self, t: &Dense) -> Vec<usize> {
        t.shape.clone()
    }
    fn scale(&self, t: &Dense, factor: f64) -> Result<Dense> {
        Ok(t.map(|x| x * factor))
    }
    fn axpy(&self, y: &Dense, alpha: f64, x: &Dense) -> Result<Dense> {
        let mut out = y.clone();
        for (o, x) in out.data.iter_mut().zip(&x.data) {
            *o += alpha * x;
        }
        Ok(out)
    }
    fn sum_of_squares(&self, t: &Dense) -> Result<f64> {
        Ok(t.data.iter().map(|x| x * x).sum())
    }
    fn to_host(&self, t: &Dense) -> Result<Vec<f64>> {
        Ok(t.data.clone())
    }
    fn tensor_like(&self, data: &[f64], like: &Dense) -> Result<Dense> {
        Ok(Dense {
            shape: like.shape.clone(),
            data: data.to_vec(),
        })
    }
}

struct DenseFactory;

impl StoreFactory for DenseFactory {
    type Store = TensorStore<DenseOps>;
    fn make(&self, values: &[HostTensor], dtype: DType) -> Result<Self::Store> {
        if dtype != DType::F64 {
            return Err(AmpError::backend("Dense holds f64 only"));
        }
        let tensors = values
            .iter()
            .map(|v| Dense {
                shape: v.shape().to_vec(),
                data: v.data().to_vec(),
            })
            .collect();
        Ok(TensorStore::new(DenseOps, tensors))
    }
    fn name(&self) -> String {
        "TensorStore<Dense>".into()
    }
}

// The whole conformance suite, as for the shipped backends.
conformance_suite!(dense_tensor_store, DenseFactory, DType::F64);

#[test]
fn trains_a_least_squares_fit_with_amp() {
    // Fit y = 2x − 1 with the weight in a 1-vector and the bias in a 0-d
    // tensor. The closure reads the weights from the store on every pass (θ,
    // then θ + δ), as a framework whose model owns its weights reloads them.
    let xs: Vec<f64> = (0..20).map(|i| i as f64 / 10.0 - 1.0).collect();
    let weight = Dense {
        shape: vec![1],
        data: vec![0.0],
    };
    let bias = Dense {
        shape: vec![],
        data: vec![0.0],
    };
    let store = TensorStore::new(DenseOps, vec![weight, bias]);
    let config = AmpConfig::new(0.1, 0.05);
    let mut amp = Amp::sgd(store, config, SgdConfig::nesterov(0.9)).unwrap();
    let mut loss = f64::INFINITY;
    for _ in 0..200 {
        let report = amp
            .step(|s: &mut TensorStore<DenseOps>, _pass: Pass| {
                let (w, b) = (s.params()[0].data[0], s.params()[1].data[0]);
                let n = xs.len() as f64;
                let (mut gw, mut gb, mut l) = (0.0, 0.0, 0.0);
                for &x in &xs {
                    let r = w * x + b - (2.0 * x - 1.0);
                    l += 0.5 * r * r / n;
                    gw += r * x / n;
                    gb += r / n;
                }
                s.set_grad(0, s.params()[0].map(|_| gw))?;
                s.set_grad(1, s.params()[1].map(|_| gb))?;
                Ok::<_, AmpError>(((), l))
            })
            .unwrap();
        loss = report.loss;
    }
    assert!(loss < 1e-6, "loss {loss}");
    let (store, _sgd) = amp.into_parts().unwrap();
    let params = store.into_params();
    let (w, b) = (params[0].data[0], params[1].data[0]);
    assert!(
        (w - 2.0).abs() < 1e-3 && (b + 1.0).abs() < 1e-3,
        "w {w}, b {b}"
    );
}

#[test]
fn agrees_with_the_ndarray_oracle_bit_for_bit_on_a_fixed_case() {
    // Same arithmetic as the oracle on tensors short enough that summing the
    // squares left to right or in the oracle's lanes gives the same f64: the
    // whole run is bit-identical.
    let case = amp_testkit::Case {
        init: vec![
            HostTensor::new(
                vec![2, 3],
                DType::F64,
                vec![0.5, -1.0, 2.0, 0.25, 3.0, -0.75],
            )
            .unwrap(),
            HostTensor::new(vec![], DType::F64, vec![1.5]).unwrap(),
            HostTensor::new(vec![0], DType::F64, vec![]).unwrap(),
        ],
        objective: amp_testkit::Objective {
            curvature: vec![vec![1.0, 2.0, 0.5, 1.5, 1.0, 3.0], vec![2.0], vec![]],
            center: vec![vec![0.0, 1.0, -1.0, 0.5, 0.0, 2.0], vec![-1.0], vec![]],
            coupling_weights: vec![vec![0.1, 0.2, -0.1, 0.0, 0.3, 0.1], vec![0.5], vec![]],
            coupling: 0.5,
            frozen: vec![false, false, false],
        },
        config: AmpConfig::new(0.05, 0.3).inner_iter(2),
        sgd: SgdConfig::nesterov(0.9),
        adam: None,
        steps: 5,
    };
    let got = amp_testkit::run_case(&DenseFactory, &case, DType::F64).unwrap();
    let want = amp_testkit::run_case(&amp_testkit::NdFactory, &case, DType::F64).unwrap();
    assert_eq!(got, want);
}

#[test]
fn checkpoints_resume_bit_for_bit() {
    // Three steps, a checkpoint, then one more step on the original and on a
    // fresh optimiser loaded from the checkpoint: the same weights.
    let init = [vec![0.5, -1.0, 2.0], vec![1.5]];
    let objective = amp_testkit::Objective {
        curvature: vec![vec![1.0, 2.0, 0.5], vec![2.0]],
        center: vec![vec![0.0, 1.0, -1.0], vec![-1.0]],
        coupling_weights: vec![vec![0.1, 0.2, -0.1], vec![0.5]],
        coupling: 0.5,
        frozen: vec![false, false],
    };
    let build = |values: &[Vec<f64>]| {
        let tensors = values
            .iter()
            .map(|v| Dense {
                shape: vec![v.len()],
                data: v.clone(),
            })
            .collect();
        let store = TensorStore::new(DenseOps, tensors);
        Amp::sgd(store, AmpConfig::new(0.05, 0.5), SgdConfig::nesterov(0.9)).unwrap()
    };
    let calls = std::cell::Cell::new(0);
    let mut amp = build(&init);
    for _ in 0..3 {
        amp.step(objective.grad_fn(&calls, amp_testkit::Fault::None))
            .unwrap();
    }
    let bytes = amp::checkpoint::to_bytes(&amp).unwrap();
    let mut resumed = build(&[vec![0.0; 3], vec![0.0]]);
    amp::checkpoint::from_bytes(&mut resumed, &bytes).unwrap();
    for a in [&mut amp, &mut resumed] {
        a.step(objective.grad_fn(&calls, amp_testkit::Fault::None))
            .unwrap();
    }
    let values = |a: &Amp<TensorStore<DenseOps>, amp_core::Sgd>| {
        amp_testkit::host_values(
            &amp_testkit::read_slot(a.store(), amp_core::Slot::Params).unwrap(),
        )
    };
    assert_eq!(values(&amp), values(&resumed));
    assert_ne!(values(&amp), init.to_vec(), "the steps moved the weights");
}
