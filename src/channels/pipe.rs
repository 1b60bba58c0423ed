//! Pipe: two typed ends of a socket pair, Python's `multiprocessing.Pipe`.
//!
//! An end is a connected Unix stream socket. Values cross as frames:
//! `length (u64, little endian) | descriptors (u32) | encoded value`, then, when the
//! value names shared inputs, one byte carrying copies of their descriptors
//! (SCM_RIGHTS), so the receiver attaches them whether or not the sender still
//! holds them. An end sent to another process (by
//! serializing it into a `Process` argument or a pool item) is moved out of this
//! process: its descriptor is parked at this process's rendezvous (`broker.rs`), the
//! serialized form names it, and the receiving process claims it with SCM_RIGHTS as
//! it decodes the value. The parked copy is closed as soon as it is claimed, so once
//! the receiver exits, the other end reads end-of-file and `recv` fails.

use std::io::{self, Read, Write};
use std::marker::PhantomData;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::channels::broker::{self, Address};
use crate::error::{CodecError, Error, Result};
use crate::os::socket;
use crate::shared::region;
use crate::wire::codec;

/// One end of a pipe: it sends `A` and receives `B`.
///
/// Made in pairs by [`Pipe::duplex`] (each end sends and receives) or
/// [`Pipe::one_way`]. An end is moved to a child by putting it into the argument of
/// [`Process::spawn`](crate::Process::spawn) (or a pool item): the child takes the
/// descriptor over and this process keeps no copy, so when the child exits or drops
/// its end, [`recv`](Pipe::recv) here fails with [`Error::PipeClosed`] instead of
/// waiting forever. Using an end in this process after sending it away is an
/// [`Error::Pipe`].
///
/// One thread at a time uses an end (calls on the same end from several threads
/// take turns).
///
/// A [`SharedSlice`](crate::SharedSlice) or [`Shared`](crate::Shared) inside a value
/// stays valid for the receiver even once the sender dropped its handle or
/// exited: copies of the descriptors of the inputs a value names travel with it.
/// A [`SharedSlice::map_file`](crate::SharedSlice::map_file) slice is refused by
/// [`send`](Pipe::send) with [`Error::EncodeItem`] (its file is not sealed, so only
/// its pool's workers may map it).
///
/// ```standalone_crate
/// fn main() -> multiproc::Result<()> {
///     multiproc::init();
///     let (here, there) = multiproc::Pipe::<String, usize>::duplex()?;
///     let child = multiproc::Process::spawn(there, |end: multiproc::Pipe<usize, String>| {
///         let word = end.recv().unwrap();
///         end.send(word.len()).unwrap();
///     })?;
///     here.send("hello".to_string())?;
///     assert_eq!(here.recv()?, 5);
///     child.join()?;
///     Ok(())
/// }
/// ```
pub struct Pipe<A, B> {
    end: Mutex<End>,
    /// The buffer each value is encoded into or read into, kept between values so
    /// large ones do not cost a fresh allocation (and its page faults) each time.
    /// Locked after `end`.
    scratch: Mutex<Vec<u8>>,
    /// The frame being received, kept across a `recv_timeout` that timed out in
    /// the middle of it, so the stream never falls out of step.
    incoming: Mutex<Incoming>,
    _types: PhantomData<fn(A) -> B>,
}

/// A scratch buffer larger than this is not kept after use.
const KEEP_SCRATCH: usize = 8 << 20;

/// A frame received in part: its header and as much of its body as has come.
#[derive(Default)]
struct Incoming {
    header: [u8; HEADER],
    /// Bytes of the frame (header, then body) received so far.
    got: usize,
    body: Vec<u8>,
    /// The descriptors the frame announced, once received.
    fds: Option<Vec<OwnedFd>>,
}

/// A frame's header: the body's length (u64) and how many descriptors follow it
/// (u32), little endian.
const HEADER: usize = 12;

enum End {
    Open(UnixStream),
    /// Decoded in the process that parked it: claimed on first use.
    Parked(Wire),
    /// Sent to another process.
    Sent(Wire),
    /// Could not be claimed when it was decoded.
    Broken(String, io::ErrorKind),
}

/// What an end becomes on the wire.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Wire {
    address: Address,
    id: u64,
}

impl<A, B> Pipe<A, B> {
    /// Two connected ends: what one sends, the other receives, both ways.
    ///
    /// # Errors
    ///
    /// [`Error::Pipe`] when the socket pair cannot be made (out of descriptors).
    pub fn duplex() -> Result<(Pipe<A, B>, Pipe<B, A>)> {
        let (a, b) = UnixStream::pair().map_err(|source| Error::Pipe {
            what: "could not create a socket pair".into(),
            source,
        })?;
        Ok((Pipe::open(a), Pipe::open(b)))
    }

    fn open(stream: UnixStream) -> Self {
        Pipe {
            end: Mutex::new(End::Open(stream)),
            scratch: Mutex::new(Vec::new()),
            incoming: Mutex::default(),
            _types: PhantomData,
        }
    }

    fn lock(&self) -> MutexGuard<'_, End> {
        self.end.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The scratch buffer; taken only while holding `end`'s lock.
    fn scratch(&self) -> MutexGuard<'_, Vec<u8>> {
        self.scratch.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The open stream, claiming a parked end first.
    fn stream<'a>(end: &'a mut MutexGuard<'_, End>) -> Result<&'a mut UnixStream> {
        if let End::Parked(wire) = &**end {
            let wire = *wire;
            let fd = broker::claim(&wire.address, wire.id).map_err(|source| Error::Pipe {
                what: "could not claim the end".into(),
                source,
            })?;
            **end = End::Open(UnixStream::from(fd));
        }
        match &mut **end {
            End::Open(stream) => Ok(stream),
            End::Sent(_) => Err(Error::Pipe {
                what: "this end was sent to another process".into(),
                source: io::Error::from(io::ErrorKind::NotConnected),
            }),
            End::Broken(what, kind) => Err(Error::Pipe {
                what: what.clone(),
                source: io::Error::from(*kind),
            }),
            End::Parked(_) => Err(Error::Pipe {
                what: "the end is still parked".into(),
                source: io::Error::from(io::ErrorKind::NotConnected),
            }),
        }
    }
}

impl<T> Pipe<T, ()> {
    /// Two ends of a one-way pipe: the first sends `T`, the second receives it
    /// (Python's `Pipe(duplex=False)`, in the order sender, receiver).
    ///
    /// # Errors
    ///
    /// As [`Pipe::duplex`].
    pub fn one_way() -> Result<(Pipe<T, ()>, Pipe<(), T>)> {
        let (sender, receiver) = Pipe::<T, ()>::duplex()?;
        for (end, how) in [
            (sender.lock(), Shutdown::Read),
            (receiver.lock(), Shutdown::Write),
        ] {
            if let End::Open(stream) = &*end {
                stream.shutdown(how).map_err(|source| Error::Pipe {
                    what: "could not make the pipe one-way".into(),
                    source,
                })?;
            }
        }
        Ok((sender, receiver))
    }
}

impl<A: Serialize, B> Pipe<A, B> {
    /// Sends a value to the other end. It waits only while the socket's buffer is
    /// full (the other side is not reading).
    ///
    /// # Errors
    ///
    /// [`Error::PipeClosed`] when the other end is gone, [`Error::EncodeItem`] when
    /// the value does not encode, [`Error::Pipe`] when this end was sent away.
    pub fn send(&self, value: A) -> Result<()> {
        let mut end = self.lock();
        let mut scratch = self.scratch();
        let frame = &mut *scratch;
        frame.clear();
        frame.extend_from_slice(&[0u8; HEADER]);
        let (encoded, pins) = region::pin_while(|| codec::encode_into(&value, frame));
        let sent = encoded
            .map_err(|source| Error::EncodeItem { item: 0, source })
            .and_then(|()| {
                // The shared inputs the value names go with it (SCM_RIGHTS), so the
                // other end attaches them even once this one dropped them.
                if pins.is_empty() {
                    Ok(Vec::new())
                } else {
                    pins.carried().map_err(|fault| Error::EncodeItem {
                        item: 0,
                        source: CodecError(format!("the value cannot go through a pipe: {fault}")),
                    })
                }
            })
            .and_then(|fds| {
                let len = (frame.len() - HEADER) as u64;
                frame[..8].copy_from_slice(&len.to_le_bytes());
                let count = u32::try_from(fds.len()).expect("at most MAX_CARRIED descriptors");
                frame[8..HEADER].copy_from_slice(&count.to_le_bytes());
                let stream = Self::stream(&mut end)?;
                stream.write_all(frame).map_err(hang_up)?;
                if !fds.is_empty() {
                    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
                    socket::send_fds(stream, 0, &raw).map_err(hang_up)?;
                }
                Ok(())
            });
        release(frame);
        sent
    }
}

impl<A, B: DeserializeOwned> Pipe<A, B> {
    /// Receives the next value, waiting for it.
    ///
    /// # Errors
    ///
    /// [`Error::PipeClosed`] once the other end is dropped or its process has
    /// exited, [`Error::DecodeItem`] when the value does not decode as `B`,
    /// [`Error::Pipe`] when this end was sent away.
    pub fn recv(&self) -> Result<B> {
        self.recv_within(None)
    }

    /// Receives the next value, waiting at most `timeout`.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] when nothing came in time; otherwise as
    /// [`recv`](Pipe::recv).
    pub fn recv_timeout(&self, timeout: Duration) -> Result<B> {
        self.recv_within(Some(timeout))
    }

    /// Receives a value if one is there now.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] (with a zero duration) when nothing is there; otherwise as
    /// [`recv`](Pipe::recv).
    pub fn try_recv(&self) -> Result<B> {
        self.recv_within(Some(Duration::ZERO))
    }

    fn recv_within(&self, timeout: Option<Duration>) -> Result<B> {
        let deadline = timeout.map(|t| Instant::now().checked_add(t).unwrap_or_else(far_future));
        let mut end = self.lock();
        let stream = Self::stream(&mut end)?;
        let mut incoming = self.incoming.lock().unwrap_or_else(|p| p.into_inner());
        let incoming = &mut *incoming;
        // The header, then the body; a deadline that passes in between leaves what
        // came in `incoming` for the next call.
        while incoming.got < HEADER {
            let got = incoming.got;
            let n = read_some(stream, &mut incoming.header[got..], deadline, timeout)?;
            incoming.got += n;
            if incoming.got == HEADER {
                let len = u64::from_le_bytes(incoming.header[..8].try_into().expect("8 bytes"));
                let len = usize::try_from(len).map_err(|_| Error::PipeClosed)?;
                incoming.body.clear();
                if incoming.body.try_reserve_exact(len).is_err() {
                    // The frame cannot be read past: the stream is out of step for
                    // good, so the end says so from now on.
                    let what = format!("a {len}-byte frame does not fit in memory");
                    *end = End::Broken(what.clone(), io::ErrorKind::OutOfMemory);
                    *incoming = Incoming::default();
                    return Err(Error::Pipe {
                        what,
                        source: io::Error::from(io::ErrorKind::OutOfMemory),
                    });
                }
                incoming.body.resize(len, 0);
            }
        }
        while incoming.got < HEADER + incoming.body.len() {
            let got = incoming.got - HEADER;
            let n = read_some(stream, &mut incoming.body[got..], deadline, timeout)?;
            incoming.got += n;
        }
        // Then the one byte that carries the frame's descriptors, if it has any.
        let count = u32::from_le_bytes(incoming.header[8..].try_into().expect("4 bytes"));
        if count > 0 && incoming.fds.is_none() {
            wait_for(stream, deadline, timeout)?;
            let (_, fds) = socket::recv_fds(stream).map_err(hang_up)?;
            if fds.len() != count as usize {
                let what = format!("{} descriptors came where {count} were sent", fds.len());
                *end = End::Broken(what.clone(), io::ErrorKind::InvalidData);
                *incoming = Incoming::default();
                return Err(Error::Pipe {
                    what,
                    source: io::Error::from(io::ErrorKind::InvalidData),
                });
            }
            incoming.fds = Some(fds);
        }
        let fds = incoming.fds.take().unwrap_or_default();
        let received =
            region::with_carried(&fds, || codec::decode(&incoming.body)).map_err(|source| {
                Error::DecodeItem {
                    item: 0,
                    worker: None,
                    source,
                }
            });
        incoming.got = 0;
        release(&mut incoming.body);
        received
    }
}

/// Reads what is there into `buf` (at least one byte), waiting until `deadline` when
/// there is one and forever otherwise: [`Error::Timeout`] (of `timeout`) when it
/// passes first, [`Error::PipeClosed`] at end-of-file.
fn read_some(
    stream: &mut UnixStream,
    buf: &mut [u8],
    deadline: Option<Instant>,
    timeout: Option<Duration>,
) -> Result<usize> {
    loop {
        wait_for(stream, deadline, timeout)?;
        match stream.read(buf) {
            Ok(0) => return Err(Error::PipeClosed),
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(hang_up(e)),
        }
    }
}

/// Waits for input until `deadline`, if there is one: [`Error::Timeout`] (of
/// `timeout`) when it passes first.
fn wait_for(
    stream: &UnixStream,
    deadline: Option<Instant>,
    timeout: Option<Duration>,
) -> Result<()> {
    if let Some(deadline) = deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        let ready = socket::wait_readable(stream, Some(left)).map_err(|source| Error::Pipe {
            what: "could not wait for input".into(),
            source,
        })?;
        if !ready {
            return Err(Error::Timeout(timeout.unwrap_or_default()));
        }
    }
    Ok(())
}

/// A deadline past any wait (a timeout too large to add to now).
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600)
}

/// Empties a scratch buffer after use, giving back its memory when it is large.
fn release(buf: &mut Vec<u8>) {
    buf.clear();
    if buf.capacity() > KEEP_SCRATCH {
        *buf = Vec::new();
    }
}

/// End-of-file and a reset both mean the other end is gone.
fn hang_up(e: io::Error) -> Error {
    match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted => Error::PipeClosed,
        _ => Error::Pipe {
            what: "the socket failed".into(),
            source: e,
        },
    }
}

impl<A, B> std::fmt::Debug for Pipe<A, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &*self.lock() {
            End::Open(_) => "open",
            End::Parked(_) => "parked",
            End::Sent(_) => "sent",
            End::Broken(..) => "broken",
        };
        f.debug_struct("Pipe").field("end", &state).finish()
    }
}

impl<A, B> Serialize for Pipe<A, B> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let mut end = self.lock();
        let wire = match &*end {
            End::Parked(wire) | End::Sent(wire) => *wire,
            End::Broken(what, _) => return Err(serde::ser::Error::custom(what)),
            End::Open(_) => {
                let End::Open(stream) = std::mem::replace(
                    &mut *end,
                    End::Broken("the end is being sent".into(), io::ErrorKind::Other),
                ) else {
                    return Err(serde::ser::Error::custom("pipe end changed state"));
                };
                match broker::park(OwnedFd::from(stream)) {
                    Ok((address, id)) => {
                        let wire = Wire { address, id };
                        *end = End::Sent(wire);
                        wire
                    }
                    Err(e) => {
                        *end = End::Broken(format!("could not hand the end over: {e}"), e.kind());
                        return Err(serde::ser::Error::custom(e));
                    }
                }
            }
        };
        wire.serialize(serializer)
    }
}

impl<'de, A, B> Deserialize<'de> for Pipe<A, B> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let wire = Wire::deserialize(deserializer)?;
        // In the process that parked it (a check that the value decodes, or an end
        // sent back): claim it only when it is used.
        let end = if wire.address.is_own() {
            End::Parked(wire)
        } else {
            // Elsewhere: take it over now, so the parked copy is closed at once.
            match broker::claim(&wire.address, wire.id) {
                Ok(fd) => End::Open(UnixStream::from(fd)),
                Err(e) => End::Broken(format!("could not claim the end: {e}"), e.kind()),
            }
        };
        Ok(Pipe {
            end: Mutex::new(end),
            scratch: Mutex::new(Vec::new()),
            incoming: Mutex::default(),
            _types: PhantomData,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes raw bytes onto `pipe`'s socket, as a sender in the middle of a frame.
    fn write_raw<A, B>(pipe: &Pipe<A, B>, bytes: &[u8]) {
        let mut end = pipe.lock();
        Pipe::<A, B>::stream(&mut end)
            .expect("open")
            .write_all(bytes)
            .expect("written");
    }

    fn frame_of(value: &Vec<u8>) -> Vec<u8> {
        let mut body = Vec::new();
        codec::encode_into(value, &mut body).unwrap();
        let mut frame = (body.len() as u64).to_le_bytes().to_vec();
        frame.extend_from_slice(&0u32.to_le_bytes());
        frame.extend_from_slice(&body);
        frame
    }

    #[test]
    fn a_frame_cut_in_the_middle_times_out_and_is_then_read_whole() {
        let (tx, rx) = Pipe::<Vec<u8>, Vec<u8>>::duplex().unwrap();
        let value: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let frame = frame_of(&value);
        // Part of the header, then part of the body: each wait ends at its deadline.
        write_raw(&tx, &frame[..3]);
        let started = Instant::now();
        assert!(matches!(
            rx.recv_timeout(Duration::from_millis(50)),
            Err(Error::Timeout(_))
        ));
        assert!(started.elapsed() < Duration::from_secs(2));
        write_raw(&tx, &frame[3..5_000]);
        assert!(matches!(rx.try_recv(), Err(Error::Timeout(_))));
        assert!(matches!(
            rx.recv_timeout(Duration::from_millis(20)),
            Err(Error::Timeout(_))
        ));
        write_raw(&tx, &frame[5_000..]);
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), value);
        // The stream is in step: the next value arrives intact.
        tx.send(vec![1, 2, 3]).unwrap();
        assert_eq!(rx.recv().unwrap(), [1, 2, 3]);
    }

    #[test]
    fn a_frame_too_large_to_hold_breaks_the_end_instead_of_misreading() {
        let (tx, rx) = Pipe::<Vec<u8>, Vec<u8>>::duplex().unwrap();
        // More than `isize::MAX`: refused before the allocator is asked (which the
        // codec's tests watch for huge requests).
        write_raw(&tx, &u64::MAX.to_le_bytes());
        write_raw(&tx, &frame_of(&vec![7, 7, 7]));
        match rx.recv() {
            Err(Error::Pipe { what, source }) => {
                assert!(what.contains("does not fit in memory"), "{what}");
                assert_eq!(source.kind(), io::ErrorKind::OutOfMemory);
            }
            other => panic!("expected a pipe error, got {other:?}"),
        }
        // Not the bytes after the header read as a frame.
        assert!(matches!(rx.recv(), Err(Error::Pipe { .. })));
    }
}
