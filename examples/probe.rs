//! probe
fn sm(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
fn main() {
    multiproc::init();
    let pool = multiproc::Pool::builder().workers(2).build().unwrap();
    for _ in 0..3 {
        pool.map_reduce(0..10_000_000u64, sm, || 0, u64::wrapping_add)
            .unwrap();
    }
    let mut v = vec![];
    for _ in 0..25 {
        let t = std::time::Instant::now();
        let s = pool
            .map_reduce(0..10_000_000u64, sm, || 0, u64::wrapping_add)
            .unwrap();
        v.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(s, 0x7f7150bd29b4988b);
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "W1 median {:.1} ms min {:.1} -> {:.0} M items/s",
        v[12],
        v[0],
        10_000.0 / v[12]
    );
}
