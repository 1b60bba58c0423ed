//! The job table: hand worker credit to jobs, route replies, reorder, end jobs.
//!
//! One [`Engine`] per pool, owned by whichever thread drives it (see `driver.rs`).
//! Free worker credit goes to live jobs in turn, in submission order, so no job
//! starves another; each reply is routed by job and chunk; a failure ends its own
//! job and no other (`scheduler/failures.rs`: lost workers, deadlines, retries,
//! poison items).

mod failures;

use failures::Loss;

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::time::{Duration, Instant};

use crate::engine::backend::Event;
use crate::engine::chunker::target_chunk_bytes;
use crate::engine::job::{Complete, InFlight, Job, JobId, Kind, Payload, Ready, Sink, Source};
use crate::engine::outcome::{
    complete_outcomes, describe, describe_init, exit_description, fail_items,
};
use crate::engine::supervisor::{CREDIT, Supervisor};
use crate::error::{Error, Result};
use crate::os::poll::POLL_BEFORE_BLOCKING;
use crate::shared::region;
use crate::wire::protocol::{self, ChunkHeader, ContextPayload, INIT_JOB, Reply, Request, TaskRef};
use crate::wire::transport::FrameBuf;

/// Payload bytes an ordered job may hold in its reorder buffer before it stops
/// dispatching until the earliest chunk is in: large results (each a shared-memory
/// frame and a mapping) must not pin unbounded memory and descriptors.
const READY_BYTES_CAP: usize = 64 << 20;

/// Work submitted from any thread, taken in by the driver.
pub(crate) enum Submission {
    /// One `apply_async`: the encoded argument and the handle to complete.
    Apply {
        task: TaskRef,
        arg: Vec<u8>,
        /// Shared inputs the argument names, kept until its chunk is answered.
        pins: region::Pins,
        handle: Box<dyn Complete>,
    },
    /// A job with its own source and sink (`map_async`).
    Job(Box<Job>),
}

/// What the driver's surroundings provide: the inbox, the terminate request, and
/// a way to tell waiting threads that something completed.
pub(crate) trait Hooks {
    /// Submissions made since the last call.
    fn take_inbox(&self) -> Vec<Submission>;
    /// Whether `terminate()` was called.
    fn terminating(&self) -> bool;
    /// Some handle or job completed: waiting threads should look again.
    fn notify(&self);
}

/// What the caller of [`Engine::drive`] lends: its job's source and sink.
pub(crate) struct Local<'a> {
    pub(crate) job: JobId,
    pub(crate) source: Option<&'a mut dyn Source>,
    pub(crate) sink: Option<&'a mut dyn Sink>,
}

/// Why [`Engine::drive`] returned.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Drive {
    /// The caller's condition holds.
    Satisfied,
    /// The deadline passed.
    TimedOut,
    /// Nothing is in flight and nothing can be sent: waiting would never end.
    Idle,
}

/// The pool's engine: its workers and its jobs.
pub(crate) struct Engine {
    pub(crate) workers: Supervisor,
    jobs: BTreeMap<JobId, Job>,
    next_job: u64,
    /// The job that was given the last chunk; the next chunk goes to a later one.
    last_served: JobId,
    chunk_size: Option<usize>,
    /// Most items in one adaptive chunk.
    pub(crate) max_chunk_items: usize,
    /// How many times a chunk lost with its worker is sent again.
    pub(crate) retries: u32,
    /// How long one item may run before its worker is killed.
    pub(crate) task_timeout: Option<Duration>,
    /// The workers' memory limit, to name deaths that most likely come from it.
    pub(crate) memory_limit: Option<u64>,
    /// Chunks sent again after their worker was lost.
    pub(crate) retried: u64,
    /// How many chunks a job may dispatch ahead of delivery.
    pub(crate) window: u64,
    /// The live `apply_async` stream of each task.
    streams: HashMap<TaskRef, JobId>,
    /// Initializer failures, by worker, not yet reported.
    pub(crate) init_failures: Vec<(usize, String)>,
    /// A handle or job completed since the hooks were last told.
    completed: bool,
    /// `terminate()` has run: nothing more is accepted.
    pub(crate) terminated: bool,
    /// A failed attempt to replace workers in this drive; not retried until the
    /// next one, so a failing spawn does not run once per chunk.
    revive_failed: bool,
}

impl Engine {
    pub(crate) fn new(workers: Supervisor, chunk_size: Option<usize>, count: usize) -> Self {
        Self {
            workers,
            jobs: BTreeMap::new(),
            next_job: INIT_JOB + 1,
            last_served: JobId(INIT_JOB),
            chunk_size,
            max_chunk_items: usize::MAX,
            retries: 1,
            retried: 0,
            task_timeout: None,
            memory_limit: None,
            window: (4 * CREDIT * count) as u64,
            streams: HashMap::new(),
            init_failures: Vec::new(),
            completed: false,
            terminated: false,
            revive_failed: false,
        }
    }

    /// A new job's record, numbered; `context` is the encoded context value.
    pub(crate) fn new_job(
        &mut self,
        task: TaskRef,
        kind: Kind,
        ordered: bool,
        context: Option<ContextPayload<'_>>,
    ) -> Result<Job> {
        let id = JobId(self.next_job);
        self.next_job += 1;
        let mut job = Job::new(id, task, kind, ordered, self.chunk_size);
        if let Some(ContextPayload { bytes, shared }) = context {
            let mut frame = FrameBuf::with_capacity(bytes.len() + 64);
            frame.body().extend_from_slice(bytes);
            let request = Request::Context { job: id.0, shared };
            protocol::seal(&mut frame, &request).map_err(|source| Error::Context {
                worker: None,
                source,
            })?;
            job.context = Some(frame);
        }
        Ok(job)
    }

    /// How many chunks a job may dispatch ahead of delivery (ordered jobs) or of
    /// what its consumer took (`imap`).
    pub(crate) fn window_chunks(&self) -> usize {
        usize::try_from(self.window).unwrap_or(usize::MAX).max(1)
    }

    /// Puts a job in the table.
    pub(crate) fn add(&mut self, job: Job) -> JobId {
        let id = job.id;
        self.jobs.insert(id, job);
        id
    }

    pub(crate) fn job(&self, id: JobId) -> Option<&Job> {
        self.jobs.get(&id)
    }

    /// Removes a job the caller drove to its end (or gives up: an `imap` dropped
    /// early), returning its outcome. Its chunks still in flight are ignored when
    /// they come back.
    pub(crate) fn remove(&mut self, id: JobId) -> Option<Result<()>> {
        let job = self.jobs.remove(&id)?;
        if job.context.is_some() {
            self.workers.forget_context(id);
        }
        if job.fold.is_some() && !matches!(job.outcome, Some(Ok(()))) {
            // A fold job that did not complete may have left accumulators, some
            // made by chunks still running.
            self.workers.forget_everywhere(id);
        }
        job.outcome
    }

    /// Whether anything is in flight, or an owned job or stream could send more.
    pub(crate) fn outstanding(&self) -> bool {
        self.workers.busy()
            || self.jobs.values().any(|job| match &job.kind {
                Kind::Owned { .. } => !job.ended(),
                Kind::Apply(stream) => stream.queued() > 0 || stream.waiting() > 0,
                Kind::Lent | Kind::OwnedSink(_) => false,
            })
    }

    /// Takes in submissions.
    fn absorb(&mut self, submissions: Vec<Submission>) {
        for submission in submissions {
            match submission {
                Submission::Job(job) => {
                    if self.terminated {
                        self.end_owned(*job, Err(Error::Terminated));
                    } else {
                        self.add(*job);
                    }
                }
                Submission::Apply {
                    task,
                    arg,
                    pins,
                    handle,
                } => {
                    if self.terminated {
                        handle.complete(Err(Error::Terminated));
                        self.completed = true;
                        continue;
                    }
                    let id = match self.streams.get(&task) {
                        Some(&id) if self.jobs.contains_key(&id) => id,
                        _ => {
                            let job = self
                                .new_job(task, Kind::Apply(Default::default()), false, None)
                                .expect("a job without context always builds");
                            let id = self.add(job);
                            self.streams.insert(task, id);
                            id
                        }
                    };
                    if let Some(Job {
                        kind: Kind::Apply(stream),
                        ..
                    }) = self.jobs.get_mut(&id)
                    {
                        stream.push(arg, pins, handle);
                    }
                }
            }
        }
    }

    /// Runs the engine until `until` holds, the deadline passes, or nothing more
    /// can happen.
    pub(crate) fn drive(
        &mut self,
        hooks: &dyn Hooks,
        mut local: Option<&mut Local<'_>>,
        until: &mut dyn FnMut(&Engine) -> bool,
        deadline: Option<Instant>,
    ) -> Result<Drive> {
        self.revive_failed = false;
        loop {
            let inbox = hooks.take_inbox();
            if !inbox.is_empty() {
                self.absorb(inbox);
            }
            if hooks.terminating() && !self.terminated {
                self.terminate();
            }
            self.dispatch(local.as_deref_mut());
            if self.completed {
                self.completed = false;
                hooks.notify();
            }
            if until(self) {
                return Ok(Drive::Satisfied);
            }
            if !self.workers.busy() {
                return Ok(Drive::Idle);
            }
            let poll = self.reply_expected_soon();
            let expiry = self
                .task_timeout
                .and_then(|timeout| self.workers.next_expiry(timeout));
            let wake = match (deadline, expiry) {
                (Some(d), Some(e)) => Some(d.min(e)),
                (d, e) => d.or(e),
            };
            let event = match self.workers.backend.next_event(poll, wake) {
                Ok(event) => event,
                Err(e) => {
                    self.fail_everything(&e);
                    return Err(e);
                }
            };
            match event {
                Event::TimedOut => {
                    self.expire(local.as_deref_mut());
                    if until(self) {
                        return Ok(Drive::Satisfied);
                    }
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Ok(Drive::TimedOut);
                    }
                }
                Event::Woken => {}
                event => self.handle(event, local.as_deref_mut()),
            }
        }
    }

    /// Sends nothing more for job `id`; what is in flight may still finish.
    pub(crate) fn stop_dispatch(&mut self, id: JobId) {
        if let Some(job) = self.jobs.get_mut(&id) {
            job.stopping = true;
        }
    }

    /// Ends a job the caller gives up on (its call timed out), stopping the workers
    /// that run nothing but its chunks.
    pub(crate) fn abandon(&mut self, id: JobId, error: Error) {
        self.fail_job(id, 0, error, None);
    }

    /// Whether the shortest chunk being run should finish within the polling
    /// window, so waiting for it is better spent polling than sleeping.
    fn reply_expected_soon(&self) -> bool {
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
    fn dispatch(&mut self, mut local: Option<&mut Local<'_>>) {
        let mut revived = false;
        loop {
            let Some(id) = self.next_dispatchable(local.as_deref()) else {
                return;
            };
            // Work is waiting: bring the pool back to strength first (lost workers,
            // and replacements for workers given their last task).
            if (!revived || self.workers.pick().is_none()) && !self.revive_failed {
                revived = true;
                if let Err(e) = self.workers.revive() {
                    self.revive_failed = true;
                    if self.workers.pick().is_none() {
                        // No worker can take the job's input: fail it, and every
                        // queued `apply_async` handle, rather than leave them waiting.
                        if let Some(Job {
                            kind: Kind::Apply(stream),
                            ..
                        }) = self.jobs.get_mut(&id)
                        {
                            let reason = e.to_string();
                            stream.fail_queued(|| Error::Transport {
                                worker: None,
                                source: std::io::Error::other(reason.clone()),
                            });
                            self.completed = true;
                        }
                        self.fail_job(id, 0, e, local.as_deref_mut());
                        continue;
                    }
                }
            }
            let Some(worker) = self.workers.pick() else {
                return;
            };
            self.last_served = id;
            self.send_chunk(id, worker, local.as_deref_mut());
        }
    }

    /// The next job, after the last one served, that could send a chunk now.
    fn next_dispatchable(&self, local: Option<&Local<'_>>) -> Option<JobId> {
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
            match &job.kind {
                Kind::Apply(stream) => stream.queued() > 0,
                Kind::Owned { .. } => self.within_window(job),
                Kind::Lent | Kind::OwnedSink(_) => lent && self.within_window(job),
            }
        };
        let after = self.jobs.range(JobId(self.last_served.0 + 1)..);
        let before = self.jobs.range(..=self.last_served);
        after
            .chain(before)
            .map(|(_, job)| job)
            .find(|job| can(job))
            .map(|job| job.id)
    }

    fn within_window(&self, job: &Job) -> bool {
        let taken = match &job.kind {
            Kind::Owned { sink, .. } | Kind::OwnedSink(sink) => sink.taken(),
            _ => None,
        };
        match taken {
            Some(taken) => job.next_chunk < taken + self.window,
            None if job.ordered => {
                job.next_chunk < job.next_deliver + self.window && job.ready_bytes < READY_BYTES_CAP
            }
            None => (job.in_flight as u64) < self.window,
        }
    }

    /// Encodes the next chunk of job `id` and sends it to `worker`.
    fn send_chunk(&mut self, id: JobId, worker: usize, mut local: Option<&mut Local<'_>>) {
        if !self.send_context(id, worker) {
            return;
        }
        let job = self
            .jobs
            .get_mut(&id)
            .expect("dispatchable jobs are in the table");
        if let Some(flight) = job.retry.pop_front() {
            job.in_flight += 1;
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
        // An apply stream numbers its submissions itself (some may have been failed
        // unsent); every other source is numbered by what the job has taken.
        let first = match &job.kind {
            Kind::Apply(stream) => stream.first_queued(),
            _ => job.next_item,
        };
        let source: &mut dyn Source = match &mut job.kind {
            Kind::Apply(stream) => stream,
            Kind::Owned { source, .. } => source.as_mut(),
            Kind::Lent | Kind::OwnedSink(_) => match local.as_deref_mut() {
                Some(Local {
                    source: Some(source),
                    ..
                }) => &mut **source,
                _ => unreachable!("only the job's own caller dispatches a lent source"),
            },
        };
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
        let (filled, pins) = region::pin_while(|| source.fill(first, size, byte_cap, frame.body()));
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
        let items = first..first + filled.count;
        let mut flight = InFlight::new(id, chunk, items, frame);
        flight.pins = pins;
        if let Err(source) = self.workers.send_chunk(worker, flight) {
            self.send_failed(worker, id, first, source, local);
        }
    }

    /// Sends job `id`'s context value to `worker` unless it has it or the job has
    /// none; false when that failed (the worker is given up and its loss reported).
    fn send_context(&mut self, id: JobId, worker: usize) -> bool {
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

    fn handle(&mut self, event: Event, local: Option<&mut Local<'_>>) {
        match event {
            Event::Reply {
                worker,
                generation,
                frame,
            } => {
                let opened = protocol::open::<Reply>(&frame).map(|(r, p)| (r, p.len()));
                let (reply, payload_len) = match opened {
                    Ok(opened) => opened,
                    Err(reason) => return self.protocol_error(worker, generation, reason, local),
                };
                let (job, chunk) = match &reply {
                    Reply::Done { job, chunk, .. } | Reply::Failed { job, chunk, .. } => {
                        (JobId(*job), *chunk)
                    }
                };
                let Some(flight) = self.workers.answered(worker, generation, job, chunk) else {
                    if self.workers.is_current(worker, generation) {
                        let reason = format!("unexpected reply for chunk {chunk} of job {}", job.0);
                        self.protocol_error(worker, generation, reason, local);
                    }
                    return;
                };
                self.workers.retire_if_done(worker);
                if job.0 == INIT_JOB {
                    self.workers.return_frame(flight.frame);
                    if let Reply::Failed { failure, .. } = reply {
                        self.init_failures.push((worker, describe_init(failure)));
                    }
                    return;
                }
                self.chunk_answered(
                    flight,
                    worker,
                    reply,
                    Payload::new(frame, payload_len),
                    local,
                );
            }
            Event::Lost {
                worker,
                generation,
                status,
                last_item,
            } => {
                // What the process folded is lost with it: those chunks go again.
                for job in self.jobs.values_mut() {
                    if let Some(ledger) = job.fold.as_mut() {
                        let lost = ledger.take_kept((worker, generation));
                        job.retry.extend(lost);
                    }
                }
                let Some(chunks) = self.workers.lost(worker, generation) else {
                    return;
                };
                let mut local = local;
                for (at, flight) in chunks.into_iter().enumerate() {
                    if flight.job.0 == INIT_JOB {
                        self.workers.return_frame(flight.frame);
                        let reason = format!("the worker exited ({})", exit_description(status));
                        self.init_failures.push((worker, reason));
                        continue;
                    }
                    // Only the first chunk a worker held had started.
                    let lost = Loss {
                        worker,
                        status,
                        last_item,
                        started: at == 0,
                    };
                    self.chunk_lost(flight, lost, local.as_deref_mut());
                }
            }
            Event::Broken {
                worker,
                generation,
                reason,
            } => self.protocol_error(worker, generation, reason, local),
            Event::Woken | Event::TimedOut => {}
        }
    }

    fn chunk_answered(
        &mut self,
        flight: InFlight,
        worker: usize,
        reply: Reply,
        payload: Payload,
        local: Option<&mut Local<'_>>,
    ) {
        let id = flight.job;
        let Some(job) = self.jobs.get_mut(&id) else {
            self.workers.return_frame(flight.frame);
            return; // the job was cancelled: its late replies are ignored
        };
        job.in_flight = job.in_flight.saturating_sub(1);
        if job.ended() {
            self.workers.return_frame(flight.frame);
            return;
        }
        match reply {
            Reply::Done { nanos, .. } if job.fold.is_some() => {
                self.fold_answered(flight, worker, nanos, payload, local);
            }
            Reply::Done { nanos, chunk, .. } => {
                let items = flight.items.clone();
                job.sizer.observe(nanos, items.len());
                if let Kind::Apply(stream) = &mut job.kind {
                    let live: Vec<usize> = flight.live_items().collect();
                    if let Err(reason) = complete_outcomes(stream, worker, &live, &payload) {
                        fail_items(stream, live, |_| Error::Protocol {
                            worker,
                            reason: reason.clone(),
                        });
                    }
                    self.workers.return_frame(flight.frame);
                    self.completed = true;
                    return;
                }
                self.workers.return_frame(flight.frame);
                self.route(id, chunk, worker, items, payload, local);
            }
            Reply::Failed { failure, .. } => {
                if let Kind::Apply(stream) = &mut job.kind {
                    fail_items(stream, flight.live_items(), |item| {
                        describe(failure.clone(), worker, item..item + 1).1
                    });
                    self.workers.return_frame(flight.frame);
                    self.completed = true;
                    return;
                }
                let per_item = failure.is_per_item();
                let (item, error) = describe(failure, worker, flight.items.clone());
                if job.policy.goes_on() && per_item && flight.runs(item) {
                    // The item failed alone: record it and run the chunk's other
                    // items again, passing over those that failed.
                    job.failures.insert(item, error);
                    self.resend_without(id, worker, flight, item, local);
                    return;
                }
                self.workers.return_frame(flight.frame);
                self.fail_job(id, item, error, local);
            }
        }
    }

    /// Routes a chunk's results to its job's sink, in chunk order when the job is
    /// ordered, with the failures recorded for its items; ends the job once it is
    /// complete.
    fn route(
        &mut self,
        id: JobId,
        chunk: u64,
        worker: usize,
        items: Range<usize>,
        payload: Payload,
        mut local: Option<&mut Local<'_>>,
    ) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        let failed = take_failures(job, &items);
        if job.ordered {
            job.ready_bytes += payload.len();
            job.ready.insert(
                chunk,
                Ready {
                    worker,
                    items,
                    payload,
                    failed,
                },
            );
            self.deliver_ready(id, local.as_deref_mut());
        } else {
            job.delivered += 1;
            job.items_delivered += items.len();
            let start = items.start;
            if let Err(e) = deliver_to(job, local.as_deref_mut(), worker, items, payload, failed) {
                self.fail_job(id, start, e, local.as_deref_mut());
                return;
            }
        }
        self.settle(id, local);
    }

    /// Ends a job that is complete; asks the workers of a fold job that has run out
    /// of chunks for their accumulators.
    fn settle(&mut self, id: JobId, local: Option<&mut Local<'_>>) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        if job.complete() {
            self.finish(id, Ok(()), local);
            return;
        }
        if !job.drained() {
            return;
        }
        let Some(ledger) = job.fold.as_mut() else {
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

    /// Asks `holder` (a worker's slot and process generation) for its accumulator of
    /// fold job `id`. When that process is gone already, what it folded is sent
    /// again instead.
    fn send_flush(&mut self, id: JobId, holder: (usize, u64)) {
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
    fn fold_answered(
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
        if let Some(asked) = ledger.flushes.remove(&chunk) {
            // The accumulator covers every chunk this process answered before.
            for kept in ledger.take_kept(holder) {
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
        self.route(id, chunk, worker, items, payload, local);
    }

    /// Delivers the ordered job's ready chunks that are next in line.
    fn deliver_ready(&mut self, id: JobId, mut local: Option<&mut Local<'_>>) {
        loop {
            let Some(job) = self.jobs.get_mut(&id) else {
                return;
            };
            let Some(ready) = job.ready.remove(&job.next_deliver) else {
                return;
            };
            job.next_deliver += 1;
            job.delivered += 1;
            job.items_delivered += ready.items.len();
            job.ready_bytes -= ready.payload.len();
            let start = ready.items.start;
            if let Err(e) = deliver_to(
                job,
                local.as_deref_mut(),
                ready.worker,
                ready.items,
                ready.payload,
                ready.failed,
            ) {
                self.fail_job(id, start, e, local);
                return;
            }
        }
    }

    /// Records a job's end. An owned sink is told and the job leaves the table; a
    /// lent job stays until its caller removes it.
    fn finish(&mut self, id: JobId, outcome: Result<()>, _local: Option<&mut Local<'_>>) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        job.ready.clear();
        job.ready_bytes = 0;
        match &job.kind {
            Kind::Lent => {
                job.outcome = Some(outcome);
                self.completed = true;
            }
            Kind::Apply(_) => {
                // A stream does not end on its own; its items fail one by one.
                job.outcome = None;
            }
            Kind::Owned { .. } | Kind::OwnedSink(_) => {
                let job = self.jobs.remove(&id).expect("found above");
                if job.context.is_some() {
                    self.workers.forget_context(id);
                }
                self.end_owned(job, outcome);
            }
        }
        if self
            .jobs
            .get(&id)
            .is_some_and(|j| j.ended() && j.context.is_some())
        {
            self.workers.forget_context(id);
        }
    }

    fn end_owned(&mut self, job: Job, outcome: Result<()>) {
        match job.kind {
            Kind::Owned { mut sink, .. } | Kind::OwnedSink(mut sink) => sink.finish(outcome),
            Kind::Apply(mut stream) => stream.fail_all(|| Error::Terminated),
            Kind::Lent => {}
        }
        self.completed = true;
    }
}

/// The failures recorded for a chunk's items, ascending.
fn take_failures(job: &mut Job, items: &Range<usize>) -> Vec<(usize, Error)> {
    if job.failures.is_empty() {
        return Vec::new();
    }
    let mut after = job.failures.split_off(&items.start);
    let mut rest = after.split_off(&items.end);
    job.failures.append(&mut rest);
    after.into_iter().collect()
}

/// Hands one chunk's payload to the job's sink: the caller's, or the job's own.
fn deliver_to(
    job: &mut Job,
    local: Option<&mut Local<'_>>,
    worker: usize,
    items: Range<usize>,
    payload: Payload,
    failed: Vec<(usize, Error)>,
) -> Result<()> {
    let sink: &mut dyn Sink = match &mut job.kind {
        Kind::Owned { sink, .. } | Kind::OwnedSink(sink) => sink.as_mut(),
        Kind::Lent => match local {
            Some(Local {
                job: lent,
                sink: Some(sink),
                ..
            }) if *lent == job.id => &mut **sink,
            _ => unreachable!("a lent job is driven by its caller until it ends"),
        },
        Kind::Apply(_) => unreachable!("apply streams complete items one by one"),
    };
    if failed.is_empty() {
        sink.deliver(worker, items, payload)
    } else {
        sink.deliver_partial(worker, items, payload, failed)
    }
}
