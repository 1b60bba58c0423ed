//! The job table: hand worker credit to jobs, route replies, reorder, end jobs.
//!
//! One [`Engine`] per pool, owned by whichever thread drives it (see `driver.rs`).
//! Free worker credit goes to live jobs in turn, in submission order, so no job
//! starves another; each reply is routed by job and chunk; a failure ends its own
//! job and no other. This file holds the table and the routing of replies; the
//! choice and encoding of the next chunk is in `scheduler/dispatch.rs`, fold jobs'
//! flushes in `scheduler/fold.rs`, and what happens when something fails (lost
//! workers, deadlines, retries, poison items) in `scheduler/failures.rs`.

mod dispatch;
mod failures;
mod fold;

use failures::Loss;

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::time::{Duration, Instant};

use crate::engine::backend::Event;
use crate::engine::ends::Complete;
use crate::engine::job::{Ending, InFlight, Job, JobId, Kind, Local, Ready};
use crate::engine::outcome::{describe, describe_init, exit_description};
use crate::engine::progress::{Bars, Relay};
use crate::engine::stats::{JobStats, Tally};
use crate::engine::supervisor::{CREDIT, Supervisor};
use crate::engine::trace::{Arg, Track};
use crate::error::{Error, Result};
use crate::shared::region;
use crate::wire::protocol::{self, ContextPayload, INIT_JOB, Reply, Request, TaskRef};
use crate::wire::transport::{FrameBuf, Payload};

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
    /// When this driver's turn ends because another thread waits for the engine:
    /// past it, `drive` returns [`Drive::Yielded`].
    fn turn_ends(&self) -> Option<Instant> {
        None
    }
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
    /// Another thread waits for the engine and this driver's turn is over.
    Yielded,
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
    /// Why an attempt to replace workers failed in this drive; not retried until
    /// the next one, so a failing spawn does not run once per chunk.
    revive_failed: Option<Error>,
    /// The figures of every job that has ended, summed, and how many ended.
    pub(crate) totals: JobStats,
    pub(crate) jobs_ended: u64,
    /// The figures of the job that ended last (apply streams never end).
    pub(crate) last_stats: Option<JobStats>,
    /// Where this pool's timeline is written, if anywhere.
    pub(crate) trace: Option<Track>,
    /// Where its jobs' progress bars are drawn, if anywhere.
    pub(crate) bars: Option<Bars>,
    /// What its jobs are called on their bars (`job 3`, or a pipeline's stage).
    pub(crate) label: Option<String>,
    /// The copying of the workers' output past the bars, when they are drawn.
    /// Last, so it is dropped after the workers.
    pub(crate) relay: Option<Relay>,
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
            task_timeout: None,
            memory_limit: None,
            window: (4 * CREDIT * count) as u64,
            streams: HashMap::new(),
            init_failures: Vec::new(),
            completed: false,
            terminated: false,
            revive_failed: None,
            totals: JobStats::default(),
            jobs_ended: 0,
            last_stats: None,
            trace: None,
            bars: None,
            label: None,
            relay: None,
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
        if let Some(ContextPayload {
            bytes,
            shared,
            unsealed,
        }) = context
        {
            let mut frame = FrameBuf::with_capacity(bytes.len() + 64);
            frame.body().extend_from_slice(bytes);
            let request = Request::Context {
                job: id.0,
                shared,
                unsealed: unsealed.to_vec(),
            };
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

    /// Puts a job in the table; its clock and counters start now.
    pub(crate) fn add(&mut self, mut job: Job) -> JobId {
        let id = job.id;
        job.tally = Tally::new(self.workers.started, self.workers.starting().to_vec());
        tracing::debug!(job = id.0, items = job.total, "job started");
        if let Some(bars) = self.bars.as_ref().filter(|b| !b.hidden())
            && !job.kind.items_stand_alone()
        {
            let label = self
                .label
                .clone()
                .unwrap_or_else(|| format!("job {}", id.0));
            job.bar = Some(bars.bar(&label, job.total));
        }
        self.jobs.insert(id, job);
        id
    }

    /// A job's figures so far.
    fn job_stats(&self, job: &Job) -> JobStats {
        job.tally.snapshot(
            self.workers.slots(),
            self.workers.started,
            self.workers.starting(),
        )
    }

    /// Records the figures of a job that leaves the table.
    fn record_end(&mut self, job: &Job) {
        let stats = self.job_stats(job);
        let ok = matches!(job.outcome, Some(Ok(())));
        if let Some(trace) = &self.trace {
            trace.job(job.id.0, job.tally.started, stats.items, stats.chunks, ok);
        }
        if let Some(bar) = &job.bar {
            let outcome = match &job.outcome {
                Some(Ok(())) => "done",
                Some(Err(_)) => "failed",
                None => "stopped",
            };
            bar.finish(stats.items, stats.wall, outcome);
        }
        tracing::debug!(
            job = job.id.0,
            ok,
            items = stats.items,
            chunks = stats.chunks,
            wall = ?stats.wall,
            "job ended"
        );
        self.totals.add(&stats);
        self.jobs_ended += 1;
        self.last_stats = Some(stats);
    }

    /// The figures of every job so far: those that ended, and the live ones as
    /// they stand.
    pub(crate) fn all_stats(&self) -> (u64, JobStats) {
        let mut totals = self.totals.clone();
        for job in self.jobs.values() {
            totals.add(&self.job_stats(job));
        }
        // Start-up is the pool's, not the jobs': the pool's own start and every
        // replacement, whether or not a job was running.
        for (worker, &starting) in self.workers.starting().iter().enumerate() {
            totals.worker_mut(worker).starting = starting;
        }
        totals.restarts = self
            .workers
            .started
            .saturating_sub(self.workers.slots() as u64);
        (self.jobs_ended, totals)
    }

    pub(crate) fn job(&self, id: JobId) -> Option<&Job> {
        self.jobs.get(&id)
    }

    /// Removes a job the caller drove to its end (or gives up: an `imap` dropped
    /// early), returning its outcome. Its chunks still in flight are ignored when
    /// they come back, and workers running one are stopped (see
    /// `stop_abandoned`), so the pool is usable at once.
    pub(crate) fn remove(&mut self, id: JobId) -> Option<Result<()>> {
        let job = self.jobs.remove(&id)?;
        self.record_end(&job);
        if job.context.is_some() {
            self.workers.forget_context(id);
        }
        if job.fold.is_some() && !matches!(job.outcome, Some(Ok(()))) {
            // A fold job that did not complete may have left accumulators, some
            // made by chunks still running.
            self.workers.forget_everywhere(id);
        }
        if job.in_flight > 0 {
            self.stop_abandoned();
        }
        job.outcome
    }

    /// Whether anything is in flight, or an owned job or stream could send more.
    pub(crate) fn outstanding(&self) -> bool {
        self.workers.busy()
            || self
                .jobs
                .values()
                .any(|job| job.kind.outstanding(job.ended()))
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
                    if let Some(stream) = self.jobs.get_mut(&id).and_then(|j| j.kind.handles()) {
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
        self.revive_failed = None;
        if let Some(local) = local.as_deref_mut() {
            // Replies that came for the caller's job while another thread drove.
            let id = local.job;
            self.deliver_held(id, Some(local));
        }
        loop {
            let inbox = hooks.take_inbox();
            if !inbox.is_empty() {
                self.absorb(inbox);
            }
            if hooks.terminating() && !self.terminated {
                self.terminate();
            }
            self.dispatch(local.as_deref_mut());
            self.note_starts();
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
            let turn_ends = hooks.turn_ends();
            if turn_ends.is_some_and(|t| Instant::now() >= t) {
                return Ok(Drive::Yielded);
            }
            let poll = self.reply_expected_soon();
            let expiry = self
                .task_timeout
                .and_then(|timeout| self.workers.next_expiry(timeout));
            let wake = [deadline, expiry, turn_ends].into_iter().flatten().min();
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

    /// Reports the worker processes started since the last call: a log line each,
    /// and a start-up slice on the trace.
    pub(crate) fn note_starts(&mut self) {
        for start in self.workers.take_starts() {
            tracing::info!(
                worker = start.worker,
                pid = start.pid,
                took = ?start.took,
                "worker started"
            );
            if let Some(trace) = &self.trace {
                trace.started(start.worker, start.at, start.took, start.pid);
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
                    // A late reply for a chunk taken away at its deadline is not the
                    // worker's fault; the worker is being killed anyway.
                    if self.workers.is_current(worker, generation)
                        && !self.workers.front_taken(worker)
                    {
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
                self.folds_lost((worker, generation));
                let Some((chunks, front_started)) = self.workers.lost(worker, generation) else {
                    return;
                };
                let cause = exit_description(status);
                tracing::warn!(worker, %cause, last_item, chunks = chunks.len(), "worker lost");
                if let Some(trace) = &self.trace {
                    trace.instant(Some(worker), "worker lost", &[("cause", Arg::Str(&cause))]);
                }
                let mut local = local;
                for (at, flight) in chunks.into_iter().enumerate() {
                    if flight.job.0 == INIT_JOB {
                        self.workers.return_frame(flight.frame);
                        let reason = format!("the worker exited ({})", exit_description(status));
                        self.init_failures.push((worker, reason));
                        continue;
                    }
                    // Only the first chunk a worker held had started, unless the one
                    // it was running was taken away at its deadline: then none had.
                    let lost = Loss {
                        worker,
                        status,
                        last_item,
                        started: at == 0 && front_started,
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
        match &reply {
            Reply::Done { timing, nanos, .. } => {
                job.tally
                    .answered(worker, flight.items.len(), *timing, payload.len());
                if let Some(trace) = &self.trace {
                    let took = std::time::Duration::from_nanos(*nanos);
                    let (sent, got) = (flight.frame.body_len(), payload.len());
                    trace.chunk(
                        worker,
                        id.0,
                        flight.chunk,
                        flight.items.clone(),
                        took,
                        sent,
                        got,
                        false,
                    );
                }
            }
            Reply::Failed { .. } => {
                if let Some(trace) = &self.trace {
                    let items = format!("{}..{}", flight.items.start, flight.items.end);
                    trace.instant(
                        Some(worker),
                        "chunk failed",
                        &[("job", Arg::Num(id.0 as f64)), ("items", Arg::Str(&items))],
                    );
                }
            }
        }
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
                if let Some(handles) = job.kind.handles() {
                    let live: Vec<usize> = flight.live_items().collect();
                    job.tally.stats.items += live.len() as u64;
                    if let Err(reason) = handles.complete_outcomes(worker, &live, &payload) {
                        handles.fail_items(live, |_| Error::Protocol {
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
                if let Some(handles) = job.kind.handles() {
                    handles.fail_items(flight.live_items(), |item| {
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
        local: Option<&mut Local<'_>>,
    ) {
        self.route_covering(id, chunk, worker, items, Vec::new(), payload, local);
    }

    /// [`Engine::route`] for a reply that may be a fold job's accumulator, which
    /// `covers` the items of the chunks it folded.
    #[allow(clippy::too_many_arguments)]
    fn route_covering(
        &mut self,
        id: JobId,
        chunk: u64,
        worker: usize,
        items: Range<usize>,
        covers: Vec<Range<usize>>,
        payload: Payload,
        mut local: Option<&mut Local<'_>>,
    ) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        let failed = take_failures(job, &items);
        let ready = Ready {
            worker,
            items,
            payload,
            failed,
            covers,
        };
        if job.ordered || !job.kind.can_deliver(id, local.as_deref()) {
            // In chunk order, or held while another thread drives for a caller
            // that lends the sink: through the job's reorder buffer.
            job.ready_bytes += ready.payload.len();
            job.ready.insert(chunk, ready);
            if job.ordered {
                self.deliver_ready(id, local.as_deref_mut());
            }
        } else if !self.deliver_chunk(id, ready, local.as_deref_mut()) {
            return;
        }
        self.settle(id, local);
    }

    /// Ends a job that is complete; asks the workers of a fold job that has run out
    /// of chunks for their accumulators.
    fn settle(&mut self, id: JobId, local: Option<&mut Local<'_>>) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        // A job that failed while it delivered (a result that does not decode)
        // keeps its error: it is drained too, but not a success.
        if job.ended() {
            return;
        }
        if job.complete() {
            self.finish(id, Ok(()), local);
            return;
        }
        if job.drained() && job.fold.is_some() {
            self.flush_all(id);
        }
    }

    /// Delivers what was held for job `id` while its caller did not drive: in order
    /// for an ordered job, in any order otherwise; then ends the job if that was
    /// all it waited for.
    fn deliver_held(&mut self, id: JobId, mut local: Option<&mut Local<'_>>) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        if job.ready.is_empty() || job.ended() {
            return;
        }
        if job.ordered {
            self.deliver_ready(id, local.as_deref_mut());
        } else {
            while let Some(ready) = self.jobs.get_mut(&id).and_then(|job| {
                let (_, ready) = job.ready.pop_first()?;
                job.ready_bytes -= ready.payload.len();
                Some(ready)
            }) {
                if !self.deliver_chunk(id, ready, local.as_deref_mut()) {
                    return;
                }
            }
        }
        self.settle(id, local);
    }

    /// Delivers the ordered job's ready chunks that are next in line (none while
    /// its caller, who lends the sink, is not the one driving).
    fn deliver_ready(&mut self, id: JobId, mut local: Option<&mut Local<'_>>) {
        loop {
            let Some(job) = self.jobs.get_mut(&id) else {
                return;
            };
            if !job.kind.can_deliver(id, local.as_deref()) {
                return;
            }
            let Some(ready) = job.ready.remove(&job.next_deliver) else {
                return;
            };
            job.next_deliver += 1;
            job.ready_bytes -= ready.payload.len();
            if !self.deliver_chunk(id, ready, local.as_deref_mut()) {
                return;
            }
        }
    }

    /// Hands one chunk to job `id`'s sink and counts it delivered; a sink that fails
    /// (a result that does not decode) fails the job: false then.
    fn deliver_chunk(
        &mut self,
        id: JobId,
        ready: Ready,
        mut local: Option<&mut Local<'_>>,
    ) -> bool {
        let Some(job) = self.jobs.get_mut(&id) else {
            return false;
        };
        job.delivered += 1;
        job.items_delivered += ready.items.len();
        job.tally.stats.items += ready.items.len() as u64;
        job.tally.stats.failed += ready.failed.len() as u64;
        if let Some(bar) = &job.bar {
            let stats = &job.tally.stats;
            bar.update(stats.items, stats.failed, stats.retries);
        }
        let start = ready.items.start;
        let delivering = Instant::now();
        let delivered = job.kind.deliver(id, local.as_deref_mut(), ready);
        job.tally.stats.output += delivering.elapsed();
        match delivered {
            Ok(()) => true,
            Err(e) => {
                self.fail_job(id, start, e, local);
                false
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
        match job.kind.ending() {
            Ending::Kept => {
                job.outcome = Some(outcome);
                self.completed = true;
            }
            Ending::Never => {
                // A stream does not end on its own; its items fail one by one.
                job.outcome = None;
            }
            Ending::Leaves => {
                let job = self.jobs.remove(&id).expect("found above");
                self.record_end(&job);
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
        job.kind.end(outcome);
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
