//! The worker's side: request frames fed to its receive loop.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    multiproc::__private::fuzz_worker_request(data);
});
