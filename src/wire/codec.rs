//! How values become bytes: the bincode configuration, and the only file that names bincode.
//!
//! Fixed-width little-endian integers (bincode's legacy layout): on integer-heavy data it
//! encodes about four times faster than varint, and inside one machine size matters less
//! than speed. Swapping the codec means changing this file only.

use bincode::config::{Configuration, Fixint, Limit, LittleEndian};
use bincode::de::read::Reader as ByteReader;
use bincode::de::{Decode, Decoder, DecoderImpl};
use bincode::enc::write::Writer;
use bincode::error::{DecodeError, EncodeError};
use ipc_channel::ipc::{self, IpcReceiver, IpcSender, IpcSharedMemory, OpaqueIpcReceiver};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::CodecError;

/// The decoder's byte budget before [`Reader::decode`] narrows it to the input.
///
/// bincode allocates a string or byte buffer at the length its prefix claims before
/// reading it, after checking the claim against this limit. The limit is a type
/// parameter, so it cannot follow the input; instead every decode first claims all
/// but the input's length of it (see [`Reader::decode`]), which leaves a budget of
/// exactly the bytes still unread. A corrupt length then fails before any allocation.
/// (Not `usize::MAX`: with that limit the running total's overflow check made
/// decoding a `Vec<u64>` about twice as slow.)
const DECODE_LIMIT: usize = 1 << 62;

const CONFIG: Configuration<LittleEndian, Fixint, Limit<DECODE_LIMIT>> =
    bincode::config::legacy().with_limit::<DECODE_LIMIT>();

/// Appends bytes to a `Vec` without the `io::Write` indirection.
struct VecWriter<'a>(&'a mut Vec<u8>);

impl Writer for VecWriter<'_> {
    #[inline]
    fn write(&mut self, bytes: &[u8]) -> Result<(), EncodeError> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }
}

/// Appends the encoding of `value` to `out`; on error `out` is left as it was.
///
/// A value that holds an ipc-channel sender, receiver or shared memory region is
/// refused, and what its encoding moved out of band is carried away (see
/// [`encode_checked`] and [`Window`]). A type with no drop glue cannot own a
/// descriptor, so plain data (integers, floats, arrays and tuples of them) takes the
/// direct path.
#[inline]
pub(crate) fn encode_into<T: Serialize + ?Sized>(
    value: &T,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    if !std::mem::needs_drop::<T>() {
        return encode_plain_into(value, out);
    }
    let before = out.len();
    let result = WINDOW.with(|window| match window.try_borrow_mut() {
        Ok(mut window) => window.encode(value, out),
        // Only when a value's `Serialize` encodes another value on this thread.
        Err(_) => encode_checked(value, out),
    });
    if result.is_err() {
        out.truncate(before);
    }
    result
}

/// Carries away whatever the values encoded on this thread since the last call left
/// in ipc-channel's out-of-band lists; an error says some held shared memory.
///
/// Called before anything on this thread may send an ipc-channel message (sealing a
/// frame, sending one through shared memory) and before a value is decoded again.
/// Cheap when nothing is pending.
pub(crate) fn flush() -> Result<(), CodecError> {
    WINDOW.with(|window| match window.try_borrow_mut() {
        Ok(mut window) => window.close(),
        Err(_) => Ok(()),
    })
}

/// Appends the encoding of `value` to `out` without the descriptor check of
/// [`encode_into`]: for this crate's own message headers, which hold none.
#[inline]
pub(crate) fn encode_plain_into<T: Serialize + ?Sized>(
    value: &T,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    let before = out.len();
    bincode::serde::encode_into_writer(value, VecWriter(out), CONFIG).map_err(|e| {
        out.truncate(before);
        CodecError(e.to_string())
    })
}

/// Encodes `value` inside a send on a private channel, to refuse (and carry away)
/// any descriptor its encoding moved out of band.
///
/// ipc-channel's `Serialize` for its senders, receivers and shared memory writes only
/// an index into a thread-local list and pushes the descriptor onto that list, for its
/// own `IpcSender::send` to take along. Under bincode nothing takes it: the index is
/// meaningless to the decoder (ipc-channel's `Deserialize` then panics on it) and the
/// descriptor rides on the next ipc-channel message this thread sends. ipc-channel
/// offers no way to look at or clear those lists except `send`, so the value is
/// encoded from within the `Serialize` of a message sent on a private channel:
///
/// - after the value, the message serialises a probe sender, whose index is the
///   number of channels the value pushed;
/// - the message lists every pushed channel's index, and the index of a first shared
///   memory region; `send` then takes both lists, so nothing is left behind;
/// - the receiving end takes every channel (closing them) and tries that region,
///   which is there exactly when the value pushed one.
///
/// It costs a send and a receive on a socket (about 2.5 us), so it runs only for the
/// first value of a [`Window`]; the others get the cheap probe.
fn encode_checked<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    SWEEPER.with(|sweeper| {
        if sweeper.borrow().is_none() {
            let pair = ipc::channel().map_err(|e| {
                CodecError(format!(
                    "could not open a channel to check for descriptors: {e}"
                ))
            })?;
            *sweeper.borrow_mut() = Some(pair);
        }
        let sweeper = sweeper.borrow();
        let (tx, rx) = sweeper.as_ref().expect("opened just above");
        let sweep = Sweep {
            value,
            out: std::cell::RefCell::new(out),
            encoded: std::cell::RefCell::new(None),
            probe: tx,
        };
        let sender = tx.clone().to_opaque().to::<SweepRef<'_, '_, T>>();
        // ipc-channel asserts (panics) when one message carries more than 64
        // descriptors; the lists it took are dropped as the panic unwinds. (The
        // thread's panic hook still reports that panic.)
        let sent = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            retry_interrupted(|| sender.send(sweep_ref(&sweep)))
        }));
        let encoded = sweep.encoded.into_inner();
        match sent {
            // A panic in the value's own `Serialize` goes on to the caller, as it
            // would without the check.
            Err(panic) if encoded.is_none() => std::panic::resume_unwind(panic),
            Err(_) => return Err(smuggled()),
            Ok(Err(e)) => {
                return Err(CodecError(format!(
                    "could not check the value for descriptors: {e}"
                )));
            }
            Ok(Ok(())) => {}
        }
        let swept = retry_interrupted(|| rx.recv())
            .map_err(|e| CodecError(format!("could not check the value for descriptors: {e}")))?;
        match encoded {
            Some(Ok(())) if swept.channels == 0 && !swept.shared_memory => Ok(()),
            Some(Err(e)) => Err(CodecError(e)),
            Some(Ok(())) => Err(smuggled()),
            None => Err(CodecError("the value was not encoded".into())),
        }
    })
}

/// Values checked one by one after the first, cheaply: see [`Window::encode`].
const WINDOW_ITEMS: u64 = 48;

thread_local! {
    static WINDOW: std::cell::RefCell<Window> = const {
        std::cell::RefCell::new(Window { open: false, channels: None, probes: 0 })
    };
}

/// The cheap check for a run of values encoded on one thread.
///
/// [`encode_checked`] costs a round trip on a socket. Within a window, a value is
/// instead encoded directly and followed by a probe: serialising a sender of ours
/// pushes it onto ipc-channel's channel list and writes its index, which is the
/// number of entries before it. Each probe expects to find only the window's earlier
/// probes there; more means the value pushed channels, and the value is refused. The
/// shared-memory list has no cheap probe, so it is checked when the window is
/// drained: every [`WINDOW_ITEMS`] values, at [`flush`] (each sealed frame), and when
/// a value is refused. A region found then was pushed by the current value or one of
/// the window's earlier ones. Draining sends the lists on a channel whose receiver is
/// gone, so the send fails and drops what it took. The first value after a flush
/// gets the full check, so the first item of every chunk is checked exactly.
struct Window {
    /// Whether a window is open: not before the first value after a flush.
    open: bool,
    /// Opened with the first window on this thread and kept.
    channels: Option<WindowChannels>,
    /// Probes pushed since the last drain.
    probes: u64,
}

struct WindowChannels {
    /// A sender whose receiver was dropped: sends on it fail, dropping the lists.
    dead_end: IpcSender<()>,
    /// One byte of shared memory whose serialisation counts the regions before it.
    region: IpcSharedMemory,
}

impl Window {
    fn encode<T: Serialize + ?Sized>(
        &mut self,
        value: &T,
        out: &mut Vec<u8>,
    ) -> Result<(), CodecError> {
        let channels = match &self.channels {
            Some(channels) if self.open => channels,
            _ => {
                encode_checked(value, out)?;
                if self.channels.is_none() {
                    self.channels = Some(open_window()?);
                }
                self.open = true;
                self.probes = 0;
                return Ok(());
            }
        };
        let encoded = bincode::serde::encode_into_writer(value, VecWriter(out), CONFIG)
            .map_err(|e| CodecError(e.to_string()));
        let before_probe = channel_index(&channels.dead_end);
        if before_probe > self.probes {
            let _ = self.close();
            return Err(smuggled());
        }
        // Fewer entries than probes: a `Serialize` sent an ipc-channel message from
        // this thread and took the list with it. Count from what is there now.
        self.probes = before_probe + 1;
        if let Err(e) = encoded {
            self.close()?;
            return Err(e);
        }
        if self.probes >= WINDOW_ITEMS {
            // After a refusal the next value gets the full check again.
            self.drain().inspect_err(|_| self.open = false)?;
        }
        Ok(())
    }

    /// Drains the lists and lets the next value open a new window.
    fn close(&mut self) -> Result<(), CodecError> {
        let drained = self.drain();
        self.open = false;
        drained
    }

    /// Empties ipc-channel's lists on this thread; an error when they held shared memory.
    fn drain(&mut self) -> Result<(), CodecError> {
        let Some(channels) = self.channels.as_ref().filter(|_| self.open) else {
            return Ok(());
        };
        let regions = region_index(&channels.region);
        // More than 64 descriptors make ipc-channel assert (panic) before it sends;
        // the lists it took are dropped as the panic unwinds, which is all we want.
        let _ =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| channels.dead_end.send(())));
        self.probes = 0;
        if regions > 0 {
            return Err(CodecError(
                "it or a value encoded just before it holds an ipc-channel shared memory \
                 region; channels and descriptors cannot travel inside items, results or \
                 context values yet"
                    .into(),
            ));
        }
        Ok(())
    }
}

fn open_window() -> Result<WindowChannels, CodecError> {
    let (dead_end, receiver) = ipc::channel::<()>().map_err(|e| {
        CodecError(format!(
            "could not open a channel to check for descriptors: {e}"
        ))
    })?;
    drop(receiver);
    let region = std::panic::catch_unwind(|| IpcSharedMemory::from_byte(0, 1)).map_err(|_| {
        CodecError("could not create shared memory to check for descriptors".into())
    })?;
    Ok(WindowChannels { dead_end, region })
}

/// Pushes `probe` onto ipc-channel's channel list; returns how many entries preceded it.
fn channel_index<T>(probe: &IpcSender<T>) -> u64 {
    let mut index = [0u8; 8];
    bincode::serde::encode_into_slice(probe, &mut index, CONFIG)
        .expect("a sender encodes as its 8-byte index");
    u64::from_le_bytes(index)
}

/// Pushes `probe` onto ipc-channel's shared-memory list; returns how many preceded it.
fn region_index(probe: &IpcSharedMemory) -> u64 {
    let mut index = [0u8; 8];
    bincode::serde::encode_into_slice(probe, &mut index, CONFIG)
        .expect("shared memory encodes as its 8-byte index");
    u64::from_le_bytes(index)
}

fn smuggled() -> CodecError {
    CodecError(
        "it holds an ipc-channel sender, receiver or shared memory region; channels and \
         descriptors cannot travel inside items, results or context values yet"
            .into(),
    )
}

fn retry_interrupted<R>(
    mut call: impl FnMut() -> Result<R, ipc_channel::IpcError>,
) -> Result<R, ipc_channel::IpcError> {
    loop {
        match call() {
            Err(ipc_channel::IpcError::Io(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

thread_local! {
    /// This thread's private channel for [`encode_checked`], opened on first use.
    static SWEEPER: std::cell::RefCell<Option<(IpcSender<Swept>, IpcReceiver<Swept>)>> =
        const { std::cell::RefCell::new(None) };
}

/// The message [`encode_checked`] sends: encoding it encodes the value.
struct Sweep<'a, T: ?Sized> {
    value: &'a T,
    out: std::cell::RefCell<&'a mut Vec<u8>>,
    encoded: std::cell::RefCell<Option<Result<(), String>>>,
    probe: &'a IpcSender<Swept>,
}

/// `IpcSender::send` takes its message by value; a reference lets the caller read
/// what serialising it recorded, and lets an interrupted send be made again.
struct SweepRef<'s, 'a, T: ?Sized>(&'s Sweep<'a, T>);

fn sweep_ref<'s, 'a, T: ?Sized>(sweep: &'s Sweep<'a, T>) -> SweepRef<'s, 'a, T> {
    SweepRef(sweep)
}

impl<T: Serialize + ?Sized> Serialize for Sweep<'_, T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error as _, SerializeTuple};
        if self.encoded.borrow().is_none() {
            let mut out = self.out.borrow_mut();
            let before = out.len();
            let result =
                bincode::serde::encode_into_writer(self.value, VecWriter(&mut out), CONFIG);
            if result.is_err() {
                out.truncate(before);
            }
            *self.encoded.borrow_mut() = Some(result.map_err(|e| e.to_string()));
        }
        let mut index = [0u8; 8];
        bincode::serde::encode_into_slice(self.probe, &mut index, CONFIG)
            .map_err(S::Error::custom)?;
        let channels = u64::from_le_bytes(index) + 1;
        let mut message = serializer.serialize_tuple(2)?;
        message.serialize_element(&Indices(channels))?;
        message.serialize_element(&0u64)?;
        message.end()
    }
}

impl<T: Serialize + ?Sized> Serialize for SweepRef<'_, '_, T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de, T: ?Sized> serde::Deserialize<'de> for SweepRef<'_, '_, T> {
    /// Never called: the receiving end reads [`Swept`].
    fn deserialize<D: serde::Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        Err(serde::de::Error::custom("a sweep is only ever sent"))
    }
}

/// The indices `0..n`, as a sequence.
struct Indices(u64);

impl Serialize for Indices {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(0..self.0)
    }
}

/// What a sweep carried away: the channels the value pushed (the probe excluded),
/// and whether it pushed shared memory.
struct Swept {
    channels: u64,
    shared_memory: bool,
}

impl Serialize for Swept {
    /// Never called: the sending end writes [`Sweep`].
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom(
            "a sweep result is only ever received",
        ))
    }
}

impl<'de> serde::Deserialize<'de> for Swept {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Message;
        impl<'de> serde::de::Visitor<'de> for Message {
            type Value = Swept;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a sweep")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Swept, A::Error> {
                let taken: TakenChannels = seq
                    .next_element()?
                    .ok_or_else(|| serde::de::Error::invalid_length(0, &self))?;
                // Present exactly when the value pushed a region; dropping it unmaps it.
                let shared_memory = matches!(seq.next_element::<IpcSharedMemory>(), Ok(Some(_)));
                Ok(Swept {
                    channels: taken.0.saturating_sub(1),
                    shared_memory,
                })
            }
        }
        deserializer.deserialize_tuple(2, Message)
    }
}

/// Takes every channel a sweep carried (dropping closes each), and counts them.
struct TakenChannels(u64);

impl<'de> serde::Deserialize<'de> for TakenChannels {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Channels;
        impl<'de> serde::de::Visitor<'de> for Channels {
            type Value = TakenChannels;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("channel indices")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<TakenChannels, A::Error> {
                let mut taken = 0;
                while seq.next_element::<OpaqueIpcReceiver>()?.is_some() {
                    taken += 1;
                }
                Ok(TakenChannels(taken))
            }
        }
        deserializer.deserialize_seq(Channels)
    }
}

/// Decodes one value that must fill `bytes` exactly.
///
/// First [`flush`]es: a value is often decoded right after it was encoded, to check
/// it round-trips, and that check must not read an index ipc-channel left pending.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    flush()?;
    let mut reader = Reader::new(bytes);
    let value = reader.decode()?;
    if !reader.is_empty() {
        return Err(CodecError(format!(
            "{} unexpected bytes after the value",
            reader.remaining()
        )));
    }
    Ok(value)
}

/// Decodes a run of values laid end to end.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    /// Decodes the next value.
    ///
    /// Every length in the value is bounded by the bytes left in this reader: the
    /// decoder's limit is pre-claimed down to `self.remaining()`, and bincode checks
    /// each claim (every primitive, and a string's or byte buffer's length before it
    /// allocates) against what is left of it. Always inlined: it is on every
    /// item's path, in generic callers.
    #[inline(always)]
    pub(crate) fn decode<T: DeserializeOwned>(&mut self) -> Result<T, CodecError> {
        let source = SliceSource { bytes: self.bytes };
        let mut decoder = DecoderImpl::new(source, CONFIG, ());
        // An input larger than the limit (impossible in practice) keeps the full limit.
        let unavailable = DECODE_LIMIT.saturating_sub(self.bytes.len());
        decoder
            .claim_bytes_read(unavailable)
            .expect("claiming at most the limit cannot exceed it");
        let value = bincode::serde::Compat::<T>::decode(&mut decoder)
            .map_err(decode_error)?
            .0;
        self.bytes = decoder.reader().bytes;
        Ok(value)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len()
    }
}

fn decode_error(error: DecodeError) -> CodecError {
    match error {
        DecodeError::LimitExceeded => {
            CodecError("a length claims more bytes than are left in the input".into())
        }
        other => CodecError(other.to_string()),
    }
}

/// bincode's view of the unread part of a [`Reader`]'s input.
struct SliceSource<'a> {
    bytes: &'a [u8],
}

impl ByteReader for SliceSource<'_> {
    #[inline(always)]
    fn read(&mut self, out: &mut [u8]) -> Result<(), DecodeError> {
        let Some((head, rest)) = self.bytes.split_at_checked(out.len()) else {
            return Err(DecodeError::UnexpectedEnd {
                additional: out.len() - self.bytes.len(),
            });
        };
        out.copy_from_slice(head);
        self.bytes = rest;
        Ok(())
    }

    #[inline]
    fn peek_read(&mut self, n: usize) -> Option<&[u8]> {
        self.bytes.get(..n)
    }

    #[inline]
    fn consume(&mut self, n: usize) {
        self.bytes = self.bytes.get(n..).unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_end_to_end() {
        let mut buf = Vec::new();
        encode_into(&7u64, &mut buf).unwrap();
        encode_into("hello", &mut buf).unwrap();
        encode_into(&vec![1u8, 2, 3], &mut buf).unwrap();
        assert_eq!(
            buf.len(),
            8 + 8 + 5 + 8 + 3,
            "fixed-width lengths and integers"
        );
        let mut reader = Reader::new(&buf);
        assert_eq!(reader.decode::<u64>().unwrap(), 7);
        assert_eq!(reader.decode::<String>().unwrap(), "hello");
        assert_eq!(reader.decode::<Vec<u8>>().unwrap(), [1, 2, 3]);
        assert!(reader.is_empty());
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let mut buf = Vec::new();
        encode_into(&String::from("truncated"), &mut buf).unwrap();
        for cut in 0..buf.len() {
            assert!(decode::<String>(&buf[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn huge_length_prefix_is_an_error_not_an_abort() {
        let mut buf = Vec::new();
        encode_into(&(u64::MAX / 2), &mut buf).unwrap();
        assert!(decode::<Vec<u64>>(&buf).is_err());
        assert!(decode::<String>(&buf).is_err());
    }

    #[test]
    fn a_corrupt_length_fails_before_allocating() {
        // 16 bytes whose length prefix claims 3 GiB.
        let mut buf = Vec::new();
        encode_into(&(3u64 << 30), &mut buf).unwrap();
        buf.extend_from_slice(b"abcdefgh");
        assert_eq!(buf.len(), 16);
        let err = decode::<String>(&buf).unwrap_err();
        assert!(err.0.contains("more bytes than are left"), "{err}");
        assert!(decode::<Vec<u8>>(&buf).is_err());
        assert!(decode::<serde_bytes_like::Bytes>(&buf).is_err());
        // Other tests allocate at most a few MiB; a claim honoured would ask for 3 GiB.
        let largest = crate::os::alloc::largest_request();
        assert!(
            largest < 1 << 30,
            "an allocation of {largest} bytes was requested"
        );
    }

    #[test]
    fn lengths_up_to_the_bytes_left_still_decode() {
        let mut buf = Vec::new();
        encode_into("exact", &mut buf).unwrap();
        encode_into(&vec![7u64; 3], &mut buf).unwrap();
        let mut reader = Reader::new(&buf);
        assert_eq!(reader.decode::<String>().unwrap(), "exact");
        assert_eq!(reader.decode::<Vec<u64>>().unwrap(), [7, 7, 7]);
        assert!(reader.is_empty());
        // One byte short of the last value: the claim is one more than what is left.
        assert!(decode::<String>(&buf[..8 + 4]).is_err());
    }

    /// A byte buffer decoded through `deserialize_byte_buf`, as `serde_bytes` does.
    mod serde_bytes_like {
        pub(super) struct Bytes(#[allow(dead_code)] pub(super) Vec<u8>);

        impl<'de> serde::Deserialize<'de> for Bytes {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl serde::de::Visitor<'_> for V {
                    type Value = Bytes;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str("bytes")
                    }
                    fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Bytes, E> {
                        Ok(Bytes(v))
                    }
                }
                d.deserialize_byte_buf(V)
            }
        }
    }

    #[derive(Serialize)]
    struct Carrier<H> {
        id: u64,
        handle: H,
    }

    fn carrier<H>(id: u64, handle: H) -> Carrier<H> {
        Carrier { id, handle }
    }

    /// Whether this thread's out-of-band lists are empty: the full check of a value
    /// that pushes nothing would otherwise find what was left there.
    fn nothing_left_behind() -> bool {
        let mut buf = Vec::new();
        flush().is_ok() && encode_checked(&String::from("clean"), &mut buf).is_ok()
    }

    #[test]
    fn channels_and_shared_memory_in_a_value_are_refused() {
        let (tx, rx) = ipc::channel::<u8>().unwrap();
        let shared = IpcSharedMemory::from_bytes(b"shared");
        let mut buf = vec![9];
        // First value after a flush: the full check.
        flush().unwrap();
        let err = encode_into(&carrier(1, tx.clone()), &mut buf).unwrap_err();
        assert!(err.0.contains("cannot travel inside items"), "{err}");
        assert_eq!(buf, [9], "the output is left as it was");
        assert!(nothing_left_behind());
        flush().unwrap();
        let err = encode_into(&carrier(2, shared.clone()), &mut buf).unwrap_err();
        assert!(err.0.contains("shared memory"), "{err}");
        assert!(nothing_left_behind());
        // Inside a window: a channel is refused on the value that holds it...
        for round in 0..3 {
            flush().unwrap();
            for i in 0..(round * 30) {
                encode_into(&format!("plain {i}"), &mut buf).unwrap();
            }
            let many: Vec<_> = (0..3).map(|_| tx.clone()).collect();
            let err = encode_into(&Some(many), &mut buf).unwrap_err();
            assert!(err.0.contains("cannot travel inside items"), "{err}");
            assert!(nothing_left_behind());
        }
        // ...and shared memory when the window is drained (here, by the flush).
        encode_into(&String::from("opens a window"), &mut buf).unwrap();
        let len = buf.len();
        encode_into(&carrier(3, shared.clone()), &mut buf).unwrap();
        buf.truncate(len);
        let err = flush().unwrap_err();
        assert!(err.0.contains("shared memory"), "{err}");
        assert!(nothing_left_behind());
        // More descriptors than one message may carry, first or inside a window.
        for _ in 0..2 {
            let too_many: Vec<_> = (0..80).map(|_| tx.clone()).collect();
            assert!(encode_into(&too_many, &mut buf).is_err());
        }
        assert!(nothing_left_behind());
        // A receiver's descriptor moves out of it when serialised: refused as well.
        flush().unwrap();
        assert!(encode_into(&carrier(4, rx), &mut buf).is_err());
        assert!(nothing_left_behind());
        // The sender still works, and a later ipc-channel message carries nothing stray.
        let (tx2, rx2) = ipc::channel::<u64>().unwrap();
        tx2.send(5).unwrap();
        assert_eq!(rx2.recv().unwrap(), 5);
    }

    /// Owns heap memory, so it takes the checked path, and panics when serialised.
    struct PanicsWhenEncoded(#[allow(dead_code)] String);

    impl Serialize for PanicsWhenEncoded {
        fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            panic!("cannot encode this")
        }
    }

    #[test]
    fn a_panic_while_encoding_reaches_the_caller() {
        let value = PanicsWhenEncoded(String::new());
        for opened_first in [false, true] {
            // The full check (first value after a flush), then the in-window probe.
            let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let mut buf = Vec::new();
                flush().unwrap();
                if opened_first {
                    encode_into(&String::from("opens a window"), &mut buf).unwrap();
                }
                encode_into(&value, &mut buf)
            }));
            let panic = caught.expect_err("the panic reaches the caller");
            assert_eq!(panic.downcast_ref::<&str>(), Some(&"cannot encode this"));
            assert!(nothing_left_behind());
        }
    }

    #[test]
    fn values_without_descriptors_still_encode_through_the_check() {
        let mut buf = Vec::new();
        let value = (String::from("heap"), vec![1u64, 2], Some(Box::new(3u8)));
        encode_into(&value, &mut buf).unwrap();
        encode_into(
            &Carrier {
                id: 4,
                handle: None::<IpcSender<u8>>,
            },
            &mut buf,
        )
        .unwrap();
        let mut reader = Reader::new(&buf);
        let back: (String, Vec<u64>, Option<Box<u8>>) = reader.decode().unwrap();
        assert_eq!(back, value);
        assert_eq!(reader.decode::<(u64, Option<u64>)>().unwrap(), (4, None));
        assert!(reader.is_empty());
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut buf = Vec::new();
        encode_into(&1u32, &mut buf).unwrap();
        buf.push(0);
        assert!(decode::<u32>(&buf).is_err());
    }
}
