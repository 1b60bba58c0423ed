//! Fold jobs' flushes: asking each worker for the accumulator it kept across
//! chunks, and keeping what it folded since its last flush so that it can be sent
//! again if the worker is lost with its accumulator.

use super::Engine;
use crate::engine::job::{InFlight, JobId, Local};
use crate::error::Error;
use crate::wire::protocol::{self, Request};
use crate::wire::transport::{FrameBuf, Payload};

impl Engine {
    /// Asks every worker of fold job `id` that holds folded chunks and has no flush
    /// in flight for its accumulator: the job has run out of chunks.
    pub(super) fn flush_all(&mut self, id: JobId) {
        let Some(ledger) = self.jobs.get(&id).and_then(|job| job.fold.as_ref()) else {
            return;
        };
        let holders: Vec<(usize, u64)> = ledger
            .kept
            .keys()
            .copied()
            .filter(|&w| !ledger.flushing(w))
            .collect();
        for holder in holders {
            self.send_flush(id, holder);
        }
    }

    /// What the process `holder` (slot, generation) folded is lost with it: those
    /// chunks go again, in every fold job.
    pub(super) fn folds_lost(&mut self, holder: (usize, u64)) {
        for job in self.jobs.values_mut() {
            if let Some(ledger) = job.fold.as_mut() {
                let lost = ledger.take_kept(holder);
                job.retry.extend(lost);
            }
        }
    }

    /// Asks `holder` (a worker's slot and process generation) for its accumulator of
    /// fold job `id`. When that process is gone already, what it folded is sent
    /// again instead.
    pub(super) fn send_flush(&mut self, id: JobId, holder: (usize, u64)) {
        let (worker, generation) = holder;
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        let Some(ledger) = job.fold.as_mut() else {
            return;
        };
        if self.workers.generation(worker) != Some(generation) {
            let lost = ledger.take_kept(holder);
            job.retry.extend(lost);
            return;
        }
        let chunk = job.next_chunk;
        let mut frame = self.workers.take_frame();
        let request = Request::Flush { job: id.0, chunk };
        if let Err(source) = protocol::seal(&mut frame, &request) {
            self.workers.return_frame(frame);
            let error = Error::Result {
                items: job.next_item..job.next_item,
                worker,
                source,
            };
            self.fail_job(id, 0, error, None);
            return;
        }
        job.next_chunk += 1;
        job.in_flight += 1;
        ledger.flushes.insert(chunk, holder);
        let at = job.next_item;
        let flight = InFlight::new(id, chunk, at..at, frame);
        if self.workers.send_chunk(worker, flight).is_err() {
            // Its loss event reports the flush, and what it folded is sent again.
            self.workers.kill(worker);
        }
    }

    /// A reply of a fold job's worker: a chunk folded (its frame is kept until the
    /// worker's next flush) or a flush answered (its payload is an accumulator).
    pub(super) fn fold_answered(
        &mut self,
        flight: InFlight,
        worker: usize,
        nanos: u64,
        payload: Payload,
        local: Option<&mut Local<'_>>,
    ) {
        let id = flight.job;
        let chunk = flight.chunk;
        let items = flight.items.clone();
        let holder = (worker, self.workers.generation(worker).unwrap_or(u64::MAX));
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        let ledger = job.fold.as_mut().expect("fold jobs have a ledger");
        let mut covers = Vec::new();
        if let Some(asked) = ledger.flushes.remove(&chunk) {
            // The accumulator covers every chunk this process answered before.
            for kept in ledger.take_kept(holder) {
                covers.push(kept.items.clone());
                self.workers.return_frame(kept.frame);
            }
            if asked != holder {
                // Not the process that was asked (it was replaced): its folds are lost.
                let lost = ledger.take_kept(asked);
                job.retry.extend(lost);
            }
            self.workers.return_frame(flight.frame);
        } else {
            job.sizer.observe(nanos, items.len());
            let mut flight = flight;
            let len = flight.frame.body_len();
            if flight.frame.body().capacity() > 2 * len + 4096 {
                // Kept in a buffer of its size; the pooled one goes back to be reused.
                let mut kept = FrameBuf::with_capacity(len);
                kept.body().extend_from_slice(flight.frame.body_bytes());
                let pooled = std::mem::replace(&mut flight.frame, kept);
                self.workers.return_frame(pooled);
            }
            *ledger.kept_bytes.entry(holder).or_default() += flight.frame.body().capacity();
            ledger.kept.entry(holder).or_default().push(flight);
            let full = ledger.kept_bytes[&holder] >= ledger.flush_bytes;
            if full && !ledger.flushing(holder) {
                self.send_flush(id, holder);
            }
        }
        self.route_covering(id, chunk, worker, items, covers, payload, local);
    }
}
