//! The word-count example's job, on small trees with known counts: the pipeline, its
//! sequential reference and an independent naive count must all agree. And its
//! command line.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[path = "../../examples/wordcount/cli.rs"]
mod cli;
#[path = "../../examples/wordcount/count.rs"]
mod count;

use count::{Counts, Piece, Shape, Tally};

/// A small pipeline: tiny batches, so even this tree makes many of them.
fn shape(batch_bytes: u64) -> Shape {
    Shape {
        read_workers: 1,
        count_workers: 2,
        batch_bytes,
        inherit_output: false,
    }
}

fn sorted(counts: &Counts) -> BTreeMap<String, u64> {
    counts.iter().map(|(w, &n)| (w.clone(), n)).collect()
}

/// Words counted the slow, obvious way: whole files, one byte at a time.
fn naive_count(root: &Path, counts: &mut BTreeMap<String, u64>) -> (u64, u64, u64) {
    let (mut files, mut bytes, mut words) = (0, 0, 0);
    let mut entries: Vec<_> = fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        let meta = fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            let (f, b, w) = naive_count(&path, counts);
            files += f;
            bytes += b;
            words += w;
        } else if meta.is_file() {
            let Ok(text) = fs::read(&path) else { continue };
            files += 1;
            bytes += text.len() as u64;
            let mut word = String::new();
            for &b in text.iter().chain([b' '].iter()) {
                let c = b.to_ascii_lowercase();
                if c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' {
                    word.push(c as char);
                } else if !word.is_empty() {
                    *counts.entry(std::mem::take(&mut word)).or_insert(0) += 1;
                    words += 1;
                }
            }
        }
    }
    (files, bytes, words)
}

/// The fixture: nested directories, upper case, non-UTF-8 bytes, an empty file,
/// symlinks to a file, to a directory and out of the tree, a FIFO, and a file nobody
/// may read. Returns whether this process could read that file all the same (root
/// can), which decides the expected counts.
fn fixture(root: &Path, outside: &Path) -> bool {
    fs::create_dir_all(root.join("nested/deeper")).unwrap();
    fs::write(root.join("a.txt"), "Hello, hello WORLD! foo_bar 42 x42y\n").unwrap();
    fs::write(
        root.join("nested/deeper/b.txt"),
        b"caf\xc3\xa9 caf\xe9 na\xefve \xff\xfeHELLO",
    )
    .unwrap();
    fs::write(
        root.join("nested/c.md"),
        "The the THE tHe\nunder_score-dash",
    )
    .unwrap();
    fs::write(root.join("empty.txt"), "").unwrap();
    fs::write(outside.join("far.txt"), "outsider words here").unwrap();
    symlink(root.join("a.txt"), root.join("link.txt")).unwrap();
    symlink(root, root.join("nested/loop")).unwrap();
    symlink(outside, root.join("out")).unwrap();
    symlink(outside.join("far.txt"), root.join("far.txt")).unwrap();
    // A FIFO is not a regular file: it is skipped, and opening it would block.
    let fifo = std::process::Command::new("mkfifo")
        .arg(root.join("nested/pipe"))
        .status();
    assert!(fifo.is_ok_and(|s| s.success()), "mkfifo");
    let locked = root.join("locked.txt");
    fs::write(&locked, "secret").unwrap();
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o000)).unwrap();
    fs::read(&locked).is_ok()
}

#[test]
fn wordcount_on_a_fixed_tree_gives_the_expected_counts() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let root = dir.path().join("tree");
    let privileged = fixture(&root, outside.path());

    let mut expected: BTreeMap<String, u64> = [
        ("hello", 3),
        ("world", 1),
        ("foo_bar", 1),
        ("42", 1),
        ("x42y", 1),
        ("caf", 2),
        ("na", 1),
        ("ve", 1),
        ("the", 4),
        ("under_score", 1),
        ("dash", 1),
    ]
    .into_iter()
    .map(|(w, n)| (w.to_string(), n))
    .collect();
    let mut files = 4;
    let mut bytes = 36 + 24 + 32;
    let mut unreadable = 1;
    if privileged {
        // Root reads a file with mode 000: it is counted like any other.
        expected.insert("secret".into(), 1);
        files += 1;
        bytes += 6;
        unreadable = 0;
    }
    let words: u64 = expected.values().sum();

    let check = |what: &str, tally: &Tally| {
        assert_eq!(sorted(&tally.counts), expected, "{what}: counts");
        assert_eq!(tally.files, files, "{what}: files");
        assert_eq!(tally.bytes, bytes, "{what}: bytes");
        assert_eq!(tally.words, words, "{what}: words");
        assert_eq!(tally.unreadable.len(), unreadable, "{what}: unreadable");
        if unreadable == 1 {
            assert!(tally.unreadable[0].path.ends_with("locked.txt"), "{what}");
            assert!(tally.unreadable[0].error.contains("denied"), "{what}");
        }
    };
    for batch_bytes in [1, 7, 1 << 20] {
        let tally = count::count_tree(&root, shape(batch_bytes)).unwrap();
        check(&format!("pipeline, batches of {batch_bytes} bytes"), &tally);
    }
    // Resumable: the checkpointed count agrees, and run again it reads everything
    // from its file, which it leaves as it was.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("count.ckpt");
    let watch = count::Watch::default();
    for run in ["first", "resumed"] {
        let (tally, stats) =
            count::count_tree_checkpointed(&root, shape(7), &watch, &file).unwrap();
        check(&format!("checkpointed count, {run} run"), &tally);
        let stats = stats.expect("the job ended");
        let recorded = multiproc::__private::checkpoint_records(&file).unwrap();
        let items: usize = recorded.iter().map(|r| r.len()).sum();
        if run == "first" {
            assert!(stats.chunks > 0);
            assert_eq!(items as u64, stats.items, "every batch recorded");
        } else {
            assert_eq!(stats.chunks, 0, "nothing ran again");
        }
    }
    check("sequential", &count::count_tree_sequential(&root, 1 << 20));

    let top = count::top(&count::count_tree(&root, shape(1 << 20)).unwrap().counts, 4);
    let top: Vec<(&str, u64)> = top.iter().map(|(w, n)| (w.as_str(), *n)).collect();
    // Ties are broken by the word's bytes, ascending: "42" before "dash", "foo_bar"...
    assert_eq!(top, [("the", 4), ("hello", 3), ("caf", 2), ("42", 1)]);
}

#[test]
fn a_file_that_cannot_be_read_is_counted_and_named_not_fatal() {
    // A path that vanished between listing and reading: unreadable even for root.
    let dir = tempfile::tempdir().unwrap();
    let present = dir.path().join("present.txt");
    fs::write(&present, "one two two").unwrap();
    let piece = |path: &Path, len| Piece {
        path: path.as_os_str().as_encoded_bytes().to_vec(),
        offset: 0,
        len,
    };
    let gone = dir.path().join("gone.txt");
    let loaded = count::read_batch(vec![piece(&gone, 10), piece(&present, 11)]);
    assert_eq!((loaded.files, loaded.bytes), (1, 11));
    assert_eq!(loaded.unreadable.len(), 1);
    assert!(loaded.unreadable[0].path.ends_with("gone.txt"));
    let tally = count::count_batch(loaded).finish();
    assert_eq!(tally.words, 3);
    assert_eq!(tally.counts["two"], 2);
}

/// Random text with long words, upper case and high bytes, so that pieces of large
/// files often end inside a word.
fn random_text(rng: &mut StdRng, len: usize) -> Vec<u8> {
    const ALPHABET: &[u8] = b"abcdeXYZ_09 \n\t.,-\x80\xc3\xa9\xff";
    (0..len)
        .map(|_| {
            if rng.random_range(0..4) == 0 {
                ALPHABET[rng.random_range(11..ALPHABET.len())]
            } else {
                ALPHABET[rng.random_range(0..11)]
            }
        })
        .collect()
}

#[test]
fn large_files_cut_into_pieces_count_like_whole_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    for i in 0..30 {
        let sub = dir.path().join(format!("d{}", i % 4));
        fs::create_dir_all(&sub).unwrap();
        let len = rng.random_range(0..20_000);
        fs::write(sub.join(format!("f{i}")), random_text(&mut rng, len)).unwrap();
    }
    let mut expected = BTreeMap::new();
    let (files, bytes, words) = naive_count(dir.path(), &mut expected);
    for batch_bytes in [1, 1_000, 4_096, 1 << 20] {
        let tally = count::count_tree(dir.path(), shape(batch_bytes)).unwrap();
        assert_eq!(
            (tally.files, tally.bytes, tally.words),
            (files, bytes, words),
            "batches of {batch_bytes} bytes"
        );
        assert_eq!(sorted(&tally.counts), expected, "batches of {batch_bytes}");
        assert!(tally.unreadable.is_empty());
    }
    let sequential = count::count_tree_sequential(dir.path(), 333);
    assert_eq!(sorted(&sequential.counts), expected);
}

#[test]
fn the_default_corpus_text_is_fixed_by_its_seed() {
    let a = count::corpus::file_text(3);
    assert_eq!(a, count::corpus::file_text(3));
    assert_ne!(a, count::corpus::file_text(4));
    let (words, counts) = count::count_words(&mut a.clone());
    let counts = counts.into_counts();
    assert!(words > 1_000, "{words} words");
    // Zipf: "the" is the most frequent word, then "of".
    let top = count::top(&counts, 2);
    assert_eq!((top[0].0.as_str(), top[1].0.as_str()), ("the", "of"));
}

#[test]
fn tallies_merged_in_any_grouping_count_every_word_once() {
    // Enough batches that merging passes from putting compact counts together to
    // building a map.
    let mut rng = StdRng::seed_from_u64(11);
    let mut expected = BTreeMap::new();
    let batches: Vec<Tally> = (0..300)
        .map(|_| {
            let mut text = Vec::new();
            for _ in 0..2_000 {
                let word = format!("w{}", rng.random_range(0..5_000u32));
                *expected.entry(word.clone()).or_insert(0u64) += 1;
                text.extend_from_slice(word.as_bytes());
                text.push(b' ');
            }
            let (words, counts) = count::count_words(&mut text);
            Tally::of_batch(words, counts)
        })
        .collect();
    let total: u64 = expected.values().sum();

    let mut pairs: Vec<Tally> = batches;
    while pairs.len() > 1 {
        let mut next = Vec::new();
        let mut it = pairs.into_iter();
        while let Some(a) = it.next() {
            next.push(match it.next() {
                Some(b) => a.merge(b),
                None => a,
            });
        }
        pairs = next;
    }
    let tally = pairs.pop().unwrap().finish();
    assert_eq!(tally.words, total);
    assert_eq!(sorted(&tally.counts), expected);
}

#[test]
fn wordcount_refuses_zero_workers_and_names_its_worker_processes_in_words() {
    use clap::Parser;
    let parse = |workers: &str| cli::Args::try_parse_from(["wordcount", "--workers", workers]);
    let Err(refused) = parse("0") else {
        panic!("--workers 0 was accepted");
    };
    assert_eq!(refused.kind(), clap::error::ErrorKind::ValueValidation);
    let message = refused.to_string();
    assert!(
        message.starts_with(
            "error: invalid value '0' for '--workers <WORKERS>': \
             the count needs at least 1 worker process"
        ),
        "{message}"
    );
    // clap's exit status for a bad argument, as the example's docs promise.
    assert_eq!(refused.exit_code(), 2);
    assert_eq!(parse("1").map(|a| a.workers).ok(), Some(Some(1)));
    assert_eq!(parse("3").map(|a| a.workers).ok(), Some(Some(3)));
    assert!(parse("-1").is_err() && parse("two").is_err());

    assert_eq!(cli::worker_processes(1), "1 worker process");
    assert_eq!(cli::worker_processes(2), "2 worker processes");
}
