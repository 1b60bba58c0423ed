//! Queue and pipe throughput between two processes, and `Process` spawn + join
//! latency. Run with `cargo bench --bench channels`.
//!
//! A producer child sends `iters` items; the clock starts when the parent has the
//! first one (so the child's start-up is not counted) and stops at the last.

use std::fmt;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, BenchmarkId, Criterion, Throughput};
use multiproc::{Pipe, Process, Queue};
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// Bytes that encode as one byte string, not as a sequence of numbers.
struct Blob(Vec<u8>);

impl Serialize for Blob {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Blob;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Blob, E> {
                Ok(Blob(v.to_vec()))
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Blob, E> {
                Ok(Blob(v))
            }
        }
        d.deserialize_byte_buf(V)
    }
}

fn fill_queue((queue, size, count): (Queue<Blob>, usize, u64)) {
    for i in 0..count {
        queue.put(Blob(vec![i as u8; size])).unwrap();
    }
}

/// Takes one item, then `count` more; returns how long the `count` took, in
/// nanoseconds (the consumer is the process that measures).
fn drain_queue((queue, count): (Queue<Blob>, u64)) -> u64 {
    black_box(queue.get().unwrap());
    let started = Instant::now();
    for _ in 0..count {
        black_box(queue.get().unwrap());
    }
    u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

fn fill_pipe((end, size, count): (Pipe<Blob, ()>, usize, u64)) {
    for i in 0..count {
        end.send(Blob(vec![i as u8; size])).unwrap();
    }
}

fn inc(x: u64) -> u64 {
    x + 1
}

/// The baselines beside each transport: making and taking the items in one thread
/// (no transport at all), and two threads of a rayon pool joined by a bounded
/// crossbeam channel (shared memory, no encoding: what threads would do).
fn baselines(group: &mut BenchmarkGroup<'_, WallTime>, size: usize, name: &str) {
    group.bench_function(BenchmarkId::new("sequential", name), |b| {
        b.iter_custom(|iters| {
            let started = Instant::now();
            for i in 0..iters {
                black_box(Blob(vec![i as u8; size]));
            }
            started.elapsed()
        })
    });
    group.bench_function(BenchmarkId::new("rayon_threads_crossbeam", name), |b| {
        b.iter_custom(|iters| {
            let (tx, rx) = crossbeam_channel::bounded::<Blob>(64);
            rayon::spawn(move || {
                for i in 0..=iters {
                    tx.send(Blob(vec![i as u8; size])).unwrap();
                }
            });
            black_box(rx.recv().unwrap());
            let started = Instant::now();
            for _ in 0..iters {
                black_box(rx.recv().unwrap());
            }
            started.elapsed()
        })
    });
}

const SIZES: [(usize, &str); 2] = [(1024, "1KiB"), (1 << 20, "1MiB")];

fn queue_throughput(c: &mut Criterion) {
    let mut group = c.benchmark_group("queue_two_processes");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    for (size, name) in SIZES {
        if size >= 1 << 20 {
            group.throughput(Throughput::Bytes(size as u64));
        } else {
            group.throughput(Throughput::Elements(1));
        }
        baselines(&mut group, size, name);
        group.bench_function(BenchmarkId::new("put_get", name), |b| {
            b.iter_custom(|iters| {
                let queue = Queue::<Blob>::bounded(64);
                let child = Process::spawn((queue.clone(), size, iters + 1), fill_queue).unwrap();
                black_box(queue.get().unwrap());
                let started = Instant::now();
                for _ in 0..iters {
                    black_box(queue.get().unwrap());
                }
                let elapsed = started.elapsed();
                child.join().unwrap();
                elapsed
            })
        });
        // The other way: the consumer is the child, so each item is handed over a
        // connection and acknowledged.
        group.bench_function(BenchmarkId::new("put_remote_get", name), |b| {
            b.iter_custom(|iters| {
                let queue = Queue::<Blob>::bounded(64);
                let child = Process::spawn((queue.clone(), iters), drain_queue).unwrap();
                for i in 0..=iters {
                    queue.put(Blob(vec![i as u8; size])).unwrap();
                }
                Duration::from_nanos(child.join().unwrap())
            })
        });
    }
    group.finish();
}

fn pipe_throughput(c: &mut Criterion) {
    let mut group = c.benchmark_group("pipe_two_processes");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    for (size, name) in SIZES {
        if size >= 1 << 20 {
            group.throughput(Throughput::Bytes(size as u64));
        } else {
            group.throughput(Throughput::Elements(1));
        }
        baselines(&mut group, size, name);
        group.bench_function(BenchmarkId::new("send_recv", name), |b| {
            b.iter_custom(|iters| {
                let (sender, receiver) = Pipe::<Blob, ()>::one_way().unwrap();
                let child = Process::spawn((sender, size, iters + 1), fill_pipe).unwrap();
                black_box(receiver.recv().unwrap());
                let started = Instant::now();
                for _ in 0..iters {
                    black_box(receiver.recv().unwrap());
                }
                let elapsed = started.elapsed();
                child.join().unwrap();
                elapsed
            })
        });
    }
    group.finish();
}

fn spawn_join(c: &mut Criterion) {
    let mut group = c.benchmark_group("process");
    group.sample_size(30);
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("sequential_call", |b| b.iter(|| inc(black_box(1u64))));
    group.bench_function("rayon_spawn_join", |b| {
        b.iter(|| {
            let (tx, rx) = crossbeam_channel::bounded(1);
            rayon::spawn(move || tx.send(inc(black_box(1u64))).unwrap());
            rx.recv().unwrap()
        })
    });
    group.bench_function("spawn_join", |b| {
        b.iter(|| {
            Process::spawn(black_box(1u64), inc)
                .unwrap()
                .join()
                .unwrap()
        })
    });
    group.finish();
}

fn main() {
    multiproc::init(); // in a child process this runs its task and never returns
    let mut c = Criterion::default().configure_from_args();
    queue_throughput(&mut c);
    pipe_throughput(&mut c);
    spawn_join(&mut c);
    c.final_summary();
}
