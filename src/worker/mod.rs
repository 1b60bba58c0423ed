//! The worker side: the receive loop, how a task is found and run, and what a
//! worker keeps between chunks.

pub(crate) mod serve;
pub(crate) mod state;
pub(crate) mod task;
