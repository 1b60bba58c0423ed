//! The timeline of a pool: a Chrome trace-event file (JSON array format), which
//! Perfetto (<https://ui.perfetto.dev>) and `chrome://tracing` open.
//!
//! One process per pool (a pipeline's stages are one pool each, in one file), one
//! track per worker slot and one for the parent: a slice per chunk (its job, item
//! range and bytes), a slice per worker start-up and per job, and instants for
//! lost workers, chunks sent again and task timeouts. Events are written as they
//! happen, through a buffer flushed at the end of every job, so a file can be
//! opened while the program runs (both viewers accept an array left open); the
//! array is closed when the last pool using the file is dropped.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// A trace file shared by the pools that write to it.
pub(crate) struct Trace {
    path: PathBuf,
    origin: Instant,
    file: Mutex<Writer>,
}

struct Writer {
    out: BufWriter<File>,
    /// Events written so far (a comma goes before every one but the first).
    events: u64,
    /// Set on the first write error, reported once; nothing more is written.
    failed: bool,
    next_pid: u32,
}

/// One pool's place in a trace: the file and the pool's process id there.
#[derive(Clone)]
pub(crate) struct Track {
    trace: Arc<Trace>,
    pid: u32,
}

/// The parent's track in each pool's process; worker `w` is on track `w + 1`.
const PARENT: usize = 0;

impl Trace {
    /// Creates (or truncates) the file at `path` and opens the event array.
    pub(crate) fn create(path: &Path) -> io::Result<Arc<Self>> {
        let mut out = BufWriter::new(File::create(path)?);
        out.write_all(b"[\n")?;
        Ok(Arc::new(Self {
            path: path.to_owned(),
            origin: Instant::now(),
            file: Mutex::new(Writer {
                out,
                events: 0,
                failed: false,
                next_pid: 1,
            }),
        }))
    }

    /// A new process in the trace, named `name` (a pool, or a pipeline's stage).
    pub(crate) fn track(self: &Arc<Self>, name: &str) -> Track {
        let pid = {
            let mut file = self.lock();
            let pid = file.next_pid;
            file.next_pid += 1;
            pid
        };
        let track = Track {
            trace: Arc::clone(self),
            pid,
        };
        track.metadata("process_name", None, name);
        track.metadata("thread_name", Some(PARENT), "parent");
        track
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Writer> {
        self.file.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn micros(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.origin).as_secs_f64() * 1e6
    }

    fn write(&self, event: &str) {
        let mut file = self.lock();
        if file.failed {
            return;
        }
        let comma = if file.events == 0 { "" } else { ",\n" };
        let written = write!(file.out, "{comma}{event}");
        file.events += 1;
        if let Err(e) = written {
            self.report(&mut file, &e);
        }
    }

    fn report(&self, file: &mut Writer, error: &io::Error) {
        file.failed = true;
        eprintln!(
            "multiproc: writing the trace file {} failed, it stops here: {error}",
            self.path.display()
        );
    }

    fn flush(&self) {
        let mut file = self.lock();
        if file.failed {
            return;
        }
        if let Err(e) = file.out.flush() {
            self.report(&mut file, &e);
        }
    }
}

impl Drop for Trace {
    fn drop(&mut self) {
        let file = self.file.get_mut().unwrap_or_else(PoisonError::into_inner);
        if !file.failed {
            let closed = file.out.write_all(b"\n]\n").and_then(|()| file.out.flush());
            if let Err(e) = closed {
                eprintln!(
                    "multiproc: closing the trace file {} failed: {e}",
                    self.path.display()
                );
            }
        }
    }
}

impl Track {
    fn tid(worker: Option<usize>) -> usize {
        worker.map_or(PARENT, |w| w + 1)
    }

    fn metadata(&self, kind: &str, tid: Option<usize>, name: &str) {
        let tid = tid.unwrap_or(PARENT);
        self.trace.write(&format!(
            r#"{{"name":"{kind}","ph":"M","pid":{},"tid":{tid},"args":{{"name":{}}}}}"#,
            self.pid,
            json(name)
        ));
    }

    /// A slice on `worker`'s track (the parent's when `None`) that ended at `end`.
    fn slice(
        &self,
        worker: Option<usize>,
        name: &str,
        end: Instant,
        took: Duration,
        args: &[(&str, Arg<'_>)],
    ) {
        let end_us = self.trace.micros(end);
        let dur = took.as_secs_f64() * 1e6;
        let ts = (end_us - dur).max(0.0);
        self.trace.write(&format!(
            r#"{{"name":{},"ph":"X","ts":{ts:.3},"dur":{dur:.3},"pid":{},"tid":{},"args":{}}}"#,
            json(name),
            self.pid,
            Self::tid(worker),
            object(args)
        ));
    }

    /// An instant on `worker`'s track (the parent's when `None`).
    pub(crate) fn instant(&self, worker: Option<usize>, name: &str, args: &[(&str, Arg<'_>)]) {
        let ts = self.trace.micros(Instant::now());
        self.trace.write(&format!(
            r#"{{"name":{},"ph":"i","s":"t","ts":{ts:.3},"pid":{},"tid":{},"args":{}}}"#,
            json(name),
            self.pid,
            Self::tid(worker),
            object(args)
        ));
    }

    /// A chunk a worker answered just now, after `took` of work on it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn chunk(
        &self,
        worker: usize,
        job: u64,
        chunk: u64,
        items: std::ops::Range<usize>,
        took: Duration,
        bytes_sent: usize,
        bytes_received: usize,
        failed: bool,
    ) {
        let name = if failed {
            format!("job {job} (failed)")
        } else {
            format!("job {job}")
        };
        let range = format!("{}..{}", items.start, items.end);
        self.slice(
            Some(worker),
            &name,
            Instant::now(),
            took,
            &[
                ("job", Arg::Num(job as f64)),
                ("chunk", Arg::Num(chunk as f64)),
                ("items", Arg::Str(&range)),
                ("bytes_sent", Arg::Num(bytes_sent as f64)),
                ("bytes_received", Arg::Num(bytes_received as f64)),
            ],
        );
    }

    /// A worker process that started at `at` and took `took` (its pid named on
    /// its track).
    pub(crate) fn started(&self, worker: usize, at: Instant, took: Duration, pid: Option<u32>) {
        let name = match pid {
            Some(pid) => format!("worker {worker} (pid {pid})"),
            None => format!("worker {worker} (thread)"),
        };
        self.metadata("thread_name", Some(worker + 1), &name);
        let pid = pid.map_or(Arg::Str("none"), |p| Arg::Num(f64::from(p)));
        self.slice(Some(worker), "start-up", at + took, took, &[("pid", pid)]);
    }

    /// A job's span on the parent's track, from `started` to now; flushes the
    /// file, so what is written so far can be opened.
    pub(crate) fn job(&self, job: u64, started: Instant, items: u64, chunks: u64, ok: bool) {
        self.slice(
            None,
            &format!("job {job}"),
            Instant::now(),
            started.elapsed(),
            &[
                ("items", Arg::Num(items as f64)),
                ("chunks", Arg::Num(chunks as f64)),
                ("outcome", Arg::Str(if ok { "ok" } else { "failed" })),
            ],
        );
        self.trace.flush();
    }
}

/// A value in an event's `args`.
pub(crate) enum Arg<'a> {
    Num(f64),
    Str(&'a str),
}

fn object(args: &[(&str, Arg<'_>)]) -> String {
    let mut s = String::from("{");
    for (i, (key, value)) in args.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&json(key));
        s.push(':');
        match value {
            Arg::Num(n) => {
                let _ = write!(s, "{n}");
            }
            Arg::Str(v) => s.push_str(&json(v)),
        }
    }
    s.push('}');
    s
}

/// `text` as a JSON string.
fn json(text: &str) -> String {
    let mut s = String::with_capacity(text.len() + 2);
    s.push('"');
    for c in text.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(s, "\\u{:04x}", u32::from(c));
            }
            c => s.push(c),
        }
    }
    s.push('"');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_as_json() {
        assert_eq!(json("a\"b\\c\nd\u{1}"), r#""a\"b\\c\nd\u0001""#);
        assert_eq!(
            object(&[("n", Arg::Num(3.0)), ("s", Arg::Str("x"))]),
            r#"{"n":3,"s":"x"}"#
        );
    }
}
