//! Pool and PoolBuilder: the public face of a set of workers, Python's `Pool` typed.

use std::any::TypeId;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::engine::driver::{Core, LentCall};
use crate::engine::ends::{IterSource, Journal, Sink, encode_item, exact_len};
use crate::engine::job::{FoldLedger, Kind};
use crate::engine::scheduler::Submission;
use crate::engine::stats::JobStats;
use crate::error::{Error, ErrorPolicy, Result};
use crate::handle::{AsyncResult, Imap, ImapParts, ImapUnordered, imap_parts};
use crate::shared::region::{self, Pins, Region, RegionHandle};
use crate::sink::{
    ApplyCompletion, CollectSink, FoldSink, MapAsyncSink, OnError, OnResult, OutcomeSink,
    PartialsSink, items_failed,
};
use crate::wire::codec;
use crate::wire::protocol::{ContextPayload, TaskRef};
use crate::worker::task::{self, Collect, Fold, Mapper, Outcomes, Plain, WithContext, WithState};

/// A set of worker processes that run tasks, kept alive across calls: Python's
/// `multiprocessing.Pool`, typed.
///
/// Build one with [`Pool::builder`]. Blocking calls ([`map`](Pool::map),
/// [`map_reduce`](Pool::map_reduce), [`apply`](Pool::apply)) split their input into
/// chunks, run them on the workers and return the results in input order.
/// Asynchronous calls ([`apply_async`](Pool::apply_async),
/// [`map_async`](Pool::map_async)) return a handle at once; [`imap`](Pool::imap)
/// and [`imap_unordered`](Pool::imap_unordered) return iterators that read their
/// input lazily. Many jobs can be in flight at once, from any number of threads:
/// the workers' capacity goes to the live jobs in turn, and a failure ends its own
/// job only.
///
/// A task is a `fn` item or a closure that captures nothing (it is re-created in each
/// worker process); the build fails with an explanation otherwise. Such functions are
/// `Copy + Send + Sync`, which the bounds also ask for. State travels as a context
/// value ([`Pool::map_with`]), inside the items, or in per-worker state built by an
/// initializer ([`PoolBuilder::initializer`](crate::PoolBuilder::initializer), [`Pool::map_with_state`]). A task that
/// takes several arguments takes a tuple (Python's `starmap`):
///
/// ```standalone_crate
/// fn main() -> multiproc::Result<()> {
///     multiproc::init(); // in a worker process this call serves tasks and never returns
///     let pool = multiproc::Pool::builder().workers(2).build()?;
///     let pairs = vec![(1u64, 2u64), (3, 4)];
///     let sums: Vec<u64> = pool.map(pairs, |(a, b): (u64, u64)| a + b)?;
///     assert_eq!(sums, [3, 7]);
///     Ok(())
/// }
/// ```
///
/// # Lifecycle
///
/// [`close`](Pool::close) refuses new work, [`join`](Pool::join) waits for the work
/// already submitted (and its callbacks) and stops the workers, and
/// [`terminate`](Pool::terminate) stops them at once, failing pending work with
/// [`Error::Terminated`]. Dropping the pool stops the workers as well: gracefully
/// (their channels close and they exit) when nothing is pending, by killing them
/// otherwise, and every pending handle and iterator then ends with
/// [`Error::Terminated`]. Drop never waits for a running task; call `close` and
/// `join` first to let submitted work finish. No worker process outlives its pool.
///
/// # Examples
///
/// ```standalone_crate
/// fn main() -> multiproc::Result<()> {
///     multiproc::init(); // in a worker process this call serves tasks and never returns
///     let pool = multiproc::Pool::builder().workers(2).build()?;
///     let lens: Vec<usize> = pool.map(vec!["a".to_string(), "bb".into()], |s: String| s.len())?;
///     assert_eq!(lens, [1, 2]);
///     let sum: u64 = pool.map_reduce(0..10u64, |x| x, || 0, |a, b| a + b)?;
///     assert_eq!(sum, 45);
///     let handle = pool.apply_async(|x: u64| x * 10, 4)?;
///     assert_eq!(handle.get()?, 40);
///     Ok(())
/// }
/// ```
///
/// A task that captures a variable does not compile:
///
/// ```compile_fail,E0080
/// # fn main() -> multiproc::Result<()> {
/// let pool = multiproc::Pool::builder().workers(2).build()?;
/// let offset = 10u64;
/// let shifted: Vec<u64> = pool.map(0..4u64, move |x| x + offset)?;
/// # Ok(())
/// # }
/// ```
///
/// Neither do items that cannot be serialized:
///
/// ```compile_fail,E0277
/// # fn main() -> multiproc::Result<()> {
/// struct Opaque(u64);
/// let pool = multiproc::Pool::builder().workers(2).build()?;
/// let out: Vec<u64> = pool.map(vec![Opaque(1)], |o: Opaque| o.0)?;
/// # Ok(())
/// # }
/// ```
pub struct Pool {
    pub(crate) core: Arc<Core>,
    pub(crate) workers: usize,
    /// The longest a blocking call may take.
    pub(crate) call_timeout: Option<Duration>,
    /// What a failed item does to its call.
    pub(crate) error_policy: ErrorPolicy,
    /// Blocking calls stop on Ctrl-C.
    pub(crate) interrupt: bool,
    /// The type of the state the initializer builds, if any.
    pub(crate) state: Option<(TypeId, &'static str)>,
    /// Context values whose encoding is larger go through shared memory.
    pub(crate) share_contexts_above: usize,
    /// Shared inputs named by the initializer's argument, which every worker the
    /// pool starts (replacements too) decodes.
    pub(crate) _init_pins: Pins,
}

impl Pool {
    /// How many workers the pool runs.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Process ids of the live worker processes; empty for an inline pool.
    ///
    /// # Errors
    ///
    /// [`Error::NestedCall`] when called from inside work this thread drives for
    /// this pool (an input iterator, `Serialize`, or a reduce).
    pub fn worker_pids(&self) -> Result<Vec<u32>> {
        Ok(self.core.lock_engine()?.engine().workers.pids())
    }

    /// What the pool has done so far: workers started, chunks sent again, and the
    /// figures of every job summed ([`PoolStats::totals`]; jobs still running
    /// count as they stand).
    ///
    /// # Errors
    ///
    /// As [`Pool::worker_pids`].
    pub fn stats(&self) -> Result<PoolStats> {
        let mut driving = self.core.lock_engine()?;
        let engine = driving.engine();
        let (jobs, totals) = engine.all_stats();
        Ok(PoolStats {
            workers_started: engine.workers.started,
            chunks_retried: totals.retries,
            jobs,
            totals,
        })
    }

    /// The figures of the job that ended last on this pool (from any thread):
    /// wall time, items, chunks, bytes, faults, and where each worker's time went;
    /// [`JobStats::summary`] says what they mean. `None` before any job ended.
    /// Every `map`, `map_reduce`, `imap` and `map_async` call is a job; the
    /// `apply_async` submissions of a task form one job that never ends, counted
    /// in [`Pool::stats`] only.
    ///
    /// # Errors
    ///
    /// As [`Pool::worker_pids`].
    ///
    /// # Examples
    ///
    /// ```standalone_crate
    /// fn main() -> multiproc::Result<()> {
    ///     multiproc::init();
    ///     let pool = multiproc::Pool::builder().workers(2).build()?;
    ///     let total = pool.map_reduce(0..100_000u64, |x| x % 7, || 0, |a, b| a + b)?;
    ///     let stats = pool.last_job_stats()?.expect("a job ended");
    ///     assert_eq!(stats.items, 100_000);
    ///     assert_eq!(stats.workers.len(), 2);
    ///     eprintln!("{total}\n{}", stats.summary());
    ///     Ok(())
    /// }
    /// ```
    pub fn last_job_stats(&self) -> Result<Option<JobStats>> {
        Ok(self.core.lock_engine()?.engine().last_stats.clone())
    }

    /// Applies `task` to every item and returns the results in input order.
    ///
    /// The input is consumed lazily, a bounded number of chunks ahead of the results.
    ///
    /// # Errors
    ///
    /// The first failure seen: a task panic ([`Error::TaskPanicked`]), an item or
    /// result that does not encode or decode, a worker that died
    /// ([`Error::WorkerExited`]). The call returns it at once, without waiting for
    /// chunks still running; workers that hold nothing but such chunks are stopped
    /// and replaced. No partial result is returned; the pool stays usable.
    /// [`Error::PoolClosed`] after [`close`](Pool::close).
    pub fn map<I, T, U, F>(&self, items: I, task: F) -> Result<Vec<U>>
    where
        I: IntoIterator<Item = T>,
        T: Serialize + DeserializeOwned,
        U: Serialize + DeserializeOwned,
        F: Fn(T) -> U + Copy + Send + Sync,
    {
        self.collect(items, task_ref::<T, U, Plain<F>, Collect, _>(task)?, None)
    }

    /// Applies `task` to every item and returns each item's own outcome, in input
    /// order: [`ErrorPolicy::Collect`] for this call.
    ///
    /// A failed item (a panic, a result that does not encode, an item past
    /// `task_timeout`, a *poison* item that killed its worker more than `retries`
    /// times) is an `Err` in its place; every other item runs, the chunk holding a
    /// failed item being sent again with that item passed over.
    ///
    /// # Errors
    ///
    /// The outer `Err` is for the call as a whole: an item that does not encode,
    /// [`Error::PoolClosed`], [`Error::CallTimedOut`], [`Error::Interrupted`], or a
    /// failure that concerns every item (an undecodable context, a broken worker).
    ///
    /// # Examples
    ///
    /// ```standalone_crate
    /// fn main() -> multiproc::Result<()> {
    ///     multiproc::init();
    ///     let pool = multiproc::Pool::builder().workers(2).build()?;
    ///     let outcomes = pool.map_collect(0..5u64, |x| {
    ///         assert!(x != 3, "three is not allowed");
    ///         x * 10
    ///     })?;
    ///     assert_eq!(outcomes[2].as_ref().ok(), Some(&20));
    ///     assert!(matches!(outcomes[3], Err(multiproc::Error::TaskPanicked { item: 3, .. })));
    ///     Ok(())
    /// }
    /// ```
    pub fn map_collect<I, T, U, F>(&self, items: I, task: F) -> Result<Vec<Result<U>>>
    where
        I: IntoIterator<Item = T>,
        T: Serialize + DeserializeOwned,
        U: Serialize + DeserializeOwned,
        F: Fn(T) -> U + Copy + Send + Sync,
    {
        let task = task_ref::<T, U, Plain<F>, Collect, _>(task)?;
        let items = items.into_iter();
        let mut sink = OutcomeSink {
            outcomes: Vec::with_capacity(items.size_hint().0.min(1 << 20)),
        };
        self.run_lent(items, task, None, ErrorPolicy::Collect, None, &mut sink)?;
        Ok(sink.outcomes)
    }

    /// Applies `task` to every item and returns the good results with a report of
    /// the failed items: [`ErrorPolicy::Skip`] for this call. Runs as
    /// [`Pool::map_collect`] does.
    ///
    /// # Errors
    ///
    /// As [`Pool::map_collect`]: only failures of the call as a whole.
    pub fn map_skip<I, T, U, F>(&self, items: I, task: F) -> Result<Skipped<U>>
    where
        I: IntoIterator<Item = T>,
        T: Serialize + DeserializeOwned,
        U: Serialize + DeserializeOwned,
        F: Fn(T) -> U + Copy + Send + Sync,
    {
        let mut skipped = Skipped {
            results: Vec::new(),
            failed: Vec::new(),
        };
        for (index, outcome) in self.map_collect(items, task)?.into_iter().enumerate() {
            match outcome {
                Ok(value) => skipped.results.push((index, value)),
                Err(error) => skipped.failed.push((index, error)),
            }
        }
        Ok(skipped)
    }

    /// Like [`Pool::map`], with a context value that reaches the task by reference.
    ///
    /// The context is encoded once and sent once to each worker per call, so it can be
    /// large (a model, a lookup table) without being copied per item.
    ///
    /// # Errors
    ///
    /// As [`Pool::map`], and [`Error::Context`] when the context cannot be carried.
    ///
    /// # Examples
    ///
    /// ```standalone_crate
    /// fn main() -> multiproc::Result<()> {
    ///     multiproc::init();
    ///     let pool = multiproc::Pool::builder().workers(2).build()?;
    ///     let offset = 10u64;
    ///     let shifted: Vec<u64> = pool.map_with(0..4u64, &offset, |off: &u64, x| x + off)?;
    ///     assert_eq!(shifted, [10, 11, 12, 13]);
    ///     Ok(())
    /// }
    /// ```
    pub fn map_with<I, C, T, U, F>(&self, items: I, context: &C, task: F) -> Result<Vec<U>>
    where
        I: IntoIterator<Item = T>,
        C: Serialize + DeserializeOwned + 'static,
        T: Serialize + DeserializeOwned,
        U: Serialize + DeserializeOwned,
        F: Fn(&C, T) -> U + Copy + Send + Sync,
    {
        let task = task_ref::<T, U, WithContext<F, C>, Collect, _>(task)?;
        let context = self.encode_context(context)?;
        self.collect(items, task, Some(context.payload()))
    }

    /// Like [`Pool::map`], for a task that uses the per-worker state built by the
    /// pool's initializer ([`PoolBuilder::initializer`](crate::PoolBuilder::initializer)): `Fn(&mut S, T) -> U`.
    ///
    /// # Errors
    ///
    /// As [`Pool::map`]; [`Error::Config`] when the pool has no initializer building
    /// an `S`, and [`Error::WorkerState`] when the initializer failed in the worker
    /// that ran an item.
    ///
    /// # Examples
    ///
    /// ```standalone_crate
    /// fn main() -> multiproc::Result<()> {
    ///     multiproc::init();
    ///     let pool = multiproc::Pool::builder()
    ///         .workers(2)
    ///         .initializer(|base: u64| base, 100)
    ///         .build()?;
    ///     let out: Vec<u64> = pool.map_with_state(0..3u64, |base: &mut u64, x| *base + x)?;
    ///     assert_eq!(out, [100, 101, 102]);
    ///     Ok(())
    /// }
    /// ```
    pub fn map_with_state<I, S, T, U, F>(&self, items: I, task: F) -> Result<Vec<U>>
    where
        I: IntoIterator<Item = T>,
        S: 'static,
        T: Serialize + DeserializeOwned,
        U: Serialize + DeserializeOwned,
        F: Fn(&mut S, T) -> U + Copy + Send + Sync,
    {
        let task = task_ref::<T, U, WithState<F, S>, Collect, _>(task)?;
        self.check_state::<S>()?;
        self.collect(items, task, None)
    }

    /// Maps every item with `task` and combines the results with `reduce`.
    ///
    /// Each worker folds its chunk into one partial result, starting from
    /// `identity()`, so only one value per chunk crosses back; the parent folds the
    /// partials in chunk order. `reduce` must be associative and `identity()` its
    /// neutral element; it need not be commutative.
    ///
    /// # Errors
    ///
    /// As [`Pool::map`]; a panic in `identity` or `reduce` inside a worker is reported
    /// like a task panic on the item being folded.
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
        self.fold(items, task, None, identity, reduce)
    }

    /// [`Pool::map_reduce`] with a context value, as in [`Pool::map_with`].
    ///
    /// # Errors
    ///
    /// As [`Pool::map_reduce`] and [`Pool::map_with`].
    pub fn map_reduce_with<I, C, T, U, F, Id, R>(
        &self,
        items: I,
        context: &C,
        task: F,
        identity: Id,
        reduce: R,
    ) -> Result<U>
    where
        I: IntoIterator<Item = T>,
        C: Serialize + DeserializeOwned + 'static,
        T: Serialize + DeserializeOwned,
        U: Serialize + DeserializeOwned,
        F: Fn(&C, T) -> U + Copy + Send + Sync,
        Id: Fn() -> U + Copy + Send + Sync,
        R: Fn(U, U) -> U + Copy + Send + Sync,
    {
        task::assert_zero_sized::<Id>();
        task::assert_zero_sized::<R>();
        let task = task_ref::<T, U, WithContext<F, C>, Fold<U, Id, R>, _>(task)?;
        let context = self.encode_context(context)?;
        self.fold(items, task, Some(context.payload()), identity, reduce)
    }

    /// Runs `task` on one argument in a worker and waits for its result.
    ///
    /// # Errors
    ///
    /// As [`AsyncResult::get`] and [`Pool::apply_async`].
    pub fn apply<T, U, F>(&self, task: F, arg: T) -> Result<U>
    where
        T: Serialize + DeserializeOwned,
        U: Serialize + DeserializeOwned + Send + 'static,
        F: Fn(T) -> U + Copy + Send + Sync,
    {
        let handle = self.apply_async(task, arg)?;
        match self.call_timeout {
            None => handle.get(),
            Some(timeout) => match handle.get_timeout(timeout) {
                Err(Error::Timeout(_)) => Err(Error::CallTimedOut { timeout, done: 0 }),
                other => other,
            },
        }
    }

    /// Submits `task` on one argument and returns a handle to its result at once.
    ///
    /// Submissions of the same task are batched into chunks as they queue up, so
    /// thousands in flight do not cost a message and a wake-up each. Each handle
    /// gets its own result or its own error: a task that panics fails its handle
    /// only. A worker that dies fails the handles of the chunk it held.
    ///
    /// # Errors
    ///
    /// At once: [`Error::PoolClosed`] after [`close`](Pool::close),
    /// [`Error::Terminated`] after [`terminate`](Pool::terminate), and
    /// [`Error::EncodeItem`] or [`Error::DecodeItem`] when the argument does not
    /// encode. Everything else arrives through the handle.
    ///
    /// # Examples
    ///
    /// ```standalone_crate
    /// fn main() -> multiproc::Result<()> {
    ///     multiproc::init();
    ///     let pool = multiproc::Pool::builder().workers(2).build()?;
    ///     let handles: Vec<_> = (0..10u64)
    ///         .map(|x| pool.apply_async(|x: u64| x * x, x))
    ///         .collect::<multiproc::Result<_>>()?;
    ///     let squares: Vec<u64> = handles.into_iter().map(|h| h.get()).collect::<multiproc::Result<_>>()?;
    ///     assert_eq!(squares[9], 81);
    ///     Ok(())
    /// }
    /// ```
    pub fn apply_async<T, U, F>(&self, task: F, arg: T) -> Result<AsyncResult<U>>
    where
        T: Serialize + DeserializeOwned,
        U: Serialize + DeserializeOwned + Send + 'static,
        F: Fn(T) -> U + Copy + Send + Sync,
    {
        self.submit_apply(task, arg, None)
    }

    /// [`Pool::apply_async`] with callbacks run in this process, as Python's
    /// `apply_async(func, args, callback, error_callback)`.
    ///
    /// `callback` gets the result, or `error_callback` the error, on one thread the
    /// pool owns, in the order results complete; the handle is ready once it has
    /// run, and still returns the result. A callback that panics becomes the
    /// handle's error ([`Error::CallbackPanicked`]) and stalls nothing else.
    /// Callbacks may capture anything `Send`: they never leave this process.
    ///
    /// # Errors
    ///
    /// As [`Pool::apply_async`].
    ///
    /// # Examples
    ///
    /// ```standalone_crate
    /// use std::sync::{Arc, Mutex};
    /// fn main() -> multiproc::Result<()> {
    ///     multiproc::init();
    ///     let pool = multiproc::Pool::builder().workers(2).build()?;
    ///     let seen = Arc::new(Mutex::new(Vec::new()));
    ///     let sink = Arc::clone(&seen);
    ///     let handle = pool.apply_async_with_callback(
    ///         |x: u64| x + 1,
    ///         41,
    ///         move |v: &u64| sink.lock().unwrap().push(*v * 10),
    ///         |e| eprintln!("failed: {e}"),
    ///     )?;
    ///     assert_eq!(handle.get()?, 42);
    ///     assert_eq!(*seen.lock().unwrap(), [420]);
    ///     Ok(())
    /// }
    /// ```
    pub fn apply_async_with_callback<T, U, F, C, E>(
        &self,
        task: F,
        arg: T,
        callback: C,
        error_callback: E,
    ) -> Result<AsyncResult<U>>
    where
        T: Serialize + DeserializeOwned,
        U: Serialize + DeserializeOwned + Send + 'static,
        F: Fn(T) -> U + Copy + Send + Sync,
        C: FnOnce(&U) + Send + 'static,
        E: FnOnce(&Error) + Send + 'static,
    {
        let callbacks: (OnResult<U>, OnError) = (Box::new(callback), Box::new(error_callback));
        self.submit_apply(task, arg, Some(callbacks))
    }

    fn submit_apply<T, U, F>(
        &self,
        task: F,
        arg: T,
        callbacks: Option<(OnResult<U>, OnError)>,
    ) -> Result<AsyncResult<U>>
    where
        T: Serialize + DeserializeOwned,
        U: Serialize + DeserializeOwned + Send + 'static,
        F: Fn(T) -> U + Copy + Send + Sync,
    {
        let task = task_ref::<T, U, Plain<F>, Outcomes, _>(task)?;
        let mut bytes = Vec::new();
        let (encoded, pins) = region::pin_while(|| encode_item(&arg, 0, &mut bytes));
        encoded?;
        let (handle, completion) = AsyncResult::pending(&self.core, callbacks);
        let submission = Submission::Apply {
            task,
            arg: bytes,
            pins,
            handle: Box::new(ApplyCompletion(completion)),
        };
        self.core.submit(submission, 1)?;
        Ok(handle)
    }

    /// Runs a whole [`Pool::map`] in the background and returns one handle to all
    /// its results, in input order.
    ///
    /// The input is read lazily by whichever thread drives the pool, so it must be
    /// `Send + 'static`.
    ///
    /// # Errors
    ///
    /// At once as [`Pool::apply_async`]; through the handle as [`Pool::map`].
    pub fn map_async<I, T, U, F>(&self, items: I, task: F) -> Result<AsyncResult<Vec<U>>>
    where
        I: IntoIterator<Item = T>,
        I::IntoIter: Send + 'static,
        T: Serialize + DeserializeOwned,
        U: Serialize + DeserializeOwned + Send + 'static,
        F: Fn(T) -> U + Copy + Send + Sync,
    {
        self.submit_map(items, task, None)
    }

    /// [`Pool::map_async`] with callbacks, as in [`Pool::apply_async_with_callback`]:
    /// `callback` gets the whole result vector.
    ///
    /// # Errors
    ///
    /// As [`Pool::map_async`].
    pub fn map_async_with_callback<I, T, U, F, C, E>(
        &self,
        items: I,
        task: F,
        callback: C,
        error_callback: E,
    ) -> Result<AsyncResult<Vec<U>>>
    where
        I: IntoIterator<Item = T>,
        I::IntoIter: Send + 'static,
        T: Serialize + DeserializeOwned,
        U: Serialize + DeserializeOwned + Send + 'static,
        F: Fn(T) -> U + Copy + Send + Sync,
        C: FnOnce(&Vec<U>) + Send + 'static,
        E: FnOnce(&Error) + Send + 'static,
    {
        let callbacks: (OnResult<Vec<U>>, OnError) = (Box::new(callback), Box::new(error_callback));
        self.submit_map(items, task, Some(callbacks))
    }

    fn submit_map<I, T, U, F>(
        &self,
        items: I,
        task: F,
        callbacks: Option<(OnResult<Vec<U>>, OnError)>,
    ) -> Result<AsyncResult<Vec<U>>>
    where
        I: IntoIterator<Item = T>,
        I::IntoIter: Send + 'static,
        T: Serialize + DeserializeOwned,
        U: Serialize + DeserializeOwned + Send + 'static,
        F: Fn(T) -> U + Copy + Send + Sync,
    {
        let task = task_ref::<T, U, Plain<F>, Collect, _>(task)?;
        let (handle, completion) = AsyncResult::pending(&self.core, callbacks);
        let items = items.into_iter();
        let total = exact_len(&items);
        let kind = Kind::Owned {
            source: Box::new(IterSource::new(items)),
            sink: Box::new(MapAsyncSink {
                results: Vec::new(),
                failed: Vec::new(),
                completion: Some(completion),
            }),
        };
        let mut job = self
            .core
            .lock_open_engine()?
            .engine()
            .new_job(task, kind, true, None)?;
        job.policy = self.error_policy;
        job.total = total;
        self.core.submit(Submission::Job(Box::new(job)), 1)?;
        Ok(handle)
    }

    /// Applies `task` to every item lazily: an iterator of results in input order.
    ///
    /// The input is read only while the iterator waits for results, at most a
    /// bounded window of chunks ahead of what was taken, so an endless input works.
    /// Dropping the iterator early stops reading the input and discards what is in
    /// flight; the pool is usable at once.
    ///
    /// # Errors
    ///
    /// At once: [`Error::PoolClosed`], [`Error::TaskNotInExecutable`]. Then each
    /// failure as an `Err` item (as [`Pool::map`]), after which the iterator ends.
    ///
    /// # Examples
    ///
    /// ```standalone_crate
    /// fn main() -> multiproc::Result<()> {
    ///     multiproc::init();
    ///     let pool = multiproc::Pool::builder().workers(2).build()?;
    ///     let first: Vec<u64> = pool
    ///         .imap(0..u64::MAX, |x: u64| x * 2)?
    ///         .take(5)
    ///         .collect::<multiproc::Result<_>>()?;
    ///     assert_eq!(first, [0, 2, 4, 6, 8]);
    ///     Ok(())
    /// }
    /// ```
    pub fn imap<I, T, U, F>(&self, items: I, task: F) -> Result<Imap<'_, I::IntoIter, U>>
    where
        I: IntoIterator<Item = T>,
        T: Serialize + DeserializeOwned,
        U: Serialize + DeserializeOwned,
        F: Fn(T) -> U + Copy + Send + Sync,
    {
        Ok(Imap::new(self.start_imap(items, task, true)?))
    }

    /// Like [`Pool::imap`], yielding `(index, result)` pairs in completion order.
    ///
    /// # Errors
    ///
    /// As [`Pool::imap`].
    pub fn imap_unordered<I, T, U, F>(
        &self,
        items: I,
        task: F,
    ) -> Result<ImapUnordered<'_, I::IntoIter, U>>
    where
        I: IntoIterator<Item = T>,
        T: Serialize + DeserializeOwned,
        U: Serialize + DeserializeOwned,
        F: Fn(T) -> U + Copy + Send + Sync,
    {
        Ok(ImapUnordered::new(self.start_imap(items, task, false)?))
    }

    /// Puts an `imap` job in the table; its consumer side is returned.
    pub(crate) fn start_imap<I, T, U, F>(
        &self,
        items: I,
        task: F,
        ordered: bool,
    ) -> Result<ImapParts<IterSource<I::IntoIter>, U>>
    where
        I: IntoIterator<Item = T>,
        T: Serialize + DeserializeOwned,
        U: Serialize + DeserializeOwned,
        F: Fn(T) -> U + Copy + Send + Sync,
    {
        let task = task_ref::<T, U, Plain<F>, Collect, _>(task)?;
        let items = items.into_iter();
        let total = exact_len(&items);
        self.start_imap_source(IterSource::new(items), total, None, task, ordered)
    }

    /// Puts an `imap` job of `task` whose items come from `source` (`total` of
    /// them, when known) in the table; its consumer side, which takes its chunks
    /// through `journal` when there is one, is returned.
    pub(crate) fn start_imap_source<S, U>(
        &self,
        source: S,
        total: Option<usize>,
        journal: Option<Box<dyn Journal>>,
        task: TaskRef,
        ordered: bool,
    ) -> Result<ImapParts<S, U>> {
        let mut driving = self.core.lock_open_engine()?;
        let engine = driving.engine();
        let mut job = engine.new_job(task, Kind::Lent, ordered, None)?;
        job.policy = self.error_policy;
        job.total = total;
        let (parts, sink) = imap_parts(&self.core, job.id, source, journal, self.error_policy);
        job.kind = Kind::OwnedSink(Box::new(sink));
        engine.add(job);
        Ok(parts)
    }

    /// Refuses new work: later submissions and calls fail with
    /// [`Error::PoolClosed`]. Work already submitted goes on; [`Pool::join`] waits
    /// for it.
    pub fn close(&self) {
        self.core.close();
    }

    /// Waits until every submitted job and its callbacks are done, then stops the
    /// workers. The pool must be closed (or terminated) first, as in Python.
    ///
    /// # Errors
    ///
    /// [`Error::NotClosed`] when the pool is still open, [`Error::NestedCall`] from
    /// inside the pool's own work.
    pub fn join(&self) -> Result<()> {
        if !self.core.is_closed() {
            return Err(Error::NotClosed);
        }
        let core = &self.core;
        core.wait_until(&|| core.pending() == 0, None)?;
        let mut driving = core.lock_engine()?;
        let engine = driving.engine();
        if !engine.outstanding() {
            engine.workers.backend.shutdown();
        }
        Ok(())
    }

    /// Stops the workers now. Every pending handle and iterator ends with
    /// [`Error::Terminated`]; later calls fail with it too.
    ///
    /// # Errors
    ///
    /// [`Error::NestedCall`] from inside the pool's own work.
    pub fn terminate(&self) -> Result<()> {
        self.core.terminate()
    }

    fn check_state<S: 'static>(&self) -> Result<()> {
        match self.state {
            Some((id, _)) if id == TypeId::of::<S>() => Ok(()),
            Some(_) => Err(Error::Config(
                "the task's state type is not the type the pool's initializer builds",
            )),
            None => Err(Error::Config(
                "the task uses per-worker state, but the pool has no initializer",
            )),
        }
    }

    /// Runs one job whose source (`items`) and sink the caller lends, on this
    /// thread, under the pool's Ctrl-C and call-timeout settings.
    fn run_lent<I, T>(
        &self,
        items: I,
        task: TaskRef,
        context: Option<ContextPayload<'_>>,
        policy: ErrorPolicy,
        fold: Option<FoldLedger>,
        sink: &mut dyn Sink,
    ) -> Result<()>
    where
        I: Iterator<Item = T>,
        T: Serialize + DeserializeOwned,
    {
        let call = self.lent_call(task, context, policy, fold);
        self.core.run_lent(call, items, sink)
    }

    /// A lent call of `task` under the pool's Ctrl-C and call-timeout settings.
    pub(crate) fn lent_call<'c>(
        &self,
        task: TaskRef,
        context: Option<ContextPayload<'c>>,
        policy: ErrorPolicy,
        fold: Option<FoldLedger>,
    ) -> LentCall<'c> {
        LentCall {
            task,
            context,
            policy,
            fold,
            interrupt: self.interrupt,
            call_timeout: self.call_timeout,
        }
    }

    fn collect<I, T, U>(
        &self,
        items: I,
        task: TaskRef,
        context: Option<ContextPayload<'_>>,
    ) -> Result<Vec<U>>
    where
        I: IntoIterator<Item = T>,
        T: Serialize + DeserializeOwned,
        U: DeserializeOwned,
    {
        let items = items.into_iter();
        // The hint is only a hint: a wrong one must not reserve absurd amounts.
        let mut sink = CollectSink {
            results: Vec::with_capacity(items.size_hint().0.min(1 << 20)),
            failed: Vec::new(),
        };
        self.run_lent(items, task, context, self.error_policy, None, &mut sink)?;
        items_failed(sink.failed)?;
        Ok(sink.results)
    }

    /// Folds every item into per-worker accumulators kept across chunks (a fold
    /// stage): each worker folds the items it is given with `fold`, from
    /// `identity()`, and its accumulator comes back when the input ends, or earlier
    /// once it has folded `flush_bytes` of encoded input. Returns those partial
    /// accumulators, in arrival order. The job stops at its first failure whatever
    /// the pool's error policy: an accumulator cannot leave out an item. A worker
    /// lost while it holds an accumulator takes nothing with it: the chunks it
    /// folded since its last flush are sent again to the others.
    pub(crate) fn fold_partials<I, T, A, Id, F>(
        &self,
        items: I,
        flush_bytes: usize,
    ) -> Result<Vec<A>>
    where
        I: IntoIterator<Item = T>,
        T: Serialize + DeserializeOwned,
        A: Serialize + DeserializeOwned + 'static,
        Id: Fn() -> A + Copy + Send + Sync,
        F: Fn(A, T) -> A + Copy + Send + Sync,
    {
        task::assert_zero_sized::<Id>();
        task::assert_zero_sized::<F>();
        let task = TaskRef::fold::<T, A, Id, F>().ok_or(Error::TaskNotInExecutable)?;
        let mut sink = PartialsSink {
            partials: Vec::new(),
        };
        self.run_lent(
            items.into_iter(),
            task,
            None,
            ErrorPolicy::FailFast,
            Some(FoldLedger::new(flush_bytes)),
            &mut sink,
        )?;
        Ok(sink.partials)
    }

    fn fold<I, T, U, Id, R>(
        &self,
        items: I,
        task: TaskRef,
        context: Option<ContextPayload<'_>>,
        identity: Id,
        reduce: R,
    ) -> Result<U>
    where
        I: IntoIterator<Item = T>,
        T: Serialize + DeserializeOwned,
        U: DeserializeOwned,
        Id: Fn() -> U + Copy + Send + Sync,
        R: Fn(U, U) -> U + Copy + Send + Sync,
    {
        let mut sink = FoldSink {
            acc: Some(identity()),
            reduce,
            failed: Vec::new(),
        };
        self.run_lent(
            items.into_iter(),
            task,
            context,
            self.error_policy,
            None,
            &mut sink,
        )?;
        items_failed(sink.failed)?;
        Ok(sink.acc.expect("acc is refilled after every fold"))
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Pending work is terminated; with nothing pending, the workers get their
        // channels closed and exit on their own.
        self.core.close();
        if self.core.pending() > 0 {
            let _ = self.core.terminate();
        } else if let Ok(mut driving) = self.core.lock_engine() {
            let engine = driving.engine();
            if engine.outstanding() {
                engine.terminate();
            }
            engine.workers.backend.shutdown();
        }
        self.core.stop_background();
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("workers", &self.workers)
            .finish_non_exhaustive()
    }
}

/// What [`Pool::map_skip`] returns: the results of the items that succeeded and
/// the errors of those that failed, each with the item's index, ascending.
#[derive(Debug)]
#[non_exhaustive]
pub struct Skipped<U> {
    /// `(index, result)` of every item that succeeded.
    pub results: Vec<(usize, U)>,
    /// `(index, error)` of every item that failed.
    pub failed: Vec<(usize, Error)>,
}

impl<U> Skipped<U> {
    /// The results alone, in input order (the failed items left out).
    pub fn values(self) -> Vec<U> {
        self.results.into_iter().map(|(_, value)| value).collect()
    }
}

/// Counters of a pool's life, from [`Pool::stats`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct PoolStats {
    /// Worker processes (or threads) started since the pool was built,
    /// replacements included.
    pub workers_started: u64,
    /// Chunks sent again because the worker holding them was lost.
    pub chunks_retried: u64,
    /// Jobs that have ended.
    pub jobs: u64,
    /// Every job's figures summed (walls too, though jobs may overlap), live jobs
    /// as they stand; each worker's `starting` includes the pool's own start.
    pub totals: JobStats,
}

/// Names the runner for a job, or says why a worker could not find it.
pub(crate) fn task_ref<T, U, M, S, F: Copy>(task: F) -> Result<TaskRef>
where
    T: DeserializeOwned,
    U: Serialize + DeserializeOwned,
    M: Mapper<T, U>,
    S: task::Answer<U>,
{
    // A task is re-created from its type in the worker: it must capture nothing.
    task::assert_zero_sized::<F>();
    let _ = task;
    TaskRef::of::<T, U, M, S>().ok_or(Error::TaskNotInExecutable)
}

/// A call's context value as it goes to the workers: its encoding, or the handle
/// of a shared region holding the encoding (kept alive until the call returns).
struct CallContext {
    bytes: Vec<u8>,
    region: Option<Arc<Region>>,
    /// The `map_file` regions the value names (alive for the call: the caller
    /// lends the value), which its workers may map without seals.
    unsealed: Vec<RegionHandle>,
}

impl CallContext {
    fn payload(&self) -> ContextPayload<'_> {
        ContextPayload {
            bytes: &self.bytes,
            shared: self.region.is_some(),
            unsealed: &self.unsealed,
        }
    }
}

impl Pool {
    /// Encodes a call's context value; one larger than the pool's
    /// `share_contexts_above` goes into a sealed shared region that every worker
    /// maps, and only its handle is sent.
    fn encode_context<C: Serialize + DeserializeOwned>(&self, context: &C) -> Result<CallContext> {
        let (bytes, pins) = region::pin_while(|| encode_context(context));
        let bytes = bytes?;
        let unsealed = pins.unsealed();
        if bytes.len() <= self.share_contexts_above {
            return Ok(CallContext {
                bytes,
                region: None,
                unsealed,
            });
        }
        let region =
            Region::from_bytes(region::CONTEXT_KIND, &bytes).map_err(|fault| Error::Share {
                what: format!("the {}-byte context value", bytes.len()),
                reason: fault.reason,
                source: fault.source,
            })?;
        let mut handle = Vec::new();
        codec::encode_plain_into(&region.handle(), &mut handle).map_err(|source| {
            Error::Context {
                worker: None,
                source,
            }
        })?;
        Ok(CallContext {
            bytes: handle,
            region: Some(region),
            unsealed,
        })
    }
}

/// Encodes a call's context value, checking that it decodes again.
fn encode_context<C: Serialize + DeserializeOwned>(context: &C) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let encoded = codec::encode_into(context, &mut bytes)
        .and_then(|()| codec::decode::<C>(&bytes).map(|_| ()));
    encoded.map_err(|source| Error::Context {
        worker: None,
        source,
    })?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync + 'static>() {}

    #[test]
    fn pools_handles_and_errors_cross_threads() {
        assert_send_sync::<Pool>();
        assert_send_sync::<Error>();
        assert_send_sync::<AsyncResult<u64>>();
    }
}
