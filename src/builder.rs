//! PoolBuilder: how a pool's workers are started and supervised.

use std::any::TypeId;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::engine::backend::{self, BACKEND_ENV, Backend, StartOptions, WORKERS_ENV, WorkerSet};
use crate::engine::chunker;
use crate::engine::driver::Core;
use crate::engine::ends::encode_item;
use crate::engine::progress::{Bars, Relay};
use crate::engine::scheduler::{Engine, Hooks, Submission};
use crate::engine::supervisor::Supervisor;
use crate::engine::trace::Trace;
use crate::error::{Error, ErrorPolicy, Result};
use crate::os::spawn::SpawnOptions;
use crate::pool::Pool;
use crate::shared::region::{self, Pins};
use crate::wire::protocol::TaskRef;
use crate::worker::serve;
use crate::worker::task;

/// The default of [`PoolBuilder::share_contexts_above`]: 1 MiB.
const DEFAULT_SHARE_CONTEXTS_ABOVE: usize = 1 << 20;

impl Pool {
    /// Starts configuring a pool.
    pub fn builder() -> PoolBuilder {
        PoolBuilder::default()
    }
}

/// An initializer given to the builder: its runner and encoded argument, or why it
/// cannot be used.
#[derive(Debug, Clone)]
struct Initializer {
    prepared: std::result::Result<(TaskRef, Vec<u8>), String>,
    state: (TypeId, &'static str),
    /// Shared inputs the argument names: every worker the pool starts decodes it.
    pins: Pins,
}

/// Configures and starts a [`Pool`].
///
/// ```standalone_crate
/// use std::time::{Duration, Instant};
/// fn main() -> multiproc::Result<()> {
///     multiproc::init();
///     let pool = multiproc::Pool::builder()
///         .workers(2)
///         .chunk_size(64)
///         .start_timeout(Duration::from_secs(5))
///         .max_tasks_per_worker(1_000)
///         .build()?;
///     assert_eq!(pool.workers(), 2);
///     Ok(())
/// }
/// ```
#[derive(Debug, Clone)]
pub struct PoolBuilder {
    workers: Option<usize>,
    chunk_size: Option<usize>,
    backend: Option<Backend>,
    inherit_output: bool,
    start_timeout: Duration,
    max_tasks: Option<usize>,
    initializer: Option<Initializer>,
    max_in_flight: Option<usize>,
    retries: u32,
    task_timeout: Option<Duration>,
    call_timeout: Option<Duration>,
    error_policy: ErrorPolicy,
    interrupt: bool,
    memory_limit: Option<u64>,
    share_contexts_above: usize,
    kill_before_send: Option<(usize, u64)>,
    corrupt_reply: Option<(usize, u64)>,
    fail_starts_after: Option<u64>,
    announce_parent_pid: Option<usize>,
    progress: bool,
    trace: Option<TraceTo>,
    /// A pipeline's shared bars and the stage's label on them.
    bars: Option<(Bars, String)>,
}

/// Where a pool writes its timeline.
#[derive(Clone)]
pub(crate) enum TraceTo {
    /// A file of its own, created when the pool is built.
    File(PathBuf),
    /// A file shared with other pools (a pipeline's stages), under this name.
    Shared(Arc<Trace>, String),
}

impl std::fmt::Debug for TraceTo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TraceTo::File(path) => write!(f, "File({})", path.display()),
            TraceTo::Shared(_, name) => write!(f, "Shared({name})"),
        }
    }
}

impl Default for PoolBuilder {
    fn default() -> Self {
        Self {
            workers: None,
            chunk_size: None,
            backend: None,
            inherit_output: true,
            start_timeout: Duration::from_secs(30),
            max_tasks: None,
            initializer: None,
            max_in_flight: None,
            retries: 1,
            task_timeout: None,
            call_timeout: None,
            error_policy: ErrorPolicy::FailFast,
            interrupt: false,
            memory_limit: None,
            share_contexts_above: DEFAULT_SHARE_CONTEXTS_ABOVE,
            kill_before_send: None,
            corrupt_reply: None,
            fail_starts_after: None,
            announce_parent_pid: None,
            progress: false,
            trace: None,
            bars: None,
        }
    }
}

impl PoolBuilder {
    /// Draws a progress bar per job on stderr: items done (of how many, when the
    /// input's size is known), rate, elapsed time and ETA, failures and retries
    /// when there are any; one final line per job is left when it ends. Bars are
    /// drawn by the parent, only when stderr is a terminal. `MULTIPROC_PROGRESS=1`
    /// turns them on for a program that did not ask (and draws them, a line a
    /// second, even when stderr is not a terminal); `MULTIPROC_PROGRESS=0` turns
    /// them off. Off by default; `apply_async` submissions have no bar.
    ///
    /// While bars are drawn, what worker processes print to stdout and stderr
    /// comes through the parent a line at a time, written above the bars, so it
    /// never lands on a bar's line (threads of the inline backend print directly).
    pub fn progress(mut self, on: bool) -> Self {
        self.progress = on;
        self
    }

    /// Writes the pool's timeline to `path` as a Chrome trace-event file: one track
    /// per worker and one for the parent, a slice per chunk (its job, item range
    /// and bytes), per worker start-up and per job, and instants for lost workers,
    /// chunks sent again, poison items and timeouts. Open it in
    /// <https://ui.perfetto.dev> (drag the file onto the page) or in Chromium's
    /// `chrome://tracing`. The file is created when the pool is built, written as
    /// events happen, flushed at the end of every job (so it can be opened while
    /// the program runs) and closed when the pool is dropped.
    ///
    /// ```standalone_crate
    /// fn main() -> multiproc::Result<()> {
    ///     multiproc::init();
    ///     let dir = std::env::temp_dir().join(format!("trace-doc-{}", std::process::id()));
    ///     std::fs::create_dir_all(&dir).unwrap();
    ///     let path = dir.join("timeline.json");
    ///     {
    ///         let pool = multiproc::Pool::builder().workers(2).trace(&path).build()?;
    ///         pool.map(0..1_000u64, |x| x + 1)?;
    ///     } // the file is complete once the pool is dropped
    ///     let text = std::fs::read_to_string(&path).unwrap();
    ///     assert!(text.trim_start().starts_with('[') && text.trim_end().ends_with(']'));
    ///     std::fs::remove_dir_all(&dir).unwrap();
    ///     Ok(())
    /// }
    /// ```
    pub fn trace(mut self, path: impl AsRef<Path>) -> Self {
        self.trace = Some(TraceTo::File(path.as_ref().to_owned()));
        self
    }

    /// For a pipeline's stages: a trace file shared by every stage.
    pub(crate) fn trace_shared(mut self, trace: Arc<Trace>, name: String) -> Self {
        self.trace = Some(TraceTo::Shared(trace, name));
        self
    }

    /// For a pipeline's stages: bars drawn together, this stage's under `label`.
    pub(crate) fn bars_shared(mut self, bars: Bars, label: String) -> Self {
        self.bars = Some((bars, label));
        self
    }

    /// Context values (of [`Pool::map_with`] and [`Pool::map_reduce_with`]) whose
    /// encoding is larger than `bytes` are shared through a sealed memory map instead
    /// of being sent to each worker; the default is 1 MiB, as joblib's `max_nbytes`.
    ///
    /// The task still gets `&C`: a worker decodes the value from the map it attached
    /// instead of from a message, so one copy of the bytes serves every worker
    /// however many there are. `usize::MAX` turns this off.
    pub fn share_contexts_above(mut self, bytes: usize) -> Self {
        self.share_contexts_above = bytes;
        self
    }

    /// Number of workers. The default is `MULTIPROC_WORKERS` when that variable is
    /// set (as `RAYON_NUM_THREADS` is for rayon), else the number of CPUs this
    /// process may use (`num_cpus::get()`: its affinity mask and its cgroup's CPU
    /// quota, so `taskset -c 0` gives one worker). A value set here wins over the
    /// variable.
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = Some(workers);
        self
    }

    /// Items per chunk. By default the size adapts so that a chunk holds about one
    /// millisecond of work and fits one socket message (about 199 KiB of encoded
    /// items with Linux's default socket buffer); a fixed size
    /// lifts that byte limit (a chunk over the socket's one-message size travels
    /// through shared memory).
    pub fn chunk_size(mut self, items: usize) -> Self {
        self.chunk_size = Some(items);
        self
    }

    /// Runs the workers as threads in this process instead of child processes: the
    /// same protocol and encoding, without the isolation. For tests and debugging.
    /// A thread cannot be killed: a stuck task keeps its thread, which the pool
    /// abandons (it does not wait for it when dropped). `inline(true)` is
    /// [`backend(Backend::Inline)`](Self::backend), `inline(false)` is
    /// `backend(Backend::Process)`.
    pub fn inline(mut self, inline: bool) -> Self {
        self.backend = Some(if inline {
            Backend::Inline
        } else {
            Backend::Process
        });
        self
    }

    /// Where the workers run: processes on this machine, threads in this process, or
    /// the ranks of an MPI job (crate feature `mpi`). The default is
    /// `MULTIPROC_BACKEND` (`process`, `inline` or `mpi`) when set, else
    /// [`Backend::Mpi`] when the program runs as an MPI job of more than one rank
    /// (started by `mpirun` or `srun`, with [`init`](crate::init) first in `main`),
    /// else processes. A value set here wins over the variable.
    ///
    /// Under MPI, [`workers`](Self::workers) counts the workers of all serving ranks
    /// together (by default, what the ranks offer: each its CPUs, or its own
    /// `MULTIPROC_WORKERS`); worker `w` of a job with `S` serving ranks runs on rank
    /// `1 + w % S`.
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = Some(backend);
        self
    }

    /// Whether worker processes write to this process's stdout and stderr (the
    /// default, as in Python's `multiprocessing`), or to `/dev/null`.
    pub fn inherit_output(mut self, inherit: bool) -> Self {
        self.inherit_output = inherit;
        self
    }

    /// How long a starting worker may take to connect before the start fails; the
    /// default is 30 seconds. A worker that exits before connecting fails the start
    /// at once.
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    /// Replaces a worker after it has been given `n` items (Python's
    /// `maxtasksperchild`), to contain leaks in the tasks or the libraries they use.
    /// The replacement is started as soon as the old worker has its last item, while
    /// that worker finishes, so the pool keeps its strength. Chunks never take a
    /// worker past `n` items.
    pub fn max_tasks_per_worker(mut self, n: usize) -> Self {
        self.max_tasks = Some(n);
        self
    }

    /// Runs `init(arg)` once in each worker when it starts (replacements included)
    /// and keeps what it returns as that worker's state, which tasks given to
    /// [`Pool::map_with_state`] get as `&mut S` (Python's `initializer` and
    /// `initargs`, typed). `init` is a `fn` or a closure that captures nothing; `arg`
    /// is encoded once, here.
    ///
    /// A panic in `init` fails [`build`](Self::build) with [`Error::Initializer`]; in
    /// a replacement worker, it fails the tasks that need the state with
    /// [`Error::WorkerState`].
    pub fn initializer<A, S, F>(mut self, init: F, arg: A) -> Self
    where
        A: Serialize + DeserializeOwned,
        S: 'static,
        F: Fn(A) -> S + Copy + Send + Sync,
    {
        task::assert_zero_sized::<F>();
        let _ = init;
        let mut bytes = Vec::new();
        let (prepared, pins) = region::pin_while(|| match TaskRef::init::<A, S, F>() {
            None => Err("the initializer is not in the program's executable".to_owned()),
            Some(task) => encode_item(&arg, 0, &mut bytes)
                .map(|()| (task, bytes))
                .map_err(|e| format!("its argument does not encode: {e}")),
        });
        self.initializer = Some(Initializer {
            prepared,
            state: (TypeId::of::<S>(), std::any::type_name::<S>()),
            pins,
        });
        self
    }

    /// How many times a chunk whose worker died (killed by a signal, aborted, out of
    /// memory) is sent again to a fresh worker before its job fails with
    /// [`Error::WorkerExited`]; the default is 1. Results are delivered exactly once
    /// and in order, as if nothing happened: the dead worker cannot answer, and a
    /// fold counts each chunk once. A task that panics is not retried: its error is
    /// its answer.
    ///
    /// Tasks run *at least* once: the items of a lost chunk run again, so what a
    /// task does besides returning its result (a `Queue` put, a file written) can
    /// happen twice.
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// Kills a worker whose current item runs longer than `timeout`, replaces it,
    /// and fails that item with [`Error::TimedOut`] (its job, or its handle for
    /// `apply_async`); the worker's other chunks are sent again. Under a task
    /// timeout every item is sent as its own chunk, so the deadline is the item's:
    /// use it for tasks of milliseconds or more, not for tiny ones.
    pub fn task_timeout(mut self, timeout: Duration) -> Self {
        self.task_timeout = Some(timeout);
        self
    }

    /// Fails a blocking call (`map`, `map_reduce` and their `_with` forms) that has
    /// not finished within `timeout` with [`Error::CallTimedOut`], and stops the
    /// workers running its chunks: an upper bound for a batch job. [`Pool::apply`]
    /// returns the same error but leaves its task running; use
    /// [`task_timeout`](Self::task_timeout) to have it killed.
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = Some(timeout);
        self
    }

    /// What a failed item does to the call it belongs to (default
    /// [`ErrorPolicy::FailFast`]: the first failure ends the call).
    ///
    /// Under [`ErrorPolicy::Collect`] or [`ErrorPolicy::Skip`] every item runs:
    /// `map`, `map_reduce` (and their `_with` forms) and `map_async` then fail with
    /// [`Error::ItemsFailed`] listing each failed item; `imap` and `imap_unordered`
    /// yield a failed item's `Err` in its place and go on (`Collect`) or leave it out
    /// and keep it in their `failures()` (`Skip`). [`Pool::map_collect`] and
    /// [`Pool::map_skip`] choose their policy themselves, and each `apply_async`
    /// handle always fails alone.
    pub fn error_policy(mut self, policy: ErrorPolicy) -> Self {
        self.error_policy = policy;
        self
    }

    /// Limits each worker's address space to `bytes` (`RLIMIT_AS`), so one input
    /// that makes a task allocate without bound kills its worker, not the machine.
    /// The chunk is retried like any lost chunk, then its job fails with
    /// [`Error::MemoryLimit`]. The limit counts mapped memory, not only what is
    /// used: leave room for the program itself (tens of MiB) and for large frames.
    pub fn memory_limit(mut self, bytes: u64) -> Self {
        self.memory_limit = Some(bytes);
        self
    }

    /// Makes Ctrl-C (SIGINT) stop a blocking call (`map`, `map_reduce` and their
    /// `_with` forms) instead of the program: the call sends nothing more, gives
    /// running tasks a grace period of a quarter second, kills the workers still
    /// running its chunks and returns [`Error::Interrupted`] saying how many items
    /// were done. The handler is installed only while such a call runs, and a
    /// handler the program installed itself (signal-hook, ctrlc) is still called.
    /// Off by default: then Ctrl-C does what the program made it do (by default it
    /// ends the program, and the workers die with it). Workers always ignore
    /// SIGINT and sit in a process group of their own, so a terminal's Ctrl-C
    /// reaches only this process.
    pub fn interrupt_on_ctrl_c(mut self, on: bool) -> Self {
        self.interrupt = on;
        self
    }

    /// Fault injection for tests of this crate: kills the worker in slot `worker`
    /// just before its `send`-th request (counted from 0: contexts, chunks and the
    /// initializer all count) is sent, as if it had died while idle.
    #[doc(hidden)]
    pub fn kill_worker_before_send(mut self, worker: usize, send: u64) -> Self {
        self.kill_before_send = Some((worker, send));
        self
    }

    /// Fault injection for tests of this crate: replaces the `reply`-th reply
    /// (counted from 0) of the worker in slot `worker` by bytes that are not a frame.
    #[doc(hidden)]
    pub fn corrupt_reply_from(mut self, worker: usize, reply: u64) -> Self {
        self.corrupt_reply = Some((worker, reply));
        self
    }

    /// Fault injection for tests of this crate: the worker in slot `worker`
    /// announces its parent's pid instead of its own at the handshake (told so
    /// through its environment at spawn), so the parent's check of the announced pid
    /// against the child it started refuses it, at every start of that slot.
    #[doc(hidden)]
    pub fn announce_parent_pid_from(mut self, worker: usize) -> Self {
        self.announce_parent_pid = Some(worker);
        self
    }

    /// Caps adaptive chunks so that a job's window of chunks in flight holds at
    /// most about `items` items (pipeline stages bound their queues in items this
    /// way).
    pub(crate) fn max_items_in_flight(mut self, items: usize) -> Self {
        self.max_in_flight = Some(items.max(1));
        self
    }

    /// Test-only fault injection: starting a worker process fails once `starts`
    /// have been started (the first ones, and any replacements, count).
    #[doc(hidden)]
    pub fn fail_starts_after(mut self, starts: u64) -> Self {
        self.fail_starts_after = Some(starts);
        self
    }

    /// Starts the workers and waits until each has connected (and run the
    /// initializer, if any).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for zero workers or a zero chunk size, [`Error::Environment`]
    /// for a `MULTIPROC_WORKERS` or `MULTIPROC_BACKEND` it cannot read, [`Error::InitMissing`]
    /// when called in a worker process whose `main` did not call [`init`](crate::init)
    /// first, [`Error::Spawn`] or [`Error::Handshake`] when a worker cannot be started,
    /// [`Error::Initializer`] when the initializer fails.
    pub fn build(self) -> Result<Pool> {
        let kind = match self.backend {
            Some(kind) => kind,
            None => default_backend()?,
        };
        if kind == Backend::Mpi && !cfg!(feature = "mpi") {
            return Err(Error::Config(
                "the MPI backend needs multiproc built with its `mpi` feature",
            ));
        }
        let mpi_workers = (kind == Backend::Mpi)
            .then(backend::mpi_default_workers)
            .flatten();
        let workers = match (self.workers, mpi_workers) {
            (Some(workers), _) => workers,
            (None, Some(workers)) => workers,
            (None, None) => env_workers()?,
        };
        let inline = kind == Backend::Inline;
        let progress = progress_setting()?;
        if workers == 0 {
            return Err(Error::Config("a pool needs at least one worker"));
        }
        if self.chunk_size == Some(0) {
            return Err(Error::Config("chunk size must be at least one item"));
        }
        if self
            .chunk_size
            .is_some_and(|n| n > chunker::MAX_CHUNK_ITEMS)
        {
            return Err(Error::Config("chunk size must be at most 2^24 items"));
        }
        if self.max_tasks == Some(0) {
            return Err(Error::Config("max_tasks_per_worker must be at least 1"));
        }
        if !inline && serve::init_missing() {
            return Err(Error::InitMissing);
        }
        let (init, state, init_pins) = match self.initializer {
            None => (None, None, Pins::default()),
            Some(Initializer {
                prepared: Ok(prepared),
                state,
                pins,
            }) => {
                let (task, arg) = prepared;
                (Some((task, arg, pins.unsealed())), Some(state), pins)
            }
            Some(Initializer {
                prepared: Err(reason),
                ..
            }) => return Err(Error::Initializer { worker: 0, reason }),
        };
        let wanted = match progress {
            Some(forced) => forced,
            None => self.progress,
        };
        let (bars, label) = match self.bars {
            _ if !wanted => (None, None),
            Some((bars, label)) => (Some(bars), Some(label)),
            None => (Some(Bars::new(progress == Some(true))), None),
        };
        // Workers' output goes past drawn bars through the parent, never over them.
        let (relay, writers) = match &bars {
            Some(bars) if self.inherit_output && !inline => {
                match Relay::start(bars).map_err(|source| Error::Spawn { worker: 0, source })? {
                    Some((relay, writers)) => (Some(relay), Some(Arc::new(writers))),
                    None => (None, None),
                }
            }
            _ => (None, None),
        };
        let options = StartOptions {
            spawn: SpawnOptions {
                inherit_output: self.inherit_output,
                relay: writers,
                memory_limit: self.memory_limit,
                announce_parent_pid: self.announce_parent_pid,
                #[cfg(test)]
                program: None,
            },
            start_timeout: self.start_timeout,
            kill_before_send: self.kill_before_send,
            corrupt_reply: self.corrupt_reply,
            fail_starts_after: self.fail_starts_after,
        };
        let began = std::time::Instant::now();
        let backend = WorkerSet::start(kind, workers, options)?;
        let supervisor = Supervisor::new(backend, self.max_tasks, init, began);
        let mut engine = Engine::new(supervisor, self.chunk_size, workers);
        if let Some(items) = self.max_in_flight {
            engine.max_chunk_items = items.div_ceil(engine.window_chunks()).max(1);
        }
        engine.retries = self.retries;
        engine.task_timeout = self.task_timeout;
        engine.memory_limit = self.memory_limit;
        engine.trace = match self.trace {
            None => None,
            Some(TraceTo::File(path)) => {
                let trace = Trace::create(&path).map_err(|source| Error::Trace { path, source })?;
                Some(trace.track("pool"))
            }
            Some(TraceTo::Shared(trace, name)) => Some(trace.track(&name)),
        };
        engine.note_starts();
        engine.bars = bars;
        engine.label = label;
        engine.relay = relay;
        if engine.workers.initializing() {
            engine.drive(&Starting, None, &mut |e| !e.workers.initializing(), None)?;
        }
        if let Some((worker, reason)) = engine.init_failures.pop() {
            return Err(Error::Initializer { worker, reason });
        }
        Ok(Pool {
            core: Core::new(engine),
            workers,
            call_timeout: self.call_timeout,
            error_policy: self.error_policy,
            interrupt: self.interrupt,
            state,
            share_contexts_above: self.share_contexts_above,
            _init_pins: init_pins,
        })
    }
}

/// The hooks of an engine not yet shared: nothing can be submitted to it yet.
struct Starting;

impl Hooks for Starting {
    fn take_inbox(&self) -> Vec<Submission> {
        Vec::new()
    }
    fn terminating(&self) -> bool {
        false
    }
    fn notify(&self) {}
}

/// The number of workers a pool gets when the program does not say: under MPI, what
/// the serving ranks offer together; else `MULTIPROC_WORKERS` when set, else the
/// CPUs this process may use (its affinity mask and cgroup CPU quota). For sizing
/// pipeline stages and pools the way a default pool is sized, as rayon's
/// `current_num_threads` is used.
///
/// # Errors
///
/// [`Error::Environment`] for a `MULTIPROC_WORKERS` it cannot read.
pub fn default_workers() -> Result<usize> {
    match backend::mpi_default_workers() {
        Some(workers) => Ok(workers),
        None => env_workers(),
    }
}

/// The worker count a pool gets when the program does not say: `MULTIPROC_WORKERS`,
/// else the CPUs this process may use.
fn env_workers() -> Result<usize> {
    let Some(value) = std::env::var_os(WORKERS_ENV) else {
        return Ok(num_cpus::get());
    };
    let text = value.to_string_lossy();
    match text.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(Error::Environment {
            variable: WORKERS_ENV,
            value: text.into_owned(),
            expected: "a number of workers, at least 1",
        }),
    }
}

/// Turns progress bars on or off whatever the program asked (`1` / `0`).
pub(crate) const PROGRESS_ENV: &str = "MULTIPROC_PROGRESS";

/// What `MULTIPROC_PROGRESS` says: `Some(true)` forces bars on (drawn even when
/// stderr is not a terminal), `Some(false)` off, `None` leaves it to the program.
pub(crate) fn progress_setting() -> Result<Option<bool>> {
    let Some(value) = std::env::var_os(PROGRESS_ENV) else {
        return Ok(None);
    };
    let text = value.to_string_lossy();
    match text.trim() {
        "" => Ok(None),
        "1" | "true" | "on" | "yes" => Ok(Some(true)),
        "0" | "false" | "off" | "no" => Ok(Some(false)),
        _ => Err(Error::Environment {
            variable: PROGRESS_ENV,
            value: text.into_owned(),
            expected: "`1` or `0`",
        }),
    }
}

/// Where a pool runs its workers when the program does not say: `MULTIPROC_BACKEND`,
/// else the MPI job this program runs as, else processes.
fn default_backend() -> Result<Backend> {
    let unset = if backend::mpi_default_workers().is_some() {
        Backend::Mpi
    } else {
        Backend::Process
    };
    let Some(value) = std::env::var_os(BACKEND_ENV) else {
        return Ok(unset);
    };
    let text = value.to_string_lossy();
    match text.trim() {
        "" => Ok(unset),
        "process" => Ok(Backend::Process),
        "inline" => Ok(Backend::Inline),
        "mpi" => Ok(Backend::Mpi),
        _ => Err(Error::Environment {
            variable: BACKEND_ENV,
            value: text.into_owned(),
            expected: "`process`, `inline` or `mpi`",
        }),
    }
}
