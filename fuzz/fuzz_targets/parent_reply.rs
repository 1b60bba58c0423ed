//! The parent's side: a reply frame from a worker, opened and its payload read.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    multiproc::__private::fuzz_parent_reply(data);
});
