//! Pipelines: stages of workers joined by bounded queues.

use multiproc::{Error, Pipeline};

use crate::support::{process_exists, splitmix64};

fn add_one(x: u64) -> u64 {
    x + 1
}

fn mix(x: u64) -> u64 {
    splitmix64(x)
}

fn low_byte(x: u64) -> u8 {
    (x & 0xff) as u8
}

#[test]
fn three_stages_equal_the_sequential_composition() {
    let out: Vec<u8> = Pipeline::new(0..100_000u64)
        .inherit_output(false)
        .stage(2, add_one)
        .stage(1, mix)
        .stage(2, low_byte)
        .collect()
        .unwrap();
    let expected: Vec<u8> = (0..100_000u64).map(|x| low_byte(mix(add_one(x)))).collect();
    assert_eq!(out, expected);
}

fn uneven(x: u64) -> u64 {
    // Every 97th item takes a while: later items finish first.
    if x.is_multiple_of(97) {
        let mut z = x;
        for _ in 0..200_000 {
            z = splitmix64(z);
        }
        std::hint::black_box(z);
    }
    x
}

#[test]
fn ordered_mode_keeps_input_order_with_uneven_stages() {
    let out: Vec<u64> = Pipeline::new(0..3_000u64)
        .inherit_output(false)
        .stage(2, uneven)
        .stage(2, add_one)
        .collect()
        .unwrap();
    assert_eq!(out, (1..3_001).collect::<Vec<_>>());
}

#[test]
fn unordered_mode_delivers_every_item_once() {
    let mut out: Vec<u64> = Pipeline::new(0..3_000u64)
        .inherit_output(false)
        .stage(2, uneven)
        .unordered()
        .collect()
        .unwrap();
    out.sort_unstable();
    assert_eq!(out, (0..3_000).collect::<Vec<_>>());
}

#[test]
fn flat_map_and_filter_stages() {
    let out: Vec<u64> = Pipeline::new(0..1_000u64)
        .inherit_output(false)
        .flat_map_stage(2, |x: u64| vec![x; (x % 3) as usize])
        .filter_stage(1, |x: &u64| x.is_multiple_of(2))
        .collect()
        .unwrap();
    let expected: Vec<u64> = (0..1_000u64)
        .flat_map(|x| vec![x; (x % 3) as usize])
        .filter(|x| x.is_multiple_of(2))
        .collect();
    assert_eq!(out, expected);
}

#[test]
fn reduce_folds_in_the_last_stages_workers() {
    let total = Pipeline::new(0..50_000u64)
        .inherit_output(false)
        .stage(1, add_one)
        .stage(2, mix)
        .reduce(|| 0, u64::wrapping_add)
        .unwrap();
    let expected = (0..50_000u64)
        .map(|x| mix(add_one(x)))
        .fold(0, u64::wrapping_add);
    assert_eq!(total, expected);
}

#[test]
fn a_large_source_runs_in_bounded_memory() {
    let bound = 4_096;
    let pipeline = Pipeline::new(0..300_000u64)
        .inherit_output(false)
        .stage(1, add_one)
        .stage(1, add_one)
        .stage_items(bound);
    let stats = pipeline.stats();
    let mut count = 0u64;
    pipeline
        .for_each(|x| {
            assert_eq!(x, count + 2);
            count += 1;
        })
        .unwrap();
    assert_eq!(count, 300_000);
    assert_eq!(stats.read(), 300_000);
    // Two stages of at most `bound` items each, plus one chunk being handed over
    // per stage.
    let peak = stats.peak_in_flight();
    assert!(peak <= 3 * bound as u64, "peak {peak} items in flight");
}

fn fails_on_13(x: u64) -> u64 {
    if x == 13 {
        panic!("stage two refuses {x}");
    }
    x
}

#[test]
fn an_error_names_the_stage_and_the_item() {
    let err = Pipeline::new(0..100u64)
        .inherit_output(false)
        .stage(2, add_one)
        .stage(2, fails_on_13)
        .stage(1, add_one)
        .collect()
        .unwrap_err();
    match &err {
        Error::Stage { stage: 2, error } => match error.as_ref() {
            Error::TaskPanicked { item, panic, .. } => {
                // Item 12 of the source is item 12 of stage 2's input, whose value is 13.
                assert_eq!(*item, 12);
                assert_eq!(panic.message, "stage two refuses 13");
            }
            other => panic!("expected a panic, got {other:?}"),
        },
        other => panic!("expected a stage error, got {other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("stage 2") && text.contains("item 12"),
        "{text}"
    );
}

#[test]
fn empty_and_one_item_sources_work() {
    let none: Vec<u64> = Pipeline::new(std::iter::empty::<u64>())
        .inherit_output(false)
        .stage(1, add_one)
        .collect()
        .unwrap();
    assert!(none.is_empty());
    let one: Vec<u64> = Pipeline::new([41u64])
        .inherit_output(false)
        .stage(1, add_one)
        .collect()
        .unwrap();
    assert_eq!(one, [42]);
    let sum = Pipeline::new(std::iter::empty::<u64>())
        .inherit_output(false)
        .stage(1, add_one)
        .reduce(|| 7, u64::wrapping_add)
        .unwrap();
    assert_eq!(sum, 7);
}

fn with_pid(x: u64) -> (u32, u64) {
    (std::process::id(), x)
}

#[test]
fn a_pipeline_dropped_mid_run_leaves_no_process() {
    let mut pids = std::collections::HashSet::new();
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Pipeline::new(0..1_000_000u64)
            .inherit_output(false)
            .stage(2, add_one)
            .stage(2, with_pid)
            .for_each(|(pid, x)| {
                pids.insert(pid);
                if x == 5_000 {
                    panic!("the consumer stops here");
                }
            })
    }));
    assert!(run.is_err());
    assert!(!pids.is_empty());
    for pid in pids {
        assert!(
            !process_exists(pid),
            "stage worker {pid} outlived the pipeline"
        );
    }
}

/// What a fold stage accumulates in the tests: how many items, their wrapping sum,
/// and the xor of their mixes (every item counted exactly once, or the three differ).
type Tally3 = (u64, u64, u64);

fn tally3_identity() -> Tally3 {
    (0, 0, 0)
}

fn tally3_fold((n, sum, xor): Tally3, x: u64) -> Tally3 {
    (n + 1, sum.wrapping_add(x), xor ^ mix(x))
}

fn tally3_combine(a: Tally3, b: Tally3) -> Tally3 {
    (a.0 + b.0, a.1.wrapping_add(b.1), a.2 ^ b.2)
}

fn tally3_of(items: impl Iterator<Item = u64>) -> Tally3 {
    items.fold(tally3_identity(), tally3_fold)
}

#[test]
fn a_fold_stage_folds_every_item_once_in_its_workers() {
    let total = Pipeline::new(0..60_000u64)
        .inherit_output(false)
        .stage(1, add_one)
        .fold_stage(2, tally3_identity, tally3_fold)
        .reduce(tally3_identity, tally3_combine)
        .unwrap();
    assert_eq!(total, tally3_of((0..60_000u64).map(add_one)));
}

#[test]
fn a_fold_stage_yields_one_accumulator_per_worker_or_per_flush() {
    // Without a flush bound each worker's accumulator comes out once, at the end.
    let partials: Vec<Tally3> = Pipeline::new(0..20_000u64)
        .inherit_output(false)
        .stage_items(64)
        .fold_stage(2, tally3_identity, tally3_fold)
        .collect()
        .unwrap();
    assert!(partials.len() <= 2, "{} partials", partials.len());
    let total = partials.into_iter().fold(tally3_identity(), tally3_combine);
    assert_eq!(total, tally3_of(0..20_000u64));
    // With a small bound, workers are asked for their accumulators as they go.
    let partials: Vec<Tally3> = Pipeline::new(0..20_000u64)
        .inherit_output(false)
        .stage_items(64)
        .fold_flush_bytes(1_024)
        .fold_stage(2, tally3_identity, tally3_fold)
        .collect()
        .unwrap();
    assert!(partials.len() > 2, "{} partials", partials.len());
    let total = partials.into_iter().fold(tally3_identity(), tally3_combine);
    assert_eq!(total, tally3_of(0..20_000u64));
}

#[test]
fn a_fold_stage_on_an_empty_source_yields_nothing() {
    let total = Pipeline::new(std::iter::empty::<u64>())
        .inherit_output(false)
        .fold_stage(2, tally3_identity, tally3_fold)
        .reduce(tally3_identity, tally3_combine)
        .unwrap();
    assert_eq!(total, tally3_identity());
}

/// Folds `(index, marker)` items; item 13 aborts its worker the first time it is
/// folded (the marker file does not exist yet), and folds normally once retried.
fn fold_aborting_once_on_13(acc: Tally3, (x, marker): (u64, String)) -> Tally3 {
    if x == 13
        && std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&marker)
            .is_ok()
    {
        std::process::abort();
    }
    tally3_fold(acc, x)
}

#[test]
fn a_worker_killed_mid_fold_loses_none_of_what_it_folded() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("13-died").to_string_lossy().into_owned();
    // One item per chunk: the worker that dies on item 13 has folded others first,
    // and those must be folded again elsewhere, once.
    let items = (0..200u64).map(|x| (x, marker.clone()));
    let total = Pipeline::new(items)
        .inherit_output(false)
        .stage_items(16)
        .fold_flush_bytes(2_048)
        .fold_stage(2, tally3_identity, fold_aborting_once_on_13)
        .reduce(tally3_identity, tally3_combine)
        .unwrap();
    assert!(std::path::Path::new(&marker).exists(), "item 13 never died");
    assert_eq!(total, tally3_of(0..200u64));
}

fn fold_aborting_on_13(acc: Tally3, x: u64) -> Tally3 {
    if x == 13 {
        std::process::abort();
    }
    tally3_fold(acc, x)
}

fn fold_panicking_on_13(acc: Tally3, x: u64) -> Tally3 {
    if x == 13 {
        panic!("the fold refuses {x}");
    }
    tally3_fold(acc, x)
}

#[test]
fn a_poison_item_in_a_fold_stage_fails_the_pipeline_naming_stage_item_and_worker() {
    let err = Pipeline::new(0..100u64)
        .inherit_output(false)
        .stage_items(16)
        .stage(1, add_one)
        .fold_stage(2, tally3_identity, fold_aborting_on_13)
        .reduce(tally3_identity, tally3_combine)
        .unwrap_err();
    let text = err.to_string();
    // Item 12 of stage 2's input has the value 13.
    assert!(matches!(err, Error::Stage { stage: 2, .. }), "{err:?}");
    assert!(
        text.contains("stage 2") && text.contains("items 12..13") && text.contains("worker"),
        "{text}"
    );

    let err = Pipeline::new(0..100u64)
        .inherit_output(false)
        .fold_stage(2, tally3_identity, fold_panicking_on_13)
        .reduce(tally3_identity, tally3_combine)
        .unwrap_err();
    match &err {
        Error::Stage { stage: 1, error } => match error.as_ref() {
            Error::TaskPanicked { item, panic, .. } => {
                assert_eq!(*item, 13);
                assert_eq!(panic.message, "the fold refuses 13");
            }
            other => panic!("expected a panic, got {other:?}"),
        },
        other => panic!("expected a stage error, got {other:?}"),
    }
}

fn tally3_count(t: Tally3) -> u64 {
    t.0
}

#[test]
fn a_fold_stages_accumulators_feed_later_stages() {
    let counts: Vec<u64> = Pipeline::new(0..1_000u64)
        .inherit_output(false)
        .fold_stage(2, tally3_identity, tally3_fold)
        .stage(1, tally3_count)
        .collect()
        .unwrap();
    assert!(!counts.is_empty() && counts.len() <= 2, "{counts:?}");
    assert_eq!(counts.iter().sum::<u64>(), 1_000);
}

#[test]
fn an_error_before_a_fold_stage_is_the_pipelines_error() {
    let err = Pipeline::new(0..100u64)
        .inherit_output(false)
        .stage(2, fails_on_13)
        .fold_stage(2, tally3_identity, tally3_fold)
        .reduce(tally3_identity, tally3_combine)
        .unwrap_err();
    match &err {
        Error::Stage { stage: 1, error } => {
            assert!(
                matches!(error.as_ref(), Error::TaskPanicked { item: 13, .. }),
                "{error:?}"
            )
        }
        other => panic!("expected stage 1's error, got {other:?}"),
    }
}
