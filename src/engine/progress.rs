//! Progress bars on stderr, drawn by the parent (never by workers) with
//! `indicatif`: one bar per job (per stage for a pipeline), updated once per
//! delivered chunk, left as one final line when the job ends.
//!
//! A bar is drawn only when stderr is a terminal, unless forced
//! (`MULTIPROC_PROGRESS=1`): then a program whose stderr is a file or a pipe gets
//! a line per job at most once a second instead, and its final line.

use std::cell::Cell;
use std::fmt;
use std::io::{self, BufRead, BufReader, Write};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::engine::stats::approx;
use crate::os::spawn::RelayWriters;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

/// The bars of one pool, or of every stage of a pipeline.
#[derive(Clone)]
pub(crate) enum Bars {
    /// Drawn by indicatif on the terminal (hidden by it when stderr is not one).
    Drawn(MultiProgress),
    /// Forced on a stderr that is not a terminal: a line per bar at most once a
    /// second, and a final line.
    Lines,
}

impl fmt::Debug for Bars {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Bars::Drawn(_) => "Bars::Drawn",
            Bars::Lines => "Bars::Lines",
        })
    }
}

/// One job's bar.
pub(crate) enum Bar {
    Drawn(ProgressBar),
    Lines {
        label: String,
        total: Option<usize>,
        started: Instant,
        last: Cell<Instant>,
    },
}

/// How often a forced bar on a non-terminal writes a line.
const LINE_EVERY: Duration = Duration::from_secs(1);

impl Bars {
    /// Bars on stderr; `forced` draws them even when stderr is not a terminal.
    pub(crate) fn new(forced: bool) -> Self {
        if forced && !io::IsTerminal::is_terminal(&io::stderr()) {
            return Bars::Lines;
        }
        Bars::Drawn(MultiProgress::with_draw_target(ProgressDrawTarget::stderr()))
    }

    /// Whether bars of this set are drawn anywhere.
    pub(crate) fn hidden(&self) -> bool {
        match self {
            Bars::Drawn(multi) => multi.is_hidden(),
            Bars::Lines => false,
        }
    }

    /// A bar for a job named `label`, of `total` items when that is known.
    pub(crate) fn bar(&self, label: &str, total: Option<usize>) -> Bar {
        let multi = match self {
            Bars::Drawn(multi) => multi,
            Bars::Lines => {
                return Bar::Lines {
                    label: label.to_owned(),
                    total,
                    started: Instant::now(),
                    last: Cell::new(Instant::now()),
                };
            }
        };
        // Made hidden and then given to the set: a bar made on stderr would draw
        // itself once there, outside the set, and leave that line behind.
        let (bar, template) = match total {
            Some(total) => (
                ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::hidden()),
                "{prefix} [{bar:30}] {human_pos}/{human_len} items, {rate}, {elapsed} elapsed, \
                 ETA {eta}{msg}",
            ),
            None => (
                ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden()),
                "{prefix} {human_pos} items, {rate}, {elapsed} elapsed{msg}",
            ),
        };
        let bar = multi.add(bar);
        bar.set_style(
            ProgressStyle::with_template(template)
                .expect("a valid template")
                .with_key("rate", |state: &ProgressState, w: &mut dyn fmt::Write| {
                    let _ = write!(w, "{} items/s", approx(state.per_sec()));
                })
                .progress_chars("=> "),
        );
        bar.set_prefix(label.to_owned());
        Bar::Drawn(bar)
    }
}

impl Bar {
    /// Items done so far, with failures and retries when there are any.
    pub(crate) fn update(&self, done: u64, failed: u64, retries: u64) {
        let faults = if failed + retries > 0 {
            format!(", {failed} failed, {retries} chunks sent again")
        } else {
            String::new()
        };
        match self {
            Bar::Drawn(bar) => {
                if !faults.is_empty() {
                    bar.set_message(faults);
                }
                bar.set_position(done);
            }
            Bar::Lines {
                label,
                total,
                started,
                last,
            } => {
                if last.get().elapsed() < LINE_EVERY {
                    return;
                }
                last.set(Instant::now());
                let elapsed = started.elapsed().as_secs_f64();
                let of = total.map_or_else(String::new, |t| format!("/{t}"));
                eprintln!(
                    "{label} {done}{of} items, {} items/s, {elapsed:.0} s elapsed{faults}",
                    approx(done as f64 / elapsed.max(1e-9))
                );
            }
        }
    }

    /// Leaves the bar as its final line: how far it got and how it ended.
    pub(crate) fn finish(&self, done: u64, wall: Duration, outcome: &str) {
        let line = format!(
            "{outcome}: {done} items in {:.2} s ({} items/s)",
            wall.as_secs_f64(),
            approx(done as f64 / wall.as_secs_f64().max(1e-9))
        );
        match self {
            Bar::Drawn(bar) => {
                bar.set_style(
                    ProgressStyle::with_template("{prefix} {msg}").expect("a valid template"),
                );
                bar.finish_with_message(line);
            }
            Bar::Lines { label, .. } => eprintln!("{label} {line}"),
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if let Bar::Drawn(bar) = self
            && !bar.is_finished()
        {
            bar.abandon();
        }
    }
}

/// Copies the workers' output to this process's stdout and stderr a line at a
/// time, taking the bars down while each line is written, so that no output lands
/// on a bar's line. Made only while bars are drawn on a terminal.
pub(crate) struct Relay {
    /// One message per copying thread, when it has seen the end of its pipe.
    done: mpsc::Receiver<()>,
    threads: usize,
}

/// How long dropping a pool waits for the last of its workers' output.
const RELAY_DRAIN: Duration = Duration::from_millis(200);

impl Relay {
    /// A relay for `bars`, and the pipes a pool's workers are to write to; `None`
    /// when the bars are not drawn (output then goes straight to the terminal).
    pub(crate) fn start(bars: &Bars) -> io::Result<Option<(Relay, RelayWriters)>> {
        let Bars::Drawn(multi) = bars else {
            return Ok(None);
        };
        if multi.is_hidden() {
            return Ok(None);
        }
        let (out_reader, out) = io::pipe()?;
        let (err_reader, err) = io::pipe()?;
        let (tx, done) = mpsc::channel();
        for (reader, to_stderr) in [(out_reader, false), (err_reader, true)] {
            let multi = multi.clone();
            let tx = tx.clone();
            thread::Builder::new()
                .name("multiproc-output".into())
                .spawn(move || {
                    copy_lines(reader, &multi, to_stderr);
                    let _ = tx.send(());
                })?;
        }
        Ok(Some((
            Relay { done, threads: 2 },
            RelayWriters { out, err },
        )))
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // The pool's workers have been reaped and its write ends closed: the copies
        // end as soon as the pipes are drained, unless a process a task started
        // still holds them; that is not waited for.
        let deadline = Instant::now() + RELAY_DRAIN;
        for _ in 0..self.threads {
            let left = deadline.saturating_duration_since(Instant::now());
            if self.done.recv_timeout(left).is_err() {
                return;
            }
        }
    }
}

fn copy_lines(reader: io::PipeReader, multi: &MultiProgress, to_stderr: bool) {
    let mut reader = BufReader::new(reader);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => multi.suspend(|| {
                // Nowhere to report a failed write of the workers' own output.
                let _ = if to_stderr {
                    io::stderr().lock().write_all(&line)
                } else {
                    let mut out = io::stdout().lock();
                    out.write_all(&line).and_then(|()| out.flush())
                };
            }),
        }
    }
}
