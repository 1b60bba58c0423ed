//! Pool and PoolBuilder: the public face of a set of workers, Python's `Pool` typed.

use std::any::TypeId;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::backend::{Backend, StartOptions};
use crate::chunker;
use crate::codec;
use crate::driver::Core;
use crate::error::{Error, Result};
use crate::handle::{
    ApplyCompletion, AsyncResult, CollectSink, Completion, FoldSink, Imap, ImapParts,
    ImapUnordered, MapAsyncSink, OnError, OnResult, imap_parts,
};
use crate::interrupt;
use crate::job::{IterSource, Job, Kind, Sink, encode_item};
use crate::protocol::TaskRef;
use crate::scheduler::{Drive, Engine, Hooks, Local, Submission};
use crate::spawn::SpawnOptions;
use crate::supervisor::Supervisor;
use crate::task::{self, Collect, Fold, Mapper, Outcomes, Plain, WithContext, WithState};
use crate::worker;

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
/// initializer ([`PoolBuilder::initializer`], [`Pool::map_with_state`]). A task that
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
    core: Arc<Core>,
    workers: usize,
    /// The longest a blocking call may take.
    call_timeout: Option<Duration>,
    /// Blocking calls stop on Ctrl-C.
    interrupt: bool,
    /// The type of the state the initializer builds, if any.
    state: Option<(TypeId, &'static str)>,
}

impl Pool {
    /// Starts configuring a pool.
    pub fn builder() -> PoolBuilder {
        PoolBuilder::default()
    }

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

    /// What the pool has done so far: workers started, chunks sent again.
    ///
    /// # Errors
    ///
    /// As [`Pool::worker_pids`].
    pub fn stats(&self) -> Result<PoolStats> {
        let mut driving = self.core.lock_engine()?;
        let engine = driving.engine();
        Ok(PoolStats {
            workers_started: engine.workers.started,
            chunks_retried: engine.retried,
        })
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
        task::assert_zero_sized::<F>();
        let _ = task;
        self.collect(items, task_ref::<T, U, Plain<F>, Collect>()?, None)
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
        task::assert_zero_sized::<F>();
        let _ = task;
        let context = encode_context(context)?;
        let task = task_ref::<T, U, WithContext<F, C>, Collect>()?;
        self.collect(items, task, Some(&context))
    }

    /// Like [`Pool::map`], for a task that uses the per-worker state built by the
    /// pool's initializer ([`PoolBuilder::initializer`]): `Fn(&mut S, T) -> U`.
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
        task::assert_zero_sized::<F>();
        let _ = task;
        self.check_state::<S>()?;
        self.collect(items, task_ref::<T, U, WithState<F, S>, Collect>()?, None)
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
        task::assert_zero_sized::<F>();
        task::assert_zero_sized::<Id>();
        task::assert_zero_sized::<R>();
        let _ = task;
        let task = task_ref::<T, U, Plain<F>, Fold<U, Id, R>>()?;
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
        task::assert_zero_sized::<F>();
        task::assert_zero_sized::<Id>();
        task::assert_zero_sized::<R>();
        let _ = task;
        let context = encode_context(context)?;
        let task = task_ref::<T, U, WithContext<F, C>, Fold<U, Id, R>>()?;
        self.fold(items, task, Some(&context), identity, reduce)
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
        task::assert_zero_sized::<F>();
        let _ = task;
        self.submit_apply::<T, U, F>(arg, None)
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
        task::assert_zero_sized::<F>();
        let _ = task;
        let callbacks: (OnResult<U>, OnError) = (Box::new(callback), Box::new(error_callback));
        self.submit_apply::<T, U, F>(arg, Some(callbacks))
    }

    fn submit_apply<T, U, F>(
        &self,
        arg: T,
        callbacks: Option<(OnResult<U>, OnError)>,
    ) -> Result<AsyncResult<U>>
    where
        T: Serialize + DeserializeOwned,
        U: Serialize + DeserializeOwned + Send + 'static,
        F: Fn(T) -> U + Copy + Send + Sync,
    {
        let task = task_ref::<T, U, Plain<F>, Outcomes>()?;
        let mut bytes = Vec::new();
        encode_item(&arg, 0, &mut bytes)?;
        let (handle, completion) = Completion::new(&self.core, callbacks);
        let submission = Submission::Apply {
            task,
            arg: bytes,
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
        task::assert_zero_sized::<F>();
        let _ = task;
        self.submit_map::<I, T, U, F>(items, None)
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
        task::assert_zero_sized::<F>();
        let _ = task;
        let callbacks: (OnResult<Vec<U>>, OnError) = (Box::new(callback), Box::new(error_callback));
        self.submit_map::<I, T, U, F>(items, Some(callbacks))
    }

    fn submit_map<I, T, U, F>(
        &self,
        items: I,
        callbacks: Option<(OnResult<Vec<U>>, OnError)>,
    ) -> Result<AsyncResult<Vec<U>>>
    where
        I: IntoIterator<Item = T>,
        I::IntoIter: Send + 'static,
        T: Serialize + DeserializeOwned,
        U: Serialize + DeserializeOwned + Send + 'static,
        F: Fn(T) -> U + Copy + Send + Sync,
    {
        let task = task_ref::<T, U, Plain<F>, Collect>()?;
        let (handle, completion) = Completion::new(&self.core, callbacks);
        let kind = Kind::Owned {
            source: Box::new(IterSource::new(items.into_iter())),
            sink: Box::new(MapAsyncSink {
                results: Vec::new(),
                completion: Some(completion),
            }),
        };
        let job = self
            .core
            .lock_open_engine()?
            .engine()
            .new_job(task, kind, true, None)?;
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
        task::assert_zero_sized::<F>();
        let _ = task;
        Ok(Imap::new(self.start_imap::<I, T, U, F>(items, true)?))
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
        task::assert_zero_sized::<F>();
        let _ = task;
        Ok(ImapUnordered::new(
            self.start_imap::<I, T, U, F>(items, false)?,
        ))
    }

    /// Puts an `imap` job in the table; its consumer side is returned.
    pub(crate) fn start_imap<I, T, U, F>(
        &self,
        items: I,
        ordered: bool,
    ) -> Result<ImapParts<I::IntoIter, U>>
    where
        I: IntoIterator<Item = T>,
        T: Serialize + DeserializeOwned,
        U: Serialize + DeserializeOwned,
        F: Fn(T) -> U + Copy + Send + Sync,
    {
        let task = task_ref::<T, U, Plain<F>, Collect>()?;
        let mut driving = self.core.lock_open_engine()?;
        let engine = driving.engine();
        let mut job = engine.new_job(task, Kind::Lent, ordered, None)?;
        let (parts, sink) = imap_parts(&self.core, job.id, items.into_iter());
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

    /// Runs a job whose source and sink the caller lends, driving the pool until
    /// the job ends.
    fn run_lent<I, T>(
        &self,
        items: I,
        task: TaskRef,
        context: Option<&[u8]>,
        sink: &mut dyn Sink,
    ) -> Result<()>
    where
        I: Iterator<Item = T>,
        T: Serialize + DeserializeOwned,
    {
        let mut driving = self.core.lock_open_engine()?;
        let job = driving.engine().new_job(task, Kind::Lent, true, context)?;
        let id = driving.engine().add(job);
        let mut source = IterSource::new(items);
        let mut local = Local {
            job: id,
            source: Some(&mut source),
            sink: Some(sink),
        };
        let ctrl_c = self.interrupt.then(interrupt::Guard::install).flatten();
        let watch = ctrl_c.is_some();
        let mut until = |engine: &Engine| {
            engine.job(id).is_none_or(Job::ended) || (watch && interrupt::interrupted())
        };
        let deadline = self
            .call_timeout
            .and_then(|timeout| Instant::now().checked_add(timeout));
        // User code runs inside (the input iterator, `Serialize`, the reduce): if it
        // panics, the job leaves the table before the panic goes on, so its late
        // replies are ignored and the pool stays usable.
        let driven = panic::catch_unwind(AssertUnwindSafe(|| {
            driving.drive(Some(&mut local), &mut until, deadline)
        }));
        if watch
            && matches!(driven, Ok(Ok(_)))
            && interrupt::interrupted()
            && driving.engine().job(id).is_some_and(|job| !job.ended())
        {
            // Ctrl-C: send nothing more, let running tasks finish for a moment,
            // then stop the workers still running this job's chunks.
            let engine = driving.engine();
            engine.stop_dispatch(id);
            let mut drained =
                |engine: &Engine| engine.job(id).is_none_or(|j| j.ended() || j.in_flight == 0);
            let grace = Instant::now() + INTERRUPT_GRACE;
            let _ = driving.drive(Some(&mut local), &mut drained, Some(grace));
            let engine = driving.engine();
            let done = engine.job(id).map_or(0, |job| job.items_delivered);
            engine.abandon(id, Error::Interrupted { done });
        }
        drop(ctrl_c);
        if let (Ok(Ok(Drive::TimedOut)), Some(timeout)) = (&driven, self.call_timeout) {
            let engine = driving.engine();
            let done = engine.job(id).map_or(0, |job| job.items_delivered);
            engine.abandon(id, Error::CallTimedOut { timeout, done });
        }
        let outcome = driving.engine().remove(id);
        let driven = match driven {
            Ok(driven) => driven,
            Err(payload) => {
                drop(driving);
                panic::resume_unwind(payload)
            }
        };
        driven?;
        outcome.unwrap_or(Err(Error::Terminated))
    }

    fn collect<I, T, U>(&self, items: I, task: TaskRef, context: Option<&[u8]>) -> Result<Vec<U>>
    where
        I: IntoIterator<Item = T>,
        T: Serialize + DeserializeOwned,
        U: DeserializeOwned,
    {
        let items = items.into_iter();
        // The hint is only a hint: a wrong one must not reserve absurd amounts.
        let mut sink = CollectSink {
            results: Vec::with_capacity(items.size_hint().0.min(1 << 20)),
        };
        self.run_lent(items, task, context, &mut sink)?;
        Ok(sink.results)
    }

    fn fold<I, T, U, Id, R>(
        &self,
        items: I,
        task: TaskRef,
        context: Option<&[u8]>,
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
        };
        self.run_lent(items.into_iter(), task, context, &mut sink)?;
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

/// How long running tasks may finish after Ctrl-C before their workers are killed.
const INTERRUPT_GRACE: Duration = Duration::from_millis(250);

/// Counters of a pool's life, from [`Pool::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStats {
    /// Worker processes (or threads) started since the pool was built,
    /// replacements included.
    pub workers_started: u64,
    /// Chunks sent again because the worker holding them was lost.
    pub chunks_retried: u64,
}

/// Names the runner for a job, or says why a worker could not find it.
fn task_ref<T, U, M, S>() -> Result<TaskRef>
where
    T: DeserializeOwned,
    U: Serialize + DeserializeOwned,
    M: Mapper<T, U>,
    S: task::Sink<U>,
{
    TaskRef::of::<T, U, M, S>().ok_or(Error::TaskNotInExecutable)
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

/// An initializer given to the builder: its runner and encoded argument, or why it
/// cannot be used.
#[derive(Debug, Clone)]
struct Initializer {
    prepared: std::result::Result<(TaskRef, Vec<u8>), String>,
    state: (TypeId, &'static str),
}

/// Configures and starts a [`Pool`].
///
/// ```standalone_crate
/// use std::time::{Duration, Instant};
/// fn main() -> multiproc::Result<()> {
///     multiproc::init();
///     let pool = multiproc::Pool::builder()
///         .workers(2)
///         .chunk_size(64)
///         .start_timeout(Duration::from_secs(5))
///         .max_tasks_per_worker(1_000)
///         .build()?;
///     assert_eq!(pool.workers(), 2);
///     Ok(())
/// }
/// ```
#[derive(Debug, Clone)]
pub struct PoolBuilder {
    workers: Option<usize>,
    chunk_size: Option<usize>,
    inline: bool,
    inherit_output: bool,
    start_timeout: Duration,
    max_tasks: Option<usize>,
    initializer: Option<Initializer>,
    max_chunk_items: Option<usize>,
    retries: u32,
    task_timeout: Option<Duration>,
    call_timeout: Option<Duration>,
    interrupt: bool,
    memory_limit: Option<u64>,
    kill_before_send: Option<(usize, u64)>,
    corrupt_reply: Option<(usize, u64)>,
}

impl Default for PoolBuilder {
    fn default() -> Self {
        Self {
            workers: None,
            chunk_size: None,
            inline: false,
            inherit_output: true,
            start_timeout: Duration::from_secs(30),
            max_tasks: None,
            initializer: None,
            max_chunk_items: None,
            retries: 1,
            task_timeout: None,
            call_timeout: None,
            interrupt: false,
            memory_limit: None,
            kill_before_send: None,
            corrupt_reply: None,
        }
    }
}

impl PoolBuilder {
    /// Number of workers; the default is the number of CPUs (`num_cpus::get()`).
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = Some(workers);
        self
    }

    /// Items per chunk. By default the size adapts so that a chunk holds about one
    /// millisecond of work and fits one socket message (about 199 KiB of encoded
    /// items with Linux's default socket buffer); a fixed size
    /// lifts that byte limit (a chunk over the socket's one-message size travels
    /// through shared memory).
    pub fn chunk_size(mut self, items: usize) -> Self {
        self.chunk_size = Some(items);
        self
    }

    /// Runs the workers as threads in this process instead of child processes: the
    /// same protocol and encoding, without the isolation. For tests and debugging.
    /// A thread cannot be killed: a stuck task keeps its thread, which the pool
    /// abandons (it does not wait for it when dropped).
    pub fn inline(mut self, inline: bool) -> Self {
        self.inline = inline;
        self
    }

    /// Whether worker processes write to this process's stdout and stderr (the
    /// default, as in Python's `multiprocessing`), or to `/dev/null`.
    pub fn inherit_output(mut self, inherit: bool) -> Self {
        self.inherit_output = inherit;
        self
    }

    /// How long a starting worker may take to connect before the start fails; the
    /// default is 30 seconds. A worker that exits before connecting fails the start
    /// at once.
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    /// Replaces a worker after it has been given `n` items (Python's
    /// `maxtasksperchild`), to contain leaks in the tasks or the libraries they use.
    /// The replacement is started as soon as the old worker has its last item, while
    /// that worker finishes, so the pool keeps its strength. Chunks never take a
    /// worker past `n` items.
    pub fn max_tasks_per_worker(mut self, n: usize) -> Self {
        self.max_tasks = Some(n);
        self
    }

    /// Runs `init(arg)` once in each worker when it starts (replacements included)
    /// and keeps what it returns as that worker's state, which tasks given to
    /// [`Pool::map_with_state`] get as `&mut S` (Python's `initializer` and
    /// `initargs`, typed). `init` is a `fn` or a closure that captures nothing; `arg`
    /// is encoded once, here.
    ///
    /// A panic in `init` fails [`build`](Self::build) with [`Error::Initializer`]; in
    /// a replacement worker, it fails the tasks that need the state with
    /// [`Error::WorkerState`].
    pub fn initializer<A, S, F>(mut self, init: F, arg: A) -> Self
    where
        A: Serialize + DeserializeOwned,
        S: 'static,
        F: Fn(A) -> S + Copy + Send + Sync,
    {
        task::assert_zero_sized::<F>();
        let _ = init;
        let mut bytes = Vec::new();
        let prepared = match TaskRef::init::<A, S, F>() {
            None => Err("the initializer is not in the program's executable".to_owned()),
            Some(task) => encode_item(&arg, 0, &mut bytes)
                .map(|()| (task, bytes))
                .map_err(|e| format!("its argument does not encode: {e}")),
        };
        self.initializer = Some(Initializer {
            prepared,
            state: (TypeId::of::<S>(), std::any::type_name::<S>()),
        });
        self
    }

    /// How many times a chunk whose worker died (killed by a signal, aborted, out of
    /// memory) is sent again to a fresh worker before its job fails with
    /// [`Error::WorkerExited`]; the default is 1. Results are delivered exactly once
    /// and in order, as if nothing happened: the dead worker cannot answer, and a
    /// fold counts each chunk once. A task that panics is not retried: its error is
    /// its answer.
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// Kills a worker whose current item runs longer than `timeout`, replaces it,
    /// and fails that item with [`Error::TimedOut`] (its job, or its handle for
    /// `apply_async`); the worker's other chunks are sent again. Under a task
    /// timeout every item is sent as its own chunk, so the deadline is the item's:
    /// use it for tasks of milliseconds or more, not for tiny ones.
    pub fn task_timeout(mut self, timeout: Duration) -> Self {
        self.task_timeout = Some(timeout);
        self
    }

    /// Fails a blocking call (`map`, `map_reduce` and their `_with` forms) that has
    /// not finished within `timeout` with [`Error::CallTimedOut`], and stops the
    /// workers running its chunks: an upper bound for a batch job. [`Pool::apply`]
    /// returns the same error but leaves its task running; use
    /// [`task_timeout`](Self::task_timeout) to have it killed.
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = Some(timeout);
        self
    }

    /// Limits each worker's address space to `bytes` (`RLIMIT_AS`), so one input
    /// that makes a task allocate without bound kills its worker, not the machine.
    /// The chunk is retried like any lost chunk, then its job fails with
    /// [`Error::MemoryLimit`]. The limit counts mapped memory, not only what is
    /// used: leave room for the program itself (tens of MiB) and for large frames.
    pub fn memory_limit(mut self, bytes: u64) -> Self {
        self.memory_limit = Some(bytes);
        self
    }

    /// Makes Ctrl-C (SIGINT) stop a blocking call (`map`, `map_reduce` and their
    /// `_with` forms) instead of the program: the call sends nothing more, gives
    /// running tasks a grace period of a quarter second, kills the workers still
    /// running its chunks and returns [`Error::Interrupted`] saying how many items
    /// were done. The handler is installed only while such a call runs, and a
    /// handler the program installed itself (signal-hook, ctrlc) is still called.
    /// Off by default: then Ctrl-C does what the program made it do (by default it
    /// ends the program, and the workers die with it). Workers always ignore
    /// SIGINT and sit in a process group of their own, so a terminal's Ctrl-C
    /// reaches only this process.
    pub fn interrupt_on_ctrl_c(mut self, on: bool) -> Self {
        self.interrupt = on;
        self
    }

    /// Fault injection for tests of this crate: kills the worker in slot `worker`
    /// just before its `send`-th request (counted from 0: contexts, chunks and the
    /// initializer all count) is sent, as if it had died while idle.
    #[doc(hidden)]
    pub fn kill_worker_before_send(mut self, worker: usize, send: u64) -> Self {
        self.kill_before_send = Some((worker, send));
        self
    }

    /// Fault injection for tests of this crate: replaces the `reply`-th reply
    /// (counted from 0) of the worker in slot `worker` by bytes that are not a frame.
    #[doc(hidden)]
    pub fn corrupt_reply_from(mut self, worker: usize, reply: u64) -> Self {
        self.corrupt_reply = Some((worker, reply));
        self
    }

    /// Caps adaptive chunks at `items` items (pipeline stages bound their queues
    /// in items this way).
    pub(crate) fn max_chunk_items(mut self, items: usize) -> Self {
        self.max_chunk_items = Some(items.max(1));
        self
    }

    /// Starts the workers and waits until each has connected (and run the
    /// initializer, if any).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for zero workers or a zero chunk size, [`Error::InitMissing`]
    /// when called in a worker process whose `main` did not call [`init`](crate::init)
    /// first, [`Error::Spawn`] or [`Error::Handshake`] when a worker cannot be started,
    /// [`Error::Initializer`] when the initializer fails.
    pub fn build(self) -> Result<Pool> {
        let workers = self.workers.unwrap_or_else(num_cpus::get);
        if workers == 0 {
            return Err(Error::Config("a pool needs at least one worker"));
        }
        if self.chunk_size == Some(0) {
            return Err(Error::Config("chunk size must be at least one item"));
        }
        if self
            .chunk_size
            .is_some_and(|n| n > chunker::MAX_CHUNK_ITEMS)
        {
            return Err(Error::Config("chunk size must be at most 2^24 items"));
        }
        if self.max_tasks == Some(0) {
            return Err(Error::Config("max_tasks_per_worker must be at least 1"));
        }
        if !self.inline && worker::init_missing() {
            return Err(Error::InitMissing);
        }
        let (init, state) = match self.initializer {
            None => (None, None),
            Some(Initializer {
                prepared: Ok(prepared),
                state,
            }) => (Some(prepared), Some(state)),
            Some(Initializer {
                prepared: Err(reason),
                ..
            }) => return Err(Error::Initializer { worker: 0, reason }),
        };
        let options = StartOptions {
            spawn: SpawnOptions {
                inherit_output: self.inherit_output,
                memory_limit: self.memory_limit,
                #[cfg(test)]
                program: None,
            },
            start_timeout: self.start_timeout,
            kill_before_send: self.kill_before_send,
            corrupt_reply: self.corrupt_reply,
        };
        let backend = Backend::start(self.inline, workers, options)?;
        let supervisor = Supervisor::new(backend, self.max_tasks, init);
        let mut engine = Engine::new(supervisor, self.chunk_size, workers);
        engine.max_chunk_items = self.max_chunk_items.unwrap_or(usize::MAX);
        engine.retries = self.retries;
        engine.task_timeout = self.task_timeout;
        engine.memory_limit = self.memory_limit;
        if engine.workers.initializing() {
            engine.drive(&Starting, None, &mut |e| !e.workers.initializing(), None)?;
        }
        if let Some((worker, reason)) = engine.init_failures.pop() {
            return Err(Error::Initializer { worker, reason });
        }
        Ok(Pool {
            core: Core::new(engine),
            workers,
            call_timeout: self.call_timeout,
            interrupt: self.interrupt,
            state,
        })
    }
}

/// The hooks of an engine not yet shared: nothing can be submitted to it yet.
struct Starting;

impl Hooks for Starting {
    fn take_inbox(&self) -> Vec<Submission> {
        Vec::new()
    }
    fn terminating(&self) -> bool {
        false
    }
    fn notify(&self) {}
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
