//! The job server: `apply_async` throughput and `imap` against `map` over W1, each
//! group with a sequential and a rayon baseline. Run with `cargo bench --bench jobs`.

use std::hint::black_box;
use std::sync::mpsc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use rayon::prelude::*;

/// The splitmix64 output function used by every workload.
fn sm(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn inc(x: u64) -> u64 {
    x + 1
}

const TASKS: u64 = 20_000;

/// 20 000 trivial tasks submitted, then every result fetched.
fn apply_async_throughput(c: &mut Criterion, pool: &multiproc::Pool) {
    let expected: u64 = (0..TASKS).map(inc).sum();
    let mut group = c.benchmark_group("apply_async");
    group.throughput(Throughput::Elements(TASKS));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(5));
    let id = |name: &str| BenchmarkId::new(name, "20k_trivial_tasks");
    group.bench_function(id("sequential"), |b| {
        b.iter(|| (0..TASKS).map(|x| inc(black_box(x))).sum::<u64>())
    });
    let rayon_pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("rayon pool");
    group.bench_function(id("rayon_spawn"), |b| {
        b.iter(|| {
            // One task per submission, as apply_async is used: spawn, then collect.
            let (tx, rx) = mpsc::channel();
            for x in 0..black_box(TASKS) {
                let tx = tx.clone();
                rayon_pool.spawn(move || tx.send(inc(x)).expect("receiver alive"));
            }
            drop(tx);
            let total: u64 = rx.iter().sum();
            assert_eq!(total, expected);
            total
        })
    });
    group.bench_function(id("multiproc"), |b| {
        b.iter(|| {
            let handles: Vec<_> = (0..black_box(TASKS))
                .map(|x| pool.apply_async(inc, x).expect("submitted"))
                .collect();
            let total: u64 = handles
                .into_iter()
                .map(|h| h.get().expect("a result"))
                .sum();
            assert_eq!(total, expected);
            total
        })
    });
    let with_callbacks = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    group.bench_function(id("multiproc_with_callbacks"), |b| {
        b.iter(|| {
            with_callbacks.store(0, std::sync::atomic::Ordering::Relaxed);
            let handles: Vec<_> = (0..black_box(TASKS))
                .map(|x| {
                    let total = std::sync::Arc::clone(&with_callbacks);
                    pool.apply_async_with_callback(
                        inc,
                        x,
                        move |v: &u64| {
                            total.fetch_add(*v, std::sync::atomic::Ordering::Relaxed);
                        },
                        |_| {},
                    )
                    .expect("submitted")
                })
                .collect();
            for h in handles {
                h.wait();
            }
            let total = with_callbacks.load(std::sync::atomic::Ordering::Relaxed);
            assert_eq!(total, expected);
            total
        })
    });
    group.finish();
}

const W1_ITEMS: u64 = 10_000_000;

/// W1's task over 10 M items, every result brought back: `imap` streams them,
/// `map` collects them into a vector.
fn imap_w1(c: &mut Criterion, pool: &multiproc::Pool) {
    let checksum = 0x7f71_50bd_29b4_988b;
    let mut group = c.benchmark_group("imap_w1");
    group.throughput(Throughput::Elements(W1_ITEMS));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(8));
    let id = |name: &str| BenchmarkId::new(name, "10M_u64_items");
    group.bench_function(id("sequential"), |b| {
        b.iter(|| (0..black_box(W1_ITEMS)).map(sm).fold(0, u64::wrapping_add))
    });
    group.bench_function(id("rayon"), |b| {
        b.iter(|| {
            (0..black_box(W1_ITEMS))
                .into_par_iter()
                .map(sm)
                .reduce(|| 0, u64::wrapping_add)
        })
    });
    group.bench_function(id("multiproc_map"), |b| {
        b.iter(|| {
            let all = pool
                .map(0..black_box(W1_ITEMS), sm)
                .expect("the workload runs");
            let sum = all.iter().copied().fold(0, u64::wrapping_add);
            assert_eq!(sum, checksum);
            sum
        })
    });
    group.bench_function(id("multiproc_imap"), |b| {
        b.iter(|| {
            let sum = pool
                .imap(0..black_box(W1_ITEMS), sm)
                .expect("the workload starts")
                .map(|r| r.expect("a result"))
                .fold(0, u64::wrapping_add);
            assert_eq!(sum, checksum);
            sum
        })
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
    apply_async_throughput(&mut c, &pool);
    imap_w1(&mut c, &pool);
    c.final_summary();
}
