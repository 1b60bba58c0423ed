//! The program from the design overview: `par_map`, `par_map_reduce`, and a pool.
//!
//! Run it with `cargo run --release --example quickstart`.

fn main() -> multiproc::Result<()> {
    multiproc::init(); // first line of main: in a worker process it serves tasks and never returns

    let squares: Vec<u64> = multiproc::par_map(0..1_000u64, |x| x * x)?;
    println!(
        "par_map: {} squares, the last three {:?}",
        squares.len(),
        &squares[997..]
    );

    let total: u64 = multiproc::par_map_reduce(0..1_000_000u64, |x| x * x, || 0, |a, b| a + b)?;
    println!("par_map_reduce: sum of squares below 1,000,000 = {total}");

    let pool = multiproc::Pool::builder().workers(4).build()?; // default: num_cpus::get()
    let lens: Vec<usize> = pool.map(vec!["a".to_string(), "bb".into()], |s: String| s.len())?;
    println!("pool of {} workers, map: lengths {lens:?}", pool.workers());
    let sum: u64 = pool.map_reduce(0..10u64, |x| x, || 0, |a, b| a + b)?;
    println!("pool map_reduce: 0 + 1 + ... + 9 = {sum}");
    let offset = 10u64; // state travels as a context value, sent once to each worker
    let shifted: Vec<u64> = pool.map_with(0..4u64, &offset, |off: &u64, x| x + off)?;
    println!("pool map_with an offset of {offset}: {shifted:?}");

    // Isolation: a panicking task costs one error naming the item, not the job.
    let err = pool
        .map(0..100u64, |x| if x == 13 { panic!("unlucky") } else { x })
        .unwrap_err();
    println!("a task that panics on item 13 gives: {err}");
    let again: u64 = pool.map_reduce(0..100u64, |x| x, || 0, |a, b| a + b)?;
    println!("and the same pool carries on: {again}");
    Ok(())
}
