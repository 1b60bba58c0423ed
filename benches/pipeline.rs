//! Pipelines: W4 (500 000 generated lines, words counted per batch, merged in the
//! parent) and W6 (the word count over the built-in corpus), each group with a
//! sequential baseline and the same job on rayon threads fed through crossbeam
//! channels beside multiproc: as it runs now (fold stages), and as it ran before
//! (per-chunk `Stage::reduce`, suffix `per_chunk_reduce`) for comparison. Run with `cargo bench --bench pipeline`.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use rayon::prelude::*;
use rustc_hash::FxHashMap;

#[path = "../examples/wordcount/count.rs"]
mod count;

use count::{BatchCounts, Shape, Tally, corpus::sm};

// ---- W4: the workload definitions' pipeline ----

const W4_BATCHES: u64 = 500;
const W4_LINES_PER_BATCH: u64 = 1_000;

/// W4's vocabulary: `word(j)` is three syllables, the digits of `j`.
fn w4_word(j: u64) -> [u8; 6] {
    const SYL: [&[u8; 2]; 10] = [
        b"ba", b"ce", b"di", b"fo", b"gu", b"ha", b"je", b"ki", b"lo", b"mu",
    ];
    let (a, b, c) = (
        SYL[(j / 100) as usize],
        SYL[(j / 10 % 10) as usize],
        SYL[(j % 10) as usize],
    );
    [a[0], a[1], b[0], b[1], c[0], c[1]]
}

/// The producer: batch `b` of W4, 1 000 lines.
fn w4_batch(b: u64) -> String {
    let mut out = Vec::with_capacity(90 * W4_LINES_PER_BATCH as usize);
    for n in b * W4_LINES_PER_BATCH..(b + 1) * W4_LINES_PER_BATCH {
        let words = 5 + sm(n) % 16;
        for k in 0..words {
            let u = sm((1 << 40) + 32 * n + k);
            let j = ((u % 1000) * ((u >> 32) % 1000)) / 1000;
            if k > 0 {
                out.push(b' ');
            }
            out.extend_from_slice(&w4_word(j));
        }
        out.push(b'\n');
    }
    String::from_utf8(out).expect("W4 text is ASCII")
}

/// The consumer: counts a batch's words, split on ASCII whitespace.
fn w4_count(batch: String) -> Tally {
    let mut words = 0;
    let mut counts: FxHashMap<&str, u64> = FxHashMap::default();
    for word in batch.split_ascii_whitespace() {
        words += 1;
        *counts.entry(word).or_insert(0) += 1;
    }
    Tally::of_batch(words, BatchCounts::from_counts(counts))
}

/// The consumer as a fold: adds a batch's words to a worker's tally, kept across
/// batches, so no map is built, sent or merged per batch.
fn w4_count_into(mut tally: Tally, batch: String) -> Tally {
    for word in batch.split_ascii_whitespace() {
        tally.words += 1;
        match tally.counts.get_mut(word) {
            Some(n) => *n += 1,
            None => {
                tally.counts.insert(word.to_owned(), 1);
            }
        }
    }
    tally
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The workload definitions' order-independent checksum of a word count.
fn count_checksum<'a>(counts: impl Iterator<Item = (&'a String, &'a u64)>) -> u64 {
    counts.fold(0, |sum, (w, &c)| {
        sum.wrapping_add(sm(fnv1a64(w.as_bytes()) ^ c))
    })
}

fn w4_check(name: &str, tally: Tally) {
    let tally = tally.finish();
    let counts = &tally.counts;
    assert_eq!(tally.words, 6_247_767, "{name}: W4 words");
    assert_eq!(counts.values().sum::<u64>(), 6_247_767, "{name}: W4 words");
    assert_eq!(counts.len(), 999, "{name}: W4 distinct words");
    let checksum = count_checksum(counts.iter());
    assert_eq!(checksum, 0xdae1_5e0b_38d0_c4b4, "{name}: W4 checksum");
}

fn w4_sequential() -> Tally {
    (0..W4_BATCHES)
        .map(|b| w4_count(w4_batch(b)))
        .fold(Tally::default(), Tally::merge)
}

/// A producer thread feeds a bounded crossbeam channel; rayon threads count.
fn w4_rayon_channels() -> Tally {
    let (tx, rx) = crossbeam_channel::bounded(16);
    let producer = std::thread::spawn(move || {
        for b in 0..W4_BATCHES {
            tx.send(w4_batch(b)).expect("consumers alive");
        }
    });
    let tally = rx
        .into_iter()
        .par_bridge()
        .map(w4_count)
        .reduce(Tally::default, Tally::merge);
    producer.join().expect("producer");
    tally
}

/// The producer is a stage of one worker; a fold stage of two workers counts into
/// one tally each; the parent merges the two.
fn w4_multiproc() -> Tally {
    multiproc::Pipeline::new(0..W4_BATCHES)
        .unordered()
        .stage(1, w4_batch)
        .fold_stage(2, Tally::default, w4_count_into)
        .reduce(Tally::default, Tally::merge)
        .expect("W4 runs")
}

/// The producer runs in the parent, as the pipeline's source.
fn w4_multiproc_source_in_parent() -> Tally {
    multiproc::Pipeline::new((0..W4_BATCHES).map(w4_batch))
        .fold_stage(2, Tally::default, w4_count_into)
        .reduce(Tally::default, Tally::merge)
        .expect("W4 runs")
}

/// One stage: each worker of the fold stage generates the batches it is given and
/// counts them, so no text crosses a process boundary.
fn w4_multiproc_generate_in_fold() -> Tally {
    multiproc::Pipeline::new(0..W4_BATCHES)
        .fold_stage(2, Tally::default, w4_generate_and_count_into)
        .reduce(Tally::default, Tally::merge)
        .expect("W4 runs")
}

fn w4_generate_and_count_into(tally: Tally, b: u64) -> Tally {
    w4_count_into(tally, w4_batch(b))
}

/// As before the fold stage: each chunk of batches is counted into per-batch maps,
/// merged in the worker (`Stage::reduce`), sent and merged in the parent.
fn w4_multiproc_per_chunk() -> Tally {
    multiproc::Pipeline::new(0..W4_BATCHES)
        .unordered()
        .stage(1, w4_batch)
        .stage(2, w4_count)
        .reduce(Tally::default, Tally::merge)
        .expect("W4 runs")
}

fn w4_pipeline(c: &mut Criterion) {
    type Run = fn() -> Tally;
    let runs: [(&str, Run); 6] = [
        ("sequential", w4_sequential),
        ("rayon_crossbeam", w4_rayon_channels),
        ("multiproc", w4_multiproc),
        ("multiproc_source_in_parent", w4_multiproc_source_in_parent),
        ("multiproc_generate_in_fold", w4_multiproc_generate_in_fold),
        ("multiproc_per_chunk_reduce", w4_multiproc_per_chunk),
    ];
    for (name, run) in runs {
        w4_check(name, run());
    }
    let mut group = c.benchmark_group("w4_pipeline");
    group.throughput(Throughput::Elements(W4_BATCHES * W4_LINES_PER_BATCH));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(8));
    for (name, run) in runs {
        group.bench_function(BenchmarkId::new(name, "500k_lines"), |b| {
            b.iter(|| black_box(run()))
        });
    }
    group.finish();
}

// ---- W6: the word count over the built-in corpus ----

/// Rayon threads read and count the batches a listing thread sends them through a
/// bounded crossbeam channel.
fn w6_rayon_channels(root: &Path, batch_bytes: u64) -> Tally {
    let (tx, rx) = crossbeam_channel::bounded(8);
    let root = root.to_path_buf();
    let lister = std::thread::spawn(move || {
        let errors = std::rc::Rc::default();
        for batch in count::Listing::new(&root, batch_bytes, errors) {
            tx.send(batch).expect("readers alive");
        }
    });
    let tally = rx
        .into_iter()
        .par_bridge()
        .map(|batch| count::count_batch(count::read_batch(batch)))
        .reduce(Tally::default, Tally::merge);
    lister.join().expect("lister");
    tally.finish()
}

fn w6_wordcount(c: &mut Criterion) {
    let (root, _) = count::corpus::ensure(&count::default_corpus_dir()).expect("the corpus");
    let root: PathBuf = root;
    let batch_bytes = count::BATCH_BYTES;
    let shape = Shape {
        read_workers: 1,
        count_workers: 2,
        batch_bytes,
        inherit_output: true,
    };
    let reference = count::count_tree_sequential(&root, batch_bytes);
    let same = |t: &Tally| {
        assert_eq!(
            (t.files, t.bytes, t.words),
            (reference.files, reference.bytes, reference.words)
        );
        assert_eq!(t.counts, reference.counts);
    };
    same(&w6_rayon_channels(&root, batch_bytes));
    same(&count::count_tree(&root, shape).expect("the word count runs"));
    same(&count::count_tree_two_stages(&root, shape).expect("the word count runs"));
    same(&count::count_tree_per_chunk(&root, shape).expect("the word count runs"));

    let mut group = c.benchmark_group("w6_wordcount");
    group.throughput(Throughput::Bytes(reference.bytes));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    let id =
        |name: &str| BenchmarkId::new(name, format!("corpus_{}MB", reference.bytes / 1_000_000));
    group.bench_function(id("sequential"), |b| {
        b.iter(|| count::count_tree_sequential(black_box(&root), batch_bytes))
    });
    group.bench_function(id("rayon_crossbeam"), |b| {
        b.iter(|| w6_rayon_channels(black_box(&root), batch_bytes))
    });
    group.bench_function(id("multiproc"), |b| {
        b.iter(|| count::count_tree(black_box(&root), shape).expect("the word count runs"))
    });
    group.bench_function(id("multiproc_two_stage_fold"), |b| {
        b.iter(|| {
            count::count_tree_two_stages(black_box(&root), shape).expect("the word count runs")
        })
    });
    group.bench_function(id("multiproc_per_chunk_reduce"), |b| {
        b.iter(|| {
            count::count_tree_per_chunk(black_box(&root), shape).expect("the word count runs")
        })
    });
    group.finish();
}

fn main() {
    multiproc::init(); // in a worker process this serves tasks and never returns
    let mut c = Criterion::default().configure_from_args();
    w4_pipeline(&mut c);
    w6_wordcount(&mut c);
    c.final_summary();
}
