//! par_map / par_map_reduce on the default pool; nothing else.

use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::pool::Pool;

/// Applies `task` to every item on the default pool; results in input order.
///
/// The default pool is started on first use with one worker per CPU
/// (`num_cpus::get()`) and lives until the process exits. Calls from several threads
/// share it. Inside a worker process (from a task) it is refused with
/// [`Error::InsideWorker`](crate::Error::InsideWorker). See [`Pool::map`] for the details and [`Pool::builder`] to choose
/// the worker count.
///
/// # Errors
///
/// As [`Pool::map`], and those of [`PoolBuilder::build`](crate::PoolBuilder::build)
/// when the default pool cannot be started.
///
/// # Examples
///
/// ```standalone_crate
/// fn square(x: u64) -> u64 {
///     x * x
/// }
/// fn main() -> multiproc::Result<()> {
///     multiproc::init(); // in a worker process this call serves tasks and never returns
///     assert_eq!(multiproc::par_map(vec![1u64, 2, 3], square)?, [1, 4, 9]);
///     Ok(())
/// }
/// ```
pub fn par_map<I, T, U, F>(items: I, task: F) -> Result<Vec<U>>
where
    I: IntoIterator<Item = T>,
    T: Serialize + DeserializeOwned,
    U: Serialize + DeserializeOwned,
    F: Fn(T) -> U + Copy + Send + Sync,
{
    default_pool()?.map(items, task)
}

/// Maps every item and combines the results with an associative `reduce`, on the
/// default pool. See [`Pool::map_reduce`].
///
/// # Errors
///
/// As [`Pool::map_reduce`] and [`par_map`].
///
/// # Examples
///
/// ```standalone_crate
/// fn main() -> multiproc::Result<()> {
///     multiproc::init();
///     let total: u64 = multiproc::par_map_reduce(0..1_000u64, |x| x * x, || 0, |a, b| a + b)?;
///     assert_eq!(total, 332_833_500);
///     Ok(())
/// }
/// ```
pub fn par_map_reduce<I, T, U, F, Id, R>(items: I, task: F, identity: Id, reduce: R) -> Result<U>
where
    I: IntoIterator<Item = T>,
    T: Serialize + DeserializeOwned,
    U: Serialize + DeserializeOwned,
    F: Fn(T) -> U + Copy + Send + Sync,
    Id: Fn() -> U + Copy + Send + Sync,
    R: Fn(U, U) -> U + Copy + Send + Sync,
{
    default_pool()?.map_reduce(items, task, identity, reduce)
}

fn default_pool() -> Result<Arc<Pool>> {
    if crate::worker::serve::is_worker() {
        return Err(Error::InsideWorker);
    }
    static DEFAULT: Mutex<Option<Arc<Pool>>> = Mutex::new(None);
    let mut slot = DEFAULT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(pool) = slot.as_ref() {
        return Ok(Arc::clone(pool));
    }
    let pool = Arc::new(Pool::builder().build()?);
    *slot = Some(Arc::clone(&pool));
    Ok(pool)
}
