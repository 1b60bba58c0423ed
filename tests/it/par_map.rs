//! Results, order and reductions on real worker processes and on the inline backend.

use serde::{Deserialize, Serialize};

use crate::support::{
    inline_pool, pool, pool_with_chunks, random_strings, random_u64s, splitmix64,
};

#[test]
fn results_keep_input_order_for_every_length_and_chunk_size() {
    for len in [0usize, 1, 7, 1000, 100_000] {
        let input = random_u64s(len, 7);
        let expected: Vec<u64> = input.iter().copied().map(splitmix64).collect();
        for chunk in [1, 7, len, len + 1] {
            if chunk == 0 || (len == 100_000 && chunk == 1) {
                continue; // covered below with fewer round trips
            }
            let pool = pool_with_chunks(2, chunk);
            let got = pool.map(input.clone(), splitmix64).unwrap();
            assert_eq!(got, expected, "len {len}, chunk size {chunk}");
        }
    }
}

#[test]
fn one_item_chunks_keep_order_over_many_round_trips() {
    let input = random_u64s(20_000, 8);
    let expected: Vec<u64> = input.iter().copied().map(splitmix64).collect();
    let pool = pool_with_chunks(2, 1);
    assert_eq!(pool.map(input, splitmix64).unwrap(), expected);
}

#[test]
fn adaptive_chunks_keep_order() {
    let input = random_u64s(100_000, 9);
    let expected: Vec<u64> = input.iter().copied().map(splitmix64).collect();
    let pool = pool(2);
    assert_eq!(pool.map(input.clone(), splitmix64).unwrap(), expected);
    // The same pool serves another call, and a lazily generated input.
    let lazy = pool
        .map((0..100_000u64).map(|i| i * 3), splitmix64)
        .unwrap();
    let lazy_expected: Vec<u64> = (0..100_000u64).map(|i| splitmix64(i * 3)).collect();
    assert_eq!(lazy, lazy_expected);
}

#[test]
fn strings_cross_both_ways() {
    let input = random_strings(5_000, 11);
    let expected: Vec<String> = input.iter().map(|s| s.to_uppercase()).collect();
    let pool = pool(2);
    let got = pool.map(input, |s: String| s.to_uppercase()).unwrap();
    assert_eq!(got, expected);
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Reading {
    sensor: String,
    values: Vec<f64>,
    flag: Option<bool>,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Summary {
    sensor: String,
    count: usize,
    max: f64,
}

fn summarize(r: Reading) -> Summary {
    Summary {
        count: r.values.len(),
        max: r.values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        sensor: r.sensor,
    }
}

#[test]
fn structs_cross_both_ways() {
    let input: Vec<Reading> = random_u64s(2_000, 12)
        .into_iter()
        .enumerate()
        .map(|(i, x)| Reading {
            sensor: format!("s{i}"),
            values: (0..(x % 17)).map(|k| (x >> k) as f64).collect(),
            flag: (x % 3 == 0).then_some(x % 2 == 0),
        })
        .collect();
    let expected: Vec<Summary> = input.iter().cloned().map(summarize).collect();
    let pool = pool_with_chunks(2, 7);
    assert_eq!(pool.map(input, summarize).unwrap(), expected);
}

#[test]
fn map_reduce_folds_in_input_order() {
    // String concatenation is associative but not commutative: any reordering shows.
    let input: Vec<u32> = (0..3_000).collect();
    let expected: String = input.iter().map(|i| format!("{i},")).collect();
    for chunk in [1, 7, 3_000, 3_001] {
        let pool = pool_with_chunks(2, chunk);
        let got = pool
            .map_reduce(
                input.clone(),
                |i: u32| format!("{i},"),
                String::new,
                |a, b| a + &b,
            )
            .unwrap();
        assert_eq!(got, expected, "chunk size {chunk}");
    }
}

#[test]
fn map_reduce_of_nothing_is_the_identity() {
    let pool = pool(2);
    let sum: u64 = pool
        .map_reduce(Vec::<u64>::new(), |x| x, || 42, |a, b| a + b)
        .unwrap();
    assert_eq!(sum, 42);
}

#[test]
fn map_reduce_matches_the_sequential_sum() {
    let pool = pool(2);
    let got: u64 = pool
        .map_reduce(0..1_000_000u64, splitmix64, || 0, u64::wrapping_add)
        .unwrap();
    let expected = (0..1_000_000u64).map(splitmix64).fold(0, u64::wrapping_add);
    assert_eq!(got, expected);
    // W1's published checksum for N = 1,000,000.
    assert_eq!(got, 0xf7c3_89e9_7fb1_b53b);
}

#[test]
fn context_reaches_every_worker_once_per_call() {
    let pool = pool(2);
    let table: Vec<u64> = random_u64s(10_000, 13);
    let got = pool
        .map_with(0..5_000usize, &table, |t: &Vec<u64>, i| t[i] ^ t[i + 1])
        .unwrap();
    let expected: Vec<u64> = (0..5_000).map(|i| table[i] ^ table[i + 1]).collect();
    assert_eq!(got, expected);
    // A different context in the next call replaces the first.
    let other: Vec<u64> = vec![1; 10_000];
    let sum: u64 = pool
        .map_reduce_with(
            0..5_000usize,
            &other,
            |t: &Vec<u64>, i| t[i],
            || 0,
            |a, b| a + b,
        )
        .unwrap();
    assert_eq!(sum, 5_000);
}

#[test]
fn large_items_and_results_travel_through_shared_memory() {
    // Each item and each result is far above the 200 KiB inline frame limit.
    let input: Vec<Vec<u8>> = (0..6u8)
        .map(|i| vec![i; 300_000 + usize::from(i)])
        .collect();
    let pool = pool(2);
    let (sent, received) = multiproc::__private::shared_memory_frames();
    let got = pool
        .map(input.clone(), |v: Vec<u8>| {
            v.iter().map(|b| b.wrapping_add(1)).collect::<Vec<u8>>()
        })
        .unwrap();
    for (i, v) in got.iter().enumerate() {
        assert_eq!(v.len(), 300_000 + i);
        assert!(v.iter().all(|&b| b == i as u8 + 1));
    }
    // Every chunk of items and of results took the shared-memory path (other tests
    // running beside this one can only add to the counts).
    let (sent_after, received_after) = multiproc::__private::shared_memory_frames();
    assert!(sent_after - sent >= 3, "{sent} -> {sent_after}");
    assert!(
        received_after - received >= 3,
        "{received} -> {received_after}"
    );
    let sizes: usize = pool
        .map_reduce(input, |v: Vec<u8>| v.len(), || 0, |a, b| a + b)
        .unwrap();
    assert_eq!(sizes, 6 * 300_000 + 15);
}

#[test]
fn inline_backend_gives_the_same_results() {
    let input = random_u64s(10_000, 14);
    let expected: Vec<u64> = input.iter().copied().map(splitmix64).collect();
    for chunk in [None, Some(1), Some(7), Some(10_001)] {
        let pool = inline_pool(2, chunk);
        assert_eq!(pool.map(input.clone(), splitmix64).unwrap(), expected);
        let concat = pool
            .map_reduce(0..500u32, |i| i.to_string(), String::new, |a, b| a + &b)
            .unwrap();
        assert_eq!(
            concat,
            (0..500u32).map(|i| i.to_string()).collect::<String>()
        );
    }
}

#[test]
fn calls_from_several_threads_share_one_pool() {
    let pool = pool(2);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let pool = &pool;
            s.spawn(move || {
                let got = pool.map((0..2_000u64).map(|i| i + t), splitmix64).unwrap();
                let expected: Vec<u64> = (0..2_000u64).map(|i| splitmix64(i + t)).collect();
                assert_eq!(got, expected);
            });
        }
    });
}

#[test]
fn the_default_pool_serves_par_map() {
    let squares: Vec<u64> = multiproc::par_map(0..100u64, |x| x * x).unwrap();
    assert_eq!(squares, (0..100u64).map(|x| x * x).collect::<Vec<_>>());
    let total: u64 = multiproc::par_map_reduce(0..1_000u64, |x| x, || 0, |a, b| a + b).unwrap();
    assert_eq!(total, 499_500);
}

#[test]
fn random_shapes_match_the_sequential_answer() {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    // Seeded cases over lengths, chunk sizes and worker counts: threads for many
    // cases, real processes for a few.
    let mut rng = StdRng::seed_from_u64(2026);
    for case in 0..120 {
        let len = rng.random_range(0..400usize);
        let chunk = rng.random_range(1..len + 3);
        let workers = rng.random_range(1..5usize);
        let input = random_u64s(len, case);
        let pool = if case % 20 == 0 {
            pool_with_chunks(workers, chunk)
        } else {
            inline_pool(workers, Some(chunk))
        };
        let expected: Vec<u64> = input.iter().copied().map(splitmix64).collect();
        let got = pool.map(input.clone(), splitmix64).unwrap();
        assert_eq!(
            got, expected,
            "case {case}: len {len}, chunk {chunk}, workers {workers}"
        );
        let concat = pool
            .map_reduce(
                input.clone(),
                |x: u64| format!("{x:x};"),
                String::new,
                |a, b| a + &b,
            )
            .unwrap();
        let expected: String = input.iter().map(|x| format!("{x:x};")).collect();
        assert_eq!(
            concat, expected,
            "case {case}: len {len}, chunk {chunk}, workers {workers}"
        );
    }
}
