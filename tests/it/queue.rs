//! `Queue`: items between processes, each delivered once.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use multiproc::{Error, Process, Queue};

fn produce((queue, producer, count): (Queue<(u32, u32)>, u32, u32)) -> u32 {
    for i in 0..count {
        queue.put((producer, i)).unwrap();
    }
    count
}

fn consume(queue: Queue<(u32, u32)>) -> Vec<(u32, u32)> {
    let mut got = Vec::new();
    loop {
        match queue.get() {
            Ok(item) => got.push(item),
            Err(Error::QueueClosed) => return got,
            Err(e) => panic!("{e}"),
        }
    }
}

fn take_n((queue, n): (Queue<u64>, usize)) -> u64 {
    (0..n).map(|_| queue.get().unwrap()).sum()
}

fn put_range((queue, n): (Queue<u64>, u64)) {
    for i in 0..n {
        queue.put(i).unwrap();
    }
}

fn fill_with_try_put(queue: Queue<u64>) -> (u64, bool) {
    let mut accepted = 0;
    loop {
        match queue.try_put(accepted) {
            Ok(()) => accepted += 1,
            Err(Error::QueueFull) => return (accepted, true),
            Err(_) => return (accepted, false),
        }
    }
}

#[test]
fn queue_carries_items_between_sibling_processes() {
    let queue = Queue::<u64>::unbounded();
    let consumer = Process::spawn((queue.clone(), 100), take_n).unwrap();
    let producer = Process::spawn((queue.clone(), 100), put_range).unwrap();
    producer.join().unwrap();
    assert_eq!(consumer.join().unwrap(), (0..100).sum::<u64>());
    assert!(matches!(queue.try_get(), Err(Error::QueueEmpty)));
}

#[test]
fn queue_delivers_each_item_exactly_once_across_two_producers_and_two_consumers() {
    let queue = Queue::<(u32, u32)>::bounded(64);
    let consumers: Vec<_> = (0..2)
        .map(|_| Process::spawn(queue.clone(), consume).unwrap())
        .collect();
    let producers: Vec<_> = (0..2)
        .map(|p| Process::spawn((queue.clone(), p, 5_000), produce).unwrap())
        .collect();
    for producer in producers {
        assert_eq!(producer.join().unwrap(), 5_000);
    }
    queue.close().unwrap();
    let mut all = Vec::new();
    for consumer in consumers {
        all.extend(consumer.join().unwrap());
    }
    assert_eq!(all.len(), 10_000);
    let distinct: HashSet<_> = all.iter().copied().collect();
    assert_eq!(distinct.len(), 10_000);
    let checksum: u64 = all
        .iter()
        .map(|&(p, i)| u64::from(p) * 1_000_000 + u64::from(i))
        .sum();
    let expected: u64 = (0..2u64)
        .flat_map(|p| (0..5_000u64).map(move |i| p * 1_000_000 + i))
        .sum();
    assert_eq!(checksum, expected);
}

#[test]
fn bounded_queue_refuses_try_put_when_full_in_another_process() {
    let queue = Queue::<u64>::bounded(3);
    let child = Process::spawn(queue.clone(), fill_with_try_put).unwrap();
    assert_eq!(child.join().unwrap(), (3, true));
    assert_eq!(queue.get().unwrap(), 0);
    assert!(queue.try_put(9).is_ok());
    assert!(matches!(queue.try_put(10), Err(Error::QueueFull)));
}

#[test]
fn a_rendezvous_queue_hands_each_item_from_process_to_process() {
    let queue = Queue::<u64>::bounded(0);
    // Nobody waits in a get: a rendezvous holds nothing, not even one item.
    let child = Process::spawn(queue.clone(), fill_with_try_put).unwrap();
    assert_eq!(child.join().unwrap(), (0, true));
    assert!(matches!(queue.try_get(), Err(Error::QueueEmpty)));
    // A consumer in another process waits in `get`: a `try_put` reaches it.
    let consumer = Process::spawn((queue.clone(), 1), take_n).unwrap();
    let guard = Instant::now() + Duration::from_secs(30);
    loop {
        match queue.try_put(8) {
            Ok(()) => break,
            Err(Error::QueueFull) => assert!(Instant::now() < guard, "the consumer never waited"),
            Err(e) => panic!("{e}"),
        }
        std::thread::yield_now();
    }
    assert_eq!(consumer.join().unwrap(), 8);
    // From one child to its sibling, through the creator: each put returns once the
    // other took the item.
    let consumer = Process::spawn((queue.clone(), 5), take_n).unwrap();
    let producer = Process::spawn((queue.clone(), 5), put_range).unwrap();
    producer.join().unwrap();
    assert_eq!(consumer.join().unwrap(), 1 + 2 + 3 + 4);
    assert!(matches!(queue.try_get(), Err(Error::QueueEmpty)));
}

#[test]
fn bounded_queue_blocks_a_producer_until_items_are_taken() {
    let queue = Queue::<u64>::bounded(2);
    let producer = Process::spawn((queue.clone(), 5), put_range).unwrap();
    // Only two of five fit: the producer cannot finish before three are taken.
    assert!(matches!(
        producer.join_timeout(Duration::from_millis(50)),
        Err(Error::Timeout(_))
    ));
    assert!(producer.is_alive());
    let got: Vec<u64> = (0..5).map(|_| queue.get().unwrap()).collect();
    assert_eq!(got, [0, 1, 2, 3, 4]);
    producer.join().unwrap();
}

#[test]
fn closed_queue_is_drained_then_reports_closed() {
    let queue = Queue::<u64>::unbounded();
    Process::spawn((queue.clone(), 3), put_range)
        .unwrap()
        .join()
        .unwrap();
    queue.close().unwrap();
    assert!(matches!(queue.put(7), Err(Error::QueueClosed)));
    let remote = Process::spawn(queue.clone(), |q: Queue<u64>| {
        let mut got = Vec::new();
        loop {
            match q.get() {
                Ok(x) => got.push(x),
                Err(Error::QueueClosed) => return got,
                Err(e) => panic!("{e}"),
            }
        }
    })
    .unwrap();
    assert_eq!(remote.join().unwrap(), [0, 1, 2]);
}

#[test]
fn queue_get_timeout_and_try_get_on_an_empty_queue() {
    let queue = Queue::<u64>::unbounded();
    assert!(matches!(queue.try_get(), Err(Error::QueueEmpty)));
    assert!(matches!(
        queue.get_timeout(Duration::from_millis(5)),
        Err(Error::Timeout(_))
    ));
    let child = Process::spawn(queue.clone(), |q: Queue<u64>| {
        let empty = matches!(q.try_get(), Err(Error::QueueEmpty));
        let timed_out = matches!(
            q.get_timeout(Duration::from_millis(5)),
            Err(Error::Timeout(_))
        );
        (empty, timed_out)
    })
    .unwrap();
    assert_eq!(child.join().unwrap(), (true, true));
}

#[test]
fn queue_travels_inside_pool_items() {
    let queue = Queue::<u64>::unbounded();
    let pool = multiproc::Pool::builder().workers(2).build().unwrap();
    let items: Vec<(Queue<u64>, u64)> = (0..10).map(|i| (queue.clone(), i)).collect();
    pool.map(items, |(q, i): (Queue<u64>, u64)| q.put(i * 10).unwrap())
        .unwrap();
    let mut got: Vec<u64> = (0..10).map(|_| queue.get().unwrap()).collect();
    got.sort_unstable();
    assert_eq!(got, (0..10).map(|i| i * 10).collect::<Vec<_>>());
}

/// Queues made in a worker, kept there so they outlive the task that made them.
static KEPT: std::sync::Mutex<Vec<Queue<u64>>> = std::sync::Mutex::new(Vec::new());

/// Makes a queue in this worker holding `item`, keeps it, and returns a handle.
fn queue_in_worker(item: u64) -> Queue<u64> {
    let queue = Queue::unbounded();
    queue.put(item).unwrap();
    KEPT.lock().unwrap().push(queue.clone());
    queue
}

fn try_take(queue: Queue<u64>) -> Option<u64> {
    queue.try_get().ok()
}

#[test]
fn a_process_that_does_not_descend_from_the_creator_is_refused() {
    // The queue lives in a worker; the test process is that worker's parent, of the
    // same user but not its descendant, so the worker's rendezvous refuses it.
    let pool = multiproc::Pool::builder()
        .workers(1)
        .inherit_output(false)
        .build()
        .unwrap();
    let queue = pool.map(vec![7u64], queue_in_worker).unwrap().remove(0);
    let err = queue.try_get().unwrap_err();
    let Error::QueueLost { creator, source } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(*creator, pool.worker_pids().unwrap()[0]);
    assert_eq!(
        source.kind(),
        std::io::ErrorKind::PermissionDenied,
        "{source}"
    );
    assert!(source.to_string().contains("descend from it"), "{source}");
    // The queue is there and holds its item: back in the worker it is taken.
    assert_eq!(pool.map(vec![queue], try_take).unwrap(), [Some(7)]);
}

/// In a child: one thread waits in `get` on `queue`, then another thread `put`s on
/// the same handle. Returns what the put and the get gave, as text.
fn get_and_put_on_one_handle_from_two_threads(
    (queue, started, go): (Queue<u64>, Queue<()>, Queue<()>),
) -> (String, String) {
    // Connect every handle first, so that the getter's request is one write on an
    // open connection and the round trip through the parent below is the slower path.
    assert!(matches!(queue.try_get(), Err(Error::QueueEmpty)));
    assert!(matches!(started.try_get(), Err(Error::QueueEmpty)));
    std::thread::scope(|s| {
        let getter = s.spawn(|| {
            started.put(()).unwrap();
            // The hang guard: without concurrent requests on one handle, this get
            // holds the handle's only connection until it times out, and the put
            // below waits behind it.
            queue.get_timeout(Duration::from_secs(20))
        });
        // The parent answers `started` through `go`: by then the getter has sent
        // its request and waits in it.
        go.get().unwrap();
        let put = queue.put(7);
        let got = getter.join().unwrap();
        (format!("{put:?}"), format!("{got:?}"))
    })
}

#[test]
fn a_remote_handle_puts_from_one_thread_while_another_waits_in_get() {
    let queue = Queue::<u64>::unbounded();
    let started = Queue::<()>::unbounded();
    let go = Queue::<()>::unbounded();
    let child = Process::spawn(
        (queue.clone(), started.clone(), go.clone()),
        get_and_put_on_one_handle_from_two_threads,
    )
    .unwrap();
    started
        .get_timeout(Duration::from_secs(20))
        .expect("the child's getter thread did not start");
    go.put(()).unwrap();
    let (put, got) = child.join().unwrap();
    assert_eq!(put, "Ok(())");
    assert_eq!(
        got, "Ok(7)",
        "the get did not receive the item put from the other thread (the put waited \
         behind the get?)"
    );
    assert!(matches!(queue.try_get(), Err(Error::QueueEmpty)));
}

/// Says it is about to wait, then waits for an item that the test never sends it.
fn announce_and_take((queue, started): (Queue<u64>, Queue<u8>)) -> u64 {
    started.put(1).expect("announced");
    queue.get().unwrap_or(0)
}

#[test]
fn a_consumer_killed_while_it_waits_in_get_takes_no_item_with_it() {
    // The child waits in `get` on an empty queue; once it is killed, the item put
    // next must reach the next consumer, not the dead one's connection.
    let queue = Queue::<u64>::unbounded();
    let started = Queue::<u8>::unbounded();
    let child = Process::spawn((queue.clone(), started.clone()), announce_and_take).unwrap();
    started
        .get_timeout(Duration::from_secs(20))
        .expect("the child is about to wait");
    // Its `get` request may still be on its way; that changes nothing: the server
    // either sees the hang-up or fails to hand the item over and keeps it.
    child.terminate().unwrap();
    queue.put(7).unwrap();
    let asked = Instant::now();
    assert_eq!(queue.get_timeout(Duration::from_secs(10)).unwrap(), 7);
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );
}

/// Dies (SIGKILL) in its `get`, after the creator sent it an item and before it
/// read a byte of it.
fn die_while_the_item_is_on_its_way(queue: Queue<u64>) -> u64 {
    multiproc::__private::queue_die_before_reading_next_item();
    queue.get().unwrap_or(0)
}

#[test]
fn a_consumer_killed_before_reading_its_item_gives_it_to_the_next_consumer() {
    let queue = Queue::<u64>::bounded(1);
    queue.put(7).unwrap();
    let doomed = Process::spawn(queue.clone(), die_while_the_item_is_on_its_way).unwrap();
    let err = doomed.join().unwrap_err();
    assert!(
        matches!(&err, Error::ProcessExited { .. }) && err.to_string().contains("SIGKILL"),
        "{err}"
    );
    // The item was handed over and never read: it comes back, and another
    // consumer process gets it (the hang guard fails the test if it was lost).
    let next = Process::spawn(queue.clone(), |q: Queue<u64>| {
        q.get_timeout(Duration::from_secs(20))
            .map_err(|e| e.to_string())
    })
    .unwrap();
    assert_eq!(next.join().unwrap(), Ok(7));
    // Acknowledged by that consumer: its place in the bounded queue is free again.
    queue.put_timeout(8, Duration::from_secs(20)).unwrap();
    assert_eq!(queue.try_get().unwrap(), 8);
    assert!(matches!(queue.try_get(), Err(Error::QueueEmpty)));
}
