//! The word count itself, shared by the `wordcount` example, its tests and its bench:
//! what a word is, the listing of a tree, reading and counting a batch, the pipeline,
//! and the sequential reference.
//!
//! A word is a maximal run of bytes in `[a-z0-9_]` after lower-casing ASCII `A-Z`;
//! every other byte, including every byte >= 0x80, separates words, so any file,
//! UTF-8 or not, is counted the same way.

// Each program that includes this file uses its own part of it.
#![allow(dead_code)]

use std::cell::RefCell;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use multiproc::Pipeline;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

/// Bytes of text per batch: the unit of work of the counting stage.
pub(crate) const BATCH_BYTES: u64 = 8 << 20;

/// Each byte's lower-cased self if it belongs to a word, 0 if it separates words.
const WORD_BYTE: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = match c {
            b'a'..=b'z' | b'0'..=b'9' | b'_' => c,
            b'A'..=b'Z' => c + (b'a' - b'A'),
            _ => 0,
        };
        b += 1;
    }
    table
};

/// Whether `b` is part of a word.
pub(crate) fn is_word_byte(b: u8) -> bool {
    WORD_BYTE[b as usize] != 0
}

/// Word -> number of occurrences.
pub(crate) type Counts = FxHashMap<String, u64>;

/// Lower-cases `text` in place and counts its words. Returns how many there were
/// and each one's count.
pub(crate) fn count_words(text: &mut [u8]) -> (u64, BatchCounts) {
    let (words, counts) = batch_counts(text);
    (words, BatchCounts::from_counts(counts))
}

/// Lower-cases `text` in place and counts its words into a map keyed by slices of
/// the text (a new word costs no allocation).
fn batch_counts(text: &mut [u8]) -> (u64, FxHashMap<&[u8], u64>) {
    for b in text.iter_mut() {
        *b = WORD_BYTE[*b as usize];
    }
    let mut words = 0;
    // Keys borrow the text: a new word costs no allocation.
    let mut counts: FxHashMap<&[u8], u64> = FxHashMap::default();
    // Room for the distinct words of a batch of this size: growing costs rehashes.
    counts.reserve((text.len() / 64).min(1 << 16));
    for word in text.split(|&b| b == 0).filter(|w| !w.is_empty()) {
        words += 1;
        *counts.entry(word).or_insert(0) += 1;
    }
    (words, counts)
}

/// Lower-cases `text` in place and adds its words to `counts`, a map kept across
/// batches (a fold). Returns how many words there were.
///
/// The batch is counted into a map of its own first, keyed by slices of the text,
/// and that map is added to `counts` once: measured here, one lookup per word in a
/// small map whose keys sit in the text just read, plus one per distinct word in
/// the large map, is faster (1.19-1.32 s against 1.64-2.1 s for the corpus, in one
/// process) than one lookup per word in a map of 100,000 heap strings, which no
/// longer fits the cache.
pub(crate) fn add_words(text: &mut [u8], counts: &mut Counts) -> u64 {
    let (words, batch) = batch_counts(text);
    for (word, n) in batch {
        let word = std::str::from_utf8(word).expect("words are ASCII");
        match counts.get_mut(word) {
            Some(total) => *total += n,
            None => {
                counts.insert(word.to_owned(), n);
            }
        }
    }
    words
}

/// One batch's counts in a form that is cheap to send: the words back to back, each
/// followed by a newline, and their counts in the same order.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct BatchCounts {
    #[serde(with = "serde_bytes")]
    words: Vec<u8>,
    counts: Vec<u64>,
}

impl BatchCounts {
    /// From counts whose words hold no newline.
    pub(crate) fn from_counts<W: AsRef<[u8]>>(counts: impl IntoIterator<Item = (W, u64)>) -> Self {
        let mut batch = BatchCounts::default();
        for (word, n) in counts {
            batch.words.extend_from_slice(word.as_ref());
            batch.words.push(b'\n');
            batch.counts.push(n);
        }
        batch
    }

    /// Adds these counts to `counts`: only a word not seen before is allocated.
    ///
    /// # Panics
    ///
    /// If the words are not UTF-8 (they are ASCII when made by this module).
    pub(crate) fn add_to(&self, counts: &mut Counts) {
        let words = std::str::from_utf8(&self.words).expect("words are ASCII");
        for (word, &n) in words.split_terminator('\n').zip(&self.counts) {
            match counts.get_mut(word) {
                Some(total) => *total += n,
                None => {
                    counts.insert(word.to_owned(), n);
                }
            }
        }
    }

    /// Words counted here (a word may come more than once after [`BatchCounts::append`]).
    pub(crate) fn len(&self) -> usize {
        self.counts.len()
    }

    /// Whether there are no counts.
    pub(crate) fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// Puts `other`'s counts after these.
    pub(crate) fn append(&mut self, mut other: BatchCounts) {
        self.words.append(&mut other.words);
        self.counts.append(&mut other.counts);
    }

    /// These counts as a map.
    pub(crate) fn into_counts(self) -> Counts {
        let mut counts = Counts::default();
        counts.reserve(self.counts.len());
        self.add_to(&mut counts);
        counts
    }
}

/// The `n` most frequent words, most frequent first; ties by the word's bytes,
/// ascending.
pub(crate) fn top(counts: &Counts, n: usize) -> Vec<(String, u64)> {
    let mut all: Vec<(&String, u64)> = counts.iter().map(|(w, &c)| (w, c)).collect();
    all.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    all.into_iter()
        .take(n)
        .map(|(w, c)| (w.clone(), c))
        .collect()
}

/// A part of a file to read: `len` bytes from `offset`. Large files are cut into
/// parts so that one file does not make one huge item.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Piece {
    /// The path's bytes (paths need not be UTF-8).
    #[serde(with = "serde_bytes")]
    pub(crate) path: Vec<u8>,
    pub(crate) offset: u64,
    pub(crate) len: u64,
}

/// A file or directory that could not be read, and why.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub(crate) struct Unreadable {
    pub(crate) path: String,
    pub(crate) error: String,
}

impl Unreadable {
    fn new(path: &Path, error: impl std::fmt::Display) -> Self {
        Unreadable {
            path: path.to_string_lossy().into_owned(),
            error: error.to_string(),
        }
    }
}

/// The regular files under a directory (symlinks are not followed), in pieces,
/// grouped into batches of about `batch_bytes` (at least that much, unless it is the
/// last batch). Entries that cannot be listed go to `errors`.
pub(crate) struct Listing {
    walk: walkdir::IntoIter,
    batch_bytes: u64,
    pending: Vec<Piece>,
    pending_bytes: u64,
    errors: Rc<RefCell<Vec<Unreadable>>>,
}

impl Listing {
    pub(crate) fn new(root: &Path, batch_bytes: u64, errors: Rc<RefCell<Vec<Unreadable>>>) -> Self {
        Listing {
            walk: walkdir::WalkDir::new(root)
                .follow_links(false)
                .sort_by_file_name()
                .into_iter(),
            batch_bytes: batch_bytes.max(1),
            pending: Vec::new(),
            pending_bytes: 0,
            errors,
        }
    }

    fn take_batch(&mut self) -> Vec<Piece> {
        self.pending_bytes = 0;
        std::mem::take(&mut self.pending)
    }
}

impl Iterator for Listing {
    type Item = Vec<Piece>;

    fn next(&mut self) -> Option<Vec<Piece>> {
        loop {
            if self.pending_bytes >= self.batch_bytes {
                return Some(self.take_batch());
            }
            let entry = match self.walk.next() {
                None if self.pending.is_empty() => return None,
                None => return Some(self.take_batch()),
                Some(Ok(entry)) => entry,
                Some(Err(e)) => {
                    let path = e.path().map(Path::to_path_buf).unwrap_or_default();
                    self.errors.borrow_mut().push(Unreadable::new(&path, &e));
                    continue;
                }
            };
            if !entry.file_type().is_file() {
                continue; // directories are walked; symlinks, FIFOs and devices skipped
            }
            let path = entry.path().as_os_str().as_bytes().to_vec();
            // A file whose size cannot be read is still tried: the reading stage
            // reports why it cannot be read.
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            let mut offset = 0;
            loop {
                let len = (size - offset).min(self.batch_bytes);
                self.pending.push(Piece {
                    path: path.clone(),
                    offset,
                    len,
                });
                self.pending_bytes += len.max(1);
                offset += len;
                if offset >= size {
                    break;
                }
            }
        }
    }
}

/// A batch's text, as read by the first stage.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Loaded {
    /// The pieces' bytes, each followed by a newline so words never join across pieces.
    #[serde(with = "serde_bytes")]
    pub(crate) text: Vec<u8>,
    pub(crate) files: u64,
    pub(crate) bytes: u64,
    pub(crate) unreadable: Vec<Unreadable>,
}

/// Stage 1: reads the pieces of a batch.
pub(crate) fn read_batch(pieces: Vec<Piece>) -> Loaded {
    let capacity: u64 = pieces.iter().map(|p| p.len + 1).sum();
    let mut loaded = Loaded {
        text: Vec::with_capacity(capacity as usize + 256),
        ..Loaded::default()
    };
    for piece in &pieces {
        let start = loaded.text.len();
        match read_piece(piece, &mut loaded.text) {
            Ok(bytes) => {
                loaded.bytes += bytes;
                loaded.files += u64::from(piece.offset == 0);
                loaded.text.push(b'\n');
            }
            Err(e) => {
                loaded.text.truncate(start);
                let path = Path::new(OsStr::from_bytes(&piece.path));
                loaded.unreadable.push(Unreadable::new(path, e));
            }
        }
    }
    loaded
}

/// Appends the words that start inside `piece` to `text`: bytes before a word that
/// began in the previous piece are left out, and the last word is read to its end
/// past the piece. Returns the piece's own bytes read.
fn read_piece(piece: &Piece, text: &mut Vec<u8>) -> io::Result<u64> {
    let mut file = File::open(OsStr::from_bytes(&piece.path))?;
    let mut skip_word = false;
    if piece.offset > 0 {
        file.seek(SeekFrom::Start(piece.offset - 1))?;
        let mut before = [0u8];
        skip_word = file.read(&mut before)? == 1 && is_word_byte(before[0]);
    }
    let start = text.len();
    (&mut file).take(piece.len).read_to_end(text)?;
    let bytes = (text.len() - start) as u64;
    if bytes == piece.len && text.len() > start && is_word_byte(text[text.len() - 1]) {
        // Finish the last word: read on until a separator or the end of the file.
        let mut more = [0u8; 256];
        'word: loop {
            let n = file.read(&mut more)?;
            if n == 0 {
                break;
            }
            for &b in &more[..n] {
                if !is_word_byte(b) {
                    break 'word;
                }
                text.push(b);
            }
        }
    }
    if skip_word {
        let rest = &text[start..];
        let word_end = rest
            .iter()
            .position(|&b| !is_word_byte(b))
            .unwrap_or(rest.len());
        text.drain(start..start + word_end);
    }
    Ok(bytes)
}

/// What a tree (or a part of it) holds.
///
/// Between processes every count travels in the compact form of [`BatchCounts`], so
/// the receiver allocates only the words it has not seen (see [`Wire`]).
#[derive(Debug, Default, Deserialize)]
#[serde(from = "Wire")]
pub(crate) struct Tally {
    /// Regular files read (a large file counts once, by its first piece).
    pub(crate) files: u64,
    /// Bytes read.
    pub(crate) bytes: u64,
    /// Words counted.
    pub(crate) words: u64,
    /// Files and directories that could not be read, one entry per path. A file
    /// that fails only part-way is counted in `files` and listed here too.
    pub(crate) unreadable: Vec<Unreadable>,
    /// Each word's count: all of them after [`Tally::finish`].
    pub(crate) counts: Counts,
    /// Counts not yet in `counts`, in compact form: a batch's, as the counting stage
    /// sends them, or a few batches' put together by [`Tally::merge`].
    batch: BatchCounts,
}

impl Tally {
    /// The tally of one batch of `words` words.
    pub(crate) fn of_batch(words: u64, batch: BatchCounts) -> Tally {
        Tally {
            words,
            batch,
            ..Tally::default()
        }
    }

    /// The tally with every count in [`Tally::counts`].
    pub(crate) fn finish(self) -> Tally {
        self.merge(Tally::default())
    }

    /// Adds two tallies: the larger map takes the other's counts. Two tallies of
    /// a few batches only put their compact counts together: building a map for
    /// them in a worker would be undone when the map is sent.
    pub(crate) fn merge(mut self, mut other: Tally) -> Tally {
        self.files += other.files;
        self.bytes += other.bytes;
        self.words += other.words;
        self.unreadable.append(&mut other.unreadable);
        let few = self.batch.len() + other.batch.len() <= CONCATENATED_COUNTS;
        if self.counts.is_empty() && other.counts.is_empty() && few && !other.batch.is_empty() {
            self.batch.append(other.batch);
            return self;
        }
        if self.counts.len() < other.counts.len() {
            std::mem::swap(&mut self.counts, &mut other.counts);
        }
        for (word, n) in other.counts {
            *self.counts.entry(word).or_insert(0) += n;
        }
        for batch in [std::mem::take(&mut self.batch), other.batch] {
            batch.add_to(&mut self.counts);
        }
        self
    }
}

/// Most compact counts [`Tally::merge`] puts together before it builds a map.
const CONCATENATED_COUNTS: usize = 1 << 18;

/// A tally as it crosses between processes: its counts all compact.
#[derive(Deserialize)]
struct Wire {
    files: u64,
    bytes: u64,
    words: u64,
    unreadable: Vec<Unreadable>,
    batch: BatchCounts,
}

/// [`Wire`], borrowed for sending.
#[derive(Serialize)]
struct WireRef<'a> {
    files: u64,
    bytes: u64,
    words: u64,
    unreadable: &'a [Unreadable],
    batch: BatchCountsRef<'a>,
}

/// [`BatchCounts`], borrowed for sending.
#[derive(Serialize)]
struct BatchCountsRef<'a> {
    #[serde(with = "serde_bytes")]
    words: &'a [u8],
    counts: &'a [u64],
}

impl From<Wire> for Tally {
    fn from(wire: Wire) -> Tally {
        Tally {
            files: wire.files,
            bytes: wire.bytes,
            words: wire.words,
            unreadable: wire.unreadable,
            counts: Counts::default(),
            batch: wire.batch,
        }
    }
}

impl Serialize for Tally {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let combined;
        let batch = if self.counts.is_empty() {
            &self.batch
        } else {
            let words = std::str::from_utf8(&self.batch.words).expect("words are ASCII");
            let batch_counts = words
                .split_terminator('\n')
                .zip(self.batch.counts.iter().copied());
            let map_counts = self.counts.iter().map(|(w, &n)| (w.as_str(), n));
            combined = BatchCounts::from_counts(map_counts.chain(batch_counts));
            &combined
        };
        WireRef {
            files: self.files,
            bytes: self.bytes,
            words: self.words,
            unreadable: &self.unreadable,
            batch: BatchCountsRef {
                words: &batch.words,
                counts: &batch.counts,
            },
        }
        .serialize(serializer)
    }
}

/// Stage 2: counts the words of a batch.
pub(crate) fn count_batch(mut loaded: Loaded) -> Tally {
    let (words, batch) = count_words(&mut loaded.text);
    Tally {
        files: loaded.files,
        bytes: loaded.bytes,
        unreadable: loaded.unreadable,
        ..Tally::of_batch(words, batch)
    }
}

/// Stage 2 as a fold: adds the words of a batch to a counting worker's tally, kept
/// in the worker until the end of the input, so nothing is sent per batch.
pub(crate) fn count_into(mut tally: Tally, mut loaded: Loaded) -> Tally {
    tally.files += loaded.files;
    tally.bytes += loaded.bytes;
    tally.unreadable.append(&mut loaded.unreadable);
    tally.words += add_words(&mut loaded.text, &mut tally.counts);
    tally
}

/// Stages 1 and 2 in one: reads a batch's pieces and folds their words into a
/// counting worker's tally (see [`count_tree`] for why one stage).
pub(crate) fn read_and_count_into(tally: Tally, pieces: Vec<Piece>) -> Tally {
    count_into(tally, read_batch(pieces))
}

/// How the pipeline is shaped.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Shape {
    /// Worker processes of the reading stage, when reading is a stage of its own
    /// (the bench's two-stage variants).
    pub(crate) read_workers: usize,
    /// Worker processes of the counting stage (which reads, too).
    pub(crate) count_workers: usize,
    /// Bytes of text per batch.
    pub(crate) batch_bytes: u64,
    /// Whether workers' stderr goes to this process's (a test keeps it quiet).
    pub(crate) inherit_output: bool,
}

impl Default for Shape {
    fn default() -> Self {
        Shape {
            read_workers: 1,
            count_workers: multiproc::default_workers().unwrap_or(2),
            batch_bytes: BATCH_BYTES,
            inherit_output: true,
        }
    }
}

/// Counts the words of every regular file under `root`: the parent lists the files
/// and cuts them into batches; a fold stage of workers reads each batch it is given
/// and folds its words into one map per worker; the parent merges the workers'
/// maps.
///
/// Reading and counting are one stage: a batch's text never leaves the worker that
/// reads it. As two stages ([`count_tree_two_stages`]) the parent relays the 202 MB
/// of the built-in corpus from the reading worker to the counting ones (decoding,
/// encoding, two socket crossings per byte), which measured 1.14-1.33 s and 2.2-2.4
/// CPU-s against 0.65-0.81 s and 1.3-1.5 CPU-s for one stage (see `BENCHMARKS.md`).
///
/// # Errors
///
/// The pipeline's errors (a worker that cannot start or dies); a file that cannot
/// be read is not an error but is listed in [`Tally::unreadable`].
pub(crate) fn count_tree(root: &Path, shape: Shape) -> multiproc::Result<Tally> {
    count_tree_watched(root, shape, &Watch::default()).map(|(tally, _)| tally)
}

/// How a count can be watched: a progress bar, a timeline file.
#[derive(Clone, Debug, Default)]
pub(crate) struct Watch {
    pub(crate) progress: bool,
    pub(crate) trace: Option<std::path::PathBuf>,
}

/// [`count_tree`], watched as `watch` says; also returns the pipeline's figures.
pub(crate) fn count_tree_watched(
    root: &Path,
    shape: Shape,
    watch: &Watch,
) -> multiproc::Result<(Tally, multiproc::PipelineStats)> {
    let errors = Rc::new(RefCell::new(Vec::new()));
    let listing = Listing::new(root, shape.batch_bytes, Rc::clone(&errors));
    let mut pipeline = Pipeline::new(listing)
        .inherit_output(shape.inherit_output)
        .progress(watch.progress);
    if let Some(path) = &watch.trace {
        pipeline = pipeline.trace(path);
    }
    let stats = pipeline.stats();
    let mut tally = pipeline
        .fold_stage(shape.count_workers, Tally::default, read_and_count_into)
        .reduce(Tally::default, Tally::merge)?
        .finish();
    tally.unreadable.append(&mut errors.borrow_mut());
    name_each_once(&mut tally.unreadable);
    Ok((tally, stats))
}

/// Reads and counts one batch into a tally of its own (the checkpointed count's
/// task: one partial per chunk, recorded).
pub(crate) fn read_and_count(pieces: Vec<Piece>) -> Tally {
    read_and_count_into(Tally::default(), pieces)
}

/// [`count_tree`] as a resumable job: a checkpointed `map_reduce` over the batches
/// (each chunk read and counted in a worker, its partial tally recorded in the
/// file at `checkpoint` as it is merged), so a count that is killed resumes where
/// it stopped. Slower than the fold stage, which sends one map per worker instead
/// of one per chunk. Also returns the job's figures.
pub(crate) fn count_tree_checkpointed(
    root: &Path,
    shape: Shape,
    watch: &Watch,
    checkpoint: &Path,
) -> multiproc::Result<(Tally, Option<multiproc::JobStats>)> {
    let errors = Rc::new(RefCell::new(Vec::new()));
    let listing = Listing::new(root, shape.batch_bytes, Rc::clone(&errors));
    let mut builder = multiproc::Pool::builder()
        .workers(shape.count_workers)
        .inherit_output(shape.inherit_output)
        .progress(watch.progress);
    if let Some(path) = &watch.trace {
        builder = builder.trace(path);
    }
    let pool = builder.build()?;
    let mut tally = pool
        .checkpoint(checkpoint)
        .map_reduce(listing, read_and_count, Tally::default, Tally::merge)?
        .finish();
    tally.unreadable.append(&mut errors.borrow_mut());
    name_each_once(&mut tally.unreadable);
    Ok((tally, pool.last_job_stats()?))
}

/// [`count_tree`] with reading and counting as two stages: `read_workers` read
/// each batch, the parent relays its text to the fold stage that counts it. Kept
/// for the bench.
pub(crate) fn count_tree_two_stages(root: &Path, shape: Shape) -> multiproc::Result<Tally> {
    let errors = Rc::new(RefCell::new(Vec::new()));
    let listing = Listing::new(root, shape.batch_bytes, Rc::clone(&errors));
    let mut tally = Pipeline::new(listing)
        .inherit_output(shape.inherit_output)
        .unordered()
        .stage(shape.read_workers, read_batch)
        .fold_stage(shape.count_workers, Tally::default, count_into)
        .reduce(Tally::default, Tally::merge)?
        .finish();
    tally.unreadable.append(&mut errors.borrow_mut());
    name_each_once(&mut tally.unreadable);
    Ok(tally)
}

/// [`count_tree`] as it was before fold stages: a reading stage, then a counting
/// stage that counts each
/// batch into a map of its own and merges a chunk's counts in the worker
/// (`Stage::reduce`), and the parent merges one partial per chunk. Kept for the
/// bench, to measure what the fold stage saves.
pub(crate) fn count_tree_per_chunk(root: &Path, shape: Shape) -> multiproc::Result<Tally> {
    let errors = Rc::new(RefCell::new(Vec::new()));
    let listing = Listing::new(root, shape.batch_bytes, Rc::clone(&errors));
    let mut tally = Pipeline::new(listing)
        .inherit_output(shape.inherit_output)
        .unordered()
        .stage(shape.read_workers, read_batch)
        .stage(shape.count_workers, count_batch)
        .reduce(Tally::default, Tally::merge)?
        .finish();
    tally.unreadable.append(&mut errors.borrow_mut());
    name_each_once(&mut tally.unreadable);
    Ok(tally)
}

/// Sorts the unreadable files by path and keeps one entry per file: each piece of
/// a large file that cannot be read fails on its own.
fn name_each_once(unreadable: &mut Vec<Unreadable>) {
    unreadable.sort();
    unreadable.dedup_by(|a, b| a.path == b.path);
}

/// The same count in this process, one batch after another: the reference the
/// pipeline is checked against, and the sequential baseline of the bench.
pub(crate) fn count_tree_sequential(root: &Path, batch_bytes: u64) -> Tally {
    let errors = Rc::new(RefCell::new(Vec::new()));
    let mut tally = Listing::new(root, batch_bytes, Rc::clone(&errors))
        .map(|batch| count_batch(read_batch(batch)))
        .fold(Tally::default(), Tally::merge)
        .finish();
    tally.unreadable.append(&mut errors.borrow_mut());
    name_each_once(&mut tally.unreadable);
    tally
}

/// The directory of the built-in corpus, generated on first use; see [`corpus`].
pub(crate) fn default_corpus_dir() -> PathBuf {
    std::env::temp_dir().join(format!("multiproc-wordcount-corpus-v{}", corpus::VERSION))
}

#[path = "corpus.rs"]
pub(crate) mod corpus;
