//! A child sends a value through a pipe; then a request and its answer over a
//! duplex pipe.
//!
//! The tutorials' `Pipe` story: `parent_conn, child_conn = Pipe()`, the child
//! `send`s, the parent `recv`s. The child's end moves into the child (this process
//! keeps no copy), so when the child exits, a further `recv` here is an error
//! rather than a hang.
//!
//! Run it with `cargo run --release --example pipe`.

use multiproc::{Error, Pipe, Process};

fn send_greeting(end: Pipe<String, ()>) {
    let message = format!("hello from process {}", std::process::id());
    end.send(message).expect("the parent holds the other end");
}

/// Answers each question with its word count until the parent hangs up.
fn answer(end: Pipe<usize, String>) -> usize {
    let mut answered = 0;
    while let Ok(question) = end.recv() {
        println!("  child {}: asked {question:?}", std::process::id());
        end.send(question.split_whitespace().count())
            .expect("the parent listens");
        answered += 1;
    }
    answered
}

fn main() -> multiproc::Result<()> {
    multiproc::init();
    println!("parent process {}", std::process::id());

    let (sender, receiver) = Pipe::<String, ()>::one_way()?;
    let child = Process::spawn(sender, send_greeting)?;
    println!("child {} started", child.pid());
    println!("received: {}", receiver.recv()?);
    child.join()?;
    assert!(matches!(receiver.recv(), Err(Error::PipeClosed)));
    println!(
        "after the child exited, recv reports: {}",
        Error::PipeClosed
    );

    let (here, there) = Pipe::<String, usize>::duplex()?;
    let child = Process::spawn(there, answer)?;
    for question in ["how many words is this", "and this"] {
        here.send(question.to_string())?;
        println!("parent: {question:?} has {} words", here.recv()?);
    }
    drop(here); // the child's recv now fails, and it returns
    println!("the child answered {} questions", child.join()?);
    Ok(())
}
