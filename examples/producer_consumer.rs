//! A producer pool fills a bounded queue, a consumer pool drains it, the parent
//! reports the totals.
//!
//! The tutorials' two pools joined by `Manager().Queue()`. A `Queue` crosses into
//! pool tasks inside their items, like any other value; bounded at 8, it makes the
//! producers wait whenever the consumers fall behind.
//!
//! Run it with `cargo run --release --example producer_consumer`.

use multiproc::{Error, Pool, Queue};

/// Producer `id` puts `count` numbers on the queue; returns its pid and the sum.
fn produce((queue, id, count): (Queue<u64>, u64, u64)) -> (u32, u64) {
    let mut sum = 0;
    for i in 0..count {
        let value = id * 1_000 + i;
        queue
            .put(value)
            .expect("the queue is open while producers run");
        sum += value;
    }
    (std::process::id(), sum)
}

/// Takes numbers until the queue is closed and empty; returns its pid, count, sum.
fn consume(queue: Queue<u64>) -> (u32, u64, u64) {
    let (mut count, mut sum) = (0, 0);
    loop {
        match queue.get() {
            Ok(value) => {
                count += 1;
                sum += value;
            }
            Err(Error::QueueClosed) => return (std::process::id(), count, sum),
            Err(e) => panic!("consumer: {e}"),
        }
    }
}

fn main() -> multiproc::Result<()> {
    multiproc::init();
    println!("parent process {}", std::process::id());
    let queue = Queue::<u64>::bounded(8);
    let producers = Pool::builder().workers(2).chunk_size(1).build()?;
    let consumers = Pool::builder().workers(2).chunk_size(1).build()?;

    let consuming = consumers.map_async(vec![queue.clone(), queue.clone()], consume)?;
    let jobs: Vec<(Queue<u64>, u64, u64)> = (0..4).map(|id| (queue.clone(), id, 250)).collect();
    let produced = producers.map(jobs, produce)?;
    queue.close()?; // every producer is done: consumers drain the rest, then stop
    let consumed = consuming.get()?;

    let put: u64 = produced.iter().map(|&(_, sum)| sum).sum();
    for (pid, sum) in &produced {
        println!("  producer in process {pid}: sum {sum}");
    }
    for (pid, count, sum) in &consumed {
        println!("  consumer in process {pid}: {count} items, sum {sum}");
    }
    let count: u64 = consumed.iter().map(|&(_, count, _)| count).sum();
    let got: u64 = consumed.iter().map(|&(_, _, sum)| sum).sum();
    println!("produced 1000 items summing to {put}; consumed {count} summing to {got}");
    assert_eq!((count, got), (1_000, put));
    Ok(())
}
