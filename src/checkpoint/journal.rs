//! What a checkpointed job runs with: the source that passes over recorded
//! items, the journal that replays and records chunks, and the sinks that hand
//! recorded chunks to the caller in order.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::path::Path;
use std::rc::Rc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::engine::ends::{Filled, Journal, Sink, Source, fill_items};
use crate::error::{Error, Result};
use crate::wire::codec;
use crate::wire::transport::{Frame, Payload};

use super::file::{Cover, Log, Recorded, checksum, encode_record, stage_name};

/// The chunks a [`ResumingSource`] filled and its [`RecordingSink`] has not yet
/// recorded: their items and their input checksum, in chunk order.
pub(super) type FilledChunks = RefCell<VecDeque<(Range<usize>, u64)>>;

/// The job's source: reads the input in order, passes over (and checks) the items
/// the checkpoint records, and ends each chunk before the next recorded item, so a
/// chunk's items are contiguous in the input.
pub(crate) struct ResumingSource<I> {
    pub(super) items: I,
    /// Index of the next item the iterator yields.
    pub(super) position: usize,
    /// The items this stage's records cover, ascending.
    pub(super) recorded: Rc<[Cover]>,
    /// The first record not yet passed over.
    pub(super) next_record: usize,
    pub(super) filled: Rc<FilledChunks>,
    pub(super) path: Rc<Path>,
    pub(super) scratch: Vec<u8>,
}

impl<I, T> ResumingSource<I>
where
    I: Iterator<Item = T>,
    T: Serialize,
{
    /// Reads past the records that start here; how many items they held.
    fn pass_recorded(&mut self) -> Result<usize> {
        let mut passed = 0;
        while let Some(record) = self.recorded.get(self.next_record) {
            if record.items.start != self.position {
                break;
            }
            // Encoded end to end, as in a chunk: the sum does not depend on how
            // items were grouped into chunks when it was recorded.
            self.scratch.clear();
            for index in record.items.clone() {
                let Some(item) = self.items.next() else {
                    return Err(self.differs(record.items.clone()));
                };
                codec::encode_into(&item, &mut self.scratch).map_err(|source| {
                    Error::EncodeItem {
                        item: index,
                        source,
                    }
                })?;
                self.position += 1;
            }
            if checksum(&[&self.scratch]) != record.input {
                return Err(self.differs(record.items.clone()));
            }
            passed += record.items.len();
            self.next_record += 1;
        }
        Ok(passed)
    }

    fn differs(&self, items: Range<usize>) -> Error {
        Error::CheckpointInputDiffers {
            path: self.path.to_path_buf(),
            items,
        }
    }
}

impl<I, T> Source for ResumingSource<I>
where
    I: Iterator<Item = T>,
    T: Serialize + DeserializeOwned,
{
    fn fill(
        &mut self,
        first: usize,
        max_items: usize,
        byte_cap: usize,
        body: &mut Vec<u8>,
    ) -> Result<Filled> {
        debug_assert_eq!(
            first, self.position,
            "the engine counts the items passed over"
        );
        let skipped = self.pass_recorded()?;
        let start = self.position;
        let stop = self
            .recorded
            .get(self.next_record)
            .map_or(usize::MAX, |record| record.items.start);
        let start_len = body.len();
        // A chunk stops short of the next recorded item.
        let max_items = max_items.min(stop.saturating_sub(start));
        let (count, exhausted) = fill_items(&mut self.items, start, max_items, byte_cap, body)?;
        self.position += count;
        if exhausted && let Some(record) = self.recorded.get(self.next_record) {
            // The input ends before items the checkpoint holds: another input.
            return Err(self.differs(record.items.clone()));
        }
        if self.position > start {
            let input = checksum(&[&body[start_len..]]);
            self.filled
                .borrow_mut()
                .push_back((start..self.position, input));
        }
        Ok(Filled {
            count: self.position - start,
            exhausted,
            skipped,
        })
    }

    fn remaining_hint(&self) -> usize {
        let recorded: usize = self.recorded[self.next_record..]
            .iter()
            .map(|record| record.items.len())
            .sum();
        self.items.size_hint().0.saturating_sub(recorded)
    }
}

/// One stage's chunks as they are taken: the recorded ones replayed from the file
/// in input order, the new ones recorded.
pub(crate) struct StageJournal {
    pub(super) log: Rc<RefCell<Log>>,
    pub(super) stage: usize,
    /// This stage's records, ascending.
    pub(super) recorded: Rc<[Recorded]>,
    /// The first record not yet replayed.
    pub(super) next_replay: usize,
    pub(super) filled: Rc<FilledChunks>,
    /// The record being written.
    pub(super) staged: Vec<u8>,
}

impl StageJournal {
    /// The input checksum of the chunk of `items`, the next one taken.
    fn take_filled(&mut self, items: &Range<usize>) -> u64 {
        let (filled, input) = self
            .filled
            .borrow_mut()
            .pop_front()
            .expect("every chunk taken was filled by the stage's source");
        assert_eq!(
            &filled, items,
            "an ordered job delivers its chunks in order"
        );
        input
    }
}

impl Journal for StageJournal {
    fn replay_before(
        &mut self,
        item: usize,
        take: &mut dyn FnMut(Range<usize>, Payload) -> Result<()>,
    ) -> Result<()> {
        while let Some(record) = self.recorded.get(self.next_replay) {
            if record.items().start >= item {
                break;
            }
            let log = self.log.borrow();
            let bytes = log.read(record)?;
            let len = bytes.len();
            take(
                record.items().clone(),
                Payload::new(Frame::Inline(bytes), len),
            )
            .map_err(|error| Error::Checkpoint {
                path: log.path.clone(),
                reason: format!(
                    "the recorded results of items {:?}{} do not decode: {error}",
                    record.items(),
                    stage_name(record.stage)
                ),
                source: None,
            })?;
            self.next_replay += 1;
        }
        Ok(())
    }

    fn stage(&mut self, items: &Range<usize>, payload: &[u8]) {
        let input = self.take_filled(items);
        encode_record(
            &mut self.staged,
            self.stage,
            &[(items.clone(), input)],
            payload,
        );
    }

    fn commit(&mut self) -> Result<()> {
        self.log.borrow_mut().append(&self.staged)
    }

    fn pass(&mut self, items: &Range<usize>) {
        self.take_filled(items);
    }

    fn sync(&mut self) -> Result<()> {
        self.log.borrow_mut().sync()
    }
}

/// A blocking call's sink: before each chunk, the recorded chunks that come before
/// it go to the caller's sink (from the file); then the chunk itself, which is
/// recorded.
pub(super) struct RecordingSink<'a> {
    pub(super) inner: &'a mut dyn Sink,
    pub(super) journal: StageJournal,
}

impl RecordingSink<'_> {
    /// Hands the caller's sink every recorded chunk before item `item`.
    pub(super) fn replay_before(&mut self, item: usize) -> Result<()> {
        let inner = &mut *self.inner;
        self.journal
            .replay_before(item, &mut |items, payload| inner.deliver(0, items, payload))
    }
}

impl Sink for RecordingSink<'_> {
    fn deliver(&mut self, worker: usize, items: Range<usize>, payload: Payload) -> Result<()> {
        self.replay_before(items.start)?;
        self.journal.stage(&items, &payload);
        self.inner.deliver(worker, items, payload)?;
        self.journal.commit()
    }

    fn deliver_partial(
        &mut self,
        worker: usize,
        items: Range<usize>,
        payload: Payload,
        failed: Vec<(usize, Error)>,
    ) -> Result<()> {
        // A chunk with failed items is not recorded: a later run runs it again.
        self.replay_before(items.start)?;
        self.journal.pass(&items);
        self.inner.deliver_partial(worker, items, payload, failed)
    }

    fn finish(&mut self, outcome: Result<()>) {
        self.inner.finish(outcome);
    }

    fn taken(&self) -> Option<u64> {
        self.inner.taken()
    }
}

/// A fold stage's sink: each accumulator is recorded with the chunks it folded
/// (and their input checksums), once the caller's sink took it.
pub(super) struct FoldRecordingSink<'a> {
    pub(super) inner: &'a mut dyn Sink,
    pub(super) journal: StageJournal,
    /// Chunks filled and not yet folded into an accumulator that came out, by
    /// first item.
    pub(super) pending: HashMap<usize, (Range<usize>, u64)>,
}

impl Sink for FoldRecordingSink<'_> {
    fn deliver(&mut self, worker: usize, items: Range<usize>, payload: Payload) -> Result<()> {
        // A chunk folded (its accumulator comes later), or one that folded nothing.
        self.inner.deliver(worker, items, payload)
    }

    fn deliver_accumulator(
        &mut self,
        worker: usize,
        items: Range<usize>,
        covers: Vec<Range<usize>>,
        payload: Payload,
    ) -> Result<()> {
        self.pending.extend(
            self.journal
                .filled
                .borrow_mut()
                .drain(..)
                .map(|(items, input)| (items.start, (items, input))),
        );
        let covered: Option<Vec<(Range<usize>, u64)>> = covers
            .iter()
            .map(|items| {
                self.pending
                    .remove(&items.start)
                    .filter(|(filled, _)| filled == items)
            })
            .collect();
        let Some(covered) = covered else {
            // Every chunk an accumulator folded was filled by this stage's source;
            // should that not hold, the accumulator is not recorded (its items run
            // again next time), never recorded wrong.
            debug_assert!(false, "an accumulator folded chunks never filled");
            return self.inner.deliver(worker, items, payload);
        };
        let journal = &mut self.journal;
        encode_record(&mut journal.staged, journal.stage, &covered, &payload);
        self.inner.deliver(worker, items, payload)?;
        journal.commit()
    }

    fn finish(&mut self, outcome: Result<()>) {
        self.inner.finish(outcome);
    }

    fn taken(&self) -> Option<u64> {
        self.inner.taken()
    }
}
