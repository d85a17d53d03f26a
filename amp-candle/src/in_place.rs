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

use rayon::prelude::*;

use crate::{CandleNorms, CandleStore};

/// The element types the loops run on.
trait Real:
    Copy
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + PartialEq
    + Send
    + Sync
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

/// From this many elements on, a loop is split over rayon's threads in
/// blocks of [`BLOCK`] elements. Every element is computed on its own, so
/// the bits do not depend on the split.
const PARALLEL: usize = 1 << 18;
/// The block size of split loops, and of the partial sums of
/// [`sum_of_squares`].
const BLOCK: usize = 1 << 16;

/// `f(d)`, split into blocks over rayon's threads for a long `d`.
fn blocks1<T: Real>(d: &mut [T], f: impl Fn(&mut [T]) + Sync + Send) {
    if d.len() >= PARALLEL {
        d.par_chunks_mut(BLOCK).for_each(f);
    } else {
        f(d);
    }
}

/// `f(d, s)` over matching blocks (see [`blocks1`]).
fn blocks2<T: Real>(d: &mut [T], s: &[T], f: impl Fn(&mut [T], &[T]) + Sync + Send) {
    if d.len() >= PARALLEL {
        let blocks = d.par_chunks_mut(BLOCK).zip(s.par_chunks(BLOCK));
        blocks.for_each(|(d, s)| f(d, s));
    } else {
        f(d, s);
    }
}

/// `f(d, x, y)` over matching blocks (see [`blocks1`]).
fn blocks3<T: Real>(d: &mut [T], x: &[T], y: &[T], f: impl Fn(&mut [T], &[T], &[T]) + Sync + Send) {
    if d.len() >= PARALLEL {
        let blocks = d.par_chunks_mut(BLOCK).zip(x.par_chunks(BLOCK));
        let blocks = blocks.zip(y.par_chunks(BLOCK));
        blocks.for_each(|((d, x), y)| f(d, x, y));
    } else {
        f(d, x, y);
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

/// `x ← x · c` (candle's `broadcast_mul` by a 0-d tensor holding `c`, a
/// value already of the tensor's dtype).
pub(crate) struct Multiply(pub f64);

fn multiply<T: Real>(d: &mut [T], c: f64) {
    let c = T::of(c);
    d.iter_mut().for_each(|x| *x = *x * c);
}

/// `d ← s` element for element.
pub(crate) struct CopyFrom;

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

/// `d ← d + (x · alpha + 0) · y` (the store's `addcmul`).
pub(crate) struct Addcmul(pub f64);

fn addcmul<T: Real>(d: &mut [T], alpha: f64, x: &[T], y: &[T]) {
    let a = T::of(alpha);
    for ((d, &x), &y) in d.iter_mut().zip(x).zip(y) {
        *d = *d + (x * a + T::ZERO) * y;
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

/// Implements candle's in-place operation trait for `$op`, running
/// `$kernel` over the slices (split into blocks for long tensors).
macro_rules! in_place_op {
    (1, $op:ty, $name:literal, |$this:ident, $d:ident| $kernel:expr) => {
        impl InplaceOp1 for $op {
            fn name(&self) -> &'static str {
                $name
            }
            fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
                let $this = self;
                with_slices!($name, (s, l); |d| {
                    blocks1(d, |$d| $kernel);
                    Ok(())
                })
            }
        }
    };
    (2, $op:ty, $name:literal, |$this:ident, $d:ident, $s:ident| $kernel:expr) => {
        impl InplaceOp2 for $op {
            fn name(&self) -> &'static str {
                $name
            }
            fn cpu_fwd(
                &self,
                s1: &mut CpuStorage,
                l1: &Layout,
                s2: &CpuStorage,
                l2: &Layout,
            ) -> candle_core::Result<()> {
                let $this = self;
                with_slices!($name, (s1, l1), (s2, l2) => src; |d| {
                    blocks2(d, src, |$d, $s| $kernel);
                    Ok(())
                })
            }
        }
    };
    (3, $op:ty, $name:literal, |$this:ident, $d:ident, $x:ident, $y:ident| $kernel:expr) => {
        impl InplaceOp3 for $op {
            fn name(&self) -> &'static str {
                $name
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
                let $this = self;
                with_slices!($name, (s1, l1), (s2, l2) => x, (s3, l3) => y; |d| {
                    blocks3(d, x, y, |$d, $x, $y| $kernel);
                    Ok(())
                })
            }
        }
    };
}

in_place_op!(1, Scale, "amp-scale", |op, d| scale(d, op.0));
in_place_op!(1, Multiply, "amp-multiply", |op, d| multiply(d, op.0));
in_place_op!(2, CopyFrom, "amp-copy", |_op, d, s| d.copy_from_slice(s));
in_place_op!(2, Axpy, "amp-axpy", |op, d, s| axpy(d, op.0, s));
in_place_op!(3, Addcmul, "amp-addcmul", |op, d, x, y| addcmul(
    d, op.0, x, y
));
in_place_op!(3, AddcdivSqrt, "amp-addcdiv-sqrt", |op, d, x, y| {
    addcdiv_sqrt(d, op, x, y)
});

/// Whether every element of a CPU tensor of `f32` or `f64` is finite;
/// `None` for any other tensor (the caller falls back to candle's
/// operations). Reads the storage in place: nothing is allocated.
pub(crate) fn all_finite(tensor: &Tensor) -> Option<bool> {
    fn scan<T: Real>(values: &[T]) -> bool {
        if values.len() >= PARALLEL {
            return values.par_chunks(BLOCK).all(scan);
        }
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
/// in `f64`: per block of [`BLOCK`] elements over eight interleaved partial
/// sums (element `j` goes to sum `j mod 8`, the partial sums then added in
/// order), the blocks' sums then added in order — the same bits whether the
/// blocks run on one thread or on rayon's (from [`PARALLEL`] elements on).
/// `None` for any other tensor. Reads the storage in place: nothing is
/// allocated.
pub(crate) fn sum_of_squares(tensor: &Tensor) -> Option<f64> {
    fn blocks<T: Copy + Into<f64> + Sync>(values: &[T]) -> f64 {
        if values.len() >= PARALLEL {
            let sums: Vec<f64> = values.par_chunks(BLOCK).map(sum).collect();
            sums.into_iter().sum()
        } else {
            values.chunks(BLOCK).map(sum).sum()
        }
    }
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
        Storage::Cpu(CpuStorage::F32(v)) => Some(blocks(&v[start..end])),
        Storage::Cpu(CpuStorage::F64(v)) => Some(blocks(&v[start..end])),
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
