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
//! (`File::sync_data`) every [`SYNC_RECORDS`](file::SYNC_RECORDS) records or [`SYNC_INTERVAL`](file::SYNC_INTERVAL),
//! whichever comes first, and when the call ends.

mod file;
mod journal;

use std::any::type_name;
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::engine::ends::{Journal, Sink, exact_len};
use crate::engine::job::FoldLedger;
use crate::error::{ErrorPolicy, Result};
use crate::pool::{Pool, task_ref};
use crate::sink::{CollectSink, FoldSink, PartialsSink, items_failed};
use crate::wire::protocol::TaskRef;
use crate::worker::task::{self, Collect, Fold, Plain};

pub(crate) use file::recorded_items;
use file::{Cover, Log, Recorded, open};
use journal::{FilledChunks, FoldRecordingSink, RecordingSink};
pub(crate) use journal::{ResumingSource, StageJournal};

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
    ///   another job is refused ([`Error::CheckpointOfAnotherJob`](crate::Error::CheckpointOfAnotherJob)) before anything
    ///   runs; recorded items whose input differs are refused as they are read
    ///   ([`Error::CheckpointInputDiffers`](crate::Error::CheckpointInputDiffers)). Two closures in one function have the
    ///   same type name: name tasks with `fn` items to tell them apart.
    /// - Each record has a checksum. The file is written append-only, one write per
    ///   chunk as it is delivered, and `fsync`ed every 64 records or 100 ms,
    ///   whichever comes first, and when the call returns: a killed process loses
    ///   nothing it delivered, a machine that crashes at most the last 100 ms. A
    ///   record torn by a crash while it was written (the last one) is dropped and
    ///   its items run again; a damaged record before the last is an error
    ///   ([`Error::Checkpoint`](crate::Error::Checkpoint)), never skipped.
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
    /// anything runs: [`Error::CheckpointOfAnotherJob`](crate::Error::CheckpointOfAnotherJob) for a file written by another
    /// job, [`Error::Checkpoint`](crate::Error::Checkpoint) for a file that is not a checkpoint, is damaged
    /// before its last record, or cannot be read or written. While the input is
    /// read: [`Error::CheckpointInputDiffers`](crate::Error::CheckpointInputDiffers) when recorded items differ from the
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
