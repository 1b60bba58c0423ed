//! Integration tests: real worker processes (and the inline backend for comparison).

multiproc::enable_test_support!();

mod faults;
mod helpers;
mod par_map;
mod signals;
mod soak;
mod support;
