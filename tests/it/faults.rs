//! Panics, crashes, bad data and shutdown: every failure is reported, nothing hangs.

use std::time::{Duration, Instant};

use multiproc::{Error, Pool};
use serde::{Deserialize, Serialize};

use crate::helpers::helper_command;
use crate::support::{inline_pool, pool, pool_with_chunks, process_exists};

fn panics_on_13(x: u64) -> u64 {
    if x == 13 {
        panic!("item {x} is unlucky");
    }
    x * 2
}

#[test]
fn task_panic_names_the_item_and_the_pool_stays_usable() {
    for chunk in [1, 7, 100] {
        let pool = pool_with_chunks(2, chunk);
        let err = pool.map(0..100u64, panics_on_13).unwrap_err();
        match &err {
            Error::TaskPanicked { item, panic, .. } => {
                assert_eq!(*item, 13);
                assert_eq!(panic.message, "item 13 is unlucky");
                assert!(panic.location.as_deref().unwrap().contains("faults.rs"));
            }
            other => panic!("expected a task panic, got {other:?}"),
        }
        assert!(err.to_string().contains("item 13"), "{err}");
        let ok = pool.map(0..10u64, panics_on_13).unwrap();
        assert_eq!(ok, (0..10u64).map(|x| x * 2).collect::<Vec<_>>());
    }
}

#[test]
fn the_lowest_failing_item_is_reported() {
    let pool = pool_with_chunks(2, 1);
    for _ in 0..3 {
        let err = pool
            .map(
                0..200u64,
                |x| if x % 50 == 13 { panic!("bad {x}") } else { x },
            )
            .unwrap_err();
        assert!(
            matches!(err, Error::TaskPanicked { item: 13, .. }),
            "{err:?}"
        );
    }
}

#[test]
fn panic_in_reduce_inside_a_worker_is_reported() {
    let pool = pool_with_chunks(2, 10);
    let err = pool
        .map_reduce(
            0..100u64,
            |x| x,
            || 0,
            |a, b| {
                if b == 57 {
                    panic!("cannot add 57")
                } else {
                    a + b
                }
            },
        )
        .unwrap_err();
    assert!(
        matches!(err, Error::TaskPanicked { item: 57, .. }),
        "{err:?}"
    );
}

#[test]
fn sigkill_of_a_worker_mid_job_is_an_error_within_seconds() {
    let pool = pool_with_chunks(2, 5);
    let started = Instant::now();
    let err = pool
        .map(0..1_000u64, |x| {
            if x == 500 {
                // SAFETY: raising a signal in our own process has no memory effects.
                unsafe { libc::raise(libc::SIGKILL) };
            }
            x
        })
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10));
    match err {
        Error::WorkerExited { items, status, .. } => {
            // The chunk is 500..505; the worker's progress word names the item.
            assert_eq!(items, 500..501);
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(status.and_then(|s| s.signal()), Some(libc::SIGKILL));
        }
        other => panic!("expected a lost worker, got {other:?}"),
    }
    // The pool replaces the dead worker.
    assert_eq!(
        pool.map(0..10u64, |x| x + 1).unwrap(),
        (1..11).collect::<Vec<_>>()
    );
    assert_eq!(pool.worker_pids().unwrap().len(), 2);
}

#[test]
fn abort_in_a_task_is_reported_with_the_chunk() {
    let pool = pool_with_chunks(2, 1);
    let err = pool
        .map(0..50u64, |x| {
            if x == 13 {
                std::process::abort();
            }
            x
        })
        .unwrap_err();
    match err {
        Error::WorkerExited { items, status, .. } => {
            assert_eq!(items, 13..14);
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(status.and_then(|s| s.signal()), Some(libc::SIGABRT));
        }
        other => panic!("expected a lost worker, got {other:?}"),
    }
    let sum: u64 = pool
        .map_reduce(0..50u64, |x| x, || 0, |a, b| a + b)
        .unwrap();
    assert_eq!(sum, 1225);
}

#[test]
fn a_worker_killed_between_calls_is_replaced() {
    let pool = pool(2);
    let pids = pool.worker_pids().unwrap();
    assert_eq!(pids.len(), 2);
    sigkill(pids[0]);
    // Wait until the kill has taken effect: the worker is a zombie until reaped.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !is_zombie_or_gone(pids[0]) {
        assert!(Instant::now() < deadline, "SIGKILL did not take effect");
        std::thread::yield_now();
    }
    // The next call finds it gone and replaces it before sending it anything.
    let got = pool.map(0..1_000u64, |x| x ^ 1).unwrap();
    assert_eq!(got, (0..1_000u64).map(|x| x ^ 1).collect::<Vec<_>>());
    let again = pool.map(0..1_000u64, |x| x ^ 1).unwrap();
    assert_eq!(again, got);
    assert!(!pool.worker_pids().unwrap().contains(&pids[0]));
}

fn sigkill(pid: u32) {
    let pid = libc::pid_t::try_from(pid).expect("a pid fits pid_t");
    // SAFETY: sending a signal has no memory effects in this process.
    let sent = unsafe { libc::kill(pid, libc::SIGKILL) };
    assert_eq!(sent, 0, "kill({pid}) failed");
}

fn is_zombie_or_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
        Err(_) => true,
    }
}

#[test]
fn no_worker_outlives_its_pool() {
    let pool = pool(2);
    let pids = pool.worker_pids().unwrap();
    assert_eq!(pids.len(), 2);
    assert!(pids.iter().all(|&p| process_exists(p)));
    assert_eq!(pool.map(0..10u64, |x| x).unwrap().len(), 10);
    drop(pool);
    for pid in pids {
        assert!(!process_exists(pid), "worker {pid} still exists after drop");
    }
}

#[test]
fn dropping_a_pool_after_a_failure_reaps_everything() {
    let pool = pool_with_chunks(2, 1);
    let pids = pool.worker_pids().unwrap();
    assert!(pool.map(0..20u64, panics_on_13).is_err());
    drop(pool);
    for pid in pids {
        assert!(!process_exists(pid), "worker {pid} still exists after drop");
    }
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Sparse {
    id: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<String>,
}

#[test]
fn items_that_do_not_round_trip_are_rejected_before_dispatch() {
    let pool = pool(2);
    let items = vec![Sparse { id: 1, note: None }];
    let err = pool.map(items, |s: Sparse| s.id).unwrap_err();
    assert!(
        matches!(
            err,
            Error::DecodeItem {
                item: 0,
                worker: None,
                ..
            }
        ),
        "{err:?}"
    );
}

#[derive(Debug)]
struct FailsToSerialize(u64);

impl Serialize for FailsToSerialize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0 == 7 {
            Err(serde::ser::Error::custom("seven cannot be written"))
        } else {
            s.serialize_u64(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for FailsToSerialize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        u64::deserialize(d).map(FailsToSerialize)
    }
}

#[test]
fn an_item_that_fails_to_encode_is_named() {
    let pool = pool_with_chunks(2, 3);
    let err = pool
        .map((0..20).map(FailsToSerialize), |f: FailsToSerialize| f.0)
        .unwrap_err();
    assert!(matches!(err, Error::EncodeItem { item: 7, .. }), "{err:?}");
    assert!(err.to_string().contains("item 7"));
    assert_eq!(pool.map(0..3u64, |x| x).unwrap(), [0, 1, 2]);
}

#[test]
fn a_result_that_fails_to_encode_is_named() {
    let pool = pool_with_chunks(2, 4);
    let err = pool.map(0..20u64, FailsToSerialize).unwrap_err();
    match err {
        Error::Result { items, .. } => assert_eq!(items, 7..8),
        other => panic!("expected a result error, got {other:?}"),
    }
}

#[test]
fn faults_on_the_inline_backend_are_reported_the_same_way() {
    let pool = inline_pool(2, Some(3));
    let err = pool.map(0..100u64, panics_on_13).unwrap_err();
    assert!(
        matches!(err, Error::TaskPanicked { item: 13, .. }),
        "{err:?}"
    );
    assert_eq!(pool.map(0..5u64, panics_on_13).unwrap(), [0, 2, 4, 6, 8]);
}

#[test]
fn a_panic_in_the_callers_reduce_leaves_the_pool_usable() {
    let pool = pool_with_chunks(2, 1);
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        pool.map_reduce(
            0..100u64,
            |x| x,
            || 0,
            |a, b| {
                if a > 1_000 && b == 50 {
                    panic!("parent-side reduce")
                } else {
                    a + b
                }
            },
        )
    }));
    // Workers fold each one-item chunk into 0, so only the parent's reduce sees a
    // large accumulator: the panic happens there, in this thread, mid-call.
    assert!(caught.is_err());
    let sum: u64 = pool
        .map_reduce(0..100u64, |x| x, || 0, |a, b| a + b)
        .unwrap();
    assert_eq!(sum, 4950);
}

#[test]
fn zero_workers_is_a_configuration_error() {
    let err = Pool::builder().workers(0).build().unwrap_err();
    assert!(matches!(err, Error::Config(_)));
    let err = Pool::builder()
        .workers(1)
        .chunk_size(0)
        .build()
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)));
}

#[test]
fn workers_exit_when_their_parent_is_killed() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    // A helper process (this test binary in the `orphan` role) starts a pool,
    // reports its workers, and has both run a task that never returns, so they are
    // not reading their channels; we kill the helper with SIGKILL.
    let mut helper = helper_command("orphan")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Hang guard: if the helper stalls, kill it so that its stdout closes and the
    // reads below fail instead of waiting forever.
    let (done, watchdog) = std::sync::mpsc::channel::<()>();
    let helper_pid = helper.id();
    let guard = std::thread::spawn(move || {
        if watchdog.recv_timeout(Duration::from_secs(60)).is_err() {
            sigkill(helper_pid);
        }
    });
    let mut lines = BufReader::new(helper.stdout.take().unwrap()).lines();
    let pids: Vec<u32> = lines
        .by_ref()
        .map(|l| l.unwrap())
        .find_map(|l| l.strip_prefix("worker pids:").map(str::to_owned))
        .expect("the helper reports its workers")
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 2);
    let busy = lines
        .by_ref()
        .map(|l| l.unwrap())
        .filter(|l| l == "stuck in a task");
    assert_eq!(busy.take(2).count(), 2, "both workers report being stuck");
    let _ = done.send(());
    guard.join().unwrap();
    helper.kill().unwrap();
    helper.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    for pid in pids {
        while !is_zombie_or_gone(pid) {
            assert!(
                Instant::now() < deadline,
                "worker {pid} outlived its parent"
            );
            std::thread::yield_now();
        }
    }
}

#[test]
fn calling_back_into_the_same_pool_is_an_error_not_a_deadlock() {
    let pool = pool(2);
    let pool_ref = &pool;
    // The input iterator runs inside the call; asking the same pool again from it
    // would wait for itself.
    let inner_results = std::cell::RefCell::new(Vec::new());
    let outer = pool.map(
        (0..3u64).inspect(|_| {
            inner_results
                .borrow_mut()
                .push(pool_ref.map(0..2u64, |x| x))
        }),
        |x| x,
    );
    assert_eq!(outer.unwrap(), [0, 1, 2]);
    for inner in inner_results.into_inner() {
        assert!(matches!(inner, Err(Error::NestedCall)), "{inner:?}");
    }
    assert!(matches!(pool.worker_pids(), Ok(pids) if pids.len() == 2));
    // A different pool may be used from inside a call.
    let other = inline_pool(1, None);
    let nested = pool
        .map(
            (0..3u64).map(|x| other.map([x], |y| y * 10).unwrap()[0]),
            |x| x + 1,
        )
        .unwrap();
    assert_eq!(nested, [1, 11, 21]);
}

#[test]
fn a_program_started_by_a_task_is_not_taken_for_a_worker() {
    // The task, in a worker process, runs this test binary again as an ordinary
    // program that uses multiproc itself; it inherits the worker's environment.
    let pool = pool_with_chunks(1, 1);
    let outputs = pool
        .map([3u64], |n| {
            let out = helper_command(&format!("nested:{n}"))
                .stdin(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
        .unwrap();
    assert!(
        outputs[0].contains("nested sum: 3"),
        "the nested program printed: {}",
        outputs[0]
    );
}

#[derive(Debug, Serialize)]
struct PanicsWhenDecoded(u64);

impl<'de> Deserialize<'de> for PanicsWhenDecoded {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = u64::deserialize(d)?;
        assert_ne!(value, 13, "cannot decode 13");
        Ok(PanicsWhenDecoded(value))
    }
}

#[test]
fn a_panic_while_decoding_an_item_in_a_worker_names_the_item() {
    let pool = pool_with_chunks(2, 4);
    let err = pool
        .map((0..20).map(PanicsWhenDecoded), |p: PanicsWhenDecoded| p.0)
        .unwrap_err();
    match &err {
        Error::TaskPanicked { item, panic, .. } => {
            assert_eq!(*item, 13);
            assert!(panic.message.contains("cannot decode 13"), "{panic}");
        }
        other => panic!("expected a task panic, got {other:?}"),
    }
    // The worker survived: it caught the panic.
    assert_eq!(pool.map(0..3u64, |x| x).unwrap(), [0, 1, 2]);
}

#[test]
fn results_that_do_not_round_trip_are_rejected() {
    let pool = pool(2);
    let err = pool
        .map(0..5u64, |id| Sparse { id, note: None })
        .unwrap_err();
    match err {
        Error::Result { items, .. } => assert_eq!(items, 0..1),
        other => panic!("expected a result error, got {other:?}"),
    }
    let err = pool
        .map_with(0..5u64, &Sparse { id: 1, note: None }, |s: &Sparse, x| {
            s.id + x
        })
        .unwrap_err();
    assert!(
        matches!(err, Error::Context { worker: None, .. }),
        "{err:?}"
    );
}

#[derive(Debug, Serialize, Deserialize)]
struct OnlySkipped {
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<u8>,
}

#[test]
fn a_result_that_encodes_to_nothing_is_still_checked() {
    let pool = pool(2);
    let err = pool
        .map(0..3u64, |_| OnlySkipped { note: None })
        .unwrap_err();
    assert!(matches!(err, Error::Result { .. }), "{err:?}");
    // Unit results encode to nothing too, and are fine.
    let units: Vec<()> = pool.map(0..3u64, |_| ()).unwrap();
    assert_eq!(units.len(), 3);
    let unit: () = pool
        .map_reduce(0..3u64, |_| (), || (), |(), ()| ())
        .unwrap();
    assert_eq!(unit, ());
}

#[derive(Serialize, Deserialize)]
struct CarriesAChannel {
    id: u64,
    reply_to: Option<ipc_channel::ipc::IpcSender<u64>>,
}

#[test]
fn a_channel_inside_an_item_is_refused_and_named() {
    let pool = pool_with_chunks(2, 4);
    let (tx, _rx) = ipc_channel::ipc::channel::<u64>().unwrap();
    let err = pool
        .map(
            vec![CarriesAChannel {
                id: 0,
                reply_to: Some(tx.clone()),
            }],
            |c: CarriesAChannel| c.id,
        )
        .unwrap_err();
    assert!(matches!(err, Error::EncodeItem { item: 0, .. }), "{err:?}");
    let source = std::error::Error::source(&err).expect("the codec's reason");
    assert!(
        source
            .to_string()
            .contains("channels and descriptors cannot travel inside items"),
        "{source}"
    );
    // A channel in a later item of a chunk is named as well.
    let items = (0..10u64).map(|id| CarriesAChannel {
        id,
        reply_to: (id == 6).then(|| tx.clone()),
    });
    let err = pool.map(items, |c: CarriesAChannel| c.id).unwrap_err();
    assert!(matches!(err, Error::EncodeItem { item: 6, .. }), "{err:?}");
    // Items without one go through, and the pool is still usable.
    let items = (0..10u64).map(|id| CarriesAChannel { id, reply_to: None });
    let ids = pool.map(items, |c: CarriesAChannel| c.id).unwrap();
    assert_eq!(ids, (0..10).collect::<Vec<_>>());
    assert_eq!(pool.map(0..3u64, |x| x + 1).unwrap(), [1, 2, 3]);
}
