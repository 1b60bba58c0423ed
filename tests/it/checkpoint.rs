//! Checkpoints: a job stopped part way resumes from its file, recomputes only what
//! the file does not hold, and a file of another job or input is refused.

use std::collections::BTreeSet;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::ops::Range;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};

use multiproc::{Error, ErrorPolicy, Pipeline, Pool};
use tempfile::TempDir;

use crate::helpers::helper_command;
use crate::support::{pool_with_chunks, random_u64s, splitmix64};

/// An item: its index, a seeded value, whether the task panics on it, and the file
/// the task appends the index to when it runs (so a test sees which items ran).
type Item = (u64, u64, bool, String);

fn items(len: usize, log: &Path, poison: Option<u64>) -> Vec<Item> {
    let log = log.to_str().expect("a text path").to_owned();
    random_u64s(len, 11)
        .into_iter()
        .zip(0..)
        .map(|(value, index)| (index, value, poison == Some(index), log.clone()))
        .collect()
}

fn note_run(index: u64, log: &str) {
    // One small write to a file opened for appending: lines of concurrent
    // workers do not mix.
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("the log opens");
    file.write_all(format!("{index}\n").as_bytes())
        .expect("the log takes a line");
}

fn logged((index, value, poison, log): Item) -> u64 {
    assert!(!poison, "item {index} is poisoned");
    note_run(index, &log);
    splitmix64(value)
}

fn logged_digits((index, _, poison, log): Item) -> String {
    assert!(!poison, "item {index} is poisoned");
    note_run(index, &log);
    format!("{index},")
}

fn empty() -> String {
    String::new()
}

/// Associative, not commutative: the order of the partials shows.
fn concat(a: String, b: String) -> String {
    a + &b
}

fn unlogged((_, value, _, _): Item) -> u64 {
    splitmix64(value)
}

/// The items the task ran since the log was last taken, each once; empties the log.
fn take_log(log: &Path) -> Vec<u64> {
    let text = fs::read_to_string(log).unwrap_or_default();
    fs::write(log, "").expect("the log empties");
    let mut ran: Vec<u64> = text.lines().map(|l| l.parse().expect("a number")).collect();
    ran.sort_unstable();
    ran
}

fn indices(ranges: &[Range<usize>]) -> BTreeSet<u64> {
    ranges
        .iter()
        .flat_map(|r| r.clone())
        .map(|i| i as u64)
        .collect()
}

const KILLED_LEN: usize = 1000;
const KILL_AT: u64 = 600;

/// For `a_job_whose_parent_is_killed_resumes_and_recomputes_only_unrecorded_chunks`:
/// a checkpointed map of 1000 items in chunks of 50 on 2 workers. With `KILL_AT`
/// set, this process SIGKILLs itself when its input yields that item (while it is
/// filling a chunk); otherwise it prints the results, one a line.
pub(crate) fn helper_checkpointed_map() {
    let var = |name| std::env::var(name).expect("the test sets it");
    let (checkpoint, log) = (var("CHECKPOINT"), var("LOG"));
    let kill_at: Option<u64> = std::env::var("KILL_AT").ok().map(|v| v.parse().unwrap());
    let pool = pool_with_chunks(2, 50);
    let input = items(KILLED_LEN, Path::new(&log), None)
        .into_iter()
        .inspect(move |item| {
            if Some(item.0) == kill_at {
                // SAFETY: kill(2) with this process's own pid and a valid signal;
                // nothing of this process runs after it.
                unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            }
        });
    let results = pool.checkpoint(&checkpoint).map(input, logged).unwrap();
    let lines: Vec<String> = results.iter().map(u64::to_string).collect();
    println!("{}", lines.join("\n"));
}

fn run_helper(checkpoint: &Path, log: &Path, kill_at: Option<u64>) -> std::process::Output {
    let mut command = helper_command("checkpointed-map");
    command.env("CHECKPOINT", checkpoint).env("LOG", log);
    match kill_at {
        Some(at) => command.env("KILL_AT", at.to_string()),
        None => command.env_remove("KILL_AT"),
    };
    command.output().expect("the helper runs")
}

#[test]
fn a_job_whose_parent_is_killed_resumes_and_recomputes_only_unrecorded_chunks() {
    let dir = TempDir::new().unwrap();
    let (checkpoint, log) = (dir.path().join("map.ckpt"), dir.path().join("ran.log"));
    let expected: Vec<u64> = items(KILLED_LEN, &log, None)
        .into_iter()
        .map(unlogged)
        .collect();

    let killed = run_helper(&checkpoint, &log, Some(KILL_AT));
    assert_eq!(killed.status.signal(), Some(libc::SIGKILL), "{killed:?}");
    let recorded = indices(&multiproc::__private::checkpoint_records(&checkpoint).unwrap());
    // Chunks of 50, each worker given at most 2 at a time: the chunk of item 600
    // (the 13th) is filled only once 9 chunks were answered, chunk 0 among them, so
    // some were delivered and recorded; the chunk of item 600 was never sent.
    assert!(!recorded.is_empty(), "nothing recorded before the kill");
    assert!(recorded.iter().all(|&i| i < KILL_AT), "{recorded:?}");
    take_log(&log);

    let resumed = run_helper(&checkpoint, &log, None);
    assert!(resumed.status.success(), "{resumed:?}");
    let results: Vec<u64> = String::from_utf8(resumed.stdout)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(results, expected, "the resumed run's output");
    // Exactly the items not recorded ran, each once.
    let unrecorded: Vec<u64> = (0..KILLED_LEN as u64)
        .filter(|i| !recorded.contains(i))
        .collect();
    let ran = take_log(&log);
    assert_eq!(ran, unrecorded);
    assert_eq!(ran.len(), KILLED_LEN - recorded.len());
    let all = indices(&multiproc::__private::checkpoint_records(&checkpoint).unwrap());
    assert_eq!(
        all.len(),
        KILLED_LEN,
        "the finished checkpoint records everything"
    );

    // Once complete, a run takes everything from the file.
    let again = run_helper(&checkpoint, &log, None);
    assert!(again.status.success(), "{again:?}");
    assert_eq!(
        String::from_utf8(again.stdout).unwrap().lines().count(),
        KILLED_LEN
    );
    assert_eq!(take_log(&log), Vec::<u64>::new(), "nothing ran again");
}

#[test]
fn a_checkpoint_with_a_truncated_last_record_is_recovered() {
    let dir = TempDir::new().unwrap();
    let (path, log) = (dir.path().join("map.ckpt"), dir.path().join("ran.log"));
    let input = items(200, &log, None);
    let expected: Vec<u64> = input.iter().cloned().map(unlogged).collect();
    let pool = pool_with_chunks(2, 7);
    assert_eq!(
        pool.checkpoint(&path).map(input.clone(), logged).unwrap(),
        expected
    );
    assert_eq!(take_log(&log).len(), 200);
    let whole = fs::read(&path).unwrap();

    // A crash while the last record (items 196..200: 200 = 28 * 7 + 4) was written.
    for cut in [1, 9, 30] {
        fs::write(&path, &whole[..whole.len() - cut]).unwrap();
        assert_eq!(
            pool.checkpoint(&path).map(input.clone(), logged).unwrap(),
            expected
        );
        assert_eq!(
            take_log(&log),
            (196..200).collect::<Vec<u64>>(),
            "cut {cut}"
        );
        // The same chunk again: the file is as it was.
        assert_eq!(fs::read(&path).unwrap(), whole, "cut {cut}");
    }

    // Damage before the last record is an error naming the file, never skipped.
    let mut damaged = whole.clone();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x40;
    fs::write(&path, &damaged).unwrap();
    let error = pool
        .checkpoint(&path)
        .map(input.clone(), logged)
        .unwrap_err();
    assert!(matches!(error, Error::Checkpoint { .. }), "{error:?}");
    let message = error.to_string();
    assert!(
        message.contains("map.ckpt") && message.contains("damaged"),
        "{message}"
    );
    assert_eq!(take_log(&log), Vec::<u64>::new(), "nothing ran");
}

#[test]
fn a_checkpoint_of_another_job_or_input_is_refused() {
    let dir = TempDir::new().unwrap();
    let (path, log) = (dir.path().join("job.ckpt"), dir.path().join("ran.log"));
    let input = items(100, &log, None);
    let pool = pool_with_chunks(2, 10);
    pool.checkpoint(&path).map(input.clone(), logged).unwrap();
    take_log(&log);
    let written = fs::read(&path).unwrap();

    // Another task, another kind of call: refused before anything runs.
    let error = pool
        .checkpoint(&path)
        .map(input.clone(), unlogged)
        .unwrap_err();
    let Error::CheckpointOfAnotherJob {
        path: named,
        found,
        expected,
    } = &error
    else {
        panic!("{error:?}");
    };
    assert_eq!(named, &path);
    assert!(
        found.contains("logged") && expected.contains("unlogged"),
        "{error}"
    );
    let error = pool
        .checkpoint(&path)
        .map_reduce(input.clone(), logged_digits, empty, concat)
        .unwrap_err();
    assert!(
        matches!(error, Error::CheckpointOfAnotherJob { .. }),
        "{error:?}"
    );

    // The same job on another input: the first recorded range that differs is named.
    let mut other = input.clone();
    other[42].1 ^= 1;
    let error = pool.checkpoint(&path).map(other, logged).unwrap_err();
    let Error::CheckpointInputDiffers { items, .. } = &error else {
        panic!("{error:?}");
    };
    assert_eq!(items, &(40..50));
    // A shorter input ends before recorded items.
    let error = pool
        .checkpoint(&path)
        .map(input[..55].to_vec(), logged)
        .unwrap_err();
    assert!(
        matches!(&error, Error::CheckpointInputDiffers { items, .. } if *items == (50..60)),
        "{error:?}"
    );
    assert_eq!(
        fs::read(&path).unwrap(),
        written,
        "a refused run records nothing"
    );

    // A file that is not a checkpoint.
    let text = dir.path().join("notes.txt");
    fs::write(&text, "these are notes, not a checkpoint\n").unwrap();
    let error = pool.checkpoint(&text).map(input, logged).unwrap_err();
    assert!(matches!(error, Error::Checkpoint { .. }), "{error:?}");
    assert!(
        error.to_string().contains("not a multiproc checkpoint"),
        "{error}"
    );
    assert_eq!(take_log(&log), Vec::<u64>::new(), "nothing ran");
}

#[test]
fn a_map_reduce_resumes_around_a_failed_chunk_in_input_order_with_other_chunk_sizes() {
    let dir = TempDir::new().unwrap();
    let (path, log) = (dir.path().join("reduce.ckpt"), dir.path().join("ran.log"));
    let expected: String = (0..300).map(|i| format!("{i},")).collect();
    let collect = |chunk_size| {
        Pool::builder()
            .workers(2)
            .chunk_size(chunk_size)
            .error_policy(ErrorPolicy::Collect)
            .inherit_output(false)
            .build()
            .unwrap()
    };

    // Item 130 fails: every other chunk runs and is recorded, the chunk of 130
    // (130..140) is not.
    let first = collect(10).checkpoint(&path).map_reduce(
        items(300, &log, Some(130)),
        logged_digits,
        empty,
        concat,
    );
    assert!(matches!(first, Err(Error::ItemsFailed { .. })), "{first:?}");
    assert_eq!(take_log(&log).len(), 299);
    let recorded = multiproc::__private::checkpoint_records(&path).unwrap();
    assert_eq!(recorded.len(), 29, "{recorded:?}");
    assert!(!recorded.iter().any(|r| r.contains(&130)));

    // Fixed, and with other chunk sizes: only the missing chunk runs, in its place.
    let pool = collect(64);
    let resumed = pool
        .checkpoint(&path)
        .map_reduce(items(300, &log, None), logged_digits, empty, concat)
        .unwrap();
    assert_eq!(resumed, expected);
    assert_eq!(take_log(&log), (130..140).collect::<Vec<u64>>());
    let again = pool
        .checkpoint(&path)
        .map_reduce(items(300, &log, None), logged_digits, empty, concat)
        .unwrap();
    assert_eq!(again, expected);
    assert_eq!(take_log(&log), Vec::<u64>::new());
}

#[test]
fn a_checkpointed_map_on_the_inline_backend_matches_a_plain_map() {
    let dir = TempDir::new().unwrap();
    let (path, log) = (dir.path().join("inline.ckpt"), dir.path().join("ran.log"));
    let pool = Pool::builder().workers(2).inline(true).build().unwrap();
    for len in [0, 1, 7, 1000] {
        let input = items(len, &log, None);
        let plain = pool.map(input.clone(), unlogged).unwrap();
        let _ = fs::remove_file(&path);
        assert_eq!(
            pool.checkpoint(&path).map(input.clone(), unlogged).unwrap(),
            plain
        );
        assert_eq!(pool.checkpoint(&path).map(input, unlogged).unwrap(), plain);
    }
}

// Pipelines: every stage records its chunks in one file.

/// A stage 1 item: its index, a value, and the directory of the run's logs.
type Staged = (u64, u64, String);

/// Where a stage's task notes the items it ran.
fn stage_log(dir: &str, stage: u32) -> String {
    format!("{dir}/stage{stage}.log")
}

/// Stage 1: logs the item, mixes its value.
fn first_stage((index, value, poison, dir): Item) -> Staged {
    assert!(!poison, "item {index} is poisoned");
    note_run(index, &stage_log(&dir, 1));
    (index, splitmix64(value), dir)
}

/// Stage 2: logs the item; panics on item 13 while the run's directory holds a
/// file named `poison`.
fn second_stage((index, value, dir): Staged) -> u64 {
    assert!(
        index != 13 || !Path::new(&dir).join("poison").exists(),
        "item 13 is poisoned"
    );
    note_run(index, &stage_log(&dir, 2));
    splitmix64(value ^ index)
}

/// The items of a pipeline test: `logged` of `items` names the run's directory
/// in place of a log file.
fn pipeline_items(len: usize, dir: &Path) -> Vec<Item> {
    items(len, dir, None)
}

fn pipeline_expected(len: usize, dir: &Path) -> Vec<u64> {
    pipeline_items(len, dir)
        .into_iter()
        .map(|(index, value, _, _)| splitmix64(splitmix64(value) ^ index))
        .collect()
}

/// A two-stage pipeline of `len` items on 2 workers a stage, at most 100 items in
/// flight a stage, checkpointed at `path`.
fn two_stages<'a>(
    input: impl IntoIterator<Item = Item, IntoIter: 'a>,
    path: &Path,
) -> multiproc::Stage<'a, Staged, u64, impl Fn(Staged) -> u64 + Copy + Send + Sync + 'a> {
    Pipeline::new(input)
        .stage_items(100)
        .checkpoint(path)
        .stage(2, first_stage)
        .stage(2, second_stage)
}

const PIPELINE_LEN: usize = 1000;

/// For `a_pipeline_whose_parent_is_killed_resumes_and_each_stage_reruns_only_what_it_did_not_record`:
/// the two-stage pipeline; with `KILL_AT` set, this process SIGKILLs itself when
/// the source yields that item, else it prints the results, one a line.
pub(crate) fn helper_checkpointed_pipeline() {
    let var = |name| std::env::var(name).expect("the test sets it");
    let (checkpoint, dir) = (var("CHECKPOINT"), var("DIR"));
    let kill_at: Option<u64> = std::env::var("KILL_AT").ok().map(|v| v.parse().unwrap());
    let input = pipeline_items(PIPELINE_LEN, Path::new(&dir))
        .into_iter()
        .inspect(move |item| {
            if Some(item.0) == kill_at {
                // SAFETY: kill(2) with this process's own pid and a valid signal;
                // nothing of this process runs after it.
                unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            }
        });
    let results = two_stages(input, Path::new(&checkpoint)).collect().unwrap();
    let lines: Vec<String> = results.iter().map(u64::to_string).collect();
    println!("{}", lines.join("\n"));
}

fn run_pipeline_helper(checkpoint: &Path, dir: &Path, kill_at: Option<u64>) -> Vec<u64> {
    let mut command = helper_command("checkpointed-pipeline");
    command.env("CHECKPOINT", checkpoint).env("DIR", dir);
    match kill_at {
        Some(at) => command.env("KILL_AT", at.to_string()),
        None => command.env_remove("KILL_AT"),
    };
    let output = command.output().expect("the helper runs");
    if kill_at.is_some() {
        assert_eq!(output.status.signal(), Some(libc::SIGKILL), "{output:?}");
        return Vec::new();
    }
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect()
}

fn stage_records(path: &Path, stage: usize) -> BTreeSet<u64> {
    indices(&multiproc::__private::checkpoint_stage_records(path, stage).unwrap())
}

fn not_in(recorded: &BTreeSet<u64>, len: usize) -> Vec<u64> {
    (0..len as u64).filter(|i| !recorded.contains(i)).collect()
}

#[test]
fn a_pipeline_whose_parent_is_killed_resumes_and_each_stage_reruns_only_what_it_did_not_record() {
    let dir = TempDir::new().unwrap();
    let checkpoint = dir.path().join("pipeline.ckpt");
    let logs = |stage| PathBuf::from(stage_log(dir.path().to_str().unwrap(), stage));

    run_pipeline_helper(&checkpoint, dir.path(), Some(KILL_AT));
    let (first, second) = (stage_records(&checkpoint, 1), stage_records(&checkpoint, 2));
    // At most 100 items in flight a stage: by the time the source yields item
    // 600, stage 1 has handed on (and recorded) hundreds of items and stage 2 has
    // delivered some.
    assert!(
        !second.is_empty(),
        "stage 2 recorded nothing before the kill"
    );
    assert!(second.is_subset(&first), "{second:?} not within {first:?}");
    assert!(first.iter().all(|&i| i < KILL_AT), "{first:?}");
    assert!(stage_records(&checkpoint, 0).is_empty());
    take_log(&logs(1));
    take_log(&logs(2));

    let resumed = run_pipeline_helper(&checkpoint, dir.path(), None);
    assert_eq!(resumed, pipeline_expected(PIPELINE_LEN, dir.path()));
    // Each stage ran exactly the items it had not recorded, each once: stage 2
    // took the items stage 1 recorded from the file.
    assert_eq!(take_log(&logs(1)), not_in(&first, PIPELINE_LEN));
    assert_eq!(take_log(&logs(2)), not_in(&second, PIPELINE_LEN));
    assert_eq!(stage_records(&checkpoint, 2).len(), PIPELINE_LEN);

    // Complete: a run takes everything from the file.
    let again = run_pipeline_helper(&checkpoint, dir.path(), None);
    assert_eq!(again, resumed);
    assert_eq!(take_log(&logs(1)), Vec::<u64>::new(), "stage 1 ran again");
    assert_eq!(take_log(&logs(2)), Vec::<u64>::new(), "stage 2 ran again");
}

#[test]
fn a_pipeline_that_failed_in_its_second_stage_resumes_without_rerunning_its_first() {
    let dir = TempDir::new().unwrap();
    let checkpoint = dir.path().join("pipeline.ckpt");
    let logs = |stage| PathBuf::from(stage_log(dir.path().to_str().unwrap(), stage));
    let poison = dir.path().join("poison");
    fs::write(&poison, "").unwrap();
    let input = pipeline_items(300, dir.path());

    let failed = two_stages(input.clone(), &checkpoint)
        .collect()
        .unwrap_err();
    match &failed {
        Error::Stage { stage: 2, error } => assert!(
            matches!(**error, Error::TaskPanicked { item: 13, .. }),
            "{error:?}"
        ),
        other => panic!("expected stage 2's failure, got {other:?}"),
    }
    let (first, second) = (stage_records(&checkpoint, 1), stage_records(&checkpoint, 2));
    assert!(!second.contains(&13), "the failed chunk was recorded");
    take_log(&logs(1));
    take_log(&logs(2));

    fs::remove_file(&poison).unwrap();
    let resumed = two_stages(input, &checkpoint).collect().unwrap();
    assert_eq!(resumed, pipeline_expected(300, dir.path()));
    assert_eq!(take_log(&logs(1)), not_in(&first, 300));
    assert_eq!(take_log(&logs(2)), not_in(&second, 300));
}

/// Keeps odd values.
fn odd(value: &u64) -> bool {
    value % 2 == 1
}

/// Each value, and its half.
fn with_half(value: u64) -> Vec<u64> {
    vec![value, value / 2]
}

fn low_byte(value: u64) -> u64 {
    value & 0xff
}

fn add(a: u64, b: u64) -> u64 {
    a.wrapping_add(b)
}

fn zero() -> u64 {
    0
}

fn count(acc: u64, _: u64) -> u64 {
    acc + 1
}

#[test]
fn every_kind_of_stage_gives_the_same_result_checkpointed_and_run_again() {
    let dir = TempDir::new().unwrap();
    let input = random_u64s(2_000, 5);
    let shaped = |path: Option<&Path>| {
        let pipeline = Pipeline::new(input.clone()).stage_items(200);
        let pipeline = match path {
            Some(path) => pipeline.checkpoint(path),
            None => pipeline,
        };
        pipeline
            .filter_stage(2, odd)
            .flat_map_stage(1, with_half)
            .stage(2, low_byte)
            .reduce(zero, add)
    };
    let plain = shaped(None).unwrap();
    let reduced = dir.path().join("reduce.ckpt");
    assert_eq!(shaped(Some(&reduced)).unwrap(), plain);
    assert_eq!(
        shaped(Some(&reduced)).unwrap(),
        plain,
        "resumed from the file"
    );
    // The reduce stage recorded its whole input: as many items as the flat map made.
    let odd_count = input.iter().filter(|v| odd(v)).count();
    assert_eq!(stage_records(&reduced, 3).len(), 2 * odd_count);

    // A fold stage records its accumulators; the stage after it records nothing.
    let folded = |path: &Path| {
        Pipeline::new(input.clone())
            .checkpoint(path)
            .fold_flush_bytes(1024)
            .stage(2, low_byte)
            .fold_stage(2, zero, count)
            .stage(1, splitmix64)
            .collect()
    };
    let path = dir.path().join("fold.ckpt");
    let mut first = folded(&path).unwrap();
    assert!(first.len() > 2, "flushed every 1 KiB: {first:?}");
    let mut again = folded(&path).unwrap();
    first.sort_unstable();
    again.sort_unstable();
    assert_eq!(again, first, "the same accumulators, from the file");
    assert_eq!(stage_records(&path, 1).len(), 2_000);
    assert_eq!(stage_records(&path, 2).len(), 2_000);
    assert!(
        stage_records(&path, 3).is_empty(),
        "a stage after a fold records nothing"
    );
}

/// Counts and sums the values; logs each item; panics on item 700 while a file
/// named after the log with `.poison` exists.
fn count_and_sum((count, sum): (u64, u64), (index, value, _, log): Item) -> (u64, u64) {
    let poison = format!("{log}.poison");
    assert!(
        index != 700 || !Path::new(&poison).exists(),
        "item 700 is poisoned"
    );
    note_run(index, &log);
    (count + 1, sum.wrapping_add(value))
}

/// What folding `input` with [`count_and_sum`] gives.
fn count_and_sum_of(input: &[Item]) -> (u64, u64) {
    let sum = input
        .iter()
        .fold(0u64, |sum, item| sum.wrapping_add(item.1));
    (input.len() as u64, sum)
}

fn zero_pair() -> (u64, u64) {
    (0, 0)
}

fn add_pairs(a: (u64, u64), b: (u64, u64)) -> (u64, u64) {
    (a.0 + b.0, a.1.wrapping_add(b.1))
}

#[test]
fn a_fold_stage_that_failed_resumes_from_its_recorded_accumulators_folding_each_item_once() {
    let dir = TempDir::new().unwrap();
    let (path, log) = (dir.path().join("fold.ckpt"), dir.path().join("ran.log"));
    let poison = dir.path().join("ran.log.poison");
    fs::write(&poison, "").unwrap();
    let input = items(KILLED_LEN, &log, None);
    let expected = count_and_sum_of(&input);
    let run = |input: Vec<Item>| {
        Pipeline::new(input)
            .checkpoint(&path)
            .stage_items(100)
            .fold_flush_bytes(2048)
            .fold_stage(2, zero_pair, count_and_sum)
            .reduce(zero_pair, add_pairs)
    };

    let failed = run(input.clone()).unwrap_err();
    assert!(
        matches!(&failed, Error::Stage { stage: 1, error } if matches!(**error, Error::TaskPanicked { item: 700, .. })),
        "{failed:?}"
    );
    let recorded = stage_records(&path, 1);
    // Accumulators flushed every 2 KiB of input before item 700 failed.
    assert!(!recorded.is_empty(), "no accumulator recorded");
    assert!(!recorded.contains(&700));
    take_log(&log);

    fs::remove_file(&poison).unwrap();
    assert_eq!(run(input.clone()).unwrap(), expected);
    // Only the items no recorded accumulator folded were folded again.
    assert_eq!(take_log(&log), not_in(&recorded, KILLED_LEN));
    assert_eq!(stage_records(&path, 1).len(), KILLED_LEN);
    assert_eq!(run(input).unwrap(), expected);
    assert_eq!(
        take_log(&log),
        Vec::<u64>::new(),
        "everything from the file"
    );
}

/// As [`count_and_sum`], but the worker aborts on item 500 the first time (a
/// marker file beside the log says it did).
fn count_and_sum_aborting_once(acc: (u64, u64), item: Item) -> (u64, u64) {
    let marker = format!("{}.aborted", item.3);
    if item.0 == 500 && !Path::new(&marker).exists() {
        fs::write(&marker, "").expect("the marker is written");
        std::process::abort();
    }
    count_and_sum(acc, item)
}

#[test]
fn a_fold_worker_lost_mid_stage_leaves_each_item_in_exactly_one_recorded_accumulator() {
    let dir = TempDir::new().unwrap();
    let (path, log) = (dir.path().join("fold.ckpt"), dir.path().join("ran.log"));
    let input = items(KILLED_LEN, &log, None);
    let expected = count_and_sum_of(&input);
    let run = |input: Vec<Item>| {
        Pipeline::new(input)
            .checkpoint(&path)
            .fold_flush_bytes(2048)
            .fold_stage(2, zero_pair, count_and_sum_aborting_once)
            .reduce(zero_pair, add_pairs)
    };
    assert_eq!(run(input.clone()).unwrap(), expected);
    assert!(
        dir.path().join("ran.log.aborted").exists(),
        "no worker died"
    );
    // The dead worker's folds were sent again and recorded once: the file opens
    // (overlapping records are refused) and covers every item once.
    assert_eq!(stage_records(&path, 1).len(), KILLED_LEN);
    take_log(&log);
    assert_eq!(run(input).unwrap(), expected);
    assert_eq!(take_log(&log), Vec::<u64>::new());
}

#[test]
fn a_checkpoint_of_another_pipeline_or_an_unordered_one_is_refused() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("p.ckpt");
    let run = |pipeline: Pipeline<'_, u64>| pipeline.stage(2, low_byte).collect();
    let first = run(Pipeline::new(0..100u64).checkpoint(&path)).unwrap();
    assert_eq!(first, (0..100).map(low_byte).collect::<Vec<_>>());

    // Another stage after the same first one: another pipeline.
    let longer = Pipeline::new(0..100u64)
        .checkpoint(&path)
        .stage(2, low_byte)
        .stage(1, splitmix64)
        .collect();
    assert!(
        matches!(longer, Err(Error::CheckpointOfAnotherJob { .. })),
        "{longer:?}"
    );
    // The same pipeline with another input: refused as its items are read.
    let other = run(Pipeline::new(1..101u64).checkpoint(&path));
    match other {
        Err(Error::Stage { stage: 1, error }) => assert!(
            matches!(*error, Error::CheckpointInputDiffers { .. }),
            "{error:?}"
        ),
        other => panic!("expected the input to differ, got {other:?}"),
    }
    let unordered = run(Pipeline::new(0..100u64).unordered().checkpoint(&path));
    match unordered {
        Err(Error::Checkpoint { reason, .. }) => assert!(reason.contains("unordered"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}
