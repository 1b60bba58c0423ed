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
