//! One job: its record in the job table, the chunks it has in flight, and its kind.
//!
//! Every `map`, `map_reduce`, `imap`, `map_async` and stream of `apply_async`
//! submissions is a job in the pool's job table. Its [`Kind`] says where its items
//! come from and where its replies go (`ends.rs`); what differs between kinds is
//! decided in one place, `impl Kind`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Range;

use crate::engine::chunker::Sizer;
use crate::engine::ends::{ApplyStream, Sink, Source};
use crate::engine::progress::Bar;
use crate::engine::stats::Tally;
use crate::error::{CodecError, Error, ErrorPolicy, Result};
use crate::shared::region::Pins;
use crate::wire::protocol::{self, ChunkHeader, Request, TaskRef};
use crate::wire::transport::{FrameBuf, Payload};

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
            unsealed: self.pins.unsealed(),
        });
        protocol::reseal(&mut self.frame, &header)
    }
}

/// How a job's chunks end up. Everything that differs between kinds is decided in
/// the `impl Kind` below, so the scheduler never asks which kind it holds.
pub(crate) enum Kind {
    /// A source and sink the caller lends while it drives (`map`, `map_reduce`).
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

/// What the caller of `Engine::drive` lends: its job's source and sink.
pub(crate) struct Local<'a> {
    pub(crate) job: JobId,
    pub(crate) source: Option<&'a mut dyn Source>,
    pub(crate) sink: Option<&'a mut dyn Sink>,
}

/// What becomes of a job's record once it has ended.
pub(crate) enum Ending {
    /// It stays in the table with its outcome until its caller removes it.
    Kept,
    /// It leaves the table now, its owned sink told the outcome.
    Leaves,
    /// It never ends (an apply stream): its items end one by one.
    Never,
}

impl Kind {
    /// Whether the job holds work that no caller drives: an owned source not yet
    /// done, or `apply_async` handles queued or waiting.
    pub(crate) fn outstanding(&self, ended: bool) -> bool {
        match self {
            Kind::Owned { .. } => !ended,
            Kind::Apply(stream) => stream.queued() > 0 || stream.waiting() > 0,
            Kind::Lent | Kind::OwnedSink(_) => false,
        }
    }

    /// Whether the job could send a new chunk now: `lent` says whether its caller
    /// lends its source in this drive, `within_window` whether it is not too far
    /// ahead of delivery.
    pub(crate) fn can_send(&self, lent: bool, within_window: impl FnOnce() -> bool) -> bool {
        match self {
            Kind::Apply(stream) => stream.queued() > 0,
            Kind::Owned { .. } => within_window(),
            Kind::Lent | Kind::OwnedSink(_) => lent && within_window(),
        }
    }

    /// How many chunks a consumer has taken, when one takes them (`imap`).
    pub(crate) fn taken(&self) -> Option<u64> {
        match self {
            Kind::Owned { sink, .. } | Kind::OwnedSink(sink) => sink.taken(),
            Kind::Lent | Kind::Apply(_) => None,
        }
    }

    /// The index of the next chunk's first item. An apply stream numbers its
    /// submissions itself (some may have been failed unsent); every other source is
    /// numbered by what the job has taken.
    pub(crate) fn first_item(&self, next_item: usize) -> usize {
        match self {
            Kind::Apply(stream) => stream.first_queued(),
            _ => next_item,
        }
    }

    /// The source the next chunk is read from: the job's own, or its caller's.
    pub(crate) fn source<'s>(&'s mut self, local: Option<&'s mut Local<'_>>) -> &'s mut dyn Source {
        match self {
            Kind::Apply(stream) => stream,
            Kind::Owned { source, .. } => source.as_mut(),
            Kind::Lent | Kind::OwnedSink(_) => match local {
                Some(Local {
                    source: Some(source),
                    ..
                }) => &mut **source,
                _ => unreachable!("only the job's own caller dispatches a lent source"),
            },
        }
    }

    /// The sink job `id`'s chunk payloads go to: the job's own, or its caller's.
    fn sink<'s>(&'s mut self, id: JobId, local: Option<&'s mut Local<'_>>) -> &'s mut dyn Sink {
        match self {
            Kind::Owned { sink, .. } | Kind::OwnedSink(sink) => sink.as_mut(),
            Kind::Lent => match local {
                Some(Local {
                    job: lent,
                    sink: Some(sink),
                    ..
                }) if *lent == id => &mut **sink,
                _ => unreachable!("a lent job is driven by its caller until it ends"),
            },
            Kind::Apply(_) => unreachable!("apply streams complete items one by one"),
        }
    }

    /// Whether job `id`'s sink can take a chunk now: always, unless the caller
    /// lends it and is not the one driving (`local` is someone else's, or none).
    pub(crate) fn can_deliver(&self, id: JobId, local: Option<&Local<'_>>) -> bool {
        match self {
            Kind::Lent => local.is_some_and(|l| l.job == id && l.sink.is_some()),
            Kind::Owned { .. } | Kind::OwnedSink(_) | Kind::Apply(_) => true,
        }
    }

    /// Hands one chunk's payload to job `id`'s sink, with the failures recorded
    /// for its items (error policies that go on).
    pub(crate) fn deliver(
        &mut self,
        id: JobId,
        local: Option<&mut Local<'_>>,
        ready: Ready,
    ) -> Result<()> {
        let Ready {
            worker,
            items,
            payload,
            failed,
            covers,
        } = ready;
        let sink = self.sink(id, local);
        if !covers.is_empty() {
            sink.deliver_accumulator(worker, items, covers, payload)
        } else if failed.is_empty() {
            sink.deliver(worker, items, payload)
        } else {
            sink.deliver_partial(worker, items, payload, failed)
        }
    }

    /// The `apply_async` handles of the job, when its items stand alone: each one
    /// completes or fails its own handle, and no failure ends the job.
    pub(crate) fn handles(&mut self) -> Option<&mut ApplyStream> {
        match self {
            Kind::Apply(stream) => Some(stream),
            _ => None,
        }
    }

    /// Whether each item stands alone (see [`Kind::handles`]).
    pub(crate) fn items_stand_alone(&self) -> bool {
        matches!(self, Kind::Apply(_))
    }

    /// What becomes of the record once the job ends.
    pub(crate) fn ending(&self) -> Ending {
        match self {
            Kind::Lent => Ending::Kept,
            Kind::Owned { .. } | Kind::OwnedSink(_) => Ending::Leaves,
            Kind::Apply(_) => Ending::Never,
        }
    }

    /// Tells whoever waits how a job that leaves the table ended: its owned sink,
    /// or every handle of a stream (which fails with [`Error::Terminated`]).
    pub(crate) fn end(self, outcome: Result<()>) {
        match self {
            Kind::Owned { mut sink, .. } | Kind::OwnedSink(mut sink) => sink.finish(outcome),
            Kind::Apply(mut stream) => stream.fail_all(|| Error::Terminated),
            Kind::Lent => {}
        }
    }
}

/// A chunk whose reply arrived before an earlier chunk's (ordered jobs).
pub(crate) struct Ready {
    pub(crate) worker: usize,
    pub(crate) items: Range<usize>,
    pub(crate) payload: Payload,
    /// Items of the chunk that failed (error policies that go on), ascending.
    pub(crate) failed: Vec<(usize, Error)>,
    /// For a fold job's accumulator: the items of every chunk it folded.
    pub(crate) covers: Vec<Range<usize>>,
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
    /// What the job has cost so far.
    pub(crate) tally: Tally,
    /// How many items its input holds, when that is known (for a progress bar).
    pub(crate) total: Option<usize>,
    /// Its progress bar, when the pool draws them.
    pub(crate) bar: Option<Bar>,
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
            tally: Tally::new(0, Vec::new()),
            total: None,
            bar: None,
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
            unsealed: Vec::new(),
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
