//! A pool of 3 workers runs 6 tasks with `apply_async`; a callback in the parent
//! multiplies each result by 10. Python's version:
//!
//! ```python
//! p = Pool(3)
//! for i in [1, 2, 3, 4, 5, 6]:
//!     p.apply_async(t2, args=(i,), callback=t3)
//! p.close(); p.join()
//! ```
//!
//! Run with `cargo run --release --example pool_apply_async`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The task: runs in a worker process, says which one, takes a little while.
fn work(n: u64) -> u64 {
    println!("task {n} starting in worker process {}", std::process::id());
    std::thread::sleep(Duration::from_millis(100 + 50 * (n % 3)));
    println!("task {n} done");
    n
}

fn main() -> multiproc::Result<()> {
    multiproc::init(); // in a worker process this call serves tasks and never returns
    let parent = std::process::id();
    println!("parent process {parent}");

    let pool = multiproc::Pool::builder().workers(3).build()?;
    let by_callback = Arc::new(Mutex::new(Vec::new()));
    let mut handles = Vec::new();
    for n in 1..=6u64 {
        let by_callback = Arc::clone(&by_callback);
        let handle = pool.apply_async_with_callback(
            work,
            n,
            // The callback runs here, in the parent, with each result.
            move |&result: &u64| {
                let tenfold = result * 10;
                println!(
                    "callback in process {}: {result} -> {tenfold}",
                    std::process::id()
                );
                by_callback
                    .lock()
                    .expect("no callback panics")
                    .push(tenfold);
            },
            |error| eprintln!("a task failed: {error}"),
        )?;
        handles.push(handle);
    }
    pool.close(); // no more tasks
    pool.join()?; // wait for all of them and their callbacks

    let results: Vec<u64> = handles
        .into_iter()
        .map(|h| h.get())
        .collect::<multiproc::Result<_>>()?;
    let mut tenfold = by_callback.lock().expect("no callback panics").clone();
    tenfold.sort_unstable();
    println!("results: {results:?}");
    println!("results x 10 (from the callbacks, in the parent): {tenfold:?}");
    assert_eq!(results, [1, 2, 3, 4, 5, 6]);
    assert_eq!(tenfold, [10, 20, 30, 40, 50, 60]);
    println!("parent process {parent} done");
    Ok(())
}
