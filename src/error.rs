//! The crate's error type: every failure says which item, worker or chunk it concerns.

use std::fmt;
use std::ops::Range;
use std::process::ExitStatus;

use serde::{Deserialize, Serialize};

/// What a failed item does to its call (set with
/// [`PoolBuilder::error_policy`](crate::PoolBuilder::error_policy), or per call with
/// [`Pool::map_collect`](crate::Pool::map_collect) and
/// [`Pool::map_skip`](crate::Pool::map_skip)).
///
/// A failed item is one whose task panicked, whose result did not encode, that ran
/// past `task_timeout`, or that killed its worker on every attempt (`retries(n)`
/// more than once: a *poison* item). Under `Collect` and `Skip` the chunk holding it
/// is sent again with the failed item passed over, so every other item runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ErrorPolicy {
    /// Stop feeding at the first failure, stop the workers running the call's
    /// other chunks, and return that failure. The default.
    #[default]
    FailFast,
    /// Run every item. `map_collect` returns each item's own `Result`; calls whose
    /// result has no place for a failed item (`map`, `map_reduce`) run every item
    /// and then return [`Error::ItemsFailed`] listing every failure.
    Collect,
    /// Run every item. `map_skip` returns the good results with a report of the
    /// failed items; `map` and `map_reduce` behave as under `Collect`.
    Skip,
}

impl ErrorPolicy {
    /// Whether a failed item leaves the other items of its call running.
    pub(crate) fn goes_on(self) -> bool {
        !matches!(self, ErrorPolicy::FailFast)
    }
}

/// Everything that can make a multiproc call fail.
///
/// Each variant names where the failure happened: the index of the item in the input
/// sequence, the worker number (`0..workers`), or both. Indices count from zero in the
/// order the input iterator yielded the items.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The task panicked while processing an item (or the reduce panicked while
    /// folding that item's result into its chunk's partial result).
    #[error("task panicked on item {item} in worker {}: {panic}", worker_name(*.worker))]
    TaskPanicked {
        /// Index of the item in the input.
        item: usize,
        /// Worker that ran the task.
        worker: usize,
        /// The panic message and location.
        panic: TaskPanic,
    },
    /// A worker died (killed by a signal, aborted, exited) while it held a chunk.
    #[error("worker {} exited before replying ({}) while running items {items:?}", worker_name(*.worker), exit_description(.status))]
    WorkerExited {
        /// The worker that died.
        worker: usize,
        /// The items of the chunk it was running or had queued first.
        items: Range<usize>,
        /// How the worker process ended; `None` when it had already been reaped by
        /// someone else (for example with `SIGCHLD` ignored).
        status: Option<ExitStatus>,
    },
    /// An input item could not be encoded in the parent.
    #[error("could not encode item {item}")]
    EncodeItem {
        /// Index of the item in the input.
        item: usize,
        /// What the codec reported.
        #[source]
        source: CodecError,
    },
    /// An input item was encoded but does not decode again, in the parent's round-trip
    /// check or in a worker. Serde attributes that need a self-describing format
    /// (`skip_serializing_if`, `untagged`, `flatten`) cause this.
    #[error("could not decode item {item} {}", decoded_where(.worker))]
    DecodeItem {
        /// Index of the item in the input.
        item: usize,
        /// The worker that failed to decode it, or `None` for the parent's check.
        worker: Option<usize>,
        /// What the codec reported.
        #[source]
        source: CodecError,
    },
    /// The result for some items could not be encoded in a worker or decoded in the
    /// parent. For `map_reduce` the range is the chunk whose partial result failed.
    #[error("could not carry the result of items {items:?} back from worker {}", worker_name(*.worker))]
    Result {
        /// The items whose result (or chunk partial) failed.
        items: Range<usize>,
        /// The worker that produced it.
        worker: usize,
        /// What the codec reported.
        #[source]
        source: CodecError,
    },
    /// The context value of a `*_with` call could not be encoded, or a worker could
    /// not decode it.
    #[error("could not carry the context value {}", context_where(.worker))]
    Context {
        /// The worker that failed to decode it, or `None` when encoding failed.
        worker: Option<usize>,
        /// What the codec reported.
        #[source]
        source: CodecError,
    },
    /// A worker process could not be started.
    #[error("could not start worker {}", worker_name(*.worker))]
    Spawn {
        /// The worker slot being started.
        worker: usize,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The MPI job cannot go on: a rank failed, sent something unreadable, or did
    /// not answer. MPI jobs are fail-stop: the job ends, it does not lose a rank and
    /// go on.
    #[error("the MPI job failed{}: {reason}", rank_where(.rank))]
    Mpi {
        /// The rank concerned, when one is.
        rank: Option<usize>,
        /// Why, in words.
        reason: String,
    },
    /// A worker process started but never connected back.
    #[error("worker {} did not connect: {reason}", worker_name(*.worker))]
    Handshake {
        /// The worker slot being started.
        worker: usize,
        /// Why, in words.
        reason: String,
    },
    /// A channel to a worker, or the wait for replies, failed for a reason other
    /// than a worker's exit.
    #[error("lost the channel {}", channel_description(.worker))]
    Transport {
        /// The worker at the other end, when one worker's channel failed.
        worker: Option<usize>,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A message that does not follow the protocol arrived (a bug or a corrupted
    /// channel; never acted upon).
    #[error("malformed message from worker {}: {reason}", worker_name(*.worker))]
    Protocol {
        /// The worker at the other end.
        worker: usize,
        /// What was wrong with it.
        reason: String,
    },
    /// This process was started as a worker but `main` did not call
    /// [`init`](crate::init) before using multiproc, so it would start workers of its
    /// own instead of serving its parent.
    #[error(
        "this process was started as a multiproc worker but `multiproc::init()` was not called \
         first in main (or `multiproc::enable_test_support!()` in a test binary)"
    )]
    InitMissing,
    /// The pool is already running a call on this thread: the input iterator, an
    /// item's `Serialize`, or the parent-side `reduce` called back into the same pool,
    /// which would wait for itself forever.
    #[error(
        "the pool is already running a call on this thread (called back from the input, serialization or reduce)"
    )]
    NestedCall,
    /// An item ran past the pool's task timeout
    /// ([`PoolBuilder::task_timeout`](crate::PoolBuilder::task_timeout)); its worker
    /// was killed and replaced.
    #[error("item {item} ran past its {timeout:?} deadline in worker {}, which was killed", worker_name(*.worker))]
    TimedOut {
        /// Index of the item in the input.
        item: usize,
        /// The worker that ran it.
        worker: usize,
        /// The deadline it passed.
        timeout: std::time::Duration,
    },
    /// A call did not finish within the pool's call timeout
    /// ([`PoolBuilder::call_timeout`](crate::PoolBuilder::call_timeout)); the
    /// workers running its chunks were stopped.
    #[error("the call did not finish within {timeout:?} ({done} items done)")]
    CallTimedOut {
        /// The time limit.
        timeout: std::time::Duration,
        /// Items whose results had been delivered.
        done: usize,
    },
    /// A worker died (aborted or killed) under the pool's memory limit
    /// ([`PoolBuilder::memory_limit`](crate::PoolBuilder::memory_limit)): most likely
    /// the task ran out of the memory allowed.
    #[error("worker {} died, most likely out of its {limit}-byte memory limit, while running items {items:?} ({})", worker_name(*.worker), exit_description(.status))]
    MemoryLimit {
        /// The worker that died.
        worker: usize,
        /// The items of the chunk it was running.
        items: Range<usize>,
        /// The limit, in bytes.
        limit: u64,
        /// How the worker process ended.
        status: Option<ExitStatus>,
    },
    /// Ctrl-C (SIGINT) arrived during a call of a pool built with
    /// [`PoolBuilder::interrupt_on_ctrl_c`](crate::PoolBuilder::interrupt_on_ctrl_c):
    /// the call stopped, running tasks had a short grace period, and the workers
    /// still running its chunks were killed.
    #[error("interrupted by Ctrl-C (SIGINT) after {done} items")]
    Interrupted {
        /// Items whose results had been delivered when the call stopped.
        done: usize,
    },
    /// A stage of a [`Pipeline`](crate::Pipeline) failed (stages count from 1); the
    /// error inside names the item (its index in that stage's input) and the
    /// worker.
    #[error("stage {stage} of the pipeline failed: {error}")]
    Stage {
        /// The stage, counted from 1 in the order they were added.
        stage: usize,
        /// What went wrong there.
        error: Box<Error>,
    },
    /// `multiproc::par_map` or `multiproc::par_map_reduce` was
    /// called from a task running in a worker process. The default pool would start
    /// one worker per CPU in every worker; as Python refuses children of its pool
    /// workers, this is refused. A task that really wants a pool of its own builds
    /// one with [`Pool::builder`](crate::Pool::builder).
    #[error(
        "par_map was called inside a worker process, where it would start a pool of one worker per CPU in every worker; build a pool explicitly if that is wanted"
    )]
    InsideWorker,
    /// The task's code is not part of the program's executable (it lives in a
    /// dynamic library or plugin), so a worker process cannot find it by address.
    #[error("the task is not in the program's executable, so workers cannot find it")]
    TaskNotInExecutable,
    /// A shared input ([`SharedSlice`](crate::SharedSlice), [`Shared`](crate::Shared),
    /// or a large context shared automatically) could not be made: the file cannot be
    /// read or has the wrong length, or memory is short.
    #[error("could not share {what}: {reason}")]
    Share {
        /// What was being shared: a file's path, or how many values of which type.
        what: String,
        /// Why, in words.
        reason: String,
        /// The operating system's error, if there was one.
        #[source]
        source: Option<std::io::Error>,
    },
    /// The pool was configured with a value it cannot use.
    #[error("invalid pool configuration: {0}")]
    Config(&'static str),
    /// The trace file asked for with `trace(path)` could not be created.
    #[error("cannot create the trace file {}: {source}", path.display())]
    Trace {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An environment variable that configures pools holds a value it cannot use.
    #[error("{variable}={value:?} is not {expected}")]
    Environment {
        /// The variable (`MULTIPROC_WORKERS`, `MULTIPROC_BACKEND`).
        variable: &'static str,
        /// What it holds.
        value: String,
        /// What it should hold.
        expected: &'static str,
    },
    /// The task needs per-worker state that the worker does not have: the pool has
    /// no initializer of that type, or the initializer failed in that worker.
    #[error("no worker state for the task in worker {}: {reason}", worker_name(*.worker))]
    WorkerState {
        /// The worker that ran the task.
        worker: usize,
        /// Why, in words.
        reason: String,
    },
    /// The pool's initializer failed in a worker.
    #[error("the initializer failed in worker {}: {reason}", worker_name(*.worker))]
    Initializer {
        /// The worker it failed in.
        worker: usize,
        /// Why, in words (a panic's message and location).
        reason: String,
    },
    /// The pool was closed ([`Pool::close`](crate::Pool::close)) and takes no more
    /// work.
    #[error("the pool is closed and takes no more work")]
    PoolClosed,
    /// The pool was terminated ([`Pool::terminate`](crate::Pool::terminate)) or
    /// dropped before this work finished.
    #[error("the pool was terminated before this work finished")]
    Terminated,
    /// [`Pool::join`](crate::Pool::join) was called on a pool that is still open.
    #[error("join waits for a closed pool: call close() or terminate() first")]
    NotClosed,
    /// A wait with a time limit ended before the result was ready; the result is
    /// not lost and can still be waited for.
    #[error("the result was not ready within {0:?}")]
    Timeout(std::time::Duration),
    /// The result was already taken from this handle by an earlier
    /// [`AsyncResult::get_timeout`](crate::AsyncResult::get_timeout).
    #[error("the result was already taken from this handle")]
    ResultTaken,
    /// The task of a [`Process`](crate::Process) panicked; the message and location
    /// are in `panic`.
    #[error("process {process} panicked: {panic}")]
    ProcessPanicked {
        /// The process's name and pid.
        process: String,
        /// The panic message and location.
        panic: TaskPanic,
    },
    /// A [`Process`](crate::Process) ended (killed by a signal, aborted, exited)
    /// without returning its task's value.
    #[error("process {process} ended before returning a value ({})", exit_description(.status))]
    ProcessExited {
        /// The process's name and pid.
        process: String,
        /// How it ended; `None` when it was reaped elsewhere.
        status: Option<ExitStatus>,
    },
    /// A [`Process`](crate::Process) could not be started or did not connect.
    #[error("could not start process {process}: {reason}")]
    ProcessStart {
        /// The process's name.
        process: String,
        /// Why, in words.
        reason: String,
    },
    /// Another failure of a [`Process`](crate::Process)'s task (its argument or
    /// value did not cross, the channel failed).
    #[error("process {process} failed: {error}")]
    Process {
        /// The process's name and pid.
        process: String,
        /// What went wrong.
        error: Box<Error>,
    },
    /// The [`Queue`](crate::Queue) was closed: no more puts, and every item has
    /// been taken.
    #[error("the queue is closed")]
    QueueClosed,
    /// A bounded [`Queue`](crate::Queue) was full when `try_put` was called.
    #[error("the queue is full")]
    QueueFull,
    /// The [`Queue`](crate::Queue) was empty when `try_get` was called.
    #[error("the queue is empty")]
    QueueEmpty,
    /// The process that created a [`Queue`](crate::Queue) (where its items are
    /// kept) could not be reached, or refused the connection.
    #[error("lost the queue kept by process {creator}")]
    QueueLost {
        /// The process that created the queue.
        creator: u32,
        /// What the operating system reported.
        #[source]
        source: std::io::Error,
    },
    /// The other end of a [`Pipe`](crate::Pipe) was dropped, or the process
    /// holding it exited.
    #[error("the other end of the pipe was closed")]
    PipeClosed,
    /// A [`Pipe`](crate::Pipe) end could not be used: it was sent to another
    /// process, could not be claimed from the process that sent it, or its socket
    /// failed.
    #[error("pipe end unusable: {what}")]
    Pipe {
        /// What went wrong, in words.
        what: String,
        /// What the operating system reported.
        #[source]
        source: std::io::Error,
    },
    /// A callback given to `apply_async_with_callback` or `map_async_with_callback`
    /// panicked; the task's own result is lost with it.
    #[error("the callback panicked: {0}")]
    CallbackPanicked(TaskPanic),
    /// A checkpoint file ([`Pool::checkpoint`](crate::Pool::checkpoint)) could not
    /// be used: it cannot be read or written, it is not a checkpoint, or a record
    /// before its last one is damaged. (A damaged *last* record, left by a crash
    /// while it was written, is no error: it is dropped and its items run again.)
    #[error("checkpoint {path:?}: {reason}")]
    Checkpoint {
        /// The checkpoint file.
        path: std::path::PathBuf,
        /// What is wrong, in words.
        reason: String,
        /// The operating system's error, if there was one.
        #[source]
        source: Option<std::io::Error>,
    },
    /// A checkpoint file was written by another job: another kind of call, or a
    /// task, item or result of other types. Nothing was run or recorded.
    #[error(
        "checkpoint {path:?} was written by another job ({found}), not by this one ({expected})"
    )]
    CheckpointOfAnotherJob {
        /// The checkpoint file.
        path: std::path::PathBuf,
        /// The job named in the file's header.
        found: String,
        /// This job.
        expected: String,
    },
    /// The input items of a recorded range differ from those the checkpoint was
    /// written for (their encodings do not match the record's checksum), or the
    /// input ends before the items the checkpoint records. The recorded results
    /// would belong to another input, so none is used.
    #[error("input items {items:?} differ from those recorded in checkpoint {path:?}")]
    CheckpointInputDiffers {
        /// The checkpoint file.
        path: std::path::PathBuf,
        /// The recorded items whose input differs (or is missing).
        items: Range<usize>,
    },
    /// Under [`ErrorPolicy::Collect`] or [`ErrorPolicy::Skip`], a call whose result
    /// has no place for a failed item (`map`, `map_reduce`) ran every item, and some
    /// failed: each with its index and its own error, ascending.
    #[error("{} of the call's items failed; the first: {}", .failed.len(), first_failure(.failed))]
    ItemsFailed {
        /// The failed items: (index, error), ascending by index.
        failed: Vec<(usize, Error)>,
    },
}

fn first_failure(failed: &[(usize, Error)]) -> String {
    failed
        .first()
        .map_or_else(String::new, |(_, error)| error.to_string())
}

impl Error {
    /// The same error for a call that had one item (`apply`): item indices that
    /// counted a stream of submissions become 0.
    pub(crate) fn for_single_item(self) -> Self {
        match self {
            Error::TaskPanicked { worker, panic, .. } => Error::TaskPanicked {
                item: 0,
                worker,
                panic,
            },
            Error::WorkerExited { worker, status, .. } => Error::WorkerExited {
                worker,
                items: 0..1,
                status,
            },
            Error::EncodeItem { source, .. } => Error::EncodeItem { item: 0, source },
            Error::TimedOut {
                worker, timeout, ..
            } => Error::TimedOut {
                item: 0,
                worker,
                timeout,
            },
            Error::DecodeItem { worker, source, .. } => Error::DecodeItem {
                item: 0,
                worker,
                source,
            },
            Error::Result { worker, source, .. } => Error::Result {
                items: 0..1,
                worker,
                source,
            },
            other => other,
        }
    }
}

/// Names workers in messages: set under MPI, where a worker's rank and node matter.
static WORKER_PLACE: std::sync::OnceLock<fn(usize) -> Option<String>> = std::sync::OnceLock::new();

/// Makes error messages name a worker with what `place` says of it, after its number.
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
pub(crate) fn name_workers_by(place: fn(usize) -> Option<String>) {
    let _ = WORKER_PLACE.set(place);
}

fn worker_name(worker: usize) -> String {
    match WORKER_PLACE.get().and_then(|place| place(worker)) {
        Some(place) => format!("{worker} ({place})"),
        None => worker.to_string(),
    }
}

fn rank_where(rank: &Option<usize>) -> String {
    match rank {
        Some(rank) => format!(" at rank {rank}"),
        None => String::new(),
    }
}

fn exit_description(status: &Option<ExitStatus>) -> String {
    match status {
        Some(status) => status.to_string(),
        None => "exit status unknown: it was reaped elsewhere".to_owned(),
    }
}

fn channel_description(worker: &Option<usize>) -> String {
    match worker {
        Some(worker) => format!("to worker {}", worker_name(*worker)),
        None => "on which replies arrive".to_owned(),
    }
}

fn decoded_where(worker: &Option<usize>) -> String {
    match worker {
        Some(worker) => format!("in worker {}", worker_name(*worker)),
        None => "again after encoding it (it does not survive a round trip)".to_owned(),
    }
}

fn context_where(worker: &Option<usize>) -> String {
    match worker {
        Some(worker) => format!(
            "to worker {}: it did not decode there",
            worker_name(*worker)
        ),
        None => "to the workers: it did not encode".to_owned(),
    }
}

/// `Result` with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A panic caught in a worker, carried to the parent as plain data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskPanic {
    /// The panic message (`"Box<dyn Any>"` when the payload was not a string).
    pub message: String,
    /// `file:line:column` where the panic happened, when known.
    pub location: Option<String>,
}

impl fmt::Display for TaskPanic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.location {
            Some(location) => write!(f, "{} at {location}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// What the codec said when a value could not be encoded or decoded.
///
/// Holds the message only, so the codec's own types stay out of this crate's API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodecError(pub(crate) String);

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CodecError {}
