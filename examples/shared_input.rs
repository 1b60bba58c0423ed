//! A large array built once, shared with the workers as a read-only memory map, and
//! reduced in slices; then a lookup table shared as a `Shared` value.
//!
//! Run it with `cargo run --release --example shared_input` (the array is 128 MiB;
//! pass a size in MiB as the first argument to change it).

use std::collections::HashMap;
use std::time::Instant;

use multiproc::{Pool, Shared, SharedSlice};

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Proportional set size of a process (shared pages divided among their users), MiB.
fn pss_mib(pid: u32) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let kib: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

fn main() -> multiproc::Result<()> {
    multiproc::init(); // first line of main: in a worker process it serves tasks and never returns

    let mib: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(128);
    let len = mib << 17; // u64 values in `mib` MiB

    let started = Instant::now();
    let data = SharedSlice::from_iter((0..len as u64).map(splitmix64))?;
    println!(
        "built {mib} MiB ({len} u64) straight into a sealed memfd in {:.3} s",
        started.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    let copy = SharedSlice::from_vec(data.to_vec())?;
    println!(
        "sharing a Vec of the same size (one copy) took {:.3} s",
        started.elapsed().as_secs_f64()
    );
    drop(copy);

    let started = Instant::now();
    let pool = Pool::builder().workers(2).build()?;
    let ranges: Vec<(usize, usize)> = (0..64)
        .map(|t| (t * len / 64, (t + 1) * len / 64))
        .collect();
    // The context crosses as a handle of a few dozen bytes; each worker maps the
    // array once and reads its slices in place.
    let total = pool.map_reduce_with(
        ranges,
        &data,
        |data: &SharedSlice<u64>, r: (usize, usize)| {
            data[r.0..r.1].iter().fold(0u64, |a, &b| a.wrapping_add(b))
        },
        || 0,
        u64::wrapping_add,
    )?;
    let took = started.elapsed();
    let expected = data.iter().fold(0u64, |a, &b| a.wrapping_add(b));
    assert_eq!(total, expected);
    println!(
        "64 slice sums on 2 workers, pool start included: {:.3} s, total {total:#018x}",
        took.as_secs_f64()
    );

    let workers = pool.worker_pids()?;
    let parent = pss_mib(std::process::id());
    let children: Vec<f64> = workers.iter().map(|&p| pss_mib(p)).collect();
    let sum = parent + children.iter().sum::<f64>();
    println!(
        "memory (PSS): parent {parent:.0} MiB + workers {:?} MiB = {sum:.0} MiB for a {mib} MiB input",
        children
            .iter()
            .map(|c| c.round() as u64)
            .collect::<Vec<_>>()
    );

    // Any serializable value: encoded once, decoded once per worker.
    let table: HashMap<String, u64> = (0..10_000u64).map(|i| (format!("key{i}"), i * i)).collect();
    let table = Shared::new(table)?;
    let keys: Vec<String> = ["key3", "key9999", "nope"].map(String::from).to_vec();
    let found = pool.map_with(
        keys,
        &table,
        |t: &Shared<HashMap<String, u64>>, k: String| t.get(&k).copied(),
    )?;
    println!(
        "a {}-byte Shared<HashMap> looked up in the workers: {found:?}",
        table.encoded_len()
    );
    Ok(())
}
