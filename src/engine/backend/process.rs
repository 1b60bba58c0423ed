//! Real worker processes: spawn, handshake, select over replies, reap.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use ipc_channel::TrySelectError;
use ipc_channel::ipc::{self, IpcReceiverSet, IpcSelectionResult, IpcSender};

use super::{Event, StartOptions, Waker};
use crate::error::{Error, Result};
use crate::os::poll::poll_before_blocking;
use crate::os::spawn::{self, START_FAILED, reap};
use crate::wire::transport::{FrameBuf, Listener, ParentLink, RawFrame};
use crate::worker::task;

/// How long a worker gets to exit after its channels close before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(1);

/// How often a blocked wait looks for workers that exited without their channel
/// closing (a process they forked still holds it): such a loss is seen within this.
const EXIT_CHECK: Duration = Duration::from_millis(50);

struct Slot {
    child: Child,
    link: ParentLink,
    /// Its reply receiver's id in the receiver set.
    id: u64,
    generation: u64,
    /// Killed; its loss is still to be seen.
    killed: bool,
}

pub(crate) struct ProcessBackend {
    slots: Vec<Option<Slot>>,
    replies: IpcReceiverSet,
    /// Receiver-set id to worker slot and generation.
    ids: HashMap<u64, (usize, u64)>,
    pending: VecDeque<Event>,
    options: StartOptions,
    next_generation: u64,
    /// The receiver-set id of the wake-up channel.
    wake_id: u64,
    wake: Arc<WakeChannel>,
    /// Requests sent to and replies received from each slot, for the test-only
    /// fault injection.
    sends: Vec<u64>,
    replies_seen: Vec<u64>,
    /// A Ctrl-C has been reported to the driver already.
    interrupt_seen: bool,
    /// Worker processes asked for so far (for `StartOptions::fail_starts_after`).
    starts: u64,
}

/// The sending side of the wake-up channel. A wake-up already queued and not yet
/// seen is not sent again, so a burst of submissions costs one message.
struct WakeChannel {
    sender: Mutex<IpcSender<()>>,
    queued: AtomicBool,
}

impl ProcessBackend {
    pub(crate) fn start(workers: usize, options: StartOptions) -> Result<Self> {
        let setup = |source| Error::Spawn { worker: 0, source };
        let mut replies = IpcReceiverSet::new().map_err(setup)?;
        let (wake_tx, wake_rx) = ipc::channel::<()>().map_err(setup)?;
        let wake_id = replies.add(wake_rx).map_err(setup)?;
        let mut backend = Self {
            slots: (0..workers).map(|_| None).collect(),
            replies,
            ids: HashMap::new(),
            pending: VecDeque::new(),
            options,
            next_generation: 1,
            wake_id,
            wake: Arc::new(WakeChannel {
                sender: Mutex::new(wake_tx),
                queued: AtomicBool::new(false),
            }),
            sends: Vec::new(),
            replies_seen: Vec::new(),
            interrupt_seen: false,
            starts: 0,
        };
        let all: Vec<usize> = (0..workers).collect();
        backend.start_slots(&all)?;
        Ok(backend)
    }

    pub(crate) fn slots(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn generation(&self, worker: usize) -> Option<u64> {
        self.slots.get(worker)?.as_ref().map(|s| s.generation)
    }

    pub(crate) fn pids(&self) -> Vec<Option<u32>> {
        self.slots
            .iter()
            .map(|s| s.as_ref().filter(|s| !s.killed).map(|s| s.child.id()))
            .collect()
    }

    pub(crate) fn waker(&self) -> Waker {
        let wake = Arc::clone(&self.wake);
        Waker(Arc::new(move || {
            if !wake.queued.swap(true, Ordering::AcqRel) {
                // Ignored error: the pool is being dropped and nobody waits any more.
                let _ = wake
                    .sender
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .send(());
            }
        }))
    }

    pub(crate) fn restart(&mut self, worker: usize) -> Result<u64> {
        if worker >= self.slots.len() {
            self.slots.resize_with(worker + 1, || None);
        }
        if let Some(slot) = self.slots[worker].take() {
            // Forget the old process entirely: its queued events carry its
            // generation, and nothing it sends later is read.
            self.ids.remove(&slot.id);
            reap(slot.child, Duration::ZERO);
        }
        self.start_slots(&[worker])?;
        Ok(self.generation(worker).expect("the slot was just started"))
    }

    /// Kills the worker now; nothing more is sent to it. Its loss is reported as
    /// usual, once its channel has closed: every reply it sent before it died is
    /// delivered first, and only what it had not answered is lost.
    pub(crate) fn kill(&mut self, worker: usize) {
        if let Some(slot) = self.slots.get_mut(worker).and_then(Option::as_mut)
            && !slot.killed
        {
            slot.killed = true;
            // Ignored error: the process has exited already; its loss comes anyway.
            let _ = slot.child.kill();
        }
    }

    pub(crate) fn send(&mut self, worker: usize, frame: &mut FrameBuf) -> io::Result<()> {
        if let Some((victim, at)) = self.options.kill_before_send
            && victim == worker
        {
            if self.sends.len() <= worker {
                self.sends.resize(worker + 1, 0);
            }
            let n = self.sends[worker];
            self.sends[worker] += 1;
            if n == at
                && let Some(Some(slot)) = self.slots.get_mut(worker)
            {
                // Dead before it can read this request, as if killed from outside:
                // the send then finds its socket closed.
                let _ = slot.child.kill();
                let _ = slot.child.wait();
            }
        }
        match self.slots.get(worker) {
            Some(Some(slot)) if !slot.killed => retry_interrupted(|| slot.link.send(frame)),
            _ => Err(io::Error::from(io::ErrorKind::NotConnected)),
        }
    }

    pub(crate) fn next_event(&mut self, poll: bool, deadline: Option<Instant>) -> Result<Event> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(event);
            }
            self.reap_exited();
            if !self.pending.is_empty() {
                continue;
            }
            let polled = poll
                .then(|| {
                    poll_before_blocking(|| match self.replies.try_select() {
                        Ok(results) => Some(Ok(results)),
                        Err(TrySelectError::Empty) => None,
                        Err(TrySelectError::IoError(e)) => Some(Err(e)),
                    })
                })
                .flatten();
            let results = match polled {
                Some(results) => results,
                None => {
                    // Wake up now and then to look for workers that exited while a
                    // process they started keeps their channel open.
                    let check = Instant::now() + EXIT_CHECK;
                    let wake = deadline.map_or(check, |d| d.min(check));
                    let left = wake.saturating_duration_since(Instant::now());
                    match self.replies.try_select_timeout(left) {
                        Ok(results) => Ok(results),
                        // A signal interrupts the wait with `Empty` too: only the
                        // clock says whether the deadline passed.
                        Err(TrySelectError::Empty)
                            if deadline.is_none_or(|d| Instant::now() < d) =>
                        {
                            // Ctrl-C during a call that handles it: let the driver
                            // look, once.
                            if crate::os::interrupt::interrupted() && !self.interrupt_seen {
                                self.interrupt_seen = true;
                                return Ok(Event::Woken);
                            }
                            if !crate::os::interrupt::interrupted() {
                                self.interrupt_seen = false;
                            }
                            continue;
                        }
                        Err(TrySelectError::Empty) => return Ok(Event::TimedOut),
                        Err(TrySelectError::IoError(e)) => Err(e),
                    }
                }
            };
            let results = match results {
                Ok(results) => results,
                // A signal handler installed without SA_RESTART interrupted the wait.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(Error::Transport {
                        worker: None,
                        source,
                    });
                }
            };
            self.absorb(results);
        }
    }

    /// Turns what a select returned into events: replies first, then losses, as a
    /// worker may answer and then die in the same wake-up.
    fn absorb(&mut self, results: Vec<IpcSelectionResult>) {
        let mut closed = Vec::new();
        for result in results {
            match result {
                IpcSelectionResult::MessageReceived(id, _) if id == self.wake_id => {
                    self.wake.queued.store(false, Ordering::Release);
                    self.pending.push_back(Event::Woken);
                }
                IpcSelectionResult::MessageReceived(id, message) => {
                    let Some(&(worker, generation)) = self.ids.get(&id) else {
                        continue;
                    };
                    let Some(slot) = self.slots[worker]
                        .as_ref()
                        .filter(|s| s.generation == generation)
                    else {
                        continue;
                    };
                    let opened = match message.to::<RawFrame>() {
                        Ok(raw) => slot.link.open(raw).map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    let opened = match (opened, self.options.corrupt_reply) {
                        (Ok(frame), Some((victim, at))) if victim == worker => {
                            if self.replies_seen.len() <= worker {
                                self.replies_seen.resize(worker + 1, 0);
                            }
                            self.replies_seen[worker] += 1;
                            if self.replies_seen[worker] - 1 == at {
                                Ok(crate::wire::transport::Frame::Inline(vec![0xff; 5]))
                            } else {
                                Ok(frame)
                            }
                        }
                        (opened, _) => opened,
                    };
                    let event = match opened {
                        Ok(frame) => Event::Reply {
                            worker,
                            generation,
                            frame,
                        },
                        Err(reason) => Event::Broken {
                            worker,
                            generation,
                            reason,
                        },
                    };
                    self.pending.push_back(event);
                }
                IpcSelectionResult::ChannelClosed(id) => closed.push(id),
            }
        }
        for id in closed {
            let Some((worker, generation)) = self.ids.remove(&id) else {
                continue;
            };
            let current = self.slots[worker]
                .as_ref()
                .is_some_and(|s| s.generation == generation);
            if current && let Some(slot) = self.slots[worker].take() {
                let status = reap(slot.child, EXIT_GRACE);
                self.pending.push_back(Event::Lost {
                    worker,
                    generation,
                    status,
                    last_item: slot.link.last_started(),
                });
            }
        }
    }

    /// Queues the loss of workers whose process has exited but whose channel has
    /// not closed (a process it started still holds the channel's descriptors).
    /// Whatever they sent before they died is read first.
    fn reap_exited(&mut self) {
        let exited: Vec<usize> = (0..self.slots.len())
            .filter(|&w| {
                self.slots[w]
                    .as_mut()
                    .is_some_and(|slot| !matches!(slot.child.try_wait(), Ok(None)))
            })
            .collect();
        if exited.is_empty() {
            return;
        }
        if let Ok(results) = self.replies.try_select() {
            self.absorb(results);
        }
        for worker in exited {
            if let Some(slot) = self.slots[worker].take() {
                self.ids.remove(&slot.id);
                let status = reap(slot.child, Duration::ZERO);
                self.pending.push_back(Event::Lost {
                    worker,
                    generation: slot.generation,
                    status,
                    last_item: slot.link.last_started(),
                });
            }
        }
    }

    /// Starts workers in the given slots, all at once, and waits for their hellos.
    fn start_slots(&mut self, workers: &[usize]) -> Result<()> {
        let (done_tx, done_rx) = mpsc::channel();
        let mut starting = Vec::new();
        let mut failure = None;
        // Ask for every process first: the spawner threads start them side by side
        // while this thread waits.
        let mut launched = Vec::new();
        for &worker in workers {
            if self
                .options
                .fail_starts_after
                .is_some_and(|after| self.starts >= after)
            {
                failure = Some(Error::Spawn {
                    worker,
                    source: io::Error::other("injected failure to start a worker"),
                });
                break;
            }
            self.starts += 1;
            let launched_one = Listener::new().and_then(|listener| {
                let spawned = spawn::launch(worker, listener.name(), &self.options.spawn)?;
                Ok((listener, spawned))
            });
            match launched_one {
                Ok(launch) => launched.push((worker, launch)),
                Err(source) => {
                    failure = Some(Error::Spawn { worker, source });
                    break;
                }
            }
        }
        for (worker, (listener, spawned)) in launched {
            let child = match spawn::wait_spawned(spawned, self.options.start_timeout) {
                Ok(child) => child,
                Err(source) => {
                    failure.get_or_insert(Error::Spawn { worker, source });
                    continue;
                }
            };
            let name = listener.name().to_owned();
            let done = done_tx.clone();
            let accepted = thread::Builder::new()
                .name(format!("multiproc-accept-{worker}"))
                .spawn(move || {
                    // The receiver outlives every sender: it waits for all.
                    let _ = done.send((worker, listener.accept()));
                });
            match accepted {
                Ok(_) => starting.push(Starting {
                    worker,
                    child: Some(child),
                    name,
                    link: None,
                    finished: false,
                    aborted: false,
                }),
                Err(source) => {
                    reap(child, Duration::ZERO);
                    failure.get_or_insert(Error::Spawn { worker, source });
                }
            }
        }
        drop(done_tx);
        let deadline = Instant::now() + self.options.start_timeout;
        let mut aborted_at: Option<Instant> = None;
        while starting.iter().any(|s| !s.finished) {
            match done_rx.recv_timeout(Duration::from_millis(5)) {
                Ok((worker, result)) => {
                    let s = starting
                        .iter_mut()
                        .find(|s| s.worker == worker)
                        .expect("every accept thread belongs to a starting worker");
                    s.finished = true;
                    match result {
                        Ok(Some(accepted)) => s.link = Some(accepted),
                        Ok(None) => {} // aborted below; the failure is already recorded
                        Err(e) => {
                            failure.get_or_insert(Error::Handshake {
                                worker,
                                reason: format!("handshake failed: {e}"),
                            });
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let now = Instant::now();
                    let late = now >= deadline;
                    if aborted_at.is_some_and(|at| now >= at + EXIT_GRACE) {
                        // Aborted accept threads that still have not answered (the
                        // wake-up could not reach them) are left behind, not waited for.
                        break;
                    }
                    for s in starting.iter_mut().filter(|s| !s.finished && !s.aborted) {
                        let child = s
                            .child
                            .as_mut()
                            .expect("unfinished workers keep their child");
                        let reason = match child.try_wait() {
                            Ok(Some(status)) if status.code() == Some(START_FAILED) => format!(
                                "it started as a worker but could not connect ({status}); \
                                 its standard error says why"
                            ),
                            Ok(Some(status)) => format!(
                                "it exited ({status}) before connecting; does `main` call \
                                 `multiproc::init()` first (or the test crate \
                                 `multiproc::enable_test_support!()`)?"
                            ),
                            _ if late || failure.is_some() => {
                                format!("no hello within {:?}", self.options.start_timeout)
                            }
                            _ => continue,
                        };
                        failure.get_or_insert(Error::Handshake {
                            worker: s.worker,
                            reason,
                        });
                        // Wake the accept thread so it ends; its `Ok(None)` is counted
                        // above like any other answer.
                        s.aborted = true;
                        aborted_at.get_or_insert(now);
                        if Listener::abort(&s.name).is_err() {
                            s.finished = true;
                        }
                        let _ = child.kill();
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let fingerprint = task::binary_fingerprint();
        for s in starting {
            let child = s.child.expect("every starting worker has its child");
            match s.link {
                Some((link, replies)) if failure.is_none() => {
                    if link.pid != child.id() {
                        failure = Some(Error::Handshake {
                            worker: s.worker,
                            reason: format!(
                                "it announced pid {} but the process started was {}",
                                link.pid,
                                child.id()
                            ),
                        });
                        reap(child, Duration::ZERO);
                        continue;
                    }
                    if link.fingerprint != fingerprint {
                        failure = Some(Error::Handshake {
                            worker: s.worker,
                            reason: "it runs a different build of this program".into(),
                        });
                        reap(child, Duration::ZERO);
                        continue;
                    }
                    match self.replies.add(replies) {
                        Ok(id) => {
                            let generation = self.next_generation;
                            self.next_generation += 1;
                            self.ids.insert(id, (s.worker, generation));
                            self.slots[s.worker] = Some(Slot {
                                child,
                                link,
                                id,
                                generation,
                                killed: false,
                            });
                        }
                        Err(source) => {
                            failure = Some(Error::Transport {
                                worker: Some(s.worker),
                                source,
                            });
                            reap(child, Duration::ZERO);
                        }
                    }
                }
                _ => {
                    reap(child, Duration::ZERO);
                }
            }
        }
        match failure {
            Some(e) => {
                for &worker in workers {
                    if let Some(slot) = self.slots[worker].take() {
                        self.ids.remove(&slot.id);
                        drop(slot.link);
                        reap(slot.child, EXIT_GRACE);
                    }
                }
                Err(e)
            }
            None => Ok(()),
        }
    }
}

impl ProcessBackend {
    pub(crate) fn shutdown(&mut self) {
        // Closing the request channels tells each worker to exit.
        let slots: Vec<Slot> = self.slots.iter_mut().filter_map(Option::take).collect();
        let mut children = Vec::with_capacity(slots.len());
        for slot in slots {
            self.ids.remove(&slot.id);
            drop(slot.link);
            children.push(slot.child);
        }
        let deadline = Instant::now() + EXIT_GRACE;
        for child in children {
            reap(child, deadline.saturating_duration_since(Instant::now()));
        }
        self.pending.clear();
    }
}

impl Drop for ProcessBackend {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Starting {
    worker: usize,
    child: Option<Child>,
    name: String,
    link: Option<crate::wire::transport::Accepted>,
    /// Its accept thread has answered (or can no longer be woken).
    finished: bool,
    /// Its accept thread was told to give up.
    aborted: bool,
}

/// Calls `f` again while it fails with `EINTR`: a signal handler installed
/// without `SA_RESTART` interrupted it before anything was done.
fn retry_interrupted<R>(mut f: impl FnMut() -> io::Result<R>) -> io::Result<R> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(program: Option<&str>) -> StartOptions {
        StartOptions {
            spawn: spawn::SpawnOptions {
                inherit_output: false,
                relay: None,
                memory_limit: None,
                announce_parent_pid: None,
                program: program.map(Into::into),
            },
            start_timeout: Duration::from_secs(10),
            kill_before_send: None,
            fail_starts_after: None,
            corrupt_reply: None,
        }
    }

    #[test]
    fn a_worker_that_exits_before_connecting_fails_the_start_with_a_hint() {
        let err = ProcessBackend::start(2, options(Some("/bin/true")))
            .err()
            .expect("no hello");
        let Error::Handshake { reason, .. } = &err else {
            panic!("expected a handshake error, got {err:?}");
        };
        assert!(reason.contains("before connecting"), "{reason}");
        assert!(reason.contains("multiproc::init()"), "{reason}");
    }

    #[test]
    fn a_worker_that_never_connects_fails_after_the_start_timeout() {
        // A program that ignores its arguments and never connects.
        let dir = std::env::temp_dir().join(format!("multiproc-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("silent-worker");
        std::fs::write(&script, "#!/bin/sh\nexec sleep 60\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700)).unwrap();
        let mut options = options(script.to_str());
        options.start_timeout = Duration::from_millis(300);
        let started = Instant::now();
        let err = ProcessBackend::start(1, options).err().expect("no hello");
        std::fs::remove_dir_all(&dir).unwrap();
        let Error::Handshake { reason, .. } = &err else {
            panic!("expected a handshake error, got {err:?}");
        };
        assert!(reason.contains("no hello within"), "{reason}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_program_that_cannot_be_started_is_a_spawn_error() {
        let err = ProcessBackend::start(1, options(Some("/nonexistent/program")))
            .err()
            .expect("no such program");
        assert!(matches!(err, Error::Spawn { worker: 0, .. }), "{err:?}");
    }

    #[test]
    fn workers_start_and_stop_cleanly() {
        let backend = ProcessBackend::start(2, options(None)).expect("workers start");
        let pids: Vec<u32> = backend.pids().into_iter().flatten().collect();
        assert_eq!(pids.len(), 2);
        drop(backend);
        for pid in pids {
            assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
        }
    }
}
