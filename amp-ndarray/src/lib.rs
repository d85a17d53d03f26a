//! # amp-ndarray
//!
//! The CPU reference backend of [`amp_core`], over [`ndarray`] arrays, and the
//! oracle every other backend is tested against. AMP here is *adversarial
//! model perturbation* (Zheng, Zhang & Mao, CVPR 2021), not automatic mixed
//! precision.
//!
//! [`NdStore`] holds the parameters as `ArrayD<T>` (any dimensionality, 0-d
//! and empty included) for `T` = `f32` or `f64`. ndarray has no autograd: the
//! closure computes gradients by hand and hands them over with
//! [`NdStore::set_grad`] or writes them through [`NdStore::grad_mut`].
//! Norms are accumulated in `f64` whatever `T` is, so that the oracle is as
//! accurate as it can be; everything else is computed in `T`, one fused loop
//! per tensor. Element-wise loops over a tensor of 2^18 elements or more
//! are split over rayon's threads, and the fused steps, the norms and the
//! finiteness check share an operation's tensors out over them when they
//! hold 2^18 elements between them; every element is computed on its own,
//! so the bits are those of one thread. Sums of squares are added per
//! block of 2^16 elements, the blocks' sums then in order, so that they too
//! can be split over the threads with the bits of one.
//!
//! Softmax regression on a toy problem, trained with AMP:
//! ```
//! use amp_core::{Amp, AmpConfig, AmpError, SgdConfig};
//! use amp_ndarray::NdStore;
//! use ndarray::{array, Array1, Array2, Axis};
//!
//! // Four points, two classes, separable along the first feature.
//! let x = array![[1.0, 0.2], [0.8, -0.1], [-1.0, 0.1], [-0.9, -0.3]];
//! let y = [0usize, 0, 1, 1];
//! let store = NdStore::from_arrays([Array2::<f64>::zeros((2, 2)).into_dyn(),
//!                                   Array1::<f64>::zeros(2).into_dyn()]);
//! let config = AmpConfig::new(0.5, 0.1).inner_iter(1);
//! let mut amp = Amp::sgd(store, config, SgdConfig::momentum(0.9))?;
//!
//! let mut loss = f64::INFINITY;
//! for _ in 0..50 {
//!     let report = amp.step(|s: &mut NdStore<f64>, _pass| {
//!         let w = s.params()[0].view().into_dimensionality::<ndarray::Ix2>().unwrap();
//!         let b = s.params()[1].view().into_dimensionality::<ndarray::Ix1>().unwrap();
//!         let logits = x.dot(&w) + &b;
//!         // Softmax cross-entropy and its gradient, averaged over the batch.
//!         let max = logits.map_axis(Axis(1), |r| r.fold(f64::MIN, |a, &v| a.max(v)));
//!         let mut p = &logits - &max.insert_axis(Axis(1));
//!         p.mapv_inplace(f64::exp);
//!         let z = p.sum_axis(Axis(1)).insert_axis(Axis(1));
//!         p /= &z;
//!         let n = x.nrows() as f64;
//!         let loss: f64 = y.iter().enumerate().map(|(i, &c)| -p[[i, c]].ln()).sum::<f64>() / n;
//!         for (i, &c) in y.iter().enumerate() { p[[i, c]] -= 1.0; }
//!         p /= n;
//!         s.set_grad(0, x.t().dot(&p).into_dyn())?;
//!         s.set_grad(1, p.sum_axis(Axis(0)).into_dyn())?;
//!         Ok::<_, AmpError>((logits, loss))
//!     })?;
//!     loss = report.loss;
//! }
//! assert!(loss < 0.1, "loss {loss}");
//! # Ok::<(), AmpError>(())
//! ```
#![warn(missing_docs)]

/// The `ndarray` crate this backend's public signatures use, so that users
/// need not match its version by hand.
pub use ndarray;

use amp_core::{
    check_len, check_shape, composed, elementwise, AdamCoefficients, AdamSlots, AmpError, BufferId,
    Buffers, DType, HostTensor, ParamStore, Result, Scalar, SgdCoefficients, SgdMomentum, Slot,
    PROJECTION_GUARD,
};
use ndarray::{ArrayD, IxDyn, NdFloat, Zip};

use loops::{
    all_finite, each1, each2, each3, each_tensor, masked_elements, per_tensor, spread,
    sum_of_squares,
};

#[macro_use]
mod loops;
mod fused;

/// The element types the reference backend stores: `f32` and `f64`.
pub trait Element: NdFloat + Scalar {
    /// The matching [`DType`].
    const DTYPE: DType;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
}

impl Element for f64 {
    const DTYPE: DType = DType::F64;
}

/// A destination slot borrowed mutably beside a source slot.
type SlotPair<'a, T> = (&'a mut [ArrayD<T>], &'a [ArrayD<T>]);

/// Parameters, gradients and buffers as `ndarray` arrays.
#[derive(Clone, Debug)]
pub struct NdStore<T: Element> {
    params: Vec<ArrayD<T>>,
    grads: Vec<ArrayD<T>>,
    has_grad: Vec<bool>,
    buffers: Buffers<Vec<ArrayD<T>>>,
}

impl<T: Element> NdStore<T> {
    /// A store holding `params`, none of which has a gradient yet.
    pub fn new(params: Vec<ArrayD<T>>) -> Self {
        let grads = params.iter().map(|p| ArrayD::zeros(p.raw_dim())).collect();
        let has_grad = vec![false; params.len()];
        NdStore {
            params,
            grads,
            has_grad,
            buffers: Buffers::new(),
        }
    }

    /// A store holding the given arrays (of any dimensionality, converted
    /// with `into_dyn`).
    pub fn from_arrays<I, D>(params: I) -> Self
    where
        I: IntoIterator<Item = ndarray::Array<T, D>>,
        D: ndarray::Dimension,
    {
        NdStore::new(params.into_iter().map(|p| p.into_dyn()).collect())
    }

    /// The parameters, in store order.
    pub fn params(&self) -> &[ArrayD<T>] {
        &self.params
    }

    /// Parameter `index`, mutably (for initialisation or manual edits between
    /// steps; its shape cannot change).
    pub fn param_mut(&mut self, index: usize) -> Result<ndarray::ArrayViewMutD<'_, T>> {
        let len = self.params.len();
        self.params
            .get_mut(index)
            .map(|p| p.view_mut())
            .ok_or(AmpError::IndexOutOfRange { index, len })
    }

    /// Gives the parameters back.
    pub fn into_params(self) -> Vec<ArrayD<T>> {
        self.params
    }

    /// The gradient of tensor `index` from the last closure call, if any.
    pub fn grad(&self, index: usize) -> Option<&ArrayD<T>> {
        self.has_grad
            .get(index)
            .copied()
            .unwrap_or(false)
            .then(|| &self.grads[index])
    }

    /// Sets the gradient of tensor `index`; it must have the parameter's
    /// shape.
    pub fn set_grad(&mut self, index: usize, grad: ArrayD<T>) -> Result<()> {
        check_shape(index, &self.shape(index)?, grad.shape())?;
        self.grads[index] = grad;
        self.has_grad[index] = true;
        Ok(())
    }

    /// The gradient of tensor `index`, to accumulate into. It reads as zeros
    /// on its first access after the store's gradients were cleared, and
    /// counts as a gradient from then on. It is a view, so its shape is the
    /// parameter's and stays so (to replace a gradient whole, use
    /// [`NdStore::set_grad`], which checks the shape).
    ///
    /// ```
    /// use amp_ndarray::NdStore;
    ///
    /// let mut store = NdStore::from_arrays([ndarray::arr1(&[1.0f32, 2.0])]);
    /// store.grad_mut(0)?.fill(0.5);
    /// assert_eq!(store.grad(0).unwrap().as_slice().unwrap(), &[0.5, 0.5]);
    /// # Ok::<(), amp_core::AmpError>(())
    /// ```
    ///
    /// A gradient of another shape cannot be put in through it:
    ///
    /// ```compile_fail
    /// use amp_ndarray::NdStore;
    ///
    /// let mut store = NdStore::from_arrays([ndarray::arr1(&[1.0f32, 2.0])]);
    /// *store.grad_mut(0).unwrap() = ndarray::ArrayD::zeros(ndarray::IxDyn(&[3]));
    /// ```
    pub fn grad_mut(&mut self, index: usize) -> Result<ndarray::ArrayViewMutD<'_, T>> {
        let len = self.params.len();
        let has = self
            .has_grad
            .get_mut(index)
            .ok_or(AmpError::IndexOutOfRange { index, len })?;
        if !*has {
            self.grads[index].fill(T::zero());
            *has = true;
        }
        Ok(self.grads[index].view_mut())
    }

    fn check_index(&self, index: usize) -> Result<()> {
        amp_core::check_index(index, self.params.len())
    }

    fn check_mask(&self, mask: &[bool]) -> Result<()> {
        check_len("mask", self.params.len(), mask.len())
    }

    fn slot(&self, slot: Slot) -> Result<&[ArrayD<T>]> {
        match slot {
            Slot::Params => Ok(&self.params),
            Slot::Grads => Ok(&self.grads),
            Slot::Buffer(id) => Ok(self.buffers.get(id)?),
        }
    }

    fn slot_mut(&mut self, slot: Slot) -> Result<&mut [ArrayD<T>]> {
        match slot {
            Slot::Params => Ok(&mut self.params),
            Slot::Grads => Ok(&mut self.grads),
            Slot::Buffer(id) => Ok(self.buffers.get_mut(id)?),
        }
    }

    /// Runs `op` on the tensors of `dst`, taken out of the store while the
    /// other slots stay readable, and puts them back (also on error).
    fn with_taken<R>(
        &mut self,
        dst: Slot,
        op: impl FnOnce(&Self, &mut [ArrayD<T>]) -> Result<R>,
    ) -> Result<R> {
        let mut taken = std::mem::take(self.slot_vec_mut(dst)?);
        let result = op(self, &mut taken);
        *self.slot_vec_mut(dst)? = taken;
        result
    }

    fn slot_vec_mut(&mut self, slot: Slot) -> Result<&mut Vec<ArrayD<T>>> {
        match slot {
            Slot::Params => Ok(&mut self.params),
            Slot::Grads => Ok(&mut self.grads),
            Slot::Buffer(id) => Ok(self.buffers.get_mut(id)?),
        }
    }

    /// Borrows `dst` mutably and `src` shared at once; they must differ.
    fn pair(&mut self, dst: Slot, src: Slot) -> Result<SlotPair<'_, T>> {
        let Self {
            params,
            grads,
            buffers,
            ..
        } = self;
        match (dst, src) {
            (Slot::Params, Slot::Grads) => Ok((params, grads)),
            (Slot::Grads, Slot::Params) => Ok((grads, params)),
            (Slot::Params, Slot::Buffer(b)) => Ok((params, buffers.get(b)?)),
            (Slot::Grads, Slot::Buffer(b)) => Ok((grads, buffers.get(b)?)),
            (Slot::Buffer(b), Slot::Params) => Ok((buffers.get_mut(b)?, params)),
            (Slot::Buffer(b), Slot::Grads) => Ok((buffers.get_mut(b)?, grads)),
            (Slot::Buffer(a), Slot::Buffer(b)) => {
                let (d, s) = buffers.pair_mut(a, b)?;
                Ok((d, s))
            }
            _ => Err(AmpError::backend(format!(
                "source and destination must be different slots, got {dst:?} twice"
            ))),
        }
    }
}

impl<T: Element> ParamStore for NdStore<T> {
    type Scalar = T;
    type Norms = Vec<T>;

    fn num_tensors(&self) -> usize {
        self.params.len()
    }

    fn shape(&self, index: usize) -> Result<Vec<usize>> {
        self.check_index(index)?;
        Ok(self.params[index].shape().to_vec())
    }

    fn dtype(&self) -> DType {
        T::DTYPE
    }

    fn zero_grads(&mut self) -> Result<()> {
        // Gradients are zero-filled lazily by `grad_mut`, or replaced whole
        // by `set_grad`: no pass over memory here.
        self.has_grad.fill(false);
        Ok(())
    }

    fn grad_mask(&self) -> Result<Vec<bool>> {
        Ok(self.has_grad.clone())
    }

    fn alloc_buffer(&mut self) -> Result<BufferId> {
        let buffer = self
            .params
            .iter()
            .map(|p| ArrayD::zeros(p.raw_dim()))
            .collect();
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
        let (d, s) = self.pair(dst, src)?;
        for ((d, s), _) in d.iter_mut().zip(s).zip(mask).filter(|(_, &m)| m) {
            each2(d, s, |d, s| *d = s);
        }
        Ok(())
    }

    fn scale(&mut self, dst: Slot, factor: &[T], mask: &[bool]) -> Result<()> {
        self.check_mask(mask)?;
        check_len("scale factors", mask.len(), factor.len())?;
        let d = self.slot_mut(dst)?;
        for (i, d) in d.iter_mut().enumerate() {
            if mask[i] && factor[i] != T::one() {
                let f = factor[i];
                each1(d, |x| *x *= f);
            }
        }
        Ok(())
    }

    fn axpy(&mut self, dst: Slot, alpha: &[T], src: Slot, mask: &[bool]) -> Result<()> {
        self.check_mask(mask)?;
        check_len("axpy coefficients", mask.len(), alpha.len())?;
        let (d, s) = self.pair(dst, src)?;
        for (i, (d, s)) in d.iter_mut().zip(s).enumerate() {
            if mask[i] {
                let a = alpha[i];
                each2(d, s, |d, s| *d += a * s);
            }
        }
        Ok(())
    }

    fn addcmul(&mut self, dst: Slot, alpha: &[T], a: Slot, b: Slot, mask: &[bool]) -> Result<()> {
        self.check_mask(mask)?;
        composed::check_addcmul(mask.len(), dst, alpha, a, b)?;
        self.slot(a)?;
        self.slot(b)?;
        self.with_taken(dst, |store, d| {
            let (x, y) = (store.slot(a)?, store.slot(b)?);
            for i in (0..mask.len()).filter(|&i| mask[i]) {
                let al = alpha[i];
                each3(&mut d[i], &x[i], &y[i], |d, x, y| {
                    *d = elementwise::addcmul(*d, al, x, y)
                });
            }
            Ok(())
        })
    }

    fn addcdiv_sqrt(
        &mut self,
        dst: Slot,
        alpha: &[T],
        num: Slot,
        den: Slot,
        divisor: &[T],
        eps: &[T],
        mask: &[bool],
    ) -> Result<()> {
        self.check_mask(mask)?;
        composed::check_addcdiv_sqrt(mask.len(), dst, (alpha, divisor, eps), num, den)?;
        self.slot(num)?;
        self.slot(den)?;
        self.with_taken(dst, |store, d| {
            let (x, y) = (store.slot(num)?, store.slot(den)?);
            for i in (0..mask.len()).filter(|&i| mask[i]) {
                let (al, c, e) = (alpha[i], divisor[i], eps[i]);
                each3(&mut d[i], &x[i], &y[i], |d, x, y| {
                    *d = elementwise::addcdiv_sqrt(*d, al, x, y, c, e)
                });
            }
            Ok(())
        })
    }

    /// One loop over θ, g, m and v (and the maximum) per tensor; many
    /// tensors are shared out over rayon's threads as the fused SGD step's
    /// are (`each_tensor`).
    fn adam_update(
        &mut self,
        slots: AdamSlots,
        coefficients: &[AdamCoefficients<T>],
        mask: &[bool],
    ) -> Result<()> {
        composed::check_adam_update(self.params.len(), slots, coefficients, mask)?;
        let mut moments = vec![slots.exp_avg, slots.exp_avg_sq];
        moments.extend(slots.max_exp_avg_sq);
        for &slot in &moments {
            self.slot(slot)?;
        }
        // The moments are taken out of the store while θ and g stay in it,
        // and put back whatever happens.
        let mut taken = Vec::with_capacity(moments.len());
        for &slot in &moments {
            taken.push(std::mem::take(self.slot_vec_mut(slot)?));
        }
        let (params, grads) = (&mut self.params, &self.grads);
        let elements = masked_elements(params, mask);
        if let [m, v, rest @ ..] = taken.as_mut_slice() {
            let maxes = per_tensor(rest.first_mut(), mask.len());
            let tensors = params.iter_mut().zip(grads).zip(m.iter_mut());
            let tensors = tensors.zip(v.iter_mut()).zip(maxes);
            each_tensor(tensors, mask, elements, |i, ((((t, g), m), v), max)| {
                let c = &coefficients[i];
                let len = t.len();
                let zip = Zip::from(t).and(g).and(m).and(v);
                match max {
                    Some(max) => {
                        let zip = zip.and(max);
                        let step = |t: &mut T, &g: &T, m: &mut T, v: &mut T, max: &mut T| {
                            (*t, *m, *v) = elementwise::adam(*t, g, *m, *v, Some(max), c);
                        };
                        zip_each!(len, zip, step);
                    }
                    None => {
                        let step = |t: &mut T, &g: &T, m: &mut T, v: &mut T| {
                            (*t, *m, *v) = elementwise::adam(*t, g, *m, *v, None, c);
                        };
                        zip_each!(len, zip, step);
                    }
                }
            });
        }
        for (&slot, tensors) in moments.iter().zip(taken) {
            *self.slot_vec_mut(slot)? = tensors;
        }
        Ok(())
    }

    /// One loop per tensor over θ, g and the momentum buffer (and the
    /// weights read, when they are a snapshot).
    fn sgd_update(
        &mut self,
        weights: Slot,
        momentum: Option<&SgdMomentum<T>>,
        coefficients: &[SgdCoefficients<T>],
        mask: &[bool],
    ) -> Result<()> {
        self.fused_sgd(weights, momentum, coefficients, mask)
    }

    /// One pass per tensor (`base + alpha · src`), not a copy and an axpy.
    fn axpy_from(
        &mut self,
        dst: Slot,
        base: Slot,
        alpha: &[T],
        src: Slot,
        mask: &[bool],
    ) -> Result<()> {
        self.fused_axpy_from(dst, base, alpha, src, mask)
    }

    /// The norm read from the gradient, then one pass writing θ, the
    /// snapshot and δ (the composed sequence where a tensor's slots are not
    /// laid out alike).
    fn perturb_from_grads(
        &mut self,
        snapshot: Option<Slot>,
        delta: Option<Slot>,
        inner_lr: &[T],
        epsilon: &[T],
        mask: &[bool],
    ) -> Result<Vec<T>> {
        match self.fused_perturb(snapshot, delta, inner_lr, epsilon, mask)? {
            Some(norms) => Ok(norms),
            None => composed::perturb_from_grads(self, snapshot, delta, inner_lr, epsilon, mask),
        }
    }

    fn maximum(&mut self, dst: Slot, src: Slot, mask: &[bool]) -> Result<()> {
        self.check_mask(mask)?;
        let (d, s) = self.pair(dst, src)?;
        for (i, (d, s)) in d.iter_mut().zip(s).enumerate() {
            if mask[i] {
                each2(d, s, |d, s| *d = elementwise::maximum(*d, s));
            }
        }
        Ok(())
    }

    fn norms(&mut self, src: Slot, mask: &[bool]) -> Result<Vec<T>> {
        self.check_mask(mask)?;
        let s = self.slot(src)?;
        let computed = each_tensor(s, mask, masked_elements(s, mask), |_, t| {
            T::from_f64_rounded(sum_of_squares(t).sqrt())
        });
        Ok(spread(computed, mask, T::zero()))
    }

    fn clip_to_norms(
        &mut self,
        dst: Slot,
        norms: &Vec<T>,
        max_norm: &[T],
        mask: &[bool],
    ) -> Result<()> {
        self.check_mask(mask)?;
        check_len("norms", mask.len(), norms.len())?;
        check_len("maximum norms", mask.len(), max_norm.len())?;
        let guard = T::from_f64_rounded(PROJECTION_GUARD);
        let d = self.slot_mut(dst)?;
        for (i, d) in d.iter_mut().enumerate() {
            if !mask[i] {
                continue;
            }
            let coefficient = (max_norm[i] / (norms[i] + guard)).min(T::one());
            // A coefficient of exactly 1 leaves δ unchanged bit for bit.
            if coefficient != T::one() {
                each1(d, |x| *x *= coefficient);
            }
        }
        Ok(())
    }

    fn norms_to_host(&self, norms: &Vec<T>) -> Result<Vec<f64>> {
        Ok(norms.iter().map(|n| n.widen()).collect())
    }

    fn all_finite(&mut self, src: Slot, mask: &[bool]) -> Result<bool> {
        self.check_mask(mask)?;
        let s = self.slot(src)?;
        let finite = each_tensor(s, mask, masked_elements(s, mask), |_, t| all_finite(t));
        Ok(finite.into_iter().all(|finite| finite))
    }

    fn read(&self, slot: Slot, index: usize) -> Result<HostTensor> {
        self.check_index(index)?;
        let shape = self.params[index].shape().to_vec();
        let data = if slot == Slot::Grads && !self.has_grad[index] {
            vec![0.0; self.params[index].len()]
        } else {
            self.slot(slot)?[index].iter().map(|x| x.widen()).collect()
        };
        HostTensor::new(shape, T::DTYPE, data)
    }

    fn write(&mut self, slot: Slot, index: usize, value: &HostTensor) -> Result<()> {
        check_shape(index, &self.shape(index)?, value.shape())?;
        let array = ArrayD::from_shape_vec(
            IxDyn(value.shape()),
            value
                .data()
                .iter()
                .map(|&x| T::from_f64_rounded(x))
                .collect(),
        )
        .map_err(AmpError::backend)?;
        if slot == Slot::Grads {
            self.has_grad[index] = true;
        }
        self.slot_mut(slot)?[index] = array;
        Ok(())
    }
}
