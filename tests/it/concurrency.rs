//! Blocking calls from several threads on one pool: each progresses, and each keeps
//! its own deadline, whatever the others do.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use multiproc::{Error, Pool, Queue};

fn inc(x: u64) -> u64 {
    x + 1
}

/// Item 0 says it started; every item takes 100 ms.
fn slow((started, x): (Queue<u8>, u64)) -> u64 {
    if x == 0 {
        started.put(1).expect("announced");
    }
    std::thread::sleep(Duration::from_millis(100));
    x
}

#[test]
fn a_blocking_call_runs_while_another_thread_drives_a_long_map() {
    // Thread A's map takes 5 s of work on 2 workers (ended at 3 s by the call
    // timeout). Thread B's one-item map, started while A's runs, must not wait for
    // A's call to end: the callers take turns driving, so B's item runs as soon as
    // a worker is free.
    let pool = Pool::builder()
        .workers(2)
        .call_timeout(Duration::from_secs(3))
        .inherit_output(false)
        .build()
        .unwrap();
    let started = Queue::<u8>::unbounded();
    std::thread::scope(|scope| {
        let long = scope.spawn(|| {
            let items: Vec<(Queue<u8>, u64)> = (0..100).map(|x| (started.clone(), x)).collect();
            pool.map(items, slow)
        });
        started
            .get_timeout(Duration::from_secs(20))
            .expect("the long map started");
        let asked = Instant::now();
        assert_eq!(pool.map(vec![5u64], inc).unwrap(), [6]);
        let took = asked.elapsed();
        assert!(
            took < Duration::from_millis(1_500),
            "the short map waited {took:?} for the long one"
        );
        assert!(matches!(
            long.join().unwrap(),
            Err(Error::CallTimedOut { .. })
        ));
    });
}

#[test]
fn a_call_waiting_for_the_engine_keeps_its_own_deadline() {
    // Thread A holds the engine inside its own input iterator, which blocks. A
    // call from thread B cannot drive meanwhile; it must end at its call timeout
    // instead of waiting for A.
    let pool = Pool::builder()
        .workers(1)
        .call_timeout(Duration::from_secs(1))
        .inherit_output(false)
        .build()
        .unwrap();
    let (entered_tx, entered) = mpsc::channel::<()>();
    let (release, released) = mpsc::channel::<()>();
    let pool = &pool;
    std::thread::scope(|scope| {
        let blocked = scope.spawn(move || {
            let mut first = true;
            let items = std::iter::from_fn(move || {
                if first {
                    first = false;
                    return Some(1u64);
                }
                let _ = entered_tx.send(());
                let _ = released.recv();
                None
            });
            pool.map(items, inc)
        });
        entered
            .recv_timeout(Duration::from_secs(20))
            .expect("A is inside its iterator");
        let asked = Instant::now();
        let err = pool.apply(inc, 1).err();
        let err2 = pool.map(vec![1u64], inc).unwrap_err();
        let took = asked.elapsed();
        release.send(()).unwrap();
        assert!(
            matches!(err2, Error::CallTimedOut { done: 0, .. }),
            "{err2:?}"
        );
        // `apply` goes through the inbox: it waits for its value, within its timeout.
        assert!(
            matches!(err, None | Some(Error::CallTimedOut { .. })),
            "{err:?}"
        );
        assert!(took < Duration::from_secs(4), "took {took:?}");
        let _ = blocked.join().unwrap();
    });
}

fn square(x: u64) -> u64 {
    x * x
}

#[test]
fn calls_from_four_threads_taking_turns_each_get_exact_results() {
    // Small chunks keep every thread's job in flight at once, so the callers hand
    // the engine over many times and replies are held for whoever is not driving.
    let pool = Pool::builder()
        .workers(2)
        .chunk_size(500)
        .inherit_output(false)
        .build()
        .unwrap();
    let n = 100_000u64;
    let expected_sum: u64 = (0..n).map(square).fold(0, u64::wrapping_add);
    std::thread::scope(|scope| {
        let sums: Vec<_> = (0..2)
            .map(|_| {
                scope.spawn(|| {
                    pool.map_reduce(0..n, square, || 0, u64::wrapping_add)
                        .unwrap()
                })
            })
            .collect();
        let mapped = scope.spawn(|| pool.map(0..n, square).unwrap());
        let streamed = scope.spawn(|| {
            pool.imap(0..n, square)
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap()
        });
        for sum in sums {
            assert_eq!(sum.join().unwrap(), expected_sum);
        }
        let expected: Vec<u64> = (0..n).map(square).collect();
        assert_eq!(mapped.join().unwrap(), expected);
        assert_eq!(streamed.join().unwrap(), expected);
    });
}
