//! Passes that write two tensors. candle's in-place operations write one
//! tensor each; a kernel that must also write a second one (an optimiser's
//! buffer beside θ) runs a nested in-place operation on that second tensor
//! from inside its own ([`with_second`]), and so holds both tensors'
//! storage, written in place, for one loop over the elements.

use std::cell::Cell;
use std::marker::PhantomData;

use super::*;

/// The nested operation of [`with_second`]: hands its tensor's slice to
/// `run`, once.
struct Second<T, F> {
    name: &'static str,
    run: Cell<Option<F>>,
    element: PhantomData<fn(&mut [T])>,
}

impl<T: Real, F: FnOnce(&mut [T]) -> candle_core::Result<()>> InplaceOp1 for Second<T, F> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let range = span(self.name, l)?;
        let Some(values) = T::slice_mut(s) else {
            bail!("{}: operands of different dtypes", self.name)
        };
        match self.run.take() {
            Some(run) => run(&mut values[range]),
            None => bail!("{}: the nested operation ran twice", self.name),
        }
    }
}

/// Runs `run` on the elements of `second` (contiguous CPU storage of `T`,
/// `len` of them: an error otherwise), written in place, from inside
/// another in-place kernel that holds the slices of its own tensors.
///
/// candle locks a tensor's storage for the length of an operation, so
/// `second` must share its storage with none of the tensors of the
/// enclosing operation: the nested lock would wait for a lock its own
/// thread holds. Callers check that with [`crate::same_storage`] first.
pub(super) fn with_second<T: Real>(
    name: &'static str,
    second: &Tensor,
    len: usize,
    run: impl FnOnce(&mut [T]) -> candle_core::Result<()>,
) -> candle_core::Result<()> {
    let checked = move |values: &mut [T]| {
        if values.len() != len {
            bail!("{name}: a second destination of another length");
        }
        run(values)
    };
    second.inplace_op1(&Second {
        name,
        run: Cell::new(Some(checked)),
        element: PhantomData,
    })
}

/// `f(d, e, x, w)` over matching blocks of two destinations `d` and `e`
/// and one or two sources (`w` optional), split over rayon's threads for
/// long tensors as [`blocks1`] does. All slices have one length.
pub(super) fn blocks_pair<T: Real>(
    d: &mut [T],
    e: &mut [T],
    x: &[T],
    w: Option<&[T]>,
    f: impl Fn(&mut [T], &mut [T], &[T], Option<&[T]>) + Sync + Send,
) {
    if d.len() < PARALLEL {
        return f(d, e, x, w);
    }
    let blocks = d.par_chunks_mut(BLOCK).zip(e.par_chunks_mut(BLOCK));
    let blocks = blocks.zip(x.par_chunks(BLOCK));
    match w {
        Some(w) => blocks
            .zip(w.par_chunks(BLOCK))
            .for_each(|(((d, e), x), w)| f(d, e, x, Some(w))),
        None => blocks.for_each(|((d, e), x)| f(d, e, x, None)),
    }
}
