//! What a job reports about itself: `JobStats`, the pool's totals, the trace file.

use std::path::Path;
use std::time::Duration;

use multiproc::Pool;

use crate::support::{pool_with_chunks, splitmix64};

fn spin(x: u64) -> u64 {
    // About 20 µs of work, so the workers' busy time is well above the clock.
    (0..2_000u64).fold(x, |acc, i| splitmix64(acc ^ i))
}

#[test]
fn job_stats_count_every_item_and_chunk_once() {
    let pool = pool_with_chunks(2, 100);
    assert!(pool.last_job_stats().unwrap().is_none());
    let got = pool.map(0..10_000u64, spin).unwrap();
    assert_eq!(got.len(), 10_000);
    let stats = pool.last_job_stats().unwrap().expect("a job ended");
    assert_eq!(stats.items, 10_000);
    assert_eq!(stats.chunks, 100);
    assert_eq!(stats.failed, 0);
    assert_eq!(stats.retries + stats.deaths + stats.timeouts, 0);
    assert_eq!(stats.workers.len(), 2);
    let chunks: u64 = stats.workers.iter().map(|w| w.chunks).sum();
    let items: u64 = stats.workers.iter().map(|w| w.items).sum();
    assert_eq!((chunks, items), (100, 10_000));
    // 10,000 encoded u64s went out and came back, with headers.
    assert!(stats.bytes_sent >= 10_000, "{stats:?}");
    assert!(stats.bytes_received >= 10_000, "{stats:?}");
    // The workers' own times fit in the job's wall time, and they were busy.
    for w in &stats.workers {
        assert!(
            w.busy() + w.waiting <= stats.wall,
            "{w:?} in {:?}",
            stats.wall
        );
        assert!(w.running > Duration::ZERO, "{w:?}");
    }
    let summary = stats.summary();
    assert!(summary.starts_with("10,000 items in "), "{summary}");
    assert!(summary.contains("running tasks"), "{summary}");
    assert!(summary.contains("advice"), "{summary}");
}

#[test]
fn the_pool_sums_its_jobs() {
    let pool = pool_with_chunks(2, 10);
    let sum = pool
        .map_reduce(0..1_000u64, splitmix64, || 0, u64::wrapping_add)
        .unwrap();
    assert_eq!(
        sum,
        (0..1_000u64).map(splitmix64).fold(0, u64::wrapping_add)
    );
    let reduce = pool.last_job_stats().unwrap().unwrap();
    assert_eq!((reduce.items, reduce.chunks), (1_000, 100));
    pool.map(0..500u64, splitmix64).unwrap();
    let totals = pool.stats().unwrap();
    assert_eq!(totals.jobs, 2);
    assert_eq!(totals.totals.items, 1_500);
    assert_eq!(totals.totals.chunks, 150);
    // The pool's own start is in its workers' start-up time.
    assert!(
        totals
            .totals
            .workers
            .iter()
            .all(|w| w.starting > Duration::ZERO),
        "{:?}",
        totals.totals.workers
    );
}

fn fails_on_13(x: u64) -> u64 {
    assert!(x != 13, "item 13 is refused");
    x
}

#[test]
fn skipped_items_count_as_done_and_failed() {
    let pool = pool_with_chunks(2, 10);
    let got = pool.map_skip(0..100u64, fails_on_13).unwrap();
    assert_eq!(got.results.len(), 99);
    let stats = pool.last_job_stats().unwrap().unwrap();
    assert_eq!(stats.items, 100);
    assert_eq!(stats.failed, 1);
    // The chunk holding item 13 ran again without it.
    assert_eq!(stats.retries, 1);
    assert!(
        stats.summary().contains("1 items failed"),
        "{}",
        stats.summary()
    );
}

/// Kills its own worker the first time it sees item 13 (a marker file remembers).
fn dies_once_on_13(dir: &String, x: u64) -> u64 {
    if x == 13
        && std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(Path::new(dir).join("died"))
            .is_ok()
    {
        // SAFETY: raising a signal in our own process has no memory effects.
        unsafe { libc::raise(libc::SIGKILL) };
    }
    x
}

#[test]
fn a_lost_worker_shows_as_a_death_a_retry_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let pool = pool_with_chunks(2, 10);
    let context = dir.path().to_string_lossy().into_owned();
    let got = pool.map_with(0..100u64, &context, dies_once_on_13).unwrap();
    assert_eq!(got, (0..100).collect::<Vec<_>>());
    let stats = pool.last_job_stats().unwrap().unwrap();
    assert_eq!(stats.items, 100);
    assert_eq!(stats.deaths, 1, "{stats:?}");
    assert!(stats.retries >= 1, "{stats:?}");
    assert_eq!(stats.restarts, 1, "{stats:?}");
    assert!(
        stats.summary().contains("1 workers lost"),
        "{}",
        stats.summary()
    );
}

fn events(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).expect("the trace file");
    serde_json::from_str::<Vec<serde_json::Value>>(&text).expect("the trace parses as JSON")
}

fn named<'a>(events: &'a [serde_json::Value], ph: &str, name: &str) -> Vec<&'a serde_json::Value> {
    events
        .iter()
        .filter(|e| e["ph"] == ph && e["name"].as_str().is_some_and(|n| n.starts_with(name)))
        .collect()
}

/// Two workers, chunks of `chunk_size`, a timeline written to `path`.
fn traced_pool(chunk_size: usize, path: &Path) -> Pool {
    Pool::builder()
        .workers(2)
        .chunk_size(chunk_size)
        .trace(path)
        .inherit_output(false)
        .build()
        .unwrap()
}

#[test]
fn the_trace_holds_a_slice_per_chunk_on_its_workers_track() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("timeline.json");
    {
        let pool = traced_pool(100, &path);
        pool.map(0..1_000u64, spin).unwrap();
        pool.map(0..500u64, spin).unwrap();
    }
    let events = events(&path);
    // Chunks are slices on worker tracks (1 and 2); the parent is track 0.
    let chunks: Vec<_> = events
        .iter()
        .filter(|e| e["ph"] == "X" && e["tid"].as_u64().is_some_and(|t| t > 0))
        .filter(|e| e["name"] != "start-up")
        .collect();
    assert_eq!(chunks.len(), 15, "{chunks:?}");
    let mut items: Vec<(u64, String)> = chunks
        .iter()
        .map(|e| {
            (
                e["args"]["job"].as_u64().unwrap(),
                e["args"]["items"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    items.sort();
    items.dedup();
    assert_eq!(items.len(), 15, "every chunk once");
    assert!(chunks.iter().all(|e| e["dur"].as_f64().unwrap() > 0.0));
    assert!(
        chunks
            .iter()
            .all(|e| e["args"]["bytes_sent"].as_f64().unwrap() > 0.0)
    );
    // A start-up slice and a name for each worker's track, a span per job.
    assert_eq!(named(&events, "X", "start-up").len(), 2);
    let tracks: Vec<_> = named(&events, "M", "thread_name")
        .iter()
        .map(|e| e["args"]["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        tracks.iter().any(|t| t.starts_with("worker 0 (pid ")),
        "{tracks:?}"
    );
    assert!(
        tracks.iter().any(|t| t.starts_with("worker 1 (pid ")),
        "{tracks:?}"
    );
    let jobs: Vec<_> = named(&events, "X", "job ")
        .into_iter()
        .filter(|e| e["tid"] == 0)
        .collect();
    assert_eq!(jobs.len(), 2);
    assert_eq!(jobs[0]["args"]["items"], 1_000.0);
}

#[test]
fn a_lost_worker_is_an_instant_on_its_track() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("timeline.json");
    {
        let pool = traced_pool(10, &path);
        let context = dir.path().to_string_lossy().into_owned();
        pool.map_with(0..100u64, &context, dies_once_on_13).unwrap();
    }
    let events = events(&path);
    let lost = named(&events, "i", "worker lost");
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert!(
        lost[0]["args"]["cause"]
            .as_str()
            .unwrap()
            .contains("SIGKILL")
    );
    assert!(!named(&events, "i", "chunk sent again").is_empty());
    // The replacement's start-up is on the trace too (in the lost worker's slot,
    // or in a new one when it started before the loss was handled).
    let startups = named(&events, "X", "start-up");
    assert_eq!(startups.len(), 3, "{startups:?}");
}

#[test]
fn a_pipeline_traces_each_stage_as_a_process_and_counts_each_stage() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pipeline.json");
    let pipeline = multiproc::Pipeline::new(0..1_000u64)
        .trace(&path)
        .inherit_output(false)
        .stage(2, splitmix64)
        .stage(1, |x: u64| x % 10);
    let stats = pipeline.stats();
    let got = pipeline.collect().unwrap();
    assert_eq!(got.len(), 1_000);
    let events = events(&path);
    let names: Vec<_> = named(&events, "M", "process_name")
        .iter()
        .map(|e| e["args"]["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["stage 1", "stage 2"]);
    let stages = stats.stages();
    assert_eq!(stages.len(), 2);
    assert!(stages.iter().all(|(_, s)| s.items == 1_000), "{stages:?}");
    assert_eq!(stats.stage(2).unwrap().workers.len(), 1);
}

#[test]
fn a_trace_file_that_cannot_be_created_is_named() {
    let err = Pool::builder()
        .workers(1)
        .trace("/nonexistent-dir/timeline.json")
        .build()
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("cannot create the trace file /nonexistent-dir/timeline.json: "),
        "{err}"
    );
}

/// For the progress tests, in a helper process whose stderr the test reads: a
/// pool asked for bars (or not: `MULTIPROC_PROGRESS` decides), a map that skips
/// item 13, and a worker lost once on item 13 of a second map.
pub(crate) fn helper_progress(asked: bool) {
    let pool = Pool::builder()
        .workers(2)
        .chunk_size(10)
        .progress(asked)
        .inherit_output(false)
        .build()
        .unwrap();
    let skipped = pool.map_skip(0..1_000u64, fails_on_13).unwrap();
    assert_eq!(skipped.results.len(), 999);
    let dir = tempfile::tempdir().unwrap();
    let context = dir.path().to_string_lossy().into_owned();
    let got = pool.map_with(0..500u64, &context, dies_once_on_13).unwrap();
    assert_eq!(got.len(), 500);
}

fn progress_lines(role: &str, progress: Option<&str>) -> Vec<String> {
    let mut command = crate::helpers::helper_command(role);
    command.env_remove("MULTIPROC_PROGRESS");
    if let Some(value) = progress {
        command.env("MULTIPROC_PROGRESS", value);
    }
    let out = command.output().expect("the helper ran");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    stderr.lines().map(str::to_owned).collect()
}

#[test]
fn forced_bars_end_with_one_line_per_job_that_counts_every_item() {
    // Stderr is a pipe here: bars are drawn only because the variable forces them.
    let lines = progress_lines("progress-unasked", Some("1"));
    let finals: Vec<_> = lines.iter().filter(|l| l.contains(" items in ")).collect();
    assert_eq!(finals.len(), 2, "{lines:#?}");
    assert!(finals[0].contains("done: 1000 items"), "{lines:#?}");
    assert!(finals[1].contains("done: 500 items"), "{lines:#?}");
    // While it ran, the first bar said how many failed, the second what was resent.
    assert!(
        lines.iter().any(|l| l.contains("1 failed")) || lines.len() == 2,
        "{lines:#?}"
    );
}

#[test]
fn bars_are_hidden_off_a_terminal_and_can_be_turned_off() {
    // Asked for, but stderr is not a terminal: nothing is drawn.
    assert_eq!(progress_lines("progress-asked", None), Vec::<String>::new());
    // Turned off by the variable even where they would be drawn.
    assert_eq!(
        progress_lines("progress-asked", Some("0")),
        Vec::<String>::new()
    );
    let mut command = crate::helpers::helper_command("progress-asked");
    let out = command
        .env("MULTIPROC_PROGRESS", "sometimes")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("MULTIPROC_PROGRESS") && stderr.contains("\"sometimes\""),
        "{stderr}"
    );
}

fn prints_its_item(x: u64) -> u64 {
    // A slow item, so the bar is drawn between the lines.
    let mut acc = x;
    for i in 0..200_000u64 {
        acc = splitmix64(acc ^ i);
    }
    println!("item {x} done");
    acc
}

/// For `workers_output_never_lands_on_a_bar`: a pool with a bar whose workers
/// print a line per item.
pub(crate) fn helper_progress_printing() {
    let pool = Pool::builder()
        .workers(2)
        .chunk_size(1)
        .progress(true)
        .build()
        .unwrap();
    pool.map(0..40u64, prints_its_item).unwrap();
}

#[test]
fn workers_output_never_lands_on_a_bar() {
    // Under a pseudo-terminal, so the bar is drawn; every line a worker printed
    // must start a line of the screen, never follow a bar's text.
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new("script")
        .args([
            "-qfec",
            &format!("{} --nocapture", exe.display()),
            "/dev/null",
        ])
        .env("MULTIPROC_TEST_HELPER_ROLE", "progress-printing")
        .env_remove("MULTIPROC_PROGRESS")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("script(1) runs (util-linux)");
    assert!(out.status.success(), "{out:?}");
    let screen = String::from_utf8_lossy(&out.stdout);
    let mut plain = String::new();
    let mut chars = screen.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // An escape sequence: ESC [ params letter.
            if chars.next_if_eq(&'[').is_some() {
                while chars.next().is_some_and(|c| !c.is_ascii_alphabetic()) {}
            }
            plain.push('\n');
        } else {
            plain.push(c);
        }
    }
    let segments: Vec<&str> = plain
        .split(['\r', '\n'])
        .filter(|s| s.contains("done"))
        .collect();
    let printed: Vec<&&str> = segments.iter().filter(|s| s.contains("item ")).collect();
    assert_eq!(printed.len(), 40, "{segments:#?}");
    for line in printed {
        assert!(
            line.trim_start().starts_with("item "),
            "a worker's line on a bar: {line:?}"
        );
    }
    assert!(
        segments.iter().any(|s| s.contains("job 1 done: 40 items")),
        "{segments:#?}"
    );
}

/// For `the_engine_logs_through_tracing`: a subscriber on stdout, a job whose
/// worker dies once on item 13, then the pool dropped.
pub(crate) fn helper_logs() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stdout)
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .init();
    let dir = tempfile::tempdir().unwrap();
    let pool = pool_with_chunks(2, 10);
    let context = dir.path().to_string_lossy().into_owned();
    pool.map_with(0..100u64, &context, dies_once_on_13).unwrap();
}

#[test]
fn the_engine_logs_through_tracing() {
    let out = crate::helpers::helper_command("logs").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let logs = String::from_utf8_lossy(&out.stdout);
    let lines = |what: &str| logs.lines().filter(|l| l.contains(what)).count();
    // Two workers at the start and the replacement, each with its pid.
    assert_eq!(lines("worker started"), 3, "{logs}");
    assert!(
        logs.lines()
            .filter(|l| l.contains("worker started"))
            .all(|l| l.contains(" pid=")),
        "{logs}"
    );
    assert_eq!(lines("worker lost"), 1, "{logs}");
    assert!(logs.contains("SIGKILL"), "{logs}");
    assert!(lines("chunk sent again") >= 1, "{logs}");
    assert!(
        lines("job started") >= 1 && lines("job ended") >= 1,
        "{logs}"
    );
}

#[test]
fn without_a_subscriber_the_engine_is_silent() {
    // The same job in a helper that installs nothing writes nothing of its own.
    let out = crate::helpers::helper_command("progress-asked")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{out:?}");
}
