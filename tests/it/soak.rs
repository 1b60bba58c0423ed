//! Long-running checks, run with `cargo test --release -- --ignored --test-threads=1`.
//!
//! They count this process's descriptors and children, so they must not run beside
//! other tests: the lock below serialises them, and CI runs them on one thread.

use std::sync::Mutex;

use crate::support::{children_of_this_process, open_fds, pool, splitmix64};

static ALONE: Mutex<()> = Mutex::new(());

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("procfs");
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("{field} in /proc/self/status"));
    line.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("a number of KiB")
}

/// Children of this process that have exited but were not reaped.
fn zombie_children() -> usize {
    children_of_this_process()
        .into_iter()
        .filter(|&(_, state)| state == 'Z')
        .count()
}

#[test]
#[ignore = "streams 100 million items; run in release"]
fn streamed_input_runs_in_constant_memory() {
    let _alone = ALONE.lock().unwrap_or_else(|p| p.into_inner());
    let pool = pool(2);
    let n = 100_000_000u64;
    // Reset the peak (VmHWM) to the current size, so earlier peaks do not hide ours.
    std::fs::write("/proc/self/clear_refs", "5").expect("procfs");
    let before = status_kib("VmHWM:");
    let sum: u64 = pool
        .map_reduce(
            (0..n).map(|i| i ^ 0x5555),
            splitmix64,
            || 0,
            u64::wrapping_add,
        )
        .unwrap();
    let expected = (0..n)
        .map(|i| splitmix64(i ^ 0x5555))
        .fold(0, u64::wrapping_add);
    assert_eq!(sum, expected);
    let grown = status_kib("VmHWM:").saturating_sub(before);
    // The input alone would be 800 MB if it were read ahead.
    assert!(grown < 64 * 1024, "peak memory grew by {grown} KiB");
}

#[test]
#[ignore = "starts ten thousand pools"]
fn ten_thousand_pool_starts_leak_no_descriptor_and_no_zombie() {
    let _alone = ALONE.lock().unwrap_or_else(|p| p.into_inner());
    // Warm up: the first pool starts the spawner thread and its channels.
    drop(pool(2));
    let fds = open_fds();
    for round in 0..10_000u64 {
        let pool = pool(2);
        let got: u64 = pool
            .map_reduce(0..100u64, |x| x + 1, || 0, |a, b| a + b)
            .unwrap();
        assert_eq!(got, 5_050, "round {round}");
    }
    assert_eq!(open_fds(), fds, "descriptors leaked");
    assert_eq!(zombie_children(), 0, "unreaped workers");
}

#[test]
#[ignore = "recycles workers a thousand times"]
fn replacing_crashed_workers_leaks_nothing() {
    let _alone = ALONE.lock().unwrap_or_else(|p| p.into_inner());
    let pool = pool(2);
    pool.map(0..4u64, |x| x).unwrap();
    let fds = open_fds();
    for _ in 0..1_000 {
        let err = pool.map(0..4u64, |x| {
            if x == 1 {
                std::process::abort();
            }
            x
        });
        assert!(err.is_err());
    }
    assert_eq!(pool.map(0..4u64, |x| x).unwrap(), [0, 1, 2, 3]);
    assert_eq!(open_fds(), fds, "descriptors leaked");
    assert_eq!(zombie_children(), 0, "unreaped workers");
}

#[test]
#[ignore = "streams 10 million items through a pipeline; run in release"]
fn ten_million_items_through_a_pipeline_in_bounded_memory() {
    let _alone = ALONE.lock().unwrap_or_else(|p| p.into_inner());
    let bound = 65_536u64;
    let pipeline = multiproc::Pipeline::new(0..10_000_000u64)
        .inherit_output(false)
        .stage(1, |x: u64| x ^ 0x5555)
        .stage(1, splitmix64)
        .stage_items(bound as usize);
    let stats = pipeline.stats();
    let sum = pipeline.reduce(|| 0, u64::wrapping_add).unwrap();
    let expected = (0..10_000_000u64)
        .map(|x| splitmix64(x ^ 0x5555))
        .fold(0, u64::wrapping_add);
    assert_eq!(sum, expected);
    assert!(
        stats.peak_in_flight() <= 3 * bound,
        "peak {} items in flight",
        stats.peak_in_flight()
    );
}

/// Kills its worker the first time it starts a chunk whose number ends in 37
/// (marker files remember), so 1% of the chunks are lost once.
fn dies_once_per_marked_chunk(dir: &String, x: u64) -> u64 {
    if x.is_multiple_of(1_000) && (x / 1_000) % 100 == 37 {
        let marker = std::path::Path::new(dir).join(format!("died-{x}"));
        if std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&marker)
            .is_ok()
        {
            // SAFETY: raising a signal in our own process has no memory effects.
            unsafe { libc::raise(libc::SIGKILL) };
        }
    }
    splitmix64(x)
}

#[test]
#[ignore = "a million items, 1% of chunks lost once; run in release"]
fn a_million_items_with_lost_chunks_deliver_everything_once() {
    let _alone = ALONE.lock().unwrap_or_else(|p| p.into_inner());
    let dir = std::env::temp_dir().join(format!("multiproc-soak-lost-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // One-time state of the first pool in a process (spawner threads, the codec's
    // per-thread probe channels) is not a leak: make it before counting.
    let warm = multiproc::Pool::builder().workers(2).build().unwrap();
    let context = String::new();
    let _ = warm
        .map_with(0..10u64, &context, |_: &String, x: u64| x)
        .unwrap();
    drop(warm);
    let fds_before = open_fds();
    let zombies_before = zombie_children();
    let stats = {
        let pool = multiproc::Pool::builder()
            .workers(2)
            .chunk_size(1_000)
            .inherit_output(false)
            .build()
            .unwrap();
        let context = dir.to_string_lossy().into_owned();
        let got = pool
            .map_with(0..1_000_000u64, &context, dies_once_per_marked_chunk)
            .unwrap();
        assert_eq!(got.len(), 1_000_000);
        assert!(
            got.iter()
                .enumerate()
                .all(|(i, &v)| v == splitmix64(i as u64))
        );
        pool.stats().unwrap()
    };
    let markers = std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(markers, 10, "ten chunks were lost once");
    assert!(stats.chunks_retried >= 10, "{stats:?}");
    assert!(stats.workers_started >= 12, "{stats:?}");
    eprintln!(
        "lost chunks: {markers}, chunks retried: {}, workers started: {}",
        stats.chunks_retried, stats.workers_started
    );
    assert_eq!(open_fds(), fds_before, "descriptors");
    assert_eq!(zombie_children(), zombies_before, "zombies");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn sleeps_on_0(x: u64) -> u64 {
    if x == 0 {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
    x
}

fn forks_then_dies(x: u64) -> u64 {
    if x == 0 {
        // SAFETY: the worker's only thread; the child calls only async-signal-safe
        // functions before it ends.
        if unsafe { libc::fork() } == 0 {
            // SAFETY: async-signal-safe calls in a forked child.
            unsafe {
                libc::sleep(5);
                libc::_exit(0);
            }
        }
        // SAFETY: raising a signal in our own process has no memory effects.
        unsafe { libc::raise(libc::SIGKILL) };
    }
    x
}

/// The figures of RELIABILITY.md: how long each fault takes to be reported.
#[test]
#[ignore = "measures detection times for RELIABILITY.md; run in release with --nocapture"]
fn detection_times() {
    use std::time::{Duration, Instant};
    let _alone = ALONE.lock().unwrap_or_else(|p| p.into_inner());
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let mut kill = Vec::new();
    let mut grandchild = Vec::new();
    let mut timeout = Vec::new();
    for _ in 0..7 {
        // A worker killed from outside while the parent waits for its chunk.
        let pool = multiproc::Pool::builder()
            .workers(1)
            .retries(0)
            .inherit_output(false)
            .build()
            .unwrap();
        let pid = pool.worker_pids().unwrap()[0];
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let at = Instant::now();
            // SAFETY: sending a signal has no memory effects in this process.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            at
        });
        let err = pool.map(0..1u64, sleeps_on_0).unwrap_err();
        let seen = Instant::now();
        assert!(matches!(err, multiproc::Error::WorkerExited { .. }));
        kill.push(seen - killer.join().unwrap());

        // A worker that dies while a forked child keeps its channel open.
        let pool = multiproc::Pool::builder()
            .workers(1)
            .retries(0)
            .inherit_output(false)
            .build()
            .unwrap();
        let started = Instant::now();
        let _ = pool.map(0..1u64, forks_then_dies).unwrap_err();
        grandchild.push(started.elapsed());

        // An item past a 100 ms task timeout.
        let pool = multiproc::Pool::builder()
            .workers(1)
            .task_timeout(Duration::from_millis(100))
            .inherit_output(false)
            .build()
            .unwrap();
        let started = Instant::now();
        let _ = pool.map(0..1u64, sleeps_on_0).unwrap_err();
        timeout.push(started.elapsed());
    }
    eprintln!(
        "SIGKILL of a busy worker -> error: median {:?}",
        median(kill)
    );
    eprintln!(
        "worker dies, grandchild holds its channel -> error: median {:?}",
        median(grandchild)
    );
    eprintln!("100 ms task timeout -> error: median {:?}", median(timeout));
}

/// Entries in the temp dir that a pool could leave: ipc-channel's rendezvous
/// directories and memfd-backed files have names starting with `.tmp`.
fn temp_entries() -> usize {
    std::fs::read_dir(std::env::temp_dir())
        .expect("the temp dir")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
        .count()
}

#[test]
#[ignore = "restarts workers ten thousand times; run in release"]
fn ten_thousand_worker_restarts_leak_nothing() {
    let _alone = ALONE.lock().unwrap_or_else(|p| p.into_inner());
    let warm = pool(2);
    warm.map(0..4u64, |x| x).unwrap();
    drop(warm);
    let fds = open_fds();
    let temps = temp_entries();
    {
        // One task per worker: every item starts a fresh process.
        let pool = multiproc::Pool::builder()
            .workers(2)
            .max_tasks_per_worker(1)
            .inherit_output(false)
            .build()
            .unwrap();
        let got = pool.map(0..10_000u64, splitmix64).unwrap();
        assert_eq!(got, (0..10_000u64).map(splitmix64).collect::<Vec<_>>());
        let started = pool.stats().unwrap().workers_started;
        assert!(started >= 10_000, "{started} workers started");
        eprintln!("workers started: {started}");
    }
    assert_eq!(open_fds(), fds, "descriptors leaked");
    assert_eq!(zombie_children(), 0, "unreaped workers");
    assert_eq!(temp_entries(), temps, "temporary files left");
}
