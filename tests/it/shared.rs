//! Shared inputs: SharedSlice and Shared reach workers as handles to sealed maps.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use multiproc::{Error, Pool, Shared, SharedSlice};

use crate::support::{inline_pool, pool, splitmix64};

/// A directory of this test's own under the temp dir, removed on drop.
struct TestDir(PathBuf);

impl TestDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "multiproc-shared-test-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TestDir(dir)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn ranges(len: usize, parts: usize) -> Vec<(usize, usize)> {
    (0..parts)
        .map(|t| (t * len / parts, (t + 1) * len / parts))
        .collect()
}

fn sum_range(data: &SharedSlice<u64>, r: (usize, usize)) -> u64 {
    data[r.0..r.1].iter().fold(0u64, |a, &b| a.wrapping_add(b))
}

/// The inode of a shared slice's memfd, which names it in `/proc/*/maps`.
fn inode(data: &SharedSlice<u64>) -> u64 {
    let (_, fd) = multiproc::__private::shared_slice_seals(data);
    std::fs::metadata(format!("/proc/self/fd/{fd}"))
        .unwrap()
        .ino()
}

/// Whether any descriptor or map of process `pid` refers to the memfd `ino`.
fn process_holds(pid: &str, ino: u64) -> bool {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|fd| std::fs::metadata(fd.path()).is_ok_and(|m| m.ino() == ino && m.nlink() == 0));
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let mapped = maps.lines().any(|line| {
        line.contains("memfd:multiproc-shared")
            && line.split_whitespace().nth(4) == Some(&ino.to_string())
    });
    fds || mapped
}

/// Whether any process on the machine holds the memfd `ino`.
fn anyone_holds(ino: u64) -> bool {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|name| name.bytes().all(|b| b.is_ascii_digit()))
        .any(|pid| process_holds(&pid, ino))
}

#[test]
fn slices_summed_by_workers_equal_the_sequential_sum() {
    // 64 MiB of u64, 64 ranges, 2 workers.
    let len = 8 << 20;
    let data = SharedSlice::from_iter((0..len as u64).map(splitmix64)).unwrap();
    assert_eq!(data.len(), len);
    let expected = data.iter().fold(0u64, |a, &b| a.wrapping_add(b));
    let pool = pool(2);
    let sums = pool
        .map_with(
            ranges(len, 64),
            &data,
            |data: &SharedSlice<u64>, r: (usize, usize)| {
                data[r.0..r.1].iter().fold(0u64, |a, &b| a.wrapping_add(b))
            },
        )
        .unwrap();
    assert_eq!(sums.len(), 64);
    assert_eq!(sums.iter().fold(0u64, |a, &b| a.wrapping_add(b)), expected);
    let total = pool
        .map_reduce_with(ranges(len, 64), &data, sum_range, || 0, u64::wrapping_add)
        .unwrap();
    assert_eq!(total, expected);
    // The same values from a Vec.
    let copy = SharedSlice::from_vec(data.to_vec()).unwrap();
    let again = pool
        .map_reduce_with(ranges(len, 64), &copy, sum_range, || 0, u64::wrapping_add)
        .unwrap();
    assert_eq!(again, expected);
}

#[test]
fn the_inline_backend_sees_the_same_slice() {
    let data = SharedSlice::from_iter((0..100_000u64).map(splitmix64)).unwrap();
    let expected = data.iter().fold(0u64, |a, &b| a.wrapping_add(b));
    let pool = inline_pool(2, Some(3));
    let total = pool
        .map_reduce_with(
            ranges(data.len(), 16),
            &data,
            sum_range,
            || 0,
            u64::wrapping_add,
        )
        .unwrap();
    assert_eq!(total, expected);
    let shared = Shared::new(vec![1u32, 2, 3]).unwrap();
    let got = pool
        .map_with(0..3usize, &shared, |v: &Shared<Vec<u32>>, i| v[i])
        .unwrap();
    assert_eq!(got, [1, 2, 3]);
}

#[test]
fn from_vec_from_iter_and_from_file_agree() {
    let values: Vec<u64> = (0..10_007u64).map(splitmix64).collect();
    let from_vec = SharedSlice::from_vec(values.clone()).unwrap();
    let from_iter = SharedSlice::from_iter(values.iter().copied()).unwrap();
    // An iterator of unknown length goes through the buffered path.
    let unknown = SharedSlice::from_iter(values.iter().copied().filter(|_| true)).unwrap();
    let dir = TestDir::new("agree");
    let path = dir.0.join("values.bin");
    std::fs::write(&path, bytemuck::cast_slice::<u64, u8>(&values)).unwrap();
    let from_file = SharedSlice::<u64>::from_file(&path).unwrap();
    // SAFETY: the file is this test's own and nothing writes to it while mapped.
    let mapped = unsafe { SharedSlice::<u64>::map_file(&path) }.unwrap();
    for slice in [&from_vec, &from_iter, &unknown, &from_file, &mapped] {
        assert_eq!(&slice[..], &values[..]);
    }
    let expected = values.iter().fold(0u64, |a, &b| a.wrapping_add(b));
    let items = vec![from_vec, from_iter, unknown, from_file, mapped];
    for pool in [inline_pool(2, Some(1)), pool(2)] {
        let sums = pool
            .map(items.clone(), |s: SharedSlice<u64>| {
                s.iter().fold(0u64, |a, &b| a.wrapping_add(b))
            })
            .unwrap();
        assert_eq!(sums, [expected; 5]);
    }
    let pool = pool(2);
    let empty = SharedSlice::<u32>::from_vec(Vec::new()).unwrap();
    assert!(empty.is_empty());
    let lens = pool
        .map(vec![empty], |s: SharedSlice<u32>| s.len())
        .unwrap();
    assert_eq!(lens, [0]);
}

#[test]
fn bad_files_give_errors_naming_the_file() {
    let dir = TestDir::new("bad");
    let odd = dir.0.join("odd-length.bin");
    std::fs::write(&odd, [0u8; 13]).unwrap();
    let empty = dir.0.join("empty.bin");
    std::fs::write(&empty, []).unwrap();
    let missing = dir.0.join("missing.bin");
    for (path, says) in [
        (&odd, "13 bytes are not a whole number of 8-byte"),
        (&empty, "empty"),
        (&missing, "could not open"),
    ] {
        let err = SharedSlice::<u64>::from_file(path).unwrap_err();
        assert!(matches!(err, Error::Share { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains(says), "{message}");
    }
    // A byte slice takes the odd file.
    assert_eq!(SharedSlice::<u8>::from_file(&odd).unwrap().len(), 13);
}

#[test]
fn a_shared_hashmap_is_decoded_once_per_worker() {
    let table: HashMap<String, u32> = (0..1000u32).map(|i| (format!("k{i}"), i)).collect();
    let table = Shared::new(table).unwrap();
    let pool = Pool::builder()
        .workers(2)
        .chunk_size(1)
        .inherit_output(false)
        .build()
        .unwrap();
    let look = |t: &Shared<HashMap<String, u32>>, i: u32| {
        let (attaches, decodes, _) = multiproc::__private::shared_input_counts();
        (t[&format!("k{i}")], std::process::id(), attaches, decodes)
    };
    for _ in 0..3 {
        let got = pool.map_with(0..40u32, &table, look).unwrap();
        for (i, &(value, _, attaches, decodes)) in got.iter().enumerate() {
            assert_eq!(value, i as u32);
            assert_eq!(
                (attaches, decodes),
                (1, 1),
                "worker attached and decoded once"
            );
        }
    }
    // Inside items too, the value is not decoded again.
    let items: Vec<(Shared<HashMap<String, u32>>, u32)> =
        (0..10).map(|i| (table.clone(), i)).collect();
    let got = pool
        .map(items, |(t, i): (Shared<HashMap<String, u32>>, u32)| {
            (
                t[&format!("k{i}")],
                multiproc::__private::shared_input_counts().1,
            )
        })
        .unwrap();
    assert!(
        got.iter()
            .enumerate()
            .all(|(i, &(v, d))| v == i as u32 && d == 1),
        "{got:?}"
    );
}

#[test]
fn a_worker_attaches_a_slice_once_per_pool() {
    let data = SharedSlice::from_iter(0..4096u64).unwrap();
    let pool = Pool::builder()
        .workers(2)
        .chunk_size(1)
        .inherit_output(false)
        .build()
        .unwrap();
    let mut pids = std::collections::HashSet::new();
    for _ in 0..4 {
        let got = pool
            .map_with(
                ranges(4096, 16),
                &data,
                |d: &SharedSlice<u64>, r: (usize, usize)| {
                    let (attaches, _, kept) = multiproc::__private::shared_input_counts();
                    (sum_range(d, r), std::process::id(), attaches, kept)
                },
            )
            .unwrap();
        for &(_, pid, attaches, kept) in &got {
            assert_eq!(attaches, 1);
            assert_eq!(kept, 1);
            pids.insert(pid);
        }
        let total = got.iter().map(|g| g.0).sum::<u64>();
        assert_eq!(total, 4095 * 4096 / 2);
    }
    assert!(!pids.is_empty());
}

#[test]
fn handles_travel_inside_items_and_results() {
    let a = SharedSlice::from_vec(vec![1u32, 2, 3]).unwrap();
    let b = SharedSlice::from_vec(vec![10u32, 20]).unwrap();
    let items = vec![(a.clone(), 0usize), (b, 1), (a.clone(), 2)];
    let pool = pool(2);
    let got = pool
        .map(items, |(s, i): (SharedSlice<u32>, usize)| s[i % s.len()])
        .unwrap();
    assert_eq!(got, [1, 20, 3]);
    // A slice the worker received can come back in its result.
    let back = pool
        .map(vec![a], |s: SharedSlice<u32>| (s.clone(), s.len()))
        .unwrap();
    assert_eq!(&back[0].0[..], &[1, 2, 3]);
    // A slice a task makes can be returned too: the worker keeps it for the parent.
    let made = pool
        .map(0..4u32, |x| SharedSlice::from_vec(vec![x; 1000]).unwrap())
        .unwrap();
    for (x, slice) in made.iter().enumerate() {
        assert_eq!(slice.len(), 1000);
        assert!(slice.iter().all(|&v| v == x as u32));
    }
}

#[test]
fn slices_are_sealed_and_workers_cannot_write_them() {
    let data = SharedSlice::from_vec(vec![7u64; 1024]).unwrap();
    let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
    let (seals, _) = multiproc::__private::shared_slice_seals(&data);
    assert_eq!(seals & want, want);
    let pool = Pool::builder()
        .workers(2)
        .retries(0)
        .inherit_output(false)
        .build()
        .unwrap();
    // In the worker: the seals are there and a write through the descriptor fails.
    let got = pool
        .map_with(0..1u32, &data, |d: &SharedSlice<u64>, _| {
            use std::io::Write;
            let (seals, fd) = multiproc::__private::shared_slice_seals(d);
            let opened = std::fs::OpenOptions::new()
                .write(true)
                .open(format!("/proc/self/fd/{fd}"));
            let refused = match opened {
                Err(e) => e.raw_os_error(),
                Ok(mut f) => f.write_all(&[1]).err().and_then(|e| e.raw_os_error()),
            };
            (seals, refused)
        })
        .unwrap();
    assert_eq!(got[0].0 & want, want);
    assert_eq!(got[0].1, Some(libc::EPERM));
    // A write through the read-only map kills the worker that tries, not the parent.
    let err = pool
        .map_with(0..1u32, &data, |d: &SharedSlice<u64>, _| {
            let p = d.as_ptr() as *mut u64;
            // SAFETY: none: this deliberately writes to a read-only map, which the
            // kernel refuses with SIGSEGV in the worker.
            unsafe { p.write_volatile(1) };
            0u64
        })
        .unwrap_err();
    assert!(matches!(err, Error::WorkerExited { .. }), "{err:?}");
    assert_eq!(data[0], 7);
    assert!(data.iter().all(|&v| v == 7));
}

#[test]
fn large_contexts_are_shared_automatically() {
    let table: Vec<u64> = (0..300_000u64).map(splitmix64).collect(); // 2.4 MB
    let expected = table.iter().fold(0u64, |a, &b| a.wrapping_add(b));
    let task = |t: &Vec<u64>, i: usize| {
        let (attaches, _, _) = multiproc::__private::shared_input_counts();
        (
            t.iter().fold(0u64, |a, &b| a.wrapping_add(b)) ^ i as u64,
            attaches,
        )
    };
    let pool = pool(2);
    let got = pool.map_with(0..4usize, &table, task).unwrap();
    for (i, &(sum, attaches)) in got.iter().enumerate() {
        assert_eq!(sum, expected ^ i as u64);
        assert!(attaches >= 1, "the context came through a shared map");
    }
    let off = Pool::builder()
        .workers(2)
        .share_contexts_above(usize::MAX)
        .inherit_output(false)
        .build()
        .unwrap();
    let got = off.map_with(0..4usize, &table, task).unwrap();
    assert!(got.iter().all(|&(_, attaches)| attaches == 0), "{got:?}");
    let small = Pool::builder()
        .workers(2)
        .share_contexts_above(16)
        .inline(true)
        .build()
        .unwrap();
    let total = small
        .map_reduce_with(
            0..4usize,
            &table,
            |t: &Vec<u64>, i| t[i],
            || 0,
            u64::wrapping_add,
        )
        .unwrap();
    assert_eq!(
        total,
        table[..4].iter().fold(0u64, |a, &b| a.wrapping_add(b))
    );
}

#[test]
fn nothing_is_left_after_the_pool_and_the_handles_are_dropped() {
    let data = SharedSlice::from_iter(0..100_000u64).unwrap();
    let ino = inode(&data);
    let shared = Shared::new(vec![5u8; 4096]).unwrap();
    {
        let pool = pool(2);
        let total = pool
            .map_reduce_with(
                ranges(data.len(), 8),
                &data,
                sum_range,
                || 0,
                u64::wrapping_add,
            )
            .unwrap();
        assert_eq!(total, 99_999 * 100_000 / 2);
        let n = pool
            .map_with(0..2u32, &shared, |s: &Shared<Vec<u8>>, _| s.len())
            .unwrap();
        assert_eq!(n, [4096, 4096]);
        assert!(process_holds("self", ino));
    }
    drop(shared);
    drop(data);
    assert!(
        !process_holds("self", ino),
        "this process still holds the memfd"
    );
    assert!(!anyone_holds(ino), "some process still holds the memfd");
}

#[test]
fn a_parent_killed_with_sigkill_leaves_nothing() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    let shm_before: Vec<_> = std::fs::read_dir("/dev/shm")
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    let mut helper = crate::helpers::helper_command("shared")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let helper_pid = helper.id();
    let (done, watchdog) = std::sync::mpsc::channel::<()>();
    let guard = std::thread::spawn(move || {
        if watchdog.recv_timeout(Duration::from_secs(60)).is_err() {
            // SAFETY: sending a signal has no memory effects in this process.
            unsafe { libc::kill(helper_pid as i32, libc::SIGKILL) };
        }
    });
    let mut lines = BufReader::new(helper.stdout.take().unwrap())
        .lines()
        .map(|l| l.unwrap());
    let ino: u64 = lines
        .by_ref()
        .find_map(|l| l.strip_prefix("memfd inode: ").map(|s| s.parse().unwrap()))
        .expect("the helper reports its shared input");
    let pids: Vec<u32> = lines
        .by_ref()
        .find_map(|l| l.strip_prefix("worker pids:").map(str::to_owned))
        .expect("the helper reports its workers")
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    let attached = lines
        .by_ref()
        .filter(|l| l.starts_with("attached "))
        .take(2)
        .count();
    assert_eq!(attached, 2, "both workers attached the input");
    assert!(anyone_holds(ino));
    let _ = done.send(());
    guard.join().unwrap();
    helper.kill().unwrap();
    helper.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    for pid in pids {
        while crate::support::process_exists(pid) && !is_zombie(pid) {
            assert!(
                Instant::now() < deadline,
                "worker {pid} outlived its parent"
            );
            std::thread::yield_now();
        }
    }
    assert!(
        !anyone_holds(ino),
        "the memfd outlived the processes that held it"
    );
    let shm_after: Vec<_> = std::fs::read_dir("/dev/shm")
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    let new: Vec<_> = shm_after
        .iter()
        .filter(|n| !shm_before.contains(n))
        .collect();
    assert!(new.is_empty(), "left in /dev/shm: {new:?}");
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, r)| r.starts_with('Z')))
        .unwrap_or(true)
}

/// For `a_parent_killed_with_sigkill_leaves_nothing`: shares an input, reports its
/// memfd, and has both workers attach it and block in a task.
pub(crate) fn helper_shared() {
    use std::io::Write;
    let data = SharedSlice::from_iter(0..(1u64 << 20)).unwrap();
    println!("memfd inode: {}", inode(&data));
    let pool = Pool::builder().workers(2).chunk_size(1).build().unwrap();
    let pids: Vec<String> = pool
        .worker_pids()
        .unwrap()
        .iter()
        .map(u32::to_string)
        .collect();
    println!("worker pids: {}", pids.join(" "));
    std::io::stdout().flush().unwrap();
    let _ = pool.map_with(0..2u64, &data, |d: &SharedSlice<u64>, x| -> u64 {
        println!("attached {}", d.len());
        let _ = std::io::stdout().flush();
        loop {
            std::thread::park();
            if x > 2 {
                return x;
            }
        }
    });
}

#[test]
fn a_worker_releases_an_input_the_parent_dropped() {
    let pool = Pool::builder()
        .workers(2)
        .chunk_size(1)
        .inherit_output(false)
        .build()
        .unwrap();
    let kept = |d: &SharedSlice<u64>, _: u32| {
        let (_, _, kept) = multiproc::__private::shared_input_counts();
        (d.len(), kept, std::process::id())
    };
    let first = SharedSlice::from_iter(0..1000u64).unwrap();
    let first_ino = inode(&first);
    let got = pool.map_with(0..8u32, &first, kept).unwrap();
    assert!(
        got.iter().all(|&(len, kept, _)| len == 1000 && kept == 1),
        "{got:?}"
    );
    drop(first);
    // A worker looks again when it attaches another input (or a job ends): the
    // dropped one is released, so each keeps only the new one.
    let second = SharedSlice::from_iter(0..10u64).unwrap();
    let got = pool.map_with(0..8u32, &second, kept).unwrap();
    assert!(
        got.iter().all(|&(len, kept, _)| len == 10 && kept == 1),
        "{got:?}"
    );
    for &(_, _, pid) in &got {
        assert!(
            !process_holds(&pid.to_string(), first_ino),
            "worker {pid} still maps a dropped input"
        );
    }
}

#[test]
fn an_input_larger_than_memory_is_refused_with_the_reason() {
    // 2^50 u64 (8 PiB): refused before anything is written.
    let err = SharedSlice::from_iter(0..(1u64 << 50)).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, Error::Share { .. }), "{err:?}");
    assert!(message.contains("not enough memory"), "{message}");
    assert!(
        message.contains("MemAvailable in /proc/meminfo"),
        "{message}"
    );
}

/// A struct shared as one value: `Shared` takes any serde type.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Model {
    name: String,
    weights: Vec<f64>,
    labels: HashMap<u32, String>,
}

#[test]
fn a_shared_struct_reaches_every_worker_intact() {
    let model = Model {
        name: "m".into(),
        weights: (0..50_000).map(|i| i as f64 * 0.5).collect(),
        labels: (0..100).map(|i| (i, format!("label {i}"))).collect(),
    };
    let expected: f64 = model.weights.iter().sum();
    let model = Shared::new(model).unwrap();
    assert!(model.encoded_len() > 400_000);
    for pool in [inline_pool(2, Some(1)), pool(2)] {
        let got = pool
            .map_with(0..6u32, &model, |m: &Shared<Model>, i| {
                (
                    m.weights.iter().sum::<f64>(),
                    m.labels[&i].clone(),
                    m.name.clone(),
                )
            })
            .unwrap();
        for (i, (sum, label, name)) in got.into_iter().enumerate() {
            assert_eq!(sum, expected);
            assert_eq!(label, format!("label {i}"));
            assert_eq!(name, "m");
        }
    }
}

fn own_input(i: u64) -> SharedSlice<u64> {
    SharedSlice::from_vec(vec![i; 100]).unwrap()
}

fn total(s: SharedSlice<u64>) -> u64 {
    s.iter().sum()
}

#[test]
fn an_item_may_own_the_only_handle_of_its_input() {
    // Each item owns the only handle: the chunk keeps the input alive until its
    // reply arrives, whichever call sent it.
    let expected: Vec<u64> = (0..8).map(|i| i * 100).collect();
    let pool = pool(2);
    assert_eq!(pool.map((0..8).map(own_input), total).unwrap(), expected);
    let lazy: Vec<u64> = pool
        .imap((0..8).map(own_input), total)
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(lazy, expected);
    let pending = pool.map_async((0..8).map(own_input), total).unwrap();
    assert_eq!(pending.get().unwrap(), expected);
    let handles: Vec<_> = (0..8)
        .map(|i| pool.apply_async(total, own_input(i)).unwrap())
        .collect();
    let applied: Vec<u64> = handles.into_iter().map(|h| h.get().unwrap()).collect();
    assert_eq!(applied, expected);
    // The initializer's argument too: every worker, replacements included, decodes it.
    let pool = Pool::builder()
        .workers(2)
        .max_tasks_per_worker(2)
        .inherit_output(false)
        .initializer(total, own_input(3))
        .build()
        .unwrap();
    let got = pool
        .map_with_state(0..6u64, |state: &mut u64, x| *state + x)
        .unwrap();
    assert_eq!(got, [300, 301, 302, 303, 304, 305]);
}

fn wrapping_sum(values: &[u64]) -> u64 {
    values.iter().fold(0u64, |a, &b| a.wrapping_add(b))
}

fn sum(s: &SharedSlice<u64>, i: u32) -> u64 {
    wrapping_sum(s) ^ u64::from(i)
}

/// A worker's own `map_file` of the file at `path`, returned to the parent.
fn map_in_worker(path: String) -> SharedSlice<u64> {
    // SAFETY: the file is the test's own and nothing writes to it while mapped.
    unsafe { SharedSlice::<u64>::map_file(path) }.unwrap()
}

#[test]
fn a_mapped_file_reaches_workers_as_context_and_initializer_but_does_not_come_back() {
    let values: Vec<u64> = (0..4096u64).map(splitmix64).collect();
    let expected = wrapping_sum(&values);
    let dir = TestDir::new("mapped");
    let path = dir.0.join("values.bin");
    std::fs::write(&path, bytemuck::cast_slice::<u64, u8>(&values)).unwrap();
    // SAFETY: the file is this test's own and nothing writes to it while mapped.
    let mapped = unsafe { SharedSlice::<u64>::map_file(&path) }.unwrap();
    // A context sent as it is, and one sent through a sealed region (its encoding
    // names the unsealed file).
    for above in [usize::MAX, 0] {
        let pool = Pool::builder()
            .workers(2)
            .share_contexts_above(above)
            .inherit_output(false)
            .build()
            .unwrap();
        let got = pool.map_with(0..4u32, &mapped, sum).unwrap();
        assert_eq!(got, [0, 1, 2, 3].map(|i| expected ^ i), "above {above}");
    }
    // The initializer's argument, replacement workers included.
    let pool = Pool::builder()
        .workers(2)
        .max_tasks_per_worker(2)
        .inherit_output(false)
        .initializer(|s: SharedSlice<u64>| s, mapped.clone())
        .build()
        .unwrap();
    let got = pool
        .map_with_state(0..6u32, |s: &mut SharedSlice<u64>, i| sum(s, i))
        .unwrap();
    assert_eq!(got, [0, 1, 2, 3, 4, 5].map(|i| expected ^ i));
    // A worker's own map of a file (one the parent has not mapped) is not sealed
    // and no grant covers it in the parent: the result is refused, not mapped.
    let other = dir.0.join("other.bin");
    std::fs::write(&other, bytemuck::cast_slice::<u64, u8>(&values)).unwrap();
    let err = pool
        .map(vec![other.display().to_string()], map_in_worker)
        .unwrap_err();
    let message = format!("{err:?}");
    assert!(message.contains("is not sealed"), "{message}");
}

/// Puts two items naming shared inputs it made, drops its handles and exits.
fn put_slices_and_exit(queue: multiproc::Queue<(u64, SharedSlice<u64>)>) {
    for i in 1..=2u64 {
        let slice = SharedSlice::from_vec(vec![i; 1_000]).unwrap();
        queue.put((i, slice)).unwrap();
    }
}

fn take_and_sum(queue: multiproc::Queue<(u64, SharedSlice<u64>)>) -> Result<(u64, u64), String> {
    let (i, slice) = queue.get().map_err(|e| e.to_string())?;
    Ok((i, slice.iter().sum::<u64>()))
}

#[test]
fn a_shared_slice_in_a_queue_item_outlives_the_producer_that_dropped_it() {
    let queue = multiproc::Queue::<(u64, SharedSlice<u64>)>::unbounded();
    // The producer is gone, with every handle it had, before anyone takes an item.
    multiproc::Process::spawn(queue.clone(), put_slices_and_exit)
        .unwrap()
        .join()
        .unwrap();
    // Taken here, in the queue's own process, and by another process.
    let (i, slice) = queue.get().unwrap();
    assert_eq!((i, slice.iter().sum::<u64>()), (1, 1_000u64));
    let consumer = multiproc::Process::spawn(queue.clone(), take_and_sum).unwrap();
    assert_eq!(consumer.join().unwrap(), Ok((2, 2_000)));
    // And from this process to another: the item is put, the slice dropped here.
    queue
        .put((3, SharedSlice::from_vec(vec![3; 1_000]).unwrap()))
        .unwrap();
    let consumer = multiproc::Process::spawn(queue.clone(), take_and_sum).unwrap();
    assert_eq!(consumer.join().unwrap(), Ok((3, 3_000)));
}

fn send_slice_and_exit(end: multiproc::Pipe<SharedSlice<u64>, ()>) {
    let slice = SharedSlice::from_vec((0..1_000u64).collect()).unwrap();
    end.send(slice).unwrap();
}

#[test]
fn a_shared_slice_sent_on_a_pipe_outlives_the_sender_that_dropped_it() {
    let (sender, receiver) = multiproc::Pipe::<SharedSlice<u64>, ()>::one_way().unwrap();
    multiproc::Process::spawn(sender, send_slice_and_exit)
        .unwrap()
        .join()
        .unwrap();
    let slice = receiver.recv().unwrap();
    assert_eq!(slice.iter().sum::<u64>(), (0..1_000u64).sum::<u64>());
}

#[test]
fn a_mapped_file_is_refused_by_a_queue_and_a_pipe_when_it_is_sent() {
    let dir = TestDir::new("mapped-file-channels");
    let path = dir.0.join("input");
    std::fs::write(&path, [7u8; 64]).unwrap();
    // SAFETY: the file is this test's own, and nothing writes to it from now on.
    let mapped = unsafe { SharedSlice::<u64>::map_file(&path) }.unwrap();
    let queue = multiproc::Queue::<SharedSlice<u64>>::unbounded();
    let err = queue.put(mapped.clone()).unwrap_err();
    assert!(matches!(err, Error::EncodeItem { item: 0, .. }), "{err:?}");
    assert!(format!("{err:?}").contains("map_file"), "{err:?}");
    assert!(matches!(queue.try_get(), Err(Error::QueueEmpty)));
    let (sender, receiver) = multiproc::Pipe::<SharedSlice<u64>, ()>::one_way().unwrap();
    let err = sender.send(mapped).unwrap_err();
    assert!(format!("{err:?}").contains("map_file"), "{err:?}");
    assert!(matches!(receiver.try_recv(), Err(Error::Timeout(_))));
}
