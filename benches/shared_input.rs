//! W3 (a 1 GiB read-only input, 64 slice sums): sequential, rayon, multiproc with a
//! `SharedSlice`, and multiproc with the slices passed by value, in one group. Before
//! the group it reports, once: the cost of sharing (`from_vec`, `from_file`), the
//! attach time per worker for a small and a large input, and the summed PSS of the
//! parent and its workers. Run with `cargo bench --bench shared_input`.
//!
//! `MULTIPROC_W3_LOG2` (default 27, i.e. 2^27 u64 = 1 GiB) makes the input smaller for
//! a quick look; the checksum is asserted only at the full size.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use multiproc::{Pool, SharedSlice};
use rayon::prelude::*;

/// The splitmix64 output function used by every workload.
fn sm(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const TASKS: usize = 64;
const CHECKSUM: u64 = 0x77e1_27b5_050c_6e0a;

fn wrapping_sum(values: &[u64]) -> u64 {
    values.iter().fold(0, |a, &b| a.wrapping_add(b))
}

fn ranges(len: usize) -> Vec<(usize, usize)> {
    let per = len / TASKS;
    (0..TASKS).map(|t| (t * per, (t + 1) * per)).collect()
}

fn slice_sum(data: &SharedSlice<u64>, r: (usize, usize)) -> u64 {
    wrapping_sum(&data[r.0..r.1])
}

fn pool() -> Pool {
    Pool::builder().workers(2).build().expect("pool starts")
}

/// W3 on multiproc, timed as the workload says: pool start, the map, and shutdown.
fn run_shared(data: &SharedSlice<u64>) -> (u64, Duration) {
    let started = Instant::now();
    let pool = pool();
    let total = pool
        .map_reduce_with(ranges(data.len()), data, slice_sum, || 0, u64::wrapping_add)
        .expect("W3 runs");
    drop(pool);
    (total, started.elapsed())
}

/// Proportional set size of a process, from `/proc/PID/smaps_rollup`, in bytes.
fn pss(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

fn gib_per_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / (1u64 << 30) as f64
}

fn report(data: &SharedSlice<u64>, log2: u32) {
    let bytes = data.len() * 8;
    // Sharing costs: one copy each, into a sealed memfd. Three times each: on this
    // VM the first touch of guest memory that was never used is much slower than
    // memory that was used and freed, so the first figure can be an outlier.
    let path = std::env::temp_dir().join(format!("multiproc-w3-{}.bin", std::process::id()));
    std::fs::write(&path, bytemuck::cast_slice::<u64, u8>(data)).expect("write the input file");
    let (mut to_vec, mut share, mut copy) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        let started = Instant::now();
        let vec: Vec<u64> = data.to_vec();
        to_vec.push(started.elapsed());
        let started = Instant::now();
        let from_vec = SharedSlice::from_vec(vec).expect("from_vec");
        share.push(started.elapsed());
        drop(from_vec);
        let started = Instant::now();
        let from_file = SharedSlice::<u64>::from_file(&path).expect("from_file");
        copy.push(started.elapsed());
        assert_eq!(from_file.len(), data.len());
    }
    let _ = std::fs::remove_file(&path);
    let show = |times: &mut Vec<Duration>| {
        let list: Vec<String> = times
            .iter()
            .map(|t| format!("{:.3}", t.as_secs_f64()))
            .collect();
        times.sort();
        format!(
            "[{}] s, median {:.3} s = {:.1} GiB/s",
            list.join(", "),
            times[1].as_secs_f64(),
            gib_per_s(bytes, times[1])
        )
    };
    println!(
        "w3 share_s (from_vec of 2^{log2} u64): {}",
        show(&mut share)
    );
    println!(
        "w3 plain to_vec of the same, for scale: {}",
        show(&mut to_vec)
    );
    println!(
        "w3 from_file (page-cached file, copy_file_range): {}",
        show(&mut copy)
    );

    // Attach time per worker: a fresh pool, one trivial task per worker.
    for (name, input) in [
        (
            "1 MiB",
            SharedSlice::from_iter(0..(1u64 << 17)).expect("small input"),
        ),
        ("full", data.clone()),
    ] {
        let pool = Pool::builder()
            .workers(2)
            .chunk_size(1)
            .build()
            .expect("pool");
        let started = Instant::now();
        let lens = pool
            .map_with(0..2u32, &input, |d: &SharedSlice<u64>, _| d.len())
            .expect("attach");
        println!(
            "w3 attach ({name} input, {} bytes): first call on a fresh pool of 2 workers {:.3} ms",
            lens[0] * 8,
            started.elapsed().as_secs_f64() * 1e3
        );
    }

    // Repetitions as the workload defines them (median of 3), and the memory.
    let mut times = Vec::new();
    for _ in 0..3 {
        let (total, took) = run_shared(data);
        if log2 == 27 {
            assert_eq!(total, CHECKSUM, "W3 checksum");
        }
        times.push(took);
    }
    times.sort();
    println!(
        "w3 multiproc SharedSlice incl. pool start and shutdown: {:?} (median {:.4} s)",
        times,
        times[1].as_secs_f64()
    );
    let pool = pool();
    let total = pool
        .map_reduce_with(ranges(data.len()), data, slice_sum, || 0, u64::wrapping_add)
        .expect("W3 runs");
    black_box(total);
    let workers = pool.worker_pids().expect("worker pids");
    let parent = pss(std::process::id());
    let children: Vec<u64> = workers.iter().map(|&p| pss(p)).collect();
    let sum = parent + children.iter().sum::<u64>();
    println!(
        "w3 PSS after a run: parent {:.1} MiB, workers {:?} MiB, sum {:.3} GiB = {:.3}x the input",
        parent as f64 / (1 << 20) as f64,
        children
            .iter()
            .map(|&c| format!("{:.1}", c as f64 / (1 << 20) as f64))
            .collect::<Vec<_>>(),
        sum as f64 / (1u64 << 30) as f64,
        sum as f64 / bytes as f64
    );
}

fn main() {
    multiproc::init(); // in a worker process this serves tasks and never returns
    let log2: u32 = std::env::var("MULTIPROC_W3_LOG2")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(27);
    let len = 1usize << log2;
    let started = Instant::now();
    let data = SharedSlice::from_iter((0..len as u64).map(sm)).expect("build the input");
    println!(
        "w3 build_s (from_iter straight into shared memory, 2^{log2} u64): {:.3} s",
        started.elapsed().as_secs_f64()
    );
    let mut c = Criterion::default().configure_from_args();
    // `cargo bench --no-run` and criterion's `--list` must not pay for the report.
    if !std::env::args().any(|a| a == "--list" || a == "--test") {
        report(&data, log2);
    }

    let plain: Vec<u64> = data.to_vec();
    let mut group = c.benchmark_group("w3_shared_input");
    group.throughput(Throughput::Bytes(len as u64 * 8));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    let id = |name: &str| BenchmarkId::new(name, format!("2^{log2}_u64_64_slices"));
    group.bench_function(id("sequential"), |b| {
        b.iter(|| {
            ranges(len)
                .into_iter()
                .map(|r| wrapping_sum(&plain[r.0..r.1]))
                .fold(0, u64::wrapping_add)
        })
    });
    group.bench_function(id("rayon"), |b| {
        let rayon_pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .expect("rayon pool");
        b.iter(|| {
            rayon_pool.install(|| {
                ranges(len)
                    .into_par_iter()
                    .map(|r| wrapping_sum(&plain[r.0..r.1]))
                    .reduce(|| 0, u64::wrapping_add)
            })
        })
    });
    group.bench_function(id("multiproc_shared_slice_incl_pool_start"), |b| {
        b.iter_custom(|iters| (0..iters).map(|_| run_shared(&data).1).sum::<Duration>())
    });
    group.bench_function(id("multiproc_slices_by_value_incl_pool_start"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let started = Instant::now();
                let pool = pool();
                let slices = ranges(len).into_iter().map(|r| plain[r.0..r.1].to_vec());
                let sum = pool
                    .map_reduce(
                        slices,
                        |v: Vec<u64>| wrapping_sum(&v),
                        || 0,
                        u64::wrapping_add,
                    )
                    .expect("W3 by value runs");
                drop(pool);
                total += started.elapsed();
                black_box(sum);
            }
            total
        })
    });
    group.finish();
    c.final_summary();
}
