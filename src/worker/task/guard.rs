//! User code run under a guard: a panic becomes a [`Failure::Panicked`] naming its
//! item, with the message and location a process-wide hook recorded.

use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

use crate::error::TaskPanic;
use crate::wire::protocol::Failure;

thread_local! {
    /// Set while user code runs under [`guarded`]: the panic hook then records the
    /// panic here instead of printing it, since it travels back as an `Err`.
    static CAPTURING: Cell<bool> = const { Cell::new(false) };
    static CAUGHT: RefCell<Option<TaskPanic>> = const { RefCell::new(None) };
}

/// Installs (once per process) a panic hook that records panics raised under
/// [`guarded`] and passes every other panic to the hook that was there before.
pub(crate) fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !CAPTURING.with(Cell::get) {
                return previous(info);
            }
            let message = payload_message(info.payload());
            let location = info
                .location()
                .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()));
            CAUGHT.with(|c| *c.borrow_mut() = Some(TaskPanic { message, location }));
        }));
    });
}

pub(super) fn payload_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "Box<dyn Any>".to_owned()
    }
}

/// Marks this thread as running user code for as long as it lives, so the panic
/// hook records panics instead of printing them. Set once per chunk rather than per
/// item: thread-local accesses would otherwise cost more than a tiny task.
pub(super) struct Capturing;

impl Capturing {
    pub(super) fn start() -> Self {
        CAPTURING.with(|c| c.set(true));
        Capturing
    }
}

impl Drop for Capturing {
    fn drop(&mut self) {
        CAPTURING.with(|c| c.set(false));
    }
}

/// Runs user code, turning a panic into [`Failure::Panicked`] for `item`. Callers
/// hold a [`Capturing`] so the panic's message and location are recorded.
#[inline(always)]
pub(super) fn guarded<R>(item: u64, f: impl FnOnce() -> R) -> Result<R, Failure> {
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    result.map_err(|payload| {
        let panic = CAUGHT
            .with(|c| c.borrow_mut().take())
            .unwrap_or_else(|| TaskPanic {
                message: payload_message(payload.as_ref()),
                location: None,
            });
        Failure::Panicked { item, panic }
    })
}
