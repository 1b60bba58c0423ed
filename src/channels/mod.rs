//! Channels between processes: the per-process rendezvous, `Queue` and `Pipe`.

pub(crate) mod broker;
pub(crate) mod pipe;
pub(crate) mod queue;
