//! Where a job's time went: the tally the scheduler keeps while a job runs, and the
//! [`JobStats`] made from it when the job ends.
//!
//! Everything here is counted per chunk, never per item: a reply carries its
//! worker's measured time (`Timing`), the parent times its own reading of the
//! input and its delivery of results, and the supervisor times worker start-up.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use crate::wire::protocol::Timing;

/// What one job cost and where its time went, from [`Pool::last_job_stats`] once
/// a job has ended, or summed over the pool's jobs in [`PoolStats::totals`].
///
/// Times of workers are measured by the workers, per chunk: `waiting` is the time a
/// worker sat idle on its channel during the job; `decoding`, `running` and
/// `encoding` split the time it spent on the job's items (timed whole per chunk,
/// divided in the proportions measured phase by phase on the first eight items of
/// one chunk in eight; timing every item would cost more than a task of
/// nanoseconds); `starting` is the time spent
/// starting its process (replacements and recycling during the job). What the
/// worker times do not cover of `wall` is transport and scheduling.
///
/// [`Pool::last_job_stats`]: crate::Pool::last_job_stats
/// [`PoolStats::totals`]: crate::PoolStats::totals
///
/// # Examples
///
/// ```standalone_crate
/// fn main() -> multiproc::Result<()> {
///     multiproc::init();
///     let pool = multiproc::Pool::builder().workers(2).build()?;
///     let squares = pool.map(0..10_000u64, |x| x * x)?;
///     let stats = pool.last_job_stats()?.expect("a job ran");
///     assert_eq!(stats.items, squares.len() as u64);
///     println!("{}", stats.summary()); // where the time went, and what to change
///     Ok(())
/// }
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct JobStats {
    /// From the job's submission to its end (summed over jobs in totals).
    pub wall: Duration,
    /// Items whose outcome was delivered: results, and failures under an error
    /// policy that goes on.
    pub items: u64,
    /// Items that failed and were reported as failures (`map_collect`,
    /// `map_skip`, `ErrorPolicy::Skip`).
    pub failed: u64,
    /// Chunks answered by workers (a chunk sent again counts again).
    pub chunks: u64,
    /// Bytes of requests sent to workers: items, headers, re-sent chunks.
    pub bytes_sent: u64,
    /// Bytes of results received from workers.
    pub bytes_received: u64,
    /// Chunks sent again after their worker was lost or an item failed alone.
    pub retries: u64,
    /// Workers lost while they ran a chunk of this job.
    pub deaths: u64,
    /// Items that passed the pool's task timeout.
    pub timeouts: u64,
    /// Worker processes started while the job ran (replacements and recycling).
    pub restarts: u64,
    /// Time the parent spent reading the input iterator and encoding chunks.
    pub input: Duration,
    /// Time the parent spent decoding results and handing them on (reducing,
    /// collecting, sending to an `imap` consumer).
    pub output: Duration,
    /// Per worker slot, in slot order.
    pub workers: Vec<WorkerStats>,
}

/// One worker slot's share of a job (see [`JobStats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerStats {
    /// The worker's slot in its pool (a replacement keeps the slot).
    pub worker: usize,
    /// Chunks it answered (a fold stage's flushes are not chunks, though their
    /// time counts).
    pub chunks: u64,
    /// Items in those chunks.
    pub items: u64,
    /// Idle on its channel, waiting for work.
    pub waiting: Duration,
    /// Decoding items.
    pub decoding: Duration,
    /// Running the task (and folding results into a chunk's partial).
    pub running: Duration,
    /// Encoding results.
    pub encoding: Duration,
    /// Starting processes in this slot.
    pub starting: Duration,
}

impl WorkerStats {
    /// Time spent on items: decoding, running, encoding.
    pub fn busy(&self) -> Duration {
        self.decoding + self.running + self.encoding
    }

    fn add(&mut self, other: &WorkerStats) {
        self.chunks += other.chunks;
        self.items += other.items;
        self.waiting += other.waiting;
        self.decoding += other.decoding;
        self.running += other.running;
        self.encoding += other.encoding;
        self.starting += other.starting;
    }
}

impl JobStats {
    /// Adds another job's figures to these (the pool's totals).
    pub(crate) fn add(&mut self, other: &JobStats) {
        self.wall += other.wall;
        self.items += other.items;
        self.failed += other.failed;
        self.chunks += other.chunks;
        self.bytes_sent += other.bytes_sent;
        self.bytes_received += other.bytes_received;
        self.retries += other.retries;
        self.deaths += other.deaths;
        self.timeouts += other.timeouts;
        self.restarts += other.restarts;
        self.input += other.input;
        self.output += other.output;
        for w in &other.workers {
            slot(&mut self.workers, w.worker).add(w);
        }
    }

    /// The record of slot `worker`, added if missing.
    pub(crate) fn worker_mut(&mut self, worker: usize) -> &mut WorkerStats {
        slot(&mut self.workers, worker)
    }

    /// Sum of every worker's figures.
    fn all_workers(&self) -> WorkerStats {
        let mut all = WorkerStats::default();
        for w in &self.workers {
            all.add(w);
        }
        all
    }

    /// One screen saying where the job's time went and what to change: items and
    /// rate, how the workers' time divides (running tasks, decoding, encoding,
    /// waiting for work, starting, elsewhere), the parent's own share, faults, each
    /// worker, and advice drawn from those figures.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let wall = self.wall.as_secs_f64();
        let workers = self.workers.len().max(1);
        let rate = if wall > 0.0 {
            self.items as f64 / wall
        } else {
            0.0
        };
        let _ = writeln!(
            s,
            "{} items in {} ({}/s) on {} worker{}, {} chunks",
            count(self.items),
            seconds(self.wall),
            approx(rate),
            workers,
            if workers == 1 { "" } else { "s" },
            count(self.chunks),
        );
        let _ = writeln!(
            s,
            "sent {}, received {}",
            bytes(self.bytes_sent),
            bytes(self.bytes_received)
        );
        let all = self.all_workers();
        let capacity = wall * workers as f64;
        let pct = |d: Duration| {
            if capacity > 0.0 {
                100.0 * d.as_secs_f64() / capacity
            } else {
                0.0
            }
        };
        let accounted = all.busy() + all.waiting + all.starting;
        let elsewhere = (100.0 - pct(accounted)).max(0.0);
        let _ = writeln!(
            s,
            "worker time ({workers} x {}): {:.0}% running tasks, {:.0}% decoding items, \
             {:.0}% encoding results, {:.0}% waiting for work, {:.0}% starting, \
             {:.0}% elsewhere (transport, scheduling)",
            seconds(self.wall),
            pct(all.running),
            pct(all.decoding),
            pct(all.encoding),
            pct(all.waiting),
            pct(all.starting),
            elsewhere,
        );
        let share = |d: Duration| {
            if wall > 0.0 {
                100.0 * d.as_secs_f64() / wall
            } else {
                0.0
            }
        };
        let _ = writeln!(
            s,
            "parent: {} ({:.0}% of the wall time) reading and encoding the input, {} ({:.0}%) \
             decoding and handing on results",
            seconds(self.input),
            share(self.input),
            seconds(self.output),
            share(self.output),
        );
        if self.failed + self.retries + self.deaths + self.timeouts + self.restarts > 0 {
            let _ = writeln!(
                s,
                "faults: {} items failed, {} chunks sent again, {} workers lost, {} timeouts, \
                 {} workers started",
                self.failed, self.retries, self.deaths, self.timeouts, self.restarts
            );
        }
        for w in &self.workers {
            let _ = writeln!(
                s,
                "  worker {}: {} chunks, {} items, busy {}, waiting {}, starting {}",
                w.worker,
                count(w.chunks),
                count(w.items),
                seconds(w.busy()),
                seconds(w.waiting),
                seconds(w.starting),
            );
        }
        let advice = self.advice();
        if advice.is_empty() {
            let _ = writeln!(
                s,
                "advice: none; the workers spent {:.0}% of their time running tasks",
                pct(all.running)
            );
        } else {
            for line in advice {
                let _ = writeln!(s, "advice: {line}");
            }
        }
        s
    }

    /// What the figures suggest changing, most important first.
    fn advice(&self) -> Vec<String> {
        let mut advice = Vec::new();
        let wall = self.wall.as_secs_f64();
        if wall <= 0.0 || self.workers.is_empty() {
            return advice;
        }
        let all = self.all_workers();
        let capacity = wall * self.workers.len() as f64;
        let frac = |d: Duration| d.as_secs_f64() / capacity;
        let waiting = frac(all.waiting) + (1.0 - frac(all.busy() + all.waiting + all.starting));
        if self.deaths > 0 {
            advice.push(format!(
                "{} workers were lost during the job: their chunks ran again; see the \
                 errors or the trace for why (a memory limit, a crash in native code)",
                self.deaths
            ));
        }
        if self.timeouts > 0 {
            advice.push(format!(
                "{} items passed the task timeout and their workers were killed",
                self.timeouts
            ));
        }
        if self.chunks >= 8 {
            let per_chunk = all.busy().as_secs_f64() / self.chunks as f64;
            if per_chunk < 0.000_5 {
                advice.push(format!(
                    "chunks of {} of work each: every chunk costs a round trip of tens of \
                     microseconds; raise chunk_size (or leave it unset so chunks are sized \
                     to the task)",
                    seconds_f(per_chunk)
                ));
            }
        }
        if waiting > 0.2 {
            let input = self.input.as_secs_f64() / wall;
            let output = self.output.as_secs_f64() / wall;
            let lost = format!("workers were idle {:.0}% of the time", 100.0 * waiting);
            if input >= output && input > 0.4 {
                advice.push(format!(
                    "{lost} while the parent spent {:.0}% of the job reading and encoding the \
                     input: the input iterator is the bottleneck; make it cheaper, send less \
                     per item, or share large inputs (SharedSlice, Shared)",
                    100.0 * input
                ));
            } else if output > 0.4 {
                advice.push(format!(
                    "{lost} while the parent spent {:.0}% of the job decoding and handing on \
                     results: return smaller results, or reduce in the workers (map_reduce)",
                    100.0 * output
                ));
            } else if frac(all.starting) > 0.1 {
                advice.push(format!(
                    "{lost}, {:.0}% of it starting processes: keep the pool for more calls, \
                     or raise max_tasks_per_worker",
                    100.0 * frac(all.starting)
                ));
            } else if self.items < 4 * self.workers.len() as u64 {
                advice.push(format!(
                    "{lost}: {} items cannot keep {} workers busy",
                    self.items,
                    self.workers.len()
                ));
            } else {
                advice.push(format!(
                    "{lost}: the parent and the channels between it and the workers are the \
                     bottleneck; give each item more work"
                ));
            }
        }
        if all.decoding + all.encoding > all.running && all.busy() > Duration::ZERO {
            advice.push(format!(
                "decoding and encoding took {:.0}% of the workers' busy time, more than the \
                 task: do more work per item, return less, or share large inputs",
                100.0 * (all.decoding + all.encoding).as_secs_f64() / all.busy().as_secs_f64()
            ));
        }
        let busiest = self.workers.iter().map(WorkerStats::busy).max();
        let mean = all.busy() / u32::try_from(self.workers.len()).unwrap_or(u32::MAX);
        if let Some(busiest) = busiest
            && self.workers.len() > 1
            && mean > Duration::ZERO
            && busiest.as_secs_f64() > 1.5 * mean.as_secs_f64()
            && busiest > Duration::from_millis(10)
        {
            advice.push(format!(
                "a straggler: the busiest worker ran {} against a mean of {}; smaller chunks \
                 spread uneven items more evenly",
                seconds(busiest),
                seconds(mean)
            ));
        }
        advice
    }
}

/// The record of `worker` in `workers`, added if missing (slots in order).
fn slot(workers: &mut Vec<WorkerStats>, worker: usize) -> &mut WorkerStats {
    while workers.len() <= worker {
        let next = workers.len();
        workers.push(WorkerStats {
            worker: next,
            ..WorkerStats::default()
        });
    }
    &mut workers[worker]
}

/// What the scheduler counts for one job while it runs.
pub(crate) struct Tally {
    pub(crate) started: Instant,
    pub(crate) stats: JobStats,
    /// Workers started and per-slot start-up time when the job began, so the job
    /// is given only what happened while it ran.
    restarts_before: u64,
    starting_before: Vec<Duration>,
}

impl Tally {
    pub(crate) fn new(restarts_before: u64, starting_before: Vec<Duration>) -> Self {
        Self {
            started: Instant::now(),
            stats: JobStats::default(),
            restarts_before,
            starting_before,
        }
    }

    /// A worker's reply for `items` items with its measured `timing`, `received`
    /// payload bytes; the wait is bounded so that the worker's times add up to at
    /// most the job's age (a worker idle before the job began did not wait for it).
    pub(crate) fn answered(
        &mut self,
        worker: usize,
        items: usize,
        timing: Timing,
        received: usize,
    ) {
        let age = nanos(self.started.elapsed());
        let w = slot(&mut self.stats.workers, worker);
        // A fold job's flush answers no items: time, not a chunk.
        if items > 0 {
            w.chunks += 1;
        }
        w.items += items as u64;
        w.decoding += Duration::from_nanos(timing.decode);
        w.running += Duration::from_nanos(timing.task);
        w.encoding += Duration::from_nanos(timing.encode);
        // Whatever the worker's clock says, its time in this job fits in the job's
        // age: the wait before its first chunk may have begun before the job did.
        let waited = timing
            .wait
            .min(age.saturating_sub(nanos(w.waiting + w.busy())));
        w.waiting += Duration::from_nanos(waited);
        if items > 0 {
            self.stats.chunks += 1;
        }
        self.stats.bytes_received += received as u64;
    }

    /// The job's figures now, given the pool's `workers` slots, its workers
    /// started so far and each slot's start-up time so far.
    pub(crate) fn snapshot(
        &self,
        workers: usize,
        restarts: u64,
        starting: &[Duration],
    ) -> JobStats {
        let mut stats = self.stats.clone();
        stats.wall = self.started.elapsed();
        stats.restarts = restarts.saturating_sub(self.restarts_before);
        if workers > 0 {
            slot(&mut stats.workers, workers - 1);
        }
        for (worker, &total) in starting.iter().enumerate() {
            let before = self
                .starting_before
                .get(worker)
                .copied()
                .unwrap_or_default();
            if total > before {
                slot(&mut stats.workers, worker).starting = total - before;
            }
        }
        stats
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// `12,345,678`.
fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `8.1 M`, `950 k`, `12`: a rate or a count as people write it (progress bars too).
pub(crate) fn approx(n: f64) -> String {
    if n >= 1e9 {
        format!("{:.1} G", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1} M", n / 1e6)
    } else if n >= 1e4 {
        format!("{:.0} k", n / 1e3)
    } else {
        format!("{n:.0}")
    }
}

fn seconds(d: Duration) -> String {
    seconds_f(d.as_secs_f64())
}

/// `1.23 s`, `45.6 ms`, `120 µs`.
fn seconds_f(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 1e-3 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{:.0} µs", s * 1e6)
    }
}

/// `76.3 MiB`.
fn bytes(n: u64) -> String {
    let n = n as f64;
    if n >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", n / (1u64 << 30) as f64)
    } else if n >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", n / (1u64 << 20) as f64)
    } else if n >= 1024.0 {
        format!("{:.1} KiB", n / 1024.0)
    } else {
        format!("{n} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(worker: usize, running: u64, waiting: u64) -> WorkerStats {
        WorkerStats {
            worker,
            chunks: 10,
            items: 1_000,
            running: Duration::from_millis(running),
            waiting: Duration::from_millis(waiting),
            ..WorkerStats::default()
        }
    }

    #[test]
    fn a_job_starved_by_its_input_is_told_so() {
        let stats = JobStats {
            wall: Duration::from_secs(1),
            items: 2_000,
            chunks: 20,
            input: Duration::from_millis(900),
            workers: vec![worker(0, 300, 650), worker(1, 300, 650)],
            ..JobStats::default()
        };
        let summary = stats.summary();
        assert!(summary.contains("30% running tasks"), "{summary}");
        assert!(summary.contains("65% waiting for work"), "{summary}");
        assert!(
            summary.contains("the input iterator is the bottleneck"),
            "{summary}"
        );
    }

    #[test]
    fn tiny_chunks_are_told_to_grow_and_a_busy_job_gets_no_advice() {
        let tiny = JobStats {
            wall: Duration::from_millis(100),
            items: 100_000,
            chunks: 1_000,
            workers: vec![worker(0, 95, 0), worker(1, 95, 0)],
            ..JobStats::default()
        };
        assert!(
            tiny.summary().contains("raise chunk_size"),
            "{}",
            tiny.summary()
        );
        let busy = JobStats {
            wall: Duration::from_secs(1),
            items: 1_000,
            chunks: 10,
            workers: vec![worker(0, 990, 0), worker(1, 985, 0)],
            ..JobStats::default()
        };
        assert!(
            busy.summary().contains("advice: none"),
            "{}",
            busy.summary()
        );
    }

    #[test]
    fn totals_add_up_by_slot() {
        let mut total = JobStats::default();
        let job = JobStats {
            items: 5,
            workers: vec![worker(0, 1, 0), worker(1, 2, 0)],
            ..JobStats::default()
        };
        total.add(&job);
        total.add(&job);
        assert_eq!(total.items, 10);
        assert_eq!(total.workers[1].running, Duration::from_millis(4));
        assert_eq!(total.workers[1].worker, 1);
    }

    #[test]
    fn a_wait_from_before_the_job_is_not_the_jobs() {
        let mut tally = Tally::new(0, Vec::new());
        let timing = Timing {
            wait: u64::MAX / 2,
            decode: 1,
            task: 2,
            encode: 3,
        };
        tally.answered(1, 4, timing, 10);
        let stats = tally.snapshot(2, 0, &[]);
        assert!(stats.workers[1].waiting <= stats.wall);
        assert_eq!(stats.workers.len(), 2);
        assert_eq!(stats.chunks, 1);
        assert_eq!(stats.bytes_received, 10);
    }

    #[test]
    fn numbers_read_as_people_write_them() {
        assert_eq!(count(12_345_678), "12,345,678");
        assert_eq!(count(999), "999");
        assert_eq!(seconds_f(0.000_12), "120 µs");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
    }
}
