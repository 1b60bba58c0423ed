//! Integration tests: real worker processes (and the inline backend for comparison).

multiproc::enable_test_support!();

mod checkpoint;
mod concurrency;
mod deadlines;
mod faults;
mod hardening;
mod helpers;
mod insights;
mod jobs;
mod par_map;
mod pipe;
mod pipeline;
mod policies;
mod process;
mod queue;
mod retries;
mod shared;
mod signals;
mod soak;
mod support;
mod wordcount;
