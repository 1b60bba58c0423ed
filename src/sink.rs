//! Where each job's replies land in the parent: the sinks that decode a chunk's
//! results into a caller's vector, a fold, an `imap` queue or an `AsyncResult`.
//!
//! The engine hands every chunk's reply payload to its job's [`Sink`] (in chunk
//! order for ordered jobs); what the caller holds while a job runs is in
//! `handle.rs`, which reads what these sinks fill.

use std::collections::VecDeque;
use std::ops::Range;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use serde::de::DeserializeOwned;

use crate::engine::driver::Core;
use crate::engine::ends::{Complete, Sink};
use crate::error::{Error, Result, TaskPanic};
use crate::wire::codec::{self, Reader};
use crate::wire::transport::Payload;

/// A callback run in the parent with a task's result.
pub(crate) type OnResult<U> = Box<dyn FnOnce(&U) + Send>;
/// A callback run in the parent with a task's error.
pub(crate) type OnError = Box<dyn FnOnce(&Error) + Send>;

pub(crate) enum State<U> {
    Waiting,
    Done(Result<U>),
    Taken,
}

/// Where an asynchronous result lands: filled by a [`Completion`], taken by the
/// handle the caller holds.
pub(crate) struct Cell<U> {
    state: Mutex<State<U>>,
}

impl<U> Cell<U> {
    /// A cell still waiting for its result.
    pub(crate) fn waiting() -> Self {
        Self {
            state: Mutex::new(State::Waiting),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<U>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the result has arrived (or was taken).
    pub(crate) fn is_done(&self) -> bool {
        !matches!(*self.lock(), State::Waiting)
    }

    /// Takes the result; [`Error::ResultTaken`] when it was taken before.
    pub(crate) fn take(&self) -> Result<U> {
        let mut state = self.lock();
        match std::mem::replace(&mut *state, State::Taken) {
            State::Done(result) => result,
            State::Taken => Err(Error::ResultTaken),
            State::Waiting => unreachable!("taken only once done"),
        }
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
    /// The completion that fills `cell`, for the pool behind `core`.
    pub(crate) fn new(
        cell: Arc<Cell<U>>,
        core: &Arc<Core>,
        callbacks: Option<(OnResult<U>, OnError)>,
    ) -> Self {
        Self {
            cell,
            core: Arc::downgrade(core),
            callbacks,
        }
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

impl<U> Completion<U> {
    /// Completes the handle with [`Error::Terminated`] without running callbacks:
    /// its job is gone without an outcome (the pool was dropped).
    fn abandon(self) {
        *self.cell.lock() = State::Done(Err(Error::Terminated));
        if let Some(core) = self.core.upgrade() {
            core.completed_one();
            core.notify();
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
pub(crate) fn decode_partial<U: DeserializeOwned>(
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
            completion.abandon();
        }
    }
}

/// One chunk for an `imap` consumer: its worker, items, payload, and failed items
/// (error policies that go on).
pub(crate) type ImapChunk = (usize, Range<usize>, Payload, Vec<(usize, Error)>);

/// What the engine hands an `imap` consumer: chunk payloads in delivery order.
#[derive(Default)]
pub(crate) struct ImapState {
    pub(crate) queue: VecDeque<ImapChunk>,
    /// Chunks the consumer has taken.
    pub(crate) taken: u64,
    /// The job has ended: `Ok` when every chunk has been queued.
    pub(crate) end: Option<Result<()>>,
}

/// The job's side of an `imap`.
pub(crate) struct ImapSink {
    state: Arc<Mutex<ImapState>>,
}

impl ImapSink {
    /// The sink that queues chunks into `state` for its consumer.
    pub(crate) fn new(state: &Arc<Mutex<ImapState>>) -> Self {
        Self {
            state: Arc::clone(state),
        }
    }
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

/// Locks `m`, going on when a panic poisoned it (every holder leaves it consistent).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
