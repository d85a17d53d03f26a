//! The element-wise operations Adam needs (`addcmul`, `addcdiv_sqrt`,
//! `maximum`), tensor by tensor with ATen's own operators, where the CPU
//! loop path does not take them (CUDA, half precision, strided tensors;
//! `addcdiv_sqrt` has its loop in `shim/adam.cpp`). Each is built from
//! operators that round once per operation (`mul`, `div`, `sqrt`, `add`),
//! in the order of the formula in `amp_core::elementwise`; `addcmul` and
//! `maximum` give that formula's bits, `addcdiv_sqrt` (ATen's division
//! chain) may differ from it by an ulp, which is why the loop path has its
//! own. (ATen's own `addcmul_`/`addcdiv_` may fuse the multiply and the
//! add into one FMA, which rounds differently.)

use amp_core::{check_len, composed, ParamStore, Result, Slot};
use tch::Tensor;

use crate::kinds::tch_error;
use crate::TchStore;

impl TchStore {
    /// Runs `op` on every masked-in tensor of `dst` that exists, in place,
    /// with autograd off; `sources` are read as zeros where a gradient is
    /// missing. Which gradients are present is read once for the call (in
    /// the flat layout that is one pass over the flags, not one per tensor).
    fn each(
        &self,
        dst: Slot,
        sources: &[Slot],
        mask: &[bool],
        op: impl Fn(usize, &mut Tensor, &[Tensor]) -> std::result::Result<(), tch::TchError>,
    ) -> Result<()> {
        check_len("mask", self.params.len(), mask.len())?;
        let present = if dst == Slot::Grads || sources.contains(&Slot::Grads) {
            Some(self.grad_mask()?)
        } else {
            None
        };
        let get = |slot: Slot, index: usize| -> Result<Option<Tensor>> {
            match (slot, &present) {
                (Slot::Grads, Some(present)) if !present[index] => Ok(None),
                (Slot::Grads, _) => self.attached_grad(index),
                _ => self.slot_tensor(slot, index),
            }
        };
        for index in (0..mask.len()).filter(|&i| mask[i]) {
            let Some(mut d) = get(dst, index)? else {
                continue;
            };
            let inputs = sources
                .iter()
                .map(|&s| match get(s, index)? {
                    Some(t) => Ok(t),
                    None => self.params[index].f_zeros_like().map_err(tch_error),
                })
                .collect::<Result<Vec<_>>>()?;
            tch::no_grad(|| op(index, &mut d, &inputs)).map_err(tch_error)?;
        }
        Ok(())
    }

    pub(crate) fn addcmul_each(
        &self,
        dst: Slot,
        alpha: &[f64],
        a: Slot,
        b: Slot,
        mask: &[bool],
    ) -> Result<()> {
        composed::check_addcmul(self.params.len(), dst, alpha, a, b)?;
        self.each(dst, &[a, b], mask, |i, d, x| {
            let product = x[0].f_mul_scalar(alpha[i])?.f_mul(&x[1])?;
            d.f_add_(&product).map(drop)
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn addcdiv_sqrt_each(
        &self,
        dst: Slot,
        alpha: &[f64],
        num: Slot,
        den: Slot,
        divisor: &[f64],
        eps: &[f64],
        mask: &[bool],
    ) -> Result<()> {
        composed::check_addcdiv_sqrt(self.params.len(), dst, (alpha, divisor, eps), num, den)?;
        self.each(dst, &[num, den], mask, |i, d, x| {
            let denominator = x[1].f_sqrt()?.f_div_scalar(divisor[i])?;
            let denominator = denominator.f_add_scalar(eps[i])?;
            let quotient = x[0].f_mul_scalar(alpha[i])?.f_div(&denominator)?;
            d.f_add_(&quotient).map(drop)
        })
    }

    pub(crate) fn maximum_each(&self, dst: Slot, src: Slot, mask: &[bool]) -> Result<()> {
        composed::check_sources("maximum", dst, &[src])?;
        self.each(dst, &[src], mask, |_, d, x| {
            let max = d.f_maximum(&x[0])?;
            d.f_copy_(&max)
        })
    }
}
