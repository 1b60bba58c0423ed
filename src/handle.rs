//! What a caller holds while a job runs: [`AsyncResult`], and the iterators of
//! [`Pool::imap`](crate::Pool::imap) and [`Pool::imap_unordered`](crate::Pool::imap_unordered).

use std::collections::VecDeque;
use std::fmt;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use crate::engine::driver::Core;
use crate::engine::ends::{IterSource, Journal, Source};
use crate::engine::job::{JobId, Local};
use crate::engine::scheduler::{Drive, Engine};
use crate::error::{Error, ErrorPolicy, Result};
use crate::sink::{
    Cell, Completion, ImapSink, ImapState, OnError, OnResult, decode_partial, decode_results, lock,
};

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

impl<U: Send + 'static> AsyncResult<U> {
    /// A handle still waiting, and the completion that fills it.
    pub(crate) fn pending(
        core: &Arc<Core>,
        callbacks: Option<(OnResult<U>, OnError)>,
    ) -> (Self, Completion<U>) {
        let cell = Arc::new(Cell::waiting());
        let completion = Completion::new(Arc::clone(&cell), core, callbacks);
        let handle = Self {
            cell,
            core: Arc::clone(core),
        };
        (handle, completion)
    }
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
        self.cell.take()
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
        self.cell.take()
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

impl<U> fmt::Debug for AsyncResult<U> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncResult")
            .field("ready", &self.ready())
            .finish_non_exhaustive()
    }
}

/// The consumer's side of an `imap` or `imap_unordered`: pulls its input only
/// while it waits for results, so the input is read a bounded window ahead of what
/// was taken.
struct ImapCore<S, U> {
    core: Arc<Core>,
    job: JobId,
    source: S,
    /// A resumed checkpoint's record of the chunks (a pipeline's stage).
    journal: Option<Box<dyn Journal>>,
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

/// Builds the consumer side and the job sink of a new `imap`.
pub(crate) fn imap_parts<S, U>(
    core: &Arc<Core>,
    job: JobId,
    source: S,
    journal: Option<Box<dyn Journal>>,
    policy: ErrorPolicy,
) -> (ImapParts<S, U>, ImapSink) {
    let state = Arc::new(Mutex::new(ImapState::default()));
    let sink = ImapSink::new(&state);
    let parts = ImapParts(ImapCore {
        core: Arc::clone(core),
        job,
        source,
        journal,
        state,
        decoded: VecDeque::new(),
        skip_failures: policy == ErrorPolicy::Skip,
        failures: Vec::new(),
        finished: false,
        job_gone: false,
    });
    (parts, sink)
}

/// An `imap` consumer not yet wrapped in its iterator type.
pub(crate) struct ImapParts<S, U>(ImapCore<S, U>);

impl<S: Source, U: DeserializeOwned> ImapCore<S, U> {
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
                    journal,
                    ..
                } = self;
                let replayed = match journal {
                    Some(journal) => journal.replay_before(items.start, &mut |items, payload| {
                        decode_results(0, items, &payload, |item, value| {
                            decoded.push_back(Ok((item, value)));
                        })
                    }),
                    None => Ok(()),
                };
                let outcome =
                    if let Err(e) = replayed {
                        Err(e)
                    } else if failed.is_empty() {
                        // The common case: every item of the chunk has its value.
                        decoded.reserve(items.len());
                        if let Some(journal) = journal {
                            journal.stage(&items, &payload);
                        }
                        decode_results(worker, items, &payload, |item, value| {
                            decoded.push_back(Ok((item, value)));
                        })
                        .and_then(|()| journal.as_mut().map_or(Ok(()), |j| j.commit()))
                    } else {
                        if let Some(journal) = journal {
                            journal.pass(&items);
                        }
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
                let end = end.and_then(|()| self.replay_rest());
                // What was recorded is kept durably whatever the outcome.
                let synced = self.journal.as_mut().map_or(Ok(()), |j| j.sync());
                if let Err(e) = end.and(synced) {
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

    /// The job ended well: the recorded chunks after the last one it ran follow.
    fn replay_rest(&mut self) -> Result<()> {
        let Some(journal) = &mut self.journal else {
            return Ok(());
        };
        let decoded = &mut self.decoded;
        journal.replay_before(usize::MAX, &mut |items, payload| {
            decode_results(0, items, &payload, |item, value| {
                decoded.push_back(Ok((item, value)));
            })
        })
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
        let mut until = |_: &Engine| {
            let state = lock(&state);
            !state.queue.is_empty() || state.end.is_some()
        };
        // `Drive::Yielded`: another call waits for the engine; the caller of this
        // one loops and takes its turn again.
        let driven = driving.drive(Some(&mut local), &mut until, None)?;
        if driven == Drive::Idle && !until(driving.engine()) {
            // Nothing in flight and nothing to send, yet no end: the job is gone.
            return Err(Error::Terminated);
        }
        Ok(())
    }
}

impl<S, U> ImapCore<S, U> {
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

impl<S, U> Drop for ImapCore<S, U> {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Defines one of the two public `imap` iterators over an [`ImapCore`]: they differ
/// only in their docs, their item type, and what they make of `(index, result)`.
macro_rules! imap_iterator {
    ($(#[$doc:meta])* $name:ident, $item:ty, $map:expr) => {
        $(#[$doc])*
        pub struct $name<'p, I, U> {
            inner: ImapCore<IterSource<I>, U>,
            _pool: PhantomData<&'p ()>,
        }

        impl<I, U> $name<'_, I, U> {
            pub(crate) fn new(parts: ImapParts<IterSource<I>, U>) -> Self {
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

        impl<T, I, U> Iterator for $name<'_, I, U>
        where
            T: serde::Serialize + DeserializeOwned,
            I: Iterator<Item = T>,
            U: DeserializeOwned,
        {
            type Item = $item;

            fn next(&mut self) -> Option<$item> {
                self.inner.next_result().map($map)
            }
        }

        impl<I, U> fmt::Debug for $name<'_, I, U> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct(stringify!($name)).finish_non_exhaustive()
            }
        }
    };
}

imap_iterator!(
    /// The iterator of [`Pool::imap`](crate::Pool::imap): results in input order.
    ///
    /// The input is read lazily, at most a bounded window of chunks ahead of the
    /// results taken. Dropping it early stops reading the input and discards what is
    /// in flight; the pool is usable at once.
    Imap,
    Result<U>,
    |result: Result<(usize, U)>| result.map(|(_, value)| value)
);

imap_iterator!(
    /// The iterator of [`Pool::imap_unordered`](crate::Pool::imap_unordered): each
    /// item's index and result, in completion order.
    ///
    /// Reads its input lazily as [`Imap`] does, and stops the same way when dropped.
    ImapUnordered,
    Result<(usize, U)>,
    |result: Result<(usize, U)>| result
);

/// The results of an ordered `imap` whose consumer replays and records its chunks
/// through a checkpoint's journal (a checkpointed pipeline's stage), in input
/// order: recorded chunks from the file, the others as they run.
pub(crate) struct JournaledImap<S, U>(ImapCore<S, U>);

impl<S, U> JournaledImap<S, U> {
    pub(crate) fn new(parts: ImapParts<S, U>) -> Self {
        Self(parts.0)
    }
}

impl<S: Source, U: DeserializeOwned> Iterator for JournaledImap<S, U> {
    type Item = Result<U>;

    fn next(&mut self) -> Option<Result<U>> {
        self.0
            .next_result()
            .map(|result| result.map(|(_, value)| value))
    }
}
