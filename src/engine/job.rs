//! One job: its source of chunks and its sink of replies.
//!
//! Every `map`, `map_reduce`, `imap`, `map_async` and stream of `apply_async`
//! submissions is a job in the pool's job table. A job's source encodes items into
//! chunk frames; its sink takes each chunk's reply payload. The source and the sink
//! either live in the job record (owned, `Send`, served by whichever thread drives
//! the scheduler) or are lent by the caller for as long as it drives (a blocking
//! `map` borrows the caller's iterator and result vector; an `imap` lends its
//! iterator only inside `next`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::{Deref, Range};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::engine::chunker::Sizer;
use crate::error::{CodecError, Error, ErrorPolicy, Result};
use crate::shared::region::{self, Pins};
use crate::wire::codec;
use crate::wire::protocol::{self, ChunkHeader, Request, TaskRef};
use crate::wire::transport::{Frame, FrameBuf};

/// A job's number in its pool; jobs are served in the order of their ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct JobId(pub(crate) u64);

/// A chunk sent to a worker and not yet answered.
pub(crate) struct InFlight {
    pub(crate) job: JobId,
    pub(crate) chunk: u64,
    pub(crate) items: Range<usize>,
    /// The frame as sent, kept until the reply arrives.
    pub(crate) frame: FrameBuf,
    /// How many times it was sent before, to workers lost while it ran and
    /// without naming an item.
    pub(crate) attempts: u32,
    /// Offsets of items reported failed, passed over when the chunk is sent again
    /// (see [`ChunkHeader::skip`]).
    pub(crate) skip: Vec<u32>,
    /// Deaths of a worker while it ran an item of this chunk: (offset, count).
    pub(crate) deaths: Vec<(u32, u32)>,
    /// Shared inputs its items name, alive until the reply arrives (a worker opens
    /// them through this process's descriptors when it decodes the items).
    pub(crate) pins: Pins,
}

impl InFlight {
    pub(crate) fn new(job: JobId, chunk: u64, items: Range<usize>, frame: FrameBuf) -> Self {
        Self {
            job,
            chunk,
            items,
            frame,
            attempts: 0,
            skip: Vec::new(),
            deaths: Vec::new(),
            pins: Pins::default(),
        }
    }

    fn offset(&self, item: usize) -> Option<u32> {
        if !self.items.contains(&item) {
            return None;
        }
        u32::try_from(item - self.items.start).ok()
    }

    /// Whether `item` is in the chunk and still to run (not passed over).
    pub(crate) fn runs(&self, item: usize) -> bool {
        self.offset(item)
            .is_some_and(|offset| self.skip.binary_search(&offset).is_err())
    }

    /// The items still to run, ascending.
    pub(crate) fn live_items(&self) -> impl Iterator<Item = usize> + '_ {
        self.items.clone().filter(|&item| self.runs(item))
    }

    /// Counts a worker's death while it ran `item`; returns the item's deaths so far.
    pub(crate) fn died_running(&mut self, item: usize) -> u32 {
        let Some(offset) = self.offset(item) else {
            return 0;
        };
        match self.deaths.iter_mut().find(|(o, _)| *o == offset) {
            Some((_, count)) => {
                *count += 1;
                *count
            }
            None => {
                self.deaths.push((offset, 1));
                1
            }
        }
    }

    /// Passes over `item` from now on: its frame's header is rewritten so that the
    /// worker reads past it without running it.
    pub(crate) fn skip_item(
        &mut self,
        item: usize,
        task: TaskRef,
    ) -> std::result::Result<(), CodecError> {
        let Some(offset) = self.offset(item) else {
            return Ok(());
        };
        if let Err(at) = self.skip.binary_search(&offset) {
            self.skip.insert(at, offset);
        }
        let header = Request::Chunk(ChunkHeader {
            job: self.job.0,
            chunk: self.chunk,
            first_item: self.items.start as u64,
            count: u32::try_from(self.items.len()).expect("chunks hold at most u32::MAX items"),
            task,
            skip: self.skip.clone(),
        });
        protocol::reseal(&mut self.frame, &header)
    }
}

/// A chunk's reply payload, borrowed from the frame it arrived in.
pub(crate) struct Payload {
    frame: Frame,
    len: usize,
}

impl Payload {
    pub(crate) fn new(frame: Frame, len: usize) -> Self {
        Self { frame, len }
    }

    /// No bytes: a chunk none of whose items produced a result.
    pub(crate) fn empty() -> Self {
        Self {
            frame: Frame::Inline(Vec::new()),
            len: 0,
        }
    }
}

impl Deref for Payload {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.frame[..self.len]
    }
}

/// What [`Source::fill`] put in a chunk.
pub(crate) struct Filled {
    /// Items encoded.
    pub(crate) count: usize,
    /// The source has no more items.
    pub(crate) exhausted: bool,
}

/// Where a job's items come from.
pub(crate) trait Source {
    /// Appends up to `max_items` encoded items to `body`, stopping once it holds
    /// `byte_cap` bytes. `first` is the index of the first item. An item that fails
    /// to encode is an error naming it.
    fn fill(
        &mut self,
        first: usize,
        max_items: usize,
        byte_cap: usize,
        body: &mut Vec<u8>,
    ) -> Result<Filled>;

    /// A lower bound on the items left, for sizing the last chunks.
    fn remaining_hint(&self) -> usize;
}

/// A source that reads an iterator lazily.
pub(crate) struct IterSource<I> {
    items: I,
}

impl<I> IterSource<I> {
    pub(crate) fn new(items: I) -> Self {
        Self { items }
    }
}

impl<T, I> Source for IterSource<I>
where
    T: Serialize + DeserializeOwned,
    I: Iterator<Item = T>,
{
    fn fill(
        &mut self,
        first: usize,
        max_items: usize,
        byte_cap: usize,
        body: &mut Vec<u8>,
    ) -> Result<Filled> {
        let start_len = body.len();
        let mut count = 0;
        while count < max_items && body.len() - start_len < byte_cap {
            let Some(item) = self.items.next() else {
                return Ok(Filled {
                    count,
                    exhausted: true,
                });
            };
            let index = first + count;
            encode_item(&item, index, body)?;
            count += 1;
        }
        Ok(Filled {
            count,
            exhausted: false,
        })
    }

    fn remaining_hint(&self) -> usize {
        self.items.size_hint().0
    }
}

/// Encodes item `index` onto `body`; the first item of a job is also decoded again,
/// since serde attributes that need a self-describing format encode fine and fail
/// only when decoded: better said before any worker sees the item.
pub(crate) fn encode_item<T: Serialize + DeserializeOwned>(
    item: &T,
    index: usize,
    body: &mut Vec<u8>,
) -> Result<()> {
    let start = body.len();
    codec::encode_into(item, body).map_err(|source| Error::EncodeItem {
        item: index,
        source,
    })?;
    if index == 0
        && let Err(source) = codec::decode::<T>(&body[start..])
    {
        body.truncate(start);
        return Err(Error::DecodeItem {
            item: 0,
            worker: None,
            source,
        });
    }
    Ok(())
}

/// Where a job's replies go.
pub(crate) trait Sink {
    /// One chunk's reply payload; in chunk order when the job is ordered.
    fn deliver(&mut self, worker: usize, items: Range<usize>, payload: Payload) -> Result<()>;

    /// A chunk some of whose items failed, under an [`ErrorPolicy`] that goes on
    /// after a failure: the payload holds the results of the other items in order
    /// (for a fold, the partial of those items, or nothing when none ran), and
    /// `failed` the failed items with their errors, ascending. A sink that cannot
    /// hold failures fails with the first.
    fn deliver_partial(
        &mut self,
        worker: usize,
        items: Range<usize>,
        payload: Payload,
        failed: Vec<(usize, Error)>,
    ) -> Result<()> {
        let _ = (worker, items, payload);
        match failed.into_iter().next() {
            Some((_, error)) => Err(error),
            None => Ok(()),
        }
    }

    /// The job is over: `Ok` once every chunk was delivered, or why it failed.
    /// Called once, for sinks the job owns.
    fn finish(&mut self, outcome: Result<()>);

    /// How many chunks a consumer has taken, when one takes them (`imap`): the job
    /// dispatches only a window ahead of that.
    fn taken(&self) -> Option<u64> {
        None
    }
}

/// Completes one `apply_async` handle.
pub(crate) trait Complete: Send {
    /// `Ok` carries the worker that ran it and the encoded result.
    fn complete(self: Box<Self>, outcome: Result<(usize, &[u8])>);
}

/// A stream of `apply_async` submissions of one task: queued arguments, and the
/// handles waiting for their results, by item index.
#[derive(Default)]
pub(crate) struct ApplyStream {
    /// Encoded arguments, with the shared inputs they name.
    queue: VecDeque<(Vec<u8>, Pins)>,
    waiting: HashMap<usize, Box<dyn Complete>>,
    next_index: usize,
}

impl ApplyStream {
    /// Queues one submission.
    pub(crate) fn push(&mut self, arg: Vec<u8>, pins: Pins, handle: Box<dyn Complete>) {
        self.waiting.insert(self.next_index, handle);
        self.next_index += 1;
        self.queue.push_back((arg, pins));
    }

    /// Queued submissions not yet sent.
    pub(crate) fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Handles not yet completed.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Completes the handle of item `index`, if it still waits. Errors name item 0:
    /// each handle has one argument, whatever its place in the stream.
    pub(crate) fn complete(&mut self, index: usize, outcome: Result<(usize, &[u8])>) {
        if let Some(handle) = self.waiting.remove(&index) {
            handle.complete(outcome.map_err(|e| e.for_single_item()));
        }
    }

    /// The index of the first submission not yet sent.
    pub(crate) fn first_queued(&self) -> usize {
        self.next_index - self.queue.len()
    }

    /// Fails the handles of the submissions not yet sent.
    pub(crate) fn fail_queued(&mut self, error: impl Fn() -> Error) {
        let first_queued = self.first_queued();
        self.queue.clear();
        for index in first_queued..self.next_index {
            if let Some(handle) = self.waiting.remove(&index) {
                handle.complete(Err(error()));
            }
        }
    }

    /// Fails every handle still waiting (the pool is terminated or dropped).
    pub(crate) fn fail_all(&mut self, error: impl Fn() -> Error) {
        self.queue.clear();
        for (_, handle) in self.waiting.drain() {
            handle.complete(Err(error()));
        }
    }
}

impl Source for ApplyStream {
    fn fill(
        &mut self,
        _first: usize,
        max_items: usize,
        byte_cap: usize,
        body: &mut Vec<u8>,
    ) -> Result<Filled> {
        let start_len = body.len();
        let mut count = 0;
        while count < max_items && body.len() - start_len < byte_cap {
            let Some((arg, pins)) = self.queue.pop_front() else {
                break;
            };
            body.extend_from_slice(&arg);
            // The chunk keeps them from now on (see `region::pin_while`).
            region::adopt(pins);
            count += 1;
        }
        // A stream never runs dry for good: more submissions may come.
        Ok(Filled {
            count,
            exhausted: false,
        })
    }

    fn remaining_hint(&self) -> usize {
        self.queue.len()
    }
}

/// How a job's chunks end up.
pub(crate) enum Kind {
    /// A source and sink the caller lends while it drives (`map`, `map_reduce`), or
    /// a sink the job owns with a source lent by the consumer (`imap`).
    Lent,
    /// Source and sink owned by the job (`map_async`).
    Owned {
        source: Box<dyn Source + Send>,
        sink: Box<dyn Sink + Send>,
    },
    /// A sink the job owns, fed by a source the consumer lends (`imap`).
    OwnedSink(Box<dyn Sink + Send>),
    /// `apply_async` submissions; each item completes its own handle, and a failed
    /// item fails only that handle.
    Apply(ApplyStream),
}

/// A chunk whose reply arrived before an earlier chunk's (ordered jobs).
pub(crate) struct Ready {
    pub(crate) worker: usize,
    pub(crate) items: Range<usize>,
    pub(crate) payload: Payload,
    /// Items of the chunk that failed (error policies that go on), ascending.
    pub(crate) failed: Vec<(usize, Error)>,
}

/// One job in the table.
pub(crate) struct Job {
    pub(crate) id: JobId,
    pub(crate) task: TaskRef,
    /// The sealed `Request::Context` frame, sent to each worker before its first
    /// chunk of this job.
    pub(crate) context: Option<FrameBuf>,
    pub(crate) kind: Kind,
    /// What a failed item does to the job.
    pub(crate) policy: ErrorPolicy,
    /// Items that failed under a policy that goes on, until their chunk is
    /// delivered.
    pub(crate) failures: BTreeMap<usize, Error>,
    /// Deliver in chunk order (else as replies arrive).
    pub(crate) ordered: bool,
    pub(crate) sizer: Sizer,
    /// Index of the next item the source yields.
    pub(crate) next_item: usize,
    pub(crate) next_chunk: u64,
    /// The chunk whose results are delivered next (ordered jobs).
    pub(crate) next_deliver: u64,
    /// Chunks delivered (all jobs).
    pub(crate) delivered: u64,
    /// Items whose results were delivered.
    pub(crate) items_delivered: usize,
    /// Chunks sent and not yet answered.
    pub(crate) in_flight: usize,
    pub(crate) exhausted: bool,
    /// The caller is giving up: send nothing more, let what runs finish.
    pub(crate) stopping: bool,
    pub(crate) ready: BTreeMap<u64, Ready>,
    /// Chunks lost with their worker, to be sent again (frames kept).
    pub(crate) retry: VecDeque<InFlight>,
    /// Payload bytes held in `ready`.
    pub(crate) ready_bytes: usize,
    /// Set once the job has ended: `Ok` or its first error.
    pub(crate) outcome: Option<Result<()>>,
    /// A fold job's record of what each worker has folded and not yet flushed.
    pub(crate) fold: Option<FoldLedger>,
}

/// What the workers of a fold job hold: the chunks each has folded into its
/// accumulator since its last flush, frames kept, so that they can be sent again
/// if the worker is lost with its accumulator; and the flushes in flight.
pub(crate) struct FoldLedger {
    /// By worker (slot, process generation): chunks answered since its last flush.
    pub(crate) kept: HashMap<(usize, u64), Vec<InFlight>>,
    /// Payload bytes of `kept`, by worker.
    pub(crate) kept_bytes: HashMap<(usize, u64), usize>,
    /// Flushes in flight: chunk number -> worker.
    pub(crate) flushes: HashMap<u64, (usize, u64)>,
    /// A worker holding this many bytes of folded input is asked to flush, so what
    /// is kept for re-sending stays bounded.
    pub(crate) flush_bytes: usize,
}

impl FoldLedger {
    pub(crate) fn new(flush_bytes: usize) -> Self {
        Self {
            kept: HashMap::new(),
            kept_bytes: HashMap::new(),
            flushes: HashMap::new(),
            flush_bytes,
        }
    }

    /// Whether no worker holds anything unflushed and no flush is in flight.
    pub(crate) fn settled(&self) -> bool {
        self.kept.is_empty() && self.flushes.is_empty()
    }

    /// Whether `worker` has a flush in flight.
    pub(crate) fn flushing(&self, worker: (usize, u64)) -> bool {
        self.flushes.values().any(|&w| w == worker)
    }

    /// Takes what `worker` has folded: its accumulator is gone with it.
    pub(crate) fn take_kept(&mut self, worker: (usize, u64)) -> Vec<InFlight> {
        self.kept_bytes.remove(&worker);
        self.kept.remove(&worker).unwrap_or_default()
    }
}

impl Job {
    pub(crate) fn new(
        id: JobId,
        task: TaskRef,
        kind: Kind,
        ordered: bool,
        fixed: Option<usize>,
    ) -> Self {
        Self {
            id,
            task,
            context: None,
            kind,
            policy: ErrorPolicy::FailFast,
            failures: BTreeMap::new(),
            ordered,
            sizer: Sizer::new(fixed),
            next_item: 0,
            next_chunk: 0,
            next_deliver: 0,
            delivered: 0,
            items_delivered: 0,
            in_flight: 0,
            exhausted: false,
            stopping: false,
            ready: BTreeMap::new(),
            retry: VecDeque::new(),
            ready_bytes: 0,
            outcome: None,
            fold: None,
        }
    }

    /// Whether the job has ended (all delivered, or failed).
    pub(crate) fn ended(&self) -> bool {
        self.outcome.is_some()
    }

    /// Whether every item was sent and every reply delivered (for a fold job, every
    /// worker's accumulator too).
    pub(crate) fn complete(&self) -> bool {
        self.drained() && self.fold.as_ref().is_none_or(FoldLedger::settled)
    }

    /// Whether every item was sent and every chunk answered and delivered.
    pub(crate) fn drained(&self) -> bool {
        self.exhausted && self.in_flight == 0 && self.ready.is_empty() && self.retry.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skipped_item_is_rewritten_into_the_frame_header() {
        let task = TaskRef {
            offset: 1,
            fingerprint: 2,
            check: 3,
        };
        let mut frame = FrameBuf::with_capacity(64);
        frame.body().extend_from_slice(b"items");
        let header = Request::Chunk(ChunkHeader {
            job: 4,
            chunk: 5,
            first_item: 10,
            count: 4,
            task,
            skip: Vec::new(),
        });
        protocol::seal(&mut frame, &header).unwrap();
        let mut flight = InFlight::new(JobId(4), 5, 10..14, frame);
        flight.skip_item(13, task).unwrap();
        flight.skip_item(11, task).unwrap();
        flight.skip_item(11, task).unwrap();
        flight.skip_item(99, task).unwrap();
        assert_eq!(flight.live_items().collect::<Vec<_>>(), [10, 12]);
        let (request, payload) = protocol::open::<Request>(flight.frame.body_bytes()).unwrap();
        assert_eq!(payload, b"items");
        match request {
            Request::Chunk(header) => assert_eq!(header.skip, [1, 3]),
            other => panic!("{other:?}"),
        }
        assert_eq!(flight.died_running(12), 1);
        assert_eq!(flight.died_running(12), 2);
        assert_eq!(flight.died_running(99), 0);
    }
}
