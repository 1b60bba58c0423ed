//! `Process`: one task in one child; its value, its panic, its death, its end.

use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use multiproc::{Error, Process};

fn square(x: u64) -> u64 {
    x * x
}

fn pid_of_self(_: ()) -> u32 {
    std::process::id()
}

fn panics(message: String) -> u64 {
    panic!("{message}")
}

fn killed_by(signal: i32) -> u64 {
    // SAFETY: raising a signal in this process has no memory effects.
    unsafe {
        libc::raise(signal);
    }
    0
}

fn stuck(_: ()) -> u64 {
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn is_zombie_or_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

fn is_gone(pid: u32) -> bool {
    !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn process_returns_its_value() {
    let child = Process::spawn(12u64, square).unwrap();
    assert_ne!(child.pid(), std::process::id());
    assert_eq!(child.join().unwrap(), 144);
}

#[test]
fn process_argument_may_hold_the_only_handle_of_a_shared_input() {
    // The child opens the slice through the parent's descriptor; the argument is
    // its only handle, so the parent must keep it alive until the child answers.
    let data = multiproc::SharedSlice::from_iter(0..100_000u64).unwrap();
    let child =
        Process::spawn(data, |d: multiproc::SharedSlice<u64>| d.iter().sum::<u64>()).unwrap();
    assert_eq!(child.join().unwrap(), (0..100_000u64).sum::<u64>());
}

#[test]
fn process_runs_in_another_process_and_is_reaped_by_join() {
    let child = Process::spawn((), pid_of_self).unwrap();
    let pid = child.pid();
    assert_eq!(child.join().unwrap(), pid);
    assert!(is_gone(pid), "no zombie is left after join");
}

#[test]
fn process_exit_status_is_success_after_a_value() {
    let child = Process::spawn(3u64, square).unwrap();
    assert_eq!(child.join_timeout(Duration::from_secs(30)).unwrap(), 9);
    assert!(!child.is_alive());
    assert!(child.exit_status().unwrap().success());
    assert!(matches!(child.join(), Err(Error::ResultTaken)));
}

#[test]
fn process_panic_is_reported_with_its_message_and_name() {
    let child = Process::builder()
        .name("downloader")
        .inherit_output(false)
        .spawn("disk full".to_string(), panics)
        .unwrap();
    let err = child.join().unwrap_err();
    assert!(matches!(err, Error::ProcessPanicked { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("disk full"), "{text}");
    assert!(text.contains("downloader"), "{text}");
}

#[test]
fn process_killed_by_a_signal_names_the_signal() {
    let child = Process::spawn(libc::SIGKILL, killed_by).unwrap();
    let pid = child.pid();
    let err = child.join().unwrap_err();
    match &err {
        Error::ProcessExited { status, .. } => {
            assert_eq!(status.and_then(|s| s.signal()), Some(libc::SIGKILL));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(err.to_string().contains("SIGKILL"), "{err}");
    assert!(is_gone(pid));
}

#[test]
fn process_terminate_stops_a_stuck_child_within_a_second() {
    let child = Process::builder().name("stuck").spawn((), stuck).unwrap();
    assert!(child.is_alive());
    assert!(matches!(
        child.join_timeout(Duration::from_millis(1)),
        Err(Error::Timeout(_))
    ));
    let started = Instant::now();
    child.terminate().unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(!child.is_alive());
    assert_eq!(
        child.exit_status().and_then(|s| s.signal()),
        Some(libc::SIGTERM)
    );
    let pid = child.pid();
    let err = child.join().unwrap_err();
    assert!(err.to_string().contains("stuck"), "{err}");
    assert!(err.to_string().contains("SIGTERM"), "{err}");
    assert!(is_zombie_or_gone(pid) && is_gone(pid));
}

#[test]
fn processes_run_side_by_side() {
    let children: Vec<_> = (0..4u64)
        .map(|x| Process::spawn(x, square).unwrap())
        .collect();
    let values: Vec<u64> = children.into_iter().map(|c| c.join().unwrap()).collect();
    assert_eq!(values, [0, 1, 4, 9]);
}
