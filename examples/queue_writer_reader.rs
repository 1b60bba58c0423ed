//! A writer process puts A, B, C on a queue; a reader process prints them.
//!
//! The tutorials' `Queue` story: `q = Queue()`, `Process(target=write, args=(q,))`,
//! `Process(target=read, args=(q,))`. The two children are siblings: the parent only
//! creates the queue and hands each a clone inside its argument. Instead of the
//! tutorial's endless `while True: q.get()` and `terminate()`, the parent closes the
//! queue once the writer is done, and the reader stops when it has drained it.
//!
//! Run it with `cargo run --release --example queue_writer_reader`.

use multiproc::{Error, Process, Queue};

fn write(queue: Queue<String>) {
    for value in ["A", "B", "C"] {
        println!("  writer {}: put {value}", std::process::id());
        queue.put(value.to_string()).expect("the queue is open");
    }
}

fn read(queue: Queue<String>) -> usize {
    let mut count = 0;
    loop {
        match queue.get() {
            Ok(value) => {
                println!("  reader {}: got {value}", std::process::id());
                count += 1;
            }
            Err(Error::QueueClosed) => return count,
            Err(e) => panic!("reader: {e}"),
        }
    }
}

fn main() -> multiproc::Result<()> {
    multiproc::init();
    println!("parent process {}", std::process::id());
    let queue = Queue::<String>::unbounded();
    let writer = Process::builder()
        .name("writer")
        .spawn(queue.clone(), write)?;
    let reader = Process::builder()
        .name("reader")
        .spawn(queue.clone(), read)?;
    println!("writer {}, reader {}", writer.pid(), reader.pid());
    writer.join()?;
    queue.close()?; // no sentinel: the reader drains what is left, then stops
    let read = reader.join()?;
    println!("the reader got {read} values");
    assert_eq!(read, 3);
    Ok(())
}
