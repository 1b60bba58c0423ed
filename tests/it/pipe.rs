//! `Pipe`: typed ends across processes; a gone end is an error, never a hang.

use std::time::Duration;

use multiproc::{Error, Pipe, Process};
use serde_bytes::ByteBuf;

fn send_answer(end: Pipe<u64, ()>) {
    end.send(42).unwrap();
}

fn echo_lengths(end: Pipe<usize, String>) -> usize {
    let mut served = 0;
    while let Ok(word) = end.recv() {
        end.send(word.len()).unwrap();
        served += 1;
    }
    served
}

fn drop_end_and_exit(end: Pipe<u64, u64>) -> u32 {
    drop(end);
    std::process::id()
}

fn exit_holding(end: Pipe<u64, u64>) {
    let _keep = end;
    std::process::exit(3);
}

/// Values whose sizes go up and down, past the size an end keeps its buffer at.
fn varied_values() -> Vec<ByteBuf> {
    [3 << 20, 10, 9 << 20, 1024, 0, 5 << 20]
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            ByteBuf::from(
                (0..len)
                    .map(|j| (i * 31 + j * 7) as u8)
                    .collect::<Vec<u8>>(),
            )
        })
        .collect()
}

fn send_varied(end: Pipe<ByteBuf, ()>) {
    for value in varied_values() {
        end.send(value).unwrap();
    }
}

#[test]
fn values_of_changing_sizes_arrive_intact() {
    // Each end reuses one buffer between values: a smaller value after a larger
    // one must not carry the larger one's bytes, nor a larger one stale ones.
    let (sender, receiver) = Pipe::<ByteBuf, ()>::one_way().unwrap();
    let child = Process::spawn(sender, send_varied).unwrap();
    for expected in varied_values() {
        assert_eq!(receiver.recv().unwrap(), expected);
    }
    child.join().unwrap();
    assert!(matches!(receiver.recv(), Err(Error::PipeClosed)));
}

#[test]
fn pipe_carries_a_value_from_a_child() {
    let (sender, receiver) = Pipe::<u64, ()>::one_way().unwrap();
    let child = Process::spawn(sender, send_answer).unwrap();
    assert_eq!(receiver.recv().unwrap(), 42);
    child.join().unwrap();
    // The child's end is gone with it, and this process kept no copy.
    assert!(matches!(receiver.recv(), Err(Error::PipeClosed)));
}

#[test]
fn duplex_pipe_round_trips_both_ways() {
    let (here, there) = Pipe::<String, usize>::duplex().unwrap();
    let child = Process::spawn(there, echo_lengths).unwrap();
    for word in ["a", "bb", "ccc"] {
        here.send(word.to_string()).unwrap();
        assert_eq!(here.recv().unwrap(), word.len());
    }
    drop(here);
    assert_eq!(child.join().unwrap(), 3);
}

#[test]
fn recv_fails_when_the_other_process_drops_its_end() {
    let (here, there) = Pipe::<u64, u64>::duplex().unwrap();
    let child = Process::spawn(there, drop_end_and_exit).unwrap();
    assert!(matches!(here.recv(), Err(Error::PipeClosed)));
    child.join().unwrap();
}

#[test]
fn recv_fails_when_the_other_process_exits() {
    let (here, there) = Pipe::<u64, u64>::duplex().unwrap();
    let child = Process::builder()
        .inherit_output(false)
        .spawn(there, exit_holding)
        .unwrap();
    assert!(matches!(here.recv(), Err(Error::PipeClosed)));
    assert!(matches!(child.join(), Err(Error::ProcessExited { .. })));
}

#[test]
fn pipe_recv_timeout_and_try_recv_without_a_value() {
    let (a, b) = Pipe::<u64, u64>::duplex().unwrap();
    assert!(matches!(a.try_recv(), Err(Error::Timeout(_))));
    assert!(matches!(
        a.recv_timeout(Duration::from_millis(5)),
        Err(Error::Timeout(_))
    ));
    b.send(7).unwrap();
    assert_eq!(a.recv_timeout(Duration::from_secs(5)).unwrap(), 7);
}

#[test]
fn an_end_sent_away_cannot_be_used_here() {
    let (here, there) = Pipe::<u64, u64>::duplex().unwrap();
    let child = Process::spawn(there, drop_end_and_exit).unwrap();
    child.join().unwrap();
    assert!(matches!(here.recv(), Err(Error::PipeClosed)));
}

/// Helper role `channels`: creates and drops a thousand queues and pipes, some of
/// them used from a child, and checks that descriptors and children are as before.
/// Run alone in a helper process, so no other test's descriptors are counted.
pub(crate) fn channels_leave_nothing_behind() {
    // Start the rendezvous and the spawner threads first: they stay for the life
    // of the process.
    let warm = multiproc::Queue::<u64>::unbounded();
    Process::spawn(warm.clone(), |q: multiproc::Queue<u64>| q.put(1).unwrap())
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(warm.get().unwrap(), 1);
    // The server thread of the child's connection closes its socket when it reads
    // the child's hang-up, on its own time: count once only the rendezvous'
    // listening thread is left.
    wait_for_connections_to_close();
    let before = crate::support::open_fds();
    for i in 0..1_000u64 {
        let queue = multiproc::Queue::<u64>::bounded(4);
        queue.put(i).unwrap();
        assert_eq!(queue.get().unwrap(), i);
        let (a, b) = Pipe::<u64, u64>::duplex().unwrap();
        a.send(i).unwrap();
        assert_eq!(b.recv().unwrap(), i);
        if i % 100 == 0 {
            let (here, there) = Pipe::<u64, u64>::duplex().unwrap();
            let child = Process::spawn(
                (queue.clone(), there),
                |(q, end): (multiproc::Queue<u64>, Pipe<u64, u64>)| {
                    q.put(5).unwrap();
                    end.send(6).unwrap();
                },
            )
            .unwrap();
            assert_eq!(here.recv().unwrap(), 6);
            child.join().unwrap();
            assert_eq!(queue.get().unwrap(), 5);
        }
    }
    wait_for_connections_to_close();
    let after = crate::support::open_fds();
    assert_eq!(after, before, "descriptors leaked");
    assert!(
        crate::support::children_of_this_process().is_empty(),
        "children left"
    );
    println!("channels ok");
}

/// Waits (at most 5 s) until the only thread of the rendezvous left is its
/// listening thread: every connection's server thread has seen its hang-up.
fn wait_for_connections_to_close() {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while crate::support::threads_named("multiproc-broke") > 1
        && std::time::Instant::now() < deadline
    {
        std::thread::yield_now();
    }
}

#[test]
fn a_thousand_queues_and_pipes_leave_no_descriptor_or_child_behind() {
    let out = crate::helpers::helper_command("channels").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("channels ok"),
        "{}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Decodes by aborting the process, unless it is the process named (the parent,
/// which decodes the argument once to check it).
struct AbortsElsewhere(u32);

impl serde::Serialize for AbortsElsewhere {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for AbortsElsewhere {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let parent = u32::deserialize(d)?;
        if parent != std::process::id() {
            std::process::abort();
        }
        Ok(AbortsElsewhere(parent))
    }
}

fn never_runs((_, end): (AbortsElsewhere, Pipe<u64, u64>)) -> u64 {
    end.recv().unwrap_or(0)
}

#[test]
fn an_end_parked_for_a_child_that_dies_before_claiming_it_is_closed() {
    // The child dies while decoding its argument, before it reaches the pipe end:
    // the end stays parked here until the child is reaped, then it is closed, so
    // this side sees the pipe closed instead of waiting forever.
    let (mine, theirs) = Pipe::<u64, u64>::duplex().unwrap();
    let child = Process::spawn((AbortsElsewhere(std::process::id()), theirs), never_runs).unwrap();
    assert!(child.join().is_err());
    match mine.recv_timeout(Duration::from_secs(10)) {
        Err(Error::PipeClosed) => {}
        other => panic!("expected the pipe to close, got {other:?}"),
    }
}

/// Dies the first time it runs (marked by a file), after it took the pipe end; the
/// second run reports what using the end gives.
fn dies_once_holding_the_end((marker, end): (std::path::PathBuf, Pipe<u64, u64>)) -> String {
    if std::fs::File::create_new(&marker).is_ok() {
        std::process::abort();
    }
    match end.send(1) {
        Ok(()) => "sent".to_owned(),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_pipe_end_in_an_item_that_runs_again_fails_saying_why() {
    // Tasks run at least once: the item runs again on a fresh worker after the
    // first one died, and the end it carries was taken by the first run.
    let dir = tempfile::tempdir().unwrap();
    let (_mine, theirs) = Pipe::<u64, u64>::duplex().unwrap();
    let pool = multiproc::Pool::builder()
        .workers(1)
        .inherit_output(false)
        .build()
        .unwrap();
    let out = pool
        .map(
            vec![(dir.path().join("ran"), theirs)],
            dies_once_holding_the_end,
        )
        .unwrap();
    assert!(out[0].contains("claimed already"), "{}", out[0]);
}
