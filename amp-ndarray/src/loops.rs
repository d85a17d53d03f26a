//! The element-wise loops of the store and its finiteness check. From
//! [`PARALLEL`] elements on, a tensor's loop is split over rayon's threads;
//! every element is computed on its own, so the bits are those of one
//! thread (`tests/threaded.rs` checks it); the fused operations, the norms
//! and the finiteness check also share many shorter tensors out over the
//! threads ([`each_tensor`]). Tensors whose operands share one
//! memory layout are walked as slices in memory order; others through
//! `ndarray::Zip`.

use amp_core::threads;
use ndarray::{ArrayD, Zip};
use rayon::prelude::{
    IndexedParallelIterator, IntoParallelIterator, ParallelIterator, ParallelSlice,
    ParallelSliceMut,
};

use crate::Element;

/// Tensors from this many elements up have their element-wise loops split
/// over rayon's threads; below it, handing work to threads costs more than
/// the memory traffic they share (amp-core's rule, [`threads`]).
pub(crate) const PARALLEL: usize = threads::PARALLEL_ELEMENTS;

/// Elements per piece of a split loop, and per block of the sums of
/// squares, whose bits depend on it (the libtorch shim's `SUM_BLOCK`
/// repeats it).
pub(crate) const CHUNK: usize = 1 << 16;

/// `job(i, item)` on each of `items` (one per tensor, in index order, each
/// with the tensor's operands) whose tensor `mask` selects, the results of
/// those in order. The selected tensors hold `elements` elements between
/// them; they are scheduled by amp-core's rule
/// ([`threads::tensors_per_piece`]): over rayon's threads, item by item, in
/// pieces of short tensors, when there are several and enough elements; in
/// order on this thread otherwise. A long tensor also splits its own loops.
/// Every element and every tensor's sum is computed on its own, so the bits
/// do not depend on the schedule.
pub(crate) fn each_tensor<I: Send, R: Send>(
    items: impl IntoIterator<Item = I>,
    mask: &[bool],
    elements: usize,
    job: impl Fn(usize, I) -> R + Sync + Send,
) -> Vec<R> {
    let items: Vec<(usize, I)> = items
        .into_iter()
        .enumerate()
        .filter(|(i, _)| mask.get(*i).copied().unwrap_or(false))
        .collect();
    let job = |(i, item): (usize, I)| job(i, item);
    match threads::tensors_per_piece(items.len(), elements) {
        Some(per_piece) => items
            .into_par_iter()
            .with_min_len(per_piece)
            .map(job)
            .collect(),
        None => items.into_iter().map(job).collect(),
    }
}

/// One value per tensor from [`each_tensor`]'s results (those of the
/// tensors `mask` selects, in order): each at its tensor's index, `zero`
/// at the others.
pub(crate) fn spread<R: Copy>(results: Vec<R>, mask: &[bool], zero: R) -> Vec<R> {
    let mut results = results.into_iter();
    mask.iter()
        .map(|&m| {
            if m {
                results.next().unwrap_or(zero)
            } else {
                zero
            }
        })
        .collect()
}

/// One entry per tensor: each tensor of a buffer taken out of the store,
/// or `None` for each of the `n` when there is none.
pub(crate) fn per_tensor<T>(
    buffer: Option<&mut Vec<ArrayD<T>>>,
    n: usize,
) -> Vec<Option<&mut ArrayD<T>>> {
    match buffer {
        Some(tensors) => tensors.iter_mut().map(Some).collect(),
        None => (0..n).map(|_| None).collect(),
    }
}

/// The elements of the tensors `mask` selects.
pub(crate) fn masked_elements<T>(tensors: &[ArrayD<T>], mask: &[bool]) -> usize {
    tensors
        .iter()
        .zip(mask)
        .filter(|(_, &m)| m)
        .map(|(t, _)| t.len())
        .sum()
}

/// Runs the element-wise closure `$f` over the `ndarray::Zip` `$zip` of a
/// tensor of `$len` elements: split over rayon's threads from [`PARALLEL`]
/// elements on, in order below. One closure for both, so both give the
/// same bits.
macro_rules! zip_each {
    ($len:expr, $zip:expr, $f:expr) => {{
        let len: usize = $len;
        let zip = $zip;
        let f = $f;
        if len >= $crate::loops::PARALLEL {
            zip.par_for_each(f)
        } else {
            zip.for_each(f)
        }
    }};
}

/// `f(x)` for every element of `d`.
pub(crate) fn each1<T: Element>(d: &mut ArrayD<T>, f: impl Fn(&mut T) + Sync + Send) {
    let len = d.len();
    match d.as_slice_memory_order_mut() {
        Some(d) if len >= PARALLEL => d
            .par_chunks_mut(CHUNK)
            .for_each(|d| d.iter_mut().for_each(&f)),
        Some(d) => d.iter_mut().for_each(f),
        None => zip_each!(len, Zip::from(d), f),
    }
}

/// `f(d, s)` for every pair of elements at the same index.
pub(crate) fn each2<T: Element>(
    d: &mut ArrayD<T>,
    s: &ArrayD<T>,
    f: impl Fn(&mut T, T) + Sync + Send,
) {
    let len = d.len();
    if d.strides() == s.strides() {
        if let (Some(s), Some(d)) = (s.as_slice_memory_order(), d.as_slice_memory_order_mut()) {
            return if len >= PARALLEL {
                let pieces = d.par_chunks_mut(CHUNK).zip(s.par_chunks(CHUNK));
                pieces.for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, &s)| f(d, s)))
            } else {
                d.iter_mut().zip(s).for_each(|(d, &s)| f(d, s))
            };
        }
    }
    zip_each!(len, Zip::from(d).and(s), |d: &mut T, &s: &T| f(d, s))
}

/// `f(d, x, y)` for every triple of elements at the same index.
pub(crate) fn each3<T: Element>(
    d: &mut ArrayD<T>,
    x: &ArrayD<T>,
    y: &ArrayD<T>,
    f: impl Fn(&mut T, T, T) + Sync + Send,
) {
    let len = d.len();
    if d.strides() == x.strides() && d.strides() == y.strides() {
        if let (Some(x), Some(y), Some(d)) = (
            x.as_slice_memory_order(),
            y.as_slice_memory_order(),
            d.as_slice_memory_order_mut(),
        ) {
            let run = |d: &mut [T], x: &[T], y: &[T]| {
                for ((d, &x), &y) in d.iter_mut().zip(x).zip(y) {
                    f(d, x, y)
                }
            };
            return if len >= PARALLEL {
                let pieces = d.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK));
                let pieces = pieces.zip(y.par_chunks(CHUNK));
                pieces.for_each(|((d, x), y)| run(d, x, y))
            } else {
                run(d, x, y)
            };
        }
    }
    let zip = Zip::from(d).and(x).and(y);
    zip_each!(len, zip, |d: &mut T, &x: &T, &y: &T| f(d, x, y))
}

/// `true` when every element of `t` is finite.
///
/// `Iterator::all` stops at the first non-finite element, which makes it a
/// branch per element that the compiler does not vectorise. Here a block
/// of elements is checked without a branch: `x · 0` is 0 for a finite `x`
/// and NaN otherwise, and a sum that holds a NaN stays NaN, so sixteen
/// independent sums of `x · 0` (a whole number of SIMD vectors) are all
/// zero exactly when the block is finite; the check still stops at the
/// first bad block.
pub(crate) fn all_finite<T: Element>(t: &ArrayD<T>) -> bool {
    const BLOCK: usize = 4096;
    let block = |block: &[T]| {
        let mut lanes = [T::zero(); 16];
        let mut groups = block.chunks_exact(16);
        for group in &mut groups {
            for (lane, &x) in lanes.iter_mut().zip(group) {
                *lane += x * T::zero();
            }
        }
        let rest = groups.remainder().iter().all(|x| x.is_finite());
        rest && lanes.iter().all(|&lane| lane == T::zero())
    };
    match t.as_slice_memory_order() {
        // From PARALLEL elements on, the blocks are shared over rayon's
        // threads, and a bad block found by one ends the others' scan.
        Some(slice) if slice.len() >= PARALLEL => slice.par_chunks(BLOCK).all(block),
        Some(slice) => slice.chunks(BLOCK).all(block),
        None => t.iter().all(|x| x.is_finite()),
    }
}

/// Independent partial sums in [`sum_of_squares`]: enough to hide the
/// latency of the f64 add, and a whole number of SIMD vectors.
const LANES: usize = 8;

/// `Σ x²` accumulated in `f64`.
///
/// A single running sum is a chain of dependent adds (one element per add
/// latency, about 3 GB/s of f32); instead, per block of [`CHUNK`] elements,
/// `LANES` independent sums (element `j` of the block to sum `j mod 8`,
/// combined pairwise, then the block's tail of fewer than eight added) let
/// the compiler vectorise, and the blocks' sums are added in order. The
/// blocks are independent, so from [`PARALLEL`] elements on they are shared
/// over rayon's threads: the bits are the same on any number of threads.
/// The order of the additions differs from a left-to-right sum only in the
/// last bits of the `f64` total (it is, if anything, more accurate: partial
/// sums are smaller), far below the rounding to `T` that follows for `f32`.
pub(crate) fn sum_of_squares<T: Element>(t: &ArrayD<T>) -> f64 {
    match t.as_slice_memory_order() {
        Some(slice) => sum_of_squares_of(slice, |x| x),
        None => t.iter().map(|&x| x.widen() * x.widen()).sum(),
    }
}

/// `Σ v(x)²` over a slice, in the order of [`sum_of_squares`]: the sum of
/// squares of the values `v` gives, rounded to `T`, without storing them.
pub(crate) fn sum_of_squares_of<T: Element>(slice: &[T], v: impl Fn(T) -> T + Sync) -> f64 {
    let block = |block: &[T]| block_sum_of_squares(block, &v);
    if slice.len() <= CHUNK {
        return block(slice);
    }
    let sums: Vec<f64> = if slice.len() >= PARALLEL {
        slice.par_chunks(CHUNK).map(block).collect()
    } else {
        slice.chunks(CHUNK).map(block).collect()
    };
    sums.into_iter().fold(0.0, |total, sum| total + sum)
}

/// One block's sum in [`sum_of_squares`].
fn block_sum_of_squares<T: Element>(block: &[T], v: impl Fn(T) -> T) -> f64 {
    let mut lanes = [0.0f64; LANES];
    let chunks = block.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            let x = v(x).widen();
            *lane += x * x;
        }
    }
    let tail: f64 = rest
        .iter()
        .map(|&x| {
            let x = v(x).widen();
            x * x
        })
        .sum();
    // Pairwise combination of the lanes.
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            lanes[i] += lanes[i + width];
        }
    }
    lanes[0] + tail
}

/// AMP's ascent step over one tensor: with `v = (z · g) · c`,
/// `snap ← θ` and `delta ← v` where given, and `θ ← θ + 1 · v` — the
/// element-wise arithmetic of the composed sequence (scale by z, clip by
/// c, axpy with coefficient 1; a factor of exactly 1 changes nothing). All
/// slices are as long as `theta`.
pub(crate) fn ascend<T: Element>(
    theta: &mut [T],
    g: &[T],
    snap: Option<&mut [T]>,
    delta: Option<&mut [T]>,
    z: T,
    c: T,
) {
    let one = T::one();
    let run = |t: &mut [T], g: &[T], s: Option<&mut [T]>, d: Option<&mut [T]>| match (s, d) {
        (Some(s), Some(d)) => {
            for (((t, &g), s), d) in t.iter_mut().zip(g).zip(s).zip(d) {
                let v = (g * z) * c;
                *s = *t;
                *d = v;
                *t += one * v;
            }
        }
        (Some(s), None) => {
            for ((t, &g), s) in t.iter_mut().zip(g).zip(s) {
                *s = *t;
                *t += one * ((g * z) * c);
            }
        }
        (None, Some(d)) => {
            for ((t, &g), d) in t.iter_mut().zip(g).zip(d) {
                let v = (g * z) * c;
                *d = v;
                *t += one * v;
            }
        }
        (None, None) => {
            for (t, &g) in t.iter_mut().zip(g) {
                *t += one * ((g * z) * c);
            }
        }
    };
    if theta.len() < PARALLEL {
        return run(theta, g, snap, delta);
    }
    // The optional slices cut alongside θ (or a `None` per piece).
    fn cut<T>(x: Option<&mut [T]>, pieces: usize) -> Vec<Option<&mut [T]>> {
        match x {
            Some(x) => x.chunks_mut(CHUNK).map(Some).collect(),
            None => (0..pieces).map(|_| None).collect(),
        }
    }
    let pieces = theta.len().div_ceil(CHUNK);
    let (snap, delta) = (cut(snap, pieces), cut(delta, pieces));
    theta
        .par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(snap.into_par_iter())
        .zip(delta.into_par_iter())
        .for_each(|(((t, g), s), d)| run(t, g, s, d));
}
