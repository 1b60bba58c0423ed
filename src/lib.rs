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
//!     let pool = multiproc::Pool::builder().workers(2).build()?; // default: num_cpus::get()
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

#[cfg(not(target_os = "linux"))]
compile_error!(
    "multiproc runs on Linux only for now: workers find themselves through /proc and die \
     with their parent through PR_SET_PDEATHSIG"
);

mod backend;
mod builder;
mod chunker;
mod codec;
mod driver;
mod error;
mod handle;
mod interrupt;
mod job;
mod outcome;
mod par_map;
mod pipeline;
mod pool;
mod protocol;
mod scheduler;
mod spawn;
mod state;
mod supervisor;
mod task;
mod transport;
mod worker;

pub use crate::builder::PoolBuilder;
pub use crate::error::{CodecError, Error, Result, TaskPanic};
pub use crate::handle::{AsyncResult, Imap, ImapUnordered};
pub use crate::par_map::{par_map, par_map_reduce};
pub use crate::pipeline::{DEFAULT_STAGE_ITEMS, Pipeline, PipelineStats, Stage};
pub use crate::pool::{Pool, PoolStats};
pub use crate::worker::init;

/// Items public only for this crate's own tests.
#[doc(hidden)]
pub mod __private {
    /// How many frames this process has sent and received through shared memory.
    pub fn shared_memory_frames() -> (u64, u64) {
        crate::transport::shared_memory_frames()
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
        fuzz::parent_reply(bytes);
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
        fuzz::worker_requests(bytes);
    }

    /// Valid inputs for [`fuzz_worker_request`] (first) and [`fuzz_parent_reply`]
    /// (second), to seed the fuzzers' corpora.
    pub fn fuzz_seeds() -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        fuzz::seeds()
    }

    mod fuzz {
        use std::cell::RefCell;
        use std::marker::PhantomData;
        use std::ops::Range;

        use serde::de::DeserializeOwned;

        use crate::codec::{self, Reader};
        use crate::error::{CodecError, TaskPanic};
        use crate::job::{ApplyStream, Complete};
        use crate::protocol::{self, ChunkHeader, Failure, Reply, Request, TaskRef};
        use crate::task::{self, Collect, Fold, Outcomes, Plain, WithContext, WithState};
        use crate::transport::{Frame, FrameBuf};
        use crate::worker::{self, Link};

        fn double(x: u64) -> u64 {
            x.wrapping_mul(2)
        }
        fn picky(x: u64) -> u64 {
            assert!(x != 13, "unlucky {x}");
            x
        }
        fn chars(s: String) -> u64 {
            s.chars().count() as u64
        }
        fn shout(s: String) -> String {
            s.to_uppercase()
        }
        fn scaled(c: &u64, x: u64) -> u64 {
            c.wrapping_mul(x)
        }
        fn greet(c: &String, x: String) -> String {
            format!("{c}{x}")
        }
        fn zero() -> u64 {
            0
        }
        fn add(a: u64, b: u64) -> u64 {
            a.wrapping_add(b)
        }
        fn start_state(n: u64) -> Vec<u64> {
            vec![n]
        }
        fn remember(state: &mut Vec<u64>, x: u64) -> u64 {
            state.truncate(64);
            state.push(x);
            state.iter().fold(0, |a, &b| a.wrapping_add(b))
        }

        fn of<T, U, M, S>() -> TaskRef
        where
            T: DeserializeOwned,
            U: serde::Serialize + DeserializeOwned,
            M: task::Mapper<T, U>,
            S: task::Sink<U>,
        {
            TaskRef::of::<T, U, M, S>().expect("the fuzz tasks are in the executable")
        }

        fn plain<T, U, F, S>(_: F) -> TaskRef
        where
            T: DeserializeOwned,
            U: serde::Serialize + DeserializeOwned,
            F: Fn(T) -> U + Copy + Send + Sync,
            S: task::Sink<U>,
        {
            of::<T, U, Plain<F>, S>()
        }

        fn context<T, U, C, F>(_: F) -> TaskRef
        where
            T: DeserializeOwned,
            U: serde::Serialize + DeserializeOwned,
            C: DeserializeOwned + 'static,
            F: Fn(&C, T) -> U + Copy + Send + Sync,
        {
            of::<T, U, WithContext<F, C>, Collect>()
        }

        fn stateful<S: 'static, F: Fn(&mut S, u64) -> u64 + Copy + Send + Sync>(_: F) -> TaskRef {
            of::<u64, u64, WithState<F, S>, Collect>()
        }

        fn folded<F, Id, R>(_: F, _: Id, _: R) -> TaskRef
        where
            F: Fn(u64) -> u64 + Copy + Send + Sync,
            Id: Fn() -> u64 + Copy + Send + Sync,
            R: Fn(u64, u64) -> u64 + Copy + Send + Sync,
        {
            of::<u64, u64, Plain<F>, Fold<u64, Id, R>>()
        }

        fn init<F: Fn(u64) -> Vec<u64> + Copy + Send + Sync>(_: F) -> TaskRef {
            TaskRef::init::<u64, Vec<u64>, F>().expect("the fuzz tasks are in the executable")
        }

        /// The tasks a fuzzed chunk may run, named as a parent in this process names them.
        struct Tasks {
            double: TaskRef,
            picky: TaskRef,
            chars: TaskRef,
            shout: TaskRef,
            scaled: TaskRef,
            greet: TaskRef,
            sum: TaskRef,
            remember: TaskRef,
            init: TaskRef,
        }

        impl Tasks {
            fn get() -> Tasks {
                Tasks {
                    double: plain::<u64, u64, _, Collect>(double),
                    picky: plain::<u64, u64, _, Outcomes>(picky),
                    chars: plain::<String, u64, _, Outcomes>(chars),
                    shout: plain::<String, String, _, Collect>(shout),
                    scaled: context::<u64, u64, u64, _>(scaled),
                    greet: context::<String, String, String, _>(greet),
                    sum: folded(double, zero, add),
                    remember: stateful(remember),
                    init: init(start_state),
                }
            }

            fn all(&self) -> [TaskRef; 9] {
                [
                    self.double,
                    self.picky,
                    self.chars,
                    self.shout,
                    self.scaled,
                    self.greet,
                    self.sum,
                    self.remember,
                    self.init,
                ]
            }
        }

        /// A link that feeds fixed frames and checks every reply.
        struct Script {
            frames: RefCell<Vec<Vec<u8>>>,
            replies: RefCell<Vec<Vec<u8>>>,
        }

        impl Link for Script {
            fn recv(&self) -> std::io::Result<Option<Frame>> {
                Ok(self.frames.borrow_mut().pop().map(Frame::Inline))
            }
            fn send(&self, frame: &mut FrameBuf) -> std::io::Result<()> {
                let reply = frame.body_bytes();
                if let Err(e) = protocol::open::<Reply>(reply) {
                    panic!("the worker sent a reply that does not open: {e}");
                }
                self.replies.borrow_mut().push(reply.to_vec());
                Ok(())
            }
        }

        /// Splits fuzz input into frames: a `u16` length, then that many bytes.
        fn split(mut bytes: &[u8]) -> Vec<Vec<u8>> {
            let mut frames = Vec::new();
            while let Some((len, rest)) = bytes.split_first_chunk::<2>() {
                let len = usize::from(u16::from_le_bytes(*len)).min(rest.len());
                frames.push(rest[..len].to_vec());
                bytes = &rest[len..];
            }
            frames
        }

        /// Points a chunk at this process's runner for its fingerprint; `None`
        /// for an intact reference to no task of ours (see `fuzz_worker_request`).
        fn relocate(frame: Vec<u8>, tasks: &Tasks) -> Option<Vec<u8>> {
            let Ok((Request::Chunk(mut header), payload)) = protocol::open::<Request>(&frame)
            else {
                return Some(frame);
            };
            let known = tasks
                .all()
                .into_iter()
                .find(|t| t.fingerprint == header.task.fingerprint);
            if let Some(known) = known {
                header.task = known;
                let mut out = FrameBuf::with_capacity(frame.len());
                out.body().extend_from_slice(payload);
                protocol::seal(&mut out, &Request::Chunk(header)).ok()?;
                return Some(out.body_bytes().to_vec());
            }
            let intact =
                header.task.check == task::check_of(header.task.offset, header.task.fingerprint);
            (!intact).then_some(frame)
        }

        fn serve(frames: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
            let mut frames = frames;
            frames.reverse();
            let link = Script {
                frames: RefCell::new(frames),
                replies: RefCell::new(Vec::new()),
            };
            let _ = worker::serve(&link);
            link.replies.into_inner()
        }

        pub(super) fn worker_requests(bytes: &[u8]) {
            let tasks = Tasks::get();
            let frames = split(bytes)
                .into_iter()
                .filter_map(|frame| relocate(frame, &tasks))
                .collect();
            serve(frames);
        }

        /// Completes an `apply_async` handle by decoding its result as `U`.
        struct Discard<U>(PhantomData<fn() -> U>);

        impl<U: DeserializeOwned> Complete for Discard<U> {
            fn complete(self: Box<Self>, outcome: crate::Result<(usize, &[u8])>) {
                match outcome {
                    Ok((_, bytes)) => {
                        let _ = codec::decode::<U>(bytes).map_err(|e| e.to_string());
                    }
                    Err(e) => {
                        let _ = e.to_string();
                    }
                }
            }
        }

        fn outcomes<U: DeserializeOwned + 'static>(items: Range<usize>, payload: &[u8]) {
            let mut stream = ApplyStream::default();
            for _ in 0..items.end {
                stream.push(Vec::new(), Box::new(Discard::<U>(PhantomData)));
            }
            if let Err(reason) = crate::scheduler::complete_outcomes(&mut stream, 0, items, payload)
            {
                stream.fail_all(|| crate::Error::Protocol {
                    worker: 0,
                    reason: reason.clone(),
                });
            }
        }

        fn results<U: DeserializeOwned>(items: Range<usize>, payload: &[u8]) {
            let _ = crate::handle::decode_results::<U>(0, items, payload, |_, value| drop(value))
                .map_err(|e| e.to_string());
            let mut reader = Reader::new(payload);
            while !reader.is_empty() && reader.decode::<U>().is_ok() {}
            let _ = codec::decode::<U>(payload).map_err(|e| e.to_string());
        }

        pub(super) fn parent_reply(bytes: &[u8]) {
            let Ok((reply, payload)) = protocol::open::<Reply>(bytes) else {
                return;
            };
            match reply {
                Reply::Done { job, chunk, .. } => {
                    let start = (job % 4) as usize;
                    let items = start..start + (chunk % 17) as usize;
                    results::<u64>(items.clone(), payload);
                    results::<String>(items.clone(), payload);
                    outcomes::<u64>(items.clone(), payload);
                    outcomes::<String>(items, payload);
                }
                Reply::Failed {
                    job,
                    chunk,
                    failure,
                } => {
                    let start = (job % 4) as usize;
                    let items = start..start + (chunk % 17) as usize;
                    let (_, error) = crate::scheduler::describe(failure, 0, items);
                    let _ = error.to_string();
                }
            }
        }

        fn frame<H: serde::Serialize>(payload: &[u8], header: &H) -> Vec<u8> {
            let mut out = FrameBuf::with_capacity(payload.len() + 64);
            out.body().extend_from_slice(payload);
            protocol::seal(&mut out, header).expect("seeds encode");
            out.body_bytes().to_vec()
        }

        fn encoded<T: serde::Serialize>(values: &[T]) -> Vec<u8> {
            let mut out = Vec::new();
            for value in values {
                codec::encode_into(value, &mut out).expect("seeds encode");
            }
            out
        }

        fn chunk(job: u64, task: TaskRef, count: u32, payload: &[u8]) -> Vec<u8> {
            let header = ChunkHeader {
                job,
                chunk: u64::from(count),
                first_item: 0,
                count,
                task,
            };
            frame(payload, &Request::Chunk(header))
        }

        /// Frames laid out as `worker_requests` splits them.
        fn script(frames: &[Vec<u8>]) -> Vec<u8> {
            let mut out = Vec::new();
            for frame in frames {
                let len = u16::try_from(frame.len()).expect("seed frames are small");
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(frame);
            }
            out
        }

        pub(super) fn seeds() -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
            let t = Tasks::get();
            let words = ["ab".to_string(), "grüße".into(), String::new()];
            let scripts: Vec<Vec<Vec<u8>>> = vec![
                vec![chunk(1, t.double, 3, &encoded(&[1u64, 2, 3]))],
                vec![chunk(1, t.picky, 3, &encoded(&[12u64, 13, 14]))],
                vec![chunk(2, t.chars, 3, &encoded(&words))],
                vec![chunk(2, t.shout, 3, &encoded(&words))],
                vec![
                    frame(&encoded(&[7u64]), &Request::Context { job: 3 }),
                    chunk(3, t.scaled, 2, &encoded(&[1u64, 2])),
                    frame(&[], &Request::Forget { job: 3 }),
                    chunk(3, t.scaled, 1, &encoded(&[1u64])),
                ],
                vec![
                    frame(&encoded(&["hi ".to_string()]), &Request::Context { job: 3 }),
                    chunk(3, t.greet, 3, &encoded(&words)),
                ],
                vec![
                    chunk(protocol::INIT_JOB, t.init, 1, &encoded(&[5u64])),
                    chunk(1, t.remember, 3, &encoded(&[1u64, 2, 3])),
                ],
                vec![chunk(1, t.remember, 1, &encoded(&[1u64]))],
                vec![chunk(1, t.sum, 3, &encoded(&[1u64, 2, 3]))],
                vec![chunk(
                    1,
                    TaskRef {
                        check: t.double.check ^ 1,
                        ..t.double
                    },
                    1,
                    &encoded(&[1u64]),
                )],
            ];
            let mut replies = Vec::new();
            for frames in &scripts {
                replies.extend(serve(frames.clone()));
            }
            let failures = [
                Failure::Panicked {
                    item: 2,
                    panic: TaskPanic {
                        message: "boom".into(),
                        location: Some("src/main.rs:1:2".into()),
                    },
                },
                Failure::DecodeItem {
                    item: 1,
                    error: CodecError("unexpected end".into()),
                },
                Failure::EncodeResult {
                    item: None,
                    error: CodecError("too big".into()),
                },
                Failure::EncodeResult {
                    item: Some(u64::MAX),
                    error: CodecError("too big".into()),
                },
                Failure::DecodeContext {
                    error: CodecError("bad".into()),
                },
                Failure::NoState {
                    reason: "no initializer".into(),
                },
                Failure::Malformed {
                    reason: "what".into(),
                },
            ];
            for failure in failures {
                replies.push(frame(
                    &[],
                    &Reply::Failed {
                        job: 1,
                        chunk: 3,
                        failure,
                    },
                ));
            }
            (scripts.iter().map(|s| script(s)).collect(), replies)
        }

        #[cfg(test)]
        mod tests {
            use super::*;

            /// Runs the seeds through both fuzz entries, and writes them as the
            /// fuzzers' seed corpora when `MULTIPROC_FUZZ_SEEDS` names a directory
            /// (see `fuzz/README.md`).
            #[test]
            fn fuzz_seeds_run_and_are_written_on_request() {
                let (requests, replies) = seeds();
                let (reply, payload) = protocol::open::<Reply>(&replies[0]).unwrap();
                assert!(
                    matches!(
                        reply,
                        Reply::Done {
                            job: 1,
                            chunk: 3,
                            ..
                        }
                    ),
                    "{reply:?}"
                );
                assert_eq!(payload, encoded(&[2u64, 4, 6]), "a seed chunk ran its task");
                let done = replies
                    .iter()
                    .filter(|r| matches!(protocol::open::<Reply>(r), Ok((Reply::Done { .. }, _))))
                    .count();
                assert!(
                    done >= 9,
                    "only {done} seed chunks were answered with results"
                );
                for request in &requests {
                    worker_requests(request);
                }
                for reply in &replies {
                    parent_reply(reply);
                }
                let Some(dir) = std::env::var_os("MULTIPROC_FUZZ_SEEDS") else {
                    return;
                };
                let dir = std::path::Path::new(&dir);
                for (target, inputs) in [("worker_request", &requests), ("parent_reply", &replies)]
                {
                    let corpus = dir.join(target);
                    std::fs::create_dir_all(&corpus).unwrap();
                    for (i, input) in inputs.iter().enumerate() {
                        std::fs::write(corpus.join(format!("seed-{i:02}")), input).unwrap();
                    }
                }
            }
        }
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
