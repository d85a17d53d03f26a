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
//! Gradients taken from the caller (from `backward()`) are never written.
//! The first operation that writes one writes instead into the tensor's
//! *spare*: the storage of a gradient the store made in an earlier step,
//! kept when `zero_grads` dropped it — the CPU counterpart of a caching
//! allocator, which spares each step the page faults of freshly mapped
//! memory (tens of milliseconds per step at 1e7 parameters). The price is
//! one gradient-sized tensor per parameter held between steps.
//!
//! On CUDA the same operations run amp-candle's own kernels
//! (`kernels/in_place.cu`, launched by `in_place/cuda.rs`) when the store is asked to
//! ([`crate::CandleStore::in_place_on_cuda`]); CUDA stores otherwise, and
//! half-precision storage (computed in `f32`) always, keep candle's
//! allocating operations.

use std::ops::{Add, Div, Mul, Range, Sub};

use candle_core::{bail, CpuStorage, InplaceOp1, InplaceOp2, InplaceOp3, Layout, Storage, Tensor};

use rayon::prelude::*;

/// The element types the loops run on.
trait Real:
    Copy
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + PartialEq
    + PartialOrd
    + Send
    + Sync
{
    const ZERO: Self;
    /// A scalar operand rounded to the dtype, as candle rounds it.
    fn of(x: f64) -> Self;
    fn sqrt(self) -> Self;
    fn is_finite(self) -> bool;
    /// The values of `storage` when it holds this type.
    fn slice_mut(storage: &mut CpuStorage) -> Option<&mut [Self]>;
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
    fn slice_mut(storage: &mut CpuStorage) -> Option<&mut [Self]> {
        match storage {
            CpuStorage::F32(values) => Some(values),
            _ => None,
        }
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
    fn slice_mut(storage: &mut CpuStorage) -> Option<&mut [Self]> {
        match storage {
            CpuStorage::F64(values) => Some(values),
            _ => None,
        }
    }
}

/// From this many elements on, a loop is split over rayon's threads in
/// blocks of [`BLOCK`] elements (amp-core's rule,
/// [`amp_core::threads`]). Every element is computed on its own, so the
/// bits do not depend on the split.
pub(crate) const PARALLEL: usize = amp_core::threads::PARALLEL_ELEMENTS;
/// The block size of split loops, and of the partial sums of
/// [`sum_of_squares`].
pub(crate) const BLOCK: usize = 1 << 16;

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

/// `d ← b + s`, `d ← b − s` or `d ← b + (s · alpha + 0)`: [`Axpy`] with
/// its addend read from `b` (the store's `axpy_from`: the bits of a copy
/// and an axpy, in one pass).
pub(crate) struct AxpyFrom(pub f64);

fn axpy_from<T: Real>(d: &mut [T], alpha: f64, b: &[T], s: &[T]) {
    let triples = d.iter_mut().zip(b).zip(s);
    if alpha == 1.0 {
        triples.for_each(|((d, &b), &s)| *d = b + s);
    } else if alpha == -1.0 {
        triples.for_each(|((d, &b), &s)| *d = b - s);
    } else {
        let a = T::of(alpha);
        triples.for_each(|((d, &b), &s)| *d = b + (s * a + T::ZERO));
    }
}

/// `d ← d + v · c` with `v = s · inner_lr + 0`, or `v = s` for an inner
/// learning rate of 1: AMP's first ascent step after its projection by
/// `c`, in one pass — the bits of the store's `scale`, `clip_to_norms` and
/// `axpy` (coefficient 1) in sequence.
pub(crate) struct Ascend {
    pub inner_lr: f64,
    pub c: f64,
}

fn ascend<T: Real>(d: &mut [T], op: &Ascend, s: &[T]) {
    let c = T::of(op.c);
    let pairs = d.iter_mut().zip(s);
    if op.inner_lr == 1.0 {
        pairs.for_each(|(d, &s)| *d = *d + s * c);
    } else {
        let lr = T::of(op.inner_lr);
        pairs.for_each(|(d, &s)| *d = *d + (s * lr + T::ZERO) * c);
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
/// `$kernel` over the slices (split into blocks for long tensors); with
/// `whole`, `$kernel` gets the whole slices (it splits them itself) and
/// returns the operation's result.
macro_rules! in_place_op {
    (whole 2, $op:ty, $name:expr, |$this:ident, $d:ident, $s:ident| $kernel:expr) => {
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
                with_slices!($name, (s1, l1), (s2, l2) => $s; |$d| $kernel)
            }
            #[cfg(feature = "cuda")]
            fn cuda_fwd(
                &self,
                s1: &mut candle_core::CudaStorage,
                l1: &Layout,
                s2: &candle_core::CudaStorage,
                l2: &Layout,
            ) -> candle_core::Result<()> {
                $crate::in_place::cuda::run($name, self, (s1, l1), Some((s2, l2)), None)
            }
        }
    };
    (whole 3, $op:ty, $name:expr, |$this:ident, $d:ident, $x:ident, $y:ident| $kernel:expr) => {
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
                with_slices!($name, (s1, l1), (s2, l2) => $x, (s3, l3) => $y; |$d| $kernel)
            }
            #[cfg(feature = "cuda")]
            fn cuda_fwd(
                &self,
                s1: &mut candle_core::CudaStorage,
                l1: &Layout,
                s2: &candle_core::CudaStorage,
                l2: &Layout,
                s3: &candle_core::CudaStorage,
                l3: &Layout,
            ) -> candle_core::Result<()> {
                let (x, y) = (Some((s2, l2)), Some((s3, l3)));
                $crate::in_place::cuda::run($name, self, (s1, l1), x, y)
            }
        }
    };
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
            #[cfg(feature = "cuda")]
            fn cuda_fwd(
                &self,
                s: &mut candle_core::CudaStorage,
                l: &Layout,
            ) -> candle_core::Result<()> {
                $crate::in_place::cuda::run($name, self, (s, l), None, None)
            }
        }
    };
    (2, $op:ty, $name:literal, |$this:ident, $d:ident, $s:ident| $kernel:expr) => {
        in_place_op!(whole 2, $op, $name, |$this, dst, src| {
            blocks2(dst, src, |$d, $s| $kernel);
            Ok(())
        });
    };
    (3, $op:ty, $name:literal, |$this:ident, $d:ident, $x:ident, $y:ident| $kernel:expr) => {
        in_place_op!(whole 3, $op, $name, |$this, dst, x, y| {
            blocks3(dst, x, y, |$d, $x, $y| $kernel);
            Ok(())
        });
    };
}

in_place_op!(1, Scale, "amp-scale", |op, d| scale(d, op.0));
in_place_op!(1, Multiply, "amp-multiply", |op, d| multiply(d, op.0));
in_place_op!(2, CopyFrom, "amp-copy", |_op, d, s| d.copy_from_slice(s));
in_place_op!(2, Axpy, "amp-axpy", |op, d, s| axpy(d, op.0, s));
in_place_op!(2, Ascend, "amp-ascend", |op, d, s| ascend(d, op, s));
in_place_op!(3, AxpyFrom, "amp-axpy-from", |op, d, b, s| axpy_from(
    d, op.0, b, s
));
in_place_op!(3, Addcmul, "amp-addcmul", |op, d, x, y| addcmul(
    d, op.0, x, y
));
in_place_op!(3, AddcdivSqrt, "amp-addcdiv-sqrt", |op, d, x, y| {
    addcdiv_sqrt(d, op, x, y)
});

/// `$body` with `$f` the closure `|x, s| x + α·s` as the store's `axpy`
/// computes it for a coefficient `$alpha` (an `Alpha` of the SGD kernels:
/// `x + s` for 1, `x − s` for −1, else `x + (s · α + 0)`), the variant
/// decided here: the loop in `$body` is compiled once per variant, without
/// a branch per element (a loop deciding the variant per element does not
/// vectorise).
macro_rules! with_alpha {
    ($t:ty, $alpha:expr, |$f:ident| $body:expr) => {
        match $alpha {
            Alpha::One => {
                let $f = |x: $t, s: $t| x + s;
                $body
            }
            Alpha::MinusOne => {
                let $f = |x: $t, s: $t| x - s;
                $body
            }
            Alpha::Times(a) => {
                let $f = |x: $t, s: $t| x + (s * a + <$t>::ZERO);
                $body
            }
        }
    };
}

mod adam;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
pub(crate) use cuda::launches;
mod pair;
mod perturb;
mod sgd;
pub(crate) use adam::{AdamFirst, AdamMax, AdamSecond, AdamTheta};
pub(crate) use perturb::AscendSaving;
pub(crate) use sgd::{SgdDecayed, SgdDecayedSelf, SgdMomentumStep, SgdStep};

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

/// The sum of the squares of `v` for a CPU tensor `x` of `f32` or `f64`,
/// with `v = x · scale + 0` in the tensor's dtype (the store's `scale`), or
/// `v = x` for a scale of 1; accumulated in `f64`: per block of [`BLOCK`]
/// elements over eight interleaved partial sums (element `j` goes to sum
/// `j mod 8`, the partial sums then added in order), the blocks' sums then
/// added in order — the same bits whether the blocks run on one thread or
/// on rayon's (from [`PARALLEL`] elements on), and whether `v` is computed
/// here or stored first. `None` for any other tensor. Reads the storage in
/// place: nothing is allocated.
pub(crate) fn sum_of_squares(tensor: &Tensor, scale: f64) -> Option<f64> {
    fn blocks<T: Real + Into<f64>>(values: &[T], scale: f64) -> f64 {
        let block = |values: &[T]| match scale == 1.0 {
            true => sum(values, |x| x),
            false => {
                let s = T::of(scale);
                sum(values, |x| x * s + T::ZERO)
            }
        };
        if values.len() >= PARALLEL {
            let sums: Vec<f64> = values.par_chunks(BLOCK).map(block).collect();
            sums.into_iter().sum()
        } else {
            values.chunks(BLOCK).map(block).sum()
        }
    }
    fn sum<T: Real + Into<f64>>(values: &[T], v: impl Fn(T) -> T) -> f64 {
        let mut lanes = [0.0f64; 8];
        let mut chunks = values.chunks_exact(8);
        for chunk in &mut chunks {
            for (lane, &x) in lanes.iter_mut().zip(chunk) {
                let x: f64 = v(x).into();
                *lane += x * x;
            }
        }
        for (lane, &x) in lanes.iter_mut().zip(chunks.remainder()) {
            let x: f64 = v(x).into();
            *lane += x * x;
        }
        lanes.iter().sum()
    }
    let (storage, layout) = tensor.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => Some(blocks(&v[start..end], scale)),
        Storage::Cpu(CpuStorage::F64(v)) => Some(blocks(&v[start..end], scale)),
        _ => None,
    }
}
