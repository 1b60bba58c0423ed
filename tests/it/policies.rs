//! Error policies: under `Collect` and `Skip` a failed item (a panic, a timeout, a
//! poison item that kills its worker on every attempt) fails alone and every other
//! item runs, exactly once.

use std::time::Duration;

use multiproc::{Error, ErrorPolicy, Pool};

use crate::support::{inline_pool, splitmix64};

fn panics_on_13_and_57(x: u64) -> u64 {
    assert!(x != 13 && x != 57, "unlucky {x}");
    splitmix64(x)
}

/// Aborts its worker on item 500, every time.
fn aborts_on_500(x: u64) -> u64 {
    if x == 500 {
        std::process::abort();
    }
    splitmix64(x)
}

fn pool(chunk_size: usize, retries: u32, policy: ErrorPolicy) -> Pool {
    Pool::builder()
        .workers(2)
        .chunk_size(chunk_size)
        .retries(retries)
        .error_policy(policy)
        .inherit_output(false)
        .build()
        .expect("a pool starts")
}

/// Checks that `outcomes` holds `splitmix64(i)` at every index but `failed`.
fn assert_all_but(outcomes: &[multiproc::Result<u64>], failed: &[usize]) {
    for (i, outcome) in outcomes.iter().enumerate() {
        if failed.contains(&i) {
            assert!(outcome.is_err(), "item {i} should have failed: {outcome:?}");
        } else {
            assert_eq!(
                outcome.as_ref().ok(),
                Some(&splitmix64(i as u64)),
                "item {i}"
            );
        }
    }
}

#[test]
fn map_collect_gives_each_panicking_item_its_own_error() {
    let pool = pool(10, 1, ErrorPolicy::FailFast);
    let outcomes = pool.map_collect(0..100u64, panics_on_13_and_57).unwrap();
    assert_eq!(outcomes.len(), 100);
    assert_all_but(&outcomes, &[13, 57]);
    for item in [13, 57] {
        match &outcomes[item] {
            Err(Error::TaskPanicked {
                item: at, panic, ..
            }) => {
                assert_eq!(*at, item);
                assert!(
                    panic.message.contains(&format!("unlucky {item}")),
                    "{panic}"
                );
            }
            other => panic!("item {item}: {other:?}"),
        }
    }
    // The pool fails fast again for an ordinary map (with whichever failed first).
    let err = pool.map(0..100u64, panics_on_13_and_57).unwrap_err();
    assert!(
        matches!(err, Error::TaskPanicked { item: 13 | 57, .. }),
        "{err}"
    );
}

#[test]
fn map_skip_returns_the_good_results_and_the_failures() {
    let pool = pool(8, 1, ErrorPolicy::FailFast);
    let skipped = pool.map_skip(0..100u64, panics_on_13_and_57).unwrap();
    let indices: Vec<usize> = skipped.failed.iter().map(|(i, _)| *i).collect();
    assert_eq!(indices, [13, 57]);
    assert_eq!(skipped.results.len(), 98);
    for (i, value) in &skipped.results {
        assert_eq!(*value, splitmix64(*i as u64));
    }
    let values = skipped.values();
    assert_eq!(values[13], splitmix64(14), "the failed item is left out");
}

#[test]
fn under_collect_map_and_map_reduce_run_everything_and_list_every_failure() {
    let pool = pool(10, 1, ErrorPolicy::Collect);
    let err = pool.map(0..100u64, panics_on_13_and_57).unwrap_err();
    match err {
        Error::ItemsFailed { failed } => {
            let indices: Vec<usize> = failed.iter().map(|(i, _)| *i).collect();
            assert_eq!(indices, [13, 57]);
        }
        other => panic!("{other}"),
    }
    let err = pool
        .map_reduce(0..100u64, panics_on_13_and_57, || 0, u64::wrapping_add)
        .unwrap_err();
    assert!(
        matches!(&err, Error::ItemsFailed { failed } if failed.len() == 2),
        "{err}"
    );
    // Without failures the policy changes nothing.
    let sum = pool
        .map_reduce(0..100u64, splitmix64, || 0, u64::wrapping_add)
        .unwrap();
    assert_eq!(sum, (0..100u64).map(splitmix64).fold(0, u64::wrapping_add));
}

#[test]
fn a_poison_item_is_isolated_and_the_rest_of_its_chunk_completes() {
    // Item 500 aborts its worker on both attempts: it alone fails, named, and the
    // 49 other items of its chunk run on a fresh worker.
    let pool = pool(50, 1, ErrorPolicy::FailFast);
    let outcomes = pool.map_collect(0..2_000u64, aborts_on_500).unwrap();
    assert_all_but(&outcomes, &[500]);
    match &outcomes[500] {
        Err(Error::WorkerExited { items, status, .. }) => {
            assert_eq!(*items, 500..501);
            let signal = status.and_then(|s| std::os::unix::process::ExitStatusExt::signal(&s));
            assert_eq!(signal, Some(libc::SIGABRT));
        }
        other => panic!("{other:?}"),
    }
    let stats = pool.stats().unwrap();
    assert_eq!(
        stats.workers_started, 4,
        "two deaths, two replacements: {stats:?}"
    );
    // Under fail-fast the same item fails the call, named alone.
    let err = pool.map(0..2_000u64, aborts_on_500).unwrap_err();
    assert!(
        matches!(&err, Error::WorkerExited { items, .. } if *items == (500..501)),
        "{err}"
    );
}

#[test]
fn with_no_retries_a_poison_item_fails_on_its_first_death() {
    let pool = pool(50, 0, ErrorPolicy::Skip);
    let skipped = pool.map_skip(0..1_000u64, aborts_on_500).unwrap();
    assert_eq!(skipped.failed.len(), 1);
    assert_eq!(skipped.failed[0].0, 500);
    assert_eq!(skipped.results.len(), 999);
    assert_eq!(pool.stats().unwrap().workers_started, 3);
}

#[test]
fn an_apply_async_that_kills_its_worker_fails_only_its_own_handle() {
    let pool = pool(10, 1, ErrorPolicy::FailFast);
    let handles: Vec<_> = (0..1_000u64)
        .map(|x| pool.apply_async(aborts_on_500, x).unwrap())
        .collect();
    for (x, handle) in handles.into_iter().enumerate() {
        let got = handle.get();
        if x == 500 {
            assert!(matches!(got, Err(Error::WorkerExited { .. })), "{got:?}");
        } else {
            assert_eq!(got.unwrap(), splitmix64(x as u64), "item {x}");
        }
    }
}

fn spins_forever_on_7(x: u64) -> u64 {
    if x == 7 {
        loop {
            std::hint::spin_loop();
        }
    }
    splitmix64(x)
}

#[test]
fn under_collect_an_item_past_its_deadline_fails_alone() {
    let pool = Pool::builder()
        .workers(2)
        .task_timeout(Duration::from_millis(300))
        .inherit_output(false)
        .build()
        .unwrap();
    let outcomes = pool.map_collect(0..20u64, spins_forever_on_7).unwrap();
    assert_all_but(&outcomes, &[7]);
    assert!(
        matches!(outcomes[7], Err(Error::TimedOut { item: 7, .. })),
        "{:?}",
        outcomes[7]
    );
}

#[test]
fn the_inline_backend_collects_panics_the_same_way() {
    let pool = inline_pool(2, Some(10));
    let outcomes = pool.map_collect(0..100u64, panics_on_13_and_57).unwrap();
    assert_all_but(&outcomes, &[13, 57]);
}

#[test]
fn map_async_under_skip_reports_every_failure() {
    let pool = pool(10, 1, ErrorPolicy::Skip);
    let err = pool
        .map_async(0..100u64, panics_on_13_and_57)
        .unwrap()
        .get()
        .unwrap_err();
    assert!(
        matches!(&err, Error::ItemsFailed { failed } if failed.len() == 2),
        "{err}"
    );
}

#[test]
fn imap_under_collect_yields_each_failure_in_place_and_goes_on() {
    let pool = pool(10, 1, ErrorPolicy::Collect);
    let outcomes: Vec<_> = pool.imap(0..100u64, panics_on_13_and_57).unwrap().collect();
    assert_eq!(outcomes.len(), 100);
    assert_all_but(&outcomes, &[13, 57]);
}

#[test]
fn imap_unordered_under_skip_leaves_failures_out_and_reports_them() {
    let pool = pool(10, 1, ErrorPolicy::Skip);
    let mut iter = pool.imap_unordered(0..100u64, panics_on_13_and_57).unwrap();
    let mut got: Vec<(usize, u64)> = iter.by_ref().map(Result::unwrap).collect();
    got.sort_unstable();
    let expected: Vec<(usize, u64)> = (0..100u64)
        .filter(|x| *x != 13 && *x != 57)
        .map(|x| (x as usize, splitmix64(x)))
        .collect();
    assert_eq!(got, expected);
    let mut failed: Vec<usize> = iter.failures().iter().map(|(i, _)| *i).collect();
    failed.sort_unstable();
    assert_eq!(failed, [13, 57]);
}
