//! [`TensorStore`]: a [`ParamStore`] for any tensor type with [`TensorOps`].

use std::borrow::Cow;

use num_traits::{Float, One, Zero};

use crate::error::{AmpError, Result};
use crate::grad_fn::Pass;
use crate::store::{
    check_index, check_len, check_shape, BufferId, Buffers, DType, HostTensor, ParamStore, Scalar,
    Slot, PROJECTION_GUARD,
};
use crate::tensor_ops::TensorOps;

/// Parameters, gradients and buffers of one tensor type, with every
/// [`ParamStore`] operation written once over [`TensorOps`].
///
/// The store does the bookkeeping every backend would otherwise repeat:
/// buffers, gradient presence, masks, and the checks of lengths, indices,
/// shapes and slots (each a typed [`AmpError`], never a panic). Operations
/// run tensor by tensor; a tensor is replaced only once the operation on it
/// has succeeded.
///
/// # Gradients
/// The closure hands gradients over with [`TensorStore::set_grad`], which
/// marks the tensor as having one. [`ParamStore::zero_grads`] (called by
/// [`Amp`](crate::Amp) before every closure call) forgets them all, and
/// [`ParamStore::grad_mask`] reports which tensors received one since. A
/// tensor without a gradient reads as zeros; store operations never give it
/// one (an operation whose destination is a missing gradient leaves it
/// missing), only [`TensorStore::set_grad`] and [`ParamStore::write`] do.
///
/// # Models that own their weights
/// θ changes between the closure calls of a step (θ, then θ + δ). A
/// framework whose model holds its own tensors (burn modules, for instance)
/// loads them from [`TensorStore::params`] at the start of every closure
/// call, runs forward and backward, and hands each gradient back with
/// [`TensorStore::set_grad`] under the index its weight came from.
///
/// # Example
/// `TensorOps` for plain `Vec<f64>` (one dimension), and one AMP step on a
/// quadratic whose gradient the closure computes by hand:
/// ```
/// use amp_core::{Amp, AmpConfig, AmpError, DType, Result, SgdConfig, TensorOps, TensorStore};
///
/// struct Host;
///
/// impl TensorOps for Host {
///     type Tensor = Vec<f64>;
///     type Scalar = f64;
///     fn dtype(&self) -> DType { DType::F64 }
///     fn shape(&self, t: &Vec<f64>) -> Vec<usize> { vec![t.len()] }
///     fn scale(&self, t: &Vec<f64>, f: f64) -> Result<Vec<f64>> {
///         Ok(t.iter().map(|x| f * x).collect())
///     }
///     fn axpy(&self, y: &Vec<f64>, a: f64, x: &Vec<f64>) -> Result<Vec<f64>> {
///         Ok(y.iter().zip(x).map(|(y, x)| y + a * x).collect())
///     }
///     fn sum_of_squares(&self, t: &Vec<f64>) -> Result<f64> {
///         Ok(t.iter().map(|x| x * x).sum())
///     }
///     fn to_host(&self, t: &Vec<f64>) -> Result<Vec<f64>> { Ok(t.clone()) }
///     fn tensor_like(&self, data: &[f64], _like: &Vec<f64>) -> Result<Vec<f64>> {
///         Ok(data.to_vec())
///     }
/// }
///
/// // L(θ) = ½‖θ − 1‖², ∇L = θ − 1.
/// let store = TensorStore::new(Host, vec![vec![0.0, 0.0], vec![0.0]]);
/// let config = AmpConfig::new(0.5, 0.1);
/// let mut amp = Amp::sgd(store, config, SgdConfig::default())?;
/// let report = amp.step(|s: &mut TensorStore<Host>, _pass| {
///     let mut loss = 0.0;
///     for i in 0..2 {
///         let g: Vec<f64> = s.params()[i].iter().map(|x| x - 1.0).collect();
///         loss += g.iter().map(|d| 0.5 * d * d).sum::<f64>();
///         s.set_grad(i, g)?;
///     }
///     Ok::<_, AmpError>(((), loss))
/// })?;
/// assert_eq!(report.loss, 1.5);
/// // The base step used the gradient at θ + δ, δ = 0.1 · ∇L(θ)/‖∇L(θ)‖
/// // (= −0.1/√2 per element of the first tensor, up to the 1e-12 guard):
/// // θ ← θ − 0.5 · (θ + δ − 1) with θ = 0.
/// let w = amp.store().params()[0][0];
/// assert!((w - 0.5 * (1.0 + 0.1 / 2f64.sqrt())).abs() < 1e-12, "{w}");
/// # Ok::<(), AmpError>(())
/// ```
#[derive(Clone, Debug)]
pub struct TensorStore<O: TensorOps> {
    ops: O,
    shapes: Vec<Vec<usize>>,
    params: Vec<O::Tensor>,
    grads: Vec<Option<O::Tensor>>,
    buffers: Buffers<Vec<O::Tensor>>,
}

impl<O: TensorOps> TensorStore<O> {
    /// A store holding `params` (their shapes are fixed from here on), none
    /// of which has a gradient yet.
    pub fn new(ops: O, params: Vec<O::Tensor>) -> Self {
        let shapes = params.iter().map(|p| ops.shape(p)).collect();
        let grads = vec![None; params.len()];
        TensorStore {
            ops,
            shapes,
            params,
            grads,
            buffers: Buffers::new(),
        }
    }

    /// The operations the store runs on its tensors.
    pub fn ops(&self) -> &O {
        &self.ops
    }

    /// The operations, mutably: where a framework's model kept by
    /// [`TensorOps::prepare_pass`] is reached between steps (to hand it back
    /// after the last step, rebuild it from [`TensorStore::params`] first).
    pub fn ops_mut(&mut self) -> &mut O {
        &mut self.ops
    }

    /// The operations, mutably, beside the parameters: for operations that
    /// keep a model and rebuild it from the parameters outside
    /// [`TensorOps::prepare_pass`] (between steps, or on demand inside the
    /// closure).
    pub fn ops_mut_and_params(&mut self) -> (&mut O, &[O::Tensor]) {
        (&mut self.ops, &self.params)
    }

    /// The parameters, in store order: what a closure builds its model from.
    pub fn params(&self) -> &[O::Tensor] {
        &self.params
    }

    /// Parameter `index`.
    pub fn param(&self, index: usize) -> Result<&O::Tensor> {
        check_index(index, self.params.len())?;
        Ok(&self.params[index])
    }

    /// Replaces parameter `index` (for initialisation or edits between
    /// steps); it must have the parameter's shape.
    pub fn set_param(&mut self, index: usize, tensor: O::Tensor) -> Result<()> {
        self.check_tensor(index, &tensor)?;
        self.params[index] = tensor;
        Ok(())
    }

    /// Gives the parameters back.
    pub fn into_params(self) -> Vec<O::Tensor> {
        self.params
    }

    /// Gives the operations (with whatever model they keep) and the
    /// parameters back.
    pub fn into_parts(self) -> (O, Vec<O::Tensor>) {
        (self.ops, self.params)
    }

    /// The gradient of tensor `index` from the last closure call, if any.
    pub fn grad(&self, index: usize) -> Option<&O::Tensor> {
        self.grads.get(index).and_then(Option::as_ref)
    }

    /// Sets the gradient of tensor `index` and marks it present; it must have
    /// the parameter's shape.
    pub fn set_grad(&mut self, index: usize, tensor: O::Tensor) -> Result<()> {
        self.check_tensor(index, &tensor)?;
        self.grads[index] = Some(tensor);
        Ok(())
    }

    fn check_tensor(&self, index: usize, tensor: &O::Tensor) -> Result<()> {
        check_index(index, self.params.len())?;
        check_shape(index, &self.shapes[index], &self.ops.shape(tensor))
    }

    fn check_mask(&self, mask: &[bool]) -> Result<()> {
        check_len("mask", self.params.len(), mask.len())
    }

    /// Fails on a buffer that is not live, before anything is changed.
    fn check_slot(&self, slot: Slot) -> Result<()> {
        match slot {
            Slot::Buffer(id) => self.buffers.get(id).map(drop),
            Slot::Params | Slot::Grads => Ok(()),
        }
    }

    /// Tensor `index` of `slot`; `None` for a missing gradient.
    fn get(&self, slot: Slot, index: usize) -> Result<Option<&O::Tensor>> {
        Ok(match slot {
            Slot::Params => Some(&self.params[index]),
            Slot::Grads => self.grads[index].as_ref(),
            Slot::Buffer(id) => Some(&self.buffers.get(id)?[index]),
        })
    }

    /// Tensor `index` of `slot` as a source: a missing gradient is zeros.
    fn source(&self, slot: Slot, index: usize) -> Result<Cow<'_, O::Tensor>> {
        match self.get(slot, index)? {
            Some(tensor) => Ok(Cow::Borrowed(tensor)),
            None => Ok(Cow::Owned(self.ops.zeros_like(&self.params[index])?)),
        }
    }

    fn put(&mut self, slot: Slot, index: usize, tensor: O::Tensor) -> Result<()> {
        match slot {
            Slot::Params => self.params[index] = tensor,
            Slot::Grads => self.grads[index] = Some(tensor),
            Slot::Buffer(id) => self.buffers.get_mut(id)?[index] = tensor,
        }
        Ok(())
    }

    /// The masked-in tensors of `slot` that exist (a missing gradient is
    /// left out), with their indices.
    fn present(&self, slot: Slot, mask: &[bool]) -> Result<(Vec<usize>, Vec<&O::Tensor>)> {
        let mut indices = Vec::new();
        let mut tensors = Vec::new();
        for index in masked(mask) {
            if let Some(tensor) = self.get(slot, index)? {
                indices.push(index);
                tensors.push(tensor);
            }
        }
        Ok((indices, tensors))
    }

    /// Replaces every masked-in tensor `t` of `dst` that exists by
    /// `op(index, t)`.
    fn update(
        &mut self,
        dst: Slot,
        mask: &[bool],
        mut op: impl FnMut(&Self, usize, &O::Tensor) -> Result<Option<O::Tensor>>,
    ) -> Result<()> {
        for index in masked(mask) {
            let Some(tensor) = self.get(dst, index)? else {
                continue;
            };
            if let Some(new) = op(self, index, tensor)? {
                self.put(dst, index, new)?;
            }
        }
        Ok(())
    }
}

/// The indices where `mask` is `true`.
fn masked(mask: &[bool]) -> impl Iterator<Item = usize> + '_ {
    mask.iter()
        .enumerate()
        .filter_map(|(index, &m)| m.then_some(index))
}

/// Operations that read one slot and write another need two.
fn check_distinct(operation: &str, dst: Slot, src: Slot) -> Result<()> {
    if dst == src {
        return Err(AmpError::backend(format!(
            "{operation}: source and destination must be different slots, got {dst:?} twice"
        )));
    }
    Ok(())
}

impl<O: TensorOps> ParamStore for TensorStore<O> {
    type Scalar = O::Scalar;
    type Norms = Vec<O::Scalar>;

    fn num_tensors(&self) -> usize {
        self.params.len()
    }

    fn shape(&self, index: usize) -> Result<Vec<usize>> {
        check_index(index, self.params.len())?;
        Ok(self.shapes[index].clone())
    }

    fn dtype(&self) -> DType {
        self.ops.dtype()
    }

    fn zero_grads(&mut self) -> Result<()> {
        self.grads.fill(None);
        Ok(())
    }

    fn grad_mask(&self) -> Result<Vec<bool>> {
        Ok(self.grads.iter().map(Option::is_some).collect())
    }

    fn prepare_pass(&mut self, pass: Pass) -> Result<()> {
        self.ops.prepare_pass(&self.params, pass)
    }

    fn alloc_buffer(&mut self) -> Result<BufferId> {
        let buffer = self
            .params
            .iter()
            .map(|p| self.ops.zeros_like(p))
            .collect::<Result<Vec<_>>>()?;
        Ok(self.buffers.insert(buffer))
    }

    fn free_buffer(&mut self, id: BufferId) -> Result<()> {
        self.buffers.remove(id).map(drop)
    }

    fn pin_buffer(&mut self, id: BufferId, pinned: bool) -> Result<()> {
        self.buffers.set_pinned(id, pinned)
    }

    fn copy(&mut self, dst: Slot, src: Slot, mask: &[bool]) -> Result<()> {
        self.check_mask(mask)?;
        check_distinct("copy", dst, src)?;
        self.check_slot(src)?;
        self.check_slot(dst)?;
        self.update(dst, mask, |store, i, _| {
            Ok(Some(store.source(src, i)?.into_owned()))
        })
    }

    fn scale(&mut self, dst: Slot, factor: &[O::Scalar], mask: &[bool]) -> Result<()> {
        self.check_mask(mask)?;
        check_len("scale factors", mask.len(), factor.len())?;
        self.check_slot(dst)?;
        // A factor of exactly 1 leaves the tensor as it is, bit for bit.
        self.update(dst, mask, |store, i, t| {
            (factor[i] != O::Scalar::one())
                .then(|| store.ops.scale(t, factor[i]))
                .transpose()
        })
    }

    fn axpy(&mut self, dst: Slot, alpha: &[O::Scalar], src: Slot, mask: &[bool]) -> Result<()> {
        self.check_mask(mask)?;
        check_len("axpy coefficients", mask.len(), alpha.len())?;
        check_distinct("axpy", dst, src)?;
        self.check_slot(src)?;
        self.check_slot(dst)?;
        self.update(dst, mask, |store, i, y| {
            let x = store.source(src, i)?;
            store.ops.axpy(y, alpha[i], &x).map(Some)
        })
    }

    fn addcmul(
        &mut self,
        dst: Slot,
        alpha: &[O::Scalar],
        a: Slot,
        b: Slot,
        mask: &[bool],
    ) -> Result<()> {
        self.check_mask(mask)?;
        crate::composed::check_addcmul(mask.len(), dst, alpha, a, b)?;
        for slot in [dst, a, b] {
            self.check_slot(slot)?;
        }
        self.update(dst, mask, |store, i, y| {
            let (x, z) = (store.source(a, i)?, store.source(b, i)?);
            store.ops.addcmul(y, alpha[i], &x, &z).map(Some)
        })
    }

    fn addcdiv_sqrt(
        &mut self,
        dst: Slot,
        alpha: &[O::Scalar],
        num: Slot,
        den: Slot,
        divisor: &[O::Scalar],
        eps: &[O::Scalar],
        mask: &[bool],
    ) -> Result<()> {
        self.check_mask(mask)?;
        crate::composed::check_addcdiv_sqrt(mask.len(), dst, (alpha, divisor, eps), num, den)?;
        for slot in [dst, num, den] {
            self.check_slot(slot)?;
        }
        self.update(dst, mask, |store, i, y| {
            let (x, z) = (store.source(num, i)?, store.source(den, i)?);
            store
                .ops
                .addcdiv_sqrt(y, alpha[i], &x, &z, divisor[i], eps[i])
                .map(Some)
        })
    }

    fn maximum(&mut self, dst: Slot, src: Slot, mask: &[bool]) -> Result<()> {
        self.check_mask(mask)?;
        crate::composed::check_sources("maximum", dst, &[src])?;
        self.check_slot(dst)?;
        self.check_slot(src)?;
        self.update(dst, mask, |store, i, y| {
            let x = store.source(src, i)?;
            store.ops.maximum(y, &x).map(Some)
        })
    }

    fn norms(&mut self, src: Slot, mask: &[bool]) -> Result<Vec<O::Scalar>> {
        self.check_mask(mask)?;
        self.check_slot(src)?;
        // A missing gradient is zeros: norm 0.
        let (indices, tensors) = self.present(src, mask)?;
        let sums = self.ops.sums_of_squares(&tensors)?;
        check_len("sums of squares", tensors.len(), sums.len())?;
        let mut norms = vec![O::Scalar::zero(); mask.len()];
        for (i, sum) in indices.into_iter().zip(sums) {
            // As the ndarray oracle: sum in f64, root, round once.
            norms[i] = O::Scalar::from_f64_rounded(sum.sqrt());
        }
        Ok(norms)
    }

    fn clip_to_norms(
        &mut self,
        dst: Slot,
        norms: &Vec<O::Scalar>,
        max_norm: &[O::Scalar],
        mask: &[bool],
    ) -> Result<()> {
        self.check_mask(mask)?;
        check_len("norms", mask.len(), norms.len())?;
        check_len("maximum norms", mask.len(), max_norm.len())?;
        self.check_slot(dst)?;
        let guard = O::Scalar::from_f64_rounded(PROJECTION_GUARD);
        let one = O::Scalar::one();
        self.update(dst, mask, |store, i, t| {
            let coefficient = Float::min(max_norm[i] / (norms[i] + guard), one);
            (coefficient != one)
                .then(|| store.ops.scale(t, coefficient))
                .transpose()
        })
    }

    fn norms_to_host(&self, norms: &Vec<O::Scalar>) -> Result<Vec<f64>> {
        Ok(norms.iter().map(|n| n.widen()).collect())
    }

    fn all_finite(&mut self, src: Slot, mask: &[bool]) -> Result<bool> {
        self.check_mask(mask)?;
        self.check_slot(src)?;
        let (_, tensors) = self.present(src, mask)?;
        self.ops.all_finite_in(&tensors)
    }

    fn read(&self, slot: Slot, index: usize) -> Result<HostTensor> {
        let shape = ParamStore::shape(self, index)?;
        let data = match self.get(slot, index)? {
            Some(t) => self.ops.to_host(t)?,
            None => vec![0.0; shape.iter().product()],
        };
        // `HostTensor::new` turns a `to_host` of the wrong length into an
        // error.
        HostTensor::new(shape, self.ops.dtype(), data)
    }

    fn write(&mut self, slot: Slot, index: usize, value: &HostTensor) -> Result<()> {
        let shape = ParamStore::shape(self, index)?;
        // The shape fits, and a HostTensor's data fits its shape.
        check_shape(index, &shape, value.shape())?;
        self.check_slot(slot)?;
        let tensor = self.ops.tensor_like(value.data(), &self.params[index])?;
        // A tensor of the wrong shape would surface much later, in an
        // operation of the author's framework; catch it here.
        check_shape(index, &shape, &self.ops.shape(&tensor))?;
        self.put(slot, index, tensor)
    }
}
