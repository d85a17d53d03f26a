//! The conformance suite on burn's CPU backend (flex) in f32 and f64, with
//! gradients from the test harness and from burn's own autograd.
mod common;

use amp_core::DType;
use amp_testkit::{autograd_suite, conformance_suite};
use common::BurnFactory;

conformance_suite!(burn_flex_f32, BurnFactory, DType::F32);
conformance_suite!(burn_flex_f64, BurnFactory, DType::F64);

autograd_suite!(burn_autograd_f32, BurnFactory, DType::F32);
autograd_suite!(burn_autograd_f64, BurnFactory, DType::F64);
