//! # amp-tch
//!
//! The libtorch backend of [`amp_core`], over [`tch`] tensors, on the CPU and
//! on CUDA. AMP here is *adversarial model perturbation* (Zheng, Zhang & Mao,
//! CVPR 2021) — a regulariser that trains toward flat minima — not automatic
//! mixed precision.
//!
//! [`TchStore`] implements [`ParamStore`](amp_core::ParamStore) over the trainable variables of a
//! [`tch::nn::VarStore`] ([`TchStore::from_var_store`]), over any list of
//! leaf tensors ([`TchStore::from_tensors`]) or over host values
//! ([`TchStore::from_host`]). Gradients are libtorch's own: the closure runs
//! `loss.backward()` and autograd leaves them in each tensor's `.grad()`; the
//! store undefines them before every closure call (PyTorch's
//! `zero_grad(set_to_none=True)`; with the [flat layout](#flat-layout) it
//! zeroes them in place instead), so a tensor that the loss does not reach
//! has no gradient and is neither perturbed nor stepped.
//!
//! Train a small MLP with AMP (SGD with Nesterov momentum as the base
//! optimiser, as in the paper):
//! ```
//! use amp_core::{Amp, AmpConfig, AmpError, SgdConfig};
//! use amp_tch::TchStore;
//! use tch::nn::{self, Module};
//! use tch::{Device, Kind, Tensor};
//!
//! tch::manual_seed(0);
//! // Two classes: inside or outside the circle of radius 1.
//! let x = Tensor::rand([256, 2], (Kind::Float, Device::Cpu)) * 3.0 - 1.5;
//! let y = x.square().sum_dim_intlist(1, false, Kind::Float).gt(1.0).to_kind(Kind::Int64);
//!
//! let vs = nn::VarStore::new(Device::Cpu);
//! let model = nn::seq()
//!     .add(nn::linear(vs.root() / "l1", 2, 32, Default::default()))
//!     .add_fn(|t| t.relu())
//!     .add(nn::linear(vs.root() / "l2", 32, 2, Default::default()));
//!
//! let store = TchStore::from_var_store(&vs)?;
//! let config = AmpConfig::new(0.1, 0.1).inner_iter(1);
//! let mut amp = Amp::sgd(store, config, SgdConfig::nesterov(0.9))?;
//! let mut first = None;
//! let mut loss = f64::NAN;
//! for _ in 0..300 {
//!     // The store has cleared the gradients before each call.
//!     let report = amp.step(|_store, _pass| {
//!         let logits = model.forward(&x);
//!         let loss = logits.cross_entropy_for_logits(&y);
//!         loss.backward();
//!         Ok::<_, AmpError>((logits, loss.double_value(&[])))
//!     })?;
//!     first.get_or_insert(report.loss);
//!     loss = report.loss;
//! }
//! assert!(loss < 0.5 * first.unwrap(), "loss {loss}, first {first:?}");
//! # Ok::<(), AmpError>(())
//! ```
//! (The closure may equally return `TchError` and use tch's fallible `f_*`
//! methods with `?`: any error that converts into a boxed error will do.)
//!
//! The crate re-exports [`tch`] (`amp_tch::tch`), the version its public
//! signatures use, so that a dependent need not pin a matching `tch` by
//! hand.
//!
//! ## Multi-tensor execution
//! tch 0.24 does not bind ATen's multi-tensor `_foreach_*` operators, so a
//! small C++ shim, compiled by `build.rs` against the headers of the same
//! libtorch, calls them: each batched [`ParamStore`](amp_core::ParamStore) operation is **one** call
//! into the shim and a constant number of ATen calls, whatever the number of
//! tensors:
//!
//! | operation | ATen calls |
//! |---|---|
//! | `copy` | `_foreach_copy_` |
//! | `scale` | `_foreach_mul_` (scalar list) |
//! | `axpy` | `_foreach_add_(dst, src, alpha)` per distinct coefficient (≤ 4: parameter groups), else `_foreach_mul` + `_foreach_add_` |
//! | `norms` | `_foreach_norm` + `stack` |
//! | `clip_to_norms` | a few ops on the stacked norms + `_foreach_mul_` (tensor list) |
//! | `all_finite` | `_foreach_norm(∞)` + `stack` + `isfinite().all()`, one read (CPU: `aminmax` per tensor + `stack` instead) |
//! | `axpy_from` | `_foreach_copy_` + the `axpy` calls |
//! | `perturb_from_grads`, `sgd_update`, `adam_update` | the unfused sequences of [`amp_core::composed`] |
//! | `zero_grads`, `grad_mask` | no kernel: references dropped or inspected |
//! | `alloc_buffer` | one `zeros` allocation, viewed per tensor |
//!
//! The foreach operators work on the tensors where autograd and the model
//! put them, and on CUDA they run as fused multi-tensor launches.
//! One caveat: `clip_to_norms` multiplies each tensor by its own coefficient,
//! a 0-d device tensor; ATen's CUDA fast path does not cover that broadcast,
//! so on CUDA it is one small launch per tensor — still without any host
//! synchronisation. Per-tensor clip coefficients and norms stay on the device
//! ([`TchNorms`] holds a device tensor); only
//! [`norms_to_host`](amp_core::ParamStore::norms_to_host) and
//! [`all_finite`](amp_core::ParamStore::all_finite) read from the device, once each.
//!
//! ## CPU loop path
//! libtorch's CPU foreach kernels are loops over the tensors that pay a full
//! operator dispatch (about a microsecond) per tensor per operation, and its
//! infinity norm runs far below memory speed. So when every tensor that a
//! batched operation touches (destination and source, masked-in) is a dense,
//! contiguous `f32` or `f64` CPU tensor — parameters, autograd gradients and
//! buffers normally are — the shim runs the operation as plain loops over
//! the tensors' memory (compiled with `-O3 -ffp-contract=off`), with the
//! reference store's arithmetic: `d + a·s` as a separate multiply and add,
//! norms accumulated in `f64` over 8 partial sums exactly as `amp-ndarray`
//! sums them, the clip coefficient `min(1, max / (n + 1e-12))` in the
//! tensors' dtype (a NaN quotient counts as 1, as Rust's `min` has it), and a
//! branch-free finite check over blocks. Elementwise operations run over
//! tensors that lie back to back as one loop. `perturb_from_grads` is fused
//! there: per tensor one read of the gradient for its norm, then one pass
//! that writes the snapshot and θ + δ; `axpy_from` is one pass, and so is
//! SGD's whole step (`sgd_update`: weight decay, momentum, Nesterov and the
//! move of θ, `shim/sgd.cpp`) and Adam's (`adam_update`: decoupled or L2
//! decay, both moments, AMSGrad's maximum and the move of θ,
//! `shim/adam.cpp`, where `addcdiv_sqrt` also has its loop). On that path
//! the results are the reference store's bit for bit (the test suite checks
//! it: those loops repeat formulas of `amp-core` and `amp-ndarray` for
//! speed). [`TchNorms`] then holds a CPU tensor, as it does on the ATen
//! path; written tensors get their autograd version counter bumped, as an
//! in-place ATen operation would. Anything else — CUDA, half precision,
//! strided tensors — takes the ATen path.
//!
//! The shim keeps no memory address from one call to the next: each call
//! reads where every tensor's elements are at that moment, so a tensor
//! given new storage between two calls (`set_data`, `resize_`, a new
//! `.grad`) is worked on where it now is, never where it was.
//!
//! ## Flat layout
//! Autograd allocates every gradient on its own and frees it at the next
//! reset, and a model's parameters are as many separate allocations: with a
//! thousand small tensors, the batched operations spend their time on
//! scattered memory. [`TchStore::flatten`] moves the parameters into one
//! allocation (the model's variables become views of it, values unchanged)
//! and the gradients into another, which `zero_grads` then zeroes with one
//! `memset` and `backward()` accumulates into in place. The loop path then
//! finds the tensors back to back and runs each elementwise operation as
//! one loop. Results are the same bit for bit (the conformance suite runs on
//! flattened stores too).
//!
//! ## Mixed precision
//! A store over f16 or bf16 tensors steps them in their own dtype (on the
//! ATen path), and updates below half a weight's ulp are lost.
//! [`TchStore::with_master_weights`] keeps an f32 copy of θ instead: the
//! optimiser and AMP's buffers work on the copy (on the CPU loop path), the
//! model's variables get θ or θ + δ rounded to their dtype whenever it
//! changes, and the half gradients `backward()` leaves on them are moved
//! into the copy's after each pass
//! ([`collect_grads`](amp_core::ParamStore::collect_grads)). With f16, add
//! a loss scale ([`amp_core::AmpConfig::loss_scale`]).
//!
//! ## Numerics
//! The store's [`ParamStore::Scalar`](amp_core::ParamStore::Scalar) is `f64` whatever the tensors' dtype:
//! coefficients go to libtorch as `f64` scalars, and libtorch rounds them to
//! the tensors' compute type, as the `f32` reference store rounds them to
//! `f32`. Projection coefficients are computed on the device in the tensors'
//! dtype. `axpy` is PyTorch's `add_(src, alpha=a)`, which on CPUs with FMA is
//! a fused multiply-add (one rounding), where the reference store rounds
//! twice; norms accumulate in the tensors' dtype, where the reference store
//! accumulates in `f64`. Results therefore agree with the reference within a
//! few ulps per operation, not bit for bit — except on the CPU loop path
//! above, which matches the reference bit for bit.
//!
//! ## Linking
//! `build.rs` gives this package's binaries, tests and examples a RUNPATH to
//! libtorch and keeps `libtorch.so` (which loads `libtorch_cuda.so`) as a
//! needed library, so they start without `LD_LIBRARY_PATH` and see CUDA when
//! there is one. A package of your own that has tch binaries needs the same
//! lines in its `build.rs`; the libtorch directory is exported to it as
//! `DEP_AMP_TCH_LIBTORCH_LIB`.
#![warn(missing_docs)]

mod elementwise;
mod ffi;
mod flat;
mod kinds;
mod master;
mod norms;
mod param_store;
mod store;

/// The `tch` crate this backend is built on (`=0.24.0`, libtorch 2.11), the
/// one its public signatures use: name it as `amp_tch::tch` to get the same
/// version.
pub use tch;

pub use kinds::{dtype_of, kind_of};
pub use norms::TchNorms;
pub use store::TchStore;
