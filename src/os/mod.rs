//! What Linux provides and std does not: starting children, socket calls, signals.

pub(crate) mod interrupt;
pub(crate) mod socket;
pub(crate) mod spawn;
