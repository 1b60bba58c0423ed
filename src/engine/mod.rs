//! The engine: the job table, the workers' supervisor, and the backends that run
//! workers as processes or threads.

pub(crate) mod backend;
pub(crate) mod chunker;
pub(crate) mod driver;
pub(crate) mod ends;
pub(crate) mod job;
pub(crate) mod outcome;
pub(crate) mod progress;
pub(crate) mod scheduler;
pub(crate) mod stats;
pub(crate) mod supervisor;
pub(crate) mod trace;
