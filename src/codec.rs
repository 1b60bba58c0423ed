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
#[inline]
pub(crate) fn encode_into<T: Serialize + ?Sized>(
    value: &T,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    let before = out.len();
    bincode::serde::encode_into_writer(value, VecWriter(out), CONFIG).map_err(|e| {
        out.truncate(before);
        CodecError(e.to_string())
    })
}

/// Decodes one value that must fill `bytes` exactly.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
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
    /// allocates) against what is left of it.
    #[inline]
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

    /// Forwards to the system allocator and remembers the largest request, so a test
    /// can tell that a corrupt length did not turn into an allocation.
    struct LargestRequest;

    static LARGEST_REQUEST: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    // SAFETY: every method forwards to `System` with the caller's own arguments, so
    // `System`'s guarantees carry over unchanged; the bookkeeping only reads sizes.
    unsafe impl std::alloc::GlobalAlloc for LargestRequest {
        unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
            LARGEST_REQUEST.fetch_max(layout.size(), std::sync::atomic::Ordering::Relaxed);
            // SAFETY: requirements forwarded to the caller.
            unsafe { std::alloc::System.alloc(layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
            LARGEST_REQUEST.fetch_max(layout.size(), std::sync::atomic::Ordering::Relaxed);
            // SAFETY: requirements forwarded to the caller.
            unsafe { std::alloc::System.alloc_zeroed(layout) }
        }
        unsafe fn realloc(
            &self,
            ptr: *mut u8,
            layout: std::alloc::Layout,
            new_size: usize,
        ) -> *mut u8 {
            LARGEST_REQUEST.fetch_max(new_size, std::sync::atomic::Ordering::Relaxed);
            // SAFETY: requirements forwarded to the caller.
            unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
            // SAFETY: requirements forwarded to the caller.
            unsafe { std::alloc::System.dealloc(ptr, layout) }
        }
    }

    #[global_allocator]
    static ALLOCATOR: LargestRequest = LargestRequest;

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
        let largest = LARGEST_REQUEST.load(std::sync::atomic::Ordering::Relaxed);
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

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut buf = Vec::new();
        encode_into(&1u32, &mut buf).unwrap();
        buf.push(0);
        assert!(decode::<u32>(&buf).is_err());
    }
}
