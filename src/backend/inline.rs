//! Workers as threads in this process, speaking the same protocol over in-memory
//! channels: for tests, debugging, and jobs that want no isolation.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::mpsc;
use std::thread;

use super::Event;
use crate::error::{Error, Result};
use crate::transport::{Frame, FrameBuf};
use crate::worker::{self, Link};

/// The wait status reported for a worker thread that ended unexpectedly: exit code
/// 101, what a Rust process that panics exits with.
const THREAD_LOST: i32 = 101 << 8;

/// A reply (or `None`: the thread ended) tagged with the id of the thread that sent it.
type ReplyMessage = (u64, Option<Vec<u8>>);

struct Worker {
    id: u64,
    requests: mpsc::Sender<Vec<u8>>,
    thread: thread::JoinHandle<()>,
}

pub(crate) struct InlineBackend {
    workers: Vec<Option<Worker>>,
    /// Every thread gets a new id, so a replaced thread's late messages are ignored.
    next_id: u64,
    /// Workers given up by `kill`, whose loss is still to be reported.
    lost: std::collections::VecDeque<usize>,
    replies_tx: mpsc::Sender<ReplyMessage>,
    replies: mpsc::Receiver<ReplyMessage>,
}

impl InlineBackend {
    pub(crate) fn start(workers: usize) -> Result<Self> {
        let (replies_tx, replies) = mpsc::channel();
        let mut backend = Self {
            workers: (0..workers).map(|_| None).collect(),
            next_id: 0,
            lost: std::collections::VecDeque::new(),
            replies_tx,
            replies,
        };
        for worker in 0..workers {
            backend.restart(worker)?;
        }
        Ok(backend)
    }

    pub(crate) fn workers(&self) -> usize {
        self.workers.len()
    }

    pub(crate) fn is_alive(&self, worker: usize) -> bool {
        self.workers[worker].is_some()
    }

    pub(crate) fn restart(&mut self, worker: usize) -> Result<()> {
        self.lost.retain(|&w| w != worker);
        let (requests, requests_rx) = mpsc::channel();
        let id = self.next_id;
        self.next_id += 1;
        let link = ThreadLink {
            id,
            requests: requests_rx,
            replies: self.replies_tx.clone(),
        };
        let thread = thread::Builder::new()
            .name(format!("multiproc-inline-{worker}"))
            .spawn(move || {
                // Ignored result: the loop ends on hang-up or a dropped reply channel,
                // and the guard in `link` reports the end either way.
                let _ = worker::serve(&link);
            })
            .map_err(|source| Error::Spawn { worker, source })?;
        // A replaced thread sees its request channel close and ends on its own.
        self.workers[worker] = Some(Worker {
            id,
            requests,
            thread,
        });
        Ok(())
    }

    /// Stops using the worker now and queues its loss. A thread cannot be killed:
    /// it sees its request channel close and ends after the chunk it is running,
    /// and anything it still sends is ignored (its id is no longer current).
    pub(crate) fn kill(&mut self, worker: usize) {
        if self.workers[worker].take().is_some() {
            self.lost.push_back(worker);
        }
    }

    pub(crate) fn send(&mut self, worker: usize, frame: &mut FrameBuf) -> io::Result<()> {
        let Some(w) = &self.workers[worker] else {
            return Err(io::Error::from(io::ErrorKind::NotConnected));
        };
        let body = frame.body_bytes().to_vec();
        w.requests
            .send(body)
            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))
    }

    pub(crate) fn next_event(&mut self, _poll: bool) -> Result<Event> {
        if let Some(worker) = self.lost.pop_front() {
            return Ok(Event::Lost {
                worker,
                status: Some(ExitStatus::from_raw(THREAD_LOST)),
            });
        }
        let (worker, message) = loop {
            let (id, message) = self
                .replies
                .recv()
                .expect("the backend holds a reply sender, so the channel stays open");
            let current = self
                .workers
                .iter()
                .position(|w| w.as_ref().is_some_and(|w| w.id == id));
            if let Some(worker) = current {
                break (worker, message);
            }
        };
        Ok(match message {
            Some(body) => Event::Reply {
                worker,
                frame: Frame::Inline(body),
            },
            None => {
                if let Some(w) = self.workers[worker].take() {
                    // Ignored result: the thread already ended.
                    let _ = w.thread.join();
                }
                Event::Lost {
                    worker,
                    status: Some(ExitStatus::from_raw(THREAD_LOST)),
                }
            }
        })
    }
}

impl Drop for InlineBackend {
    fn drop(&mut self) {
        for w in self.workers.iter_mut().filter_map(Option::take) {
            drop(w.requests);
            // Ignored result: a worker thread that panicked has nothing to report now.
            let _ = w.thread.join();
        }
    }
}

struct ThreadLink {
    id: u64,
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
            .send((self.id, Some(bytes)))
            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))
    }
}

impl Drop for ThreadLink {
    fn drop(&mut self) {
        // Tells the parent this worker has ended (normally only at pool drop, when
        // nobody listens any more).
        let _ = self.replies.send((self.id, None));
    }
}
