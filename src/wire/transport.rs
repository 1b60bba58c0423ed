//! ipc-channel set-up: the worker's one-shot handshake and framed byte links both ways.
//!
//! Every worker has one fixed set of four channels, opened by the worker itself at start
//! (so the worker holds the only sender of its reply channel, and its death closes it):
//! a byte channel each way for frames up to [`inline_limit`], and a shared-memory channel
//! each way for larger frames. A large frame travels as one memfd whose descriptor is sent
//! first on the shared-memory channel, followed by an empty marker frame on the byte
//! channel; this keeps every socket message within ipc-channel's fragment size (about
//! 207 KiB with Linux's default socket buffer, less where the buffer is smaller), above
//! which a send becomes a rendezvous that hangs if the peer dies mid-transfer.
//!
//! Frames are prefixed with their length as a LEB128 varint, which is exactly how
//! postcard (ipc-channel's own codec) lays out a byte string. That lets the parent add
//! the worker's byte receiver to an `IpcReceiverSet` as a typed receiver of
//! [`RawFrame`] and wait on all workers with one `select`.

use std::io;
use std::ops::Deref;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ipc_channel::platform::OsIpcSender;
use ipc_channel::{IpcError, TryRecvError};

use ipc_channel::ipc::{
    self, IpcBytesReceiver, IpcBytesSender, IpcOneShotServer, IpcReceiver, IpcSender,
    IpcSharedMemory,
};
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::os::poll::poll_before_blocking;
use crate::os::signals::with_signals_held;

/// The largest frame body that goes out as one socket message; larger frames travel
/// through shared memory.
///
/// ipc-channel sends a message as one packet when it fits its first fragment, whose
/// size follows the socket send buffer (`SO_SNDBUF` of a fresh socket, that is
/// `net.core.wmem_default`, less room for 64 descriptors and a 16-byte header):
/// 212,448 bytes with the default 212,992-byte buffer, less on hosts with a smaller
/// one. This asks ipc-channel for that size (it measures once and caches it, as this
/// does) and keeps room for the frame's length prefix.
pub(crate) fn inline_limit() -> usize {
    #[cfg(test)]
    if let Some(forced) = FORCED_INLINE_LIMIT.get() {
        return forced;
    }
    static LIMIT: OnceLock<usize> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        // ipc-channel panics when it cannot open the socket it measures (out of
        // descriptors); a conservative size keeps frames single packets meanwhile.
        std::panic::catch_unwind(OsIpcSender::get_max_fragment_size)
            .map_or(FALLBACK_INLINE_LIMIT, |fragment| {
                fragment.saturating_sub(PREFIX)
            })
    })
}

/// Used when the fragment size cannot be measured: far below any socket buffer Linux
/// gives a new socket by default.
const FALLBACK_INLINE_LIMIT: usize = 32 * 1024;

#[cfg(test)]
thread_local! {
    /// A smaller [`inline_limit`] for the tests on this thread.
    static FORCED_INLINE_LIMIT: std::cell::Cell<Option<usize>> =
        const { std::cell::Cell::new(None) };
}

/// Makes [`inline_limit`] return `limit` on this thread until the guard is dropped.
#[cfg(test)]
pub(crate) fn force_inline_limit(limit: usize) -> impl Drop {
    struct Restore(Option<usize>);
    impl Drop for Restore {
        fn drop(&mut self) {
            FORCED_INLINE_LIMIT.set(self.0);
        }
    }
    Restore(FORCED_INLINE_LIMIT.replace(Some(limit)))
}

/// Room reserved in front of every frame for its varint length.
const PREFIX: usize = 10;

/// A frame being built. Callers append the body to [`FrameBuf::body`]; the space in
/// front is reserved for the length prefix so sending needs no copy.
pub(crate) struct FrameBuf {
    buf: Vec<u8>,
}

impl FrameBuf {
    pub(crate) fn with_capacity(body: usize) -> Self {
        let mut buf = Vec::with_capacity(PREFIX + body);
        buf.resize(PREFIX, 0);
        Self { buf }
    }

    /// Empties the frame, keeping its allocation.
    pub(crate) fn clear(&mut self) {
        self.buf.truncate(PREFIX);
    }

    /// The vector to append the body to. Only append: the first bytes are reserved.
    pub(crate) fn body(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    pub(crate) fn body_len(&self) -> usize {
        self.buf.len() - PREFIX
    }

    /// Keeps the first `len` bytes of the body.
    pub(crate) fn truncate_body(&mut self, len: usize) {
        self.buf.truncate(PREFIX + len);
    }

    /// The body without the reserved prefix.
    pub(crate) fn body_bytes(&self) -> &[u8] {
        &self.buf[PREFIX..]
    }

    /// Writes the length prefix just in front of the body and returns prefix + body.
    fn prefixed(&mut self) -> &[u8] {
        let mut len = self.body_len();
        let mut varint = [0u8; PREFIX];
        let mut n = 0;
        loop {
            let byte = (len & 0x7f) as u8;
            len >>= 7;
            if len == 0 {
                varint[n] = byte;
                n += 1;
                break;
            }
            varint[n] = byte | 0x80;
            n += 1;
        }
        let start = PREFIX - n;
        self.buf[start..PREFIX].copy_from_slice(&varint[..n]);
        &self.buf[start..]
    }
}

/// A received frame body, either copied out of a socket message or mapped from a memfd.
pub(crate) enum Frame {
    Inline(Vec<u8>),
    Shared(IpcSharedMemory),
}

impl Deref for Frame {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Frame::Inline(bytes) => bytes,
            Frame::Shared(shared) => shared,
        }
    }
}

/// A frame body as the parent's receiver set sees it (see the module docs).
pub(crate) struct RawFrame(Vec<u8>);

impl Serialize for RawFrame {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for RawFrame {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BytesVisitor;
        impl Visitor<'_> for BytesVisitor {
            type Value = RawFrame;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a frame of bytes")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<RawFrame, E> {
                Ok(RawFrame(v.to_vec()))
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<RawFrame, E> {
                Ok(RawFrame(v))
            }
        }
        deserializer.deserialize_byte_buf(BytesVisitor)
    }
}

/// Strips the varint prefix of a frame received as plain bytes.
fn strip_prefix(mut bytes: Vec<u8>) -> io::Result<Vec<u8>> {
    let mut len: usize = 0;
    for (i, &byte) in bytes.iter().enumerate().take(PREFIX) {
        len |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            if bytes.len() - (i + 1) != len {
                break;
            }
            bytes.drain(..=i);
            return Ok(bytes);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "frame length prefix does not match its size",
    ))
}

fn ipc_to_io(err: IpcError) -> io::Error {
    match err {
        IpcError::Io(e) => e,
        IpcError::Disconnected => io::Error::from(io::ErrorKind::BrokenPipe),
        IpcError::SerializationError(e) => io::Error::new(io::ErrorKind::InvalidData, e),
    }
}

/// Whether an ipc-channel error is an interrupted system call (`EINTR`).
///
/// ipc-channel passes `EINTR` from `recvmsg`, `sendmsg` and `poll` up as
/// `IpcError::Io` of kind `Interrupted`. A call that failed that way moved no data: a
/// receive fails before it read the first fragment and a send before it queued its
/// message, so the call may simply be made again. (A fragmented message interrupted
/// between fragments is lost, but no frame is ever fragmented: see [`inline_limit`].)
fn is_interrupted(err: &IpcError) -> bool {
    matches!(err, IpcError::Io(e) if e.kind() == io::ErrorKind::Interrupted)
}

/// Runs `call` again for as long as it fails with `EINTR`.
fn retry_interrupted<R>(mut call: impl FnMut() -> Result<R, IpcError>) -> Result<R, IpcError> {
    loop {
        match call() {
            Err(e) if is_interrupted(&e) => continue,
            other => return other,
        }
    }
}

/// Blocks for the next reply on one worker's reply receiver, outside a receiver set
/// (a `Process` has one worker and no set); `None` once the worker has hung up.
pub(crate) fn recv_reply(replies: &IpcReceiver<RawFrame>) -> io::Result<Option<RawFrame>> {
    match retry_interrupted(|| replies.recv()) {
        Ok(raw) => Ok(Some(raw)),
        Err(IpcError::Disconnected) => Ok(None),
        Err(e) => Err(ipc_to_io(e)),
    }
}

/// Waits up to `timeout` for the memfd announced by a large-frame marker.
fn recv_shared(
    receiver: &IpcReceiver<IpcSharedMemory>,
    timeout: Duration,
) -> io::Result<IpcSharedMemory> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match receiver.try_recv_timeout(left) {
            Ok(shared) => return Ok(shared),
            Err(TryRecvError::IpcError(e)) if is_interrupted(&e) => continue,
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a large-frame marker arrived without its shared memory",
                ));
            }
        }
    }
}

/// Sends a frame: inline when small, through a memfd when large.
fn send_frame(
    bytes: &IpcBytesSender,
    big: &IpcSender<IpcSharedMemory>,
    frame: &mut FrameBuf,
) -> io::Result<()> {
    if frame.body_len() <= inline_limit() {
        let wire = frame.prefixed();
        return retry_interrupted(|| bytes.send(wire).map_err(IpcError::Io)).map_err(ipc_to_io);
    }
    // ipc-channel asserts (panics) when it cannot create the memfd, for example when
    // the process is out of descriptors; turn that into an error for this frame.
    let body = frame.body_bytes();
    let shared = std::panic::catch_unwind(|| IpcSharedMemory::from_bytes(body))
        .map_err(|_| io::Error::other("could not create shared memory for a large frame"))?;
    // `IpcSender::send` takes its message by value; sending a reference through the
    // same channel (the bytes on the wire are the same) lets an interrupted send be
    // made again with the same memfd.
    // ipc-channel's send takes whatever this thread's encoding left out of band.
    let _ = crate::wire::codec::flush();
    let by_ref = big.clone().to_opaque().to::<SharedRef<'_>>();
    retry_interrupted(|| by_ref.send(SharedRef(&shared))).map_err(ipc_to_io)?;
    count_shared(false);
    // The empty frame says "the body is waiting on the shared-memory channel".
    retry_interrupted(|| bytes.send(&[0]).map_err(IpcError::Io)).map_err(ipc_to_io)
}

/// Size of a worker's progress word: one `u64`, the index + 1 of the item it is
/// running (0: none yet).
const PROGRESS_BYTES: usize = 8;

/// This worker's progress word, shared with its parent, which reads it when the
/// worker dies to name the item that killed it.
static PROGRESS: OnceLock<&'static std::sync::atomic::AtomicU64> = OnceLock::new();

/// Keeps this worker's mapping of its progress word for the life of the process.
fn publish_progress(progress: IpcSharedMemory) {
    if PROGRESS.get().is_some() {
        return;
    }
    if let Some(word) = crate::os::shm::leak_word(progress) {
        let _ = PROGRESS.set(word);
    }
}

/// The progress word of this worker process, if it has one (threads of the inline
/// backend do not): the runner stores `item + 1` before each item.
pub(crate) fn progress() -> Option<&'static std::sync::atomic::AtomicU64> {
    PROGRESS.get().copied()
}

/// Frames this process sent and received through shared memory (too large for one
/// packet): for tests that check which path a frame took.
static SHARED_FRAMES: [std::sync::atomic::AtomicU64; 2] =
    [const { std::sync::atomic::AtomicU64::new(0) }; 2];

/// How many frames this process has sent and received through shared memory.
pub(crate) fn shared_memory_frames() -> (u64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    (
        SHARED_FRAMES[0].load(Relaxed),
        SHARED_FRAMES[1].load(Relaxed),
    )
}

fn count_shared(received: bool) {
    SHARED_FRAMES[usize::from(received)].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// An `IpcSharedMemory` sent by reference: serialises exactly as the value does.
struct SharedRef<'a>(&'a IpcSharedMemory);

impl Serialize for SharedRef<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for SharedRef<'_> {
    /// Never called: the receiving end reads `IpcSharedMemory` values.
    fn deserialize<D: Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        Err(de::Error::custom(
            "a shared-memory reference is only ever sent",
        ))
    }
}

/// The handshake message, worker side. Field order must match [`HelloIn`]: the two
/// describe the same bytes, read with different channel types (see the module docs).
#[derive(Serialize, Deserialize)]
struct HelloOut {
    requests: IpcBytesSender,
    big_requests: IpcSender<IpcSharedMemory>,
    replies: IpcBytesReceiver,
    big_replies: IpcReceiver<IpcSharedMemory>,
    pid: u32,
    fingerprint: u64,
    progress: IpcSharedMemory,
}

#[derive(Serialize, Deserialize)]
enum HandshakeOut {
    Hello(HelloOut),
    #[allow(dead_code)]
    Abort,
}

/// The handshake message, parent side.
#[derive(Serialize, Deserialize)]
struct HelloIn {
    requests: IpcBytesSender,
    big_requests: IpcSender<IpcSharedMemory>,
    replies: IpcReceiver<RawFrame>,
    big_replies: IpcReceiver<IpcSharedMemory>,
    pid: u32,
    fingerprint: u64,
    progress: IpcSharedMemory,
}

#[derive(Serialize, Deserialize)]
enum HandshakeIn {
    Hello(HelloIn),
    Abort,
}

/// The worker's end of its channels.
pub(crate) struct WorkerLink {
    requests: IpcBytesReceiver,
    big_requests: IpcReceiver<IpcSharedMemory>,
    replies: IpcBytesSender,
    big_replies: IpcSender<IpcSharedMemory>,
}

impl WorkerLink {
    /// Opens the worker's channels and hands the parent its ends through the
    /// one-shot server named `server`, announcing `pid` as this process's (the
    /// parent checks it against the child it started).
    pub(crate) fn connect(server: &str, pid: u32, fingerprint: u64) -> io::Result<Self> {
        let (requests_tx, requests) = ipc::bytes_channel()?;
        let (big_requests_tx, big_requests) = ipc::channel()?;
        let (replies, replies_rx) = ipc::bytes_channel()?;
        let (big_replies, big_replies_rx) = ipc::channel()?;
        let progress = IpcSharedMemory::from_byte(0, PROGRESS_BYTES);
        let hello = HelloOut {
            requests: requests_tx,
            big_requests: big_requests_tx,
            replies: replies_rx,
            big_replies: big_replies_rx,
            pid,
            fingerprint,
            progress: progress.clone(),
        };
        with_signals_held(|| {
            let bootstrap = IpcSender::<HandshakeOut>::connect(server.to_owned())?;
            bootstrap
                .send(HandshakeOut::Hello(hello))
                .map_err(ipc_to_io)
        })?;
        publish_progress(progress);
        Ok(Self {
            requests,
            big_requests,
            replies,
            big_replies,
        })
    }

    /// The next request frame, or `None` once the parent has hung up.
    pub(crate) fn recv(&self) -> io::Result<Option<Frame>> {
        let polled = poll_before_blocking(|| match self.requests.try_recv() {
            Ok(bytes) => Some(Ok(bytes)),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::IpcError(e)) => Some(Err(e)),
        });
        let polled = polled.filter(|result| !matches!(result, Err(e) if is_interrupted(e)));
        let received = polled.unwrap_or_else(|| retry_interrupted(|| self.requests.recv()));
        let bytes = match received {
            Ok(bytes) => strip_prefix(bytes)?,
            Err(IpcError::Disconnected) => return Ok(None),
            Err(e) => return Err(ipc_to_io(e)),
        };
        if !bytes.is_empty() {
            return Ok(Some(Frame::Inline(bytes)));
        }
        recv_shared(&self.big_requests, Duration::from_secs(10)).map(|s| Some(Frame::Shared(s)))
    }

    pub(crate) fn send(&self, frame: &mut FrameBuf) -> io::Result<()> {
        send_frame(&self.replies, &self.big_replies, frame)
    }
}

/// The parent's end of one worker's channels, minus the reply receiver, which lives
/// in the parent's receiver set.
pub(crate) struct ParentLink {
    requests: IpcBytesSender,
    big_requests: IpcSender<IpcSharedMemory>,
    big_replies: IpcReceiver<IpcSharedMemory>,
    pub(crate) pid: u32,
    pub(crate) fingerprint: u64,
    /// The worker's progress word (see [`started`]).
    progress: IpcSharedMemory,
}

impl ParentLink {
    /// The item the worker last started, read after it died (so nothing writes it
    /// any more); `None` when it never started one.
    pub(crate) fn last_started(&self) -> Option<u64> {
        let bytes: [u8; 8] = self.progress.get(..PROGRESS_BYTES)?.try_into().ok()?;
        u64::from_ne_bytes(bytes).checked_sub(1)
    }

    pub(crate) fn send(&self, frame: &mut FrameBuf) -> io::Result<()> {
        send_frame(&self.requests, &self.big_requests, frame)
    }

    /// Turns a message from the receiver set into a frame body, fetching the shared
    /// memory when it is a large-frame marker.
    pub(crate) fn open(&self, raw: RawFrame) -> io::Result<Frame> {
        if !raw.0.is_empty() {
            return Ok(Frame::Inline(raw.0));
        }
        // The worker sent the memfd before the marker, so it is already queued.
        let shared = recv_shared(&self.big_replies, Duration::from_secs(10))?;
        count_shared(true);
        Ok(Frame::Shared(shared))
    }
}

/// The parent's one-shot rendezvous point for one starting worker.
pub(crate) struct Listener {
    server: IpcOneShotServer<HandshakeIn>,
    name: String,
}

/// What a successful handshake yields.
pub(crate) type Accepted = (ParentLink, IpcReceiver<RawFrame>);

impl Listener {
    pub(crate) fn new() -> io::Result<Self> {
        let (server, name) = IpcOneShotServer::new()?;
        Ok(Self { server, name })
    }

    /// The address a worker connects to.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Blocks until the worker says hello, or until [`Listener::abort`] is called with
    /// this listener's name (`Ok(None)`). ipc-channel's accept has no timeout, hence
    /// the abort. Signals are held back meanwhile: an `EINTR` inside ipc-channel's
    /// accept would consume the server, so it could not be retried.
    pub(crate) fn accept(self) -> io::Result<Option<Accepted>> {
        let server = self.server;
        let (_bootstrap, message) = with_signals_held(|| server.accept()).map_err(ipc_to_io)?;
        match message {
            HandshakeIn::Hello(hello) => Ok(Some((
                ParentLink {
                    requests: hello.requests,
                    big_requests: hello.big_requests,
                    big_replies: hello.big_replies,
                    pid: hello.pid,
                    fingerprint: hello.fingerprint,
                    progress: hello.progress,
                },
                hello.replies,
            ))),
            HandshakeIn::Abort => Ok(None),
        }
    }

    /// Wakes a thread blocked in [`Listener::accept`] on the listener called `name`.
    pub(crate) fn abort(name: &str) -> io::Result<()> {
        // ipc-channel's send takes whatever this thread's encoding left out of band.
        let _ = crate::wire::codec::flush();
        let sender = IpcSender::<HandshakeIn>::connect(name.to_owned())?;
        sender.send(HandshakeIn::Abort).map_err(ipc_to_io)
    }
}

/// A chunk's reply payload, borrowed from the frame it arrived in.
pub(crate) struct Payload {
    frame: Frame,
    len: usize,
}

impl Payload {
    pub(crate) fn new(frame: Frame, len: usize) -> Self {
        Self { frame, len }
    }

    /// No bytes: a chunk none of whose items produced a result.
    pub(crate) fn empty() -> Self {
        Self {
            frame: Frame::Inline(Vec::new()),
            len: 0,
        }
    }
}

impl Deref for Payload {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.frame[..self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_matches_postcard_byte_strings() {
        for len in [0usize, 1, 127, 128, 300, 70_000] {
            let mut frame = FrameBuf::with_capacity(64);
            frame.body().extend((0..len).map(|i| i as u8));
            let wire = frame.prefixed().to_vec();
            let raw: RawFrame = postcard::from_bytes(&wire).expect("postcard reads our frame");
            assert_eq!(raw.0.len(), len);
            assert_eq!(strip_prefix(wire).unwrap(), raw.0);
        }
    }

    #[test]
    fn bad_prefix_is_rejected() {
        assert!(strip_prefix(vec![5, 1, 2]).is_err());
        assert!(strip_prefix(vec![0x80; 12]).is_err());
        assert!(strip_prefix(vec![]).is_err());
    }

    #[test]
    fn small_and_large_frames_cross_a_channel_pair() {
        let (bytes_tx, bytes_rx) = ipc::bytes_channel().unwrap();
        let (big_tx, big_rx) = ipc::channel().unwrap();
        let link = WorkerLink {
            requests: bytes_rx,
            big_requests: big_rx,
            replies: bytes_tx.clone(),
            big_replies: big_tx.clone(),
        };
        let limit = inline_limit();
        for len in [4, limit, limit + 1, 3 * limit] {
            let mut frame = FrameBuf::with_capacity(64);
            frame.body().extend((0..len).map(|i| (i % 251) as u8));
            send_frame(&bytes_tx, &big_tx, &mut frame).unwrap();
            let got = link.recv().unwrap().expect("a frame");
            assert_eq!(got.len(), len);
            assert!(got.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
            assert_eq!(matches!(got, Frame::Shared(_)), len > limit);
        }
    }

    #[test]
    fn the_inline_limit_follows_the_socket_send_buffer() {
        // ipc-channel's first fragment: the buffer less CMSG_SPACE(64 descriptors)
        // and a 16-byte header, rounded down to 8; less our length prefix.
        let fragment = (crate::os::socket::fresh_socket_send_buffer() - 528 - 16) & !7;
        assert_eq!(inline_limit(), fragment - PREFIX);
        // Every frame up to the limit is one packet, so one send can take it with no
        // reader: a fragmented send would wait for the reader and never return.
        let (bytes_tx, bytes_rx) = ipc::bytes_channel().unwrap();
        let mut frame = FrameBuf::with_capacity(64);
        frame.body().resize(PREFIX + inline_limit(), 7);
        bytes_tx.send(frame.prefixed()).unwrap();
        assert_eq!(bytes_rx.recv().unwrap().len(), frame.prefixed().len());
    }

    #[test]
    fn frames_above_a_forced_limit_travel_through_shared_memory() {
        let _forced = force_inline_limit(1000);
        let (bytes_tx, bytes_rx) = ipc::bytes_channel().unwrap();
        let (big_tx, big_rx) = ipc::channel().unwrap();
        let link = WorkerLink {
            requests: bytes_rx,
            big_requests: big_rx,
            replies: bytes_tx.clone(),
            big_replies: big_tx.clone(),
        };
        for len in [1, 999, 1000, 1001, 5000, 300_000] {
            let mut frame = FrameBuf::with_capacity(64);
            frame.body().extend((0..len).map(|i| (i % 253) as u8));
            link.send(&mut frame).unwrap();
            let got = link.recv().unwrap().expect("a frame");
            assert_eq!(matches!(got, Frame::Shared(_)), len > 1000, "{len} bytes");
            assert_eq!(got.len(), len);
            assert!(got.iter().enumerate().all(|(i, &b)| b == (i % 253) as u8));
        }
    }
}
