//! [`ParamStore`] for [`CandleStore`]: the batched operations AMP's step
//! runs, in place on the CPU where the store may write so (see
//! [`crate::in_place`]), through candle's operations elsewhere.

use std::fmt;

use amp_core::{
    check_len, check_shape, AdamCoefficients, AdamSlots, BufferId, DType, HostTensor, ParamStore,
    Result, SgdCoefficients, SgdMomentum, Slot,
};
use candle_core::{DType as CDType, Tensor};

use crate::slots::host_to_tensor;
use crate::{amp_dtype, backend, cast, device_name, in_place, CandleNorms, CandleStore};

impl ParamStore for CandleStore {
    type Scalar = f64;
    type Norms = CandleNorms;

    fn num_tensors(&self) -> usize {
        self.vars.len()
    }

    fn shape(&self, index: usize) -> Result<Vec<usize>> {
        self.check_index(index)?;
        Ok(self.vars[index].dims().to_vec())
    }

    fn dtype(&self) -> DType {
        // `build` accepts float dtypes only.
        amp_dtype(self.dtype).unwrap_or(DType::F32)
    }

    fn zero_grads(&mut self) -> Result<()> {
        // Dropping the tensors frees their memory before the next backward
        // (those the store made become spares, when it writes in place).
        for index in 0..self.grads.len() {
            self.replace_grad(index, None, false);
        }
        self.has_grad.fill(false);
        Ok(())
    }

    fn grad_mask(&self) -> Result<Vec<bool>> {
        Ok(self.has_grad.clone())
    }

    fn alloc_buffer(&mut self) -> Result<BufferId> {
        let buffer = self
            .vars
            .iter()
            .map(|v| Tensor::zeros(v.shape(), self.dtype, &self.device))
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(backend)?;
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
        self.check_pair(dst, src)?;
        let mut batch = self.batch(mask.len());
        for index in (0..mask.len()).filter(|&i| mask[i]) {
            if let Some(target) = self.in_place_target(dst, index)? {
                let value = self.source(src, index)?;
                batch.push(target.elem_count(), move || {
                    target.inplace_op2(&value, &in_place::CopyFrom)
                });
                continue;
            }
            let mut value = self.value(src, index)?;
            // Vars change in place, and so do the store's own tensors where
            // it writes in place: a slot must own its copy. (`Var::set`
            // copies by itself; master weights are replaced, never changed
            // in place.)
            let shared = src == Slot::Params && self.master.is_none();
            if dst != Slot::Params && (shared || self.writes_in_place()) {
                value = value.copy().map_err(backend)?;
            }
            self.put(dst, index, value)?;
        }
        batch.run()
    }

    fn scale(&mut self, dst: Slot, factor: &[f64], mask: &[bool]) -> Result<()> {
        self.check_mask(mask)?;
        check_len("scale factors", mask.len(), factor.len())?;
        self.check_slot(dst)?;
        let mut batch = self.batch(mask.len());
        for index in (0..mask.len()).filter(|&i| mask[i] && factor[i] != 1.0) {
            if let Some(target) = self.in_place_target(dst, index)? {
                let op = in_place::Scale(factor[index]);
                batch.push(target.elem_count(), move || target.inplace_op1(&op));
                continue;
            }
            let d = self.up(&self.value(dst, index)?)?;
            let scaled = d.affine(factor[index], 0.0).map_err(backend)?;
            let scaled = self.down(scaled)?;
            self.put(dst, index, scaled)?;
        }
        batch.run()
    }

    fn axpy(&mut self, dst: Slot, alpha: &[f64], src: Slot, mask: &[bool]) -> Result<()> {
        self.check_mask(mask)?;
        check_len("axpy coefficients", mask.len(), alpha.len())?;
        self.check_pair(dst, src)?;
        let (mut batch, mut adopted) = (self.batch(mask.len()), Vec::new());
        for index in (0..mask.len()).filter(|&i| mask[i]) {
            // A gradient taken from the caller goes to the spare, summed on
            // the way: `spare ← g + alpha · src` in one pass. The spare
            // becomes the gradient once written.
            let spare = (dst == Slot::Grads)
                .then(|| self.take_spare(index))
                .flatten();
            let (target, base) = match spare {
                Some((spare, g)) => {
                    adopted.push((index, spare.clone()));
                    (Some(spare), Some(g))
                }
                None => (self.in_place_target(dst, index)?, None),
            };
            if let Some(target) = target {
                let (s, a) = (self.source(src, index)?, alpha[index]);
                batch.push(target.elem_count(), move || match &base {
                    Some(g) => target.inplace_op3(g, &s, &in_place::AxpyFrom(a)),
                    None => target.inplace_op2(&s, &in_place::Axpy(a)),
                });
                continue;
            }
            let d = self.up(&self.value(dst, index)?)?;
            let s = self.up(&self.value(src, index)?)?;
            // ±1 needs no multiply: x·1 is exact, so the result is the same.
            let a = alpha[index];
            let sum = if a == 1.0 {
                d.add(&s)
            } else if a == -1.0 {
                d.sub(&s)
            } else {
                s.affine(a, 0.0).and_then(|s| d.add(&s))
            }
            .map_err(backend)?;
            let sum = self.down(sum)?;
            self.put(dst, index, sum)?;
        }
        batch.run()?;
        for (index, spare) in adopted {
            self.replace_grad(index, Some(spare), true);
        }
        Ok(())
    }

    fn addcmul(&mut self, dst: Slot, alpha: &[f64], a: Slot, b: Slot, mask: &[bool]) -> Result<()> {
        self.check_mask(mask)?;
        amp_core::composed::check_addcmul(mask.len(), dst, alpha, a, b)?;
        for slot in [dst, a, b] {
            self.check_slot(slot)?;
        }
        let mut batch = self.batch(mask.len());
        for index in (0..mask.len()).filter(|&i| mask[i]) {
            if let Some(target) = self.in_place_target(dst, index)? {
                let (x, y) = (self.source(a, index)?, self.source(b, index)?);
                let op = in_place::Addcmul(alpha[index]);
                batch.push(target.elem_count(), move || target.inplace_op3(&x, &y, &op));
                continue;
            }
            let d = self.up(&self.value(dst, index)?)?;
            let x = self.up(&self.value(a, index)?)?;
            let y = self.up(&self.value(b, index)?)?;
            // d + (alpha · x) · y, in that order (amp_core::elementwise).
            let sum = x
                .affine(alpha[index], 0.0)
                .and_then(|t| t.mul(&y))
                .and_then(|t| d.add(&t))
                .map_err(backend)?;
            let sum = self.down(sum)?;
            self.put(dst, index, sum)?;
        }
        batch.run()
    }

    fn addcdiv_sqrt(
        &mut self,
        dst: Slot,
        alpha: &[f64],
        num: Slot,
        den: Slot,
        divisor: &[f64],
        eps: &[f64],
        mask: &[bool],
    ) -> Result<()> {
        self.check_mask(mask)?;
        amp_core::composed::check_addcdiv_sqrt(mask.len(), dst, (alpha, divisor, eps), num, den)?;
        for slot in [dst, num, den] {
            self.check_slot(slot)?;
        }
        let mut batch = self.batch(mask.len());
        for index in (0..mask.len()).filter(|&i| mask[i]) {
            if let Some(target) = self.in_place_target(dst, index)? {
                let (x, y) = (self.source(num, index)?, self.source(den, index)?);
                let op = in_place::AddcdivSqrt {
                    alpha: alpha[index],
                    divisor: divisor[index],
                    eps: eps[index],
                };
                batch.push(target.elem_count(), move || target.inplace_op3(&x, &y, &op));
                continue;
            }
            let d = self.up(&self.value(dst, index)?)?;
            let x = self.up(&self.value(num, index)?)?;
            let y = self.up(&self.value(den, index)?)?;
            // A true division by the divisor (candle's `/ f64` multiplies by
            // the reciprocal, which rounds differently).
            let c = Tensor::new(divisor[index], &self.device)
                .and_then(|c| c.to_dtype(self.compute))
                .map_err(backend)?;
            // d + (alpha · x) / (√y / c + eps), in that order
            // (amp_core::elementwise).
            let sum = y
                .sqrt()
                .and_then(|t| t.broadcast_div(&c))
                .and_then(|t| t.affine(1.0, eps[index]))
                .and_then(|den| x.affine(alpha[index], 0.0)?.div(&den))
                .and_then(|t| d.add(&t))
                .map_err(backend)?;
            let sum = self.down(sum)?;
            self.put(dst, index, sum)?;
        }
        batch.run()
    }

    fn axpy_from(
        &mut self,
        dst: Slot,
        base: Slot,
        alpha: &[f64],
        src: Slot,
        mask: &[bool],
    ) -> Result<()> {
        if self.fused_axpy_from(dst, base, alpha, src, mask)? {
            return Ok(());
        }
        amp_core::composed::axpy_from(self, dst, base, alpha, src, mask)
    }

    fn perturb_from_grads(
        &mut self,
        snapshot: Option<Slot>,
        delta: Option<Slot>,
        inner_lr: &[f64],
        epsilon: &[f64],
        mask: &[bool],
    ) -> Result<CandleNorms> {
        if let Some(norms) = self.fused_perturb(snapshot, delta, inner_lr, epsilon, mask)? {
            return Ok(norms);
        }
        amp_core::composed::perturb_from_grads(self, snapshot, delta, inner_lr, epsilon, mask)
    }

    fn sgd_update(
        &mut self,
        weights: Slot,
        momentum: Option<&SgdMomentum<f64>>,
        coefficients: &[SgdCoefficients<f64>],
        mask: &[bool],
    ) -> Result<()> {
        if self.fused_sgd(weights, momentum, coefficients, mask)? {
            return Ok(());
        }
        amp_core::composed::sgd_update(self, weights, momentum, coefficients, mask)
    }

    fn adam_update(
        &mut self,
        slots: AdamSlots,
        coefficients: &[AdamCoefficients<f64>],
        mask: &[bool],
    ) -> Result<()> {
        if self.fused_adam(slots, coefficients, mask)? {
            return Ok(());
        }
        amp_core::composed::adam_update(self, slots, coefficients, mask)
    }

    fn maximum(&mut self, dst: Slot, src: Slot, mask: &[bool]) -> Result<()> {
        self.check_mask(mask)?;
        self.check_pair(dst, src)?;
        for index in (0..mask.len()).filter(|&i| mask[i]) {
            let d = self.value(dst, index)?;
            let s = self.value(src, index)?;
            // candle's maximum keeps `d` where `s` is NaN; a NaN in `s`
            // must win, as in torch.maximum (amp_core::elementwise).
            let max = d
                .maximum(&s)
                .and_then(|m| s.ne(&s)?.where_cond(&s, &m))
                .map_err(backend)?;
            self.put(dst, index, max)?;
        }
        Ok(())
    }

    fn norms(&mut self, src: Slot, mask: &[bool]) -> Result<CandleNorms> {
        self.check_mask(mask)?;
        self.check_slot(src)?;
        if let Some(norms) = self.host_norms(src, mask, None)? {
            return Ok(norms);
        }
        let mut parts = Vec::with_capacity(mask.len());
        for (index, &active) in mask.iter().enumerate() {
            parts.push(if active {
                let t = self.up(&self.value(src, index)?)?;
                Some(t.sqr().and_then(|t| t.sum_all()).map_err(backend)?)
            } else {
                None
            });
        }
        // One square root for the whole vector.
        let norms = self.gather(parts, self.compute)?.sqrt().map_err(backend)?;
        Ok(CandleNorms { norms })
    }

    fn clip_to_norms(
        &mut self,
        dst: Slot,
        norms: &CandleNorms,
        max_norm: &[f64],
        mask: &[bool],
    ) -> Result<()> {
        self.check_mask(mask)?;
        check_len("norms", mask.len(), norms.len())?;
        check_len("maximum norms", mask.len(), max_norm.len())?;
        self.check_slot(dst)?;
        if !mask.iter().any(|&m| m) {
            return Ok(());
        }
        let coefficients = self.coefficients(norms, max_norm)?;
        // Writing in place, the coefficients are read from host memory (on
        // the CPU a read is a copy of one value per tensor).
        let on_host = match self.writes_in_place() {
            true => Some(
                cast(&coefficients, CDType::F64)
                    .and_then(|c| c.to_vec1::<f64>())
                    .map_err(backend)?,
            ),
            false => None,
        };
        let mut batch = self.batch(mask.len());
        for index in (0..mask.len()).filter(|&i| mask[i]) {
            if let Some(c) = &on_host {
                if let Some(target) = self.in_place_target(dst, index)? {
                    let op = in_place::Multiply(c[index]);
                    batch.push(target.elem_count(), move || target.inplace_op1(&op));
                    continue;
                }
            }
            let d = self.up(&self.value(dst, index)?)?;
            // A 0-d view of the coefficient, broadcast: no host read.
            let clipped = coefficients
                .get(index)
                .and_then(|c| d.broadcast_mul(&c))
                .map_err(backend)?;
            let clipped = self.down(clipped)?;
            self.put(dst, index, clipped)?;
        }
        batch.run()
    }

    fn norms_to_host(&self, norms: &CandleNorms) -> Result<Vec<f64>> {
        cast(&norms.norms, CDType::F64)
            .and_then(|n| n.to_vec1::<f64>())
            .map_err(backend)
    }

    fn all_finite(&mut self, src: Slot, mask: &[bool]) -> Result<bool> {
        self.check_mask(mask)?;
        self.check_slot(src)?;
        if !mask.iter().any(|&m| m) {
            return Ok(true);
        }
        if self.writes_in_place() {
            // On the CPU: a scan of each tensor's memory, nothing allocated
            // (`None`: a tensor that is not contiguous).
            let scans = self.read_each(src, mask, |_, t| in_place::all_finite(t))?;
            let scans: Vec<Option<bool>> = scans.into_iter().flatten().collect();
            let finite = match scans.contains(&Some(false)) {
                true => Some(false),
                false => scans.iter().all(Option::is_some).then_some(true),
            };
            if let Some(finite) = finite {
                return Ok(finite);
            }
        }
        // x·0 is 0 for finite x and NaN for ±inf and NaN, so the sum of
        // x·0 over the slot is 0 exactly when every element is finite (a
        // plain sum could overflow). Computed in the storage dtype: zeros
        // cannot overflow.
        let mut parts = Vec::with_capacity(mask.len());
        for (index, &active) in mask.iter().enumerate() {
            parts.push(if active {
                let t = self.value(src, index)?;
                Some(
                    t.affine(0.0, 0.0)
                        .and_then(|z| z.sum_all())
                        .map_err(backend)?,
                )
            } else {
                None
            });
        }
        let total = self
            .gather(parts, self.dtype)?
            .sum_all()
            .and_then(|t| t.to_dtype(CDType::F64))
            .and_then(|t| t.to_scalar::<f64>())
            .map_err(backend)?;
        Ok(total.is_finite())
    }

    fn read(&self, slot: Slot, index: usize) -> Result<HostTensor> {
        self.check_index(index)?;
        self.check_slot(slot)?;
        let shape = self.vars[index].dims().to_vec();
        let numel = self.vars[index].elem_count();
        let data = if (slot == Slot::Grads && !self.has_grad[index]) || numel == 0 {
            vec![0.0; numel]
        } else {
            self.value(slot, index)?
                .to_dtype(CDType::F64)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f64>())
                .map_err(backend)?
        };
        HostTensor::new(shape, self.dtype(), data)
    }

    fn write(&mut self, slot: Slot, index: usize, value: &HostTensor) -> Result<()> {
        check_shape(index, &self.shape(index)?, value.shape())?;
        self.check_slot(slot)?;
        let tensor = host_to_tensor(value, self.dtype, &self.device)?;
        self.put(slot, index, tensor)?;
        if slot == Slot::Grads {
            self.has_grad[index] = true;
        }
        Ok(())
    }
}

impl fmt::Display for CandleStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CandleStore({} tensors, {:?}, {})",
            self.vars.len(),
            self.dtype,
            device_name(&self.device)
        )
    }
}
