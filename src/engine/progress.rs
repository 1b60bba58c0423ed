//! Progress bars on stderr, drawn by the parent (never by workers) with
//! `indicatif`: one bar per job (per stage for a pipeline), updated once per
//! delivered chunk, left as one final line when the job ends.
//!
//! A bar is drawn only when stderr is a terminal, unless forced
//! (`MULTIPROC_PROGRESS=1`): then a program whose stderr is a file or a pipe gets
//! the bars' lines once a second instead, each on a line of its own.

use std::fmt;
use std::io::{self, Write};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle, TermLike};

/// The bars of one pool, or of every stage of a pipeline.
#[derive(Clone)]
pub(crate) struct Bars {
    multi: MultiProgress,
}

impl fmt::Debug for Bars {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Bars")
    }
}

/// One job's bar.
pub(crate) struct Bar {
    bar: ProgressBar,
}

impl Bars {
    /// Bars on stderr; `forced` draws them even when stderr is not a terminal.
    pub(crate) fn new(forced: bool) -> Self {
        let target = if forced && !io::IsTerminal::is_terminal(&io::stderr()) {
            ProgressDrawTarget::term_like_with_hz(Box::new(Lines), 1)
        } else {
            ProgressDrawTarget::stderr()
        };
        Self {
            multi: MultiProgress::with_draw_target(target),
        }
    }

    /// Whether bars of this set are drawn anywhere.
    pub(crate) fn hidden(&self) -> bool {
        self.multi.is_hidden()
    }

    /// A bar for a job named `label`, of `total` items when that is known.
    pub(crate) fn bar(&self, label: &str, total: Option<usize>) -> Bar {
        let bar = match total {
            Some(total) => {
                let bar = ProgressBar::new(total as u64);
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix} [{bar:30}] {human_pos}/{human_len} items, {per_sec}, \
                         {elapsed} elapsed, ETA {eta}{msg}",
                    )
                    .expect("a valid template")
                    .progress_chars("=> "),
                );
                bar
            }
            None => {
                let bar = ProgressBar::no_length();
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix} {human_pos} items, {per_sec}, {elapsed} elapsed{msg}",
                    )
                    .expect("a valid template"),
                );
                bar
            }
        };
        bar.set_prefix(label.to_owned());
        let bar = self.multi.add(bar);
        Bar { bar }
    }
}

impl Bar {
    /// Items done so far, with failures and retries when there are any.
    pub(crate) fn update(&self, done: u64, failed: u64, retries: u64) {
        if failed + retries > 0 {
            self.bar
                .set_message(format!(", {failed} failed, {retries} chunks sent again"));
        }
        self.bar.set_position(done);
    }

    /// Leaves the bar as its final line: how far it got and how it ended.
    pub(crate) fn finish(&self, done: u64, wall: Duration, outcome: &str) {
        let rate = if wall.as_secs_f64() > 0.0 {
            done as f64 / wall.as_secs_f64()
        } else {
            0.0
        };
        self.bar
            .set_style(ProgressStyle::with_template("{prefix} {msg}").expect("a valid template"));
        self.bar.finish_with_message(format!(
            "{outcome}: {done} items in {:.2} s ({rate:.0} items/s)",
            wall.as_secs_f64()
        ));
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if !self.bar.is_finished() {
            self.bar.abandon();
        }
    }
}

/// A draw target for stderr that is not a terminal: every draw is written as
/// lines, with no cursor movement.
#[derive(Debug)]
struct Lines;

impl TermLike for Lines {
    fn width(&self) -> u16 {
        120
    }
    fn move_cursor_up(&self, _: usize) -> io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _: usize) -> io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _: usize) -> io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _: usize) -> io::Result<()> {
        Ok(())
    }
    fn write_line(&self, s: &str) -> io::Result<()> {
        if s.trim().is_empty() {
            return Ok(());
        }
        writeln!(io::stderr().lock(), "{s}")
    }
    fn write_str(&self, s: &str) -> io::Result<()> {
        if s.trim().is_empty() {
            return Ok(());
        }
        writeln!(io::stderr().lock(), "{s}")
    }
    fn clear_line(&self) -> io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        io::stderr().flush()
    }
}
