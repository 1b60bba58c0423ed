//! Dispatch: which job gets the next free credit, and the encoding and sending of
//! its next chunk (or of a chunk sent again), context value first.

use std::time::Instant;

use super::{Engine, READY_BYTES_CAP};
use crate::engine::chunker::target_chunk_bytes;
use crate::engine::job::{InFlight, Job, JobId, Local};
use crate::engine::outcome::again;
use crate::error::Error;
use crate::os::poll::POLL_BEFORE_BLOCKING;
use crate::shared::region;
use crate::wire::protocol::{self, ChunkHeader, Request};

impl Engine {
    /// Whether the shortest chunk being run should finish within the polling
    /// window, so waiting for it is better spent polling than sleeping.
    pub(super) fn reply_expected_soon(&self) -> bool {
        (0..self.workers.slots())
            .filter_map(|w| self.workers.front(w))
            .map(|f| match self.jobs.get(&f.job) {
                Some(job) => job.sizer.estimate_nanos(f.items.len()),
                None => 0.0,
            })
            .fold(f64::INFINITY, f64::min)
            <= POLL_BEFORE_BLOCKING.as_nanos() as f64
    }

    /// Sends chunks while some worker has credit and some job has input.
    pub(super) fn dispatch(&mut self, mut local: Option<&mut Local<'_>>) {
        let mut revived = false;
        loop {
            let Some(id) = self.next_dispatchable(local.as_deref()) else {
                return;
            };
            // Work is waiting: bring the pool back to strength first (lost workers,
            // and replacements for workers given their last task). A failure is
            // not retried in this drive, so a failing spawn does not run per chunk.
            if (!revived || self.workers.pick().is_none()) && self.revive_failed.is_none() {
                revived = true;
                if let Err(e) = self.workers.revive() {
                    self.revive_failed = Some(e);
                }
            }
            let Some(worker) = self.workers.pick() else {
                // No worker has credit. When none is running either and starting one
                // failed in this drive, nothing will ever take this job's input: fail
                // it (and its queued `apply_async` handles) with that cause.
                if self.workers.busy() {
                    return;
                }
                let Some(cause) = self.revive_failed.as_ref() else {
                    return;
                };
                let reason = cause.to_string();
                let error = again(cause);
                if let Some(handles) = self.jobs.get_mut(&id).and_then(|j| j.kind.handles()) {
                    handles.fail_queued(|| Error::Transport {
                        worker: None,
                        source: std::io::Error::other(reason.clone()),
                    });
                    self.completed = true;
                }
                self.fail_job(id, 0, error, local.as_deref_mut());
                continue;
            };
            self.last_served = id;
            self.send_chunk(id, worker, local.as_deref_mut());
        }
    }

    /// The next job, after the last one served, that could send a chunk now.
    pub(super) fn next_dispatchable(&self, local: Option<&Local<'_>>) -> Option<JobId> {
        let can = |job: &Job| -> bool {
            if job.ended() || job.stopping {
                return false;
            }
            if !job.retry.is_empty() {
                return true;
            }
            if job.exhausted {
                return false;
            }
            let lent = local.is_some_and(|l| l.job == job.id && l.source.is_some());
            job.kind.can_send(lent, || self.within_window(job))
        };
        let after = self.jobs.range(JobId(self.last_served.0 + 1)..);
        let before = self.jobs.range(..=self.last_served);
        after
            .chain(before)
            .map(|(_, job)| job)
            .find(|job| can(job))
            .map(|job| job.id)
    }

    pub(super) fn within_window(&self, job: &Job) -> bool {
        match job.kind.taken() {
            Some(taken) => job.next_chunk < taken + self.window,
            None if job.ordered => {
                job.next_chunk < job.next_deliver + self.window && job.ready_bytes < READY_BYTES_CAP
            }
            None => (job.in_flight as u64) < self.window,
        }
    }

    /// Encodes the next chunk of job `id` and sends it to `worker`.
    pub(super) fn send_chunk(
        &mut self,
        id: JobId,
        worker: usize,
        mut local: Option<&mut Local<'_>>,
    ) {
        if !self.send_context(id, worker) {
            return;
        }
        let job = self
            .jobs
            .get_mut(&id)
            .expect("dispatchable jobs are in the table");
        if let Some(flight) = job.retry.pop_front() {
            job.in_flight += 1;
            job.tally.stats.bytes_sent += flight.frame.body_len() as u64;
            let first = flight.items.start;
            if let Err(source) = self.workers.send_chunk(worker, flight) {
                self.send_failed(worker, id, first, source, local);
            }
            return;
        }
        let mut frame = self.workers.take_frame();
        let Engine {
            jobs,
            workers,
            max_chunk_items,
            task_timeout,
            ..
        } = self;
        let job = jobs
            .get_mut(&id)
            .expect("dispatchable jobs are in the table");
        let first = job.kind.first_item(job.next_item);
        let source = job.kind.source(local.as_deref_mut());
        // Under a task timeout each item is its own chunk, so the deadline is the
        // item's.
        let size = if task_timeout.is_some() {
            1
        } else {
            job.sizer
                .next(source.remaining_hint(), workers.slots().max(1))
        };
        let size = size.min(workers.budget(worker)).min(*max_chunk_items);
        let byte_cap = if job.sizer.fixed.is_some() {
            usize::MAX
        } else {
            target_chunk_bytes()
        };
        // Shared inputs the items name stay alive with the chunk, whoever owned them.
        let reading = Instant::now();
        let (filled, pins) = region::pin_while(|| source.fill(first, size, byte_cap, frame.body()));
        job.tally.stats.input += reading.elapsed();
        let filled = match filled {
            Ok(filled) => filled,
            Err(e) => {
                let item = first;
                self.workers.return_frame(frame);
                self.fail_job(id, item, e, local);
                return;
            }
        };
        job.exhausted |= filled.exhausted;
        // Items a resumed checkpoint holds keep their indices without a chunk.
        job.next_item += filled.skipped;
        let first = first + filled.skipped;
        if filled.count == 0 {
            self.workers.return_frame(frame);
            self.settle(id, local);
            return;
        }
        let chunk = job.next_chunk;
        let header = Request::Chunk(ChunkHeader {
            job: id.0,
            chunk,
            first_item: first as u64,
            count: u32::try_from(filled.count).expect("chunks hold at most MAX_CHUNK_ITEMS items"),
            task: job.task,
            skip: Vec::new(),
            // The items' `map_file` slices: the worker may map these unsealed.
            unsealed: pins.unsealed(),
        });
        if let Err(source) = protocol::seal(&mut frame, &header) {
            self.workers.return_frame(frame);
            let error = Error::EncodeItem {
                item: first,
                source,
            };
            self.fail_job(id, first, error, local);
            return;
        }
        job.next_item += filled.count;
        job.next_chunk += 1;
        job.in_flight += 1;
        job.tally.stats.bytes_sent += frame.body_len() as u64;
        let items = first..first + filled.count;
        let mut flight = InFlight::new(id, chunk, items, frame);
        flight.pins = pins;
        if let Err(source) = self.workers.send_chunk(worker, flight) {
            self.send_failed(worker, id, first, source, local);
        }
    }

    /// Sends job `id`'s context value to `worker` unless it has it or the job has
    /// none; false when that failed (the worker is given up and its loss reported).
    pub(super) fn send_context(&mut self, id: JobId, worker: usize) -> bool {
        if self.workers.has_context(worker, id) {
            return true;
        }
        let Some(job) = self.jobs.get_mut(&id) else {
            return false;
        };
        let Some(frame) = job.context.as_mut() else {
            return true;
        };
        match self.workers.send_request(worker, frame) {
            Ok(()) => {
                self.workers.add_context(worker, id);
                true
            }
            Err(_) => {
                // Its loss event reports what it held; the chunk goes elsewhere.
                self.workers.kill(worker);
                false
            }
        }
    }
}
