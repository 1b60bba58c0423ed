//! Workers on the ranks of an MPI job: rank 0 drives, the other ranks serve.
//!
//! A pool's workers are spread over the serving ranks, each rank running its share as
//! worker processes of its own node: worker `w` of a job with `S` serving ranks is
//! local worker `w / S` of rank `1 + w % S`. To the supervisor this backend looks like
//! the process backend: frames go out to a worker and come back, and a worker that
//! dies is reported lost with its wait status. A rank that fails ends the job with
//! an error naming the rank (MPI's fail-stop model: a job cannot lose a rank and go on).

pub(crate) mod rank;
pub(crate) mod world;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use self::world::{Envelope, Idle, Job, Received};
use super::{Event, StartOptions, Waker};
use crate::error::{Error, Result};
use crate::wire::transport::{Frame, FrameBuf};

pub(crate) use self::world::{init, job};

/// Pool numbers, unique in this process: messages for different pools share the
/// world communicator.
static NEXT_POOL: AtomicU64 = AtomicU64::new(1);

/// Messages received for pools other than the one whose thread received them.
static MAILBOXES: Mutex<Option<HashMap<u64, VecDeque<Received>>>> = Mutex::new(None);

/// Where global worker `worker` runs: its rank and its local slot there.
pub(crate) fn place(job: &Job, worker: usize) -> (usize, u32) {
    let serving = job.size - 1;
    let local = u32::try_from(worker / serving).unwrap_or(u32::MAX);
    (1 + worker % serving, local)
}

/// The worker a rank's local slot is.
fn worker_of(job: &Job, rank: usize, local: usize) -> usize {
    local * (job.size - 1) + (rank - 1)
}

/// How a worker is named in error messages under MPI: its rank, local slot and node.
pub(crate) fn describe_worker(worker: usize) -> Option<String> {
    let job = job()?;
    let (rank, local) = place(job, worker);
    Some(format!("{}, local worker {local}", job.describe(rank)))
}

struct Slot {
    generation: u64,
    /// The generation the serving rank gave its local worker.
    remote: u64,
    pid: u32,
    killed: bool,
}

struct Wake {
    flag: AtomicBool,
    waiter: Mutex<Option<Thread>>,
}

pub(crate) struct MpiBackend {
    job: &'static Job,
    pool: u64,
    slots: Vec<Option<Slot>>,
    pending: VecDeque<Event>,
    next_generation: u64,
    wake: Arc<Wake>,
    interrupt_seen: bool,
    start_timeout: Duration,
    /// Ranks that have this pool open.
    opened: Vec<usize>,
}

impl MpiBackend {
    pub(crate) fn start(job: &'static Job, workers: usize, options: StartOptions) -> Result<Self> {
        let pool = NEXT_POOL.fetch_add(1, Ordering::Relaxed);
        MAILBOXES
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(HashMap::new)
            .insert(pool, VecDeque::new());
        let mut backend = Self {
            job,
            pool,
            slots: (0..workers).map(|_| None).collect(),
            pending: VecDeque::new(),
            next_generation: 1,
            wake: Arc::new(Wake {
                flag: AtomicBool::new(false),
                waiter: Mutex::new(None),
            }),
            interrupt_seen: false,
            start_timeout: options.start_timeout,
            opened: Vec::new(),
        };
        let mut counts = vec![0u32; job.size];
        for worker in 0..workers {
            counts[place(job, worker).0] += 1;
        }
        for (rank, &count) in counts.iter().enumerate().filter(|(_, c)| **c > 0) {
            job.send(
                rank,
                &Envelope::Open {
                    pool,
                    workers: count,
                    inherit_output: options.spawn.inherit_output,
                    memory_limit: options.spawn.memory_limit,
                    start_timeout: options.start_timeout,
                },
                &[],
            );
            backend.opened.push(rank);
        }
        let mut waiting: Vec<usize> = backend.opened.clone();
        let deadline = Instant::now() + options.start_timeout + ANSWER_GRACE;
        while !waiting.is_empty() {
            let received = backend.answer(deadline, |e| matches!(e, Envelope::Opened { .. }))?;
            let Envelope::Opened { started, .. } = received.envelope else {
                unreachable!("answer returns only what it was asked for");
            };
            let rank = received.from;
            waiting.retain(|&r| r != rank);
            let started = started.map_err(|reason| Error::Mpi {
                rank: Some(rank),
                reason: format!(
                    "{} could not start its workers: {reason}",
                    job.describe(rank)
                ),
            })?;
            for (local, (remote, pid)) in started.into_iter().enumerate() {
                let worker = worker_of(job, rank, local);
                let generation = backend.next_generation;
                backend.next_generation += 1;
                if let Some(slot) = backend.slots.get_mut(worker) {
                    *slot = Some(Slot {
                        generation,
                        remote,
                        pid,
                        killed: false,
                    });
                }
            }
        }
        Ok(backend)
    }

    pub(crate) fn slots(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn generation(&self, worker: usize) -> Option<u64> {
        self.slots.get(worker)?.as_ref().map(|s| s.generation)
    }

    /// Process ids of the workers on their own nodes, by slot.
    pub(crate) fn pids(&self) -> Vec<Option<u32>> {
        self.slots
            .iter()
            .map(|s| s.as_ref().filter(|s| !s.killed).map(|s| s.pid))
            .collect()
    }

    pub(crate) fn waker(&self) -> Waker {
        let wake = Arc::clone(&self.wake);
        Waker(Arc::new(move || {
            wake.flag.store(true, Ordering::Release);
            if let Some(waiter) = wake
                .waiter
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
            {
                waiter.unpark();
            }
        }))
    }

    pub(crate) fn restart(&mut self, worker: usize) -> Result<u64> {
        if worker >= self.slots.len() {
            self.slots.resize_with(worker + 1, || None);
        }
        self.slots[worker] = None;
        let (rank, local) = place(self.job, worker);
        let refused = |reason: String| Error::Spawn {
            worker,
            source: io::Error::other(format!("on {}: {reason}", self.job.describe(rank))),
        };
        if !self.opened.contains(&rank) {
            // A worker past the ones the pool started, on a rank that has none of
            // this pool's yet.
            self.job.send(
                rank,
                &Envelope::Open {
                    pool: self.pool,
                    workers: 0,
                    inherit_output: true,
                    memory_limit: None,
                    start_timeout: self.start_timeout,
                },
                &[],
            );
            self.opened.push(rank);
            let deadline = Instant::now() + self.start_timeout + ANSWER_GRACE;
            let received = self.answer(deadline, |e| matches!(e, Envelope::Opened { .. }))?;
            if let Envelope::Opened {
                started: Err(reason),
                ..
            } = received.envelope
            {
                return Err(refused(reason));
            }
        }
        self.job.send(
            rank,
            &Envelope::Restart {
                pool: self.pool,
                local,
            },
            &[],
        );
        let deadline = Instant::now() + self.start_timeout + ANSWER_GRACE;
        let received = self.answer(
            deadline,
            |e| matches!(e, Envelope::Restarted { local: l, .. } if *l == local),
        )?;
        let Envelope::Restarted { started, .. } = received.envelope else {
            unreachable!("answer returns only what it was asked for");
        };
        let (remote, pid) = started.map_err(refused)?;
        let generation = self.next_generation;
        self.next_generation += 1;
        self.slots[worker] = Some(Slot {
            generation,
            remote,
            pid,
            killed: false,
        });
        Ok(generation)
    }

    pub(crate) fn kill(&mut self, worker: usize) {
        if let Some(slot) = self.slots.get_mut(worker).and_then(Option::as_mut)
            && !slot.killed
        {
            slot.killed = true;
            let (rank, local) = place(self.job, worker);
            self.job.send(
                rank,
                &Envelope::Kill {
                    pool: self.pool,
                    local,
                },
                &[],
            );
        }
    }

    pub(crate) fn send(&mut self, worker: usize, frame: &mut FrameBuf) -> io::Result<()> {
        match self.slots.get(worker) {
            Some(Some(slot)) if !slot.killed => {
                let (rank, local) = place(self.job, worker);
                self.job.send(
                    rank,
                    &Envelope::Request {
                        pool: self.pool,
                        local,
                    },
                    frame.body_bytes(),
                );
                Ok(())
            }
            _ => Err(io::Error::from(io::ErrorKind::NotConnected)),
        }
    }

    pub(crate) fn next_event(&mut self, poll: bool, deadline: Option<Instant>) -> Result<Event> {
        let mut idle = Idle::default();
        if !poll {
            idle.skip_polling();
        }
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(event);
            }
            if let Some(received) = self.next_message() {
                self.absorb(received)?;
                idle.reset();
                continue;
            }
            if self.wake.flag.swap(false, Ordering::AcqRel) {
                return Ok(Event::Woken);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(Event::TimedOut);
            }
            if crate::os::interrupt::interrupted() {
                if !self.interrupt_seen {
                    self.interrupt_seen = true;
                    return Ok(Event::Woken);
                }
            } else {
                self.interrupt_seen = false;
            }
            let pause = idle.next();
            if pause.is_zero() {
                idle.pause();
                continue;
            }
            idle.pause_counted();
            *self.wake.waiter.lock().unwrap_or_else(|p| p.into_inner()) = Some(thread::current());
            if !self.wake.flag.load(Ordering::Acquire) {
                let pause = deadline.map_or(pause, |d| {
                    pause.min(d.saturating_duration_since(Instant::now()))
                });
                thread::park_timeout(pause);
            }
            *self.wake.waiter.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    pub(crate) fn shutdown(&mut self) {
        for &rank in &self.opened {
            self.job
                .send(rank, &Envelope::Close { pool: self.pool }, &[]);
        }
        self.opened.clear();
        self.slots.iter_mut().for_each(|s| *s = None);
        self.pending.clear();
    }

    /// The next message for this pool: from its mailbox, or from MPI (messages for
    /// other pools go to theirs).
    fn next_message(&mut self) -> Option<Received> {
        let mut boxes = MAILBOXES.lock().unwrap_or_else(|p| p.into_inner());
        let boxes = boxes.get_or_insert_with(HashMap::new);
        if let Some(received) = boxes.get_mut(&self.pool).and_then(VecDeque::pop_front) {
            return Some(received);
        }
        while let Some(received) = self.job.try_receive() {
            match pool_of(&received.envelope) {
                Some(pool) if pool != self.pool => {
                    // A closed pool's late messages are dropped.
                    if let Some(mailbox) = boxes.get_mut(&pool) {
                        mailbox.push_back(received);
                    }
                }
                _ => return Some(received),
            }
        }
        None
    }

    /// Waits for the answer `wanted` picks, turning every other message into events.
    fn answer(
        &mut self,
        deadline: Instant,
        wanted: impl Fn(&Envelope) -> bool,
    ) -> Result<Received> {
        let mut idle = Idle::default();
        loop {
            if let Some(received) = self.next_message() {
                if wanted(&received.envelope) {
                    return Ok(received);
                }
                self.absorb(received)?;
                idle.reset();
                continue;
            }
            if Instant::now() >= deadline {
                return Err(Error::Mpi {
                    rank: None,
                    reason: format!(
                        "no answer from the serving ranks within {:?} while starting \
                         workers",
                        self.start_timeout + ANSWER_GRACE
                    ),
                });
            }
            idle.pause();
        }
    }

    /// Turns a message for this pool into an event.
    fn absorb(&mut self, received: Received) -> Result<()> {
        let rank = received.from;
        let current = |slots: &[Option<Slot>], local: u32, remote: u64| {
            let worker = worker_of(self.job, rank, local as usize);
            slots
                .get(worker)
                .and_then(Option::as_ref)
                .filter(|s| s.remote == remote)
                .map(|s| (worker, s.generation))
        };
        match &received.envelope {
            Envelope::Reply {
                local, generation, ..
            } => {
                if let Some((worker, generation)) = current(&self.slots, *local, *generation) {
                    let frame = Frame::Inline(received.body().to_vec());
                    self.pending.push_back(Event::Reply {
                        worker,
                        generation,
                        frame,
                    });
                }
            }
            Envelope::Lost {
                local,
                generation,
                status,
                last_item,
                ..
            } => {
                if let Some((worker, generation)) = current(&self.slots, *local, *generation) {
                    self.slots[worker] = None;
                    self.pending.push_back(Event::Lost {
                        worker,
                        generation,
                        status: status.map(ExitStatus::from_raw),
                        last_item: *last_item,
                    });
                }
            }
            Envelope::Broken {
                local,
                generation,
                reason,
                ..
            } => {
                if let Some((worker, generation)) = current(&self.slots, *local, *generation) {
                    self.pending.push_back(Event::Broken {
                        worker,
                        generation,
                        reason: reason.clone(),
                    });
                }
            }
            Envelope::Failed { reason } => {
                return Err(Error::Mpi {
                    rank: Some(rank),
                    reason: reason.clone(),
                });
            }
            // Late answers to a start that gave up already.
            Envelope::Opened { .. } | Envelope::Restarted { .. } => {}
            other => {
                return Err(Error::Mpi {
                    rank: Some(rank),
                    reason: format!("{} sent rank 0 {other:?}", self.job.describe(rank)),
                });
            }
        }
        Ok(())
    }
}

impl Drop for MpiBackend {
    fn drop(&mut self) {
        self.shutdown();
        if let Some(boxes) = MAILBOXES.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            boxes.remove(&self.pool);
        }
    }
}

/// How much longer than its own start timeout rank 0 waits for a rank to answer.
const ANSWER_GRACE: Duration = Duration::from_secs(5);

/// The pool a message from a serving rank is about, if any.
fn pool_of(envelope: &Envelope) -> Option<u64> {
    match envelope {
        Envelope::Opened { pool, .. }
        | Envelope::Restarted { pool, .. }
        | Envelope::Reply { pool, .. }
        | Envelope::Lost { pool, .. }
        | Envelope::Broken { pool, .. } => Some(*pool),
        _ => None,
    }
}
