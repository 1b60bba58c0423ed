//! The `wordcount` example's command line: its arguments, and the words of its report
//! that depend on them; shared with its tests.

// Each program that includes this file uses its own part of it.
#![allow(dead_code)]

use std::path::PathBuf;

use clap::Parser;

/// Counts words in every regular file under a directory, in worker processes.
#[derive(Parser)]
#[command(name = "wordcount")]
pub(crate) struct Args {
    /// The directory to count (default: a generated corpus of about 200 MB, written
    /// under the temp dir on first use and reused).
    pub(crate) dir: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub(crate) json: bool,
    /// How many words to list.
    #[arg(long, default_value_t = 20)]
    pub(crate) top: usize,
    /// Worker processes, each reading and counting batches, at least 1 (default: one
    /// per CPU).
    // Refused rather than raised to 1: a count run with another number of workers
    // than asked for would be measured and reported as if it were the one asked for.
    #[arg(long, value_parser = at_least_one_worker)]
    pub(crate) workers: Option<usize>,
    /// KiB of text per batch, the counting stage's unit of work.
    #[arg(long, default_value_t = super::count::BATCH_BYTES >> 10)]
    pub(crate) batch_kib: u64,
    /// Count a second time in this process, one batch after another, and check that
    /// both counts agree (exit status 1 if not).
    #[arg(long)]
    pub(crate) check: bool,
    /// Draw a progress bar on stderr (the default when stderr is a terminal; set
    /// MULTIPROC_PROGRESS=1 to draw it anyway).
    #[arg(long, overrides_with = "no_progress")]
    pub(crate) progress: bool,
    /// Draw no progress bar.
    #[arg(long)]
    pub(crate) no_progress: bool,
    /// Print where the time went, stage by stage, on stderr after the count.
    #[arg(long)]
    pub(crate) stats: bool,
    /// Write the count's timeline to FILE, a Chrome trace-event file: open it in
    /// https://ui.perfetto.dev or chrome://tracing.
    #[arg(long, value_name = "FILE")]
    pub(crate) trace: Option<PathBuf>,
    /// Make the count resumable: record each counted chunk in FILE, and skip what
    /// FILE records when run again on the same tree (after a kill, say). Counts in
    /// a checkpointed map_reduce instead of the fold stage (slower: one partial map
    /// per chunk). Delete FILE to count afresh.
    #[arg(long, value_name = "FILE")]
    pub(crate) checkpoint: Option<PathBuf>,
}

/// The value of `--workers`: a number of processes, at least 1. (clap's ranged
/// parser would say "0 is not in 1..18446744073709551615".)
fn at_least_one_worker(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(0) => Err("the count needs at least 1 worker process".to_string()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// "1 worker process", "2 worker processes": the number of workers in words.
pub(crate) fn worker_processes(n: usize) -> String {
    match n {
        1 => "1 worker process".to_string(),
        n => format!("{n} worker processes"),
    }
}
