//! W1 (tiny tasks), W2 (CPU-bound efficiency) and W5 (start-up, round trip), each
//! group with a sequential and a rayon baseline beside multiproc, as defined in the
//! project's workload definitions. Run with `cargo bench --bench par_map`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use rayon::prelude::*;

/// The splitmix64 output function used by every workload.
fn sm(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A map-reduce workload over `0..items` with a wrapping-sum reduce.
struct SumWorkload<F> {
    group: &'static str,
    input: &'static str,
    items: u64,
    checksum: u64,
    measurement: Duration,
    task: F,
}

/// Checks the workload's checksum on the pool, then times it sequentially, with rayon
/// and with multiproc (items shipped by value) in one group.
fn bench_sum<F>(c: &mut Criterion, pool: &multiproc::Pool, w: SumWorkload<F>)
where
    F: Fn(u64) -> u64 + Copy + Send + Sync,
{
    let task = w.task;
    let got: u64 = pool
        .map_reduce(0..w.items, task, || 0, u64::wrapping_add)
        .expect("the workload runs");
    assert_eq!(got, w.checksum, "{} checksum", w.group);

    let mut group = c.benchmark_group(w.group);
    group.throughput(Throughput::Elements(w.items));
    group.sample_size(10);
    group.measurement_time(w.measurement);
    let id = |name: &str| BenchmarkId::new(name, w.input);
    group.bench_function(id("sequential"), |b| {
        b.iter(|| (0..black_box(w.items)).map(task).fold(0, u64::wrapping_add))
    });
    group.bench_function(id("rayon"), |b| {
        b.iter(|| {
            (0..black_box(w.items))
                .into_par_iter()
                .map(task)
                .reduce(|| 0, u64::wrapping_add)
        })
    });
    group.bench_function(id("multiproc_items_by_value"), |b| {
        b.iter(|| {
            pool.map_reduce(0..black_box(w.items), task, || 0, u64::wrapping_add)
                .expect("the workload runs")
        })
    });
    group.finish();
}

fn w1_tiny(c: &mut Criterion, pool: &multiproc::Pool) {
    let workload = SumWorkload {
        group: "w1_tiny",
        input: "10M_u64_items",
        items: 10_000_000,
        checksum: 0x7f71_50bd_29b4_988b,
        measurement: Duration::from_secs(8),
        task: sm,
    };
    bench_sum(c, pool, workload);
}

/// W1 watched: the same job with a progress bar and with a trace file, beside the
/// plain pool (measuring itself is always on). Run it under a terminal (or
/// `script -qfec`) for the bar to be drawn; elsewhere it is hidden, as a user's is.
fn w1_watched(c: &mut Criterion, pool: &multiproc::Pool) {
    let items = 10_000_000u64;
    let trace = std::env::temp_dir().join(format!("w1-trace-{}.json", std::process::id()));
    let with_bar = multiproc::Pool::builder()
        .workers(2)
        .progress(true)
        .build()
        .expect("pool starts");
    let traced = multiproc::Pool::builder()
        .workers(2)
        .trace(&trace)
        .build()
        .expect("pool starts");
    let run = |pool: &multiproc::Pool| {
        pool.map_reduce(0..black_box(items), sm, || 0, u64::wrapping_add)
            .expect("the workload runs")
    };
    assert_eq!(run(&with_bar), 0x7f71_50bd_29b4_988b);
    let mut group = c.benchmark_group("w1_watched");
    group.throughput(Throughput::Elements(items));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(8));
    let id = |name: &str| BenchmarkId::new(name, "10M_u64_items");
    group.bench_function(id("sequential"), |b| {
        b.iter(|| (0..black_box(items)).map(sm).fold(0, u64::wrapping_add))
    });
    group.bench_function(id("rayon"), |b| {
        b.iter(|| {
            (0..black_box(items))
                .into_par_iter()
                .map(sm)
                .reduce(|| 0, u64::wrapping_add)
        })
    });
    group.bench_function(id("multiproc"), |b| b.iter(|| run(pool)));
    group.bench_function(id("multiproc_progress_bar"), |b| b.iter(|| run(&with_bar)));
    group.bench_function(id("multiproc_trace"), |b| b.iter(|| run(&traced)));
    group.finish();
    drop(traced);
    let _ = std::fs::remove_file(&trace);
}

const W2_ROUNDS: u64 = 1_500_000;

fn chain(i: u64) -> u64 {
    let mut x = i;
    for _ in 0..W2_ROUNDS {
        x = sm(x);
    }
    x
}

fn w2_cpu(c: &mut Criterion, pool: &multiproc::Pool) {
    let workload = SumWorkload {
        group: "w2_cpu",
        input: "256_tasks_of_1.5M_rounds",
        items: 256,
        checksum: 0x5a47_6f5c_7f52_e9e5,
        measurement: Duration::from_secs(15),
        task: chain,
    };
    bench_sum(c, pool, workload);
}

fn inc(x: u64) -> u64 {
    x + 1
}

fn w5_start(c: &mut Criterion) {
    let mut group = c.benchmark_group("w5a_start_2_workers_and_first_result");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(5));
    let id = |name: &str| BenchmarkId::new(name, "inc(1)");
    group.bench_function(id("sequential"), |b| b.iter(|| inc(black_box(1))));
    group.bench_function(id("rayon"), |b| {
        b.iter(|| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(2)
                .build()
                .expect("rayon pool");
            pool.install(|| inc(black_box(1)))
        })
    });
    group.bench_function(id("multiproc"), |b| {
        // The pool's shutdown is left out of the timed region, as W5a's first figure.
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let started = Instant::now();
                let pool = multiproc::Pool::builder()
                    .workers(2)
                    .build()
                    .expect("pool starts");
                let out = pool.map([black_box(1u64)], inc).expect("inc runs");
                total += started.elapsed();
                assert_eq!(out, [2]);
                drop(pool);
            }
            total
        })
    });
    group.bench_function(id("multiproc_with_shutdown"), |b| {
        b.iter(|| {
            let pool = multiproc::Pool::builder()
                .workers(2)
                .build()
                .expect("pool starts");
            pool.map([black_box(1u64)], inc).expect("inc runs")
        })
    });
    group.finish();
}

fn w5_round_trip(c: &mut Criterion, pool: &multiproc::Pool) {
    let n = 10_000u64;
    let s: u64 = (0..n)
        .map(|i| pool.map([i], inc).expect("inc runs")[0])
        .sum();
    assert_eq!(s, 0x0000_0000_02fb_0408, "W5b checksum");

    let mut group = c.benchmark_group("w5b_round_trip");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(5));
    let id = |name: &str| BenchmarkId::new(name, "one_inc");
    group.bench_function(id("sequential"), |b| b.iter(|| inc(black_box(7))));
    let rayon_pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("rayon pool");
    group.bench_function(id("rayon"), |b| {
        b.iter(|| rayon_pool.install(|| inc(black_box(7))))
    });
    group.bench_function(id("multiproc"), |b| {
        b.iter(|| pool.map([black_box(7u64)], inc).expect("inc runs"))
    });
    group.finish();
}

fn main() {
    multiproc::init(); // in a worker process this serves tasks and never returns
    let mut c = Criterion::default().configure_from_args();
    let pool = multiproc::Pool::builder()
        .workers(2)
        .build()
        .expect("pool starts");
    w1_tiny(&mut c, &pool);
    w1_watched(&mut c, &pool);
    w2_cpu(&mut c, &pool);
    w5_start(&mut c);
    w5_round_trip(&mut c, &pool);
    c.final_summary();
}
