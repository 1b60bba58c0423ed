//! Waiting without sleeping: a short poll before a blocking wait.

use std::time::{Duration, Instant};

/// How long a waiting receiver keeps polling (yielding the CPU between attempts)
/// before it blocks. On virtual machines a blocked thread whose CPU went idle takes
/// tens to hundreds of microseconds to wake (the hypervisor must wake the virtual
/// CPU), many times a round trip between awake processes; polling briefly after
/// each message keeps back-to-back requests off that path. Yielding keeps the poll
/// from taking the CPU away from runnable workers.
pub(crate) const POLL_BEFORE_BLOCKING: Duration = Duration::from_micros(POLL_US);
const POLL_US: u64 = 500;

/// Calls `attempt` until it yields something or [`POLL_BEFORE_BLOCKING`] has
/// passed; `None` means the caller should block.
pub(crate) fn poll_before_blocking<R>(mut attempt: impl FnMut() -> Option<R>) -> Option<R> {
    let deadline = Instant::now() + POLL_BEFORE_BLOCKING;
    loop {
        if let Some(result) = attempt() {
            return Some(result);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::yield_now();
    }
}
