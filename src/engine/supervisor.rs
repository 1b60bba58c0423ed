//! The workers' side of the engine: who is alive, what each holds, when to replace one.
//!
//! Each worker slot has at most one process (a thread for the inline backend), known
//! by its generation, and a queue of the chunks sent to it and not yet answered.
//! Each record keeps its frame until the reply arrives, so a chunk can be sent again.
//! Workers are replaced here: lost ones when work needs them, and, with
//! `max_tasks_per_worker`, a worker that has been given its last task is replaced
//! by a fresh process at once, while it finishes what it holds.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::engine::backend::WorkerSet;
use crate::engine::job::{InFlight, JobId};
use crate::error::Result;
use crate::shared::region::RegionHandle;
use crate::wire::protocol::{self, ChunkHeader, INIT_JOB, Request, TaskRef};
use crate::wire::transport::FrameBuf;

/// Chunks a worker may hold at once: one running, one queued behind it, so a worker
/// never waits for the parent between chunks. A queued frame fits the socket's
/// send buffer (one packet), so a send never waits for a busy worker.
pub(crate) const CREDIT: usize = 2;

/// Largest frame buffer kept for reuse.
const KEEP_FRAME: usize = 4 << 20;

#[derive(Default)]
struct SlotState {
    /// The process believed to be in the slot; `None` once its loss was handled.
    generation: Option<u64>,
    in_flight: VecDeque<InFlight>,
    /// Jobs whose context value this worker holds.
    contexts: Vec<JobId>,
    /// Items sent to this process.
    tasks: usize,
    /// Takes no new work: given its last task (replaced already, stopped once it
    /// has answered), or stopped.
    retiring: bool,
    /// Since when the first chunk of `in_flight` has been running.
    front_since: Option<Instant>,
    /// The chunk that was running was taken away when it passed its deadline (the
    /// process is being killed): none of `in_flight` has started.
    front_taken: bool,
}

/// The pool's workers.
pub(crate) struct Supervisor {
    pub(crate) backend: WorkerSet,
    slots: Vec<SlotState>,
    /// How many workers should be serving.
    workers: usize,
    max_tasks: Option<usize>,
    /// The initializer and its encoded argument, run first in every new worker, with
    /// the `map_file` regions the argument names (see `ChunkHeader::unsealed`).
    init: Option<(TaskRef, Vec<u8>, Vec<RegionHandle>)>,
    frames: Vec<FrameBuf>,
    /// Workers started since the pool was built (replacements included).
    pub(crate) started: u64,
    /// Time spent starting processes, by slot (the pool's own start included).
    starting: Vec<Duration>,
    /// Processes started and not yet reported: slot, when, how long it took.
    starts: Vec<Start>,
}

/// A worker process started: its slot, when starting began, how long it took.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Start {
    pub(crate) worker: usize,
    pub(crate) at: Instant,
    pub(crate) took: Duration,
    pub(crate) pid: Option<u32>,
}

impl Supervisor {
    /// The supervisor of workers that `backend` started, beginning at `began`.
    pub(crate) fn new(
        backend: WorkerSet,
        max_tasks: Option<usize>,
        init: Option<(TaskRef, Vec<u8>, Vec<RegionHandle>)>,
        began: Instant,
    ) -> Self {
        let workers = backend.slots();
        let took = began.elapsed();
        let pids = backend.pids();
        let mut supervisor = Self {
            starting: vec![took; workers],
            starts: (0..workers)
                .map(|worker| Start {
                    worker,
                    at: began,
                    took,
                    pid: pids.get(worker).copied().flatten(),
                })
                .collect(),
            slots: (0..workers).map(|_| SlotState::default()).collect(),
            backend,
            workers,
            max_tasks,
            init,
            frames: Vec::new(),
            started: workers as u64,
        };
        for worker in 0..workers {
            supervisor.slots[worker].generation = supervisor.backend.generation(worker);
            supervisor.send_init(worker);
        }
        supervisor
    }

    /// A frame buffer to build a request in.
    pub(crate) fn take_frame(&mut self) -> FrameBuf {
        let mut frame = self.frames.pop().unwrap_or_else(|| {
            FrameBuf::with_capacity(crate::engine::chunker::target_chunk_bytes() + 1024)
        });
        frame.clear();
        frame
    }

    /// Gives a frame buffer back for reuse.
    pub(crate) fn return_frame(&mut self, mut frame: FrameBuf) {
        if frame.body().capacity() <= KEEP_FRAME && self.frames.len() < 4 * CREDIT * self.workers {
            self.frames.push(frame);
        }
    }

    /// The generation of the process believed to be in the slot.
    pub(crate) fn generation(&self, worker: usize) -> Option<u64> {
        self.slots.get(worker)?.generation
    }

    /// Whether the slot's process is alive and takes new work.
    fn serving(&self, worker: usize) -> bool {
        let slot = &self.slots[worker];
        !slot.retiring
            && slot.generation.is_some()
            && self.backend.generation(worker) == slot.generation
    }

    /// The serving worker with the most free credit, the lowest-numbered among
    /// equals: a worker that just replied is still polling for work, so small jobs
    /// go to the same warm worker instead of waking a sleeping one.
    pub(crate) fn pick(&self) -> Option<usize> {
        (0..self.slots.len())
            .filter(|&w| self.serving(w) && self.slots[w].in_flight.len() < CREDIT)
            .min_by_key(|&w| self.slots[w].in_flight.len())
    }

    /// How many more items `worker` may be given before it is replaced.
    pub(crate) fn budget(&self, worker: usize) -> usize {
        match self.max_tasks {
            Some(max) => max.saturating_sub(self.slots[worker].tasks).max(1),
            None => usize::MAX,
        }
    }

    /// Starts workers until as many serve as the pool should have. A slot is
    /// reused only once its last process's loss has been handled.
    pub(crate) fn revive(&mut self) -> Result<()> {
        loop {
            let serving = (0..self.slots.len()).filter(|&w| self.serving(w)).count();
            if serving >= self.workers {
                return Ok(());
            }
            let free = (0..self.slots.len()).find(|&w| {
                let slot = &self.slots[w];
                slot.generation.is_none() && slot.in_flight.is_empty()
            });
            let worker = free.unwrap_or(self.slots.len());
            if worker == self.slots.len() {
                self.slots.push(SlotState::default());
            }
            let generation = self.restart(worker)?;
            self.slots[worker] = SlotState {
                generation: Some(generation),
                ..SlotState::default()
            };
            self.send_init(worker);
        }
    }

    /// Starts a process in slot `worker`, timing it.
    fn restart(&mut self, worker: usize) -> Result<u64> {
        let at = Instant::now();
        let generation = self.backend.restart(worker)?;
        let took = at.elapsed();
        self.started += 1;
        if self.starting.len() <= worker {
            self.starting.resize(worker + 1, Duration::ZERO);
        }
        self.starting[worker] += took;
        let pid = self.backend.pids().get(worker).copied().flatten();
        self.starts.push(Start {
            worker,
            at,
            took,
            pid,
        });
        Ok(generation)
    }

    /// Time spent starting processes so far, by slot.
    pub(crate) fn starting(&self) -> &[Duration] {
        &self.starting
    }

    /// The processes started since the last call.
    pub(crate) fn take_starts(&mut self) -> Vec<Start> {
        std::mem::take(&mut self.starts)
    }

    /// Sends the initializer (if the pool has one) as the first request of a new
    /// worker; its reply comes back as a chunk of [`INIT_JOB`].
    fn send_init(&mut self, worker: usize) {
        if self.init.is_none() {
            return;
        }
        let mut frame = self.take_frame();
        let (task, arg, unsealed) = self.init.as_ref().expect("checked above");
        let task = *task;
        frame.body().extend_from_slice(arg);
        let header = Request::Chunk(ChunkHeader {
            job: INIT_JOB,
            chunk: 0,
            first_item: 0,
            count: 1,
            task,
            skip: Vec::new(),
            unsealed: unsealed.clone(),
        });
        if protocol::seal(&mut frame, &header).is_err() {
            // The argument was encoded and checked when the pool was built; a header
            // that does not encode is impossible, but a worker without its state
            // then says so to every task that needs it.
            return;
        }
        match self.backend.send(worker, &mut frame) {
            Ok(()) => self.slots[worker].in_flight.push_back(InFlight::new(
                JobId(INIT_JOB),
                0,
                0..1,
                frame,
            )),
            // Its loss event follows; replacing it starts the initializer again.
            Err(_) => self.kill(worker),
        }
    }

    /// Whether any worker still runs its initializer.
    pub(crate) fn initializing(&self) -> bool {
        self.slots
            .iter()
            .any(|s| s.in_flight.iter().any(|f| f.job == JobId(INIT_JOB)))
    }

    /// Sends a chunk and records it; on failure the record stays (the caller decides
    /// whether to resend or to give the worker up) and the error is returned.
    pub(crate) fn send_chunk(
        &mut self,
        worker: usize,
        mut flight: InFlight,
    ) -> std::io::Result<()> {
        let sent = self.backend.send(worker, &mut flight.frame);
        let items = flight.items.len();
        let slot = &mut self.slots[worker];
        if slot.in_flight.is_empty() {
            slot.front_since = Some(Instant::now());
        }
        slot.in_flight.push_back(flight);
        slot.tasks += items;
        if let Some(max) = self.max_tasks
            && slot.tasks >= max
        {
            slot.retiring = true;
        }
        sent
    }

    /// Takes the last record of `worker` back (its chunk was never delivered).
    pub(crate) fn unrecord_last(&mut self, worker: usize) -> Option<InFlight> {
        let slot = &mut self.slots[worker];
        let flight = slot.in_flight.pop_back()?;
        slot.tasks = slot.tasks.saturating_sub(flight.items.len());
        Some(flight)
    }

    /// How many chunks `worker` holds.
    pub(crate) fn held(&self, worker: usize) -> usize {
        self.slots[worker].in_flight.len()
    }

    /// Replaces a worker found dead while it held nothing: a fresh process in the
    /// same slot, its initializer sent.
    pub(crate) fn replace(&mut self, worker: usize) -> Result<()> {
        debug_assert!(self.slots[worker].in_flight.is_empty());
        let generation = self.restart(worker)?;
        self.slots[worker] = SlotState {
            generation: Some(generation),
            ..SlotState::default()
        };
        self.send_init(worker);
        Ok(())
    }

    /// Sends a small request (a context value or a `Forget`).
    pub(crate) fn send_request(
        &mut self,
        worker: usize,
        frame: &mut FrameBuf,
    ) -> std::io::Result<()> {
        self.backend.send(worker, frame)
    }

    pub(crate) fn has_context(&self, worker: usize, job: JobId) -> bool {
        self.slots[worker].contexts.contains(&job)
    }

    pub(crate) fn add_context(&mut self, worker: usize, job: JobId) {
        self.slots[worker].contexts.push(job);
    }

    /// Tells every worker holding the context value of `job` to drop it.
    pub(crate) fn forget_context(&mut self, job: JobId) {
        let holders: Vec<usize> = (0..self.slots.len())
            .filter(|&w| self.slots[w].contexts.contains(&job))
            .collect();
        if holders.is_empty() {
            return;
        }
        let mut frame = self.take_frame();
        if protocol::seal(&mut frame, &Request::Forget { job: job.0 }).is_ok() {
            for worker in holders {
                self.slots[worker].contexts.retain(|&j| j != job);
                // A worker that cannot be told is gone, and its contexts with it.
                let _ = self.backend.send(worker, &mut frame);
            }
        }
        self.return_frame(frame);
    }

    /// Tells every worker to drop what it holds for `job` (a fold job's
    /// accumulator, when the job ended without asking for it).
    pub(crate) fn forget_everywhere(&mut self, job: JobId) {
        let mut frame = self.take_frame();
        if protocol::seal(&mut frame, &Request::Forget { job: job.0 }).is_ok() {
            for worker in 0..self.slots.len() {
                if self.serving(worker) {
                    // A worker that cannot be told is gone, and its accumulator with it.
                    let _ = self.backend.send(worker, &mut frame);
                }
            }
        }
        self.return_frame(frame);
    }

    /// Takes the record of the chunk a reply answers; `None` for a reply that
    /// answers nothing this worker holds (stale generation, or a protocol error).
    pub(crate) fn answered(
        &mut self,
        worker: usize,
        generation: u64,
        job: JobId,
        chunk: u64,
    ) -> Option<InFlight> {
        let slot = self.slots.get_mut(worker)?;
        if slot.generation != Some(generation) {
            return None;
        }
        let at = slot
            .in_flight
            .iter()
            .position(|f| f.job == job && f.chunk == chunk)?;
        let answered = slot.in_flight.remove(at);
        if at == 0 {
            // The worker takes the next chunk now.
            slot.front_since = (!slot.in_flight.is_empty()).then(Instant::now);
        }
        answered
    }

    /// When the first running chunk of any worker passes `timeout`.
    pub(crate) fn next_expiry(&self, timeout: Duration) -> Option<Instant> {
        self.slots
            .iter()
            .filter(|s| s.in_flight.front().is_some_and(|f| f.job.0 != INIT_JOB))
            .filter_map(|s| s.front_since)
            .min()
            .map(|since| since + timeout)
    }

    /// Takes the running chunk of every worker whose chunk has run past `timeout`
    /// and stops that worker; its other chunks are reported with its loss.
    pub(crate) fn expire(&mut self, timeout: Duration) -> Vec<(usize, InFlight)> {
        let now = Instant::now();
        let mut expired = Vec::new();
        for worker in 0..self.slots.len() {
            let slot = &mut self.slots[worker];
            let overdue = slot.front_since.is_some_and(|since| now >= since + timeout)
                && slot.in_flight.front().is_some_and(|f| f.job.0 != INIT_JOB);
            if overdue && let Some(flight) = slot.in_flight.pop_front() {
                slot.front_since = None;
                slot.front_taken = true;
                expired.push((worker, flight));
                self.kill(worker);
            }
        }
        expired
    }

    /// Whether an event from `generation` concerns the slot's current process.
    pub(crate) fn is_current(&self, worker: usize, generation: u64) -> bool {
        self.slots
            .get(worker)
            .is_some_and(|s| s.generation == Some(generation))
    }

    /// Stops a worker that has answered everything and was given its last task.
    pub(crate) fn retire_if_done(&mut self, worker: usize) {
        let slot = &self.slots[worker];
        if slot.retiring && slot.in_flight.is_empty() && self.backend.generation(worker).is_some() {
            self.kill(worker);
        }
    }

    /// Handles the loss of a worker's process: the chunks it held, and whether the
    /// first of them had started (it had not when the chunk that was running was
    /// taken away at its deadline). `None` when the event concerns an earlier
    /// process of the slot.
    pub(crate) fn lost(&mut self, worker: usize, generation: u64) -> Option<(Vec<InFlight>, bool)> {
        let slot = self.slots.get_mut(worker)?;
        if slot.generation != Some(generation) {
            return None;
        }
        let chunks = slot.in_flight.drain(..).collect();
        let front_started = !slot.front_taken;
        *slot = SlotState::default();
        Some((chunks, front_started))
    }

    /// Whether `worker`'s running chunk was taken away at its deadline: a late
    /// reply for it is no protocol error.
    pub(crate) fn front_taken(&self, worker: usize) -> bool {
        self.slots.get(worker).is_some_and(|s| s.front_taken)
    }

    /// Stops a worker now and takes it out of service; its loss event reports the
    /// chunks it held.
    pub(crate) fn kill(&mut self, worker: usize) {
        self.slots[worker].retiring = true;
        self.backend.kill(worker);
    }

    /// The first chunk `worker` holds: the one it is running.
    pub(crate) fn front(&self, worker: usize) -> Option<&InFlight> {
        self.slots[worker].in_flight.front()
    }

    /// Slots (some may be empty).
    pub(crate) fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Whether any chunk is in flight.
    pub(crate) fn busy(&self) -> bool {
        self.slots.iter().any(|s| !s.in_flight.is_empty())
    }

    /// Process ids of the serving workers.
    pub(crate) fn pids(&self) -> Vec<u32> {
        let pids = self.backend.pids();
        (0..self.slots.len())
            .filter(|&w| self.serving(w))
            .filter_map(|w| pids.get(w).copied().flatten())
            .collect()
    }

    /// Stops every worker (terminate, or the pool's drop).
    pub(crate) fn kill_all(&mut self) {
        for worker in 0..self.slots.len() {
            if self.slots[worker].generation.is_some() {
                self.kill(worker);
            }
        }
    }
}
