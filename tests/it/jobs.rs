//! The pool as a job server: apply_async, callbacks, map_async, imap, lifecycle,
//! initializers and worker recycling.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use multiproc::{Error, Pool};

use crate::support::{children_of_this_process, open_fds, pool, process_exists};

fn square(x: u64) -> u64 {
    x * x
}

#[test]
fn a_thousand_handles_fetched_in_reverse_order() {
    let pool = pool(3);
    let handles: Vec<_> = (0..1_000u64)
        .map(|x| pool.apply_async(square, x).expect("submitted"))
        .collect();
    for (x, handle) in handles.into_iter().enumerate().rev() {
        assert_eq!(handle.get().expect("a result"), (x as u64) * (x as u64));
    }
}

#[test]
fn apply_blocks_for_one_result() {
    let pool = pool(2);
    assert_eq!(pool.apply(square, 12).unwrap(), 144);
    assert_eq!(pool.apply(|s: String| s.len(), "four".into()).unwrap(), 4);
}

fn slow(x: u64) -> u64 {
    // The task is slow on purpose; the test waits for its result, not for time.
    std::thread::sleep(Duration::from_millis(300));
    x + 1
}

#[test]
fn get_timeout_errs_and_the_result_is_kept_for_a_later_get() {
    let pool = pool(2);
    let handle = pool.apply_async(slow, 41).unwrap();
    let err = handle.get_timeout(Duration::from_millis(5)).unwrap_err();
    assert!(matches!(err, Error::Timeout(_)), "{err:?}");
    assert!(!handle.ready());
    handle.wait();
    assert!(handle.ready());
    assert_eq!(handle.get().unwrap(), 42);
}

#[test]
fn a_map_runs_while_async_tasks_are_pending() {
    let pool = pool(2);
    let pending: Vec<_> = (0..200u64)
        .map(|x| pool.apply_async(square, x).unwrap())
        .collect();
    let mapped = pool.map(0..1_000u64, |x| x + 1).unwrap();
    assert_eq!(mapped, (1..1_001).collect::<Vec<_>>());
    let results: Vec<u64> = pending.into_iter().map(|h| h.get().unwrap()).collect();
    assert_eq!(results, (0..200u64).map(square).collect::<Vec<_>>());
}

fn panics_on_13(x: u64) -> u64 {
    if x == 13 {
        panic!("unlucky {x}");
    }
    x
}

#[test]
fn a_panicking_task_fails_its_own_handle_only() {
    let pool = pool(2);
    let handles: Vec<_> = (0..40u64)
        .map(|x| pool.apply_async(panics_on_13, x).unwrap())
        .collect();
    for (x, handle) in handles.into_iter().enumerate() {
        match handle.get() {
            Ok(v) => assert_eq!(v, x as u64),
            Err(Error::TaskPanicked { item, panic, .. }) => {
                assert_eq!(x, 13);
                assert_eq!(item, 0, "a handle has one item");
                assert_eq!(panic.message, "unlucky 13");
            }
            Err(other) => panic!("item {x}: unexpected {other:?}"),
        }
    }
}

#[test]
fn callbacks_run_in_the_parent_in_completion_order() {
    // One worker answers in submission order, so completion order is known.
    let pool = pool(1);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut handles = Vec::new();
    for x in 0..20u64 {
        let seen = Arc::clone(&seen);
        let handle = pool
            .apply_async_with_callback(
                panics_on_13,
                x,
                move |v: &u64| seen.lock().unwrap().push((*v, std::process::id())),
                |_| {},
            )
            .unwrap();
        handles.push(handle);
    }
    pool.close();
    pool.join().unwrap();
    let seen = seen.lock().unwrap();
    let values: Vec<u64> = seen.iter().map(|&(v, _)| v).collect();
    let expected: Vec<u64> = (0..20).filter(|&x| x != 13).collect();
    assert_eq!(values, expected);
    assert!(seen.iter().all(|&(_, pid)| pid == std::process::id()));
    assert!(handles.iter().all(|h| h.ready()));
}

#[test]
fn a_panicking_callback_becomes_that_handles_error_and_later_tasks_complete() {
    let pool = pool(2);
    let errors = Arc::new(Mutex::new(0));
    let mut handles = Vec::new();
    for x in 0..30u64 {
        let errors = Arc::clone(&errors);
        let handle = pool
            .apply_async_with_callback(
                square,
                x,
                move |v: &u64| {
                    if *v == 49 {
                        panic!("callback refuses {v}");
                    }
                },
                move |_| *errors.lock().unwrap() += 1,
            )
            .unwrap();
        handles.push(handle);
    }
    for (x, handle) in handles.into_iter().enumerate() {
        match handle.get() {
            Err(Error::CallbackPanicked(panic)) => {
                assert_eq!(x, 7);
                assert_eq!(panic.message, "callback refuses 49");
            }
            Ok(v) => assert_eq!(v, (x * x) as u64),
            Err(other) => panic!("item {x}: unexpected {other:?}"),
        }
    }
    assert_eq!(*errors.lock().unwrap(), 0);
    // The pool goes on.
    assert_eq!(pool.apply(square, 3).unwrap(), 9);
}

#[test]
fn error_callbacks_get_the_error() {
    let pool = pool(2);
    let got = Arc::new(Mutex::new(None));
    let sink = Arc::clone(&got);
    let handle = pool
        .apply_async_with_callback(
            panics_on_13,
            13,
            |_: &u64| panic!("not called"),
            move |e: &Error| *sink.lock().unwrap() = Some(e.to_string()),
        )
        .unwrap();
    assert!(matches!(handle.get(), Err(Error::TaskPanicked { .. })));
    let message = got.lock().unwrap().clone().expect("the error callback ran");
    assert!(message.contains("unlucky 13"), "{message}");
}

#[test]
fn map_async_delivers_the_whole_map_to_one_handle_and_callback() {
    let pool = pool(2);
    let total = Arc::new(Mutex::new(0u64));
    let sink = Arc::clone(&total);
    let handle = pool
        .map_async_with_callback(
            0..10_000u64,
            square,
            move |v: &Vec<u64>| *sink.lock().unwrap() = v.iter().sum(),
            |_| {},
        )
        .unwrap();
    let other = pool.map_async(vec![1u64, 2, 3], |x| x * 10).unwrap();
    let results = handle.get().unwrap();
    assert_eq!(results, (0..10_000u64).map(square).collect::<Vec<_>>());
    assert_eq!(*total.lock().unwrap(), results.iter().sum::<u64>());
    assert_eq!(other.get().unwrap(), [10, 20, 30]);
    let failed = pool.map_async(0..100u64, panics_on_13).unwrap();
    assert!(matches!(
        failed.get(),
        Err(Error::TaskPanicked { item: 13, .. })
    ));
}

#[test]
fn imap_over_an_endless_input_takes_five() {
    let pool = pool(2);
    let first: Vec<u64> = pool
        .imap(0..u64::MAX, square)
        .unwrap()
        .take(5)
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(first, [0, 1, 4, 9, 16]);
}

#[test]
fn imap_reads_its_input_a_bounded_window_ahead() {
    let pool = pool(2);
    let pulled = std::cell::Cell::new(0u64);
    let items = (0..u64::MAX).inspect(|_| pulled.set(pulled.get() + 1));
    let mut results = pool.imap(items, |x: u64| x).unwrap();
    for expected in 0..1_000u64 {
        assert_eq!(results.next().unwrap().unwrap(), expected);
    }
    // A window of 16 chunks (2 workers) of at most 192 KiB of items each: at most
    // about 400 000 items of 8 bytes ahead of the thousand taken.
    assert!(
        pulled.get() < 1_000 + 16 * 24_576 + 24_576,
        "read {} items",
        pulled.get()
    );
}

#[test]
fn imap_dropped_early_leaves_the_pool_usable() {
    let pool = pool(2);
    {
        let mut results = pool.imap(0..1_000_000u64, square).unwrap();
        assert_eq!(results.next().unwrap().unwrap(), 0);
        assert_eq!(results.next().unwrap().unwrap(), 1);
    }
    assert_eq!(
        pool.map(0..100u64, |x| x + 1).unwrap(),
        (1..101).collect::<Vec<_>>()
    );
}

#[test]
fn imap_unordered_gives_every_index_once() {
    let pool = pool(3);
    let mut seen = vec![false; 5_000];
    for result in pool.imap_unordered(0..5_000u64, square).unwrap() {
        let (index, value) = result.unwrap();
        assert!(!seen[index], "index {index} twice");
        seen[index] = true;
        assert_eq!(value, square(index as u64));
    }
    assert!(seen.iter().all(|&s| s));
}

#[test]
fn imap_reports_a_failure_and_ends() {
    let pool = pool(2);
    let results: Vec<_> = pool.imap(0..100u64, panics_on_13).unwrap().collect();
    let last = results.last().unwrap();
    assert!(
        matches!(last, Err(Error::TaskPanicked { item: 13, .. })),
        "{last:?}"
    );
    let good: Vec<u64> = results[..results.len() - 1]
        .iter()
        .map(|r| *r.as_ref().unwrap())
        .collect();
    assert_eq!(good, (0..good.len() as u64).collect::<Vec<_>>());
}

#[test]
fn starmap_is_a_map_over_tuples() {
    let pool = pool(2);
    let pairs: Vec<(u64, String)> = (0..10).map(|i| (i, "x".repeat(i as usize))).collect();
    let out = pool
        .map(pairs, |(n, s): (u64, String)| n + s.len() as u64)
        .unwrap();
    assert_eq!(out, (0..10).map(|i| 2 * i).collect::<Vec<u64>>());
}

#[test]
fn close_refuses_new_work_and_join_waits_for_the_rest() {
    let pool = pool(2);
    let handles: Vec<_> = (0..50u64)
        .map(|x| pool.apply_async(slow_small, x).unwrap())
        .collect();
    assert!(matches!(pool.join(), Err(Error::NotClosed)));
    pool.close();
    assert!(matches!(
        pool.apply_async(square, 1),
        Err(Error::PoolClosed)
    ));
    assert!(matches!(pool.map(0..3u64, square), Err(Error::PoolClosed)));
    pool.join().unwrap();
    assert!(handles.iter().all(|h| h.ready()));
    let sum: u64 = handles.into_iter().map(|h| h.get().unwrap()).sum();
    assert_eq!(sum, (0..50u64).map(|x| x + 1).sum::<u64>());
    assert!(
        pool.worker_pids().unwrap().is_empty(),
        "join stops the workers"
    );
}

fn slow_small(x: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(2));
    x + 1
}

fn stuck(x: u64) -> u64 {
    std::thread::sleep(Duration::from_secs(3600));
    x
}

#[test]
fn terminate_with_pending_work_returns_promptly_and_leaves_no_child() {
    let pool = pool(2);
    let pids = pool.worker_pids().unwrap();
    let handles: Vec<_> = (0..10u64)
        .map(|x| pool.apply_async(stuck, x).unwrap())
        .collect();
    let started = Instant::now();
    pool.terminate().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    for handle in handles {
        assert!(matches!(handle.get(), Err(Error::Terminated)));
    }
    for pid in pids {
        assert!(!process_exists(pid), "worker {pid} survived terminate");
    }
    assert!(matches!(
        pool.apply_async(square, 1),
        Err(Error::Terminated)
    ));
}

#[test]
fn dropping_a_pool_with_pending_work_fails_the_handles() {
    let pool = pool(2);
    let pids = pool.worker_pids().unwrap();
    let handle = pool.apply_async(stuck, 1).unwrap();
    let started = Instant::now();
    drop(pool);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(matches!(handle.get(), Err(Error::Terminated)));
    for pid in pids {
        assert!(!process_exists(pid));
    }
}

#[test]
fn recycled_workers_give_exact_results_and_leak_nothing() {
    // Run alone in a helper process: other tests of this binary open descriptors
    // and start and reap children at any moment, so only a process running nothing
    // else can say that nothing of this pool is left.
    assert_eq!(crate::helpers::run_alone("recycled"), "nothing left");
}

/// For `recycled_workers_give_exact_results_and_leak_nothing`, in a helper process
/// that runs nothing else.
pub(crate) fn helper_recycled() {
    let fds_before = open_fds();
    let children_before = children_of_this_process();
    {
        let pool = Pool::builder()
            .workers(2)
            .max_tasks_per_worker(10)
            .inherit_output(false)
            .build()
            .unwrap();
        let handles: Vec<_> = (0..1_000u64)
            .map(|x| pool.apply_async(square, x).unwrap())
            .collect();
        let results: Vec<u64> = handles.into_iter().map(|h| h.get().unwrap()).collect();
        assert_eq!(results, (0..1_000u64).map(square).collect::<Vec<_>>());
        assert!(
            pool.stats().unwrap().workers_started >= 100,
            "{} workers started",
            pool.stats().unwrap().workers_started
        );
        let mapped = pool.map(0..1_000u64, |x| x + 1).unwrap();
        assert_eq!(mapped, (1..1_001).collect::<Vec<_>>());
        assert!(pool.stats().unwrap().workers_started >= 200);
    }
    // Every descriptor and child this pool opened is gone. A worker given its
    // last task is reaped by a background thread once it exits, which holds its
    // channel until then: wait for that, within a deadline, and say what is left.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while (open_fds() != fds_before || children_of_this_process() != children_before)
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let links: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.display().to_string())
        .collect();
    assert_eq!(open_fds(), fds_before, "descriptors left: {links:?}");
    let left = children_of_this_process();
    assert_eq!(
        left, children_before,
        "children (pid, state) before and after"
    );
    println!("nothing left");
}

fn count_calls(counter: &mut u64, x: u64) -> (u32, u64, u64) {
    *counter += 1;
    (std::process::id(), *counter, x)
}

#[test]
fn initializer_state_is_seen_by_tasks() {
    let pool = Pool::builder()
        .workers(2)
        .chunk_size(1)
        .initializer(|start: u64| start, 1_000)
        .inherit_output(false)
        .build()
        .unwrap();
    let seen = pool.map_with_state(0..200u64, count_calls).unwrap();
    let mut per_worker: std::collections::HashMap<u32, Vec<u64>> = Default::default();
    for (i, &(pid, count, x)) in seen.iter().enumerate() {
        assert_eq!(x, i as u64);
        per_worker.entry(pid).or_default().push(count);
    }
    // Each worker counts its own calls from the initializer's start, one by one.
    for counts in per_worker.values() {
        let expected: Vec<u64> = (1_001..1_001 + counts.len() as u64).collect();
        assert_eq!(counts, &expected);
    }
    let wrong = pool.map_with_state(0..3u64, |s: &mut String, x: u64| s.len() as u64 + x);
    assert!(matches!(wrong, Err(Error::Config(_))), "{wrong:?}");
}

#[test]
fn a_failing_initializer_fails_the_build() {
    let err = Pool::builder()
        .workers(2)
        .initializer(
            |x: u64| -> u64 {
                if x > 0 {
                    panic!("cannot start with {x}");
                }
                x
            },
            7,
        )
        .inherit_output(false)
        .build()
        .unwrap_err();
    match err {
        Error::Initializer { reason, .. } => {
            assert!(reason.contains("cannot start with 7"), "{reason}")
        }
        other => panic!("expected an initializer error, got {other:?}"),
    }
}

#[test]
fn jobs_from_several_threads_share_the_workers() {
    let pool = pool(2);
    std::thread::scope(|scope| {
        for t in 0..4u64 {
            let pool = &pool;
            scope.spawn(move || {
                for round in 0..5u64 {
                    let base = t * 1_000 + round;
                    let out = pool.map(base..base + 300, |x| x * 2).unwrap();
                    assert_eq!(out, (base..base + 300).map(|x| x * 2).collect::<Vec<_>>());
                    let one = pool.apply_async(square, base).unwrap();
                    assert_eq!(one.get().unwrap(), base * base);
                }
            });
        }
    });
}

#[test]
fn the_inline_backend_serves_async_work_too() {
    let pool = crate::support::inline_pool(2, None);
    let handles: Vec<_> = (0..100u64)
        .map(|x| pool.apply_async(square, x).unwrap())
        .collect();
    let imapped: Vec<u64> = pool
        .imap(0..100u64, square)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let results: Vec<u64> = handles.into_iter().map(|h| h.get().unwrap()).collect();
    assert_eq!(results, imapped);
}

fn announce_then_hang(q: multiproc::Queue<u8>) -> u8 {
    q.put(1).expect("announced");
    loop {
        std::hint::spin_loop();
    }
}

#[test]
fn a_failed_job_does_not_keep_the_handle_queued_behind_its_stuck_item() {
    // One worker runs the map's only item, which hangs; an apply_async submitted
    // meanwhile is queued behind it on the same worker (it has credit for two
    // chunks). The map ends at its call timeout: the stuck worker must be stopped
    // and the apply sent to its replacement, not left waiting forever.
    let pool = Pool::builder()
        .workers(1)
        .call_timeout(Duration::from_millis(500))
        .inherit_output(false)
        .build()
        .unwrap();
    let started = multiproc::Queue::<u8>::unbounded();
    let handle = std::thread::scope(|scope| {
        let submitter = scope.spawn(|| {
            started.get().expect("the stuck item started");
            pool.apply_async(square, 9).expect("submitted")
        });
        let err = pool
            .map(vec![started.clone()], announce_then_hang)
            .unwrap_err();
        assert!(matches!(err, Error::CallTimedOut { .. }), "{err:?}");
        submitter.join().unwrap()
    });
    assert_eq!(handle.get_timeout(Duration::from_secs(10)).unwrap(), 81);
}

fn hang_after_zero(x: u64) -> u64 {
    if x > 0 {
        loop {
            std::hint::spin_loop();
        }
    }
    x
}

#[test]
fn an_imap_dropped_early_stops_its_running_chunks() {
    let pool = Pool::builder()
        .workers(2)
        .chunk_size(1)
        .call_timeout(Duration::from_secs(10))
        .inherit_output(false)
        .build()
        .unwrap();
    let first: Vec<u64> = pool
        .imap(0..100u64, hang_after_zero)
        .unwrap()
        .take(1)
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(first, [0]);
    // Both workers were running items that never end: dropping the iterator
    // stops them, and the next call runs at once on their replacements.
    let started = Instant::now();
    assert_eq!(pool.map(0..4u64, square).unwrap(), [0, 1, 4, 9]);
    assert!(started.elapsed() < Duration::from_secs(5));
}
