//! Where workers live: separate processes (the default) or threads in this process.
//!
//! Both speak the same protocol; the supervisor sees only this enum. Workers are
//! numbered by slot; a slot's current process has a generation, so an event from an
//! earlier process of a reused slot is never taken for the current one's.

mod inline;
mod process;

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

/// Interrupts a thread waiting in [`Backend::next_event`], from any thread.
#[derive(Clone)]
pub(crate) struct Waker(Arc<dyn Fn() + Send + Sync>);

impl Waker {
    pub(crate) fn wake(&self) {
        (self.0)();
    }
}

/// The workers of one pool.
pub(crate) enum Backend {
    Process(Box<process::ProcessBackend>),
    Inline(inline::InlineBackend),
}

impl Backend {
    /// Starts `workers` workers in slots `0..workers`.
    pub(crate) fn start(inline: bool, workers: usize, options: StartOptions) -> Result<Self> {
        Ok(if inline {
            Backend::Inline(inline::InlineBackend::start(workers)?)
        } else {
            Backend::Process(Box::new(process::ProcessBackend::start(workers, options)?))
        })
    }

    /// The number of slots, live or not.
    pub(crate) fn slots(&self) -> usize {
        match self {
            Backend::Process(b) => b.slots(),
            Backend::Inline(b) => b.slots(),
        }
    }

    /// The generation of the slot's current worker, `None` when it has none.
    pub(crate) fn generation(&self, worker: usize) -> Option<u64> {
        match self {
            Backend::Process(b) => b.generation(worker),
            Backend::Inline(b) => b.generation(worker),
        }
    }

    /// Starts a fresh worker in slot `worker` (which may be one past the last slot),
    /// after forgetting any process it had; returns its generation.
    pub(crate) fn restart(&mut self, worker: usize) -> Result<u64> {
        match self {
            Backend::Process(b) => b.restart(worker),
            Backend::Inline(b) => b.restart(worker),
        }
    }

    /// Stops a worker at once; [`Backend::next_event`] reports it as lost, after
    /// any reply already received from it. A thread cannot be stopped: it is
    /// abandoned and its later messages are ignored.
    pub(crate) fn kill(&mut self, worker: usize) {
        match self {
            Backend::Process(b) => b.kill(worker),
            Backend::Inline(b) => b.kill(worker),
        }
    }

    /// Sends a request frame. `Ok` means queued, not delivered: a worker that dies
    /// afterwards is reported by [`Backend::next_event`].
    pub(crate) fn send(&mut self, worker: usize, frame: &mut FrameBuf) -> std::io::Result<()> {
        match self {
            Backend::Process(b) => b.send(worker, frame),
            Backend::Inline(b) => b.send(worker, frame),
        }
    }

    /// Blocks until some worker replies or is lost, the waker is called, or the
    /// deadline passes. `poll` asks to poll briefly before blocking, when a reply is
    /// expected soon (see `os::poll::POLL_BEFORE_BLOCKING`).
    pub(crate) fn next_event(&mut self, poll: bool, deadline: Option<Instant>) -> Result<Event> {
        match self {
            Backend::Process(b) => b.next_event(poll, deadline),
            Backend::Inline(b) => b.next_event(poll, deadline),
        }
    }

    /// What interrupts [`Backend::next_event`] from another thread.
    pub(crate) fn waker(&self) -> Waker {
        match self {
            Backend::Process(b) => b.waker(),
            Backend::Inline(b) => b.waker(),
        }
    }

    /// Process ids of the workers by slot (`None` for an empty slot); empty for
    /// threads.
    pub(crate) fn pids(&self) -> Vec<Option<u32>> {
        match self {
            Backend::Process(b) => b.pids(),
            Backend::Inline(_) => Vec::new(),
        }
    }

    /// Stops every worker now: closes their channels, gives each a moment to exit
    /// and kills the rest, and reaps them. Nothing is reported as lost.
    pub(crate) fn shutdown(&mut self) {
        match self {
            Backend::Process(b) => b.shutdown(),
            Backend::Inline(b) => b.shutdown(),
        }
    }
}
