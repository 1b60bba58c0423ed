//! A serving rank: runs the chunks rank 0 sends on worker processes of its own node.
//!
//! For each pool rank 0 opens, the rank starts a process backend of its own (the same
//! one a pool on one machine uses) and relays frames both ways without reading them:
//! requests from rank 0 to a local worker, replies and losses back. A task that
//! crashes takes down its local worker process only; the rank reports the loss as a
//! local pool would, and rank 0's supervisor decides what happens next.

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use super::super::process::ProcessBackend;
use super::super::{Event, StartOptions};
use super::world::{Envelope, Idle, Job, Received};
use crate::os::spawn::SpawnOptions;
use crate::wire::transport::FrameBuf;

/// Test-only fault injection: `panic-on-open` makes a serving rank panic in its
/// library code when a pool opens, as a bug there would.
const FAULT_ENV: &str = "MULTIPROC_MPI_FAULT";

/// Serves until rank 0 says stop.
pub(crate) fn serve(job: &Job) {
    let mut pools: HashMap<u64, ProcessBackend> = HashMap::new();
    let mut idle = Idle::default();
    loop {
        let mut busy = false;
        while let Some(received) = job.try_receive() {
            busy = true;
            if !handle(job, &mut pools, received) {
                for (_, mut backend) in pools.drain() {
                    backend.shutdown();
                }
                return;
            }
        }
        for (&pool, backend) in pools.iter_mut() {
            loop {
                let event = match backend.next_event(false, Some(Instant::now())) {
                    Ok(Event::TimedOut | Event::Woken) => break,
                    Ok(event) => event,
                    Err(e) => {
                        report_failure(job, &format!("pool {pool}: {e}"));
                        break;
                    }
                };
                busy = true;
                relay(job, pool, event);
            }
        }
        if busy {
            idle.reset();
            continue;
        }
        // Wait on the only pool's workers when there is one, so a reply goes out as
        // soon as it comes; rank 0's next message is seen within the pause.
        let pause = idle.next();
        if pools.len() == 1 && pause > Duration::ZERO {
            let (&pool, backend) = pools.iter_mut().next().expect("one pool");
            match backend.next_event(false, Some(Instant::now() + pause)) {
                Ok(Event::TimedOut | Event::Woken) => idle.pause_counted(),
                Ok(event) => {
                    idle.reset();
                    relay(job, pool, event);
                }
                Err(e) => report_failure(job, &format!("pool {pool}: {e}")),
            }
        } else {
            idle.pause();
        }
    }
}

/// Acts on one message from rank 0; `false` when it says stop.
fn handle(job: &Job, pools: &mut HashMap<u64, ProcessBackend>, received: Received) -> bool {
    match &received.envelope {
        Envelope::Open {
            pool,
            workers,
            inherit_output,
            memory_limit,
            start_timeout,
        } => {
            if std::env::var_os(FAULT_ENV).is_some_and(|v| v == "panic-on-open") {
                panic!("injected panic in {} ({FAULT_ENV})", job.describe(job.rank));
            }
            let options = StartOptions {
                spawn: SpawnOptions {
                    inherit_output: *inherit_output,
                    relay: None,
                    memory_limit: *memory_limit,
                    announce_parent_pid: None,
                    #[cfg(test)]
                    program: None,
                },
                start_timeout: *start_timeout,
                kill_before_send: None,
                corrupt_reply: None,
                fail_starts_after: None,
            };
            let started = ProcessBackend::start(*workers as usize, options)
                .map_err(|e| e.to_string())
                .map(|backend| {
                    let pids = backend.pids();
                    let started = (0..backend.slots())
                        .map(|w| {
                            (
                                backend.generation(w).unwrap_or(0),
                                pids.get(w).copied().flatten().unwrap_or(0),
                            )
                        })
                        .collect();
                    pools.insert(*pool, backend);
                    started
                });
            job.send(
                0,
                &Envelope::Opened {
                    pool: *pool,
                    started,
                },
                &[],
            );
        }
        Envelope::Request { pool, local } => {
            let Some(backend) = pools.get_mut(pool) else {
                // The pool was closed meanwhile: rank 0 no longer waits for it.
                return true;
            };
            let body = received.body();
            let mut frame = FrameBuf::with_capacity(body.len());
            frame.body().extend_from_slice(body);
            // A worker that cannot take the frame is dead or dying: its loss is
            // reported by the backend, and the chunk is rank 0's to reassign.
            let _ = backend.send(*local as usize, &mut frame);
        }
        Envelope::Restart { pool, local } => {
            let started = match pools.get_mut(pool) {
                Some(backend) => backend
                    .restart(*local as usize)
                    .map(|generation| {
                        let pid = backend
                            .pids()
                            .get(*local as usize)
                            .copied()
                            .flatten()
                            .unwrap_or(0);
                        (generation, pid)
                    })
                    .map_err(|e| e.to_string()),
                None => Err(format!("pool {pool} is not open on this rank")),
            };
            job.send(
                0,
                &Envelope::Restarted {
                    pool: *pool,
                    local: *local,
                    started,
                },
                &[],
            );
        }
        Envelope::Kill { pool, local } => {
            if let Some(backend) = pools.get_mut(pool) {
                backend.kill(*local as usize);
            }
        }
        Envelope::Close { pool } => {
            if let Some(mut backend) = pools.remove(pool) {
                backend.shutdown();
            }
        }
        Envelope::Stop => return false,
        Envelope::Failed { reason } => report_failure(job, reason),
        other => report_failure(
            job,
            &format!("rank {} sent a serving rank {other:?}", received.from),
        ),
    }
    true
}

/// Passes one event of a local worker to rank 0.
fn relay(job: &Job, pool: u64, event: Event) {
    let local = |worker: usize| u32::try_from(worker).unwrap_or(u32::MAX);
    match event {
        Event::Reply {
            worker,
            generation,
            frame,
        } => job.send(
            0,
            &Envelope::Reply {
                pool,
                local: local(worker),
                generation,
            },
            &frame,
        ),
        Event::Lost {
            worker,
            generation,
            status,
            last_item,
        } => job.send(
            0,
            &Envelope::Lost {
                pool,
                local: local(worker),
                generation,
                status: status.map(|s| s.into_raw()),
                last_item,
            },
            &[],
        ),
        Event::Broken {
            worker,
            generation,
            reason,
        } => job.send(
            0,
            &Envelope::Broken {
                pool,
                local: local(worker),
                generation,
                reason,
            },
            &[],
        ),
        Event::Woken | Event::TimedOut => {}
    }
}

/// Tells rank 0 that this rank cannot go on; rank 0 ends the job with the reason.
fn report_failure(job: &Job, reason: &str) {
    job.send(
        0,
        &Envelope::Failed {
            reason: format!("{}: {reason}", job.describe(job.rank)),
        },
        &[],
    );
}
