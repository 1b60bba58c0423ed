//! Stages of workers joined by bounded queues: a source, stages, a sink in the parent.
//!
//! Each stage is an `imap` job on a pool of its own (a fold stage: a fold job, whose
//! workers keep an accumulator across chunks), whose input is the previous
//! stage's output: items pass through the parent between stages, a bounded window
//! of chunks at a time (see `docs/ARCHITECTURE.md` for why not worker to worker). The
//! end of the input is the end of the source iterator, passed along stage by stage,
//! never "a queue looked empty".

use std::any::type_name;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::builder::progress_setting;
use crate::checkpoint::{Resume, Resuming};
use crate::engine::progress::Bars;
use crate::engine::stats::JobStats;
use crate::engine::trace::Trace;
use crate::error::{Error, Result};
use crate::handle::{Imap, ImapUnordered, JournaledImap};
use crate::pool::{Pool, task_ref};
use crate::wire::protocol::TaskRef;
use crate::worker::task::{self, Collect, Fold, Plain};

/// Items a stage may hold in flight by default (in its workers and in the reorder
/// window), whatever their size; payload bytes are bounded too (64 MiB per stage).
pub const DEFAULT_STAGE_ITEMS: usize = 65_536;

/// Encoded input a worker of a [`fold_stage`](Pipeline::fold_stage) folds, by
/// default, before it is asked for its accumulator: the parent keeps that input
/// until then, to send it again should the worker die.
pub const DEFAULT_FOLD_FLUSH_BYTES: usize = 64 << 20;

/// A stream of items under construction: a source, then stages of worker processes,
/// then a sink in the parent.
///
/// ```standalone_crate
/// fn main() -> multiproc::Result<()> {
///     multiproc::init(); // in a worker process this call serves tasks and never returns
///     let lengths: Vec<usize> = multiproc::Pipeline::new(0..1_000u64)
///         .stage(2, |n: u64| "x".repeat((n % 7) as usize)) // in 2 worker processes
///         .filter_stage(1, |s: &String| !s.is_empty())       // in 1 more
///         .stage(2, |s: String| s.len())                      // and 2 more
///         .collect()?;
///     assert_eq!(lengths.len(), 1_000 - 143);
///     Ok(())
/// }
/// ```
///
/// Stages run at once, each in its own set of workers, and a fast stage waits for a
/// slow one instead of filling memory: each stage holds at most
/// [`stage_items`](Pipeline::stage_items) items (default
/// [`DEFAULT_STAGE_ITEMS`]) and 64 MiB of results in flight. Results keep the input
/// order unless [`unordered`](Pipeline::unordered) is asked for. The first failure
/// ends the pipeline (fail fast) with [`Error::Stage`], naming the stage and, inside,
/// the item (its index in that stage's input) and the worker. Dropping a pipeline,
/// or the end of its sink, stops every stage's workers.
pub struct Pipeline<'a, T> {
    build: Builder<'a, T>,
    settings: Settings,
}

/// Builds the stream of a pipeline once the sink runs.
type Builder<'a, T> = Box<dyn FnOnce(&Settings) -> Result<Stream<'a, T>> + 'a>;

/// A stage's output, item by item.
type Stream<'a, T> = Box<dyn Iterator<Item = Result<T>> + 'a>;

/// How the pipeline runs; chosen on the builder, applied to every stage.
#[derive(Clone)]
struct Settings {
    ordered: bool,
    stage_items: usize,
    inherit_output: bool,
    stats: Arc<Counters>,
    stages: usize,
    fold_flush_bytes: usize,
    progress: bool,
    trace: Option<PathBuf>,
    /// The checkpoint file asked for, if any.
    checkpoint: Option<PathBuf>,
    /// What the pipeline is, for its checkpoint's header: the source's item type
    /// and every stage's kind, types and functions.
    job: String,
    /// A stage added after a fold stage: its input's order depends on timing, so
    /// its chunks are not recorded.
    after_fold: bool,
    /// The opened checkpoint, once the pipeline runs.
    resume: Option<Rc<Resume>>,
}

impl Settings {
    /// Notes the next stage in the job's description; returns its number.
    fn add_stage(&mut self, description: fmt::Arguments<'_>) -> usize {
        self.stages += 1;
        self.job = format!("{}; stage {}: {description}", self.job, self.stages);
        self.stages
    }

    /// The settings the stages run with: the checkpoint opened when one was asked
    /// for.
    fn opened(&self) -> Result<Settings> {
        let mut settings = self.clone();
        if let Some(path) = &self.checkpoint {
            if !self.ordered {
                return Err(Error::Checkpoint {
                    path: path.clone(),
                    reason: "an unordered pipeline cannot be resumed: its stages' inputs come \
                             in another order each run (drop `unordered` or the checkpoint)"
                        .into(),
                    source: None,
                });
            }
            settings.resume = Some(Rc::new(Resume::open(path, &self.job)?));
        }
        Ok(settings)
    }

    /// The opened checkpoint, when stage `recorded` records its chunks in it.
    fn resume(&self, recorded: bool) -> Option<&Resume> {
        self.resume.as_deref().filter(|_| recorded)
    }
}

#[derive(Default)]
struct Counters {
    read: AtomicU64,
    done: AtomicU64,
    peak: AtomicU64,
    /// Each stage's figures, recorded when its workers stop.
    stages: Mutex<BTreeMap<usize, JobStats>>,
    /// The trace file and the bars every stage shares, made by the first stage.
    trace: Mutex<Option<Arc<Trace>>>,
    bars: Mutex<Option<Bars>>,
}

impl Counters {
    fn read_one(&self) {
        let read = self.read.fetch_add(1, Ordering::Relaxed) + 1;
        let in_flight = read.saturating_sub(self.done.load(Ordering::Relaxed));
        self.peak.fetch_max(in_flight, Ordering::Relaxed);
    }

    fn done_one(&self) {
        self.done.fetch_add(1, Ordering::Relaxed);
    }

    /// Records the figures of stage `number`, whose workers are stopping.
    fn stage_ended(&self, number: usize, pool: &Pool) {
        if let Ok(stats) = pool.stats() {
            self.stages
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(number, stats.totals);
        }
    }
}

/// Counters of a pipeline, readable while and after it runs.
#[derive(Clone)]
pub struct PipelineStats(Arc<Counters>);

impl PipelineStats {
    /// Items read from the source so far.
    pub fn read(&self) -> u64 {
        self.0.read.load(Ordering::Relaxed)
    }

    /// Items that came out of the last stage (or, for
    /// [`reduce`](Stage::reduce), that entered it; a
    /// [`fold_stage`](Pipeline::fold_stage) lets out its accumulators, not its
    /// items).
    pub fn done(&self) -> u64 {
        self.0.done.load(Ordering::Relaxed)
    }

    /// The most items read from the source and not yet done at any moment.
    pub fn peak_in_flight(&self) -> u64 {
        self.0.peak.load(Ordering::Relaxed)
    }

    /// The figures of stage `number` (stages count from 1, in the order they
    /// were added), once its workers have stopped: at the end of the run, or
    /// earlier for a fold stage. Its [`JobStats::summary`] says where the stage's
    /// time went.
    pub fn stage(&self, number: usize) -> Option<JobStats> {
        self.0
            .stages
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&number)
            .cloned()
    }

    /// Every stage's figures recorded so far, by stage number.
    pub fn stages(&self) -> Vec<(usize, JobStats)> {
        let stages = self.0.stages.lock().unwrap_or_else(PoisonError::into_inner);
        stages.iter().map(|(&n, s)| (n, s.clone())).collect()
    }
}

impl fmt::Debug for PipelineStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PipelineStats")
            .field("read", &self.read())
            .field("done", &self.done())
            .field("peak_in_flight", &self.peak_in_flight())
            .finish()
    }
}

/// The settings every pipeline and stage takes, so a chain reads the same wherever
/// a setter is called: `Pipeline`'s and `Stage`'s are this one block.
macro_rules! settings_setters {
    () => {
        /// Items flow in completion order instead of input order: a slow item does not
        /// hold back the ones after it.
        pub fn unordered(mut self) -> Self {
            self.settings.ordered = false;
            self
        }

        /// Most items each stage holds in flight (at least one per chunk window).
        pub fn stage_items(mut self, items: usize) -> Self {
            self.settings.stage_items = items.max(1);
            self
        }

        /// Whether the stages' worker processes write to this process's stdout and
        /// stderr (the default) or to `/dev/null`.
        pub fn inherit_output(mut self, inherit: bool) -> Self {
            self.settings.inherit_output = inherit;
            self
        }

        /// Encoded input a worker of a [`fold_stage`](Pipeline::fold_stage) folds before
        /// it is asked for its accumulator (default [`DEFAULT_FOLD_FLUSH_BYTES`]): what
        /// this process keeps to send again if that worker dies, and how often partial
        /// accumulators come out.
        pub fn fold_flush_bytes(mut self, bytes: usize) -> Self {
            self.settings.fold_flush_bytes = bytes.max(1);
            self
        }

        /// Draws a progress bar per stage on stderr, as
        /// [`PoolBuilder::progress`](crate::PoolBuilder::progress) does for a pool's
        /// jobs (and as it, `MULTIPROC_PROGRESS` overrides this).
        pub fn progress(mut self, on: bool) -> Self {
            self.settings.progress = on;
            self
        }

        /// Writes the pipeline's timeline to `path`, one process per stage, as
        /// [`PoolBuilder::trace`](crate::PoolBuilder::trace) does for a pool.
        pub fn trace(mut self, path: impl AsRef<Path>) -> Self {
            self.settings.trace = Some(path.as_ref().to_owned());
            self
        }

        /// Makes the pipeline resumable: each stage records its completed chunks in
        /// the checkpoint file at `path` (one file for every stage) and, run again
        /// with the same file, passes over what it records, as
        /// [`Pool::checkpoint`](crate::Pool::checkpoint) does for one call. A
        /// pipeline stopped part way (killed, crashed, failed) resumes where each of
        /// its stages stopped and yields exactly what one uninterrupted run yields.
        ///
        /// - A stage's records name its chunks by the indices of its input items,
        ///   with their checksum: the input is read again in order, recorded items
        ///   are checked and not sent to workers, and their results come from the
        ///   file. A stage whose input was recorded by the stage before it takes
        ///   that input from the file too, so a resumed run reruns only the work no
        ///   stage recorded.
        /// - A [`fold_stage`](Pipeline::fold_stage) records each accumulator that
        ///   comes out with the chunks it folded (an accumulator comes out each
        ///   [`fold_flush_bytes`](Pipeline::fold_flush_bytes) of a worker's input and
        ///   at the end: lower it to lose less to a crash); run again, the recorded
        ///   accumulators come out first and only the items none of them folded are
        ///   folded. Stages after a fold stage record nothing (their input's order
        ///   depends on timing) and run again. [`Stage::reduce`] records each
        ///   chunk's partial.
        /// - The file's header names the pipeline: the source's item type and
        ///   every stage's kind, types and functions; a file of another pipeline is
        ///   refused ([`Error::CheckpointOfAnotherJob`]) before any stage starts.
        /// - Ordered pipelines only: with [`unordered`](Pipeline::unordered), the
        ///   run fails with [`Error::Checkpoint`] before any stage starts.
        /// - Durability, torn records and what a damaged file does are as for
        ///   [`Pool::checkpoint`](crate::Pool::checkpoint).
        ///
        /// ```standalone_crate
        /// fn double(x: u64) -> u64 {
        ///     2 * x
        /// }
        ///
        /// fn ends_in_zero(x: &u64) -> bool {
        ///     x % 10 == 0
        /// }
        ///
        /// fn main() -> multiproc::Result<()> {
        ///     multiproc::init(); // in a worker process this call serves tasks and never returns
        ///     let dir = std::env::temp_dir().join(format!("multiproc-doc-p{}", std::process::id()));
        ///     std::fs::create_dir_all(&dir).expect("a temporary directory");
        ///     let path = dir.join("pipeline.ckpt");
        ///     let run = || {
        ///         multiproc::Pipeline::new(0..1_000u64)
        ///             .checkpoint(&path)
        ///             .stage(2, double)
        ///             .filter_stage(1, ends_in_zero)
        ///             .collect()
        ///     };
        ///     let first: Vec<u64> = run()?;
        ///     // Run again (after a crash, say): every stage reads its results from the file.
        ///     assert_eq!(run()?, first);
        ///     assert_eq!(first.len(), 200);
        ///     std::fs::remove_dir_all(&dir).expect("removed");
        ///     Ok(())
        /// }
        /// ```
        pub fn checkpoint(mut self, path: impl AsRef<Path>) -> Self {
            self.settings.checkpoint = Some(path.as_ref().to_owned());
            self
        }

        /// The pipeline's counters, to read while or after it runs.
        pub fn stats(&self) -> PipelineStats {
            PipelineStats(Arc::clone(&self.settings.stats))
        }
    };
}

impl<'a, T: 'a> Pipeline<'a, T> {
    /// A pipeline whose items come from `source`, read lazily in this process.
    pub fn new<I>(source: I) -> Self
    where
        I: IntoIterator<Item = T>,
        I::IntoIter: 'a,
    {
        let source = source.into_iter();
        Pipeline {
            build: Box::new(move |settings: &Settings| {
                let stats = Arc::clone(&settings.stats);
                let stream: Stream<'a, T> = Box::new(source.map(move |item| {
                    stats.read_one();
                    Ok(item)
                }));
                Ok(stream)
            }),
            settings: Settings {
                ordered: true,
                stage_items: DEFAULT_STAGE_ITEMS,
                inherit_output: true,
                stats: Arc::default(),
                stages: 0,
                fold_flush_bytes: DEFAULT_FOLD_FLUSH_BYTES,
                progress: false,
                trace: None,
                checkpoint: None,
                job: format!("pipeline from {}", type_name::<T>()),
                after_fold: false,
                resume: None,
            },
        }
    }

    settings_setters!();

    /// Adds a stage: `task` runs on every item in a set of `workers` processes of
    /// its own.
    pub fn stage<U, F>(self, workers: usize, task: F) -> Stage<'a, T, U, F>
    where
        T: Serialize + DeserializeOwned,
        U: Serialize + DeserializeOwned + 'a,
        F: Fn(T) -> U + Copy + Send + Sync + 'a,
    {
        task::assert_zero_sized::<F>();
        let mut settings = self.settings.clone();
        settings.add_stage(format_args!(
            "stage of {} to {} by {}",
            type_name::<T>(),
            type_name::<U>(),
            type_name::<F>()
        ));
        Stage {
            upstream: self,
            workers,
            task,
            settings,
            _output: PhantomData,
        }
    }

    /// Adds a stage whose `task` turns each item into any number of items.
    pub fn flat_map_stage<U, F>(self, workers: usize, task: F) -> Pipeline<'a, U>
    where
        T: Serialize + DeserializeOwned,
        U: Serialize + DeserializeOwned + 'a,
        F: Fn(T) -> Vec<U> + Copy + Send + Sync + 'a,
    {
        task::assert_zero_sized::<F>();
        self.stage(workers, task).into_pipeline().then(
            |items: Stream<'a, Vec<U>>| -> Stream<'a, U> {
                Box::new(items.flat_map(|batch| -> Stream<'a, U> {
                    match batch {
                        Ok(batch) => Box::new(batch.into_iter().map(Ok)),
                        Err(e) => Box::new(std::iter::once(Err(e))),
                    }
                }))
            },
        )
    }

    /// Adds a stage that keeps the items for which `keep` is true.
    pub fn filter_stage<F>(self, workers: usize, keep: F) -> Pipeline<'a, T>
    where
        T: Serialize + DeserializeOwned,
        F: Fn(&T) -> bool + Copy + Send + Sync + 'a,
    {
        task::assert_zero_sized::<F>();
        let _ = keep;
        let mut pipeline = self;
        pipeline.settings.job =
            format!("{}; filter by {}", pipeline.settings.job, type_name::<F>());
        pipeline
            .stage(workers, move |item: T| keep(&item).then_some(item))
            .into_pipeline()
            .then(|items: Stream<'a, Option<T>>| -> Stream<'a, T> {
                Box::new(items.filter_map(Result::transpose))
            })
    }

    /// Adds a stage that folds every item into an accumulator per worker, kept in
    /// that worker across chunks, and passes on the accumulators: `fold` runs in a
    /// set of `workers` processes of its own, each starting from `identity()`. The
    /// stage yields each worker's accumulator once its input has ended (and a
    /// worker's accumulator so far each time it has folded
    /// [`fold_flush_bytes`](Pipeline::fold_flush_bytes) of input), so it usually
    /// ends in [`reduce`](Pipeline::reduce), as rayon's `fold` does.
    ///
    /// Unlike [`Stage::reduce`], nothing is built, sent or merged per chunk: a word
    /// count folds each batch straight into the worker's one map. Which items a
    /// worker folds, and in what order, depends on timing, so `fold` and the
    /// combining afterwards must give the same answer for any grouping and order of
    /// the items (a sum, a count, a union).
    ///
    /// A worker that dies takes nothing with it: this process keeps the input the
    /// worker folded since its last flush and sends it again to the others, so
    /// every item is folded into exactly one accumulator that comes out. An item
    /// whose task kills its worker again and again (past the retries) or panics
    /// fails the pipeline with [`Error::Stage`] naming the stage, the item and the
    /// worker; no partial result is delivered.
    ///
    /// ```standalone_crate
    /// fn main() -> multiproc::Result<()> {
    ///     multiproc::init(); // in a worker process this call serves tasks and never returns
    ///     let (count, sum) = multiproc::Pipeline::new(1..=100u64)
    ///         .fold_stage(2, || (0u64, 0u64), |(n, s), x: u64| (n + 1, s + x))
    ///         .reduce(|| (0, 0), |a, b| (a.0 + b.0, a.1 + b.1))?;
    ///     assert_eq!((count, sum), (100, 5050));
    ///     Ok(())
    /// }
    /// ```
    ///
    /// A fold that captures a variable does not compile (pass state in the items):
    ///
    /// ```compile_fail,E0080
    /// # fn main() -> multiproc::Result<()> {
    /// let offset = 10u64;
    /// let total = multiproc::Pipeline::new(0..4u64)
    ///     .fold_stage(2, || 0u64, move |acc, x: u64| acc + x + offset)
    ///     .reduce(|| 0, |a, b| a + b)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn fold_stage<A, Id, F>(self, workers: usize, identity: Id, fold: F) -> Pipeline<'a, A>
    where
        T: Serialize + DeserializeOwned,
        A: Serialize + DeserializeOwned + 'static,
        Id: Fn() -> A + Copy + Send + Sync + 'a,
        F: Fn(A, T) -> A + Copy + Send + Sync + 'a,
    {
        task::assert_zero_sized::<Id>();
        task::assert_zero_sized::<F>();
        let _ = (identity, fold);
        let mut settings = self.settings.clone();
        let number = settings.add_stage(format_args!(
            "fold_stage of {} into {} by {}, identity {}",
            type_name::<T>(),
            type_name::<A>(),
            type_name::<F>(),
            type_name::<Id>()
        ));
        let recorded = !settings.after_fold;
        settings.after_fold = true;
        let build = self.build;
        Pipeline {
            build: Box::new(move |settings: &Settings| -> Result<Stream<'a, A>> {
                let input = build(settings)?;
                let pool = stage_pool(settings, workers, number)?;
                let error = Rc::new(RefCell::new(None));
                let feed = Feed {
                    input,
                    error: Rc::clone(&error),
                };
                let flush = settings.fold_flush_bytes;
                let folded = match settings.resume(recorded) {
                    Some(resume) => TaskRef::fold::<T, A, Id, F>()
                        .ok_or(Error::TaskNotInExecutable)
                        .and_then(|task| resume.fold_partials(&pool, number, feed, task, flush)),
                    None => pool.fold_partials::<_, T, A, Id, F>(feed, flush),
                };
                // This stage's workers are done: stop them before the next stage runs.
                settings.stats.stage_ended(number, &pool);
                drop(pool);
                // An error from upstream comes first: this stage's input ended because of it.
                if let Some(e) = error.borrow_mut().take() {
                    return Err(e);
                }
                let partials = folded.map_err(|e| Error::Stage {
                    stage: number,
                    error: Box::new(e),
                })?;
                Ok(Box::new(partials.into_iter().map(Ok)))
            }),
            settings,
        }
    }

    /// Runs the pipeline and returns every item that comes out, in input order
    /// unless [`unordered`](Pipeline::unordered).
    ///
    /// # Errors
    ///
    /// [`Error::Stage`] for the first failure of a stage; the errors of
    /// [`PoolBuilder::build`](crate::PoolBuilder::build) when a stage's workers cannot
    /// start.
    pub fn collect(self) -> Result<Vec<T>> {
        let mut out = Vec::new();
        self.for_each(|item| out.push(item))?;
        Ok(out)
    }

    /// Runs the pipeline and hands every item that comes out to `f`, here in the
    /// parent, as it comes.
    ///
    /// # Errors
    ///
    /// As [`Pipeline::collect`].
    pub fn for_each(self, mut f: impl FnMut(T)) -> Result<()> {
        let stats = Arc::clone(&self.settings.stats);
        let _run = Run(Arc::clone(&stats));
        let settings = self.settings.opened()?;
        let stream = (self.build)(&settings)?;
        for item in stream {
            f(item?);
            stats.done_one();
        }
        Ok(())
    }

    /// Runs the pipeline and folds every item that comes out with `combine`, from
    /// `identity()`, in the parent. After [`stage`](Pipeline::stage), use
    /// [`Stage::reduce`], which folds in that stage's workers first.
    ///
    /// # Errors
    ///
    /// As [`Pipeline::collect`].
    pub fn reduce<Id, R>(self, identity: Id, combine: R) -> Result<T>
    where
        Id: Fn() -> T,
        R: Fn(T, T) -> T,
    {
        let mut acc = Some(identity());
        self.for_each(|item| {
            let so_far = acc.take().expect("refilled after every item");
            acc = Some(combine(so_far, item));
        })?;
        Ok(acc.expect("refilled after every item"))
    }

    /// Applies `f` to the stream this pipeline will produce.
    fn then<V: 'a>(self, f: impl FnOnce(Stream<'a, T>) -> Stream<'a, V> + 'a) -> Pipeline<'a, V> {
        let build = self.build;
        Pipeline {
            build: Box::new(move |settings: &Settings| build(settings).map(f)),
            settings: self.settings,
        }
    }
}

/// A pipeline whose last step is a stage: it can still fold inside that stage's
/// workers ([`Stage::reduce`]); every other method is that of [`Pipeline`].
pub struct Stage<'a, P, T, F> {
    upstream: Pipeline<'a, P>,
    workers: usize,
    task: F,
    settings: Settings,
    _output: PhantomData<fn() -> T>,
}

impl<'a, P, T, F> Stage<'a, P, T, F>
where
    P: Serialize + DeserializeOwned + 'a,
    T: Serialize + DeserializeOwned + 'a,
    F: Fn(P) -> T + Copy + Send + Sync + 'a,
{
    settings_setters!();

    /// The stage as a plain pipeline: an `imap` on a pool of its own.
    fn into_pipeline(self) -> Pipeline<'a, T> {
        let Stage {
            upstream,
            workers,
            task,
            settings,
            ..
        } = self;
        let number = settings.stages;
        let recorded = !settings.after_fold;
        let build = upstream.build;
        Pipeline {
            build: Box::new(move |settings: &Settings| -> Result<Stream<'a, T>> {
                let input = build(settings)?;
                let pool = stage_pool(settings, workers, number)?;
                let upstream = Rc::new(RefCell::new(None));
                let feed = Feed {
                    input,
                    error: Rc::clone(&upstream),
                };
                let outputs: Stream<'a, T> = if let Some(resume) = settings.resume(recorded) {
                    let task = task_ref::<P, T, Plain<F>, Collect, _>(task)?;
                    let Resuming {
                        source,
                        journal,
                        total,
                    } = resume.stage(number, feed);
                    let parts =
                        pool.start_imap_source(source, total, Some(Box::new(journal)), task, true)?;
                    Box::new(JournaledImap::new(parts))
                } else if settings.ordered {
                    let parts = pool.start_imap::<_, P, T, F>(feed, task, true)?;
                    Box::new(Imap::new(parts))
                } else {
                    let parts = pool.start_imap::<_, P, T, F>(feed, task, false)?;
                    Box::new(ImapUnordered::new(parts).map(|r| r.map(|(_, v)| v)))
                };
                Ok(Box::new(StageOutput {
                    outputs: Some(outputs),
                    upstream,
                    stage: number,
                    failed: false,
                    counters: Arc::clone(&settings.stats),
                    pool,
                }))
            }),
            settings,
        }
    }

    /// Runs the pipeline and folds this stage's results with `combine` from
    /// `identity()`: first inside this stage's workers (one partial per chunk, as
    /// [`Pool::map_reduce`] does), then in the parent, in input order. `combine` must
    /// be associative and `identity()` its neutral element. To keep one accumulator
    /// per worker across chunks instead, and send it once, use
    /// [`Pipeline::fold_stage`].
    ///
    /// # Errors
    ///
    /// As [`Pipeline::collect`].
    pub fn reduce<Id, R>(self, identity: Id, combine: R) -> Result<T>
    where
        Id: Fn() -> T + Copy + Send + Sync,
        R: Fn(T, T) -> T + Copy + Send + Sync,
    {
        let Stage {
            upstream,
            workers,
            task,
            settings,
            ..
        } = self;
        let stats = Arc::clone(&settings.stats);
        let _run = Run(Arc::clone(&stats));
        let mut settings = settings;
        let number = settings.stages;
        settings.job = format!(
            "{}; reduce of stage {number} by {}, identity {}",
            settings.job,
            type_name::<R>(),
            type_name::<Id>()
        );
        let settings = settings.opened()?;
        let input = (upstream.build)(&settings)?;
        let pool = stage_pool(&settings, workers, number)?;
        let error = Rc::new(RefCell::new(None));
        let feed = Feed {
            input,
            error: Rc::clone(&error),
        }
        .inspect(|_| stats.done_one());
        let folded = match settings.resume(!settings.after_fold) {
            Some(resume) => {
                task::assert_zero_sized::<Id>();
                task::assert_zero_sized::<R>();
                task_ref::<P, T, Plain<F>, Fold<T, Id, R>, _>(task).and_then(|task| {
                    resume.map_reduce(&pool, number, feed, task, identity, combine)
                })
            }
            None => pool.map_reduce(feed, task, identity, combine),
        };
        settings.stats.stage_ended(settings.stages, &pool);
        if let Some(e) = error.borrow_mut().take() {
            return Err(e);
        }
        folded.map_err(|e| Error::Stage {
            stage: settings.stages,
            error: Box::new(e),
        })
    }

    /// Adds a stage after this one; see [`Pipeline::stage`].
    pub fn stage<U, G>(self, workers: usize, task: G) -> Stage<'a, T, U, G>
    where
        U: Serialize + DeserializeOwned + 'a,
        G: Fn(T) -> U + Copy + Send + Sync + 'a,
    {
        self.into_pipeline().stage(workers, task)
    }

    /// See [`Pipeline::flat_map_stage`].
    pub fn flat_map_stage<U, G>(self, workers: usize, task: G) -> Pipeline<'a, U>
    where
        U: Serialize + DeserializeOwned + 'a,
        G: Fn(T) -> Vec<U> + Copy + Send + Sync + 'a,
    {
        self.into_pipeline().flat_map_stage(workers, task)
    }

    /// See [`Pipeline::fold_stage`].
    pub fn fold_stage<A, Id, G>(self, workers: usize, identity: Id, fold: G) -> Pipeline<'a, A>
    where
        A: Serialize + DeserializeOwned + 'static,
        Id: Fn() -> A + Copy + Send + Sync + 'a,
        G: Fn(A, T) -> A + Copy + Send + Sync + 'a,
    {
        self.into_pipeline().fold_stage(workers, identity, fold)
    }

    /// See [`Pipeline::filter_stage`].
    pub fn filter_stage<G>(self, workers: usize, keep: G) -> Pipeline<'a, T>
    where
        G: Fn(&T) -> bool + Copy + Send + Sync + 'a,
    {
        self.into_pipeline().filter_stage(workers, keep)
    }

    /// See [`Pipeline::collect`].
    ///
    /// # Errors
    ///
    /// As [`Pipeline::collect`].
    pub fn collect(self) -> Result<Vec<T>> {
        self.into_pipeline().collect()
    }

    /// See [`Pipeline::for_each`].
    ///
    /// # Errors
    ///
    /// As [`Pipeline::collect`].
    pub fn for_each(self, f: impl FnMut(T)) -> Result<()> {
        self.into_pipeline().for_each(f)
    }
}

/// Starts the workers of stage `number` (counted from 1).
fn stage_pool(settings: &Settings, workers: usize, number: usize) -> Result<Pool> {
    let stage_error = |e| Error::Stage {
        stage: number,
        error: Box::new(e),
    };
    let mut builder = Pool::builder()
        .workers(workers)
        .inherit_output(settings.inherit_output)
        .max_items_in_flight(settings.stage_items)
        .progress(settings.progress);
    let counters = &settings.stats;
    if let Some(path) = &settings.trace {
        let mut shared = counters
            .trace
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let trace = match &*shared {
            Some(trace) => Arc::clone(trace),
            None => {
                let trace = Trace::create(path).map_err(|source| Error::Trace {
                    path: path.clone(),
                    source,
                })?;
                *shared = Some(Arc::clone(&trace));
                trace
            }
        };
        builder = builder.trace_shared(trace, format!("stage {number}"));
    }
    let forced = progress_setting().map_err(stage_error)?;
    if settings.progress || forced == Some(true) {
        let mut shared = counters.bars.lock().unwrap_or_else(PoisonError::into_inner);
        let bars = shared
            .get_or_insert_with(|| Bars::new(forced == Some(true)))
            .clone();
        builder = builder.bars_shared(bars, format!("stage {number}"));
    }
    builder.build().map_err(stage_error)
}

/// The previous stage's items as plain items for the next stage's input: the first
/// error stops the input and is kept, to be passed on after this stage's own
/// results.
struct Feed<'a, T> {
    input: Stream<'a, T>,
    error: Rc<RefCell<Option<Error>>>,
}

impl<T> Iterator for Feed<'_, T> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
        if self.error.borrow().is_some() {
            return None;
        }
        match self.input.next()? {
            Ok(item) => Some(item),
            Err(e) => {
                *self.error.borrow_mut() = Some(e);
                None
            }
        }
    }
}

/// One run of a pipeline: when it ends (and its stages with it), the trace file
/// the stages shared is closed and their bars released, whoever still holds the
/// pipeline's stats.
struct Run(Arc<Counters>);

impl Drop for Run {
    fn drop(&mut self) {
        self.0
            .trace
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        self.0
            .bars
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }
}

/// A stage's results, then any error from upstream. Owns the stage's pool, which
/// stops its workers when the stream is dropped.
struct StageOutput<'a, T> {
    /// Taken (and so dropped) before `pool`, whose job it serves.
    outputs: Option<Stream<'a, T>>,
    upstream: Rc<RefCell<Option<Error>>>,
    stage: usize,
    failed: bool,
    counters: Arc<Counters>,
    pool: Pool,
}

impl<T> Drop for StageOutput<'_, T> {
    fn drop(&mut self) {
        // The stage's job leaves its pool with its consumer; then its figures are
        // final.
        drop(self.outputs.take());
        self.counters.stage_ended(self.stage, &self.pool);
    }
}

impl<T> Iterator for StageOutput<'_, T> {
    type Item = Result<T>;

    fn next(&mut self) -> Option<Result<T>> {
        if self.failed {
            return None;
        }
        // An error from upstream comes first: this stage's input ended because of it.
        if let Some(e) = self.upstream.borrow_mut().take() {
            self.failed = true;
            return Some(Err(e));
        }
        match self.outputs.as_mut()?.next() {
            Some(Ok(item)) => Some(Ok(item)),
            Some(Err(e)) => {
                self.failed = true;
                let upstream = self.upstream.borrow_mut().take();
                Some(Err(upstream.unwrap_or(Error::Stage {
                    stage: self.stage,
                    error: Box::new(e),
                })))
            }
            None => {
                let upstream = self.upstream.borrow_mut().take();
                upstream.map(|e| {
                    self.failed = true;
                    Err(e)
                })
            }
        }
    }
}

impl<T> fmt::Debug for Pipeline<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipeline")
            .field("stages", &self.settings.stages)
            .field("ordered", &self.settings.ordered)
            .finish_non_exhaustive()
    }
}

impl<P, T, F> fmt::Debug for Stage<'_, P, T, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stage")
            .field("stage", &self.settings.stages)
            .field("workers", &self.workers)
            .finish_non_exhaustive()
    }
}
