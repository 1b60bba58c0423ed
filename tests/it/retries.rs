//! Chunks lost with their worker are sent again: nothing lost, nothing twice.

use std::path::{Path, PathBuf};

use multiproc::{Error, Pool};

use crate::support::splitmix64;

/// A fresh directory for one test's markers.
fn marker_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("multiproc-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Kills its own worker the first time it sees item 500 (a marker file remembers),
/// then computes normally.
fn dies_once_on_500(dir: &String, x: u64) -> u64 {
    if x == 500 {
        let marker = Path::new(dir).join("died");
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

fn retrying_pool(retries: u32) -> Pool {
    Pool::builder()
        .workers(2)
        .chunk_size(7)
        .retries(retries)
        .inherit_output(false)
        .build()
        .expect("a pool starts")
}

#[test]
fn a_chunk_lost_once_is_retried_and_the_map_is_exact() {
    let dir = marker_dir("retry-map");
    let pool = retrying_pool(1);
    let context = dir.to_string_lossy().into_owned();
    let got = pool
        .map_with(0..10_000u64, &context, dies_once_on_500)
        .unwrap();
    let expected: Vec<u64> = (0..10_000u64).map(splitmix64).collect();
    assert_eq!(got, expected);
    assert!(dir.join("died").exists(), "the fault happened");
    let stats = pool.stats().unwrap();
    assert!(stats.chunks_retried >= 1, "{stats:?}");
    assert!(stats.workers_started >= 3, "{stats:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_fold_counts_a_retried_chunk_once() {
    let dir = marker_dir("retry-fold");
    let pool = retrying_pool(1);
    let context = dir.to_string_lossy().into_owned();
    let got = pool
        .map_reduce_with(
            0..10_000u64,
            &context,
            dies_once_on_500,
            || 0,
            u64::wrapping_add,
        )
        .unwrap();
    let expected = (0..10_000u64).map(splitmix64).fold(0, u64::wrapping_add);
    assert_eq!(got, expected);
    assert!(dir.join("died").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

fn always_dies_on_500(x: u64) -> u64 {
    if x == 500 {
        // SAFETY: raising a signal in our own process has no memory effects.
        unsafe { libc::raise(libc::SIGKILL) };
    }
    x
}

#[test]
fn a_chunk_that_keeps_killing_fails_after_its_retries() {
    let pool = retrying_pool(2);
    let err = pool.map(0..1_000u64, always_dies_on_500).unwrap_err();
    match err {
        Error::WorkerExited { items, .. } => assert!(items.contains(&500), "{items:?}"),
        other => panic!("expected a lost worker, got {other:?}"),
    }
    // The poison chunk twice, and whatever innocent chunk was queued behind it on
    // the workers it killed.
    assert!(pool.stats().unwrap().chunks_retried >= 2);
    // The pool goes on.
    assert_eq!(pool.map(0..10u64, |x| x + 1).unwrap().len(), 10);
}

#[test]
fn without_retries_a_lost_chunk_fails_its_job() {
    let pool = retrying_pool(0);
    let err = pool.map(0..1_000u64, always_dies_on_500).unwrap_err();
    assert!(matches!(err, Error::WorkerExited { .. }), "{err:?}");
    assert_eq!(pool.stats().unwrap().chunks_retried, 0);
}

#[test]
fn apply_async_handles_survive_a_lost_worker() {
    let dir = marker_dir("retry-apply");
    let pool = retrying_pool(1);
    let context = dir.to_string_lossy().into_owned();
    let handles: Vec<_> = (0..1_000u64)
        .map(|x| {
            pool.apply_async(dies_once_on_500_item, (context.clone(), x))
                .unwrap()
        })
        .collect();
    for (x, handle) in handles.into_iter().enumerate() {
        assert_eq!(handle.get().unwrap(), splitmix64(x as u64));
    }
    assert!(dir.join("died").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

fn dies_once_on_500_item((dir, x): (String, u64)) -> u64 {
    dies_once_on_500(&dir, x)
}

/// Forks a grandchild that keeps the worker's descriptors open for a few seconds,
/// then kills the worker.
fn dies_leaving_a_grandchild(x: u64) -> u64 {
    if x == 3 {
        // SAFETY: the worker runs this task on its only thread; the child calls only
        // async-signal-safe functions (`sleep`, `_exit`) before it ends.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: async-signal-safe calls in a forked child.
            unsafe {
                libc::sleep(3);
                libc::_exit(0);
            }
        }
        // SAFETY: raising a signal in our own process has no memory effects.
        unsafe { libc::raise(libc::SIGKILL) };
    }
    x
}

#[test]
fn a_worker_that_dies_while_a_grandchild_holds_its_channel_is_seen_promptly() {
    // One worker: nothing else wakes the parent while it waits.
    let pool = Pool::builder()
        .workers(1)
        .chunk_size(7)
        .retries(0)
        .inherit_output(false)
        .build()
        .unwrap();
    let started = std::time::Instant::now();
    let err = pool.map(0..10u64, dies_leaving_a_grandchild).unwrap_err();
    let seen = started.elapsed();
    assert!(matches!(err, Error::WorkerExited { .. }), "{err:?}");
    assert!(
        seen < std::time::Duration::from_secs(1),
        "seen after {seen:?}"
    );
}

fn hungry_on_3(x: u64) -> u64 {
    if x == 3 {
        // Grows until the allocator is refused.
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            hoard.push(vec![1u8; 16 << 20]);
            std::hint::black_box(&hoard);
        }
    }
    x
}

#[test]
fn a_task_that_allocates_without_bound_dies_alone_under_a_memory_limit() {
    let limit = 512 << 20;
    let pool = Pool::builder()
        .workers(2)
        .chunk_size(1)
        .memory_limit(limit)
        .inherit_output(false)
        .build()
        .unwrap();
    let err = pool.map(0..10u64, hungry_on_3).unwrap_err();
    match err {
        Error::MemoryLimit {
            items, limit: l, ..
        } => {
            assert_eq!(items, 3..4);
            assert_eq!(l, limit);
        }
        other => panic!("expected a memory limit error, got {other:?}"),
    }
    assert_eq!(pool.map(0..4u64, |x| x).unwrap(), [0, 1, 2, 3]);
}

fn segfaults_on_4321(x: u64) -> u64 {
    if x == 4_321 {
        let null = std::hint::black_box(std::ptr::null_mut::<u64>());
        // SAFETY: none: this writes through a null pointer on purpose, to crash the
        // worker the way a bug in a C library would.
        unsafe { null.write_volatile(x) };
    }
    x
}

#[test]
fn a_segfault_names_the_item_inside_a_large_chunk() {
    let pool = Pool::builder()
        .workers(2)
        .chunk_size(1_000)
        .inherit_output(false)
        .build()
        .unwrap();
    let err = pool.map(0..10_000u64, segfaults_on_4321).unwrap_err();
    match err {
        Error::WorkerExited { items, status, .. } => {
            assert_eq!(items, 4_321..4_322);
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(status.and_then(|s| s.signal()), Some(libc::SIGSEGV));
        }
        other => panic!("expected a lost worker, got {other:?}"),
    }
}

fn aborts_on_500(x: u64) -> u64 {
    if x == 500 {
        std::process::abort();
    }
    x
}

#[test]
fn an_abort_on_item_500_of_10_000_is_named() {
    let pool = retrying_pool(1);
    let err = pool.map(0..10_000u64, aborts_on_500).unwrap_err();
    match err {
        Error::WorkerExited { items, .. } => assert_eq!(items, 500..501),
        other => panic!("expected a lost worker, got {other:?}"),
    }
}
