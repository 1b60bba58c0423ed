//! What Linux provides and std does not: starting children, socket calls, signals.

#[cfg(test)]
pub(crate) mod alloc;
#[cfg(feature = "mpi")]
pub(crate) mod exit;
pub(crate) mod interrupt;
pub(crate) mod poll;
pub(crate) mod proc;
pub(crate) mod shm;
pub(crate) mod signals;
pub(crate) mod socket;
pub(crate) mod spawn;
