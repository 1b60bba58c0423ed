//! Where workers live: separate processes (the default), threads in this process, or
//! the ranks of an MPI job.
//!
//! All speak the same protocol; the supervisor sees only [`WorkerSet`]. Workers are
//! numbered by slot; a slot's current process has a generation, so an event from an
//! earlier process of a reused slot is never taken for the current one's.

mod inline;
#[cfg(feature = "mpi")]
pub(crate) mod mpi;
pub(crate) mod process;

use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::Result;
use crate::os::spawn::SpawnOptions;
use crate::wire::transport::{Frame, FrameBuf};

/// Something that happened to one worker, or to the wait itself.
pub(crate) enum Event {
    /// A reply frame.
    Reply {
        worker: usize,
        generation: u64,
        frame: Frame,
    },
    /// The worker is gone (process exited, or its thread ended); it has been reaped.
    /// The status is `None` when someone else reaped it first.
    Lost {
        worker: usize,
        generation: u64,
        status: Option<ExitStatus>,
        /// The item it last started (from its progress word), when known.
        last_item: Option<u64>,
    },
    /// The worker sent something that is not a frame; it can no longer be trusted.
    Broken {
        worker: usize,
        generation: u64,
        reason: String,
    },
    /// Someone called [`Waker::wake`].
    Woken,
    /// The deadline passed with nothing to report.
    TimedOut,
}

/// Where a pool's workers run (see [`PoolBuilder::backend`](crate::PoolBuilder::backend)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Backend {
    /// Worker processes on this machine (the default).
    Process,
    /// Threads in this process speaking the same protocol: no isolation, for tests
    /// and debugging.
    Inline,
    /// The serving ranks of the MPI job this program runs in, each running its share
    /// of the workers as processes on its own node. Needs the crate feature `mpi`;
    /// the default under an MPI launcher. In a program that is not an MPI job of
    /// more than one rank, the workers run on this machine as with
    /// [`Backend::Process`].
    Mpi,
}

/// Overrides the default worker count (`PoolBuilder::workers` wins over it).
pub(crate) const WORKERS_ENV: &str = "MULTIPROC_WORKERS";

/// Chooses the default backend: `process`, `inline` or `mpi`.
pub(crate) const BACKEND_ENV: &str = "MULTIPROC_BACKEND";

/// The workers a pool gets by default in an MPI job of more than one rank: what the
/// serving ranks offer together (each its CPUs, or its `MULTIPROC_WORKERS`); `None`
/// outside one.
pub(crate) fn mpi_default_workers() -> Option<usize> {
    #[cfg(feature = "mpi")]
    if let Some(job) = mpi::job() {
        return Some(job.cpus[1..].iter().sum::<usize>().max(1));
    }
    None
}

/// How workers are started.
#[derive(Debug, Clone)]
pub(crate) struct StartOptions {
    pub(crate) spawn: SpawnOptions,
    pub(crate) start_timeout: Duration,
    /// Test-only fault injection: kill the worker in slot `.0` just before the
    /// request numbered `.1` (counted from 0 over all requests to that slot's
    /// processes) is sent to it.
    pub(crate) kill_before_send: Option<(usize, u64)>,
    /// Test-only fault injection: replace the reply numbered `.1` (counted from 0)
    /// from slot `.0` by bytes that are not a frame of the protocol.
    pub(crate) corrupt_reply: Option<(usize, u64)>,
    /// Test-only fault injection: starting a worker process fails (as it does when
    /// the system is out of processes or descriptors) once this many have started.
    pub(crate) fail_starts_after: Option<u64>,
}

/// Interrupts a thread waiting in [`WorkerSet::next_event`], from any thread.
#[derive(Clone)]
pub(crate) struct Waker(Arc<dyn Fn() + Send + Sync>);

impl Waker {
    pub(crate) fn wake(&self) {
        (self.0)();
    }
}

/// The workers of one pool.
pub(crate) enum WorkerSet {
    Process(Box<process::ProcessBackend>),
    Inline(inline::InlineBackend),
    #[cfg(feature = "mpi")]
    Mpi(Box<mpi::MpiBackend>),
}

/// Dispatches a call to the backend in use.
macro_rules! each {
    ($self:expr, $b:ident => $call:expr) => {
        match $self {
            WorkerSet::Process($b) => $call,
            WorkerSet::Inline($b) => $call,
            #[cfg(feature = "mpi")]
            WorkerSet::Mpi($b) => $call,
        }
    };
}

impl WorkerSet {
    /// Starts `workers` workers in slots `0..workers`.
    pub(crate) fn start(backend: Backend, workers: usize, options: StartOptions) -> Result<Self> {
        Ok(match backend {
            Backend::Inline => WorkerSet::Inline(inline::InlineBackend::start(workers)?),
            #[cfg(feature = "mpi")]
            Backend::Mpi if mpi::job().is_some() => {
                let job = mpi::job().expect("checked just above");
                WorkerSet::Mpi(Box::new(mpi::MpiBackend::start(job, workers, options)?))
            }
            Backend::Process | Backend::Mpi => {
                WorkerSet::Process(Box::new(process::ProcessBackend::start(workers, options)?))
            }
        })
    }

    /// The number of slots, live or not.
    pub(crate) fn slots(&self) -> usize {
        each!(self, b => b.slots())
    }

    /// The generation of the slot's current worker, `None` when it has none.
    pub(crate) fn generation(&self, worker: usize) -> Option<u64> {
        each!(self, b => b.generation(worker))
    }

    /// Starts a fresh worker in slot `worker` (which may be one past the last slot),
    /// after forgetting any process it had; returns its generation.
    pub(crate) fn restart(&mut self, worker: usize) -> Result<u64> {
        each!(self, b => b.restart(worker))
    }

    /// Stops a worker at once; [`WorkerSet::next_event`] reports it as lost, after
    /// any reply already received from it. A thread cannot be stopped: it is
    /// abandoned and its later messages are ignored.
    pub(crate) fn kill(&mut self, worker: usize) {
        each!(self, b => b.kill(worker))
    }

    /// Sends a request frame. `Ok` means queued, not delivered: a worker that dies
    /// afterwards is reported by [`WorkerSet::next_event`].
    pub(crate) fn send(&mut self, worker: usize, frame: &mut FrameBuf) -> std::io::Result<()> {
        each!(self, b => b.send(worker, frame))
    }

    /// Blocks until some worker replies or is lost, the waker is called, or the
    /// deadline passes. `poll` asks to poll briefly before blocking, when a reply is
    /// expected soon (see `os::poll::POLL_BEFORE_BLOCKING`).
    pub(crate) fn next_event(&mut self, poll: bool, deadline: Option<Instant>) -> Result<Event> {
        each!(self, b => b.next_event(poll, deadline))
    }

    /// What interrupts [`WorkerSet::next_event`] from another thread.
    pub(crate) fn waker(&self) -> Waker {
        each!(self, b => b.waker())
    }

    /// Process ids of the workers by slot (`None` for an empty slot); empty for
    /// threads.
    pub(crate) fn pids(&self) -> Vec<Option<u32>> {
        match self {
            WorkerSet::Process(b) => b.pids(),
            #[cfg(feature = "mpi")]
            WorkerSet::Mpi(b) => b.pids(),
            WorkerSet::Inline(_) => Vec::new(),
        }
    }

    /// Stops every worker now: closes their channels, gives each a moment to exit
    /// and kills the rest, and reaps them. Nothing is reported as lost.
    pub(crate) fn shutdown(&mut self) {
        each!(self, b => b.shutdown())
    }
}
