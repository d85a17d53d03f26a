//! The conformance suite on the ndarray reference backend, f32 and f64, and
//! the ndarray f64 oracle against the plain transcription of the algorithm.

use amp_core::DType;
use amp_testkit::{conformance_suite, properties, strategies, NdFactory};
use proptest::prelude::*;

conformance_suite!(ndarray_f64, NdFactory, DType::F64);
conformance_suite!(ndarray_f32, NdFactory, DType::F32);

proptest! {
    #![proptest_config(amp_testkit::proptest_config())]
    /// The oracle itself agrees with the loop-by-loop transcription.
    #[test]
    fn oracle_matches_reference(case in strategies::case(5, 4)) {
        if let Err(message) = properties::oracle_matches_reference(&case) {
            prop_assert!(false, "{}", message);
        }
    }
}
