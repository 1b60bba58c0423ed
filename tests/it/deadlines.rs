//! Deadlines: a stuck item is killed with its worker; a call has an upper bound.

use std::time::{Duration, Instant};

use multiproc::{Error, Pool};

fn loops_on_7(x: u64) -> u64 {
    if x == 7 {
        loop {
            std::hint::spin_loop();
        }
    }
    x * 3
}

fn timed_pool(timeout: Duration) -> Pool {
    Pool::builder()
        .workers(2)
        .task_timeout(timeout)
        .inherit_output(false)
        .build()
        .unwrap()
}

#[test]
fn an_item_past_the_task_timeout_is_killed_and_named() {
    let pool = timed_pool(Duration::from_millis(200));
    let started = Instant::now();
    let err = pool.map(0..20u64, loops_on_7).unwrap_err();
    match err {
        Error::TimedOut { item, timeout, .. } => {
            assert_eq!(item, 7);
            assert_eq!(timeout, Duration::from_millis(200));
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    // Replaced: the pool answers.
    assert_eq!(pool.map(0..5u64, |x| x + 1).unwrap(), [1, 2, 3, 4, 5]);
    assert_eq!(pool.worker_pids().unwrap().len(), 2);
}

#[test]
fn a_stuck_apply_times_out_alone() {
    let pool = timed_pool(Duration::from_millis(200));
    let handles: Vec<_> = (0..20u64)
        .map(|x| pool.apply_async(loops_on_7, x).unwrap())
        .collect();
    for (x, handle) in handles.into_iter().enumerate() {
        match handle.get() {
            Ok(v) => assert_eq!(v, x as u64 * 3),
            Err(Error::TimedOut { .. }) => assert_eq!(x, 7),
            Err(other) => panic!("item {x}: {other:?}"),
        }
    }
}

fn slow(x: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(50));
    x
}

#[test]
fn a_call_timeout_bounds_a_batch_job() {
    let pool = Pool::builder()
        .workers(2)
        .chunk_size(1)
        .call_timeout(Duration::from_millis(300))
        .inherit_output(false)
        .build()
        .unwrap();
    let started = Instant::now();
    let err = pool.map(0..1_000u64, slow).unwrap_err();
    match err {
        Error::CallTimedOut { timeout, done } => {
            assert_eq!(timeout, Duration::from_millis(300));
            assert!(done < 1_000);
        }
        other => panic!("expected a call timeout, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(pool.map(0..4u64, |x| x).unwrap(), [0, 1, 2, 3]);
}

#[test]
fn the_chunk_behind_a_timed_out_one_is_not_charged() {
    // One worker, one-item chunks (a task timeout makes every chunk one item), so
    // item 8 waits queued behind item 7 on the same worker when 7's deadline
    // passes and the worker is killed. Item 8 never started: it must run again
    // as it is, without an error and without using a retry.
    let pool = Pool::builder()
        .workers(1)
        .task_timeout(Duration::from_millis(200))
        .retries(0)
        .inherit_output(false)
        .build()
        .unwrap();
    let outcomes = pool.map_collect(0..10u64, loops_on_7).unwrap();
    for (x, outcome) in outcomes.iter().enumerate() {
        match outcome {
            Ok(v) => assert_eq!(*v, x as u64 * 3, "item {x}"),
            Err(Error::TimedOut { item: 7, .. }) if x == 7 => {}
            Err(other) => panic!("item {x}: {other:?}"),
        }
    }
    // With the default retry the neighbour would have silently used it.
    let pool = Pool::builder()
        .workers(1)
        .task_timeout(Duration::from_millis(200))
        .inherit_output(false)
        .build()
        .unwrap();
    let outcomes = pool.map_collect(0..10u64, loops_on_7).unwrap();
    assert_eq!(outcomes.iter().filter(|o| o.is_err()).count(), 1);
    assert_eq!(pool.stats().unwrap().chunks_retried, 0);
}
