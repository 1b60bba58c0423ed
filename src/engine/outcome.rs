//! What a worker's answer or loss means for a job: errors with the item and worker
//! they concern.

use std::ops::Range;
use std::process::ExitStatus;

use crate::error::Error;
use crate::wire::protocol::Failure;

/// Whether a worker's end looks like running out of memory: Rust aborts when an
/// allocation fails (SIGABRT), and the kernel's OOM killer sends SIGKILL.
pub(crate) fn died_of_memory(status: Option<ExitStatus>) -> bool {
    use std::os::unix::process::ExitStatusExt;
    matches!(
        status.and_then(|s| s.signal()),
        Some(libc::SIGABRT | libc::SIGKILL)
    )
}

/// Whether a send failed only because the worker is gone.
pub(crate) fn is_hang_up(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionReset, NotConnected};
    matches!(error.kind(), BrokenPipe | ConnectionReset | NotConnected)
}

pub(crate) fn exit_description(status: Option<ExitStatus>) -> String {
    status.map_or_else(|| "exit status unknown".to_owned(), |s| s.to_string())
}

/// Says why an initializer failed, in words.
pub(crate) fn describe_init(failure: Failure) -> String {
    match failure {
        Failure::Panicked { panic, .. } => format!("it panicked: {panic}"),
        Failure::DecodeItem { error, .. } => format!("its argument did not decode: {error}"),
        other => format!("{other:?}"),
    }
}

/// Turns a worker's failure report into an error and the item it concerns.
pub(crate) fn describe(failure: Failure, worker: usize, items: Range<usize>) -> (usize, Error) {
    let at = |item: u64| usize::try_from(item).unwrap_or(usize::MAX);
    match failure {
        Failure::Panicked { item, panic } => {
            let item = at(item);
            (
                item,
                Error::TaskPanicked {
                    item,
                    worker,
                    panic,
                },
            )
        }
        Failure::DecodeItem { item, error } => {
            let item = at(item);
            (
                item,
                Error::DecodeItem {
                    item,
                    worker: Some(worker),
                    source: error,
                },
            )
        }
        Failure::EncodeResult {
            item: Some(item),
            error,
        } => {
            let item = at(item);
            (
                item,
                Error::Result {
                    items: item..item.saturating_add(1),
                    worker,
                    source: error,
                },
            )
        }
        Failure::EncodeResult { item: None, error } => (
            items.start,
            Error::Result {
                items,
                worker,
                source: error,
            },
        ),
        Failure::DecodeContext { error } => (
            items.start,
            Error::Context {
                worker: Some(worker),
                source: error,
            },
        ),
        Failure::NoState { reason } => (items.start, Error::WorkerState { worker, reason }),
        Failure::Malformed { reason } => (items.start, Error::Protocol { worker, reason }),
    }
}

/// The same failure once more, for another job it ends: a failure to start a
/// worker keeps its kind and message (an [`Error`] is not `Clone`).
pub(crate) fn again(error: &Error) -> Error {
    match error {
        Error::Spawn { worker, source } => Error::Spawn {
            worker: *worker,
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
        other => Error::Transport {
            worker: None,
            source: std::io::Error::other(other.to_string()),
        },
    }
}
