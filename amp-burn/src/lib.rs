//! # amp-burn
//!
//! The [burn](https://burn.dev) backend of [`amp_core`]: AMP for burn
//! modules, on burn's own devices (its pure-Rust CPU backend `flex` by
//! default; CUDA and wgpu behind the `cuda` and `wgpu` cargo features). AMP
//! here is *adversarial model perturbation* (Zheng, Zhang & Mao, CVPR 2021)
//! — a regulariser that trains toward flat minima — not automatic mixed
//! precision.
//!
//! burn modules own their parameters as immutable tensors and are updated
//! by mapping: module in, module out. A [`BurnStore`] takes the module
//! ([`ModuleStore::from_module`]), holds its float parameters ([`Flat`],
//! one per `Param`, in burn's visiting order) and rebuilds the module from
//! them before every closure call — θ on the clean pass, θ + δ on the
//! perturbed ones — replacing only the parameters that changed. Inside the
//! closure, [`ModuleStore::module`] is the model to run and
//! [`ModuleStore::backward`] runs burn's backward pass and collects the
//! gradients by `ParamId`; after training, [`ModuleStore::into_module`]
//! gives the module back with its ids, frozen parameters and training
//! state as they were.
//!
//! The store is amp-core's per-tensor tier ([`amp_core::TensorStore`] over
//! [`BurnOps`]): every operation of the step runs on burn's device, one
//! burn operation per tensor.
//!
//! A two-layer MLP trained with AMP on generated data:
//! ```
//! use amp_burn::burn::module::Module;
//! use amp_burn::burn::nn::loss::CrossEntropyLossConfig;
//! use amp_burn::burn::nn::{Linear, LinearConfig, Relu};
//! use amp_burn::burn::tensor::{Device, Int, Tensor, TensorData};
//! use amp_burn::{burn, BurnStore, ModuleStore};
//! use amp_core::{Amp, AmpConfig, BoxError, SgdConfig};
//!
//! #[derive(Module, Debug)]
//! struct Mlp {
//!     hidden: Linear,
//!     output: Linear,
//! }
//!
//! impl Mlp {
//!     fn forward(&self, x: Tensor<2>) -> Tensor<2> {
//!         self.output.forward(Relu::new().forward(self.hidden.forward(x)))
//!     }
//! }
//!
//! let device = Device::default().autodiff();
//! // Two classes: is the sum of the 4 inputs positive? 64 points from a
//! // fixed-seed generator.
//! let mut seed = 7u64;
//! let mut uniform = move || {
//!     seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
//!     (seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
//! };
//! let xs: Vec<f32> = (0..64 * 4).map(|_| uniform()).collect();
//! let ys: Vec<i64> = xs.chunks(4).map(|r| i64::from(r.iter().sum::<f32>() > 0.0)).collect();
//! let x = Tensor::<2>::from_data(TensorData::new(xs, [64, 4]), &device);
//! let y = Tensor::<1, Int>::from_data(TensorData::new(ys, [64]), &device);
//!
//! let model = Mlp {
//!     hidden: LinearConfig::new(4, 16).init(&device),
//!     output: LinearConfig::new(16, 2).init(&device),
//! };
//! let loss_fn = CrossEntropyLossConfig::new().init(&device);
//! let store = BurnStore::from_module(model)?;
//! let config = AmpConfig::new(0.1, 0.1).inner_iter(1);
//! let mut amp = Amp::sgd(store, config, SgdConfig::nesterov(0.9))?;
//! let mut losses = Vec::new();
//! for _ in 0..60 {
//!     let report = amp.step(|store: &mut BurnStore<Mlp>, _pass| {
//!         let logits = store.module()?.forward(x.clone());
//!         let loss = loss_fn.forward(logits, y.clone());
//!         let value = store.backward(&loss)?;
//!         Ok::<_, BoxError>(((), value))
//!     })?;
//!     losses.push(report.loss);
//! }
//! let trained: Mlp = amp.into_parts()?.0.into_module()?;
//! assert!(losses[59] < 0.5 * losses[0], "{losses:?}");
//! # let _ = trained;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

mod flat;
mod module;
mod ops;
mod store;

/// The burn crate this adapter is built against (0.22), for naming its types
/// without a second dependency line.
pub use burn;

pub use crate::flat::Flat;
pub use crate::ops::{amp_dtype, BurnOps};
pub use crate::store::{BurnStore, ModuleStore};
