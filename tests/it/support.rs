//! Helpers shared by the integration tests.

use multiproc::Pool;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A process pool of `workers` whose workers stay quiet: panics are reported through
/// errors, and a test's output should not be interleaved with workers' stderr.
pub(crate) fn pool(workers: usize) -> Pool {
    Pool::builder()
        .workers(workers)
        .inherit_output(false)
        .build()
        .expect("a pool starts")
}

pub(crate) fn pool_with_chunks(workers: usize, chunk_size: usize) -> Pool {
    Pool::builder()
        .workers(workers)
        .chunk_size(chunk_size)
        .inherit_output(false)
        .build()
        .expect("a pool starts")
}

pub(crate) fn inline_pool(workers: usize, chunk_size: Option<usize>) -> Pool {
    let builder = Pool::builder().workers(workers).inline(true);
    match chunk_size {
        Some(n) => builder.chunk_size(n),
        None => builder,
    }
    .build()
    .expect("an inline pool starts")
}

/// Seeded input, so every run sees the same items.
pub(crate) fn random_u64s(len: usize, seed: u64) -> Vec<u64> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random()).collect()
}

pub(crate) fn random_strings(len: usize, seed: u64) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len)
        .map(|_| {
            let n = rng.random_range(0..40);
            (0..n).map(|_| rng.random_range('a'..='z')).collect()
        })
        .collect()
}

/// The splitmix64 finaliser: a cheap, well-mixed task.
pub(crate) fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Whether a process with this id still exists (as anything but a reaped child).
pub(crate) fn process_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Descriptors this process has open.
pub(crate) fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("procfs").count()
}

/// Threads of this process whose name starts with `prefix` (the kernel keeps the
/// first 15 bytes of a thread's name).
pub(crate) fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("procfs")
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end().starts_with(prefix))
        .count()
}

/// This process's children, with their state letter (`Z` for a zombie).
pub(crate) fn children_of_this_process() -> Vec<(u32, char)> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .expect("procfs")
        .filter_map(|e| {
            let entry = e.ok()?;
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            let (_, rest) = stat.rsplit_once(") ")?;
            let mut fields = rest.split_whitespace();
            let state = fields.next()?.chars().next()?;
            (fields.next()? == me).then_some((pid, state))
        })
        .collect()
}
