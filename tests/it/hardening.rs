//! Bugs and blind spots found by review of the first engine: each test failed on it.

use std::time::{Duration, Instant};

use multiproc::{Error, Pool};

use crate::support::{children_of_this_process, pool, pool_with_chunks, process_exists};

fn stuck_on_0_panics_on_1(x: u64) -> u64 {
    match x {
        0 => std::thread::sleep(Duration::from_secs(3600)),
        1 => panic!("item 1 fails"),
        _ => {}
    }
    x
}

#[test]
fn a_failure_is_returned_without_waiting_for_a_stuck_task() {
    let pool = pool_with_chunks(2, 1);
    let started = Instant::now();
    let err = pool.map(0..10u64, stuck_on_0_panics_on_1).unwrap_err();
    assert!(
        matches!(err, Error::TaskPanicked { item: 1, .. }),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "waited {:?}",
        started.elapsed()
    );
    // The stuck worker was stopped and replaced: the pool answers at once.
    let ok = pool.map(2..20u64, stuck_on_0_panics_on_1).unwrap();
    assert_eq!(ok, (2..20).collect::<Vec<_>>());
    assert_eq!(pool.worker_pids().unwrap().len(), 2);
}

#[test]
fn worker_pids_are_the_children_started() {
    let pool = pool(3);
    let pids = pool.worker_pids().unwrap();
    assert_eq!(pids.len(), 3);
    let me = std::process::id().to_string();
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let parent = stat.rsplit_once(") ").unwrap().1.split_whitespace().nth(1);
        assert_eq!(parent, Some(me.as_str()), "worker {pid} is not our child");
    }
}

#[test]
fn eight_workers_share_a_job() {
    let pool = pool_with_chunks(8, 3);
    let out = pool.map(0..10_000u64, |x| x ^ 0xff).unwrap();
    assert_eq!(out, (0..10_000u64).map(|x| x ^ 0xff).collect::<Vec<_>>());
    assert_eq!(pool.worker_pids().unwrap().len(), 8);
}

#[test]
fn a_context_larger_than_one_message_reaches_every_worker() {
    let pool = pool_with_chunks(2, 5);
    let table: Vec<u64> = (0..100_000).collect(); // 800 KB: travels through shared memory
    let out = pool
        .map_with(0..1_000u64, &table, |t: &Vec<u64>, x| {
            t[x as usize * 99] + 1
        })
        .unwrap();
    assert_eq!(out, (0..1_000u64).map(|x| x * 99 + 1).collect::<Vec<_>>());
}

#[test]
fn output_can_be_silenced() {
    // Workers that print to a closed output still work.
    let pool = Pool::builder()
        .workers(2)
        .inherit_output(false)
        .build()
        .unwrap();
    let out = pool
        .map(0..20u64, |x| {
            println!("item {x}");
            eprintln!("item {x}");
            x
        })
        .unwrap();
    assert_eq!(out, (0..20).collect::<Vec<_>>());
}

#[test]
fn replies_received_before_a_worker_dies_are_delivered() {
    // One worker, one item per chunk, two in flight: it answers item 0 and then
    // dies on item 1. The answer to item 0 is in hand; the loss concerns item 1.
    for _ in 0..20 {
        let pool = pool_with_chunks(1, 1);
        let err = pool
            .map(0..10u64, |x| {
                if x == 1 {
                    // SAFETY: raising a signal in our own process has no memory effects.
                    unsafe { libc::raise(libc::SIGKILL) };
                }
                x
            })
            .unwrap_err();
        match err {
            Error::WorkerExited { items, .. } => assert_eq!(items, 1..2),
            other => panic!("expected a lost worker, got {other:?}"),
        }
    }
}

#[test]
fn a_killed_pool_worker_is_not_left_behind_by_terminate() {
    let pool = pool(2);
    let pids = pool.worker_pids().unwrap();
    pool.terminate().unwrap();
    for pid in pids {
        assert!(!process_exists(pid));
    }
}

fn nested_par_map(x: u64) -> String {
    match multiproc::par_map(vec![x], |y: u64| y) {
        Ok(_) => "ran".to_owned(),
        Err(e) => e.to_string(),
    }
}

#[test]
fn par_map_inside_a_worker_is_refused_with_a_clear_error() {
    let pool = pool(1);
    let out = pool.map(vec![1u64], nested_par_map).unwrap();
    assert!(out[0].contains("inside a worker process"), "{}", out[0]);
}

static CONTEXT_DECODES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A context value that counts how often it is decoded in this process.
#[derive(serde::Serialize)]
struct Counted(Vec<u64>);

impl<'de> serde::Deserialize<'de> for Counted {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        CONTEXT_DECODES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Vec::<u64>::deserialize(d).map(Counted)
    }
}

fn decodes_so_far(c: &Counted, i: u64) -> (u32, u64, u64) {
    (
        std::process::id(),
        CONTEXT_DECODES.load(std::sync::atomic::Ordering::SeqCst),
        c.0[i as usize],
    )
}

#[test]
fn a_context_is_decoded_once_per_worker_and_job() {
    let pool = pool_with_chunks(2, 10);
    let context = Counted((0..1_000).collect());
    for call in 1..=3u64 {
        let seen = pool
            .map_with(0..1_000u64, &context, decodes_so_far)
            .unwrap();
        for (i, &(_, decodes, value)) in seen.iter().enumerate() {
            assert_eq!(value, i as u64);
            // Each worker decoded this job's context once, and once per earlier job.
            assert_eq!(decodes, call, "item {i} of call {call}");
        }
        let workers: std::collections::HashSet<u32> = seen.iter().map(|s| s.0).collect();
        assert_eq!(workers.len(), 2, "both workers took part");
    }
}

fn injected(worker: usize, send: u64) -> Pool {
    Pool::builder()
        .workers(1)
        .chunk_size(1)
        .retries(0)
        .kill_worker_before_send(worker, send)
        .inherit_output(false)
        .build()
        .unwrap()
}

#[test]
fn a_worker_that_died_idle_is_replaced_and_the_chunk_sent_again() {
    // Call 1 sends requests 0..5; the worker dies idle before request 5, the
    // first chunk of call 2.
    let pool = injected(0, 5);
    assert_eq!(pool.map(0..5u64, |x| x * 2).unwrap(), [0, 2, 4, 6, 8]);
    let first = pool.worker_pids().unwrap();
    assert_eq!(pool.map(0..5u64, |x| x + 1).unwrap(), [1, 2, 3, 4, 5]);
    let stats = pool.stats().unwrap();
    assert_eq!(stats.workers_started, 2, "{stats:?}");
    assert_eq!(
        stats.chunks_retried, 0,
        "sent again, not retried: {stats:?}"
    );
    assert_ne!(pool.worker_pids().unwrap(), first);
}

#[test]
fn a_context_is_sent_again_to_a_replaced_worker() {
    // Request 5 is call 2's context value: the worker dies idle before it.
    let pool = injected(0, 5);
    assert_eq!(pool.map(0..5u64, |x| x).unwrap(), [0, 1, 2, 3, 4]);
    let table: Vec<u64> = (100..110).collect();
    let out = pool
        .map_with(0..10u64, &table, |t: &Vec<u64>, i| t[i as usize])
        .unwrap();
    assert_eq!(out, table);
    assert_eq!(pool.stats().unwrap().workers_started, 2);
}

static STARTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Item 0 waits until the others have run ahead (or two seconds pass) and reports
/// how far they got; every other item returns 16 MiB.
fn holds_the_front(x: u64) -> String {
    use std::sync::atomic::Ordering;
    STARTED.fetch_add(1, Ordering::SeqCst);
    if x == 0 {
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until && STARTED.load(Ordering::SeqCst) < 12 {
            std::thread::yield_now();
        }
        return STARTED.load(Ordering::SeqCst).to_string();
    }
    // A string encodes as one copy, even in a debug build.
    "x".repeat(16 << 20)
}

#[test]
fn the_reorder_buffer_is_bounded_in_bytes() {
    // Inline workers share this process's counter. The window alone (16 chunks)
    // would let 12 items start while item 0 holds the front; 64 MiB of results
    // waiting for it stop dispatch after about four of 16 MiB.
    let pool = crate::support::inline_pool(2, Some(1));
    let out = pool.map(0..30u64, holds_the_front).unwrap();
    let started: u64 = out[0].parse().unwrap();
    assert!(started < 12, "{started} items started while item 0 ran");
    assert!(out[1..].iter().all(|v| v.len() == 16 << 20));
    assert_eq!(out.len(), 30);
}

#[test]
fn a_reply_that_breaks_the_protocol_fails_its_job_and_the_worker_is_replaced() {
    let pool = Pool::builder()
        .workers(1)
        .chunk_size(1)
        .corrupt_reply_from(0, 2)
        .inherit_output(false)
        .build()
        .unwrap();
    let first = pool.worker_pids().unwrap();
    let err = pool.map(0..20u64, |x| x).unwrap_err();
    match &err {
        Error::Protocol { worker, .. } => assert_eq!(*worker, 0),
        other => panic!("expected a protocol error, got {other:?}"),
    }
    assert_eq!(pool.map(0..3u64, |x| x).unwrap(), [0, 1, 2]);
    assert_ne!(
        pool.worker_pids().unwrap(),
        first,
        "the worker was replaced"
    );
}

/// Set in the test process only (workers start with it false): a
/// [`ParentRefuses`] of 19 fails to decode there.
static IN_PARENT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A result that decodes in the worker (its own check) but, for 19, not in the
/// parent.
#[derive(Debug, serde::Serialize)]
struct ParentRefuses(u64);

impl<'de> serde::Deserialize<'de> for ParentRefuses {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = u64::deserialize(d)?;
        if value == 19 && IN_PARENT.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(serde::de::Error::custom("19 does not decode in the parent"));
        }
        Ok(ParentRefuses(value))
    }
}

#[test]
fn a_result_that_does_not_decode_in_the_last_chunk_fails_the_call() {
    IN_PARENT.store(true, std::sync::atomic::Ordering::Relaxed);
    for chunk in [1, 7, 20, 21] {
        let pool = pool_with_chunks(2, chunk);
        let got = pool.map(0..20u64, ParentRefuses);
        let Err(Error::Result { items, .. }) = &got else {
            panic!("chunk size {chunk}: {got:?}");
        };
        assert_eq!(*items, 19..20, "chunk size {chunk}");
    }
}

/// Item 1 marks that it ran. Item 0 kills its worker on its first two runs (the
/// first time only once item 1 is done, so the other worker is idle then), and
/// returns on the third.
fn dies_twice_on_item_0((dir, x): (std::path::PathBuf, u64)) -> u64 {
    if x == 1 {
        std::fs::write(dir.join("one-done"), b"").unwrap();
        return x;
    }
    if std::fs::File::create_new(dir.join("first")).is_ok() {
        let guard = Instant::now();
        while !dir.join("one-done").exists() && guard.elapsed() < Duration::from_secs(20) {
            std::thread::yield_now();
        }
        std::process::abort();
    }
    if std::fs::File::create_new(dir.join("second")).is_ok() {
        std::process::abort();
    }
    x
}

#[test]
fn a_failure_to_start_workers_is_the_error_when_no_worker_is_left() {
    // The first death's replacement cannot start (injected); the other worker takes
    // the chunk and dies on it too. Nothing can run the job any more: the call must
    // fail with the cause, not `Terminated`.
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::builder()
        .workers(2)
        .chunk_size(1)
        .retries(2)
        .fail_starts_after(2)
        .inherit_output(false)
        .build()
        .unwrap();
    let items: Vec<_> = (0..2u64).map(|x| (dir.path().to_owned(), x)).collect();
    match pool.map(items, dies_twice_on_item_0) {
        Err(Error::Spawn { source, .. }) => {
            assert!(source.to_string().contains("injected"), "{source}");
        }
        other => panic!("expected the spawn failure, got {other:?}"),
    }
}

#[test]
fn a_worker_that_announces_another_pid_is_refused_and_nothing_is_left() {
    // Run alone in a helper process: other tests of this binary start and reap
    // children of their own at any moment, so only a process running nothing else
    // can say that no zombie is left.
    assert_eq!(
        crate::helpers::run_alone("refused-pid"),
        "refused and reaped"
    );
}

/// For `a_worker_that_announces_another_pid_is_refused_and_nothing_is_left`, in a
/// helper process that runs nothing else.
pub(crate) fn helper_refused_pid() {
    assert!(children_of_this_process().is_empty());
    // The worker in slot 1 says hello with this process's pid, not its own.
    let Err(err) = Pool::builder()
        .workers(3)
        .announce_parent_pid_from(1)
        .inherit_output(false)
        .build()
    else {
        panic!("the pool must refuse a worker whose pid is not the child's");
    };
    let Error::Handshake { worker, reason } = &err else {
        panic!("expected a handshake error, got {err:?}");
    };
    assert_eq!(*worker, 1, "{err}");
    let me = std::process::id();
    let prefix = format!("it announced pid {me} but the process started was ");
    let started: u32 = reason
        .strip_prefix(&prefix)
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("unexpected reason: {reason}"));
    assert_ne!(started, me);
    assert_eq!(
        err.to_string(),
        format!("worker 1 did not connect: {prefix}{started}")
    );
    // The refused child was killed and reaped, and so were the other two: no
    // process and no zombie of this pool is left.
    assert!(!process_exists(started), "worker {started} is still there");
    let left = children_of_this_process();
    assert!(left.is_empty(), "children left (pid, state): {left:?}");
    println!("refused and reaped");
}
