//! The first call of every program that uses multiproc.

/// Turns this process into a worker when its parent started it as one; otherwise
/// returns at once.
///
/// Call it on the first line of `main`. Workers are the same executable started again,
/// so everything `main` does before `init()` also runs in every worker: keep it first,
/// as Python's `if __name__ == "__main__":` guard keeps the top of a script out of its
/// workers. In a worker process this call serves tasks until the parent hangs up and
/// then exits the process; it never returns. In any other process it costs one
/// environment lookup. (Workers get an extra command-line argument; `main` never sees
/// it when `init()` comes first.)
///
/// Under an MPI launcher (`mpirun`, `srun`; crate feature `mpi`), `init()` also joins
/// the MPI job: rank 0 returns and runs the program, whose pools then run their
/// workers on the other ranks; every other rank serves those pools until rank 0's
/// program exits, and then exits without returning. `MULTIPROC_BACKEND=mpi` asks for
/// this without a launcher (a job of one rank). See the README, "Running on a
/// cluster".
///
/// Test binaries have no `main` of their own: put
/// [`enable_test_support!()`](crate::enable_test_support) in each test crate instead.
/// Doctests that start workers are written with their own `main` that calls `init()`.
///
/// # Examples
///
/// ```standalone_crate
/// fn main() -> multiproc::Result<()> {
///     multiproc::init(); // in a worker process this call serves tasks and never returns
///     let squares: Vec<u64> = multiproc::par_map(0..5u64, |x| x * x)?;
///     assert_eq!(squares, [0, 1, 4, 9, 16]);
///     Ok(())
/// }
/// ```
pub fn init() {
    crate::worker::serve::serve_if_worker();
    #[cfg(feature = "mpi")]
    crate::engine::backend::mpi::init();
}
