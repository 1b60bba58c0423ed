//! A job's two ends: where its items come from ([`Source`]) and where its replies
//! go ([`Sink`], or one [`Complete`] per `apply_async` handle), and the stream of
//! `apply_async` submissions that is both.
//!
//! A source encodes items into chunk frames; a sink takes each chunk's reply
//! payload. They either live in the job record (owned, `Send`, served by whichever
//! thread drives the scheduler) or are lent by the caller for as long as it drives
//! (a blocking `map` borrows the caller's iterator and result vector; an `imap`
//! lends its iterator only inside `next`).

use std::collections::{HashMap, VecDeque};
use std::ops::Range;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::engine::outcome::describe;
use crate::error::{Error, Result};
use crate::shared::region::{self, Pins};
use crate::wire::codec::{self, Reader};
use crate::wire::protocol::Failure;
use crate::wire::transport::Payload;
use crate::worker::task::{OUTCOME_FAILED, OUTCOME_OK};

/// What [`Source::fill`] put in a chunk.
pub(crate) struct Filled {
    /// Items encoded.
    pub(crate) count: usize,
    /// The source has no more items.
    pub(crate) exhausted: bool,
    /// Items the source passed over before the first one it encoded (a resumed
    /// checkpoint's recorded items): the chunk starts at `first + skipped`.
    pub(crate) skipped: usize,
}

/// Where a job's items come from.
pub(crate) trait Source {
    /// Appends up to `max_items` encoded items to `body`, stopping once it holds
    /// `byte_cap` bytes. `first` is the index of the next item; a source may pass
    /// over items first ([`Filled::skipped`]), and the chunk's items are then
    /// indexed from `first + skipped`. An item that fails to encode is an error
    /// naming it.
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

/// How many items `items` yields, when its size hint says exactly (an
/// `ExactSizeIterator`, a range): for progress bars.
pub(crate) fn exact_len<I: Iterator>(items: &I) -> Option<usize> {
    match items.size_hint() {
        (low, Some(high)) if low == high => Some(low),
        _ => None,
    }
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
        let (count, exhausted) = fill_items(&mut self.items, first, max_items, byte_cap, body)?;
        Ok(Filled {
            count,
            exhausted,
            skipped: 0,
        })
    }

    fn remaining_hint(&self) -> usize {
        self.items.size_hint().0
    }
}

/// Encodes the next items of `items`, numbered from `first`, onto `body`: at most
/// `max_items`, stopping once `byte_cap` bytes are written. Returns how many, and
/// whether `items` ran out.
pub(crate) fn fill_items<T, I>(
    items: &mut I,
    first: usize,
    max_items: usize,
    byte_cap: usize,
    body: &mut Vec<u8>,
) -> Result<(usize, bool)>
where
    T: Serialize + DeserializeOwned,
    I: Iterator<Item = T>,
{
    let start_len = body.len();
    let mut count = 0;
    while count < max_items && body.len() - start_len < byte_cap {
        let Some(item) = items.next() else {
            return Ok((count, true));
        };
        encode_item(&item, first + count, body)?;
        count += 1;
    }
    Ok((count, false))
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

    /// A fold job's accumulator (its flush covers no items: `items` is empty), which
    /// folded the items of the chunks `covers`, each exactly once, in no particular
    /// order; an accumulator that folded nothing comes to [`deliver`](Sink::deliver)
    /// instead.
    fn deliver_accumulator(
        &mut self,
        worker: usize,
        items: Range<usize>,
        covers: Vec<Range<usize>>,
        payload: Payload,
    ) -> Result<()> {
        let _ = covers;
        self.deliver(worker, items, payload)
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

/// What the consumer of a resumable job does around the chunks it takes (a
/// checkpoint's record of them): before each chunk, the recorded chunks that come
/// before it are handed over from the record; each chunk taken whole is recorded
/// once it was taken.
pub(crate) trait Journal {
    /// Hands `take` each recorded chunk that starts before item `item`, in order, as
    /// the payload its worker sent.
    fn replay_before(
        &mut self,
        item: usize,
        take: &mut dyn FnMut(Range<usize>, Payload) -> Result<()>,
    ) -> Result<()>;

    /// The chunk of `items` arrived whole with `payload`: its record is made, to be
    /// written by [`commit`](Journal::commit) once the chunk was taken (a payload
    /// that does not decode is never recorded).
    fn stage(&mut self, items: &Range<usize>, payload: &[u8]);

    /// Writes the record [`stage`](Journal::stage) made.
    fn commit(&mut self) -> Result<()>;

    /// The chunk of `items` arrived with failed items: not recorded, so that a later
    /// run runs it again.
    fn pass(&mut self, items: &Range<usize>);

    /// Makes what was recorded durable.
    fn sync(&mut self) -> Result<()>;
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

    /// Completes each handle of an `apply_async` chunk from its outcome; `items` are
    /// the chunk's items that ran (those passed over have no outcome), ascending.
    pub(crate) fn complete_outcomes(
        &mut self,
        worker: usize,
        items: &[usize],
        payload: &[u8],
    ) -> std::result::Result<(), String> {
        let mut rest = payload;
        for &item in items {
            let Some((&tag, after)) = rest.split_first() else {
                return Err(format!("the outcomes of items {items:?} end early"));
            };
            match tag {
                OUTCOME_OK => {
                    let (len, after) = after
                        .split_first_chunk::<8>()
                        .ok_or_else(|| format!("item {item}: result length missing"))?;
                    let len = usize::try_from(u64::from_le_bytes(*len))
                        .ok()
                        .filter(|&len| len <= after.len())
                        .ok_or_else(|| format!("item {item}: result length exceeds the frame"))?;
                    self.complete(item, Ok((worker, &after[..len])));
                    rest = &after[len..];
                }
                OUTCOME_FAILED => {
                    let mut reader = Reader::new(after);
                    let failure: Failure = reader
                        .decode()
                        .map_err(|e| format!("item {item}: bad failure report: {e}"))?;
                    rest = &after[after.len() - reader.remaining()..];
                    let (_, error) = describe(failure, worker, item..item + 1);
                    self.complete(item, Err(error));
                }
                other => return Err(format!("item {item}: unknown outcome tag {other}")),
            }
        }
        if !rest.is_empty() {
            return Err(format!("extra bytes after the outcomes of items {items:?}"));
        }
        Ok(())
    }

    /// Fails every handle of `items` with its own error.
    pub(crate) fn fail_items(
        &mut self,
        items: impl IntoIterator<Item = usize>,
        error: impl Fn(usize) -> Error,
    ) {
        for item in items {
            self.complete(item, Err(error(item)));
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
            skipped: 0,
        })
    }

    fn remaining_hint(&self) -> usize {
        self.queue.len()
    }
}
