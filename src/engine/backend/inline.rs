//! Workers as threads in this process, speaking the same protocol over in-memory
//! channels: for tests, debugging, and jobs that want no isolation.

use std::collections::VecDeque;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread;
use std::time::Instant;

use super::{Event, Waker};
use crate::error::{Error, Result};
use crate::wire::transport::{Frame, FrameBuf};
use crate::worker::serve::{self, Link};

/// The wait status reported for a worker thread that ended unexpectedly: exit code
/// 101, what a Rust process that panics exits with.
const THREAD_LOST: i32 = 101 << 8;

/// The sender id of a wake-up (no worker thread has it).
const WAKE: u64 = u64::MAX;

/// A reply (or `None`: the thread ended) tagged with the generation of the thread
/// that sent it.
type ReplyMessage = (u64, Option<Vec<u8>>);

struct Worker {
    generation: u64,
    requests: mpsc::Sender<Vec<u8>>,
    thread: thread::JoinHandle<()>,
}

pub(crate) struct InlineBackend {
    workers: Vec<Option<Worker>>,
    /// Every thread gets a new generation, so a replaced thread's late messages are
    /// ignored.
    next_generation: u64,
    /// Losses to report: workers given up by `kill`.
    lost: VecDeque<Event>,
    replies_tx: mpsc::Sender<ReplyMessage>,
    replies: mpsc::Receiver<ReplyMessage>,
}

impl InlineBackend {
    pub(crate) fn start(workers: usize) -> Result<Self> {
        let (replies_tx, replies) = mpsc::channel();
        let mut backend = Self {
            workers: (0..workers).map(|_| None).collect(),
            next_generation: 1,
            lost: VecDeque::new(),
            replies_tx,
            replies,
        };
        for worker in 0..workers {
            backend.restart(worker)?;
        }
        Ok(backend)
    }

    pub(crate) fn slots(&self) -> usize {
        self.workers.len()
    }

    pub(crate) fn generation(&self, worker: usize) -> Option<u64> {
        self.workers.get(worker)?.as_ref().map(|w| w.generation)
    }

    pub(crate) fn waker(&self) -> Waker {
        let tx = self.replies_tx.clone();
        Waker(Arc::new(move || {
            // Ignored error: the backend is gone, so nobody waits.
            let _ = tx.send((WAKE, None));
        }))
    }

    pub(crate) fn restart(&mut self, worker: usize) -> Result<u64> {
        if worker >= self.workers.len() {
            self.workers.resize_with(worker + 1, || None);
        }
        let (requests, requests_rx) = mpsc::channel();
        let generation = self.next_generation;
        self.next_generation += 1;
        let link = ThreadLink {
            generation,
            requests: requests_rx,
            replies: self.replies_tx.clone(),
        };
        let thread = thread::Builder::new()
            .name(format!("multiproc-inline-{worker}"))
            .spawn(move || {
                // Ignored result: the loop ends on hang-up or a dropped reply channel,
                // and the guard in `link` reports the end either way.
                let _ = serve::serve(&link);
            })
            .map_err(|source| Error::Spawn { worker, source })?;
        // A replaced thread sees its request channel close and ends on its own.
        self.workers[worker] = Some(Worker {
            generation,
            requests,
            thread,
        });
        Ok(generation)
    }

    /// Stops using the worker now and queues its loss. A thread cannot be killed:
    /// it sees its request channel close and ends after the chunk it is running,
    /// and anything it still sends is ignored (its generation is no longer current).
    pub(crate) fn kill(&mut self, worker: usize) {
        if let Some(w) = self.workers.get_mut(worker).and_then(Option::take) {
            self.lost.push_back(Event::Lost {
                worker,
                generation: w.generation,
                status: Some(ExitStatus::from_raw(THREAD_LOST)),
                last_item: None,
            });
        }
    }

    pub(crate) fn send(&mut self, worker: usize, frame: &mut FrameBuf) -> io::Result<()> {
        let Some(Some(w)) = self.workers.get(worker) else {
            return Err(io::Error::from(io::ErrorKind::NotConnected));
        };
        let body = frame.body_bytes().to_vec();
        w.requests
            .send(body)
            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))
    }

    pub(crate) fn next_event(&mut self, _poll: bool, deadline: Option<Instant>) -> Result<Event> {
        if let Some(event) = self.lost.pop_front() {
            return Ok(event);
        }
        loop {
            let received = match deadline {
                None => self.replies.recv().map_err(|_| ()),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match self.replies.recv_timeout(left) {
                        Ok(message) => Ok(message),
                        Err(mpsc::RecvTimeoutError::Timeout) => return Ok(Event::TimedOut),
                        Err(mpsc::RecvTimeoutError::Disconnected) => Err(()),
                    }
                }
            };
            let (generation, message) =
                received.expect("the backend holds a reply sender, so the channel stays open");
            if generation == WAKE {
                return Ok(Event::Woken);
            }
            let current = self
                .workers
                .iter()
                .position(|w| w.as_ref().is_some_and(|w| w.generation == generation));
            let Some(worker) = current else {
                continue;
            };
            return Ok(match message {
                Some(body) => Event::Reply {
                    worker,
                    generation,
                    frame: Frame::Inline(body),
                },
                None => {
                    if let Some(w) = self.workers[worker].take() {
                        // Ignored result: the thread already ended.
                        let _ = w.thread.join();
                    }
                    Event::Lost {
                        worker,
                        generation,
                        status: Some(ExitStatus::from_raw(THREAD_LOST)),
                        last_item: None,
                    }
                }
            });
        }
    }
}

impl InlineBackend {
    pub(crate) fn shutdown(&mut self) {
        for w in self.workers.iter_mut().filter_map(Option::take) {
            drop(w.requests);
            // A thread still running a task cannot be stopped; it ends by itself when
            // the task returns and it sees its channel closed. Only finished threads
            // are joined, so dropping the pool never waits for a stuck task.
            if w.thread.is_finished() {
                // Ignored result: a worker thread that panicked has nothing to report.
                let _ = w.thread.join();
            }
        }
        self.lost.clear();
    }
}

impl Drop for InlineBackend {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct ThreadLink {
    generation: u64,
    requests: mpsc::Receiver<Vec<u8>>,
    replies: mpsc::Sender<ReplyMessage>,
}

impl Link for ThreadLink {
    fn recv(&self) -> io::Result<Option<Frame>> {
        Ok(self.requests.recv().ok().map(Frame::Inline))
    }

    fn send(&self, frame: &mut FrameBuf) -> io::Result<()> {
        let bytes = frame.body_bytes().to_vec();
        self.replies
            .send((self.generation, Some(bytes)))
            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))
    }
}

impl Drop for ThreadLink {
    fn drop(&mut self) {
        // Tells the parent this worker has ended (normally only at pool drop, when
        // nobody listens any more).
        let _ = self.replies.send((self.generation, None));
    }
}
