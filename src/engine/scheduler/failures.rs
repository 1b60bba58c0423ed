//! What the engine does when something fails: a worker lost with its chunks
//! (retries, poison items), an item past its deadline, a send that fails, a reply
//! that breaks the protocol, a job that fails, `terminate()`.

use std::ops::Range;
use std::process::ExitStatus;

use super::Engine;
use crate::engine::job::{InFlight, Job, JobId, Local};
use crate::engine::outcome::{died_of_memory, is_hang_up};
use crate::engine::trace::{Arg, Track};
use crate::error::Error;
use crate::wire::protocol::INIT_JOB;
use crate::wire::transport::Payload;

impl Engine {
    /// Kills the workers whose running item passed the task timeout; the item's job
    /// (or handle) fails with [`Error::TimedOut`], and the worker's other chunks are
    /// retried with its loss.
    pub(super) fn expire(&mut self, mut local: Option<&mut Local<'_>>) {
        let Some(timeout) = self.task_timeout else {
            return;
        };
        for (worker, flight) in self.workers.expire(timeout) {
            let id = flight.job;
            let Some(job) = self.jobs.get_mut(&id) else {
                self.workers.return_frame(flight.frame);
                continue;
            };
            job.in_flight = job.in_flight.saturating_sub(1);
            // Under a task timeout each chunk holds one item (see `send_chunk`).
            let item = flight.live_items().next();
            let (Some(item), false) = (item, job.ended()) else {
                self.workers.return_frame(flight.frame);
                continue;
            };
            job.tally.stats.timeouts += 1;
            tracing::warn!(
                job = id.0,
                item,
                worker,
                ?timeout,
                "task timed out; its worker is killed"
            );
            mark(&self.trace, worker, "task timeout", id, "item", item as u64);
            let error = |item| Error::TimedOut {
                item,
                worker,
                timeout,
            };
            if let Some(handles) = job.kind.handles() {
                handles.fail_items([item], error);
                self.completed = true;
                self.resend_without(id, worker, flight, item, local.as_deref_mut());
                continue;
            }
            if job.policy.goes_on() {
                job.failures.insert(item, error(item));
                self.resend_without(id, worker, flight, item, local.as_deref_mut());
                continue;
            }
            self.workers.return_frame(flight.frame);
            self.fail_job(id, item, error(item), local.as_deref_mut());
        }
    }

    /// A send of a chunk of job `id` to `worker` failed. A worker that died while
    /// it held nothing else is replaced and the chunk sent again; otherwise the
    /// worker is given up (its loss reports what it held) and an error other than
    /// a hang-up fails the job.
    pub(super) fn send_failed(
        &mut self,
        worker: usize,
        id: JobId,
        item: usize,
        source: std::io::Error,
        local: Option<&mut Local<'_>>,
    ) {
        if is_hang_up(&source) && self.workers.held(worker) == 1 {
            let flight = self.workers.unrecord_last(worker).expect("just recorded");
            let resent = self.workers.replace(worker).and_then(|()| {
                if self.send_context(id, worker) {
                    self.workers.send_chunk(worker, flight).map_err(|source| {
                        self.workers.kill(worker);
                        Error::Transport {
                            worker: Some(worker),
                            source,
                        }
                    })
                } else {
                    // Recorded nowhere: no process holds it; say so.
                    Err(Error::Transport {
                        worker: Some(worker),
                        source: std::io::Error::from(std::io::ErrorKind::BrokenPipe),
                    })
                }
            });
            if let Err(e) = resent {
                if let Some(job) = self.jobs.get_mut(&id) {
                    job.in_flight = job.in_flight.saturating_sub(1);
                }
                self.fail_job(id, item, e, local);
            }
            return;
        }
        if !is_hang_up(&source) {
            let error = Error::Transport {
                worker: Some(worker),
                source,
            };
            self.fail_job(id, item, error, local);
        }
        self.workers.kill(worker);
    }

    /// Sends chunk `flight` of job `id` again with `item` passed over (its failure
    /// is recorded already).
    pub(super) fn resend_without(
        &mut self,
        id: JobId,
        worker: usize,
        mut flight: InFlight,
        item: usize,
        local: Option<&mut Local<'_>>,
    ) {
        let Some(job) = self.jobs.get_mut(&id) else {
            self.workers.return_frame(flight.frame);
            return;
        };
        match flight.skip_item(item, job.task) {
            Ok(()) if flight.live_items().next().is_none() => {
                // Nothing left to run: the chunk is settled here.
                let (chunk, items) = (flight.chunk, flight.items.clone());
                self.workers.return_frame(flight.frame);
                if !job.kind.items_stand_alone() {
                    self.route(id, chunk, worker, items, Payload::empty(), local);
                }
            }
            Ok(()) => {
                job.tally.stats.retries += 1;
                tracing::debug!(job = id.0, item, "chunk sent again without its failed item");
                mark(
                    &self.trace,
                    worker,
                    "chunk sent again",
                    id,
                    "without",
                    item as u64,
                );
                job.retry.push_front(flight);
            }
            Err(source) => {
                self.workers.return_frame(flight.frame);
                let error = Error::EncodeItem { item, source };
                self.fail_job(id, item, error, local);
            }
        }
    }

    /// A chunk was lost with its worker. The item the worker was running, when the
    /// progress word names one, is charged with the death: the chunk is sent again
    /// while that item has died at most `retries` times (its frame was kept, and no
    /// reply of the dead worker can come, so it is still delivered exactly once).
    /// An item that dies more often is a poison item: it fails its job, or under a
    /// policy that goes on (and for `apply_async`) only itself, and the chunk is
    /// sent again without it. A death that names no item is charged to the chunk
    /// that had started; chunks queued behind it are sent again as they are.
    pub(super) fn chunk_lost(
        &mut self,
        mut flight: InFlight,
        loss: Loss,
        local: Option<&mut Local<'_>>,
    ) {
        let id = flight.job;
        let Some(job) = self.jobs.get_mut(&id) else {
            self.workers.return_frame(flight.frame);
            return;
        };
        job.in_flight = job.in_flight.saturating_sub(1);
        if loss.started {
            job.tally.stats.deaths += 1;
        }
        if job.ended() {
            self.workers.return_frame(flight.frame);
            return;
        }
        if let Some(ledger) = job.fold.as_mut()
            && ledger.flushes.remove(&flight.chunk).is_some()
        {
            // A flush lost with its worker: what that worker folded is sent again
            // (see the loss event), and its accumulator asked of no one.
            self.workers.return_frame(flight.frame);
            return;
        }
        let running = loss
            .last_item
            .and_then(|item| usize::try_from(item).ok())
            .filter(|&item| flight.runs(item));
        let goes_on = job.policy.goes_on() || job.kind.items_stand_alone();
        let error = |items: Range<usize>| loss.error(items, self.memory_limit);
        match running {
            Some(item) => {
                let deaths = flight.died_running(item);
                if deaths <= self.retries {
                    job.tally.stats.retries += 1;
                    tracing::info!(
                        job = id.0,
                        item,
                        deaths,
                        "chunk sent again after its worker was lost"
                    );
                    mark(
                        &self.trace,
                        loss.worker,
                        "chunk sent again",
                        id,
                        "item",
                        item as u64,
                    );
                    job.retry.push_back(flight);
                    return;
                }
                tracing::warn!(
                    job = id.0,
                    item,
                    deaths,
                    "poison item: it killed its worker every time it ran"
                );
                mark(
                    &self.trace,
                    loss.worker,
                    "poison item",
                    id,
                    "item",
                    item as u64,
                );
                if !goes_on {
                    self.workers.return_frame(flight.frame);
                    self.fail_job(id, item, error(item..item + 1), local);
                    return;
                }
                if let Some(handles) = job.kind.handles() {
                    handles.fail_items([item], |_| error(item..item + 1));
                    self.completed = true;
                } else {
                    job.failures.insert(item, error(item..item + 1));
                }
                self.resend_without(id, loss.worker, flight, item, local);
            }
            None if !loss.started => {
                // Queued behind the chunk that ran: it never started.
                job.retry.push_back(flight);
            }
            None if flight.attempts < self.retries => {
                job.tally.stats.retries += 1;
                tracing::info!(
                    job = id.0,
                    chunk = flight.chunk,
                    "chunk sent again after its worker was lost"
                );
                mark(
                    &self.trace,
                    loss.worker,
                    "chunk sent again",
                    id,
                    "chunk",
                    flight.chunk,
                );
                flight.attempts += 1;
                job.retry.push_back(flight);
            }
            None => {
                let items = flight.items.clone();
                if let Some(handles) = job.kind.handles() {
                    // Every handle of the chunk lost its answer.
                    handles.fail_items(flight.live_items(), |_| error(items.clone()));
                    self.workers.return_frame(flight.frame);
                    self.completed = true;
                    return;
                }
                if !goes_on {
                    self.workers.return_frame(flight.frame);
                    let start = items.start;
                    self.fail_job(id, start, error(items), local);
                    return;
                }
                // No item was named: each one still to run fails with the chunk.
                for item in flight.live_items() {
                    job.failures.insert(item, error(items.clone()));
                }
                let chunk = flight.chunk;
                self.workers.return_frame(flight.frame);
                self.route(id, chunk, loss.worker, items, Payload::empty(), local);
            }
        }
    }

    /// Ends a job with an error: it stops dispatching, its chunks still in flight
    /// are ignored, and workers running one of them are stopped (and replaced when
    /// work needs them) so that a stuck task cannot hold the pool.
    pub(super) fn fail_job(
        &mut self,
        id: JobId,
        _item: usize,
        error: Error,
        local: Option<&mut Local<'_>>,
    ) {
        if self.jobs.get(&id).is_none_or(Job::ended) {
            return;
        }
        self.finish(id, Err(error), local);
        self.stop_abandoned();
    }

    /// Stops every worker whose running chunk belongs to a job that has ended or
    /// left the table: nobody waits for that chunk, and it may never finish. The
    /// chunks of live jobs queued behind it are sent again with the worker's loss
    /// (they had not started). A process is killed; an inline worker's thread is
    /// abandoned.
    pub(super) fn stop_abandoned(&mut self) {
        for worker in 0..self.workers.slots() {
            let abandoned = self.workers.front(worker).is_some_and(|front| {
                front.job.0 != INIT_JOB && self.jobs.get(&front.job).is_none_or(Job::ended)
            });
            if abandoned {
                self.workers.kill(worker);
            }
        }
    }

    /// A worker sent something it should not have: the job of the chunk it was
    /// running fails with a protocol error and the worker is stopped (its loss
    /// reports the other chunks it held).
    pub(super) fn protocol_error(
        &mut self,
        worker: usize,
        generation: u64,
        reason: String,
        local: Option<&mut Local<'_>>,
    ) {
        if !self.workers.is_current(worker, generation) {
            return;
        }
        let front = self.workers.front(worker).map(|f| (f.job, f.items.start));
        if let Some((job, item)) = front {
            self.fail_job(job, item, Error::Protocol { worker, reason }, local);
        }
        self.workers.kill(worker);
    }

    /// `terminate()`: every job fails with [`Error::Terminated`] and every worker
    /// is stopped now.
    pub(crate) fn terminate(&mut self) {
        self.terminated = true;
        let ids: Vec<JobId> = self.jobs.keys().copied().collect();
        for id in ids {
            let job = self.jobs.get_mut(&id).expect("listed above");
            if let Some(handles) = job.kind.handles() {
                handles.fail_all(|| Error::Terminated);
                self.completed = true;
                continue;
            }
            self.finish(id, Err(Error::Terminated), None);
        }
        self.workers.kill_all();
    }

    /// The wait for replies failed: no job can go on.
    pub(super) fn fail_everything(&mut self, error: &Error) {
        let ids: Vec<JobId> = self.jobs.keys().copied().collect();
        for id in ids {
            let copy = || Error::Transport {
                worker: None,
                source: std::io::Error::other(error.to_string()),
            };
            let job = self.jobs.get_mut(&id).expect("listed above");
            if let Some(handles) = job.kind.handles() {
                handles.fail_all(copy);
                continue;
            }
            self.finish(id, Err(copy()), None);
        }
        self.completed = true;
    }
}

/// How a worker was lost, for the chunks it held.
pub(super) struct Loss {
    pub(super) worker: usize,
    pub(super) status: Option<ExitStatus>,
    /// The item its progress word named, if any.
    pub(super) last_item: Option<u64>,
    /// Whether this chunk is the one the worker had started.
    pub(super) started: bool,
}

impl Loss {
    /// The error of `items`, lost with the worker.
    pub(super) fn error(&self, items: Range<usize>, memory_limit: Option<u64>) -> Error {
        match (memory_limit, died_of_memory(self.status)) {
            (Some(limit), true) => Error::MemoryLimit {
                worker: self.worker,
                items,
                limit,
                status: self.status,
            },
            _ => Error::WorkerExited {
                worker: self.worker,
                items,
                status: self.status,
            },
        }
    }
}

/// Marks on `worker`'s track of the pool's trace, if it has one, what happened to a
/// chunk of `job`, with the item (or chunk) it concerns.
fn mark(trace: &Option<Track>, worker: usize, name: &str, job: JobId, key: &str, value: u64) {
    if let Some(trace) = trace {
        trace.instant(
            Some(worker),
            name,
            &[
                ("job", Arg::Num(job.0 as f64)),
                (key, Arg::Num(value as f64)),
            ],
        );
    }
}
