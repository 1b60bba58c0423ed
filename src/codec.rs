//! How values become bytes: the bincode configuration, and the only file that names bincode.
//!
//! Fixed-width little-endian integers (bincode's legacy layout): on integer-heavy data it
//! encodes about four times faster than varint, and inside one machine size matters less
//! than speed. Swapping the codec means changing this file only.

use bincode::config::{Configuration, Fixint, Limit, LittleEndian};
use bincode::enc::write::Writer;
use bincode::error::EncodeError;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::CodecError;

/// Largest size one decoded value may claim for its containers: 4 GiB.
///
/// bincode allocates a string or byte buffer at the length its prefix claims before
/// reading it, so without a limit one corrupt length aborts the process on an
/// impossible allocation. Under the limit, a corrupt length costs at most a lazily
/// zeroed allocation that is freed when the read then fails.
const DECODE_LIMIT: usize = 1 << 32;

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
    #[inline]
    pub(crate) fn decode<T: DeserializeOwned>(&mut self) -> Result<T, CodecError> {
        let (value, used) = bincode::serde::decode_from_slice(self.bytes, CONFIG)
            .map_err(|e| CodecError(e.to_string()))?;
        self.bytes = &self.bytes[used..];
        Ok(value)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len()
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
    fn trailing_bytes_are_an_error() {
        let mut buf = Vec::new();
        encode_into(&1u32, &mut buf).unwrap();
        buf.push(0);
        assert!(decode::<u32>(&buf).is_err());
    }
}
