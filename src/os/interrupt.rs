//! Ctrl-C during a call: a SIGINT handler installed only while a call that asked for
//! it runs, chained to whatever handler the program had.
//!
//! The handler only raises a flag; the thread driving the pool sees it within its
//! 50 ms wake-up (or at once, between events), stops the call and kills its workers.
//! Outside such calls the program's own disposition of SIGINT is in place: a program
//! with a handler of its own (signal-hook, ctrlc) keeps it, and the flag is raised in
//! addition to calling that handler while a call runs.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Raised by the handler; cleared when the last guarded call ends.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The handler that was in place before ours (`sa_sigaction` value and flags), to
/// call from ours. Written only while ours is not installed.
static PREVIOUS_HANDLER: AtomicUsize = AtomicUsize::new(0);
static PREVIOUS_SIGINFO: AtomicBool = AtomicBool::new(false);

/// Calls that want Ctrl-C, and the disposition to put back after the last one.
static GUARDS: Mutex<(usize, Option<libc::sigaction>)> = Mutex::new((0, None));

/// While alive, SIGINT raises [`interrupted`] (and still reaches the program's own
/// handler, if it had one).
pub(crate) struct Guard(());

impl Guard {
    /// Installs the handler unless another guard did. `None` when it cannot be
    /// installed (the call then runs without Ctrl-C handling).
    pub(crate) fn install() -> Option<Self> {
        let mut guards = GUARDS.lock().unwrap_or_else(|p| p.into_inner());
        if guards.0 == 0 {
            let previous = install_handler()?;
            guards.1 = Some(previous);
        }
        guards.0 += 1;
        Some(Guard(()))
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut guards = GUARDS.lock().unwrap_or_else(|p| p.into_inner());
        guards.0 -= 1;
        if guards.0 == 0 {
            if let Some(previous) = guards.1.take() {
                restore_handler(&previous);
            }
            INTERRUPTED.store(false, Ordering::SeqCst);
        }
    }
}

/// Whether SIGINT arrived while a guard was alive.
pub(crate) fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

extern "C" fn on_sigint(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    INTERRUPTED.store(true, Ordering::SeqCst);
    let previous = PREVIOUS_HANDLER.load(Ordering::SeqCst);
    if previous == libc::SIG_DFL || previous == libc::SIG_IGN || previous == 0 {
        return;
    }
    if PREVIOUS_SIGINFO.load(Ordering::SeqCst) {
        // SAFETY: `previous` is the `sa_sigaction` of a handler installed with
        // SA_SIGINFO (recorded with it when ours was installed), so it has this
        // three-argument signature; we pass on the kernel's own arguments.
        let handler = unsafe {
            std::mem::transmute::<
                usize,
                extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void),
            >(previous)
        };
        handler(signal, info, context);
    } else {
        // SAFETY: `previous` is the `sa_handler` of a handler installed without
        // SA_SIGINFO, so it takes the signal number only.
        let handler = unsafe { std::mem::transmute::<usize, extern "C" fn(libc::c_int)>(previous) };
        handler(signal);
    }
}

/// Puts our handler in place; returns the disposition it replaced.
fn install_handler() -> Option<libc::sigaction> {
    // SAFETY: a zeroed `sigaction` is a valid value of this plain C struct (no
    // handler, empty mask, no flags); every field we rely on is set below.
    let mut ours: libc::sigaction = unsafe { std::mem::zeroed() };
    ours.sa_sigaction = on_sigint as *const () as usize;
    // No SA_RESTART: a wait for replies returns at once to look at the flag.
    ours.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `ours.sa_mask` is a valid, writable signal set.
    unsafe { libc::sigemptyset(&raw mut ours.sa_mask) };
    // SAFETY: as above, zeroed is a valid `sigaction` to be overwritten.
    let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call; `on_sigint` is async-signal-safe
    // (atomics, and a call to the handler the program installed for this signal).
    if unsafe { libc::sigaction(libc::SIGINT, &raw const ours, &raw mut previous) } != 0 {
        return None;
    }
    PREVIOUS_SIGINFO.store(previous.sa_flags & libc::SA_SIGINFO != 0, Ordering::SeqCst);
    PREVIOUS_HANDLER.store(previous.sa_sigaction, Ordering::SeqCst);
    Some(previous)
}

fn restore_handler(previous: &libc::sigaction) {
    // SAFETY: `previous` is the disposition `sigaction` gave us; putting it back is
    // what the program had before the guarded call.
    unsafe { libc::sigaction(libc::SIGINT, previous, std::ptr::null_mut()) };
    PREVIOUS_HANDLER.store(0, Ordering::SeqCst);
}
