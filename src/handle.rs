//! What a caller holds while a job runs: [`AsyncResult`], and the iterators of
//! [`Pool::imap`](crate::Pool::imap) and [`Pool::imap_unordered`](crate::Pool::imap_unordered).

use std::collections::VecDeque;
use std::fmt;
use std::marker::PhantomData;
use std::ops::Range;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use crate::engine::driver::Core;
use crate::engine::job::{Complete, IterSource, JobId, Payload, Sink};
use crate::engine::scheduler::Local;
use crate::error::{Error, ErrorPolicy, Result, TaskPanic};
use crate::wire::codec::{self, Reader};

/// A callback run in the parent with a task's result.
pub(crate) type OnResult<U> = Box<dyn FnOnce(&U) + Send>;
/// A callback run in the parent with a task's error.
pub(crate) type OnError = Box<dyn FnOnce(&Error) + Send>;

enum State<U> {
    Waiting,
    Done(Result<U>),
    Taken,
}

/// Where an asynchronous result lands.
struct Cell<U> {
    state: Mutex<State<U>>,
}

impl<U> Cell<U> {
    fn lock(&self) -> MutexGuard<'_, State<U>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_done(&self) -> bool {
        !matches!(*self.lock(), State::Waiting)
    }
}

/// The result of a task submitted with [`Pool::apply_async`](crate::Pool::apply_async)
/// or of a whole [`Pool::map_async`](crate::Pool::map_async), as Python's
/// `AsyncResult`.
///
/// The result arrives while the caller does other things. Waiting for it
/// ([`get`](Self::get), [`wait`](Self::wait)) moves the pool's work along on the
/// waiting thread when no other thread does. A callback given at submission has
/// run by the time the result is ready.
pub struct AsyncResult<U> {
    cell: Arc<Cell<U>>,
    core: Arc<Core>,
}

impl<U> AsyncResult<U> {
    /// Waits for the result and returns it.
    ///
    /// # Errors
    ///
    /// The task's failure (a panic, a worker's death, a value that does not carry),
    /// [`Error::Terminated`] when the pool was terminated or dropped first,
    /// [`Error::CallbackPanicked`] when the callback panicked, [`Error::ResultTaken`]
    /// when [`get_timeout`](Self::get_timeout) took it already, and
    /// [`Error::NestedCall`] when called from inside the pool's own work (an input
    /// iterator or reduce running on the thread that drives the pool).
    pub fn get(self) -> Result<U> {
        let cell = Arc::clone(&self.cell);
        self.core.wait_until(&|| cell.is_done(), None)?;
        take(&self.cell)
    }

    /// Waits at most `timeout` for the result. On [`Error::Timeout`] the result is
    /// not lost: a later `get` or `get_timeout` returns it.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] when the result is not ready in time, and those of
    /// [`get`](Self::get).
    pub fn get_timeout(&self, timeout: Duration) -> Result<U> {
        let deadline = Instant::now().checked_add(timeout);
        let cell = Arc::clone(&self.cell);
        if !self.core.wait_until(&|| cell.is_done(), deadline)? {
            return Err(Error::Timeout(timeout));
        }
        take(&self.cell)
    }

    /// Whether the result is ready (without waiting).
    pub fn ready(&self) -> bool {
        self.cell.is_done()
    }

    /// Waits until the result is ready, without taking it. Returns at once when
    /// called from inside the pool's own work, where waiting would never end.
    pub fn wait(&self) {
        let cell = Arc::clone(&self.cell);
        // An error here means no waiting is possible (a nested call) or every job
        // has failed already; either way there is nothing more to wait for.
        let _ = self.core.wait_until(&|| cell.is_done(), None);
    }

    /// Waits at most `timeout`; returns whether the result is ready.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        let cell = Arc::clone(&self.cell);
        let deadline = Instant::now().checked_add(timeout);
        matches!(self.core.wait_until(&|| cell.is_done(), deadline), Ok(true))
    }
}

fn take<U>(cell: &Cell<U>) -> Result<U> {
    let mut state = cell.lock();
    match std::mem::replace(&mut *state, State::Taken) {
        State::Done(result) => result,
        State::Taken => Err(Error::ResultTaken),
        State::Waiting => unreachable!("taken only once done"),
    }
}

impl<U> fmt::Debug for AsyncResult<U> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncResult")
            .field("ready", &self.ready())
            .finish_non_exhaustive()
    }
}

/// Completes an [`AsyncResult`]: runs its callbacks (on the pool's callback thread)
/// and stores the result.
pub(crate) struct Completion<U> {
    cell: Arc<Cell<U>>,
    core: Weak<Core>,
    callbacks: Option<(OnResult<U>, OnError)>,
}

impl<U: Send + 'static> Completion<U> {
    /// A new handle and the completion that fills it.
    pub(crate) fn new(
        core: &Arc<Core>,
        callbacks: Option<(OnResult<U>, OnError)>,
    ) -> (AsyncResult<U>, Self) {
        let cell = Arc::new(Cell {
            state: Mutex::new(State::Waiting),
        });
        let handle = AsyncResult {
            cell: Arc::clone(&cell),
            core: Arc::clone(core),
        };
        let completion = Self {
            cell,
            core: Arc::downgrade(core),
            callbacks,
        };
        (handle, completion)
    }

    /// Delivers the result: now when there are no callbacks, else after they ran
    /// on the callback thread. A panicking callback becomes the result.
    pub(crate) fn finish(self, result: Result<U>) {
        let Some(core) = self.core.upgrade() else {
            return;
        };
        match self.callbacks {
            None => {
                *self.cell.lock() = State::Done(result);
                core.completed_one();
                core.notify();
            }
            Some((on_result, on_error)) => {
                let cell = self.cell;
                let notify = Arc::clone(&core);
                core.run_callback(Box::new(move || {
                    let ran = panic::catch_unwind(AssertUnwindSafe(|| match &result {
                        Ok(value) => on_result(value),
                        Err(error) => on_error(error),
                    }));
                    let result = match ran {
                        Ok(()) => result,
                        Err(payload) => Err(Error::CallbackPanicked(TaskPanic {
                            message: panic_message(payload.as_ref()),
                            location: None,
                        })),
                    };
                    *cell.lock() = State::Done(result);
                    notify.completed_one();
                    notify.notify();
                }));
            }
        }
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "Box<dyn Any>".to_owned()
    }
}

/// Completes an `apply_async` handle from its item's outcome.
pub(crate) struct ApplyCompletion<U>(pub(crate) Completion<U>);

impl<U: DeserializeOwned + Send + 'static> Complete for ApplyCompletion<U> {
    fn complete(self: Box<Self>, outcome: Result<(usize, &[u8])>) {
        let result = outcome.and_then(|(worker, bytes)| {
            codec::decode::<U>(bytes).map_err(|source| Error::Result {
                items: 0..1,
                worker,
                source,
            })
        });
        self.0.finish(result);
    }
}

/// Decodes a chunk's results, one per item.
pub(crate) fn decode_results<U: DeserializeOwned>(
    worker: usize,
    items: Range<usize>,
    payload: &[u8],
    mut push: impl FnMut(usize, U),
) -> Result<()> {
    let mut reader = Reader::new(payload);
    for item in items.clone() {
        let value = reader.decode().map_err(|source| Error::Result {
            items: item..item + 1,
            worker,
            source,
        })?;
        push(item, value);
    }
    if !reader.is_empty() {
        return Err(Error::Protocol {
            worker,
            reason: format!("extra bytes after the results of items {items:?}"),
        });
    }
    Ok(())
}

/// Decodes the results of a chunk some of whose items failed: each item gets its
/// result or its error, in item order.
fn decode_partial<U: DeserializeOwned>(
    worker: usize,
    items: Range<usize>,
    payload: &[u8],
    failed: Vec<(usize, Error)>,
    mut push: impl FnMut(usize, Result<U>),
) -> Result<()> {
    let mut reader = Reader::new(payload);
    let mut failed = failed.into_iter().peekable();
    for item in items.clone() {
        if let Some((_, error)) = failed.next_if(|(at, _)| *at == item) {
            push(item, Err(error));
            continue;
        }
        let value = reader.decode().map_err(|source| Error::Result {
            items: item..item + 1,
            worker,
            source,
        })?;
        push(item, Ok(value));
    }
    if !reader.is_empty() {
        return Err(Error::Protocol {
            worker,
            reason: format!("extra bytes after the results of items {items:?}"),
        });
    }
    Ok(())
}

/// The sink of a blocking `map`: results in input order into the caller's vector.
/// Under an error policy that goes on, failed items are kept aside.
pub(crate) struct CollectSink<U> {
    pub(crate) results: Vec<U>,
    pub(crate) failed: Vec<(usize, Error)>,
}

impl<U: DeserializeOwned> Sink for CollectSink<U> {
    fn deliver(&mut self, worker: usize, items: Range<usize>, payload: Payload) -> Result<()> {
        let results = &mut self.results;
        decode_results(worker, items, &payload, |_, value| results.push(value))
    }

    fn deliver_partial(
        &mut self,
        worker: usize,
        items: Range<usize>,
        payload: Payload,
        failed: Vec<(usize, Error)>,
    ) -> Result<()> {
        let Self {
            results,
            failed: kept,
        } = self;
        decode_partial(
            worker,
            items,
            &payload,
            failed,
            |item, outcome| match outcome {
                Ok(value) => results.push(value),
                Err(error) => kept.push((item, error)),
            },
        )
    }

    fn finish(&mut self, _: Result<()>) {}
}

/// The sink of `map_collect`: every item's own outcome, in input order.
pub(crate) struct OutcomeSink<U> {
    pub(crate) outcomes: Vec<Result<U>>,
}

impl<U: DeserializeOwned> Sink for OutcomeSink<U> {
    fn deliver(&mut self, worker: usize, items: Range<usize>, payload: Payload) -> Result<()> {
        let outcomes = &mut self.outcomes;
        decode_results(worker, items, &payload, |_, value| outcomes.push(Ok(value)))
    }

    fn deliver_partial(
        &mut self,
        worker: usize,
        items: Range<usize>,
        payload: Payload,
        failed: Vec<(usize, Error)>,
    ) -> Result<()> {
        let outcomes = &mut self.outcomes;
        decode_partial(worker, items, &payload, failed, |_, outcome| {
            outcomes.push(outcome)
        })
    }

    fn finish(&mut self, _: Result<()>) {}
}

/// The sink of a blocking `map_reduce`: folds each chunk's partial in chunk order.
/// Under an error policy that goes on, failed items are kept aside (a chunk's
/// partial then folds the items that did not fail).
pub(crate) struct FoldSink<U, R> {
    pub(crate) acc: Option<U>,
    pub(crate) reduce: R,
    pub(crate) failed: Vec<(usize, Error)>,
}

impl<U: DeserializeOwned, R: Fn(U, U) -> U> Sink for FoldSink<U, R> {
    fn deliver(&mut self, worker: usize, items: Range<usize>, payload: Payload) -> Result<()> {
        let partial: U = codec::decode(&payload).map_err(|source| Error::Result {
            items,
            worker,
            source,
        })?;
        let so_far = self.acc.take().expect("acc is refilled after every fold");
        self.acc = Some((self.reduce)(so_far, partial));
        Ok(())
    }

    fn deliver_partial(
        &mut self,
        worker: usize,
        items: Range<usize>,
        payload: Payload,
        mut failed: Vec<(usize, Error)>,
    ) -> Result<()> {
        self.failed.append(&mut failed);
        // A chunk settled in the parent, every item failed, has no partial.
        if payload.is_empty() {
            return Ok(());
        }
        self.deliver(worker, items, payload)
    }

    fn finish(&mut self, _: Result<()>) {}
}

/// The sink of a fold job: keeps each worker's accumulator as its flush brings it
/// (a folded chunk's reply is empty, and so is the flush of a worker with none).
pub(crate) struct PartialsSink<A> {
    pub(crate) partials: Vec<A>,
}

impl<A: DeserializeOwned> Sink for PartialsSink<A> {
    fn deliver(&mut self, worker: usize, items: Range<usize>, payload: Payload) -> Result<()> {
        if payload.is_empty() {
            return Ok(());
        }
        let partial: A = codec::decode(&payload).map_err(|source| Error::Result {
            items,
            worker,
            source,
        })?;
        self.partials.push(partial);
        Ok(())
    }

    fn finish(&mut self, _: Result<()>) {}
}

/// The sink of `map_async`: collects results in input order, then completes the
/// handle.
pub(crate) struct MapAsyncSink<U> {
    pub(crate) results: Vec<U>,
    pub(crate) failed: Vec<(usize, Error)>,
    pub(crate) completion: Option<Completion<Vec<U>>>,
}

impl<U: DeserializeOwned + Send + 'static> Sink for MapAsyncSink<U> {
    fn deliver(&mut self, worker: usize, items: Range<usize>, payload: Payload) -> Result<()> {
        let results = &mut self.results;
        decode_results(worker, items, &payload, |_, value| results.push(value))
    }

    fn deliver_partial(
        &mut self,
        worker: usize,
        items: Range<usize>,
        payload: Payload,
        failed: Vec<(usize, Error)>,
    ) -> Result<()> {
        let Self {
            results,
            failed: kept,
            ..
        } = self;
        decode_partial(
            worker,
            items,
            &payload,
            failed,
            |item, outcome| match outcome {
                Ok(value) => results.push(value),
                Err(error) => kept.push((item, error)),
            },
        )
    }

    fn finish(&mut self, outcome: Result<()>) {
        if let Some(completion) = self.completion.take() {
            let results = std::mem::take(&mut self.results);
            let failed = std::mem::take(&mut self.failed);
            completion.finish(
                outcome
                    .and_then(|()| items_failed(failed))
                    .map(|()| results),
            );
        }
    }
}

/// `Ok` when no item failed, else [`Error::ItemsFailed`] listing them.
pub(crate) fn items_failed(failed: Vec<(usize, Error)>) -> Result<()> {
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Error::ItemsFailed { failed })
    }
}

impl<U> Drop for MapAsyncSink<U> {
    fn drop(&mut self) {
        // A sink dropped without `finish` (its pool is gone): the handle must not
        // wait forever.
        if let Some(completion) = self.completion.take() {
            *completion.cell.lock() = State::Done(Err(Error::Terminated));
            if let Some(core) = completion.core.upgrade() {
                core.completed_one();
                core.notify();
            }
        }
    }
}

/// One chunk for an `imap` consumer: its worker, items, payload, and failed items
/// (error policies that go on).
type ImapChunk = (usize, Range<usize>, Payload, Vec<(usize, Error)>);

/// What the engine hands an `imap` consumer: chunk payloads in delivery order.
#[derive(Default)]
struct ImapState {
    queue: VecDeque<ImapChunk>,
    /// Chunks the consumer has taken.
    taken: u64,
    /// The job has ended: `Ok` when every chunk has been queued.
    end: Option<Result<()>>,
}

/// The job's side of an `imap`.
pub(crate) struct ImapSink {
    state: Arc<Mutex<ImapState>>,
}

impl Sink for ImapSink {
    fn deliver(&mut self, worker: usize, items: Range<usize>, payload: Payload) -> Result<()> {
        lock(&self.state)
            .queue
            .push_back((worker, items, payload, Vec::new()));
        Ok(())
    }

    fn deliver_partial(
        &mut self,
        worker: usize,
        items: Range<usize>,
        payload: Payload,
        failed: Vec<(usize, Error)>,
    ) -> Result<()> {
        lock(&self.state)
            .queue
            .push_back((worker, items, payload, failed));
        Ok(())
    }

    fn finish(&mut self, outcome: Result<()>) {
        lock(&self.state).end = Some(outcome);
    }

    fn taken(&self) -> Option<u64> {
        Some(lock(&self.state).taken)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The consumer's side of an `imap` or `imap_unordered`: pulls its input only
/// while it waits for results, so the input is read a bounded window ahead of what
/// was taken.
struct ImapCore<I, U> {
    core: Arc<Core>,
    job: JobId,
    source: IterSource<I>,
    state: Arc<Mutex<ImapState>>,
    decoded: VecDeque<Result<(usize, U)>>,
    /// Under [`ErrorPolicy::Skip`] failed items are kept here instead of yielded.
    skip_failures: bool,
    failures: Vec<(usize, Error)>,
    /// No more results will come.
    finished: bool,
    /// The job has left the engine's table.
    job_gone: bool,
}

impl<I, U> ImapCore<I, U> {
    pub(crate) fn sink_for(state: &Arc<Mutex<ImapState>>) -> ImapSink {
        ImapSink {
            state: Arc::clone(state),
        }
    }
}

/// Builds the consumer side and the job sink of a new `imap`.
pub(crate) fn imap_parts<I, U>(
    core: &Arc<Core>,
    job: JobId,
    items: I,
    policy: ErrorPolicy,
) -> (ImapParts<I, U>, ImapSink) {
    let state = Arc::new(Mutex::new(ImapState::default()));
    let sink = ImapCore::<I, U>::sink_for(&state);
    let parts = ImapParts(ImapCore {
        core: Arc::clone(core),
        job,
        source: IterSource::new(items),
        state,
        decoded: VecDeque::new(),
        skip_failures: policy == ErrorPolicy::Skip,
        failures: Vec::new(),
        finished: false,
        job_gone: false,
    });
    (parts, sink)
}

/// An `imap` consumer not yet wrapped in its public iterator type.
pub(crate) struct ImapParts<I, U>(ImapCore<I, U>);

impl<T, I, U> ImapCore<I, U>
where
    T: serde::Serialize + DeserializeOwned,
    I: Iterator<Item = T>,
    U: DeserializeOwned,
{
    fn next_result(&mut self) -> Option<Result<(usize, U)>> {
        loop {
            if let Some(next) = self.decoded.pop_front() {
                return Some(next);
            }
            if self.finished {
                return None;
            }
            let mut state = lock(&self.state);
            if let Some((worker, items, payload, failed)) = state.queue.pop_front() {
                state.taken += 1;
                drop(state);
                let Self {
                    decoded,
                    failures,
                    skip_failures,
                    ..
                } = self;
                let outcome =
                    if failed.is_empty() {
                        // The common case: every item of the chunk has its value.
                        decoded.reserve(items.len());
                        decode_results(worker, items, &payload, |item, value| {
                            decoded.push_back(Ok((item, value)));
                        })
                    } else {
                        decode_partial(worker, items, &payload, failed, |item, outcome| {
                            match outcome {
                                Ok(value) => decoded.push_back(Ok((item, value))),
                                Err(error) if *skip_failures => failures.push((item, error)),
                                Err(error) => decoded.push_back(Err(error)),
                            }
                        })
                    };
                if let Err(e) = outcome {
                    self.decoded.push_back(Err(e));
                    self.stop();
                }
                continue;
            }
            if let Some(end) = state.end.take() {
                drop(state);
                self.finished = true;
                self.job_gone = true;
                if let Err(e) = end {
                    return Some(Err(e));
                }
                continue;
            }
            drop(state);
            if let Err(e) = self.drive() {
                self.finished = true;
                return Some(Err(e));
            }
        }
    }

    /// Drives the pool, lending the input, until a chunk or the end is queued.
    fn drive(&mut self) -> Result<()> {
        let mut driving = self.core.lock_engine()?;
        let state = Arc::clone(&self.state);
        let mut local = Local {
            job: self.job,
            source: Some(&mut self.source),
            sink: None,
        };
        let mut until = |_: &crate::engine::scheduler::Engine| {
            let state = lock(&state);
            !state.queue.is_empty() || state.end.is_some()
        };
        let driven = driving.drive(Some(&mut local), &mut until, None)?;
        if driven == crate::engine::scheduler::Drive::Idle && !until(driving.engine()) {
            // Nothing in flight and nothing to send, yet no end: the job is gone.
            return Err(Error::Terminated);
        }
        Ok(())
    }
}

impl<I, U> ImapCore<I, U> {
    /// Stops the job: reads no more input and ignores what is in flight.
    fn stop(&mut self) {
        self.finished = true;
        if std::mem::replace(&mut self.job_gone, true) {
            return;
        }
        if let Ok(mut driving) = self.core.lock_engine() {
            // Its outcome, if any, was already seen or is not wanted.
            let _ = driving.engine().remove(self.job);
        }
    }
}

impl<I, U> Drop for ImapCore<I, U> {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The iterator of [`Pool::imap`](crate::Pool::imap): results in input order.
///
/// The input is read lazily, at most a bounded window of chunks ahead of the
/// results taken. Dropping it early stops reading the input and discards what is
/// in flight; the pool is usable at once.
pub struct Imap<'p, I, U> {
    inner: ImapCore<I, U>,
    _pool: PhantomData<&'p ()>,
}

impl<I, U> Imap<'_, I, U> {
    pub(crate) fn new(parts: ImapParts<I, U>) -> Self {
        Self {
            inner: parts.0,
            _pool: PhantomData,
        }
    }

    /// Under [`ErrorPolicy::Skip`], the items left out so far: `(index, error)`,
    /// in the order they were met. Empty under other policies, which yield
    /// failures in place.
    pub fn failures(&self) -> &[(usize, Error)] {
        &self.inner.failures
    }
}

impl<T, I, U> Iterator for Imap<'_, I, U>
where
    T: serde::Serialize + DeserializeOwned,
    I: Iterator<Item = T>,
    U: DeserializeOwned,
{
    type Item = Result<U>;

    fn next(&mut self) -> Option<Result<U>> {
        self.inner.next_result().map(|r| r.map(|(_, value)| value))
    }
}

/// The iterator of [`Pool::imap_unordered`](crate::Pool::imap_unordered): each
/// item's index and result, in completion order.
///
/// Reads its input lazily as [`Imap`] does, and stops the same way when dropped.
pub struct ImapUnordered<'p, I, U> {
    inner: ImapCore<I, U>,
    _pool: PhantomData<&'p ()>,
}

impl<I, U> ImapUnordered<'_, I, U> {
    pub(crate) fn new(parts: ImapParts<I, U>) -> Self {
        Self {
            inner: parts.0,
            _pool: PhantomData,
        }
    }

    /// Under [`ErrorPolicy::Skip`], the items left out so far, as
    /// [`Imap::failures`].
    pub fn failures(&self) -> &[(usize, Error)] {
        &self.inner.failures
    }
}

impl<T, I, U> Iterator for ImapUnordered<'_, I, U>
where
    T: serde::Serialize + DeserializeOwned,
    I: Iterator<Item = T>,
    U: DeserializeOwned,
{
    type Item = Result<(usize, U)>;

    fn next(&mut self) -> Option<Result<(usize, U)>> {
        self.inner.next_result()
    }
}

impl<I, U> fmt::Debug for Imap<'_, I, U> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Imap").finish_non_exhaustive()
    }
}

impl<I, U> fmt::Debug for ImapUnordered<'_, I, U> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImapUnordered").finish_non_exhaustive()
    }
}
