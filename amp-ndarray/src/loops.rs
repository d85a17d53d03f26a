//! The element-wise loops of the store and its finiteness check. From
//! [`PARALLEL`] elements on, a tensor's loop is split over rayon's threads;
//! every element is computed on its own, so the bits are those of one
//! thread (`tests/threaded.rs` checks it). Tensors whose operands share one
//! memory layout are walked as slices in memory order; others through
//! `ndarray::Zip`.

use ndarray::{ArrayD, Zip};
use rayon::prelude::{IndexedParallelIterator, ParallelIterator, ParallelSlice, ParallelSliceMut};

use crate::Element;

/// Tensors from this many elements up have their element-wise loops split
/// over rayon's threads; below it, handing work to threads costs more than
/// the memory traffic they share.
pub(crate) const PARALLEL: usize = 1 << 18;

/// Elements per piece of a split loop.
const CHUNK: usize = 1 << 16;

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
/// branch per element that the compiler does not vectorise; a branch-free
/// `&` over blocks of elements vectorises, and the check still stops at the
/// first bad block.
pub(crate) fn all_finite<T: Element>(t: &ArrayD<T>) -> bool {
    const BLOCK: usize = 4096;
    let block = |block: &[T]| block.iter().fold(true, |ok, x| ok & x.is_finite());
    match t.as_slice_memory_order() {
        // From PARALLEL elements on, the blocks are shared over rayon's
        // threads, and a bad block found by one ends the others' scan.
        Some(slice) if slice.len() >= PARALLEL => slice.par_chunks(BLOCK).all(block),
        Some(slice) => slice.chunks(BLOCK).all(block),
        None => t.iter().all(|x| x.is_finite()),
    }
}
