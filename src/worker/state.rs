//! What a worker keeps between chunks: the context values of live jobs, the
//! accumulators of fold jobs and the per-worker state built by the pool's initializer.

use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::error::CodecError;
use crate::shared::region::{self, Region, RegionHandle};
use crate::wire::codec;
use crate::wire::protocol::Failure;

/// A worker's memory across chunks.
#[derive(Default)]
pub(crate) struct WorkerState {
    contexts: HashMap<u64, Context>,
    /// Per fold job: what this worker has folded since its last flush.
    folds: HashMap<u64, Accumulator>,
    /// What the initializer built, or why there is nothing.
    user: Option<Result<Box<dyn Any>, String>>,
    /// What the last chunk's sampled items measured (see `worker/task/mod.rs`).
    pub(crate) sample: Sample,
}

/// Nanoseconds measured on a sample of one chunk's items, phase by phase, and on
/// the chunk's closing step; `serve.rs` scales them to the chunk's measured total.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sample {
    pub(crate) decode: u64,
    pub(crate) task: u64,
    pub(crate) encode: u64,
    /// Encoding a partial result or an accumulator once, after the items.
    pub(crate) finish: u64,
}

/// A fold job's accumulator, kept across the job's chunks until a flush.
pub(crate) struct Accumulator {
    /// The value, of the type the job's runner folds into.
    pub(crate) value: Box<dyn Any>,
    /// Encodes `value` (the runner's monomorphised encoder: the flush request does
    /// not name the type).
    pub(crate) encode: EncodeAccumulator,
}

/// Encodes an accumulator's value, whose type only its encoder knows.
pub(crate) type EncodeAccumulator = fn(Box<dyn Any>, &mut Vec<u8>) -> Result<(), CodecError>;

struct Context {
    bytes: Result<Bytes, CodecError>,
    decoded: Option<Box<dyn Any>>,
    /// The `map_file` regions the value names, as the parent's request listed them:
    /// mapped without seals while the value is decoded.
    unsealed: Vec<RegionHandle>,
}

/// Where a context value's encoding is: in the request, or in a shared region (a
/// context larger than the pool's `share_contexts_above`).
enum Bytes {
    Owned(Vec<u8>),
    Mapped(Arc<Region>),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Owned(bytes) => bytes,
            Bytes::Mapped(region) => region.bytes(),
        }
    }
}

impl WorkerState {
    /// Keeps the encoded context value of `job` until [`WorkerState::forget`]:
    /// `payload` is the encoding, or with `shared` the handle of a region holding it
    /// (attached now; an error is reported by the first chunk that needs the value).
    pub(crate) fn set_context(
        &mut self,
        job: u64,
        payload: &[u8],
        shared: bool,
        unsealed: Vec<RegionHandle>,
    ) {
        let bytes = if shared {
            codec::decode::<RegionHandle>(payload).and_then(|handle| {
                handle.attach(false).map(Bytes::Mapped).map_err(|fault| {
                    CodecError(format!("could not attach the shared context: {fault}"))
                })
            })
        } else {
            Ok(Bytes::Owned(payload.to_vec()))
        };
        let previous = self.contexts.insert(
            job,
            Context {
                bytes,
                decoded: None,
                unsealed,
            },
        );
        drop_user_value(previous);
    }

    /// Drops the context value and the accumulator of a job that has ended.
    pub(crate) fn forget(&mut self, job: u64) {
        let previous = self.contexts.remove(&job);
        drop_user_value(previous);
        let folded = self.folds.remove(&job).map(|acc| acc.value);
        drop_user_value(folded);
        // Shared inputs the parent has dropped since are released with the job.
        crate::shared::region::sweep();
    }

    /// How many jobs' context values this worker holds.
    #[cfg(test)]
    pub(crate) fn contexts(&self) -> usize {
        self.contexts.len()
    }

    /// The context value of `job`, decoded on first use and kept for later chunks.
    pub(crate) fn context<C: DeserializeOwned + 'static>(
        &mut self,
        job: u64,
    ) -> Result<&C, Failure> {
        let Some(context) = self.contexts.get_mut(&job) else {
            return Err(Failure::Malformed {
                reason: format!("chunk of job {job} arrived before its context value"),
            });
        };
        if !context.decoded.as_ref().is_some_and(|d| d.is::<C>()) {
            let bytes = match &context.bytes {
                Ok(bytes) => bytes.as_slice(),
                Err(error) => {
                    return Err(Failure::DecodeContext {
                        error: error.clone(),
                    });
                }
            };
            let value: C = region::with_unsealed(&context.unsealed, || codec::decode(bytes))
                .map_err(|error| Failure::DecodeContext { error })?;
            context.decoded = Some(Box::new(value));
        }
        Ok(context
            .decoded
            .as_ref()
            .and_then(|d| d.downcast_ref::<C>())
            .expect("the context was decoded as C just above"))
    }

    /// Takes the accumulator of fold job `job`, leaving none.
    pub(crate) fn take_fold(&mut self, job: u64) -> Option<Accumulator> {
        self.folds.remove(&job)
    }

    /// Keeps the accumulator of fold job `job` until the next chunk or flush.
    pub(crate) fn put_fold(&mut self, job: u64, acc: Accumulator) {
        let previous = self.folds.insert(job, acc).map(|acc| acc.value);
        drop_user_value(previous);
    }

    /// Stores what the initializer built.
    pub(crate) fn set_user(&mut self, value: Box<dyn Any>) {
        let previous = self.user.replace(Ok(value));
        drop_user_value(previous);
    }

    /// Records that the initializer failed, so tasks that need its state say why.
    pub(crate) fn set_user_failed(&mut self, reason: String) {
        let previous = self.user.replace(Err(reason));
        drop_user_value(previous);
    }

    /// The per-worker state of type `S`.
    pub(crate) fn user<S: 'static>(&mut self) -> Result<&mut S, Failure> {
        match &mut self.user {
            None => Err(Failure::NoState {
                reason: format!(
                    "the task needs per-worker state of type {} but the pool has no initializer",
                    std::any::type_name::<S>()
                ),
            }),
            Some(Err(reason)) => Err(Failure::NoState {
                reason: format!("the initializer failed in this worker: {reason}"),
            }),
            Some(Ok(value)) => value.downcast_mut::<S>().ok_or_else(|| Failure::NoState {
                reason: format!(
                    "the task needs per-worker state of type {}, which is not what the initializer built",
                    std::any::type_name::<S>()
                ),
            }),
        }
    }
}

/// Drops a value that may run user code in its `Drop`; a panic there concerns no
/// item of any job, so it is printed by the panic hook and ignored.
fn drop_user_value<V>(value: V) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(value)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contexts_are_kept_per_job_until_forgotten() {
        let mut state = WorkerState::default();
        let mut bytes = Vec::new();
        codec::encode_into(&7u64, &mut bytes).unwrap();
        state.set_context(1, &bytes, false, Vec::new());
        codec::encode_into(&1u8, &mut bytes).unwrap();
        let mut other = Vec::new();
        codec::encode_into(&9u64, &mut other).unwrap();
        state.set_context(2, &other, false, Vec::new());
        assert_eq!(*state.context::<u64>(1).unwrap(), 7);
        assert_eq!(*state.context::<u64>(2).unwrap(), 9);
        state.forget(1);
        assert!(state.context::<u64>(1).is_err());
        assert_eq!(state.contexts(), 1);
    }

    #[test]
    fn user_state_is_typed() {
        let mut state = WorkerState::default();
        assert!(matches!(state.user::<u32>(), Err(Failure::NoState { .. })));
        state.set_user(Box::new(5u32));
        *state.user::<u32>().unwrap() += 1;
        assert_eq!(*state.user::<u32>().unwrap(), 6);
        assert!(matches!(state.user::<u64>(), Err(Failure::NoState { .. })));
        state.set_user_failed("boom".into());
        let Err(Failure::NoState { reason }) = state.user::<u32>() else {
            panic!("expected no state");
        };
        assert!(reason.contains("boom"));
    }
}
