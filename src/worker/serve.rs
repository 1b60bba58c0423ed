//! Child side: the entry hook, the receive loop, running a chunk and replying.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::os::spawn::{START_FAILED, WORKER_ARG, WORKER_ENV};
use crate::shared::region;
use crate::wire::protocol::{self, Reply, Request, Timing};
use crate::wire::transport::{Frame, FrameBuf, WorkerLink};
use crate::worker::state::{Sample, WorkerState};
use crate::worker::task;

/// Set once this process has become a worker in [`init`].
static SERVING: AtomicBool = AtomicBool::new(false);

/// Turns this process into a worker when its parent started it as one (serves until
/// the parent hangs up, then exits the process); otherwise returns at once. The
/// public entry is [`crate::init`].
pub(crate) fn serve_if_worker() {
    if SERVING.load(Ordering::Relaxed) {
        return;
    }
    let Some(value) = worker_argument() else {
        return;
    };
    SERVING.store(true, Ordering::Relaxed);
    // Task panics are caught per item; this catches anything else (a bug here), so
    // that no panic unwinds out of the test-support constructor, a C-ABI function.
    let served = std::panic::catch_unwind(|| serve_process(&value));
    let code = match served {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            eprintln!("multiproc worker {}: {e}", std::process::id());
            START_FAILED
        }
        Err(_) => {
            eprintln!(
                "multiproc worker {}: panicked outside a task",
                std::process::id()
            );
            START_FAILED
        }
    };
    std::process::exit(code);
}

/// True in a worker process serving its parent.
pub(crate) fn is_worker() -> bool {
    SERVING.load(Ordering::Relaxed)
}

/// True when this process was started as a worker but `init()` was not called first,
/// so `main` is running in the worker and must not start workers of its own.
pub(crate) fn init_missing() -> bool {
    !SERVING.load(Ordering::Relaxed) && worker_argument().is_some()
}

/// The value of this process's worker argument, when it was started as a worker.
fn worker_argument() -> Option<String> {
    std::env::var_os(WORKER_ENV)?;
    crate::os::proc::own_arguments()?.iter().find_map(|arg| {
        let arg = std::str::from_utf8(arg).ok()?;
        arg.strip_prefix(WORKER_ARG).map(str::to_owned)
    })
}

fn serve_process(value: &str) -> io::Result<()> {
    let mut parts = value.splitn(3, ':');
    let (Some(_index), Some(parent), Some(server)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("malformed {WORKER_ARG}"),
        ));
    };
    let parent = parent.parse::<u32>().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("malformed {WORKER_ARG}"),
        )
    })?;
    let announced = crate::os::spawn::prepare_child(parent)?;
    let link = WorkerLink::connect(server, announced, task::binary_fingerprint())?;
    // A worker process keeps the shared inputs it attaches for later calls, and
    // maps a `map_file` input unsealed only when its parent's request lists it.
    region::keep_attached_inputs();
    region::trust_parent(parent);
    serve(&link)
}

/// Where a worker's frames come from and go to: sockets, or in-process channels for
/// the inline backend. The loop in [`serve`] is the same for both.
pub(crate) trait Link {
    /// The next request frame, or `None` when the parent has hung up.
    fn recv(&self) -> io::Result<Option<Frame>>;
    fn send(&self, frame: &mut FrameBuf) -> io::Result<()>;
}

impl Link for WorkerLink {
    fn recv(&self) -> io::Result<Option<Frame>> {
        WorkerLink::recv(self)
    }
    fn send(&self, frame: &mut FrameBuf) -> io::Result<()> {
        WorkerLink::send(self, frame)
    }
}

/// Largest reply buffer kept between chunks; a bigger one is released after use.
const KEEP_BUFFER: usize = 4 << 20;

/// The receive loop: runs every chunk that arrives and replies, until hang-up.
pub(crate) fn serve(link: &impl Link) -> io::Result<()> {
    task::install_panic_hook();
    let mut state = WorkerState::default();
    let mut out = FrameBuf::with_capacity(64 * 1024);
    let mut sampled = LastSample::default();
    loop {
        let waiting = Instant::now();
        let Some(frame) = link.recv()? else {
            break;
        };
        let wait = nanos_since(waiting);
        let (request, payload) = protocol::open::<Request>(&frame)
            .map_err(|reason| io::Error::new(io::ErrorKind::InvalidData, reason))?;
        match request {
            Request::Context {
                job,
                shared,
                unsealed,
            } => state.set_context(job, payload, shared, unsealed),
            Request::Forget { job } => state.forget(job),
            Request::Flush { job, chunk } => {
                out.clear();
                let started = Instant::now();
                let reply = match task::flush_fold(&mut state, job, out.body()) {
                    Ok(()) => {
                        let nanos = nanos_since(started);
                        let sample = Sample {
                            finish: nanos,
                            ..Sample::default()
                        };
                        Reply::Done {
                            job,
                            chunk,
                            nanos,
                            timing: split(wait, nanos, sample),
                        }
                    }
                    Err(failure) => {
                        out.clear();
                        Reply::Failed {
                            job,
                            chunk,
                            failure,
                        }
                    }
                };
                protocol::seal(&mut out, &reply)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                link.send(&mut out)?;
            }
            Request::Chunk(header) => {
                out.clear();
                let started = Instant::now();
                state.sample = Sample::default();
                // The chunk's items (and the task) may map the parent's `map_file`
                // slices the header lists, and no other handle without its seals.
                let run = region::with_unsealed(&header.unsealed, || {
                    header.task.run(&mut state, &header, payload, out.body())
                });
                let reply = match run {
                    Ok(()) => {
                        let nanos = nanos_since(started);
                        Reply::Done {
                            job: header.job,
                            chunk: header.chunk,
                            nanos,
                            timing: split(wait, nanos, sampled.of(header.job, state.sample)),
                        }
                    }
                    Err(failure) => {
                        out.clear();
                        Reply::Failed {
                            job: header.job,
                            chunk: header.chunk,
                            failure,
                        }
                    }
                };
                protocol::seal(&mut out, &reply)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                link.send(&mut out)?;
                if out.body().capacity() > KEEP_BUFFER {
                    out = FrameBuf::with_capacity(64 * 1024);
                }
            }
        }
    }
    Ok(())
}

/// The last sample taken of a job's chunks, for the job's chunks not sampled
/// (see `task::SAMPLE_EVERY`).
#[derive(Default)]
struct LastSample {
    job: Option<u64>,
    sample: Sample,
}

impl LastSample {
    /// What to split a chunk of `job` by: its own sample when it was sampled
    /// (remembered), else the job's last one (none yet: all of it is the task's).
    fn of(&mut self, job: u64, taken: Sample) -> Sample {
        if taken != Sample::default() {
            self.job = Some(job);
            self.sample = taken;
            return taken;
        }
        if self.job == Some(job) {
            self.sample
        } else {
            Sample::default()
        }
    }
}

fn nanos_since(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Divides a chunk's measured `total` into decoding, task and encoding in the
/// proportions its sampled items showed; the closing step (`sample.finish`, a
/// partial result encoded once) was measured whole and is encoding.
fn split(wait: u64, total: u64, sample: Sample) -> Timing {
    let finish = sample.finish.min(total);
    let rest = total - finish;
    let sampled = sample.decode + sample.task + sample.encode;
    if sampled == 0 {
        return Timing {
            wait,
            decode: 0,
            task: rest,
            encode: finish,
        };
    }
    let share = |part: u64| (u128::from(rest) * u128::from(part) / u128::from(sampled)) as u64;
    let decode = share(sample.decode);
    let encode = share(sample.encode);
    Timing {
        wait,
        decode,
        task: rest - decode - encode,
        encode: encode + finish,
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::wire::codec;

    /// A link that feeds fixed frames and collects replies.
    struct Script {
        frames: std::cell::RefCell<Vec<Vec<u8>>>,
        replies: std::cell::RefCell<Vec<Vec<u8>>>,
    }

    impl Link for Script {
        fn recv(&self) -> io::Result<Option<Frame>> {
            Ok(self.frames.borrow_mut().pop().map(Frame::Inline))
        }
        fn send(&self, frame: &mut FrameBuf) -> io::Result<()> {
            self.replies.borrow_mut().push(frame.body_bytes().to_vec());
            Ok(())
        }
    }

    fn double(x: u64) -> u64 {
        x * 2
    }

    fn chunk_frame<F: Fn(u64) -> u64 + Copy + Send + Sync>(_: F, items: &[u64]) -> Vec<u8> {
        let task = protocol::TaskRef::of::<u64, u64, task::Plain<F>, task::Collect>()
            .expect("the test's code is in its executable");
        let mut frame = FrameBuf::with_capacity(256);
        for item in items {
            codec::encode_into(item, frame.body()).unwrap();
        }
        let header = protocol::ChunkHeader {
            job: 1,
            chunk: 0,
            first_item: 0,
            count: items.len() as u32,
            task,
            skip: Vec::new(),
            unsealed: Vec::new(),
        };
        protocol::seal(&mut frame, &Request::Chunk(header)).unwrap();
        frame.body_bytes().to_vec()
    }

    fn run_script(frame: Vec<u8>) -> Vec<Vec<u8>> {
        let link = Script {
            frames: vec![frame].into(),
            replies: Vec::new().into(),
        };
        let _ = serve(&link);
        link.replies.into_inner()
    }

    #[test]
    fn a_chunk_total_is_split_in_the_sampled_proportions() {
        let sample = Sample {
            decode: 10,
            task: 30,
            encode: 10,
            finish: 0,
        };
        let timing = split(5, 1_000, sample);
        assert_eq!(
            timing,
            Timing {
                wait: 5,
                decode: 200,
                task: 600,
                encode: 200
            }
        );
        // A partial result's encoding is measured whole; nothing sampled is task.
        let closing = Sample {
            finish: 100,
            ..Sample::default()
        };
        assert_eq!(split(0, 1_000, closing).task, 900);
        assert_eq!(split(0, 1_000, closing).encode, 100);
    }

    #[test]
    fn chunks_not_sampled_are_split_by_their_jobs_last_sample() {
        let mut last = LastSample::default();
        let sample = Sample {
            decode: 1,
            task: 2,
            encode: 1,
            finish: 0,
        };
        assert_eq!(last.of(3, Sample::default()), Sample::default());
        assert_eq!(last.of(3, sample), sample);
        assert_eq!(last.of(3, Sample::default()), sample);
        // Another job's chunk is not split by this job's sample.
        assert_eq!(last.of(4, Sample::default()), Sample::default());
    }

    #[test]
    fn a_valid_chunk_is_answered() {
        let replies = run_script(chunk_frame(double, &[1, 2, 3]));
        assert_eq!(replies.len(), 1);
        let (reply, payload) = protocol::open::<Reply>(&replies[0]).unwrap();
        assert!(matches!(
            reply,
            Reply::Done {
                job: 1,
                chunk: 0,
                ..
            }
        ));
        let mut reader = codec::Reader::new(payload);
        let got: Vec<u64> = (0..3).map(|_| reader.decode().unwrap()).collect();
        assert_eq!(got, [2, 4, 6]);
    }

    #[test]
    fn every_single_byte_corruption_of_a_chunk_is_survived() {
        // Each corrupted frame is refused, answered with a failure, or (when the
        // damage hits an item's bytes) answered with other numbers: never a crash.
        let good = chunk_frame(double, &[1, 2, 3]);
        for i in 0..good.len() {
            for flip in [0x01u8, 0x10, 0x80, 0xff] {
                let mut bad = good.clone();
                bad[i] ^= flip;
                for reply in run_script(bad) {
                    assert!(
                        protocol::open::<Reply>(&reply).is_ok(),
                        "byte {i} ^ {flip:#x}"
                    );
                }
            }
        }
    }

    #[test]
    fn random_frames_never_crash_the_worker_loop() {
        // Garbage may be refused (an `Err` ends the loop) but must never panic,
        // abort or run anything: the first byte decides the request kind and the
        // task offset is checked before use.
        let mut rng = StdRng::seed_from_u64(7);
        for round in 0..20_000 {
            let len = rng.random_range(0..64);
            let frame: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            let link = Script {
                frames: vec![frame].into(),
                replies: Vec::new().into(),
            };
            let _ = serve(&link);
            for reply in link.replies.borrow().iter() {
                assert!(protocol::open::<Reply>(reply).is_ok(), "round {round}");
            }
        }
    }
}
