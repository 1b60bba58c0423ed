//! Request / Reply: every message between the parent and a worker, and how a frame is laid out.
//!
//! A frame is `payload | header | header length (u32, little endian)`. The payload
//! (encoded items, results or a context value) is written first, straight into the send
//! buffer, so building a request never copies it; the header is small and comes last.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{CodecError, TaskPanic};
use crate::shared::region::RegionHandle;
use crate::wire::codec;
use crate::wire::transport::FrameBuf;

/// The job id of a worker's initializer run: no real job has it.
pub(crate) const INIT_JOB: u64 = 0;

/// Parent to worker.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Request {
    /// The payload is the encoded context value of job `job`, or with `shared` the
    /// encoded handle of a shared region holding it; chunks of that job may use it
    /// until a `Forget` for the job. `unsealed` lists the `SharedSlice::map_file`
    /// regions the value names, which the worker may map without seals when it
    /// decodes it (see `shared::region::with_unsealed`).
    Context {
        job: u64,
        shared: bool,
        unsealed: Vec<RegionHandle>,
    },
    /// The payload is `count` encoded items.
    Chunk(ChunkHeader),
    /// Job `job` has ended: drop its context value (and any accumulator it left).
    Forget { job: u64 },
    /// Reply to this request (as chunk `chunk` of job `job`) with the accumulator
    /// the worker has folded the job's chunks into since its last flush, and start
    /// the next one afresh. The reply's payload is the encoded accumulator, or empty
    /// when the worker holds none.
    Flush { job: u64, chunk: u64 },
}

/// Which items a chunk holds and what to run on them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ChunkHeader {
    pub(crate) job: u64,
    pub(crate) chunk: u64,
    pub(crate) first_item: u64,
    pub(crate) count: u32,
    pub(crate) task: TaskRef,
    /// Offsets (from `first_item`, ascending) of items to decode and pass over
    /// without running: items already reported failed, when a chunk is sent again
    /// so that its other items complete. Their results are absent from the reply.
    pub(crate) skip: Vec<u32>,
    /// The `SharedSlice::map_file` regions the items name (the parent's own, pinned
    /// while the chunk is in flight): the worker may map these without seals while
    /// it runs the chunk, and no other handle (see `shared::region::with_unsealed`).
    pub(crate) unsealed: Vec<RegionHandle>,
}

/// A monomorphised runner, named by its offset from an anchor function in the
/// executable and a fingerprint of its types (see `worker/task/`, which makes and
/// resolves these). Plain data here, so the wire knows nothing of tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) struct TaskRef {
    pub(crate) offset: u64,
    pub(crate) fingerprint: u64,
    /// A hash of the two fields above: a damaged reference is refused before the
    /// offset is used (1 in 2^64 odds of missing it), not discovered after a jump.
    pub(crate) check: u64,
}

/// A job's context value as the parent sends it: its encoding, or (`shared`) the
/// encoded handle of a shared region that holds the encoding.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ContextPayload<'a> {
    pub(crate) bytes: &'a [u8],
    pub(crate) shared: bool,
    /// The `map_file` regions the value names (see `Request::Context`).
    pub(crate) unsealed: &'a [RegionHandle],
}

/// Worker to parent.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Reply {
    /// The payload is the chunk's results (one per item, or one outcome per item),
    /// or its partial result. `nanos` is the time the worker spent on the chunk's
    /// items (decoding, running, encoding); `timing` says how it divides.
    Done {
        job: u64,
        chunk: u64,
        nanos: u64,
        timing: Timing,
    },
    /// The chunk failed; the payload is empty.
    Failed {
        job: u64,
        chunk: u64,
        failure: Failure,
    },
}

/// Where a worker's time went for one reply, in nanoseconds: waiting for the
/// request (blocked on its channel), and the split of its work into decoding items,
/// running the task and encoding results. The split is measured on a sample of
/// items and scaled to the chunk's measured total (see `worker/task/mod.rs`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Timing {
    pub(crate) wait: u64,
    pub(crate) decode: u64,
    pub(crate) task: u64,
    pub(crate) encode: u64,
}

/// Why a worker could not finish a chunk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Failure {
    Panicked {
        item: u64,
        panic: TaskPanic,
    },
    DecodeItem {
        item: u64,
        error: CodecError,
    },
    /// `item` is `None` when a chunk's partial result failed.
    EncodeResult {
        item: Option<u64>,
        error: CodecError,
    },
    DecodeContext {
        error: CodecError,
    },
    /// The task uses per-worker state that the worker does not have: the pool has no
    /// initializer of that type, or the initializer failed.
    NoState {
        reason: String,
    },
    /// A request the worker will not act on (a bug, or a mismatched binary).
    Malformed {
        reason: String,
    },
}

impl Failure {
    /// Whether the failure concerns one item alone, the worker having read past it
    /// (so the chunk's other items can run): a panic, or a result that does not
    /// encode. Other failures leave the chunk unreadable or concern the whole job.
    pub(crate) fn is_per_item(&self) -> bool {
        matches!(
            self,
            Failure::Panicked { .. } | Failure::EncodeResult { item: Some(_), .. }
        )
    }
}

/// Appends `header` and the trailer to a frame whose payload is already written.
pub(crate) fn seal<H: Serialize>(frame: &mut FrameBuf, header: &H) -> Result<(), CodecError> {
    // Nothing a payload's values moved out of band may ride on the next message.
    codec::flush()?;
    let body = frame.body();
    let start = body.len();
    // Headers are this crate's own types: they hold no descriptor to check for.
    codec::encode_plain_into(header, body)?;
    let len = u32::try_from(body.len() - start)
        .map_err(|_| CodecError("message header larger than 4 GiB".into()))?;
    body.extend_from_slice(&len.to_le_bytes());
    Ok(())
}

/// Replaces the header of a sealed frame (a chunk sent again with a new skip list).
pub(crate) fn reseal<H: Serialize>(frame: &mut FrameBuf, header: &H) -> Result<(), CodecError> {
    let body = frame.body_bytes();
    let payload_len = body
        .len()
        .checked_sub(4)
        .and_then(|split| {
            let len = u32::from_le_bytes(body[split..].try_into().ok()?) as usize;
            split.checked_sub(len)
        })
        .ok_or_else(|| CodecError("a sealed frame's trailer does not fit the frame".into()))?;
    frame.truncate_body(payload_len);
    seal(frame, header)
}

/// Splits a frame body into its header and payload.
pub(crate) fn open<H: DeserializeOwned>(frame: &[u8]) -> Result<(H, &[u8]), String> {
    let Some(split) = frame.len().checked_sub(4) else {
        return Err(format!("frame of {} bytes has no trailer", frame.len()));
    };
    let (rest, trailer) = frame.split_at(split);
    let len = u32::from_le_bytes(trailer.try_into().expect("trailer is 4 bytes")) as usize;
    let Some(payload_len) = rest.len().checked_sub(len) else {
        return Err(format!(
            "header length {len} exceeds the {}-byte frame",
            rest.len()
        ));
    };
    let (payload, header) = rest.split_at(payload_len);
    let header = codec::decode(header).map_err(|e| format!("bad header: {e}"))?;
    Ok((header, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_payload_split_again() {
        let mut frame = FrameBuf::with_capacity(64);
        frame.body().extend_from_slice(b"payload");
        let reply = Reply::Done {
            job: 3,
            chunk: 9,
            nanos: 1,
            timing: Timing::default(),
        };
        seal(&mut frame, &reply).unwrap();
        let body = &frame.body()[10..];
        let (header, payload): (Reply, _) = open(body).unwrap();
        assert_eq!(payload, b"payload");
        assert!(matches!(
            header,
            Reply::Done {
                job: 3,
                chunk: 9,
                nanos: 1,
                ..
            }
        ));
    }

    #[test]
    fn malformed_frames_are_errors() {
        assert!(open::<Reply>(&[]).is_err());
        assert!(open::<Reply>(&[1, 2, 3]).is_err());
        assert!(open::<Reply>(&[0xff, 0xff, 0xff, 0x7f]).is_err());
        assert!(open::<Reply>(&[9, 9, 9, 9, 9, 4, 0, 0, 0]).is_err());
        // Every truncation and every single-byte corruption of a valid frame is
        // either rejected or decodes to some header: never a panic.
        let mut frame = FrameBuf::with_capacity(64);
        frame.body().extend_from_slice(&[1, 2, 3]);
        let failure = Reply::Failed {
            job: 1,
            chunk: 2,
            failure: Failure::Panicked {
                item: 13,
                panic: TaskPanic {
                    message: "boom".into(),
                    location: Some("x.rs:1:1".into()),
                },
            },
        };
        seal(&mut frame, &failure).unwrap();
        let good = frame.body()[10..].to_vec();
        for cut in 0..good.len() {
            let _ = open::<Reply>(&good[..cut]);
        }
        for i in 0..good.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bad = good.clone();
                bad[i] ^= flip;
                let _ = open::<Reply>(&bad);
            }
        }
    }
}

#[cfg(test)]
mod properties {
    use proptest::collection::vec;
    use proptest::prelude::*;

    use super::*;

    fn task_ref() -> impl Strategy<Value = TaskRef> {
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(offset, fingerprint, check)| {
            TaskRef {
                offset,
                fingerprint,
                check,
            }
        })
    }

    fn request() -> impl Strategy<Value = Request> {
        prop_oneof![
            (any::<u64>(), any::<bool>()).prop_map(|(job, shared)| Request::Context {
                job,
                shared,
                unsealed: Vec::new()
            }),
            any::<u64>().prop_map(|job| Request::Forget { job }),
            any::<[u64; 2]>().prop_map(|[job, chunk]| Request::Flush { job, chunk }),
            (
                any::<[u64; 3]>(),
                any::<u32>(),
                task_ref(),
                proptest::collection::vec(any::<u32>(), 0..4)
            )
                .prop_map(|([job, chunk, first_item], count, task, skip)| {
                    Request::Chunk(ChunkHeader {
                        job,
                        chunk,
                        first_item,
                        count,
                        task,
                        skip,
                        unsealed: Vec::new(),
                    })
                }),
        ]
    }

    fn codec_error() -> impl Strategy<Value = CodecError> {
        any::<String>().prop_map(CodecError)
    }

    fn failure() -> impl Strategy<Value = Failure> {
        prop_oneof![
            (any::<u64>(), any::<String>(), any::<Option<String>>()).prop_map(
                |(item, message, location)| Failure::Panicked {
                    item,
                    panic: TaskPanic { message, location },
                }
            ),
            (any::<u64>(), codec_error())
                .prop_map(|(item, error)| Failure::DecodeItem { item, error }),
            (any::<Option<u64>>(), codec_error())
                .prop_map(|(item, error)| Failure::EncodeResult { item, error }),
            codec_error().prop_map(|error| Failure::DecodeContext { error }),
            any::<String>().prop_map(|reason| Failure::NoState { reason }),
            any::<String>().prop_map(|reason| Failure::Malformed { reason }),
        ]
    }

    fn reply() -> impl Strategy<Value = Reply> {
        prop_oneof![
            any::<[u64; 7]>().prop_map(|[job, chunk, nanos, wait, decode, task, encode]| {
                Reply::Done {
                    job,
                    chunk,
                    nanos,
                    timing: Timing {
                        wait,
                        decode,
                        task,
                        encode,
                    },
                }
            }),
            (any::<u64>(), any::<u64>(), failure()).prop_map(|(job, chunk, failure)| {
                Reply::Failed {
                    job,
                    chunk,
                    failure,
                }
            }),
        ]
    }

    /// The frame body (without the transport's reserved prefix) of `header` after `payload`.
    fn sealed<H: Serialize>(header: &H, payload: &[u8]) -> Vec<u8> {
        let mut frame = FrameBuf::with_capacity(payload.len() + 64);
        frame.body().extend_from_slice(payload);
        seal(&mut frame, header).unwrap();
        frame.body_bytes().to_vec()
    }

    /// Opens `frame` as `H`; when that succeeds, the header must encode back to
    /// exactly the bytes it was read from (the codec is canonical).
    fn open_checked<H: Serialize + DeserializeOwned>(frame: &[u8]) {
        if let Ok((header, payload)) = open::<H>(frame) {
            let again = sealed(&header, payload);
            assert_eq!(
                again, frame,
                "a header that opens re-encodes to its own bytes"
            );
        }
    }

    proptest! {
        #[test]
        fn requests_round_trip(request in request(), payload in vec(any::<u8>(), 0..64)) {
            let frame = sealed(&request, &payload);
            let (back, rest) = open::<Request>(&frame).unwrap();
            prop_assert_eq!(format!("{back:?}"), format!("{request:?}"));
            prop_assert_eq!(rest, &payload[..]);
        }

        #[test]
        fn replies_round_trip(reply in reply(), payload in vec(any::<u8>(), 0..64)) {
            let frame = sealed(&reply, &payload);
            let (back, rest) = open::<Reply>(&frame).unwrap();
            prop_assert_eq!(format!("{back:?}"), format!("{reply:?}"));
            prop_assert_eq!(rest, &payload[..]);
        }

        #[test]
        fn damaged_frames_are_refused_or_reread(
            reply in reply(),
            request in request(),
            payload in vec(any::<u8>(), 0..32),
            cut in any::<prop::sample::Index>(),
            flips in vec((any::<prop::sample::Index>(), 1..=255u8), 1..4),
        ) {
            for good in [sealed(&reply, &payload), sealed(&request, &payload)] {
                let short = &good[..cut.index(good.len() + 1)];
                open_checked::<Reply>(short);
                open_checked::<Request>(short);
                let mut bad = good.clone();
                let len = bad.len();
                for (at, mask) in &flips {
                    bad[at.index(len)] ^= mask;
                }
                open_checked::<Reply>(&bad);
                open_checked::<Request>(&bad);
            }
        }
    }
}
