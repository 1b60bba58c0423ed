//! The rendezvous through which other processes of the job reach this process's
//! queues and claim the pipe ends it handed out.
//!
//! One per process, started the first time a queue or pipe end is sent elsewhere: a
//! thread listening on an abstract-namespace Unix socket (no file, so nothing is left
//! after a `kill -9`) with a random 128-bit name. A connection must come from a
//! process of the same user that descends from this one (the kernel's SO_PEERCRED,
//! then the parent links in `/proc`), and must begin with a random 128-bit token
//! that only travels inside the serialized handles. Anything else is closed at once.
//!
//! The client checks the server too: an abstract name is free again once its
//! creator exits, and any local user may bind it then. So before it sends the
//! token, a connecting process checks SO_PEERCRED of the listening end: the same
//! user, and the pid the address names as its creator (the process that called
//! `listen`). Anything else is refused without a byte sent.
//!
//! A rendezvous serves at most [`MAX_CONNECTIONS`] connections at once, one thread
//! each (a remote queue handle holds one per call in flight, and keeps a few idle
//! ones while it lives); past that a new connection is answered [`BUSY`] and
//! closed, and the client reports it.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt as _;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::os::proc::parent_of;
use crate::os::socket;

/// What a connection asks for: to talk to a queue, or to claim a parked descriptor.
pub(crate) const KIND_QUEUE: u8 = 0;
const KIND_CLAIM: u8 = 1;

/// Status byte answering a connection's opening.
const ACCEPTED: u8 = 0;
const UNKNOWN: u8 = 1;
/// Sent at once, instead of reading the opening, when the rendezvous already
/// serves [`MAX_CONNECTIONS`] connections.
const BUSY: u8 = 2;
/// Sent before closing a connection from a process that is not of this user or
/// does not descend from this one.
const STRANGER: u8 = 3;

/// How many connections one rendezvous serves at once (each has a thread). A
/// handle of a queue in another process holds one connection per call in flight
/// (one while a single thread uses it) and keeps a few idle, and a pipe end's claim
/// holds one briefly; 1024 covers a thousand workers each holding a queue, while
/// bounding the threads a runaway (or hostile same-user) peer can make this process
/// start.
pub(crate) const MAX_CONNECTIONS: usize = 1024;

/// How long a new connection may take to say who it is.
const OPENING_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a process's rendezvous is and the secret that opens it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Address {
    name: [u8; 16],
    token: [u8; 16],
    /// The process that owns the rendezvous.
    pub(crate) creator: u32,
}

impl Address {
    /// Whether this is the rendezvous of this very process.
    pub(crate) fn is_own(&self) -> bool {
        BROKER.get().is_some_and(|b| b.address == *self)
    }

    #[cfg(test)]
    pub(crate) fn with_wrong_token(mut self) -> Self {
        self.token[0] ^= 1;
        self
    }

    fn socket_name(&self) -> String {
        let hex: String = self.name.iter().map(|b| format!("{b:02x}")).collect();
        format!("multiproc-{hex}")
    }
}

type Handler = fn(u64, UnixStream);

struct Broker {
    address: Address,
    queue_handler: Mutex<Option<Handler>>,
    parked: Mutex<HashMap<u64, OwnedFd>>,
    /// Connections being served now, and the most it serves at once.
    active: AtomicUsize,
    limit: usize,
}

impl Broker {
    fn new(address: Address, limit: usize) -> Self {
        Broker {
            address,
            queue_handler: Mutex::new(None),
            parked: Mutex::new(HashMap::new()),
            active: AtomicUsize::new(0),
            limit,
        }
    }

    /// A place among the connections served, if there is one left.
    fn admit(&'static self) -> Option<Admitted> {
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .ok()?;
        Some(Admitted(self))
    }
}

/// One connection's place among those a broker serves, given back on drop.
struct Admitted(&'static Broker);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

static BROKER: OnceLock<Broker> = OnceLock::new();
static START: Mutex<()> = Mutex::new(());

/// This process's rendezvous, started on first use. `handler` serves the queue
/// connections.
pub(crate) fn address(handler: Option<Handler>) -> io::Result<Address> {
    let broker = start()?;
    if let Some(handler) = handler {
        *broker
            .queue_handler
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(handler);
    }
    Ok(broker.address)
}

fn start() -> io::Result<&'static Broker> {
    if let Some(broker) = BROKER.get() {
        return Ok(broker);
    }
    let _starting = START.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(broker) = BROKER.get() {
        return Ok(broker);
    }
    let address = Address {
        name: random()?,
        token: random()?,
        creator: std::process::id(),
    };
    let listener = listen(&address)?;
    let broker = BROKER.get_or_init(|| Broker::new(address, MAX_CONNECTIONS));
    run(listener, broker)?;
    Ok(broker)
}

fn listen(address: &Address) -> io::Result<UnixListener> {
    UnixListener::bind_addr(&SocketAddr::from_abstract_name(
        address.socket_name().as_bytes(),
    )?)
}

/// Starts the thread that accepts `broker`'s connections on `listener`.
fn run(listener: UnixListener, broker: &'static Broker) -> io::Result<()> {
    thread::Builder::new()
        .name("multiproc-broker".into())
        .spawn(move || accept_loop(&listener, broker))?;
    Ok(())
}

fn accept_loop(listener: &UnixListener, broker: &'static Broker) {
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                // Out of descriptors or memory: let it pass and try again shortly.
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let Some(admitted) = broker.admit() else {
            // One byte into a fresh socket's empty buffer: it cannot block.
            let _ = (&stream).write_all(&[BUSY]);
            continue;
        };
        // A refused or failed connection is simply closed (if the thread cannot
        // start, the closure and its place are dropped here).
        let _ = thread::Builder::new()
            .name("multiproc-broker-conn".into())
            .spawn(move || {
                let _ = serve(stream, broker, admitted);
            });
    }
}

/// Serves one connection. `_place` is the last parameter, so it is dropped first,
/// before `stream` closes: a client that sees its connection end may count on the
/// place being free again.
fn serve(mut stream: UnixStream, broker: &Broker, _place: Admitted) -> io::Result<()> {
    let peer = socket::peer(&stream)?;
    if peer.uid != socket::own_uid() || !descends_from_us(peer.pid) {
        // Says only that it is refused, which closing would say too.
        return stream.write_all(&[STRANGER]);
    }
    stream.set_read_timeout(Some(OPENING_TIMEOUT))?;
    let mut opening = [0u8; 16 + 1 + 8];
    stream.read_exact(&mut opening)?;
    if !same_secret(&opening[..16], &broker.address.token) {
        return Ok(());
    }
    stream.set_read_timeout(None)?;
    let kind = opening[16];
    let id = u64::from_le_bytes(opening[17..].try_into().expect("8 bytes"));
    match kind {
        KIND_QUEUE => {
            let handler = *broker
                .queue_handler
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match handler {
                Some(handler) => handler(id, stream),
                None => stream.write_all(&[UNKNOWN])?,
            }
        }
        KIND_CLAIM => {
            let fd = broker
                .parked
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            match fd {
                // Our copy closes when `fd` drops, once the claimant has its own.
                Some(fd) => socket::send_fd(&stream, ACCEPTED, fd.as_raw_fd())?,
                None => stream.write_all(&[UNKNOWN])?,
            }
        }
        _ => {}
    }
    Ok(())
}

/// Answers a queue connection's opening: the queue exists (`true`) or not.
pub(crate) fn answer(stream: &mut UnixStream, known: bool) -> io::Result<()> {
    stream.write_all(&[if known { ACCEPTED } else { UNKNOWN }])
}

/// Opens a connection to a queue behind `address`.
pub(crate) fn connect(address: &Address, id: u64) -> io::Result<UnixStream> {
    let mut stream = open(address, KIND_QUEUE, id)?;
    let mut status = [0u8];
    stream
        .read_exact(&mut status)
        .map_err(|e| refused(address, e))?;
    if let Some(error) = refusal(address, status[0]) {
        return Err(error);
    }
    if status[0] != ACCEPTED {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("process {} no longer has this queue", address.creator),
        ));
    }
    Ok(stream)
}

/// Takes the descriptor parked as `id` behind `address`; the owner closes its copy.
pub(crate) fn claim(address: &Address, id: u64) -> io::Result<OwnedFd> {
    let stream = open(address, KIND_CLAIM, id)?;
    match socket::recv_fd(&stream) {
        Ok((ACCEPTED, Some(fd))) => Ok(fd),
        Ok((status, _)) => Err(refusal(address, status).unwrap_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "process {} has no such end to hand over: it was claimed already \
                     (an item that runs again after its worker was lost cannot take the \
                     same pipe end twice) or its owner closed it",
                    address.creator
                ),
            )
        })),
        Err(e) => Err(refused(address, e)),
    }
}

/// Parks a descriptor until another process claims it; returns its id.
pub(crate) fn park(fd: OwnedFd) -> io::Result<(Address, u64)> {
    let broker = start()?;
    let id = next_id();
    broker
        .parked
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id, fd);
    PARKING.with(|parking| {
        if let Some(ids) = parking.borrow_mut().as_mut() {
            ids.push(id);
        }
    });
    Ok((broker.address, id))
}

thread_local! {
    /// The descriptors parked on this thread inside [`parks_while`].
    static PARKING: std::cell::RefCell<Option<Vec<u64>>> = const { std::cell::RefCell::new(None) };
}

/// Descriptors parked for one receiver (a `Process` child's argument). Dropping it
/// closes those the receiver has not claimed: once the receiver is gone, nobody
/// else can claim them, and closing them lets the other end of each pipe see that.
#[derive(Debug, Default)]
pub(crate) struct Parked(Vec<u64>);

impl Drop for Parked {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        let Some(broker) = BROKER.get() else {
            return;
        };
        let mut parked = broker.parked.lock().unwrap_or_else(|p| p.into_inner());
        for id in &self.0 {
            parked.remove(id);
        }
    }
}

/// Runs `encode` and returns, with its result, the descriptors parked on this
/// thread meanwhile (the pipe ends a value being encoded hands over).
pub(crate) fn parks_while<R>(encode: impl FnOnce() -> R) -> (R, Parked) {
    /// Puts the outer scope back even if `encode` panics.
    struct Scope(Option<Vec<u64>>);
    impl Drop for Scope {
        fn drop(&mut self) {
            let outer = self.0.take();
            PARKING.with(|parking| *parking.borrow_mut() = outer);
        }
    }
    let outer = PARKING.with(|parking| parking.borrow_mut().replace(Vec::new()));
    let scope = Scope(outer);
    let result = encode();
    let ids = PARKING.with(|parking| parking.borrow_mut().take());
    drop(scope);
    (result, Parked(ids.unwrap_or_default()))
}

/// A fresh id for a queue or a parked descriptor, unique in this process.
pub(crate) fn next_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn open(address: &Address, kind: u8, id: u64) -> io::Result<UnixStream> {
    let name = SocketAddr::from_abstract_name(address.socket_name().as_bytes())?;
    let mut stream = UnixStream::connect_addr(&name).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "cannot reach process {} (has it exited?): {e}",
                address.creator
            ),
        )
    })?;
    check_server(address, &stream)?;
    let mut opening = [0u8; 16 + 1 + 8];
    opening[..16].copy_from_slice(&address.token);
    opening[16] = kind;
    opening[17..].copy_from_slice(&id.to_le_bytes());
    if let Err(e) = stream.write_all(&opening) {
        // A busy server answers at once and closes: its answer may still be there.
        let mut status = [0u8];
        if let Ok(1) = stream.read(&mut status)
            && let Some(error) = refusal(address, status[0])
        {
            return Err(error);
        }
        return Err(refused(address, e));
    }
    Ok(stream)
}

/// Refuses a rendezvous answered by anyone but the address's creator of our user:
/// after the creator exits, another process (of any user) may bind its name.
fn check_server(address: &Address, stream: &UnixStream) -> io::Result<()> {
    let peer = socket::peer(stream).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "cannot tell who answers the rendezvous of process {} (SO_PEERCRED): {e}",
                address.creator
            ),
        )
    })?;
    if peer.uid != socket::own_uid() || peer.pid != address.creator {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "the rendezvous of process {} is answered by process {} of user {}: \
                 refused before sending the secret (the creator has exited and another \
                 process took its name?)",
                address.creator, peer.pid, peer.uid
            ),
        ));
    }
    Ok(())
}

/// The error a refusing status byte stands for, if it is one.
fn refusal(address: &Address, status: u8) -> Option<io::Error> {
    match status {
        BUSY => Some(io::Error::new(
            io::ErrorKind::ResourceBusy,
            format!(
                "process {} is serving as many connections to its queues and pipes as it \
                 serves at once ({MAX_CONNECTIONS}): refused, try again once some have closed",
                address.creator
            ),
        )),
        STRANGER => Some(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "process {} refused the connection: only processes of its user that \
                 descend from it may use its queues and pipes",
                address.creator
            ),
        )),
        _ => None,
    }
}

fn refused(address: &Address, e: io::Error) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "process {} refused the connection or went away: {e}",
            address.creator
        ),
    )
}

/// Compares two secrets in time that does not depend on where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `pid` is this process or one of its descendants.
fn descends_from_us(mut pid: u32) -> bool {
    let us = std::process::id();
    for _ in 0..256 {
        if pid == us {
            return true;
        }
        if pid <= 1 {
            return false;
        }
        match parent_of(pid) {
            Some(parent) => pid = parent,
            None => return false,
        }
    }
    false
}

fn random() -> io::Result<[u8; 16]> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_descends_from_itself_but_not_its_parent() {
        assert!(descends_from_us(std::process::id()));
        assert!(!descends_from_us(std::os::unix::process::parent_id()));
        assert!(!descends_from_us(1));
    }

    #[test]
    fn a_wrong_token_is_refused() {
        let fd = OwnedFd::from(UnixStream::pair().unwrap().0);
        let (address, id) = park(fd).unwrap();
        let err = claim(&address.with_wrong_token(), id).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{err}");
        // The right token still gets it, once.
        claim(&address, id).unwrap();
        assert!(claim(&address, id).is_err());
    }

    #[test]
    fn a_server_that_is_not_the_creator_is_refused_before_the_token_is_sent() {
        // This process binds the name, but the address says another process (our
        // parent) made it: as when the creator exited and someone took the name.
        let address = Address {
            name: random().unwrap(),
            token: random().unwrap(),
            creator: std::os::unix::process::parent_id(),
        };
        let listener = listen(&address).unwrap();
        let server = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut got = Vec::new();
            stream.take(25).read_to_end(&mut got).unwrap();
            got
        });
        let err = claim(&address, 7).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{err}");
        assert!(err.to_string().contains("is answered by process"), "{err}");
        assert!(server.join().unwrap().is_empty(), "the token was sent");
    }

    #[test]
    fn connections_past_the_limit_are_refused_with_a_clear_error() {
        let address = Address {
            name: random().unwrap(),
            token: random().unwrap(),
            creator: std::process::id(),
        };
        let broker: &'static Broker = Box::leak(Box::new(Broker::new(address, 1)));
        run(listen(&address).unwrap(), broker).unwrap();
        let fd = OwnedFd::from(UnixStream::pair().unwrap().0);
        broker.parked.lock().unwrap().insert(1, fd);
        // One connection takes the only place (connections are admitted in order).
        let name = SocketAddr::from_abstract_name(address.socket_name().as_bytes()).unwrap();
        let mut holder = UnixStream::connect_addr(&name).unwrap();
        let err = claim(&address, 1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ResourceBusy, "{err}");
        assert!(err.to_string().contains("serves at once"), "{err}");
        // The holder finishes (a claim of nothing): its place is given back before
        // its connection closes, so the next claim is served.
        let mut opening = [0u8; 25];
        opening[..16].copy_from_slice(&address.token);
        opening[16] = KIND_CLAIM;
        opening[17..].copy_from_slice(&99u64.to_le_bytes());
        holder.write_all(&opening).unwrap();
        let mut answer = Vec::new();
        holder.read_to_end(&mut answer).unwrap();
        assert_eq!(answer, [UNKNOWN]);
        claim(&address, 1).unwrap();
    }
}
