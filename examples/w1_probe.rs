//! A probe for counting what W1's per-item path costs: three `map_reduce` calls of
//! `splitmix64` over 2 M items, on the inline backend, so that one process holds
//! the parent and both workers and `valgrind --tool=callgrind` counts them all:
//!
//! ```sh
//! cargo build --profile user --example w1_probe
//! valgrind --tool=callgrind target/user/examples/w1_probe   # "Collected : N" instructions
//! ```
//!
//! Instruction counts repeat exactly from run to run, where this VM's wall-clock
//! times move by 20%; `BENCHMARKS.md` has the counts before and after changes to
//! the per-item path.

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn main() -> multiproc::Result<()> {
    multiproc::init();
    let pool = multiproc::Pool::builder().workers(2).inline(true).build()?;
    let mut total = 0u64;
    for _ in 0..3 {
        let sum = pool.map_reduce(0..2_000_000u64, splitmix64, || 0, u64::wrapping_add)?;
        total = total.wrapping_add(sum);
    }
    println!("{total:#x}");
    Ok(())
}
