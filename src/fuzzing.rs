//! Fuzzing harness behind `multiproc::__private`: the parent's reading of a reply
//! frame and a worker's receive loop, driven by arbitrary bytes (see `fuzz/README.md`).

use std::cell::RefCell;
use std::marker::PhantomData;
use std::ops::Range;

use serde::de::DeserializeOwned;

use crate::engine::ends::{ApplyStream, Complete};
use crate::error::{CodecError, TaskPanic};
use crate::wire::codec::{self, Reader};
use crate::wire::protocol::{self, ChunkHeader, Failure, Reply, Request, TaskRef};
use crate::wire::transport::{Frame, FrameBuf};
use crate::worker::serve::{self, Link};
use crate::worker::task::{self, Collect, Fold, Outcomes, Plain, WithContext, WithState};

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
    S: task::Answer<U>,
{
    TaskRef::of::<T, U, M, S>().expect("the fuzz tasks are in the executable")
}

fn plain<T, U, F, S>(_: F) -> TaskRef
where
    T: DeserializeOwned,
    U: serde::Serialize + DeserializeOwned,
    F: Fn(T) -> U + Copy + Send + Sync,
    S: task::Answer<U>,
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
    let Ok((Request::Chunk(mut header), payload)) = protocol::open::<Request>(&frame) else {
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
    let intact = header.task.check == task::check_of(header.task.offset, header.task.fingerprint);
    (!intact).then_some(frame)
}

fn serve(frames: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let mut frames = frames;
    frames.reverse();
    let link = Script {
        frames: RefCell::new(frames),
        replies: RefCell::new(Vec::new()),
    };
    let _ = serve::serve(&link);
    link.replies.into_inner()
}

pub(crate) fn worker_requests(bytes: &[u8]) {
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
        stream.push(
            Vec::new(),
            Default::default(),
            Box::new(Discard::<U>(PhantomData)),
        );
    }
    if let Err(reason) = stream.complete_outcomes(0, &items.collect::<Vec<_>>(), payload) {
        stream.fail_all(|| crate::Error::Protocol {
            worker: 0,
            reason: reason.clone(),
        });
    }
}

fn results<U: DeserializeOwned>(items: Range<usize>, payload: &[u8]) {
    let _ = crate::sink::decode_results::<U>(0, items, payload, |_, value| drop(value))
        .map_err(|e| e.to_string());
    let mut reader = Reader::new(payload);
    while !reader.is_empty() && reader.decode::<U>().is_ok() {}
    let _ = codec::decode::<U>(payload).map_err(|e| e.to_string());
}

pub(crate) fn parent_reply(bytes: &[u8]) {
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
            let (_, error) = crate::engine::outcome::describe(failure, 0, items);
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
        skip: Vec::new(),
        unsealed: Vec::new(),
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

pub(crate) fn seeds() -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let t = Tasks::get();
    let words = ["ab".to_string(), "grüße".into(), String::new()];
    let scripts: Vec<Vec<Vec<u8>>> = vec![
        vec![chunk(1, t.double, 3, &encoded(&[1u64, 2, 3]))],
        vec![chunk(1, t.picky, 3, &encoded(&[12u64, 13, 14]))],
        vec![chunk(2, t.chars, 3, &encoded(&words))],
        vec![chunk(2, t.shout, 3, &encoded(&words))],
        vec![
            frame(
                &encoded(&[7u64]),
                &Request::Context {
                    job: 3,
                    shared: false,
                    unsealed: Vec::new(),
                },
            ),
            chunk(3, t.scaled, 2, &encoded(&[1u64, 2])),
            frame(&[], &Request::Forget { job: 3 }),
            frame(&[], &Request::Flush { job: 3, chunk: 9 }),
            chunk(3, t.scaled, 1, &encoded(&[1u64])),
        ],
        vec![
            frame(
                &encoded(&["hi ".to_string()]),
                &Request::Context {
                    job: 3,
                    shared: false,
                    unsealed: Vec::new(),
                },
            ),
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
        for (target, inputs) in [("worker_request", &requests), ("parent_reply", &replies)] {
            let corpus = dir.join(target);
            std::fs::create_dir_all(&corpus).unwrap();
            for (i, input) in inputs.iter().enumerate() {
                std::fs::write(corpus.join(format!("seed-{i:02}")), input).unwrap();
            }
        }
    }
}
