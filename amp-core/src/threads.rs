//! How a CPU store shares one operation over many tensors out over worker
//! threads: the rule `amp-ndarray` and `amp-candle` follow on the CPU, for a
//! store over another tensor type to follow as well.
//!
//! An operation whose tensors hold [`PARALLEL_ELEMENTS`] or more elements
//! between them runs on the threads; below that, handing work over costs
//! more than the memory traffic the threads would share. Short tensors go
//! to the threads in groups of about [`PIECE_ELEMENTS`] elements, not one
//! task each; a tensor of [`PARALLEL_ELEMENTS`] or more also splits its own
//! loop, in pieces of [`PIECE_ELEMENTS`]. The schedule changes no bits as
//! long as every element, and every tensor's sum, is computed on its own,
//! whichever thread runs it.
//!
//! ```
//! use amp_core::threads::tensors_per_piece;
//!
//! // 1000 tensors of 1000 elements: pieces of at least 65 tensors.
//! assert_eq!(tensors_per_piece(1000, 1_000_000), Some(65));
//! // Two tensors of 10^6: one task each.
//! assert_eq!(tensors_per_piece(2, 2_000_000), Some(1));
//! // Too little work, or one tensor (which splits its own loop): in order.
//! assert_eq!(tensors_per_piece(100, 100_000), None);
//! assert_eq!(tensors_per_piece(1, 10_000_000), None);
//! ```

/// An operation over fewer elements than this, in all, runs on the calling
/// thread; from this many on, one tensor's loop is split too.
pub const PARALLEL_ELEMENTS: usize = 1 << 18;

/// About how many elements one task handed to a thread covers.
pub const PIECE_ELEMENTS: usize = 1 << 16;

/// How one operation over `tensors` tensors holding `elements` elements
/// between them runs: `Some(n)`, over the threads in pieces of at least `n`
/// tensors (rayon's `with_min_len(n)`), when there are several tensors and
/// at least [`PARALLEL_ELEMENTS`] elements; `None`, tensor after tensor on
/// the calling thread.
pub fn tensors_per_piece(tensors: usize, elements: usize) -> Option<usize> {
    (tensors > 1 && elements >= PARALLEL_ELEMENTS)
        .then(|| (tensors * PIECE_ELEMENTS / elements).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_hold_about_a_piece_of_elements() {
        assert_eq!(tensors_per_piece(2, PARALLEL_ELEMENTS - 1), None);
        assert_eq!(tensors_per_piece(2, PARALLEL_ELEMENTS), Some(1));
        assert_eq!(tensors_per_piece(0, 1 << 30), None);
        // 4096 tensors of 64 elements: 1024 tensors (2^16 elements) a piece.
        assert_eq!(tensors_per_piece(4096, 4096 * 64), Some(1024));
        // Tensors longer than a piece: one each.
        assert_eq!(tensors_per_piece(3, 3 << 20), Some(1));
    }
}
