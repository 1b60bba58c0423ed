//! Pool and PoolBuilder: start workers, feed them calls, watch and stop them.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::backend::{Backend, StartOptions};
use crate::chunker;
use crate::codec::{self, Reader};
use crate::error::{Error, Result};
use crate::par_map;
use crate::task::{self, Collect, Fold, Mapper, Plain, Sink, TaskRef, WithContext};
use crate::transport::FrameBuf;
use crate::worker;

/// A set of worker processes that run tasks, kept alive across calls.
///
/// Build one with [`Pool::builder`]. Each call (`map`, `map_reduce`, ...) splits its
/// input into chunks, runs them on the workers and returns the results in input
/// order. Calls from several threads are served one after another. Dropping the pool
/// closes the workers' channels, waits briefly for them to exit, kills any that do
/// not, and reaps them all: no worker process outlives its pool.
///
/// A task is a `fn` item or a closure that captures nothing (it is re-created in each
/// worker process); the build fails with an explanation otherwise. Such functions are
/// `Copy + Send + Sync`, which the bounds also ask for. State travels as a context
/// value ([`Pool::map_with`]) or inside the items.
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
    inner: Mutex<PoolInner>,
    workers: usize,
}

/// The pool's mutable state, owned by one call at a time.
pub(crate) struct PoolInner {
    pub(crate) backend: Backend,
    pub(crate) next_call: u64,
    pub(crate) chunk_size: Option<usize>,
    /// Reused for every request frame.
    pub(crate) frame: FrameBuf,
    /// A call ended with chunks still in flight (an error path, or a panic in the
    /// caller's reduce): the workers' queues hold stale work, so restart them all.
    pub(crate) dirty: bool,
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
    /// [`Error::NestedCall`] when called from inside a call on this pool.
    pub fn worker_pids(&self) -> Result<Vec<u32>> {
        Ok(self.enter()?.backend.pids().into_iter().flatten().collect())
    }

    /// Applies `task` to every item and returns the results in input order.
    ///
    /// The input is consumed lazily, a bounded number of chunks ahead of the results.
    ///
    /// # Errors
    ///
    /// The first failure by item index among those seen before the call stopped: a
    /// task panic ([`Error::TaskPanicked`]), an item or result that does not encode or
    /// decode, a worker that died ([`Error::WorkerExited`]). No partial result is
    /// returned; the pool stays usable (lost workers are replaced on the next call).
    pub fn map<I, T, U, F>(&self, items: I, task: F) -> Result<Vec<U>>
    where
        I: IntoIterator<Item = T>,
        T: Serialize + DeserializeOwned,
        U: Serialize + DeserializeOwned,
        F: Fn(T) -> U + Copy + Send + Sync,
    {
        task::assert_zero_sized::<F>();
        let _ = task;
        self.collect(items, job::<T, U, Plain<F>, Collect>()?, None)
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
        self.collect(
            items,
            job::<T, U, WithContext<F, C>, Collect>()?,
            Some(&context),
        )
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
        let job = job::<T, U, Plain<F>, Fold<U, Id, R>>()?;
        self.fold(items, job, None, identity, reduce)
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
        let job = job::<T, U, WithContext<F, C>, Fold<U, Id, R>>()?;
        self.fold(items, job, Some(&context), identity, reduce)
    }

    fn collect<I, T, U>(&self, items: I, job: TaskRef, context: Option<&[u8]>) -> Result<Vec<U>>
    where
        I: IntoIterator<Item = T>,
        T: Serialize + DeserializeOwned,
        U: DeserializeOwned,
    {
        let items = items.into_iter();
        // The hint is only a hint: a wrong one must not reserve absurd amounts.
        let mut results = Vec::with_capacity(items.size_hint().0.min(1 << 20));
        let mut deliver = |worker: usize, range: std::ops::Range<usize>, payload: &[u8]| {
            let mut reader = Reader::new(payload);
            for item in range.clone() {
                let value = reader.decode().map_err(|source| Error::Result {
                    items: item..item + 1,
                    worker,
                    source,
                })?;
                results.push(value);
            }
            if !reader.is_empty() {
                return Err(Error::Protocol {
                    worker,
                    reason: format!("extra bytes after the results of items {range:?}"),
                });
            }
            Ok(())
        };
        par_map::run(&mut *self.enter()?, items, job, context, &mut deliver)?;
        Ok(results)
    }

    fn fold<I, T, U, Id, R>(
        &self,
        items: I,
        job: TaskRef,
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
        let mut acc = Some(identity());
        let mut deliver = |worker: usize, range: std::ops::Range<usize>, payload: &[u8]| {
            let partial: U = codec::decode(payload).map_err(|source| Error::Result {
                items: range,
                worker,
                source,
            })?;
            let so_far = acc.take().expect("acc is refilled after every fold");
            acc = Some(reduce(so_far, partial));
            Ok(())
        };
        par_map::run(
            &mut *self.enter()?,
            items.into_iter(),
            job,
            context,
            &mut deliver,
        )?;
        Ok(acc.expect("acc is refilled after every fold"))
    }

    /// Takes the pool for one call, waiting for calls from other threads to end.
    fn enter(&self) -> Result<Entered<'_>> {
        let id = std::ptr::from_ref(self) as usize;
        if ENTERED.with(|entered| entered.borrow().contains(&id)) {
            return Err(Error::NestedCall);
        }
        // A panic in a caller's reduce poisons the lock mid-call; the call marked the
        // pool dirty, so the next call restarts the workers and carries on.
        let guard = self.inner.lock().unwrap_or_else(|poisoned| {
            let mut inner = poisoned.into_inner();
            inner.dirty = true;
            inner
        });
        ENTERED.with(|entered| entered.borrow_mut().push(id));
        Ok(Entered { guard, id })
    }
}

thread_local! {
    /// The pools this thread is inside a call of. A call that reaches the same pool
    /// again from its own input, `Serialize` or reduce would wait for itself.
    static ENTERED: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

/// The pool's state, held by one call; leaving forgets the call on this thread.
struct Entered<'p> {
    guard: MutexGuard<'p, PoolInner>,
    id: usize,
}

impl Deref for Entered<'_> {
    type Target = PoolInner;
    fn deref(&self) -> &PoolInner {
        &self.guard
    }
}

impl DerefMut for Entered<'_> {
    fn deref_mut(&mut self) -> &mut PoolInner {
        &mut self.guard
    }
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        ENTERED.with(|entered| {
            let mut entered = entered.borrow_mut();
            if let Some(at) = entered.iter().rposition(|&id| id == self.id) {
                entered.remove(at);
            }
        });
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("workers", &self.workers)
            .finish_non_exhaustive()
    }
}

/// Names the runner for a call, or says why a worker could not find it.
fn job<T, U, M, S>() -> Result<TaskRef>
where
    T: DeserializeOwned,
    U: Serialize + DeserializeOwned,
    M: Mapper<T, U>,
    S: Sink<U>,
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

/// Configures and starts a [`Pool`].
///
/// ```standalone_crate
/// use std::time::Duration;
/// fn main() -> multiproc::Result<()> {
///     multiproc::init();
///     let pool = multiproc::Pool::builder()
///         .workers(2)
///         .chunk_size(64)
///         .start_timeout(Duration::from_secs(5))
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
}

impl Default for PoolBuilder {
    fn default() -> Self {
        Self {
            workers: None,
            chunk_size: None,
            inline: false,
            inherit_output: true,
            start_timeout: Duration::from_secs(30),
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
    /// millisecond of work and at most about 192 KiB of encoded items.
    pub fn chunk_size(mut self, items: usize) -> Self {
        self.chunk_size = Some(items);
        self
    }

    /// Runs the workers as threads in this process instead of child processes: the
    /// same protocol and encoding, without the isolation. For tests and debugging.
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

    /// Starts the workers and waits until each has connected.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for zero workers or a zero chunk size, [`Error::InitMissing`]
    /// when called in a worker process whose `main` did not call [`init`](crate::init)
    /// first, [`Error::Spawn`] or [`Error::Handshake`] when a worker cannot be started.
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
        if !self.inline && worker::init_missing() {
            return Err(Error::InitMissing);
        }
        let options = StartOptions {
            inherit_output: self.inherit_output,
            start_timeout: self.start_timeout,
            #[cfg(test)]
            program: None,
        };
        let backend = Backend::start(self.inline, workers, options)?;
        Ok(Pool {
            inner: Mutex::new(PoolInner {
                backend,
                next_call: 0,
                chunk_size: self.chunk_size,
                frame: FrameBuf::with_capacity(chunker::TARGET_CHUNK_BYTES + 1024),
                dirty: false,
            }),
            workers,
        })
    }
}
