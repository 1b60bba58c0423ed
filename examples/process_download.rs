//! Two downloads in two processes take the time of the longer, not the sum.
//!
//! The tutorials' first `Process` story: `Process(target=download, args=(...))`,
//! `start()`, `join()`. Here each "download" is simulated by a sleep; the parent
//! starts both children, waits for both, and reports the elapsed time.
//!
//! Run it with `cargo run --release --example process_download`.

use std::time::{Duration, Instant};

use multiproc::Process;

/// Pretends to download `file`, which takes `seconds` tenths of a second.
fn download((file, tenths): (String, u64)) -> String {
    println!(
        "  process {} (parent {}): starting to download {file}",
        std::process::id(),
        std::os::unix::process::parent_id()
    );
    std::thread::sleep(Duration::from_millis(100 * tenths));
    println!(
        "  process {}: {file} done after {tenths}/10 s",
        std::process::id()
    );
    file
}

fn main() -> multiproc::Result<()> {
    multiproc::init(); // first line of main: in a child process it runs its task and never returns
    println!("parent process {}", std::process::id());
    let started = Instant::now();
    let first = Process::builder()
        .name("download-python")
        .spawn(("Python.pdf".to_string(), 5), download)?;
    let second = Process::builder()
        .name("download-rust")
        .spawn(("Rust.pdf".to_string(), 3), download)?;
    println!("started children {} and {}", first.pid(), second.pid());
    let a = first.join()?;
    let b = second.join()?;
    let elapsed = started.elapsed();
    println!(
        "downloaded {a} and {b} in {:.2} s (0.5 s + 0.3 s one after the other would be 0.8 s)",
        elapsed.as_secs_f64()
    );
    assert!(
        elapsed < Duration::from_millis(800),
        "the downloads ran one after the other"
    );
    Ok(())
}
