//! Signals that interrupt a worker's system calls: the worker carries on.

use std::time::{Duration, Instant};

use crate::support::pool;

extern "C" fn ignore_signal(_: libc::c_int) {}

/// Installs a SIGUSR1 handler without `SA_RESTART`, as C libraries often do, so a
/// blocking system call the signal interrupts fails with `EINTR`. Returns the pid.
fn install_handler_without_restart(_: u64) -> u32 {
    // SAFETY: all-zero bytes are a valid `sigaction` (no flags, empty mask, no handler).
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = ignore_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    action.sa_flags = 0;
    // SAFETY: `action` is a valid, initialised `sigaction` with a handler that does
    // nothing, so it is async-signal-safe.
    let installed = unsafe { libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut()) };
    assert_eq!(installed, 0, "sigaction failed");
    std::process::id()
}

/// Waits until `pid` is blocked in `recvmsg`, where a worker waits for work.
fn wait_until_blocked_in_recvmsg(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let syscall = std::fs::read_to_string(format!("/proc/{pid}/syscall"))
            .unwrap_or_else(|e| panic!("worker {pid} is gone ({e})"));
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z'));
        assert!(!zombie, "worker {pid} exited");
        let number = syscall.split_whitespace().next().unwrap_or("");
        if number == libc::SYS_recvmsg.to_string() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "worker {pid} never blocked in recvmsg: {syscall}"
        );
        std::thread::yield_now();
    }
}

#[test]
fn a_signal_to_an_idle_worker_does_not_kill_it() {
    let pool = pool(1);
    let pid = pool.map([0u64], install_handler_without_restart).unwrap()[0];
    for _ in 0..5 {
        wait_until_blocked_in_recvmsg(pid);
        // SAFETY: sending a signal has no memory effects in this process.
        let sent = unsafe { libc::kill(pid as libc::pid_t, libc::SIGUSR1) };
        assert_eq!(sent, 0, "kill failed");
    }
    let again = pool.map([1u64], |_| std::process::id()).unwrap();
    assert_eq!(again, [pid], "the worker was replaced");
    assert_eq!(pool.worker_pids().unwrap(), [pid]);
}
