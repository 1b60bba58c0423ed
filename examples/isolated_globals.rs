//! A child changes a global; the parent's copy is unchanged.
//!
//! The tutorials show that processes do not share memory: a child appends to a
//! global list and the parent, printing it afterwards, still sees the original.
//! In multiproc the child is this program started again (like Python's `spawn`
//! start method, not `fork`): it begins from the program's initial state, not from
//! a copy of the parent's memory. So the child does not even see the parent's
//! change made before it started; only its argument carries data across.
//!
//! Run it with `cargo run --release --example isolated_globals`.

use std::sync::Mutex;

use multiproc::Process;

static NUMBERS: Mutex<Vec<u64>> = Mutex::new(Vec::new());

fn add_in_child(extra: u64) -> Vec<u64> {
    let mut numbers = NUMBERS.lock().expect("not poisoned");
    numbers.push(extra);
    println!(
        "  child {}: the global is now {numbers:?}",
        std::process::id()
    );
    numbers.clone()
}

fn main() -> multiproc::Result<()> {
    multiproc::init();
    NUMBERS.lock().expect("not poisoned").extend([1, 2, 3]);
    println!(
        "parent {}: the global is {:?}",
        std::process::id(),
        NUMBERS.lock().expect("not poisoned")
    );
    let child = Process::spawn(100u64, add_in_child)?;
    println!("started child {}", child.pid());
    let seen_by_child = child.join()?;
    let parent = NUMBERS.lock().expect("not poisoned").clone();
    println!(
        "parent {}: the global is still {parent:?}",
        std::process::id()
    );
    // The child started from the initial (empty) list, not from the parent's copy.
    assert_eq!(seen_by_child, [100]);
    assert_eq!(parent, [1, 2, 3]);
    Ok(())
}
