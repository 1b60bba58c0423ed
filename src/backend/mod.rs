//! Where workers live: separate processes (the default) or threads in this process.
//!
//! Both speak the same protocol; the scheduler in `par_map.rs` sees only this enum.

mod inline;
mod process;

use std::process::ExitStatus;
use std::time::Duration;

use crate::error::Result;
use crate::transport::{Frame, FrameBuf};

pub(crate) use process::prepare_worker_process;

/// Something that happened to one worker.
pub(crate) enum Event {
    /// A reply frame.
    Reply { worker: usize, frame: Frame },
    /// The worker is gone (process exited, or its thread ended); it has been reaped.
    /// The status is `None` when someone else reaped it first.
    Lost {
        worker: usize,
        status: Option<ExitStatus>,
    },
    /// The worker sent something that is not a frame; it can no longer be trusted.
    Broken { worker: usize, reason: String },
}

impl Event {
    pub(crate) fn worker(&self) -> usize {
        match self {
            Event::Reply { worker, .. }
            | Event::Lost { worker, .. }
            | Event::Broken { worker, .. } => *worker,
        }
    }
}

/// How workers are started.
#[derive(Debug, Clone)]
pub(crate) struct StartOptions {
    pub(crate) inherit_output: bool,
    pub(crate) start_timeout: Duration,
    /// Another program to start instead of this executable: only for testing how
    /// start-up failures are reported.
    #[cfg(test)]
    pub(crate) program: Option<std::path::PathBuf>,
}

/// The workers of one pool.
pub(crate) enum Backend {
    Process(process::ProcessBackend),
    Inline(inline::InlineBackend),
}

impl Backend {
    pub(crate) fn start(inline: bool, workers: usize, options: StartOptions) -> Result<Self> {
        Ok(if inline {
            Backend::Inline(inline::InlineBackend::start(workers)?)
        } else {
            Backend::Process(process::ProcessBackend::start(workers, options)?)
        })
    }

    pub(crate) fn workers(&self) -> usize {
        match self {
            Backend::Process(b) => b.workers(),
            Backend::Inline(b) => b.workers(),
        }
    }

    pub(crate) fn is_alive(&self, worker: usize) -> bool {
        match self {
            Backend::Process(b) => b.is_alive(worker),
            Backend::Inline(b) => b.is_alive(worker),
        }
    }

    /// Notices workers that exited while idle, so [`Backend::is_alive`] is false for
    /// them.
    pub(crate) fn forget_exited(&mut self) {
        if let Backend::Process(b) = self {
            b.forget_exited();
        }
    }

    /// Replaces a lost worker with a fresh one.
    pub(crate) fn restart(&mut self, worker: usize) -> Result<()> {
        match self {
            Backend::Process(b) => b.restart(worker),
            Backend::Inline(b) => b.restart(worker),
        }
    }

    /// Stops a worker that can no longer be trusted (a send to it failed, or it broke
    /// the protocol) at once; [`Backend::next_event`] reports it as lost, and it is
    /// not alive from now on.
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

    /// Blocks until some worker replies or is lost. Only called while at least one
    /// live worker has a request in flight. `poll` asks to poll briefly before
    /// blocking, when a reply is expected soon (see `transport::POLL_BEFORE_BLOCKING`).
    pub(crate) fn next_event(&mut self, poll: bool) -> Result<Event> {
        match self {
            Backend::Process(b) => b.next_event(poll),
            Backend::Inline(b) => b.next_event(poll),
        }
    }

    /// Process ids of the workers (`None` for a lost one); empty for threads.
    pub(crate) fn pids(&self) -> Vec<Option<u32>> {
        match self {
            Backend::Process(b) => b.pids(),
            Backend::Inline(_) => Vec::new(),
        }
    }
}
