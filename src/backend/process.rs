//! Real worker processes: spawn, handshake, select over replies, reap.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use ipc_channel::TrySelectError;
use ipc_channel::ipc::{IpcReceiverSet, IpcSelectionResult};

use super::{Event, StartOptions};
use crate::error::{Error, Result};
use crate::task;
use crate::transport::{FrameBuf, Listener, ParentLink, RawFrame, poll_before_blocking};
use crate::worker::{START_FAILED, WORKER_ARG, WORKER_ENV};

/// How long a worker gets to exit after its channels close before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(1);

struct Slot {
    child: Child,
    link: ParentLink,
    /// Its reply receiver's id in the receiver set.
    id: u64,
}

pub(crate) struct ProcessBackend {
    slots: Vec<Option<Slot>>,
    replies: IpcReceiverSet,
    /// Receiver-set id to worker index.
    ids: HashMap<u64, usize>,
    pending: VecDeque<Event>,
    options: StartOptions,
}

impl ProcessBackend {
    pub(crate) fn start(workers: usize, options: StartOptions) -> Result<Self> {
        let mut backend = Self {
            slots: (0..workers).map(|_| None).collect(),
            replies: IpcReceiverSet::new().map_err(|source| Error::Spawn { worker: 0, source })?,
            ids: HashMap::new(),
            pending: VecDeque::new(),
            options,
        };
        let all: Vec<usize> = (0..workers).collect();
        backend.start_slots(&all)?;
        Ok(backend)
    }

    pub(crate) fn workers(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn is_alive(&self, worker: usize) -> bool {
        self.slots[worker].is_some()
    }

    pub(crate) fn pids(&self) -> Vec<Option<u32>> {
        self.slots
            .iter()
            .map(|s| s.as_ref().map(|s| s.link.pid))
            .collect()
    }

    pub(crate) fn restart(&mut self, worker: usize) -> Result<()> {
        if let Some(slot) = self.slots[worker].take() {
            // Forget the old process entirely, so nothing it sent or its channel's
            // close is taken for the new one.
            self.ids.remove(&slot.id);
            reap(slot.child, Duration::ZERO);
        }
        self.pending.retain(|event| event.worker() != worker);
        self.start_slots(&[worker])
    }

    /// Forgets workers that have exited since the last look (between calls), so the
    /// next call replaces them before sending them anything.
    pub(crate) fn forget_exited(&mut self) {
        for worker in 0..self.slots.len() {
            let exited = self.slots[worker]
                .as_mut()
                .is_some_and(|slot| !matches!(slot.child.try_wait(), Ok(None)));
            if exited && let Some(slot) = self.slots[worker].take() {
                self.ids.remove(&slot.id);
                reap(slot.child, Duration::ZERO);
                self.pending.retain(|event| event.worker() != worker);
            }
        }
    }

    /// Kills and reaps the worker now and queues its loss, so neither this call nor
    /// the next one can send it anything more.
    pub(crate) fn kill(&mut self, worker: usize) {
        if let Some(slot) = self.slots[worker].take() {
            self.ids.remove(&slot.id);
            self.pending.retain(|event| event.worker() != worker);
            let status = reap(slot.child, Duration::ZERO);
            self.pending.push_back(Event::Lost { worker, status });
        }
    }

    pub(crate) fn send(&mut self, worker: usize, frame: &mut FrameBuf) -> io::Result<()> {
        match &self.slots[worker] {
            Some(slot) => slot.link.send(frame),
            None => Err(io::Error::from(io::ErrorKind::NotConnected)),
        }
    }

    pub(crate) fn next_event(&mut self, poll: bool) -> Result<Event> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(event);
            }
            if self.slots.iter().all(Option::is_none) {
                return Err(Error::Transport {
                    worker: None,
                    source: io::Error::new(io::ErrorKind::NotConnected, "no live worker"),
                });
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
            let results = polled
                .unwrap_or_else(|| self.replies.select())
                .map_err(|source| Error::Transport {
                    worker: None,
                    source,
                })?;
            let mut closed = Vec::new();
            for result in results {
                match result {
                    IpcSelectionResult::MessageReceived(id, message) => {
                        let Some(&worker) = self.ids.get(&id) else {
                            continue;
                        };
                        let Some(slot) = &self.slots[worker] else {
                            continue;
                        };
                        let opened = match message.to::<RawFrame>() {
                            Ok(raw) => slot.link.open(raw).map_err(|e| e.to_string()),
                            Err(e) => Err(e.to_string()),
                        };
                        let event = match opened {
                            Ok(frame) => Event::Reply { worker, frame },
                            Err(reason) => Event::Broken { worker, reason },
                        };
                        self.pending.push_back(event);
                    }
                    IpcSelectionResult::ChannelClosed(id) => closed.push(id),
                }
            }
            // Replies first: a worker may answer and then die in the same wake-up.
            for id in closed {
                let Some(worker) = self.ids.remove(&id) else {
                    continue;
                };
                if let Some(slot) = self.slots[worker].take() {
                    let status = reap(slot.child, EXIT_GRACE);
                    self.pending.push_back(Event::Lost { worker, status });
                }
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
            match launch(worker, &self.options) {
                Ok(launch) => launched.push((worker, launch)),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        for (worker, (listener, spawned)) in launched {
            let child = match spawned.recv() {
                Ok(Ok(child)) => child,
                Ok(Err(source)) => {
                    failure.get_or_insert(Error::Spawn { worker, source });
                    continue;
                }
                Err(_) => {
                    let source = io::Error::other("the spawner thread stopped");
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
                            self.ids.insert(id, s.worker);
                            self.slots[s.worker] = Some(Slot { child, link, id });
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

impl Drop for ProcessBackend {
    fn drop(&mut self) {
        // Closing the request channels tells each worker to exit.
        let children: Vec<Child> = self
            .slots
            .iter_mut()
            .filter_map(Option::take)
            .map(|slot| slot.child)
            .collect();
        let deadline = Instant::now() + EXIT_GRACE;
        for child in children {
            reap(child, deadline.saturating_duration_since(Instant::now()));
        }
    }
}

struct Starting {
    worker: usize,
    child: Option<Child>,
    name: String,
    link: Option<crate::transport::Accepted>,
    /// Its accept thread has answered (or can no longer be woken).
    finished: bool,
    /// Its accept thread was told to give up.
    aborted: bool,
}

/// Waits up to `grace` for the child to exit, then kills it; always reaps it.
///
/// `None` when the status cannot be had: someone else reaped the child (a
/// `waitpid(-1)` elsewhere in the program, or `SIGCHLD` set to be ignored).
fn reap(mut child: Child, grace: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + grace;
    let mut pause = Duration::from_micros(50);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => {
                thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(10));
            }
            Ok(None) => break,
            Err(_) => return None,
        }
    }
    // Ignored error: the child exited between try_wait and kill.
    let _ = child.kill();
    child.wait().ok()
}

/// A worker's listener and the answer to its spawn request.
type Launch = (Listener, mpsc::Receiver<io::Result<Child>>);

/// Opens one worker's listener and asks a spawner thread to start its process.
fn launch(worker: usize, options: &StartOptions) -> Result<Launch> {
    let listener = Listener::new().map_err(|source| Error::Spawn { worker, source })?;
    let parent = std::process::id();
    // `/proc/self/exe` is this very executable even if its file was replaced since.
    let exe = if cfg!(target_os = "linux") {
        std::path::PathBuf::from("/proc/self/exe")
    } else {
        std::env::current_exe().map_err(|source| Error::Spawn { worker, source })?
    };
    #[cfg(test)]
    let exe = options.program.clone().unwrap_or(exe);
    let mut command = Command::new(exe);
    if let Some(arg0) = std::env::args_os().next() {
        command.arg0(arg0);
    }
    command
        .arg(format!("{WORKER_ARG}{worker}:{parent}:{}", listener.name()))
        .env(WORKER_ENV, "1")
        .stdin(Stdio::null());
    if !options.inherit_output {
        command.stdout(Stdio::null()).stderr(Stdio::null());
    }
    let spawned =
        spawn_from_owner_thread(command).map_err(|source| Error::Spawn { worker, source })?;
    Ok((listener, spawned))
}

/// Asks the kernel to kill this worker process when its parent dies, ignores
/// SIGPIPE, then checks that the parent has not died already. Called first thing in
/// a worker.
///
/// Setting it in the worker rather than between fork and exec lets the parent spawn
/// with `posix_spawn` (no `pre_exec` hook), which on a large parent is several times
/// faster than `fork`. The signal is tied to the thread that spawned the worker, one
/// of the spawner threads below, which live as long as the process.
pub(crate) fn prepare_worker_process(parent: u32) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: `prctl(PR_SET_PDEATHSIG, SIGKILL)` only sets a flag on this process;
        // it reads and writes no memory of ours.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: setting the disposition of SIGPIPE to "ignore" installs no handler code.
    // A worker started from the test-support constructor runs before Rust's runtime
    // would have done the same, and a task writing to a closed pipe should get an
    // error, not kill its worker.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    // The parent may have died before the flag was set: then nobody waits for us.
    if std::os::unix::process::parent_id() != parent {
        return Err(io::Error::other(
            "the parent exited while this worker started",
        ));
    }
    Ok(())
}

/// Long-lived threads that spawn workers, so several can start at once.
const SPAWNER_THREADS: usize = 4;

/// Asks one of a few long-lived threads to spawn `command`; the answer arrives on
/// the returned channel.
///
/// Linux delivers the parent-death signal when the *thread* that spawned a child
/// exits, not the process, so workers must never be spawned from a thread that may
/// end first (a test thread, a scoped thread, a rayon worker). `posix_spawn` blocks
/// its thread until the child has called `exec`, hence more than one such thread.
fn spawn_from_owner_thread(command: Command) -> io::Result<mpsc::Receiver<io::Result<Child>>> {
    type Job = (Command, mpsc::Sender<io::Result<Child>>);
    static OWNERS: OnceLock<io::Result<mpsc::Sender<Job>>> = OnceLock::new();
    let owners = OWNERS.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        let jobs = Arc::new(Mutex::new(rx));
        for i in 0..SPAWNER_THREADS {
            let jobs = Arc::clone(&jobs);
            thread::Builder::new()
                .name(format!("multiproc-spawner-{i}"))
                .spawn(move || {
                    loop {
                        let job = jobs.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        let Ok((mut command, reply)) = job else {
                            return;
                        };
                        // The requester may have given up; nothing else to do then.
                        let _ = reply.send(command.spawn());
                    }
                })?;
        }
        Ok(tx)
    });
    let owners = owners
        .as_ref()
        .map_err(|e| io::Error::new(e.kind(), format!("spawner thread: {e}")))?;
    let (reply_tx, reply_rx) = mpsc::channel();
    owners
        .send((command, reply_tx))
        .map_err(|_| io::Error::other("spawner threads have stopped"))?;
    Ok(reply_rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(program: &str) -> StartOptions {
        StartOptions {
            inherit_output: false,
            start_timeout: Duration::from_secs(10),
            program: Some(program.into()),
        }
    }

    #[test]
    fn a_worker_that_exits_before_connecting_fails_the_start_with_a_hint() {
        let err = ProcessBackend::start(2, options("/bin/true"))
            .err()
            .expect("no hello");
        let Error::Handshake { reason, .. } = &err else {
            panic!("expected a handshake error, got {err:?}");
        };
        assert!(reason.contains("before connecting"), "{reason}");
        assert!(reason.contains("multiproc::init()"), "{reason}");
    }

    #[test]
    fn a_program_that_cannot_be_started_is_a_spawn_error() {
        let err = ProcessBackend::start(1, options("/nonexistent/program"))
            .err()
            .expect("no such program");
        assert!(matches!(err, Error::Spawn { worker: 0, .. }), "{err:?}");
    }

    #[test]
    fn workers_start_and_stop_cleanly() {
        let backend = ProcessBackend::start(
            2,
            StartOptions {
                program: None,
                ..options("")
            },
        )
        .expect("workers start");
        let pids: Vec<u32> = backend.pids().into_iter().flatten().collect();
        assert_eq!(pids.len(), 2);
        drop(backend);
        for pid in pids {
            assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
        }
    }
}
