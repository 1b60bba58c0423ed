//! The wire: how values are encoded, the messages between parent and worker, and
//! the links that carry them. It knows nothing of tasks, jobs or workers.

pub(crate) mod codec;
pub(crate) mod protocol;
pub(crate) mod transport;
