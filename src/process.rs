//! Process: one task on one argument in one child, Python's `multiprocessing.Process`.
//!
//! The child is a worker like a pool's (started by `spawn.rs`, connected by the same
//! handshake, served by the same loop in `worker.rs`) that gets exactly one chunk of
//! one item. As soon as its reply is in, the parent hangs up and the worker exits, so
//! the child's life is the task's life. A waiter thread per process receives the
//! reply, then reaps the child; the reaping happens under the same lock that
//! [`Process::terminate`] holds to send a signal, so a signal never reaches a reused
//! pid.

use std::process::{Child, ExitStatus};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::channels::broker;
use crate::engine::outcome;
use crate::error::{Error, Result};
use crate::os::spawn::{self, START_FAILED, SpawnOptions};
use crate::shared::region;
use crate::wire::codec;
use crate::wire::protocol::{self, ChunkHeader, Failure, Reply, Request, TaskRef};
use crate::wire::transport::{self, Accepted, FrameBuf, Listener, ParentLink, RawFrame};
use crate::worker::serve;
use crate::worker::task::{self, Collect, Plain};

/// How long a child may take to start and connect.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long [`Process::terminate`] waits after SIGTERM before SIGKILL.
const TERM_GRACE: Duration = Duration::from_millis(500);

/// Numbers the default names, `Process-1`, `Process-2`, … as Python does.
static NEXT_NUMBER: AtomicUsize = AtomicUsize::new(1);

/// Sets a [`Process`] up before it starts: its name and whether it writes to this
/// process's terminal. Made by [`Process::builder`].
#[derive(Debug, Clone)]
pub struct ProcessBuilder {
    name: Option<String>,
    inherit_output: bool,
}

impl ProcessBuilder {
    /// The name errors show, Python's `name=`; by default `Process-N`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Whether the child writes to this process's stdout and stderr (the default)
    /// or to `/dev/null`.
    pub fn inherit_output(mut self, inherit: bool) -> Self {
        self.inherit_output = inherit;
        self
    }

    /// Starts a child process that runs `task(arg)`. See [`Process::spawn`].
    ///
    /// # Errors
    ///
    /// As [`Process::spawn`].
    pub fn spawn<T, U, F>(self, arg: T, task: F) -> Result<Process<U>>
    where
        T: Serialize + DeserializeOwned,
        U: Serialize + DeserializeOwned + Send + 'static,
        F: Fn(T) -> U + Copy + Send + Sync,
    {
        task::assert_zero_sized::<F>();
        let _ = task;
        let name = self
            .name
            .unwrap_or_else(|| format!("Process-{}", NEXT_NUMBER.fetch_add(1, Ordering::Relaxed)));
        if serve::init_missing() {
            return Err(Error::InitMissing);
        }
        let task = TaskRef::of::<T, U, Plain<F>, Collect>().ok_or(Error::TaskNotInExecutable)?;
        let mut frame = FrameBuf::with_capacity(256);
        // Shared inputs named by the argument stay alive until the child has
        // answered: the child opens them through this process's descriptors, and the
        // argument may hold the only handle.
        // Pipe ends it hands over stay parked until the child claims them, and no
        // longer than the child lives: closed once it is reaped unclaimed, so the
        // other end sees the pipe closed.
        let ((encoded, pins), parked) =
            broker::parks_while(|| region::pin_while(|| codec::encode_into(&arg, frame.body())));
        encoded.map_err(|source| Error::EncodeItem { item: 0, source })?;
        codec::decode::<T>(frame.body_bytes()).map_err(|source| Error::DecodeItem {
            item: 0,
            worker: None,
            source,
        })?;
        let header = ChunkHeader {
            job: 1,
            chunk: 0,
            first_item: 0,
            count: 1,
            task,
            skip: Vec::new(),
            // The argument's `map_file` slices: the child may map these unsealed.
            unsealed: pins.unsealed(),
        };
        protocol::seal(&mut frame, &Request::Chunk(header))
            .map_err(|source| Error::EncodeItem { item: 0, source })?;
        let options = SpawnOptions {
            inherit_output: self.inherit_output,
            relay: None,
            memory_limit: None,
            announce_parent_pid: None,
            #[cfg(test)]
            program: None,
        };
        let (child, (link, replies)) = start(&name, &options)?;
        let pid = child.id();
        let described = describe(&name, pid);
        if let Err(source) = link.send(&mut frame) {
            drop(link);
            let status = spawn::reap(child, Duration::ZERO);
            return Err(Error::Process {
                process: described,
                error: Box::new(Error::Transport {
                    worker: Some(0),
                    source: io_or_status(source, status),
                }),
            });
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                result: None,
                status: None,
                ended: false,
            }),
            ended: Condvar::new(),
        });
        let waiter = Arc::clone(&shared);
        let process = described.clone();
        thread::Builder::new()
            .name(format!("multiproc-process-{pid}"))
            .spawn(move || {
                wait_for::<U>(&waiter, &process, child, link, replies);
                drop(pins);
                drop(parked);
            })
            .map_err(|e| Error::ProcessStart {
                process: described,
                reason: format!("could not start its waiter thread: {e}"),
            })?;
        Ok(Process {
            name,
            pid,
            shared,
            _result: std::marker::PhantomData,
        })
    }
}

/// One task running on one argument in a child process of its own: Python's
/// `multiprocessing.Process`, typed, with the task's return value delivered by
/// [`join`](Process::join).
///
/// The child is this executable started again, as pool workers are, so `main`
/// must call [`init`](crate::init) first. It dies with its parent. Dropping a
/// `Process` without joining it leaves the child running to the end of its task
/// (a thread of this process still reaps it); call
/// [`terminate`](Process::terminate) to stop it.
///
/// ```standalone_crate
/// fn main() -> multiproc::Result<()> {
///     multiproc::init(); // in a child process this call runs its task and never returns
///     let child = multiproc::Process::spawn(21u64, |x: u64| x * 2)?;
///     println!("child pid {}", child.pid());
///     assert_eq!(child.join()?, 42);
///     Ok(())
/// }
/// ```
pub struct Process<U> {
    name: String,
    pid: u32,
    shared: Arc<Shared<U>>,
    _result: std::marker::PhantomData<fn() -> U>,
}

struct Shared<U> {
    state: Mutex<State<U>>,
    ended: Condvar,
}

struct State<U> {
    result: Option<Result<U>>,
    status: Option<ExitStatus>,
    /// The child has been reaped (or can no longer be): its pid is no longer ours.
    ended: bool,
}

impl Process<()> {
    /// A builder to name the process or silence its output before it starts.
    pub fn builder() -> ProcessBuilder {
        ProcessBuilder {
            name: None,
            inherit_output: true,
        }
    }
}

impl<U> Process<U> {
    /// Starts a child process that runs `task(arg)` and returns at once.
    ///
    /// `task` is a `fn` or a closure that captures nothing, as for pools; `arg`
    /// travels to the child encoded.
    ///
    /// # Errors
    ///
    /// [`Error::EncodeItem`] or [`Error::DecodeItem`] when the argument does not
    /// cross, [`Error::ProcessStart`] when the child cannot be started or does not
    /// connect, [`Error::InitMissing`] in a child whose `main` did not call `init`.
    pub fn spawn<T, F>(arg: T, task: F) -> Result<Process<U>>
    where
        T: Serialize + DeserializeOwned,
        U: Serialize + DeserializeOwned + Send + 'static,
        F: Fn(T) -> U + Copy + Send + Sync,
    {
        Process::builder().spawn(arg, task)
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The name given to the builder, or `Process-N`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits for the child to end and returns its task's value. The child has been
    /// reaped when this returns: no zombie is left.
    ///
    /// # Errors
    ///
    /// [`Error::ProcessPanicked`] with the panic's message when the task panicked,
    /// [`Error::ProcessExited`] naming the signal or exit code when the child died
    /// without a value (killed, aborted, [`terminate`](Process::terminate)d),
    /// [`Error::ResultTaken`] after a successful
    /// [`join_timeout`](Process::join_timeout), [`Error::Process`] for the rest.
    pub fn join(self) -> Result<U> {
        let mut state = self.lock();
        while !state.ended {
            state = self
                .shared
                .ended
                .wait(state)
                .unwrap_or_else(|p| p.into_inner());
        }
        take(&mut state)
    }

    /// Waits at most `timeout` for the child to end and returns its task's value.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] when the child is still running (it goes on; join again
    /// later); otherwise as [`join`](Process::join).
    pub fn join_timeout(&self, timeout: Duration) -> Result<U> {
        let deadline = Instant::now().checked_add(timeout);
        let mut state = self.lock();
        while !state.ended {
            let left = match deadline {
                Some(deadline) => deadline.saturating_duration_since(Instant::now()),
                None => Duration::from_secs(3600),
            };
            if left.is_zero() {
                return Err(Error::Timeout(timeout));
            }
            state = self
                .shared
                .ended
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        take(&mut state)
    }

    /// Whether the child is still running (or has ended but is not reaped yet).
    pub fn is_alive(&self) -> bool {
        !self.lock().ended
    }

    /// How the child ended: `None` while it runs (or when it was reaped elsewhere,
    /// for example with `SIGCHLD` ignored). A child that returned its value exits
    /// with code 0.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.lock().status
    }

    /// Stops the child: SIGTERM, then SIGKILL if it is still running after a grace
    /// period of half a second. Returns once it has ended and been reaped; a later
    /// [`join`](Process::join) reports [`Error::ProcessExited`] naming the signal.
    /// Does nothing to a child that has already ended.
    ///
    /// # Errors
    ///
    /// [`Error::Process`] when the signal cannot be sent.
    pub fn terminate(&self) -> Result<()> {
        let deadline = Instant::now() + TERM_GRACE;
        let mut state = self.lock();
        if state.ended {
            return Ok(());
        }
        // The child is not reaped while this lock is held (the waiter reaps under
        // it), so the pid is still this child's when each signal is sent.
        self.signal(libc::SIGTERM)?;
        while !state.ended {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.signal(libc::SIGKILL)?;
                while !state.ended {
                    state = self
                        .shared
                        .ended
                        .wait(state)
                        .unwrap_or_else(|p| p.into_inner());
                }
                break;
            }
            state = self
                .shared
                .ended
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    fn signal(&self, signal: i32) -> Result<()> {
        spawn::send_signal(self.pid, signal).map_err(|source| Error::Process {
            process: describe(&self.name, self.pid),
            error: Box::new(Error::Transport {
                worker: Some(0),
                source,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State<U>> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<U> std::fmt::Debug for Process<U> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("name", &self.name)
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

fn take<U>(state: &mut State<U>) -> Result<U> {
    match state.result.take() {
        Some(result) => result,
        None => Err(Error::ResultTaken),
    }
}

fn describe(name: &str, pid: u32) -> String {
    format!("{name:?} (pid {pid})")
}

/// An I/O error, with the child's exit status in its message when it is known.
fn io_or_status(source: std::io::Error, status: Option<ExitStatus>) -> std::io::Error {
    match status {
        Some(status) => std::io::Error::new(source.kind(), format!("{source} (child {status})")),
        None => source,
    }
}

/// Starts the child and waits for its handshake.
fn start(name: &str, options: &SpawnOptions) -> Result<(Child, Accepted)> {
    let failed = |reason: String| Error::ProcessStart {
        process: format!("{name:?}"),
        reason,
    };
    let listener = Listener::new().map_err(|e| failed(format!("no rendezvous: {e}")))?;
    let server = listener.name().to_owned();
    let spawned =
        spawn::launch(0, &server, options).map_err(|e| failed(format!("could not spawn: {e}")))?;
    let mut child = spawn::wait_spawned(spawned, START_TIMEOUT)
        .map_err(|e| failed(format!("could not spawn: {e}")))?;
    let (done_tx, done_rx) = mpsc::channel();
    let accepting = thread::Builder::new()
        .name("multiproc-process-accept".into())
        .spawn(move || {
            // The receiver waits for this answer, or has given up.
            let _ = done_tx.send(listener.accept());
        });
    if let Err(e) = accepting {
        spawn::reap(child, Duration::ZERO);
        return Err(failed(format!("could not start its accept thread: {e}")));
    }
    let deadline = Instant::now() + START_TIMEOUT;
    let reason = loop {
        match done_rx.recv_timeout(Duration::from_millis(5)) {
            Ok(Ok(Some(accepted))) => {
                let (link, _) = &accepted;
                if link.pid != child.id() {
                    break format!(
                        "it announced pid {} but the process started was {}",
                        link.pid,
                        child.id()
                    );
                }
                if link.fingerprint != task::binary_fingerprint() {
                    break "it runs a different build of this program".into();
                }
                return Ok((child, accepted));
            }
            Ok(Ok(None)) => break "the handshake was aborted".into(),
            Ok(Err(e)) => break format!("handshake failed: {e}"),
            Err(mpsc::RecvTimeoutError::Disconnected) => break "the accept thread stopped".into(),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let reason = match child.try_wait() {
                    Ok(Some(status)) if status.code() == Some(START_FAILED) => Some(format!(
                        "it could not connect ({status}); its standard error says why"
                    )),
                    Ok(Some(status)) => Some(format!(
                        "it exited ({status}) before connecting; does `main` call \
                         `multiproc::init()` first (or the test crate \
                         `multiproc::enable_test_support!()`)?"
                    )),
                    _ if Instant::now() >= deadline => {
                        Some(format!("no hello within {START_TIMEOUT:?}"))
                    }
                    _ => None,
                };
                if let Some(reason) = reason {
                    // Wake the accept thread so it ends; it then answers `Ok(None)`.
                    let _ = Listener::abort(&server);
                    let _ = done_rx.recv_timeout(Duration::from_secs(1));
                    break reason;
                }
            }
        }
    };
    spawn::reap(child, Duration::ZERO);
    Err(failed(reason))
}

/// The waiter thread: receives the one reply, hangs up, reaps the child, and
/// publishes the result and the exit status.
fn wait_for<U: DeserializeOwned>(
    shared: &Shared<U>,
    process: &str,
    mut child: Child,
    link: ParentLink,
    replies: ipc_channel::ipc::IpcReceiver<RawFrame>,
) {
    let received = transport::recv_reply(&replies);
    let outcome = match received {
        Ok(Some(raw)) => Some(read_reply::<U>(&link, raw, process)),
        Ok(None) => None,
        Err(source) => Some(Err(Error::Process {
            process: process.to_owned(),
            error: Box::new(Error::Transport {
                worker: Some(0),
                source,
            }),
        })),
    };
    // Hanging up tells a worker that has replied to exit; every descriptor of
    // the child's channels is closed before `join` can return.
    drop(link);
    drop(replies);
    let mut pause = Duration::from_micros(20);
    loop {
        let mut state = shared.state.lock().unwrap_or_else(|p| p.into_inner());
        let status = match child.try_wait() {
            Ok(Some(status)) => Some(Some(status)),
            Ok(None) => None,
            Err(_) => Some(None),
        };
        if let Some(status) = status {
            state.status = status;
            state.result = Some(outcome.unwrap_or_else(|| {
                Err(Error::ProcessExited {
                    process: process.to_owned(),
                    status,
                })
            }));
            state.ended = true;
            drop(state);
            shared.ended.notify_all();
            return;
        }
        drop(state);
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(10));
    }
}

fn read_reply<U: DeserializeOwned>(link: &ParentLink, raw: RawFrame, process: &str) -> Result<U> {
    let wrap = |error: Error| Error::Process {
        process: process.to_owned(),
        error: Box::new(error),
    };
    let frame = link.open(raw).map_err(|source| {
        wrap(Error::Transport {
            worker: Some(0),
            source,
        })
    })?;
    let (reply, payload) = protocol::open::<Reply>(&frame)
        .map_err(|reason| wrap(Error::Protocol { worker: 0, reason }))?;
    match reply {
        Reply::Done { .. } => codec::decode::<U>(payload).map_err(|source| {
            wrap(Error::Result {
                items: 0..1,
                worker: 0,
                source,
            })
        }),
        Reply::Failed {
            failure: Failure::Panicked { panic, .. },
            ..
        } => Err(Error::ProcessPanicked {
            process: process.to_owned(),
            panic,
        }),
        Reply::Failed { failure, .. } => Err(wrap(outcome::describe(failure, 0, 0..1).1)),
    }
}
