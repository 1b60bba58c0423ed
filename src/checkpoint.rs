//! Checkpoints: a `map`'s or `map_reduce`'s completed chunks recorded in a file, so
//! that a run stopped part way resumes where it stopped.
//!
//! The file is append-only:
//!
//! ```text
//! header  b"mpckpt\0\x02" | job length (u32) | job (UTF-8) | checksum (u64)
//! record  b"rec2" | stage (u64) | ranges n (u64) | payload length (u64)
//!         | checksum of the fields (u64)
//!         | n x (first item (u64) | end item (u64, exclusive) | input checksum (u64))
//!         | payload | checksum of everything before (u64)
//! ```
//!
//! Integers are little-endian. The job names the kind of call and the type names of
//! the items, the results and the functions (for a pipeline, of every stage). A
//! record covers one chunk of one stage (0 for a pool's call, a pipeline's stages
//! from 1): the indices of its items in that stage's input, the checksum of their encodings (so a different
//! input is seen when its items are read), and the chunk's reply as the worker sent
//! it (its results back to back, or its partial reduction). The fields have a
//! checksum of their own, so a damaged length is never trusted: a record that is
//! cut short with intact fields, or fails only its last checksum at the end of the
//! file, is a torn last record (a crash while it was written); anything else that
//! fails is damage. Each record is written with one
//! `write(2)` as its chunk is delivered, and the file is `fsync`ed
//! (`File::sync_data`) every [`SYNC_RECORDS`] records or [`SYNC_INTERVAL`],
//! whichever comes first, and when the call ends.

use std::any::type_name;
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::engine::ends::{Filled, Journal, Sink, Source, exact_len, fill_items};
use crate::engine::job::FoldLedger;
use crate::error::{Error, ErrorPolicy, Result};
use crate::pool::{Pool, task_ref};
use crate::sink::{CollectSink, FoldSink, PartialsSink, items_failed};
use crate::wire::codec;
use crate::wire::protocol::TaskRef;
use crate::wire::transport::{Frame, Payload};
use crate::worker::task::{self, Collect, Fold, Plain};

/// The file's first bytes; the last one is the format's version.
const MAGIC: &[u8; 8] = b"mpckpt\0\x02";
/// The first bytes of every record.
const RECORD_TAG: &[u8; 4] = b"rec2";
/// A record's first bytes: tag, three fields, their checksum.
const RECORD_FIXED: usize = 4 + 4 * 8;
/// Bytes of each range a record covers: first, end, input checksum.
const RANGE_BYTES: usize = 3 * 8;
/// Records written between two `fsync`s, at most.
pub(crate) const SYNC_RECORDS: usize = 64;
/// The longest a written record waits for its `fsync` (checked as records come).
pub(crate) const SYNC_INTERVAL: Duration = Duration::from_millis(100);

impl Pool {
    /// A view of the pool whose [`map`](Checkpointed::map) and
    /// [`map_reduce`](Checkpointed::map_reduce) record each completed chunk in the
    /// checkpoint file at `path` and, run again with the same file, skip what it
    /// records: a job stopped part way (killed, crashed, interrupted, failed)
    /// resumes where it stopped and returns exactly what one uninterrupted run
    /// returns.
    ///
    /// The file is created if it does not exist (its directory must), and kept
    /// after the job: run again, the same job reads its input, checks it, and
    /// returns at once from the file. Delete it to start afresh.
    ///
    /// - Records name the items they cover by their index in the input, so chunk
    ///   sizes may differ between runs. The input is read in order each time;
    ///   recorded items are encoded and checked against the record's checksum but
    ///   not sent to workers, and a chunk never spans a recorded item.
    /// - The file's header names the job: `map` or `map_reduce` and the type names
    ///   of the items, the results, the task (and `identity`, `reduce`). A file of
    ///   another job is refused ([`Error::CheckpointOfAnotherJob`]) before anything
    ///   runs; recorded items whose input differs are refused as they are read
    ///   ([`Error::CheckpointInputDiffers`]). Two closures in one function have the
    ///   same type name: name tasks with `fn` items to tell them apart.
    /// - Each record has a checksum. The file is written append-only, one write per
    ///   chunk as it is delivered, and `fsync`ed every 64 records or 100 ms,
    ///   whichever comes first, and when the call returns: a killed process loses
    ///   nothing it delivered, a machine that crashes at most the last 100 ms. A
    ///   record torn by a crash while it was written (the last one) is dropped and
    ///   its items run again; a damaged record before the last is an error
    ///   ([`Error::Checkpoint`]), never skipped.
    /// - A chunk with failed items (under [`ErrorPolicy::Collect`](crate::ErrorPolicy::Collect) or
    ///   [`ErrorPolicy::Skip`](crate::ErrorPolicy::Skip)) is not recorded, so a later run runs it again.
    /// - Items are checked by their encoding, so an item holding a [`SharedSlice`](crate::SharedSlice),
    ///   [`Shared`](crate::Shared), [`Queue`](crate::Queue) or [`Pipe`](crate::Pipe)
    ///   (encoded as a handle naming this process) does not match in another run.
    /// - One run at a time per file: the file is not locked.
    ///
    /// # Examples
    ///
    /// ```standalone_crate
    /// fn square(x: u64) -> u64 {
    ///     x * x
    /// }
    ///
    /// fn main() -> multiproc::Result<()> {
    ///     multiproc::init(); // in a worker process this call serves tasks and never returns
    ///     let dir = std::env::temp_dir().join(format!("multiproc-doc-{}", std::process::id()));
    ///     std::fs::create_dir_all(&dir).expect("a temporary directory");
    ///     let path = dir.join("squares.ckpt");
    ///     let pool = multiproc::Pool::builder().workers(2).build()?;
    ///     let squares: Vec<u64> = pool.checkpoint(&path).map(0..1_000u64, square)?;
    ///     // Run again (after a crash, say): everything comes from the file.
    ///     let again: Vec<u64> = pool.checkpoint(&path).map(0..1_000u64, square)?;
    ///     assert_eq!(squares, again);
    ///     // A checkpoint of another job is refused.
    ///     let other = pool.checkpoint(&path).map(0..1_000u64, |x: u64| x + 1);
    ///     assert!(matches!(other, Err(multiproc::Error::CheckpointOfAnotherJob { .. })));
    ///     std::fs::remove_dir_all(&dir).expect("removed");
    ///     Ok(())
    /// }
    /// ```
    pub fn checkpoint(&self, path: impl AsRef<Path>) -> Checkpointed<'_> {
        Checkpointed::new(self, path.as_ref().to_owned())
    }
}

/// A view of a [`Pool`] whose `map` and `map_reduce` record each completed chunk in
/// a checkpoint file and, run again with the same file, skip what it records.
///
/// Made by [`Pool::checkpoint`]; see there for the guarantees and an example.
#[derive(Debug)]
pub struct Checkpointed<'p> {
    pool: &'p Pool,
    path: PathBuf,
}

impl<'p> Checkpointed<'p> {
    pub(crate) fn new(pool: &'p Pool, path: PathBuf) -> Self {
        Self { pool, path }
    }

    /// The checkpoint file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// [`Pool::map`], resumed from the checkpoint and recording into it.
    ///
    /// Returns exactly what an uninterrupted [`Pool::map`] returns. The input is
    /// read in order: items the checkpoint records are encoded and checked against
    /// it but not sent to workers, their results come from the file; the others
    /// run, and each chunk's results are recorded once delivered.
    ///
    /// # Errors
    ///
    /// As [`Pool::map`] (item indices are those of the whole input), and before
    /// anything runs: [`Error::CheckpointOfAnotherJob`] for a file written by another
    /// job, [`Error::Checkpoint`] for a file that is not a checkpoint, is damaged
    /// before its last record, or cannot be read or written. While the input is
    /// read: [`Error::CheckpointInputDiffers`] when recorded items differ from the
    /// input's. What was recorded before a failure stays in the file.
    pub fn map<I, T, U, F>(&self, items: I, task: F) -> Result<Vec<U>>
    where
        I: IntoIterator<Item = T>,
        T: Serialize + DeserializeOwned,
        U: Serialize + DeserializeOwned,
        F: Fn(T) -> U + Copy + Send + Sync,
    {
        let task = task_ref::<T, U, Plain<F>, Collect, _>(task)?;
        let job = format!(
            "map of {} to {} by {}",
            type_name::<T>(),
            type_name::<U>(),
            type_name::<F>()
        );
        let items = items.into_iter();
        let mut sink = CollectSink {
            results: Vec::with_capacity(items.size_hint().0.min(1 << 20)),
            failed: Vec::new(),
        };
        self.run(&job, items, task, &mut sink)?;
        items_failed(sink.failed)?;
        Ok(sink.results)
    }

    /// [`Pool::map_reduce`], resumed from the checkpoint and recording into it.
    ///
    /// Each chunk's partial reduction is recorded; the parent folds the recorded
    /// and the new partials in input order, so the result equals an uninterrupted
    /// run's for an associative `reduce` with `identity()` its neutral element (as
    /// [`Pool::map_reduce`] asks), commutative or not.
    ///
    /// # Errors
    ///
    /// As [`Pool::map_reduce`] and [`Checkpointed::map`].
    pub fn map_reduce<I, T, U, F, Id, R>(
        &self,
        items: I,
        task: F,
        identity: Id,
        reduce: R,
    ) -> Result<U>
    where
        I: IntoIterator<Item = T>,
        T: Serialize + DeserializeOwned,
        U: Serialize + DeserializeOwned,
        F: Fn(T) -> U + Copy + Send + Sync,
        Id: Fn() -> U + Copy + Send + Sync,
        R: Fn(U, U) -> U + Copy + Send + Sync,
    {
        task::assert_zero_sized::<Id>();
        task::assert_zero_sized::<R>();
        let task = task_ref::<T, U, Plain<F>, Fold<U, Id, R>, _>(task)?;
        let job = format!(
            "map_reduce of {} to {} by {}, identity {}, reduce {}",
            type_name::<T>(),
            type_name::<U>(),
            type_name::<F>(),
            type_name::<Id>(),
            type_name::<R>()
        );
        Resume::open(&self.path, &job)?.map_reduce(
            self.pool,
            0,
            items.into_iter(),
            task,
            identity,
            reduce,
        )
    }

    /// Runs one job through the checkpoint: recorded chunks replayed into `sink`
    /// in input order, the others run and recorded.
    fn run<I, T>(&self, job: &str, items: I, task: TaskRef, sink: &mut dyn Sink) -> Result<()>
    where
        I: Iterator<Item = T>,
        T: Serialize + DeserializeOwned,
    {
        Resume::open(&self.path, job)?.run_lent(self.pool, 0, items, task, sink)
    }
}

/// An opened checkpoint: the file appended to and what it records, for the stages
/// of one job (a pool's call is stage 0; a pipeline's stages count from 1).
pub(crate) struct Resume {
    path: Rc<Path>,
    log: Rc<RefCell<Log>>,
    recorded: Vec<Recorded>,
}

/// One stage's part of a [`Resume`]: its source (which passes over the recorded
/// items), its journal (which replays and records chunks), and how many items run
/// when the input's length is known (for progress bars).
pub(crate) struct Resuming<I> {
    pub(crate) source: ResumingSource<I>,
    pub(crate) journal: StageJournal,
    pub(crate) total: Option<usize>,
}

impl Resume {
    /// Opens (or creates) the checkpoint at `path` for `job`.
    pub(crate) fn open(path: &Path, job: &str) -> Result<Self> {
        let (file, recorded) = open(path, job)?;
        Ok(Self {
            path: path.into(),
            log: Rc::new(RefCell::new(Log::new(file, path))),
            recorded,
        })
    }

    /// The parts of stage `stage`, whose input is `items`.
    pub(crate) fn stage<I: Iterator>(&self, stage: usize, items: I) -> Resuming<I> {
        let recorded: Rc<[Recorded]> = self
            .recorded
            .iter()
            .filter(|record| record.stage == stage)
            .cloned()
            .collect();
        let mut covered: Vec<Cover> = recorded
            .iter()
            .flat_map(|record| record.covers.iter().cloned())
            .collect();
        covered.sort_by_key(|cover| cover.items.start);
        let held: usize = covered.iter().map(|c| c.items.len()).sum();
        let total = exact_len(&items).map(|len| len.saturating_sub(held));
        let filled: Rc<FilledChunks> = Rc::default();
        Resuming {
            source: ResumingSource {
                items,
                position: 0,
                recorded: covered.into(),
                next_record: 0,
                filled: Rc::clone(&filled),
                path: Rc::clone(&self.path),
                scratch: Vec::new(),
            },
            journal: StageJournal {
                log: Rc::clone(&self.log),
                stage,
                recorded,
                next_replay: 0,
                filled,
                staged: Vec::new(),
            },
            total,
        }
    }

    /// Runs the `map_reduce` of stage `stage` (input `items`, `task` made from the
    /// task, `identity` and `reduce` by [`task_ref`]) on `pool`: each chunk's
    /// partial is recorded, and recorded and new partials are folded in input order.
    pub(crate) fn map_reduce<I, T, U, Id, R>(
        &self,
        pool: &Pool,
        stage: usize,
        items: I,
        task: TaskRef,
        identity: Id,
        reduce: R,
    ) -> Result<U>
    where
        I: Iterator<Item = T>,
        T: Serialize + DeserializeOwned,
        U: DeserializeOwned,
        Id: Fn() -> U,
        R: Fn(U, U) -> U,
    {
        let mut sink = FoldSink {
            acc: Some(identity()),
            reduce,
            failed: Vec::new(),
        };
        self.run_lent(pool, stage, items, task, &mut sink)?;
        items_failed(sink.failed)?;
        Ok(sink.acc.expect("acc is refilled after every fold"))
    }

    /// Runs the fold stage `stage` (input `items`, a fold `task`) on `pool`, its
    /// workers flushing their accumulators every `flush_bytes` of input: the
    /// recorded accumulators come first, then the new ones, each recorded with
    /// the chunks it folded; the items recorded are passed over.
    pub(crate) fn fold_partials<I, T, A>(
        &self,
        pool: &Pool,
        stage: usize,
        items: I,
        task: TaskRef,
        flush_bytes: usize,
    ) -> Result<Vec<A>>
    where
        I: Iterator<Item = T>,
        T: Serialize + DeserializeOwned,
        A: DeserializeOwned,
    {
        let Resuming {
            mut source,
            mut journal,
            total,
        } = self.stage(stage, items);
        let mut partials = PartialsSink {
            partials: Vec::new(),
        };
        // Accumulators come out in no particular order: the recorded ones first.
        journal.replay_before(usize::MAX, &mut |items, payload| {
            partials.deliver(0, items.start..items.start, payload)
        })?;
        let mut recording = FoldRecordingSink {
            inner: &mut partials,
            journal,
            pending: HashMap::new(),
        };
        let fold = Some(FoldLedger::new(flush_bytes));
        let call = pool.lent_call(task, None, ErrorPolicy::FailFast, fold);
        let outcome = pool
            .core
            .run_lent_source(call, total, &mut source, &mut recording);
        let synced = recording.journal.sync();
        outcome?;
        synced?;
        Ok(partials.partials)
    }

    /// Runs stage `stage` (input `items`, task `task`) as a blocking call on `pool`:
    /// recorded chunks replayed into `sink` in input order, the others run and
    /// recorded; what was recorded is synced whatever the outcome.
    pub(crate) fn run_lent<I, T>(
        &self,
        pool: &Pool,
        stage: usize,
        items: I,
        task: TaskRef,
        sink: &mut dyn Sink,
    ) -> Result<()>
    where
        I: Iterator<Item = T>,
        T: Serialize + DeserializeOwned,
    {
        let Resuming {
            mut source,
            journal,
            total,
        } = self.stage(stage, items);
        let mut recording = RecordingSink {
            inner: sink,
            journal,
        };
        let call = pool.lent_call(task, None, pool.error_policy, None);
        let outcome = pool
            .core
            .run_lent_source(call, total, &mut source, &mut recording)
            .and_then(|()| recording.replay_before(usize::MAX));
        let synced = recording.journal.sync();
        outcome?;
        synced
    }
}

/// A record found in the file: which items of which stage it covers, and where its
/// payload is. A chunk's record covers one range; a fold stage's accumulator covers
/// every chunk it folded.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Recorded {
    stage: usize,
    covers: Vec<Cover>,
    offset: u64,
    len: usize,
}

impl Recorded {
    /// The items of a chunk's record (its first range).
    fn items(&self) -> &Range<usize> {
        &self.covers[0].items
    }
}

/// Items a record covers, with the checksum of their encodings end to end.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cover {
    items: Range<usize>,
    input: u64,
}

/// Opens (or creates) the checkpoint at `path` for `job`: the file positioned for
/// appending, and its records sorted by first item. A torn last record is cut off.
fn open(path: &Path, job: &str) -> Result<(File, Vec<Recorded>)> {
    let fail = |reason: &str| {
        let reason = reason.to_owned();
        move |source| Error::Checkpoint {
            path: path.to_owned(),
            reason,
            source: Some(source),
        }
    };
    let created = !path.exists();
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(fail("could not open"))?;
    let header = header(job);
    let len = file.metadata().map_err(fail("could not read"))?.len();
    let mut existing = Vec::new();
    (&file)
        .take(header.len() as u64)
        .read_to_end(&mut existing)
        .map_err(fail("could not read"))?;
    if existing.len() < header.len() && header.starts_with(&existing) {
        // New, or its header was torn by a crash as it was written: nothing recorded.
        file.set_len(0).map_err(fail("could not truncate"))?;
        file.write_all_at(&header, 0)
            .map_err(fail("could not write"))?;
        file.sync_data().map_err(fail("could not sync"))?;
        if created {
            sync_parent(path).map_err(fail("could not sync the directory holding"))?;
        }
        file.seek(SeekFrom::End(0))
            .map_err(fail("could not seek"))?;
        return Ok((file, Vec::new()));
    }
    check_header(path, &file, &existing, job)?;
    let mut reader = BufReader::new(&file);
    reader
        .seek(SeekFrom::Start(header.len() as u64))
        .map_err(fail("could not seek"))?;
    let (mut recorded, valid_end) = read_records(path, &mut reader, header.len() as u64, len)?;
    drop(reader);
    if valid_end < len {
        // A torn last record: drop it, so the next record follows the last good one.
        file.set_len(valid_end)
            .map_err(fail("could not cut the torn last record of"))?;
        file.sync_data().map_err(fail("could not sync"))?;
    }
    file.seek(SeekFrom::Start(valid_end))
        .map_err(fail("could not seek"))?;
    recorded.sort_by_key(|r| (r.stage, r.items().start));
    let mut covered: Vec<(usize, &Range<usize>)> = recorded
        .iter()
        .flat_map(|r| r.covers.iter().map(|c| (r.stage, &c.items)))
        .collect();
    covered.sort_by_key(|&(stage, items)| (stage, items.start));
    if let Some(pair) = covered
        .windows(2)
        .find(|pair| pair[0].0 == pair[1].0 && pair[0].1.end > pair[1].1.start)
    {
        return Err(Error::Checkpoint {
            path: path.to_owned(),
            reason: format!(
                "records of items {:?} and {:?}{} overlap",
                pair[0].1,
                pair[1].1,
                stage_name(pair[0].0)
            ),
            source: None,
        });
    }
    Ok((file, recorded))
}

/// The header a checkpoint of `job` starts with.
fn header(job: &str) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(MAGIC.len() + 4 + job.len() + 8);
    bytes.extend_from_slice(MAGIC);
    let len = u32::try_from(job.len()).expect("a job's name is shorter than 4 GiB");
    bytes.extend_from_slice(&len.to_le_bytes());
    bytes.extend_from_slice(job.as_bytes());
    let sum = checksum(&[&bytes]);
    bytes.extend_from_slice(&sum.to_le_bytes());
    bytes
}

/// Refuses a file that is not a checkpoint, or is one of another job. `start` holds
/// the file's first bytes, as many as this job's header has (fewer if it is short).
fn check_header(path: &Path, file: &File, start: &[u8], job: &str) -> Result<()> {
    let not_checkpoint = |reason: &str| Error::Checkpoint {
        path: path.to_owned(),
        reason: format!("not a multiproc checkpoint ({reason})"),
        source: None,
    };
    if start.len() < MAGIC.len() + 4 || &start[..MAGIC.len()] != MAGIC {
        return Err(not_checkpoint("its first bytes are not a checkpoint's"));
    }
    let len = u32::from_le_bytes(start[8..12].try_into().expect("4 bytes")) as usize;
    // The other job's header may be longer than ours: read what it claims.
    let mut found = vec![0; len];
    let mut sum = [0; 8];
    let read = file
        .read_exact_at(&mut found, 12)
        .and_then(|()| file.read_exact_at(&mut sum, 12 + len as u64));
    if read.is_err() {
        return Err(not_checkpoint("its header is cut short"));
    }
    let mut bytes = start[..12].to_vec();
    bytes.extend_from_slice(&found);
    if checksum(&[&bytes]) != u64::from_le_bytes(sum) {
        return Err(not_checkpoint("its header fails its checksum"));
    }
    if found != job.as_bytes() {
        return Err(Error::CheckpointOfAnotherJob {
            path: path.to_owned(),
            found: String::from_utf8_lossy(&found).into_owned(),
            expected: job.to_owned(),
        });
    }
    Ok(())
}

/// Reads every record from `at` to the file's end (`len`). Returns them and where
/// the last good one ends: before `len` when the last record is torn (cut short,
/// failing its checksum, or zeros), which is dropped. A bad record followed by
/// anything else is an error.
fn read_records(
    path: &Path,
    reader: &mut impl Read,
    mut at: u64,
    len: u64,
) -> Result<(Vec<Recorded>, u64)> {
    let damaged = |at: u64, reason: &str| Error::Checkpoint {
        path: path.to_owned(),
        reason: format!("the record at byte {at} is damaged ({reason}) and more follows it"),
        source: None,
    };
    let io_error = |source| Error::Checkpoint {
        path: path.to_owned(),
        reason: "could not read".into(),
        source: Some(source),
    };
    let mut recorded = Vec::new();
    let mut body = Vec::new();
    while at < len {
        let left = len - at;
        if left < (RECORD_FIXED + 8) as u64 {
            return Ok((recorded, at));
        }
        let mut fixed = [0; RECORD_FIXED];
        reader.read_exact(&mut fixed).map_err(io_error)?;
        let word = |i: usize| {
            u64::from_le_bytes(fixed[4 + 8 * i..12 + 8 * i].try_into().expect("8 bytes"))
        };
        let (stage, ranges, size) = (word(0), word(1), word(2));
        if &fixed[..4] != RECORD_TAG || checksum(&[&fixed[..RECORD_FIXED - 8]]) != word(3) {
            // A crash of the machine can leave zeros where the last writes were.
            let mut rest = Vec::new();
            reader.read_to_end(&mut rest).map_err(io_error)?;
            if fixed.iter().chain(&rest).all(|&b| b == 0) {
                return Ok((recorded, at));
            }
            return Err(damaged(at, "its fields fail their checksum"));
        }
        let total = (RECORD_FIXED as u64 + 8)
            .saturating_add(ranges.saturating_mul(RANGE_BYTES as u64))
            .saturating_add(size);
        if total > left {
            return Ok((recorded, at));
        }
        let ranges = usize::try_from(ranges).expect("the ranges fit in the file");
        let size = usize::try_from(size).expect("the payload fits in the file");
        body.clear();
        body.resize(ranges * RANGE_BYTES + size, 0);
        let mut sum = [0; 8];
        reader
            .read_exact(&mut body)
            .and_then(|()| reader.read_exact(&mut sum))
            .map_err(io_error)?;
        let next = at + total;
        if checksum(&[&fixed, &body]) != u64::from_le_bytes(sum) {
            if next == len {
                return Ok((recorded, at));
            }
            return Err(damaged(at, "it fails its checksum"));
        }
        let Ok(stage) = usize::try_from(stage) else {
            return Err(damaged(at, "its stage is out of range"));
        };
        let mut covers = Vec::with_capacity(ranges);
        for range in body[..ranges * RANGE_BYTES].chunks_exact(RANGE_BYTES) {
            let word =
                |i: usize| u64::from_le_bytes(range[8 * i..8 * i + 8].try_into().expect("8 bytes"));
            let (first, end) = (word(0), word(1));
            if first >= end || end > usize::MAX as u64 {
                return Err(damaged(at, "it covers no items"));
            }
            covers.push(Cover {
                items: first as usize..end as usize,
                input: word(2),
            });
        }
        if covers.is_empty() {
            return Err(damaged(at, "it covers no items"));
        }
        recorded.push(Recorded {
            stage,
            covers,
            offset: at + (RECORD_FIXED + ranges * RANGE_BYTES) as u64,
            len: size,
        });
        at = next;
    }
    Ok((recorded, at))
}

/// Makes a new file's name durable: `fsync` of the directory holding it.
fn sync_parent(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

/// The checksum of records, headers and a record's input (its items' encodings end
/// to end): 64 bits, 8 bytes a step.
///
/// Each step (xor a word, multiply by an odd constant, rotate) is a bijection of the
/// state, so changing any one word (or byte) always changes the sum; each part's
/// length is mixed in after it. Not cryptographic: it finds damage, not forgery.
fn checksum(parts: &[&[u8]]) -> u64 {
    let mut hash = SEED;
    for part in parts {
        let mut words = part.chunks_exact(8);
        for word in &mut words {
            hash = mix(hash, u64::from_le_bytes(word.try_into().expect("8 bytes")));
        }
        let mut tail = [0; 8];
        tail[..words.remainder().len()].copy_from_slice(words.remainder());
        hash = mix(hash, u64::from_le_bytes(tail));
        hash = mix(hash, part.len() as u64);
    }
    hash
}

const SEED: u64 = 0xcbf2_9ce4_8422_2325;

fn mix(hash: u64, word: u64) -> u64 {
    (hash ^ word)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .rotate_left(27)
}

/// The chunks a [`ResumingSource`] filled and its [`RecordingSink`] has not yet
/// recorded: their items and their input checksum, in chunk order.
type FilledChunks = RefCell<VecDeque<(Range<usize>, u64)>>;

/// The job's source: reads the input in order, passes over (and checks) the items
/// the checkpoint records, and ends each chunk before the next recorded item, so a
/// chunk's items are contiguous in the input.
pub(crate) struct ResumingSource<I> {
    items: I,
    /// Index of the next item the iterator yields.
    position: usize,
    /// The items this stage's records cover, ascending.
    recorded: Rc<[Cover]>,
    /// The first record not yet passed over.
    next_record: usize,
    filled: Rc<FilledChunks>,
    path: Rc<Path>,
    scratch: Vec<u8>,
}

impl<I, T> ResumingSource<I>
where
    I: Iterator<Item = T>,
    T: Serialize,
{
    /// Reads past the records that start here; how many items they held.
    fn pass_recorded(&mut self) -> Result<usize> {
        let mut passed = 0;
        while let Some(record) = self.recorded.get(self.next_record) {
            if record.items.start != self.position {
                break;
            }
            // Encoded end to end, as in a chunk: the sum does not depend on how
            // items were grouped into chunks when it was recorded.
            self.scratch.clear();
            for index in record.items.clone() {
                let Some(item) = self.items.next() else {
                    return Err(self.differs(record.items.clone()));
                };
                codec::encode_into(&item, &mut self.scratch).map_err(|source| {
                    Error::EncodeItem {
                        item: index,
                        source,
                    }
                })?;
                self.position += 1;
            }
            if checksum(&[&self.scratch]) != record.input {
                return Err(self.differs(record.items.clone()));
            }
            passed += record.items.len();
            self.next_record += 1;
        }
        Ok(passed)
    }

    fn differs(&self, items: Range<usize>) -> Error {
        Error::CheckpointInputDiffers {
            path: self.path.to_path_buf(),
            items,
        }
    }
}

impl<I, T> Source for ResumingSource<I>
where
    I: Iterator<Item = T>,
    T: Serialize + DeserializeOwned,
{
    fn fill(
        &mut self,
        first: usize,
        max_items: usize,
        byte_cap: usize,
        body: &mut Vec<u8>,
    ) -> Result<Filled> {
        debug_assert_eq!(
            first, self.position,
            "the engine counts the items passed over"
        );
        let skipped = self.pass_recorded()?;
        let start = self.position;
        let stop = self
            .recorded
            .get(self.next_record)
            .map_or(usize::MAX, |record| record.items.start);
        let start_len = body.len();
        // A chunk stops short of the next recorded item.
        let max_items = max_items.min(stop.saturating_sub(start));
        let (count, exhausted) = fill_items(&mut self.items, start, max_items, byte_cap, body)?;
        self.position += count;
        if exhausted && let Some(record) = self.recorded.get(self.next_record) {
            // The input ends before items the checkpoint holds: another input.
            return Err(self.differs(record.items.clone()));
        }
        if self.position > start {
            let input = checksum(&[&body[start_len..]]);
            self.filled
                .borrow_mut()
                .push_back((start..self.position, input));
        }
        Ok(Filled {
            count: self.position - start,
            exhausted,
            skipped,
        })
    }

    fn remaining_hint(&self) -> usize {
        let recorded: usize = self.recorded[self.next_record..]
            .iter()
            .map(|record| record.items.len())
            .sum();
        self.items.size_hint().0.saturating_sub(recorded)
    }
}

/// One stage's chunks as they are taken: the recorded ones replayed from the file
/// in input order, the new ones recorded.
pub(crate) struct StageJournal {
    log: Rc<RefCell<Log>>,
    stage: usize,
    /// This stage's records, ascending.
    recorded: Rc<[Recorded]>,
    /// The first record not yet replayed.
    next_replay: usize,
    filled: Rc<FilledChunks>,
    /// The record being written.
    staged: Vec<u8>,
}

impl StageJournal {
    /// The input checksum of the chunk of `items`, the next one taken.
    fn take_filled(&mut self, items: &Range<usize>) -> u64 {
        let (filled, input) = self
            .filled
            .borrow_mut()
            .pop_front()
            .expect("every chunk taken was filled by the stage's source");
        assert_eq!(
            &filled, items,
            "an ordered job delivers its chunks in order"
        );
        input
    }
}

impl Journal for StageJournal {
    fn replay_before(
        &mut self,
        item: usize,
        take: &mut dyn FnMut(Range<usize>, Payload) -> Result<()>,
    ) -> Result<()> {
        while let Some(record) = self.recorded.get(self.next_replay) {
            if record.items().start >= item {
                break;
            }
            let log = self.log.borrow();
            let bytes = log.read(record)?;
            let len = bytes.len();
            take(
                record.items().clone(),
                Payload::new(Frame::Inline(bytes), len),
            )
            .map_err(|error| Error::Checkpoint {
                path: log.path.clone(),
                reason: format!(
                    "the recorded results of items {:?}{} do not decode: {error}",
                    record.items(),
                    stage_name(record.stage)
                ),
                source: None,
            })?;
            self.next_replay += 1;
        }
        Ok(())
    }

    fn stage(&mut self, items: &Range<usize>, payload: &[u8]) {
        let input = self.take_filled(items);
        encode_record(
            &mut self.staged,
            self.stage,
            &[(items.clone(), input)],
            payload,
        );
    }

    fn commit(&mut self) -> Result<()> {
        self.log.borrow_mut().append(&self.staged)
    }

    fn pass(&mut self, items: &Range<usize>) {
        self.take_filled(items);
    }

    fn sync(&mut self) -> Result<()> {
        self.log.borrow_mut().sync()
    }
}

/// " of stage N" for a pipeline's stage, nothing for a pool's call.
fn stage_name(stage: usize) -> String {
    if stage == 0 {
        String::new()
    } else {
        format!(" of stage {stage}")
    }
}

/// A blocking call's sink: before each chunk, the recorded chunks that come before
/// it go to the caller's sink (from the file); then the chunk itself, which is
/// recorded.
struct RecordingSink<'a> {
    inner: &'a mut dyn Sink,
    journal: StageJournal,
}

impl RecordingSink<'_> {
    /// Hands the caller's sink every recorded chunk before item `item`.
    fn replay_before(&mut self, item: usize) -> Result<()> {
        let inner = &mut *self.inner;
        self.journal
            .replay_before(item, &mut |items, payload| inner.deliver(0, items, payload))
    }
}

impl Sink for RecordingSink<'_> {
    fn deliver(&mut self, worker: usize, items: Range<usize>, payload: Payload) -> Result<()> {
        self.replay_before(items.start)?;
        self.journal.stage(&items, &payload);
        self.inner.deliver(worker, items, payload)?;
        self.journal.commit()
    }

    fn deliver_partial(
        &mut self,
        worker: usize,
        items: Range<usize>,
        payload: Payload,
        failed: Vec<(usize, Error)>,
    ) -> Result<()> {
        // A chunk with failed items is not recorded: a later run runs it again.
        self.replay_before(items.start)?;
        self.journal.pass(&items);
        self.inner.deliver_partial(worker, items, payload, failed)
    }

    fn finish(&mut self, outcome: Result<()>) {
        self.inner.finish(outcome);
    }

    fn taken(&self) -> Option<u64> {
        self.inner.taken()
    }
}

/// A fold stage's sink: each accumulator is recorded with the chunks it folded
/// (and their input checksums), once the caller's sink took it.
struct FoldRecordingSink<'a> {
    inner: &'a mut dyn Sink,
    journal: StageJournal,
    /// Chunks filled and not yet folded into an accumulator that came out, by
    /// first item.
    pending: HashMap<usize, (Range<usize>, u64)>,
}

impl Sink for FoldRecordingSink<'_> {
    fn deliver(&mut self, worker: usize, items: Range<usize>, payload: Payload) -> Result<()> {
        // A chunk folded (its accumulator comes later), or one that folded nothing.
        self.inner.deliver(worker, items, payload)
    }

    fn deliver_accumulator(
        &mut self,
        worker: usize,
        items: Range<usize>,
        covers: Vec<Range<usize>>,
        payload: Payload,
    ) -> Result<()> {
        self.pending.extend(
            self.journal
                .filled
                .borrow_mut()
                .drain(..)
                .map(|(items, input)| (items.start, (items, input))),
        );
        let covered: Option<Vec<(Range<usize>, u64)>> = covers
            .iter()
            .map(|items| {
                self.pending
                    .remove(&items.start)
                    .filter(|(filled, _)| filled == items)
            })
            .collect();
        let Some(covered) = covered else {
            // Every chunk an accumulator folded was filled by this stage's source;
            // should that not hold, the accumulator is not recorded (its items run
            // again next time), never recorded wrong.
            debug_assert!(false, "an accumulator folded chunks never filled");
            return self.inner.deliver(worker, items, payload);
        };
        let journal = &mut self.journal;
        encode_record(&mut journal.staged, journal.stage, &covered, &payload);
        self.inner.deliver(worker, items, payload)?;
        journal.commit()
    }

    fn finish(&mut self, outcome: Result<()>) {
        self.inner.finish(outcome);
    }

    fn taken(&self) -> Option<u64> {
        self.inner.taken()
    }
}

/// Encodes the record of stage `stage` covering `covers` (items and their input
/// checksum) into `staged`.
fn encode_record(
    staged: &mut Vec<u8>,
    stage: usize,
    covers: &[(Range<usize>, u64)],
    payload: &[u8],
) {
    staged.clear();
    staged.extend_from_slice(RECORD_TAG);
    for word in [stage as u64, covers.len() as u64, payload.len() as u64] {
        staged.extend_from_slice(&word.to_le_bytes());
    }
    let fields = checksum(&[&staged[..]]);
    staged.extend_from_slice(&fields.to_le_bytes());
    for (items, input) in covers {
        for word in [items.start as u64, items.end as u64, *input] {
            staged.extend_from_slice(&word.to_le_bytes());
        }
    }
    staged.extend_from_slice(payload);
    let sum = checksum(&[&staged[..RECORD_FIXED], &staged[RECORD_FIXED..]]);
    staged.extend_from_slice(&sum.to_le_bytes());
}

/// The file being appended to, and when it was last synced.
struct Log {
    file: File,
    path: PathBuf,
    unsynced: usize,
    synced_at: Instant,
}

impl Log {
    fn new(file: File, path: &Path) -> Self {
        Self {
            file,
            path: path.to_owned(),
            unsynced: 0,
            synced_at: Instant::now(),
        }
    }

    /// Writes one encoded record (one `write(2)`); syncs when the batch is full or
    /// old enough.
    fn append(&mut self, record: &[u8]) -> Result<()> {
        self.file
            .write_all(record)
            .map_err(|source| self.error("could not write", source))?;
        self.unsynced += 1;
        if self.unsynced >= SYNC_RECORDS || self.synced_at.elapsed() >= SYNC_INTERVAL {
            self.sync()?;
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<()> {
        if self.unsynced > 0 {
            self.file
                .sync_data()
                .map_err(|source| self.error("could not sync", source))?;
            self.unsynced = 0;
        }
        self.synced_at = Instant::now();
        Ok(())
    }

    /// A record's payload, read back from the file.
    fn read(&self, record: &Recorded) -> Result<Vec<u8>> {
        let mut bytes = vec![0; record.len];
        self.file
            .read_exact_at(&mut bytes, record.offset)
            .map_err(|source| self.error("could not read", source))?;
        Ok(bytes)
    }

    fn error(&self, reason: &str, source: io::Error) -> Error {
        Error::Checkpoint {
            path: self.path.clone(),
            reason: reason.to_owned(),
            source: Some(source),
        }
    }
}

/// The items a checkpoint file records for stage `stage` (0 for a pool's call),
/// ascending, whatever its job (for tests).
pub(crate) fn recorded_items(path: &Path, stage: usize) -> Result<Vec<Range<usize>>> {
    let error = |source| Error::Checkpoint {
        path: path.to_owned(),
        reason: "could not read".into(),
        source: Some(source),
    };
    let file = File::open(path).map_err(error)?;
    let len = file.metadata().map_err(error)?.len();
    let mut start = [0; MAGIC.len() + 4];
    file.read_exact_at(&mut start, 0).map_err(error)?;
    let job_len = u64::from(u32::from_le_bytes(start[8..].try_into().expect("4 bytes")));
    let at = start.len() as u64 + job_len + 8;
    let mut reader = BufReader::new(&file);
    reader.seek(SeekFrom::Start(at)).map_err(error)?;
    let (recorded, _) = read_records(path, &mut reader, at, len)?;
    let mut items: Vec<Range<usize>> = recorded
        .into_iter()
        .filter(|r| r.stage == stage)
        .flat_map(|r| r.covers.into_iter().map(|c| c.items))
        .collect();
    items.sort_by_key(|items| items.start);
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(items: Range<usize>, payload: &[u8]) -> Vec<u8> {
        let mut staged = Vec::new();
        encode_record(&mut staged, 0, &[(items, 7)], payload);
        staged
    }

    fn read(bytes: &[u8]) -> Result<(Vec<Recorded>, u64)> {
        read_records(Path::new("x"), &mut &bytes[..], 0, bytes.len() as u64)
    }

    #[test]
    fn a_torn_or_zeroed_tail_is_dropped_and_damage_before_it_is_refused() {
        let mut bytes = record(0..3, b"abc");
        let first = bytes.len() as u64;
        bytes.extend(record(3..5, b"defgh"));
        let (recorded, end) = read(&bytes).unwrap();
        assert_eq!(recorded.len(), 2);
        assert_eq!(end, bytes.len() as u64);
        for cut in 1..bytes.len() - first as usize {
            let (recorded, end) = read(&bytes[..bytes.len() - cut]).unwrap();
            assert_eq!((recorded.len(), end), (1, first), "cut {cut}");
        }
        let mut zeroed = bytes.clone();
        zeroed[first as usize..].fill(0);
        assert_eq!(read(&zeroed).unwrap().1, first);
        // The last record's payload damaged: torn. The first's: damage.
        let mut last = bytes.clone();
        *last.last_mut().unwrap() ^= 1;
        assert_eq!(read(&last).unwrap().1, first);
        for at in [0, 5, RECORD_FIXED + 1] {
            let mut damaged = bytes.clone();
            damaged[at] ^= 1;
            assert!(
                matches!(read(&damaged), Err(Error::Checkpoint { .. })),
                "byte {at}"
            );
        }
    }

    #[test]
    fn a_record_covering_several_ranges_reads_back_whole() {
        let mut bytes = Vec::new();
        encode_record(&mut bytes, 3, &[(4..9, 11), (20..21, 12)], b"accumulator");
        let (recorded, end) = read(&bytes).unwrap();
        assert_eq!(end, bytes.len() as u64);
        assert_eq!(recorded.len(), 1);
        let record = &recorded[0];
        assert_eq!(record.stage, 3);
        let covers: Vec<_> = record
            .covers
            .iter()
            .map(|c| (c.items.clone(), c.input))
            .collect();
        assert_eq!(covers, vec![(4..9, 11), (20..21, 12)]);
        let at = record.offset as usize;
        assert_eq!(&bytes[at..at + record.len], b"accumulator");
        // A record covering nothing is damage, not a record.
        let mut empty = Vec::new();
        encode_record(&mut empty, 3, &[], b"x");
        empty.extend(record_bytes_after());
        assert!(matches!(read(&empty), Err(Error::Checkpoint { .. })));
    }

    /// A good record, so that a bad one before it is damage rather than a torn end.
    fn record_bytes_after() -> Vec<u8> {
        record(0..1, b"y")
    }

    #[test]
    fn a_header_torn_as_it_was_written_starts_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("torn.ckpt");
        let full = header("map of a to b by c");
        std::fs::write(&path, &full[..full.len() - 3]).unwrap();
        let (_, recorded) = open(&path, "map of a to b by c").unwrap();
        assert!(recorded.is_empty());
        assert_eq!(std::fs::read(&path).unwrap(), full);
        let error = open(&path, "map of a to b by d").unwrap_err();
        assert!(
            matches!(error, Error::CheckpointOfAnotherJob { .. }),
            "{error:?}"
        );
    }

    #[test]
    fn the_checksum_sees_every_changed_byte() {
        let bytes: Vec<u8> = (0..37).collect();
        let sum = checksum(&[&bytes]);
        for at in 0..bytes.len() {
            let mut changed = bytes.clone();
            changed[at] ^= 0x80;
            assert_ne!(checksum(&[&changed]), sum, "byte {at}");
        }
        assert_ne!(checksum(&[&bytes[..8], &bytes[8..]]), sum);
    }
}
