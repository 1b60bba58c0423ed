//! Data-parallel map-reduce over worker processes.
//!
//! multiproc splits an input sequence into chunks, runs a task on each chunk in a pool
//! of worker processes, and returns the results in input order, or reduces them. A
//! task that panics, aborts or is killed takes down one worker, not the job: the call
//! returns an error naming the item, and the pool replaces the worker.
//!
//! Workers are this same executable started again. [`init`] on the first line of
//! `main` turns such a process into a worker; test crates use
//! [`enable_test_support!`] instead.
//!
//! ```standalone_crate
//! fn main() -> multiproc::Result<()> {
//!     multiproc::init(); // first line of main: in a worker process it serves tasks and never returns
//!     let squares: Vec<u64> = multiproc::par_map(0..1_000u64, |x| x * x)?;
//!     assert_eq!(squares[999], 998_001);
//!     let total: u64 = multiproc::par_map_reduce(0..1_000_000u64, |x| x * x, || 0, |a, b| a + b)?;
//!     assert_eq!(total, 333_332_833_333_500_000);
//!
//!     let pool = multiproc::Pool::builder().workers(2).build()?; // default: MULTIPROC_WORKERS, else the CPUs this process may use
//!     let lens: Vec<usize> = pool.map(vec!["a".to_string(), "bb".into()], |s: String| s.len())?;
//!     assert_eq!(lens, [1, 2]);
//!     let sum: u64 = pool.map_reduce(0..10u64, |x| x, || 0, |a, b| a + b)?;
//!     assert_eq!(sum, 45);
//!     Ok(())
//! }
//! ```
//!
//! Items, results and context values are encoded with serde (bincode), at most 4 GiB
//! each. Serde attributes that need a self-describing format or make the encoding
//! depend on the value (`#[serde(untagged)]`, `flatten`, `skip_serializing_if`) are
//! not supported: the first item ([`Error::DecodeItem`]), the first result
//! ([`Error::Result`]) and the context ([`Error::Context`]) are checked and rejected,
//! but a later value can decode wrongly. With `panic = "abort"` a panicking task
//! kills its worker; the call then reports [`Error::WorkerExited`].
//!
//! Worker processes run with one extra command-line argument
//! (`--multiproc-worker=…`) and `MULTIPROC_WORKER=1` in their environment. Linux only.
//!
//! # Sharp edges
//!
//! - Results are delivered exactly once, but tasks run *at least* once: a chunk
//!   lost with its worker runs again (see [`PoolBuilder::retries`]), and under
//!   [`ErrorPolicy::Collect`] or [`ErrorPolicy::Skip`] the items of a chunk before
//!   a failed one run again when it is sent again without that item. Side effects
//!   of a task (a [`Queue`] put, a file written, a [`Pipe`] send) can repeat; a
//!   [`Pipe`] end inside an item that runs again cannot be claimed twice, and the
//!   second run gets [`Error::Pipe`] saying so.
//! - A task is named by its offset in the executable, with a check hash and a type
//!   fingerprint: a damaged reference is refused before any jump, but the check is
//!   against corruption, not forgery. What keeps others from making a worker run
//!   code is that only its parent can write to its channels (they are created by
//!   the worker and handed to the parent alone).
//! - A task is re-created in the worker from its type, so a zero-sized value it
//!   captures is re-created too: a zero-sized token meaning "this was initialised"
//!   (a proof type) proves nothing there.
//! - The codec is not self-describing: types that need one (`serde_json::Value`,
//!   `#[serde(untagged)]`, `flatten`, `skip_serializing_if`) do not cross. The first
//!   item, the first result and the context are checked, and rejected with an error.
//! - [`PoolBuilder::chunk_size`] fixes the items per chunk and lifts the byte limit
//!   of adaptive chunks: a large chunk then travels through shared memory.
//! - [`par_map`] inside a task is refused ([`Error::InsideWorker`]): the default
//!   pool would start one worker per CPU in every worker.
//! - With the inline backend ([`PoolBuilder::inline`]) a stuck task cannot be
//!   killed; its thread is abandoned.
//! - A [`SharedSlice`] or [`Shared`] crosses as a handle naming the sender's
//!   descriptor, so the sender must hold it until the receiver has decoded it. The
//!   pool does that for everything it sends: a chunk keeps the inputs its items name
//!   until its reply arrives. A handle encoded and carried some other way (written to
//!   a file, sent through a channel of your own) is valid only while its sender holds
//!   the input. A context whose encoding exceeds
//!   [`PoolBuilder::share_contexts_above`] (1 MiB) is shared the same way, unasked.
//!
//! # Watching a job
//!
//! Every job measures itself, per chunk, never per item (its cost on W1 is in
//! `BENCHMARKS.md`):
//! [`Pool::last_job_stats`] gives the last job's [`JobStats`] (items, chunks,
//! bytes, faults, the parent's share, and each worker's waiting, decoding, running,
//! encoding and start-up time), [`PoolStats::totals`] sums the pool's jobs, and
//! [`JobStats::summary`] says where the time went and what to change.
//! [`PoolBuilder::progress`] draws a bar per job, [`PoolBuilder::trace`] writes a
//! timeline for Perfetto, and the engine's events (workers started and lost,
//! retries, poison items, timeouts, jobs) are [`tracing`](https://docs.rs/tracing)
//! events, silent unless the program installs a subscriber.
//! [`Pool::checkpoint`] makes a `map` or `map_reduce` resumable after a crash, and
//! [`Pipeline::checkpoint`] every stage of a pipeline.
//!
//! ```standalone_crate
//! fn main() -> multiproc::Result<()> {
//!     multiproc::init();
//!     let pool = multiproc::Pool::builder().workers(2).progress(true).build()?;
//!     let lines = vec!["a b".to_string(), "c d e".to_string()];
//!     let words = pool.map(lines, |s: String| s.split(' ').count())?;
//!     assert_eq!(words, [2, 3]);
//!     let stats = pool.last_job_stats()?.expect("one job ended");
//!     assert_eq!((stats.items, stats.workers.len()), (2, 2));
//!     assert!(stats.summary().contains("running tasks"));
//!     Ok(())
//! }
//! ```
//!
//! # Configuration
//!
//! Every option of [`PoolBuilder`], with its default. A value set on the builder
//! wins over the environment; the variables let a program that did not ask be run
//! differently (as `RAYON_NUM_THREADS` does for rayon).
//!
//! | option | default | variable |
//! |---|---|---|
//! | [`workers`](PoolBuilder::workers) | [`default_workers()`]: the CPUs this process may use (affinity mask, cgroup quota); under MPI what the serving ranks offer | `MULTIPROC_WORKERS` (under MPI: per serving rank) |
//! | [`backend`](PoolBuilder::backend) | [`Backend::Process`]; [`Backend::Mpi`] in an MPI job of more than one rank | `MULTIPROC_BACKEND=process`, `inline` or `mpi` |
//! | [`inline`](PoolBuilder::inline) | `false`: worker processes (shorthand for `backend`) | `MULTIPROC_BACKEND=inline` |
//! | [`chunk_size`](PoolBuilder::chunk_size) | adaptive: ~1 ms of work, one socket message | - |
//! | [`retries`](PoolBuilder::retries) | 1 resend of a chunk lost with its worker | - |
//! | [`error_policy`](PoolBuilder::error_policy) | [`ErrorPolicy::FailFast`] | - |
//! | [`task_timeout`](PoolBuilder::task_timeout) | none | - |
//! | [`call_timeout`](PoolBuilder::call_timeout) | none | - |
//! | [`memory_limit`](PoolBuilder::memory_limit) | none | - |
//! | [`max_tasks_per_worker`](PoolBuilder::max_tasks_per_worker) | none: workers are not recycled | - |
//! | [`initializer`](PoolBuilder::initializer) | none | - |
//! | [`interrupt_on_ctrl_c`](PoolBuilder::interrupt_on_ctrl_c) | `false` | - |
//! | [`inherit_output`](PoolBuilder::inherit_output) | `true` | - |
//! | [`start_timeout`](PoolBuilder::start_timeout) | 30 s | - |
//! | [`share_contexts_above`](PoolBuilder::share_contexts_above) | 1 MiB | - |
//! | [`progress`](PoolBuilder::progress) | `false`; drawn only when stderr is a terminal | `MULTIPROC_PROGRESS=1` (on, drawn anywhere) or `0` (off) |
//! | [`trace`](PoolBuilder::trace) | none | - |
//!
//! A variable that holds a value the pool cannot use makes [`PoolBuilder::build`]
//! fail with [`Error::Environment`], naming it. [`par_map`] and [`par_map_reduce`]
//! use a default pool, so the variables apply to them too.
//!
//! # How the source is laid out
//!
//! The folders of `src/` are layers; a module imports only from its own layer or
//! from one below (CI checks it):
//!
//! | folder | holds | may import |
//! |---|---|---|
//! | `os/`, `error.rs`, `shared/region.rs` | processes, sockets, signals, `/proc`; errors; sealed memory regions | nothing of the crate but `error` |
//! | `wire/` | encoding, the messages between parent and worker, the links | the above |
//! | `worker/` | a worker's receive loop, how a task is found and run, its state | the above |
//! | `engine/`, `channels/` | the job server (scheduler, supervisor, backends); `Queue` and `Pipe` | the above, not each other |
//! | `src/*.rs`, `shared/` | the public API: [`Pool`], [`PoolBuilder`], the handles, [`Pipeline`], [`Process`], [`SharedSlice`] | everything |
//!
//! `docs/ARCHITECTURE.md` in the repository follows one item through the files.

#[cfg(not(target_os = "linux"))]
compile_error!(
    "multiproc runs on Linux only for now: workers find themselves through /proc and die \
     with their parent through PR_SET_PDEATHSIG"
);

mod builder;
mod channels;
mod checkpoint;
mod engine;
mod entry;
mod error;
mod fuzzing;
mod handle;
mod os;
mod par_map;
mod pipeline;
mod pool;
mod process;
mod shared;
mod sink;
mod wire;
mod worker;

pub use crate::builder::{PoolBuilder, default_workers};
pub use crate::channels::pipe::Pipe;
pub use crate::channels::queue::Queue;
pub use crate::checkpoint::Checkpointed;
pub use crate::engine::backend::Backend;
pub use crate::engine::stats::{JobStats, WorkerStats};
pub use crate::entry::init;
pub use crate::error::{CodecError, Error, ErrorPolicy, Result, TaskPanic};
pub use crate::handle::{AsyncResult, Imap, ImapUnordered};
pub use crate::par_map::{par_map, par_map_reduce};
pub use crate::pipeline::{
    DEFAULT_FOLD_FLUSH_BYTES, DEFAULT_STAGE_ITEMS, Pipeline, PipelineStats, Stage,
};
pub use crate::pool::{Pool, PoolStats, Skipped};
pub use crate::process::{Process, ProcessBuilder};
pub use crate::shared::{Shared, SharedSlice};

/// Items public only for this crate's own tests.
#[doc(hidden)]
pub mod __private {
    /// How many frames this process has sent and received through shared memory.
    pub fn shared_memory_frames() -> (u64, u64) {
        crate::wire::transport::shared_memory_frames()
    }

    /// In this process: shared regions attached from other processes, `Shared`
    /// values decoded, and attached regions kept after their last use.
    pub fn shared_input_counts() -> (u64, u64, usize) {
        crate::shared::stats::counts()
    }

    /// The seals (`F_GET_SEALS`) and the descriptor of a shared slice's memfd.
    pub fn shared_slice_seals<T: bytemuck::Pod>(slice: &crate::SharedSlice<T>) -> (i32, i32) {
        let region = slice.region();
        (region.seals().unwrap_or(-1), region.raw_fd())
    }

    /// Makes this process die by SIGKILL in its next `get` on a queue created in
    /// another process, after the creator sent the item and before a byte of it is
    /// read: the moment a consumer's death would lose the item without
    /// acknowledgements.
    pub fn queue_die_before_reading_next_item() {
        crate::channels::queue::die_before_reading_next_item();
    }

    /// The items a checkpoint file records for a pool's call, ascending, whatever
    /// job wrote it.
    pub fn checkpoint_records(
        path: &std::path::Path,
    ) -> crate::Result<Vec<std::ops::Range<usize>>> {
        crate::checkpoint::recorded_items(path, 0)
    }

    /// The items of its input a pipeline's checkpoint records for stage `stage`
    /// (counted from 1), ascending.
    pub fn checkpoint_stage_records(
        path: &std::path::Path,
        stage: usize,
    ) -> crate::Result<Vec<std::ops::Range<usize>>> {
        crate::checkpoint::recorded_items(path, stage)
    }

    /// Fuzzing entry: what the parent does with one reply frame from a worker.
    ///
    /// Opens the frame as a `Reply`. A `Done` payload is
    /// read every way the parent reads one (results of a `u64` or `String` chunk, a
    /// reduce partial, the per-item outcomes of an `apply_async` chunk); a failure
    /// becomes an [`Error`](crate::Error) and is displayed. The chunk's items are
    /// `job % 4 .. job % 4 + chunk % 17`: the parent knows them from the chunk it
    /// sent, so here the frame's own fields stand in for that knowledge.
    pub fn fuzz_parent_reply(bytes: &[u8]) {
        crate::fuzzing::parent_reply(bytes);
    }

    /// Fuzzing entry: a worker's receive loop fed `bytes` as request frames, each
    /// one a `u16` little-endian length and that many bytes (fewer at the end).
    ///
    /// A chunk whose task fingerprint names one of this module's tasks is pointed
    /// at that task's runner in this process; a chunk naming any other task is
    /// passed on only when its task reference fails its check (so the worker
    /// refuses it). An intact reference to other code is a forgery, which the
    /// design leaves to the channel's ownership (see the crate docs), so such a
    /// frame is dropped. Panics when the worker sends a reply that does not open.
    pub fn fuzz_worker_request(bytes: &[u8]) {
        crate::fuzzing::worker_requests(bytes);
    }

    /// Valid inputs for [`fuzz_worker_request`] (first) and [`fuzz_parent_reply`]
    /// (second), to seed the fuzzers' corpora.
    pub fn fuzz_seeds() -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        crate::fuzzing::seeds()
    }
}

/// Makes a test binary able to serve as its own worker processes.
///
/// Test binaries get their `main` from the test harness, so they cannot call
/// [`init`] first. Invoke this macro once at the top level of each test crate (for
/// integration tests, once per `tests/*.rs` binary; for unit tests, once in the
/// library under `#[cfg(test)]`). It registers a constructor that runs before the
/// harness starts and calls [`init`], so a worker process never reaches the harness:
/// no test-name filter to keep in sync and no harness output from workers.
///
/// Because a worker serves from inside that constructor, constructors that would run
/// after it (C++ static initialisers of libraries linked later, registrations made by
/// crates such as `ctor` or `inventory`) have not run in worker processes of a test
/// binary. Tasks that depend on them should be tested from a binary whose `main`
/// calls [`init`].
///
/// ```no_run
/// // tests/it/main.rs
/// multiproc::enable_test_support!();
///
/// #[test]
/// fn squares() {
///     let pool = multiproc::Pool::builder().workers(2).build().unwrap();
///     assert_eq!(pool.map(0..3u64, |x| x * x).unwrap(), [0, 1, 4]);
/// }
/// ```
#[macro_export]
macro_rules! enable_test_support {
    () => {
        // SAFETY: the loader calls each `.init_array` entry once, before `main`, as
        // `fn(argc, argv, envp)`; an `extern "C" fn()` that ignores its arguments is
        // called correctly that way on every Linux ABI. In most processes `init` then
        // reads one environment variable and returns. In a worker process it reads
        // `/proc`, sets its signal dispositions and serves tasks until it exits the
        // process, all before `main`; it catches panics from user code and from its
        // own loop, so none unwinds out of this C-ABI function.
        #[used]
        #[unsafe(link_section = ".init_array")]
        static __MULTIPROC_TEST_SUPPORT: extern "C" fn() = {
            extern "C" fn multiproc_test_support() {
                $crate::init();
            }
            multiproc_test_support
        };
    };
}

#[cfg(test)]
crate::enable_test_support!();
