//! Sizing the stages of a pipeline: a fast stage (parsing text records) feeds a slow
//! one (a costly computation per record). The slow stage sets the pace, so it should
//! get the workers; a fast stage needs one, and more only make processes wait.
//!
//! Run it with `cargo run --release --example pipeline_stages`. It times the same job
//! sequentially and with three sizings, and checks that every run gives the same
//! answer.

use std::time::Instant;

use multiproc::Pipeline;
use serde::{Deserialize, Serialize};

const RECORDS: u64 = 10_000;

/// Work per record in the slow stage (rounds of a hash chain, ~20 us).
const ROUNDS: u64 = 5_000;

/// A parsed record.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    id: u64,
    seed: u64,
    weight: u32,
}

/// The source: one line of text per record, as a file or a socket would give them.
fn line(id: u64) -> String {
    format!("{id},{:x},{}", splitmix64(id), id % 7 + 1)
}

/// The fast stage: parse a line.
fn parse(line: String) -> Record {
    let mut fields = line.split(',');
    let mut next = || fields.next().expect("three fields");
    Record {
        id: next().parse().expect("an id"),
        seed: u64::from_str_radix(next(), 16).expect("a hex seed"),
        weight: next().parse().expect("a weight"),
    }
}

/// The slow stage: a costly computation on one record.
fn score(record: Record) -> u64 {
    let mut x = record.seed;
    for _ in 0..ROUNDS {
        x = splitmix64(x);
    }
    (x % 1_000).wrapping_mul(u64::from(record.weight)) ^ record.id
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Runs the pipeline with `parsers` and `scorers` worker processes; returns the sum of
/// the scores and the most records that were in flight at once.
fn run(parsers: usize, scorers: usize) -> multiproc::Result<(u64, u64)> {
    let pipeline = Pipeline::new((0..RECORDS).map(line))
        // A fast stage runs ahead of a slow one only as far as this bound: the source
        // is read lazily, so memory stays bounded whatever the input's length.
        .stage_items(1_024)
        .stage(parsers, parse)
        .stage(scorers, score);
    let stats = pipeline.stats();
    let total = pipeline.reduce(|| 0, u64::wrapping_add)?;
    Ok((total, stats.peak_in_flight()))
}

fn main() -> multiproc::Result<()> {
    multiproc::init(); // first line of main: in a worker process it serves tasks and never returns
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());

    let started = Instant::now();
    let expected = (0..RECORDS)
        .map(|id| score(parse(line(id))))
        .fold(0, u64::wrapping_add);
    let sequential = started.elapsed().as_secs_f64();
    println!("{RECORDS} records: parse (fast), then score ({ROUNDS} rounds each, slow)");
    println!("sequential                              {sequential:6.3} s");

    let sizings = [
        (1, 1, "one worker per stage"),
        (cpus, 1, "workers on the fast stage (wrong)"),
        (1, cpus, "workers on the slow stage (right)"),
    ];
    for (parsers, scorers, what) in sizings {
        let started = Instant::now();
        let (total, peak) = run(parsers, scorers)?;
        let seconds = started.elapsed().as_secs_f64();
        assert_eq!(
            total, expected,
            "the pipeline computes the sequential answer"
        );
        println!(
            "parse x{parsers}, score x{scorers}: {what:<34} {seconds:6.3} s, {:4.2}x sequential, \
             at most {peak} records in flight",
            sequential / seconds
        );
    }
    println!("every run gave {expected:#018x}");
    Ok(())
}
