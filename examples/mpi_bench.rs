//! W1, W2 and a job's fixed cost, timed at rank 0: run on one machine, or as an MPI
//! job (`mpirun -n K --bind-to none`) to compare the backends at equal workers.
//! `benches/mpi.sh` runs it both ways and prints the table kept in BENCHMARKS.md.
//!
//! Prints one line per workload: `name backend workers median_seconds value`, where
//! value is items/s (W1), efficiency against the sequential loop (W2), or
//! milliseconds (start).
//!
//! Run with `cargo run --release --features mpi --example mpi_bench -- WORKERS`.

use std::time::Instant;

use multiproc::Pool;
use rayon::prelude::*;

const W1_ITEMS: u64 = 10_000_000;
const W1_CHECKSUM: u64 = 0x7f71_50bd_29b4_988b;
const W2_TASKS: u64 = 256;
const W2_ROUNDS: u64 = 1_500_000;

fn sm(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn w2_task(i: u64) -> u64 {
    let mut x = i;
    for _ in 0..W2_ROUNDS {
        x = sm(x);
    }
    x
}

/// The median of three timed runs, in seconds.
fn median(mut run: impl FnMut()) -> f64 {
    let mut times: Vec<f64> = (0..3)
        .map(|_| {
            let started = Instant::now();
            run();
            started.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[1]
}

fn main() -> multiproc::Result<()> {
    multiproc::init();
    let workers: usize = std::env::args()
        .nth(1)
        .map_or(2, |w| w.parse().expect("a number of workers"));
    let backend = if std::env::var_os("OMPI_COMM_WORLD_SIZE").is_some() {
        format!(
            "mpi-{}",
            std::env::var("OMPI_COMM_WORLD_SIZE").unwrap_or_default()
        )
    } else {
        "process".to_owned()
    };
    // The fixed cost of a job: a new pool of `workers` and its first result.
    let start = median(|| {
        let pool = Pool::builder().workers(workers).build().unwrap();
        assert_eq!(pool.map(0..1u64, sm).unwrap(), [sm(0)]);
    });
    println!("start {backend} {workers} {start:.4} {:.2}", start * 1e3);

    let pool = Pool::builder().workers(workers).build()?;
    let w1 = median(|| {
        let sum = pool
            .map_reduce(0..W1_ITEMS, sm, || 0, u64::wrapping_add)
            .unwrap();
        assert_eq!(sum, W1_CHECKSUM);
    });
    println!("w1 {backend} {workers} {w1:.4} {:.0}", W1_ITEMS as f64 / w1);

    let sequential = median(|| {
        let sum = (0..W2_TASKS).map(w2_task).fold(0, u64::wrapping_add);
        std::hint::black_box(sum);
    });
    let expected = (0..W2_TASKS)
        .into_par_iter()
        .map(w2_task)
        .reduce(|| 0, u64::wrapping_add);
    let w2 = median(|| {
        let sum = pool
            .map_reduce(0..W2_TASKS, w2_task, || 0, u64::wrapping_add)
            .unwrap();
        assert_eq!(sum, expected);
    });
    let efficiency = sequential / (w2 * workers as f64);
    println!("w2 {backend} {workers} {w2:.4} {efficiency:.3}");
    println!("w2-sequential {backend} 1 {sequential:.4} 1.000");
    Ok(())
}
