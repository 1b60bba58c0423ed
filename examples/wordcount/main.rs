//! The project's main job: counts the words of every regular file under a directory
//! in a pipeline of worker processes, and prints the most frequent ones.
//!
//! ```sh
//! cargo run --release --example wordcount               # on the built-in corpus (~200 MB)
//! cargo run --release --example wordcount -- ~/src      # on a tree of your own
//! cargo run --release --example wordcount -- --json DIR # one JSON object
//! cargo run --release --example wordcount -- --stats --trace /tmp/wc.json  # where the time went
//! cargo run --release --example wordcount -- --checkpoint /tmp/wc.ckpt     # resumable
//! ```
//!
//! The parent lists the files (symlinks are not followed) and cuts them into batches
//! of a few MiB; a fold stage of workers reads each batch it is given and counts its
//! words into one map per worker, kept across batches; the parent merges the
//! workers' maps at the end. A word is a maximal run of `[a-z0-9_]` after
//! lower-casing ASCII `A-Z`; any other byte separates words. Files that cannot be read are counted and
//! named on stderr, never fatal. Exit status: 0 when counted, 1 when the directory
//! cannot be counted (or `--check` finds a difference), 2 for bad arguments.

mod cli;
mod count;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;

use crate::cli::Args;
use crate::count::{Shape, Tally};

fn main() -> ExitCode {
    multiproc::init(); // first line of main: in a worker process it serves tasks and never returns
    let args = Args::parse();
    match run(&args) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("wordcount: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<ExitCode, String> {
    let dir = match &args.dir {
        Some(dir) => dir.clone(),
        None => default_corpus(args.json)?,
    };
    let meta = std::fs::metadata(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !meta.is_dir() {
        return Err(format!("{}: not a directory", dir.display()));
    }
    let mut shape = Shape {
        batch_bytes: args.batch_kib.max(1) << 10,
        ..Shape::default()
    };
    if let Some(workers) = args.workers {
        shape.count_workers = workers;
    }

    let watch = count::Watch {
        progress: !args.no_progress,
        trace: args.trace.clone(),
    };
    let started = Instant::now();
    let (tally, figures) = match &args.checkpoint {
        Some(file) => {
            let (tally, stats) = count::count_tree_checkpointed(&dir, shape, &watch, file)
                .map_err(|e| format!("{}: {e}", dir.display()))?;
            (
                tally,
                stats.map(|s| vec![("the checkpointed count".to_string(), s)]),
            )
        }
        None => {
            let (tally, stats) = count::count_tree_watched(&dir, shape, &watch)
                .map_err(|e| format!("{}: {e}", dir.display()))?;
            let stages = stats.stages().into_iter();
            (
                tally,
                Some(stages.map(|(n, s)| (format!("stage {n}"), s)).collect()),
            )
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    if args.stats {
        for (name, stats) in figures.unwrap_or_default() {
            eprintln!("{name}:\n{}", stats.summary());
        }
    }

    for u in &tally.unreadable {
        eprintln!("wordcount: could not read {}: {}", u.path, u.error);
    }
    if args.json {
        print_json(&tally, args.top, seconds);
    } else {
        print_text(&dir, &tally, args.top, seconds, shape);
    }

    if args.check {
        let started = Instant::now();
        let reference = count::count_tree_sequential(&dir, shape.batch_bytes);
        let sequential = started.elapsed().as_secs_f64();
        if let Some(difference) = first_difference(&tally, &reference) {
            eprintln!("wordcount: the sequential count differs: {difference}");
            return Ok(ExitCode::FAILURE);
        }
        if !args.json {
            println!(
                "check: the sequential count agrees ({sequential:.2} s, {:.1} MB/s; {:.2}x)",
                reference.bytes as f64 / sequential / 1e6,
                sequential / seconds
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The built-in corpus, written first if needed.
fn default_corpus(quiet: bool) -> Result<PathBuf, String> {
    let dir = count::default_corpus_dir();
    let started = Instant::now();
    let (text, written) = count::corpus::ensure(&dir)
        .map_err(|e| format!("default corpus {}: {e}", dir.display()))?;
    if written && !quiet {
        eprintln!(
            "wordcount: wrote the default corpus to {} in {:.1} s",
            text.display(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(text)
}

fn print_text(dir: &std::path::Path, tally: &Tally, top: usize, seconds: f64, shape: Shape) {
    println!("top {top} words in {}:", dir.display());
    let top = count::top(&tally.counts, top);
    let width = top.iter().map(|(w, _)| w.len()).max().unwrap_or(0);
    for (rank, (word, n)) in top.iter().enumerate() {
        println!("{:>4}  {word:<width$}  {n:>12}", rank + 1);
    }
    println!(
        "files {} ({} unreadable), bytes {}, words {}, distinct {}",
        tally.files,
        tally.unreadable.len(),
        tally.bytes,
        tally.words,
        tally.counts.len()
    );
    println!(
        "{seconds:.2} s, {:.1} MB/s ({}, each reading and counting)",
        tally.bytes as f64 / seconds / 1e6,
        cli::worker_processes(shape.count_workers)
    );
}

fn print_json(tally: &Tally, top: usize, seconds: f64) {
    let value = serde_json::json!({
        "files": tally.files,
        "bytes": tally.bytes,
        "words": tally.words,
        "distinct": tally.counts.len(),
        "top": count::top(&tally.counts, top),
        "seconds": seconds,
        "unreadable": tally.unreadable.len(),
    });
    println!("{value}");
}

/// What differs between two tallies, if anything.
fn first_difference(a: &Tally, b: &Tally) -> Option<String> {
    let totals = |t: &Tally| {
        (
            t.files,
            t.bytes,
            t.words,
            t.counts.len(),
            t.unreadable.len(),
        )
    };
    if totals(a) != totals(b) {
        return Some(format!(
            "(files, bytes, words, distinct, unreadable) {:?} against {:?}",
            totals(a),
            totals(b)
        ));
    }
    a.counts
        .iter()
        .find(|(word, n)| b.counts.get(*word) != Some(n))
        .map(|(word, n)| format!("{word:?}: {n} against {:?}", b.counts.get(word)))
}
