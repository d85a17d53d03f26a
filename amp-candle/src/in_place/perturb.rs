//! AMP's first ascent step with the snapshot written in the same pass:
//! [`AscendSaving`].

use super::*;

/// [`Ascend`] on θ that first saves θ's values into `snapshot`, in one pass
/// (a copy and the ascent otherwise): per element `s ← θ`, then θ as
/// [`Ascend`] computes it. θ is the operation's destination and the
/// gradient its source; the snapshot is written through a nested operation
/// ([`pair::with_second`]), so it must share storage with neither. When the
/// operation fails it has written nothing.
pub(crate) struct AscendSaving<'a> {
    pub ascend: Ascend,
    pub snapshot: &'a Tensor,
}

const ASCEND_SAVING: &str = "amp-ascend-saving";

/// Elements per chunk: θ's chunk is copied, then read again from cache.
const CHUNK: usize = 4096;

impl AscendSaving<'_> {
    fn run<T: Real>(&self, theta: &mut [T], g: &[T]) -> candle_core::Result<()> {
        let n = theta.len();
        if g.len() != n {
            bail!("{ASCEND_SAVING}: operands of different lengths");
        }
        pair::with_second(ASCEND_SAVING, self.snapshot, n, |s: &mut [T]| {
            pair::blocks_pair(theta, s, g, None, |t, s, g, _| {
                let chunks = t.chunks_mut(CHUNK).zip(s.chunks_mut(CHUNK));
                for ((t, s), g) in chunks.zip(g.chunks(CHUNK)) {
                    s.copy_from_slice(t);
                    ascend(t, &self.ascend, g);
                }
            });
            Ok(())
        })
    }
}

in_place_op!(whole 2, AscendSaving<'_>, ASCEND_SAVING, |op, theta, g| {
    op.run(theta, g)
});
