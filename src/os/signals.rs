//! Signal masks: holding asynchronous signals back around calls that cannot be repeated.

/// Runs `f` with this thread's asynchronous signals held back, then restores its mask.
///
/// For the calls ipc-channel cannot repeat after `EINTR`: its one-shot `accept`
/// consumes the server even when it fails, and its `connect` gives up (leaking the
/// socket) rather than finish a connection the signal interrupted. Signals sent to
/// the process meanwhile go to other threads or wait until `f` returns. Signals a
/// fault raises (`SIGSEGV`, `SIGBUS`, `SIGFPE`, `SIGILL`) stay unblocked.
pub(crate) fn with_signals_held<R>(f: impl FnOnce() -> R) -> R {
    let mut held = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: `sigfillset` initialises the set behind the pointer it is given.
    unsafe { libc::sigfillset(held.as_mut_ptr()) };
    // SAFETY: `sigfillset` initialised the set just above (it cannot fail on a valid pointer).
    let mut held = unsafe { held.assume_init() };
    for fault in [libc::SIGSEGV, libc::SIGBUS, libc::SIGFPE, libc::SIGILL] {
        // SAFETY: `held` is an initialised set and `fault` a valid signal number.
        unsafe { libc::sigdelset(&mut held, fault) };
    }
    let mut previous = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: both pointers are valid for the call, which changes only this thread's mask.
    let blocked = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &held, previous.as_mut_ptr()) };
    if blocked != 0 {
        return f();
    }
    // SAFETY: `pthread_sigmask` succeeded, so it stored the previous mask.
    let previous = unsafe { previous.assume_init() };
    struct Restore(libc::sigset_t);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: restores a mask `pthread_sigmask` returned for this same thread.
            unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
        }
    }
    let _restore = Restore(previous);
    f()
}

/// Kills this process at once with SIGKILL, as `kill -9` from outside would: no
/// destructor, no buffered output, no exit handler runs (fault injection for tests).
pub(crate) fn kill_self() -> ! {
    // SAFETY: `raise` sends a signal to the calling thread and touches no memory of
    // ours; SIGKILL cannot be caught, so the process ends here.
    unsafe { libc::raise(libc::SIGKILL) };
    unreachable!("SIGKILL cannot be caught or ignored")
}
