//! Work done when the process exits.

use std::io;

/// Registers `f` to run once when the process calls `exit` (as returning from
/// `main` does), after the handlers registered later.
pub(crate) fn at_exit(f: extern "C" fn()) -> io::Result<()> {
    // SAFETY: `atexit` stores a plain function pointer and calls it from `exit` with
    // no arguments, which is how an `extern "C" fn()` is called; `f` has no
    // environment that could be gone by then.
    let registered = unsafe { libc::atexit(f) };
    if registered == 0 {
        Ok(())
    } else {
        Err(io::Error::other("atexit refused another handler"))
    }
}
