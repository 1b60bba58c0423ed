//! The MPI job this process belongs to: starting MPI when a launcher started the
//! program, the messages ranks exchange, and sending and receiving them.
//!
//! Every rank runs the same binary. Rank 0 returns from [`init`] and runs the
//! program; every other rank serves pools opened by rank 0 (see `rank.rs`) and exits
//! when rank 0 says stop. Ranks talk in [`Envelope`]s on the world communicator, each
//! one MPI message of bytes: a little header, then the body (a frame of the worker
//! protocol, passed through untouched). A message longer than one MPI count can
//! express is split into parts.
//!
//! Sends go through one thread per process ([`Outbox`]): `MPI_Send` of a large
//! message waits until the receiver takes it, and two ranks that send to each other
//! at once would otherwise wait forever. Receiving is polled (`MPI_Improbe`), so a
//! rank waits for MPI messages and for its own workers in one loop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use mpi::Threading;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use serde::{Deserialize, Serialize};

use crate::wire::codec;

/// The tag of a message's first part.
const TAG_FIRST: i32 = 11;
/// The tag of the parts after the first of a split message.
const TAG_MORE: i32 = 12;

/// The longest part sent as one MPI message: far below MPI's count limit of
/// 2^31 - 1 elements.
#[cfg(not(test))]
const PART: usize = 1 << 30;
#[cfg(test)]
const PART: usize = 64;

/// Environment variables that launchers of an MPI job set in every rank: the world
/// size they announce, and the rank.
const LAUNCHER_SIZE: [&str; 3] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"];
const LAUNCHER_RANK: [&str; 3] = ["OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"];

/// What ranks say to each other. Rank 0 sends the first five; serving ranks the rest.
/// A `Request` and a `Reply` carry a frame as the message's body.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Envelope {
    /// Start `workers` local workers for pool `pool`.
    Open {
        pool: u64,
        workers: u32,
        inherit_output: bool,
        memory_limit: Option<u64>,
        start_timeout: Duration,
    },
    /// The body is a request frame for local worker `local` of pool `pool`.
    Request { pool: u64, local: u32 },
    /// Start a fresh worker in local slot `local` (which may be new).
    Restart { pool: u64, local: u32 },
    /// Kill local worker `local` now; its loss is reported as usual.
    Kill { pool: u64, local: u32 },
    /// Stop every worker of the pool.
    Close { pool: u64 },
    /// The job is over: stop serving and exit.
    Stop,
    /// A serving rank is ready: who and where it is.
    Hello {
        host: String,
        pid: u32,
        cpus: u32,
        /// `cpus` is the rank's `MULTIPROC_WORKERS`, not its CPUs.
        workers_set: bool,
        fingerprint: u64,
    },
    /// The pool's workers started (their generations and pids, by local slot), or
    /// could not.
    Opened {
        pool: u64,
        started: Result<Vec<(u64, u32)>, String>,
    },
    /// A worker restarted (its generation and pid), or could not.
    Restarted {
        pool: u64,
        local: u32,
        started: Result<(u64, u32), String>,
    },
    /// The body is a reply frame from a local worker.
    Reply {
        pool: u64,
        local: u32,
        generation: u64,
    },
    /// A local worker is gone; `status` is its raw wait status, when known.
    Lost {
        pool: u64,
        local: u32,
        generation: u64,
        status: Option<i32>,
        last_item: Option<u64>,
    },
    /// A local worker sent something that is not a frame.
    Broken {
        pool: u64,
        local: u32,
        generation: u64,
        reason: String,
    },
    /// A serving rank's library code failed; the job cannot go on.
    Failed { reason: String },
}

/// A message received: who sent it, what it says, and its body.
pub(crate) struct Received {
    pub(crate) from: usize,
    pub(crate) envelope: Envelope,
    data: Vec<u8>,
    body_at: usize,
}

impl Received {
    pub(crate) fn body(&self) -> &[u8] {
        &self.data[self.body_at..]
    }
}

/// The job as this process sees it.
pub(crate) struct Job {
    pub(crate) rank: usize,
    pub(crate) size: usize,
    /// The node each rank runs on (filled at rank 0 from the hellos).
    pub(crate) hosts: Vec<String>,
    /// How many workers each serving rank offers (at rank 0, from the hellos): its
    /// `MULTIPROC_WORKERS`, else its share of its node's CPUs among the serving
    /// ranks there.
    pub(crate) cpus: Vec<usize>,
    outbox: Outbox,
}

static JOB: OnceLock<Job> = OnceLock::new();

/// Held until the job ends; dropping it finalises MPI.
static UNIVERSE: Mutex<Option<Universe>> = Mutex::new(None);

/// Set once rank 0 has told the serving ranks to stop.
static STOPPED: AtomicBool = AtomicBool::new(false);

/// The MPI job, when this process is a rank of one with more than one rank.
pub(crate) fn job() -> Option<&'static Job> {
    JOB.get().filter(|job| job.size > 1)
}

impl Job {
    /// Queues `envelope` (with `body`) for rank `to`.
    pub(crate) fn send(&self, to: usize, envelope: &Envelope, body: &[u8]) {
        self.outbox.send(to, envelope, body);
    }

    /// Takes the next message that has arrived, if any.
    pub(crate) fn try_receive(&self) -> Option<Received> {
        let world = SimpleCommunicator::world();
        let probed = world
            .any_process()
            .immediate_matched_probe_with_tag(TAG_FIRST)?;
        let source = probed.1.source_rank();
        let (data, _) = probed.matched_receive_vec::<u8>();
        Some(open(&world, source, data))
    }

    /// Waits for the next message (for a hello, or an answer to a request) until
    /// `deadline`.
    pub(crate) fn receive_until(&self, deadline: Instant) -> Option<Received> {
        let mut idle = Idle::default();
        loop {
            if let Some(received) = self.try_receive() {
                return Some(received);
            }
            if Instant::now() >= deadline {
                return None;
            }
            idle.pause();
        }
    }

    /// A short description of rank `rank` for error messages.
    pub(crate) fn describe(&self, rank: usize) -> String {
        match self.hosts.get(rank) {
            Some(host) if !host.is_empty() => format!("rank {rank} on {host}"),
            _ => format!("rank {rank}"),
        }
    }
}

/// Reads a received message's parts and header.
fn open(world: &SimpleCommunicator, source: i32, mut data: Vec<u8>) -> Received {
    let from = usize::try_from(source).unwrap_or(0);
    let malformed = |reason: String| Received {
        from,
        envelope: Envelope::Failed { reason },
        data: Vec::new(),
        body_at: 0,
    };
    if data.len() < 8 {
        return malformed(format!(
            "a message of {} bytes from rank {from}",
            data.len()
        ));
    }
    let parts = u32::from_le_bytes(data[0..4].try_into().expect("four bytes"));
    let header = u32::from_le_bytes(data[4..8].try_into().expect("four bytes")) as usize;
    for _ in 1..parts {
        let (more, _) = world
            .process_at_rank(source)
            .receive_vec_with_tag::<u8>(TAG_MORE);
        data.extend_from_slice(&more);
    }
    let Some(header_bytes) = data.get(8..8 + header) else {
        return malformed(format!("a truncated message from rank {from}"));
    };
    match codec::decode::<Envelope>(header_bytes) {
        Ok(envelope) => Received {
            from,
            envelope,
            data,
            body_at: 8 + header,
        },
        Err(e) => malformed(format!("an unreadable message from rank {from}: {e}")),
    }
}

/// A message on its way: the rank it goes to and its bytes.
type Outgoing = (usize, Vec<u8>);

/// The sending thread of this process.
struct Outbox {
    queue: Mutex<Option<mpsc::Sender<Outgoing>>>,
    thread: Mutex<Option<thread::JoinHandle<()>>>,
}

impl Outbox {
    fn start() -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Outgoing>();
        let thread = thread::Builder::new()
            .name("multiproc-mpi-send".into())
            .spawn(move || {
                let world = SimpleCommunicator::world();
                for (to, message) in rx {
                    let to = i32::try_from(to).expect("ranks fit an MPI rank");
                    let process = world.process_at_rank(to);
                    let mut parts = message.chunks(PART);
                    process.send_with_tag(parts.next().unwrap_or(&[]), TAG_FIRST);
                    for part in parts {
                        process.send_with_tag(part, TAG_MORE);
                    }
                }
            })?;
        Ok(Self {
            queue: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    fn send(&self, to: usize, envelope: &Envelope, body: &[u8]) {
        let mut message = Vec::with_capacity(64 + body.len());
        message.extend_from_slice(&[0; 8]);
        codec::encode_plain_into(envelope, &mut message)
            .expect("an envelope holds plain data only");
        let header = u32::try_from(message.len() - 8).expect("an envelope is small");
        message.extend_from_slice(body);
        let parts = u32::try_from(message.len().div_ceil(PART).max(1))
            .expect("a message of fewer than 2^32 parts");
        message[0..4].copy_from_slice(&parts.to_le_bytes());
        message[4..8].copy_from_slice(&header.to_le_bytes());
        let queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(queue) = queue.as_ref() {
            // Ignored error: the thread is gone only after `flush`, at the end.
            let _ = queue.send((to, message));
        }
    }

    /// Sends everything queued and stops the thread.
    fn flush(&self) {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            // Ignored error: a panic in the thread has been printed by then.
            let _ = thread.join();
        }
    }
}

/// Pauses a polling loop for longer the longer it has found nothing: a yield at
/// first (a reply is often on its way), then sleeps growing to a millisecond, so an
/// idle rank or pool costs about a thousand wake-ups a second.
#[derive(Default)]
pub(crate) struct Idle {
    rounds: u32,
}

/// Rounds that only yield before the pauses become sleeps.
const SPIN_ROUNDS: u32 = 64;

impl Idle {
    /// Pauses for [`Idle::next`] (a yield when that is zero) and counts the round.
    pub(crate) fn pause(&mut self) {
        let pause = self.next();
        self.pause_counted();
        if pause.is_zero() {
            thread::yield_now();
        } else {
            thread::sleep(pause);
        }
    }

    /// Counts a round whose pause the caller spent waiting on something else.
    pub(crate) fn pause_counted(&mut self) {
        self.rounds = self.rounds.saturating_add(1);
    }

    /// Starts with sleeps, for a wait that expects nothing soon.
    pub(crate) fn skip_polling(&mut self) {
        self.rounds = self.rounds.max(SPIN_ROUNDS);
    }

    /// How long the next pause is: zero (a yield) while spinning.
    pub(crate) fn next(&self) -> Duration {
        if self.rounds < SPIN_ROUNDS {
            Duration::ZERO
        } else {
            Duration::from_micros((u64::from(self.rounds - SPIN_ROUNDS) * 20).clamp(20, 1000))
        }
    }

    pub(crate) fn reset(&mut self) {
        self.rounds = 0;
    }
}

/// The world size a launcher announced, when it did.
fn launcher_size() -> Option<usize> {
    LAUNCHER_SIZE
        .iter()
        .find_map(|var| std::env::var(var).ok()?.trim().parse().ok())
}

/// Whether an MPI launcher started this process.
fn launched() -> bool {
    LAUNCHER_SIZE
        .iter()
        .chain(&LAUNCHER_RANK)
        .any(|var| std::env::var_os(var).is_some())
}

/// Whether the program asked for MPI without a launcher (`MULTIPROC_BACKEND=mpi`).
fn asked() -> bool {
    std::env::var(super::super::BACKEND_ENV).is_ok_and(|v| v.trim() == "mpi")
}

/// Joins the MPI job when this process was started by an MPI launcher (or
/// `MULTIPROC_BACKEND=mpi` asks for MPI). Rank 0 returns once every rank has said
/// hello; any other rank serves until rank 0 says stop and then exits the process.
pub(crate) fn init() {
    if JOB.get().is_some() || !(launched() || asked()) {
        return;
    }
    let Some((universe, threading)) = mpi::initialize_with_threading(Threading::Multiple) else {
        // The program initialised MPI itself: it runs its own MPI job.
        return;
    };
    let world = universe.world();
    let rank = usize::try_from(world.rank()).expect("a rank is not negative");
    let size = usize::try_from(world.size()).expect("a world size is not negative");
    if threading != Threading::Multiple {
        fail(&format!(
            "the MPI library gives threading level {threading:?}; multiproc needs \
             MPI_THREAD_MULTIPLE (build Open MPI or MPICH with thread support)"
        ));
    }
    if let Some(announced) = launcher_size()
        && announced != size
    {
        fail(&format!(
            "the launcher started a job of {announced} processes, but the MPI library \
             this program is linked with sees {size}: the program was started by \
             another MPI implementation's launcher (Open MPI's mpirun for an MPICH \
             build, or the reverse). Start it with the launcher of the MPI it was \
             built against (`ldd` on the binary shows which), or rebuild it against \
             the launcher's MPI (MPI_PKG_CONFIG=mpich for MPICH)"
        ));
    }
    *UNIVERSE.lock().unwrap_or_else(|p| p.into_inner()) = Some(universe);
    let outbox = match Outbox::start() {
        Ok(outbox) => outbox,
        Err(e) => fail(&format!("could not start the MPI sending thread: {e}")),
    };
    let host = mpi::environment::processor_name().unwrap_or_default();
    let set = std::env::var(super::super::WORKERS_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0);
    let workers_set = set.is_some();
    let cpus = set.unwrap_or_else(num_cpus::get);
    let fingerprint = crate::worker::task::binary_fingerprint();
    let mut job = Job {
        rank,
        size,
        hosts: vec![String::new(); size],
        cpus: vec![0; size],
        outbox,
    };
    job.hosts[rank] = host.clone();
    job.cpus[rank] = cpus;
    if rank == 0 {
        greet(&mut job, fingerprint);
        let _ = JOB.set(job);
        crate::error::name_workers_by(super::describe_worker);
        at_exit();
        return;
    }
    // A serving rank: everything that runs here is library code, and a panic in it
    // must end the job rather than leave rank 0 waiting.
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        SimpleCommunicator::world().abort(101);
    }));
    job.send(
        0,
        &Envelope::Hello {
            host,
            pid: std::process::id(),
            cpus: u32::try_from(cpus).unwrap_or(u32::MAX),
            workers_set,
            fingerprint,
        },
        &[],
    );
    let job = JOB.get_or_init(|| job);
    super::rank::serve(job);
    finish();
    std::process::exit(0);
}

/// How long rank 0 waits for every rank's hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(60);

/// At rank 0: waits for every serving rank's hello and checks it runs this build.
fn greet(job: &mut Job, fingerprint: u64) {
    let deadline = Instant::now() + HELLO_TIMEOUT;
    let mut missing = job.size - 1;
    let mut set = vec![false; job.size];
    while missing > 0 {
        let Some(received) = job.receive_until(deadline) else {
            fail(&format!(
                "{missing} of the job's {} ranks did not start serving within {:?}",
                job.size, HELLO_TIMEOUT
            ));
        };
        match received.envelope {
            Envelope::Hello {
                host,
                cpus,
                workers_set,
                fingerprint: theirs,
                ..
            } => {
                set[received.from] = workers_set;
                if theirs != fingerprint {
                    fail(&format!(
                        "rank {} on {host} runs a different build of this program; every \
                         rank must run the same binary",
                        received.from
                    ));
                }
                job.hosts[received.from] = host;
                job.cpus[received.from] = cpus as usize;
                missing -= 1;
            }
            Envelope::Failed { reason } => fail(&reason),
            other => fail(&format!(
                "rank {} sent {other:?} before its hello",
                received.from
            )),
        }
    }
    // Serving ranks on one node share its CPUs (`mpirun -n 3` on one machine runs
    // as many workers as the machine has CPUs, not twice as many).
    for (rank, _) in set.iter().enumerate().skip(1).filter(|(_, set)| !**set) {
        let sharing = (1..job.size)
            .filter(|&r| job.hosts[r] == job.hosts[rank])
            .count();
        job.cpus[rank] = (job.cpus[rank] / sharing.max(1)).max(1);
    }
}

/// Ends the job from rank 0 when the program exits: tells every serving rank to stop
/// and finalises MPI.
fn at_exit() {
    extern "C" fn end_job() {
        stop_serving_ranks();
        finish();
    }
    if crate::os::exit::at_exit(end_job).is_err() {
        fail("could not register the end of the MPI job with atexit");
    }
}

/// Tells every serving rank to stop (once).
pub(crate) fn stop_serving_ranks() {
    if let Some(job) = JOB.get()
        && job.rank == 0
        && !STOPPED.swap(true, Ordering::AcqRel)
    {
        for rank in 1..job.size {
            job.send(rank, &Envelope::Stop, &[]);
        }
    }
}

/// Sends what is queued and finalises MPI.
fn finish() {
    if let Some(job) = JOB.get() {
        job.outbox.flush();
    }
    // Dropping the universe calls MPI_Finalize.
    drop(UNIVERSE.lock().unwrap_or_else(|p| p.into_inner()).take());
}

/// Stops the job with `message`: every rank, through `MPI_Abort` once MPI is up.
pub(crate) fn fail(message: &str) -> ! {
    eprintln!("multiproc (MPI): {message}");
    if mpi::environment::is_initialized() && !mpi::environment::is_finalized() {
        SimpleCommunicator::world().abort(2);
    }
    std::process::exit(2);
}
