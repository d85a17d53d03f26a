//! Operations that write into a tensor's existing storage on the CPU.
//!
//! candle's own operations allocate their result, which the store then
//! keeps (or copies into a var): at 1e7 parameters each step touches
//! hundreds of megabytes of freshly mapped memory. On the CPU, for `f32`
//! and `f64` storage, the store instead runs the operations below through
//! candle's in-place custom operations ([`Tensor::inplace_op1`] and its
//! siblings), each a plain loop over contiguous slices.
//!
//! Each loop computes exactly what the candle operations it replaces
//! compute, in the same order and with the same rounding of its scalar
//! operands to the tensor's dtype — including candle's `affine(a, 0)`,
//! which is `x · a + 0` — so a store gives the same bits either way
//! (`tests/in_place.rs` runs both and compares them bit for bit).
//!
//! The norms ([`sum_of_squares`], accumulated in `f64`) and the check for
//! non-finite values ([`all_finite`]) read the tensors' memory in place on
//! the CPU too.
//!
//! Half-precision storage (computed in `f32`) and CUDA keep candle's
//! allocating operations.

use std::ops::{Add, Div, Mul, Range, Sub};

use amp_core::{Result, Slot};
use candle_core::{bail, CpuStorage, InplaceOp1, InplaceOp2, InplaceOp3, Layout, Storage, Tensor};

use crate::{CandleNorms, CandleStore};

/// The element types the loops run on.
trait Real:
    Copy + Add<Output = Self> + Sub<Output = Self> + Mul<Output = Self> + Div<Output = Self> + PartialEq
{
    const ZERO: Self;
    /// A scalar operand rounded to the dtype, as candle rounds it.
    fn of(x: f64) -> Self;
    fn sqrt(self) -> Self;
    fn is_finite(self) -> bool;
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    fn of(x: f64) -> Self {
        x as f32
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    fn is_finite(self) -> bool {
        f32::is_finite(self)
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    fn of(x: f64) -> Self {
        x
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn is_finite(self) -> bool {
        f64::is_finite(self)
    }
}

/// The elements of `layout` in its storage, which must be contiguous.
fn span(name: &str, layout: &Layout) -> candle_core::Result<Range<usize>> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(start..end),
        None => bail!("{name}: in-place operations need contiguous tensors"),
    }
}

/// Runs `$body` with `$d` the destination slice and each `$s` a source
/// slice of the same element type, or fails on any other dtype mix.
macro_rules! with_slices {
    ($name:expr, ($dst:expr, $dl:expr) $(, ($src:expr, $sl:expr) => $s:ident)*; |$d:ident| $body:expr) => {{
        let dr = span($name, $dl)?;
        $(let $s = span($name, $sl)?;)*
        match $dst {
            CpuStorage::F32(dst) => {
                $(let $s = match $src {
                    CpuStorage::F32(v) => &v[$s],
                    _ => bail!("{}: operands of different dtypes", $name),
                };)*
                let $d = &mut dst[dr];
                $body
            }
            CpuStorage::F64(dst) => {
                $(let $s = match $src {
                    CpuStorage::F64(v) => &v[$s],
                    _ => bail!("{}: operands of different dtypes", $name),
                };)*
                let $d = &mut dst[dr];
                $body
            }
            _ => bail!("{}: f32 and f64 only", $name),
        }
    }};
}

/// `x ← x · factor + 0` (candle's `affine(factor, 0)`).
pub(crate) struct Scale(pub f64);

fn scale<T: Real>(d: &mut [T], factor: f64) {
    let f = T::of(factor);
    d.iter_mut().for_each(|x| *x = *x * f + T::ZERO);
}

impl InplaceOp1 for Scale {
    fn name(&self) -> &'static str {
        "amp-scale"
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        with_slices!(self.name(), (s, l); |d| {
            scale(d, self.0);
            Ok(())
        })
    }
}

/// `x ← x · c` (candle's `broadcast_mul` by a 0-d tensor holding `c`, a
/// value already of the tensor's dtype).
pub(crate) struct Multiply(pub f64);

fn multiply<T: Real>(d: &mut [T], c: f64) {
    let c = T::of(c);
    d.iter_mut().for_each(|x| *x = *x * c);
}

impl InplaceOp1 for Multiply {
    fn name(&self) -> &'static str {
        "amp-multiply"
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        with_slices!(self.name(), (s, l); |d| {
            multiply(d, self.0);
            Ok(())
        })
    }
}

/// `d ← s` element for element.
pub(crate) struct CopyFrom;

impl InplaceOp2 for CopyFrom {
    fn name(&self) -> &'static str {
        "amp-copy"
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        with_slices!(self.name(), (s1, l1), (s2, l2) => src; |d| {
            d.copy_from_slice(src);
            Ok(())
        })
    }
}

/// `d ← d + s` for `alpha = 1`, `d ← d − s` for `alpha = −1`, else
/// `d ← d + (s · alpha + 0)` (the store's `axpy` in candle operations).
pub(crate) struct Axpy(pub f64);

fn axpy<T: Real>(d: &mut [T], alpha: f64, s: &[T]) {
    let pairs = d.iter_mut().zip(s);
    if alpha == 1.0 {
        pairs.for_each(|(d, &s)| *d = *d + s);
    } else if alpha == -1.0 {
        pairs.for_each(|(d, &s)| *d = *d - s);
    } else {
        let a = T::of(alpha);
        pairs.for_each(|(d, &s)| *d = *d + (s * a + T::ZERO));
    }
}

impl InplaceOp2 for Axpy {
    fn name(&self) -> &'static str {
        "amp-axpy"
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        with_slices!(self.name(), (s1, l1), (s2, l2) => src; |d| {
            axpy(d, self.0, src);
            Ok(())
        })
    }
}

/// `d ← d + (x · alpha + 0) · y` (the store's `addcmul`).
pub(crate) struct Addcmul(pub f64);

fn addcmul<T: Real>(d: &mut [T], alpha: f64, x: &[T], y: &[T]) {
    let a = T::of(alpha);
    for ((d, &x), &y) in d.iter_mut().zip(x).zip(y) {
        *d = *d + (x * a + T::ZERO) * y;
    }
}

impl InplaceOp3 for Addcmul {
    fn name(&self) -> &'static str {
        "amp-addcmul"
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        with_slices!(self.name(), (s1, l1), (s2, l2) => x, (s3, l3) => y; |d| {
            addcmul(d, self.0, x, y);
            Ok(())
        })
    }
}

/// `d ← d + (x · alpha + 0) / ((√y / divisor) · 1 + eps)` (the store's
/// `addcdiv_sqrt`: a true division by the divisor).
pub(crate) struct AddcdivSqrt {
    pub alpha: f64,
    pub divisor: f64,
    pub eps: f64,
}

fn addcdiv_sqrt<T: Real>(d: &mut [T], op: &AddcdivSqrt, x: &[T], y: &[T]) {
    let (a, c, e, one) = (
        T::of(op.alpha),
        T::of(op.divisor),
        T::of(op.eps),
        T::of(1.0),
    );
    for ((d, &x), &y) in d.iter_mut().zip(x).zip(y) {
        let den = (y.sqrt() / c) * one + e;
        *d = *d + (x * a + T::ZERO) / den;
    }
}

impl InplaceOp3 for AddcdivSqrt {
    fn name(&self) -> &'static str {
        "amp-addcdiv-sqrt"
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        with_slices!(self.name(), (s1, l1), (s2, l2) => x, (s3, l3) => y; |d| {
            addcdiv_sqrt(d, self, x, y);
            Ok(())
        })
    }
}

/// Whether every element of a CPU tensor of `f32` or `f64` is finite;
/// `None` for any other tensor (the caller falls back to candle's
/// operations). Reads the storage in place: nothing is allocated.
pub(crate) fn all_finite(tensor: &Tensor) -> Option<bool> {
    fn scan<T: Real>(values: &[T]) -> bool {
        // x · 0 is 0 for a finite x and NaN otherwise, and a sum holding a
        // NaN stays NaN: sixteen independent sums per chunk let the loop
        // vectorise, and a chunk with a non-finite value ends the scan.
        values.chunks(4096).all(|chunk| {
            let mut lanes = [T::ZERO; 16];
            let mut blocks = chunk.chunks_exact(16);
            for block in &mut blocks {
                for (lane, &x) in lanes.iter_mut().zip(block) {
                    *lane = *lane + x * T::ZERO;
                }
            }
            let rest = blocks.remainder().iter().all(|x| x.is_finite());
            rest && lanes.iter().all(|&lane| lane == T::ZERO)
        })
    }
    let (storage, layout) = tensor.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => Some(scan(&v[start..end])),
        Storage::Cpu(CpuStorage::F64(v)) => Some(scan(&v[start..end])),
        _ => None,
    }
}

/// The sum of the squares of a CPU tensor of `f32` or `f64`, accumulated
/// in `f64` over eight interleaved partial sums (element `j` goes to sum
/// `j mod 8`, the partial sums then added in order); `None` for any other
/// tensor. Reads the storage in place: nothing is allocated.
pub(crate) fn sum_of_squares(tensor: &Tensor) -> Option<f64> {
    fn sum<T: Copy + Into<f64>>(values: &[T]) -> f64 {
        let mut lanes = [0.0f64; 8];
        let mut chunks = values.chunks_exact(8);
        for chunk in &mut chunks {
            for (lane, &x) in lanes.iter_mut().zip(chunk) {
                let x: f64 = x.into();
                *lane += x * x;
            }
        }
        for (lane, &x) in lanes.iter_mut().zip(chunks.remainder()) {
            let x: f64 = x.into();
            *lane += x * x;
        }
        lanes.iter().sum()
    }
    let (storage, layout) = tensor.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => Some(sum(&v[start..end])),
        Storage::Cpu(CpuStorage::F64(v)) => Some(sum(&v[start..end])),
        _ => None,
    }
}

impl CandleStore {
    /// This store with every operation allocating its result, as candle's
    /// operations do, instead of writing into the existing storage on the
    /// CPU. The results are the same bits; what changes is memory traffic
    /// (each result is freshly allocated memory). For comparisons and
    /// debugging; CUDA and half-precision stores always allocate.
    pub fn allocating(mut self) -> Self {
        self.in_place = false;
        self
    }

    /// Whether this store writes into existing storage: on the CPU, with
    /// `f32` or `f64` storage computed in its own dtype, without master
    /// weights, unless [`CandleStore::allocating`].
    pub(crate) fn writes_in_place(&self) -> bool {
        self.in_place && self.device.is_cpu() && self.compute == self.dtype && self.master.is_none()
    }

    /// The norms of `src` read from host memory ([`sum_of_squares`]) on
    /// the CPU for `f32` and `f64` storage, in both modes (they write
    /// nothing); `None` elsewhere, and for a tensor that is not contiguous.
    pub(crate) fn host_norms(&self, src: Slot, mask: &[bool]) -> Result<Option<CandleNorms>> {
        if !self.device.is_cpu() || self.compute != self.dtype {
            return Ok(None);
        }
        let mut sums = vec![0.0f64; mask.len()];
        for (index, sum) in sums.iter_mut().enumerate().filter(|(i, _)| mask[*i]) {
            match sum_of_squares(&self.value(src, index)?) {
                Some(s) => *sum = s,
                None => return Ok(None),
            }
        }
        let norms = sums.into_iter().map(f64::sqrt).collect::<Vec<_>>();
        let n = norms.len();
        let norms = Tensor::from_vec(norms, n, &self.device)
            .and_then(|t| t.to_dtype(self.compute))
            .map_err(crate::backend)?;
        Ok(Some(CandleNorms { norms }))
    }

    /// Tensor `index` of `slot` when an operation may write into its
    /// storage: a var (updated in place anyway, as `Var::set` does), a
    /// buffer, or a gradient the store made itself; contiguous and not
    /// empty.
    pub(crate) fn in_place_target(&self, slot: Slot, index: usize) -> Option<Tensor> {
        if !self.writes_in_place() {
            return None;
        }
        let tensor = match slot {
            Slot::Params => self.vars.get(index)?.as_tensor().clone(),
            Slot::Grads => match (self.grad_owned.get(index)?, &self.grads[index]) {
                (true, Some(grad)) => grad.clone(),
                _ => return None,
            },
            Slot::Buffer(id) => self.buffers.get(id).ok()?.get(index)?.clone(),
        };
        (tensor.is_contiguous() && tensor.elem_count() > 0).then_some(tensor)
    }
}
