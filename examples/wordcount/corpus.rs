//! The built-in corpus: about 200 MB of text whose words follow a Zipf law, generated
//! from a fixed seed in worker processes, written once under the temp dir and reused.
//!
//! The corpus is written to a directory of its own name, then renamed into place with
//! a marker that records its size: a run killed half-way leaves no corpus that a later
//! run would take for whole, and a damaged one is written again.

use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Changes whenever the generated text would change.
pub(crate) const VERSION: u32 = 1;

/// Files in the corpus.
pub(crate) const FILES: u64 = 400;

/// Distinct words the text draws from.
const VOCABULARY: usize = 100_000;

/// Zipf exponent: the word of rank `r` comes up in proportion to `1 / r^EXPONENT`.
const EXPONENT: f64 = 1.0;

/// The splitmix64 output function: the corpus's only source of randomness.
pub(crate) fn sm(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The size of file `index`: between 16 KiB and 976 KiB, about 200 MB in all.
fn file_size(index: u64) -> u64 {
    (16 << 10) + sm(0xC0FF_EE00 + index) % (960 << 10)
}

/// Where file `index` lives under the corpus's `text` directory.
fn file_path(index: u64) -> PathBuf {
    PathBuf::from(format!(
        "part{}/sub{}/text{index:03}.txt",
        index % 8,
        (index / 8) % 5
    ))
}

/// The word of rank `rank` (0 is the most frequent): a few English words first, then
/// two or more consonant-vowel syllables (a bijective base-70 numbering, so every
/// rank has its own word), every 50th with a digit.
fn word(rank: usize) -> Vec<u8> {
    const COMMON: [&str; 16] = [
        "the", "of", "and", "to", "a", "in", "is", "it", "that", "for", "was", "on", "with", "as",
        "be", "at",
    ];
    if rank < COMMON.len() {
        return COMMON[rank].as_bytes().to_vec();
    }
    const CONSONANTS: &[u8] = b"bdfgklmnprstvz";
    const VOWELS: &[u8] = b"aeiou";
    let syllables = CONSONANTS.len() * VOWELS.len();
    // Numbers from `syllables` up have two or more digits in bijective base 70.
    let mut n = rank - COMMON.len() + syllables;
    let mut out = Vec::new();
    loop {
        let digit = n % syllables;
        out.push(VOWELS[digit % VOWELS.len()]);
        out.push(CONSONANTS[digit / VOWELS.len()]);
        n /= syllables;
        if n == 0 {
            break;
        }
        n -= 1;
    }
    out.reverse();
    if rank.is_multiple_of(50) {
        out.push(b'0' + (rank / 50 % 10) as u8);
    }
    out
}

/// Draws word ranks with Zipf frequencies: the inverse of the cumulative distribution,
/// with a guide table so that a draw is a lookup and a short search.
struct Zipf {
    words: Vec<Vec<u8>>,
    cumulative: Vec<f64>,
    guide: Vec<u32>,
}

const GUIDE_BITS: u32 = 16;

impl Zipf {
    fn new() -> Self {
        let weights: Vec<f64> = (1..=VOCABULARY)
            .map(|r| 1.0 / (r as f64).powf(EXPONENT))
            .collect();
        let total: f64 = weights.iter().sum();
        let mut cumulative = Vec::with_capacity(VOCABULARY);
        let mut sum = 0.0;
        for w in &weights {
            sum += w / total;
            cumulative.push(sum);
        }
        *cumulative.last_mut().expect("a vocabulary") = 1.0;
        let slots = 1usize << GUIDE_BITS;
        let mut guide = Vec::with_capacity(slots + 1);
        let mut rank = 0;
        for slot in 0..=slots {
            let u = slot as f64 / slots as f64;
            while rank + 1 < VOCABULARY && cumulative[rank] <= u {
                rank += 1;
            }
            guide.push(rank as u32);
        }
        Zipf {
            words: (0..VOCABULARY).map(word).collect(),
            cumulative,
            guide,
        }
    }

    /// The word for the random value `x`.
    fn draw(&self, x: u64) -> &[u8] {
        let u = (x >> 11) as f64 / (1u64 << 53) as f64;
        let slot = (x >> (64 - GUIDE_BITS)) as usize;
        let (lo, hi) = (self.guide[slot] as usize, self.guide[slot + 1] as usize);
        let rank = lo + self.cumulative[lo..=hi].partition_point(|&c| c <= u);
        &self.words[rank.min(VOCABULARY - 1)]
    }
}

/// The text of file `index`: sentences of 4 to 19 words, the first capitalised,
/// some commas, a line break after about every tenth word.
pub(crate) fn file_text(index: u64) -> Vec<u8> {
    thread_local! {
        static ZIPF: Zipf = Zipf::new();
    }
    let size = file_size(index) as usize;
    let mut out = Vec::with_capacity(size + 64);
    let mut state = sm(index) ^ 0x5EED;
    let mut next = move || {
        state = state.wrapping_add(1);
        sm(state)
    };
    ZIPF.with(|zipf| {
        let mut line = 0;
        while out.len() < size {
            let words = 4 + next() % 16;
            for k in 0..words {
                let word = zipf.draw(next());
                let start = out.len();
                out.extend_from_slice(word);
                if k == 0 {
                    out[start] = out[start].to_ascii_uppercase();
                }
                line += 1;
                if k + 1 == words {
                    out.push(b'.');
                } else if next() % 12 == 0 {
                    out.push(b',');
                }
                if line >= 10 && next() % 4 == 0 {
                    out.push(b'\n');
                    line = 0;
                } else {
                    out.push(b' ');
                }
            }
        }
    });
    out.truncate(size);
    out
}

/// One file to write: its index and the corpus's `text` directory.
#[derive(Serialize, Deserialize)]
struct FileJob {
    #[serde(with = "serde_bytes")]
    text_dir: Vec<u8>,
    index: u64,
}

/// Writes one file of the corpus (in a worker); returns its size or why it failed.
fn write_file(job: FileJob) -> Result<u64, String> {
    let text_dir = Path::new(std::ffi::OsStr::from_bytes(&job.text_dir));
    let path = text_dir.join(file_path(job.index));
    let text = file_text(job.index);
    let write = || -> io::Result<()> {
        fs::create_dir_all(path.parent().expect("a file path has a parent"))?;
        fs::write(&path, &text)
    };
    write().map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(text.len() as u64)
}

/// The marker's text for a corpus of `bytes`.
fn marker(bytes: u64) -> String {
    format!("multiproc wordcount corpus v{VERSION}: {FILES} files, {bytes} bytes\n")
}

/// Whether `dir` holds a whole corpus: its marker, the files of the sizes it records,
/// and no other file.
fn is_whole(dir: &Path) -> bool {
    let Ok(marker_text) = fs::read_to_string(dir.join("complete")) else {
        return false;
    };
    let expected: u64 = (0..FILES).map(file_size).sum();
    if marker_text != marker(expected) {
        return false;
    }
    let sizes_match = (0..FILES).all(|i| {
        fs::symlink_metadata(dir.join("text").join(file_path(i)))
            .is_ok_and(|m| m.is_file() && m.len() == file_size(i))
    });
    // And nothing else: an extra file would change the counts.
    sizes_match
        && walkdir::WalkDir::new(dir.join("text"))
            .into_iter()
            .filter(|e| e.as_ref().map_or(true, |e| !e.file_type().is_dir()))
            .count()
            == FILES as usize
}

/// The corpus's text directory under `dir`, written first if it is not there whole.
/// Returns the directory and whether it was written by this call.
///
/// # Errors
///
/// When the corpus can neither be found whole nor written.
pub(crate) fn ensure(dir: &Path) -> io::Result<(PathBuf, bool)> {
    remove_abandoned(dir);
    if is_whole(dir) {
        return Ok((dir.join("text"), false));
    }
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let partial = partial_name(dir, &format!("{}-{stamp}", std::process::id()));
    fs::create_dir_all(partial.join("text"))?;
    let written = write_files(&partial.join("text"));
    let written = written.and_then(|bytes| fs::write(partial.join("complete"), marker(bytes)));
    if let Err(e) = written {
        let _ = fs::remove_dir_all(&partial);
        return Err(e);
    }
    // A damaged corpus is moved aside first (rename is atomic; removal is not).
    if fs::symlink_metadata(dir).is_ok() {
        let aside = partial_name(dir, &format!("{}-{stamp}-old", std::process::id()));
        fs::rename(dir, &aside)?;
        let _ = fs::remove_dir_all(&aside);
    }
    if let Err(e) = fs::rename(&partial, dir) {
        let _ = fs::remove_dir_all(&partial);
        // Another run may have put its whole corpus in place first.
        if !is_whole(dir) {
            return Err(e);
        }
    }
    Ok((dir.join("text"), true))
}

/// The name of a corpus being written (or removed) by process `id`.
fn partial_name(dir: &Path, id: &str) -> PathBuf {
    let mut name = dir.as_os_str().to_owned();
    name.push(format!(".partial-{id}"));
    PathBuf::from(name)
}

/// Removes corpora left half-written by runs whose process is gone.
fn remove_abandoned(dir: &Path) {
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        return;
    };
    let prefix = format!("{}.partial-", name.to_string_lossy());
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let entry_name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = entry_name.strip_prefix(&prefix) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        let alive = !pid.is_empty() && Path::new("/proc").join(pid).exists();
        if !alive {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Writes every file of the corpus under `text_dir`, in worker processes.
fn write_files(text_dir: &Path) -> io::Result<u64> {
    let pool = multiproc::Pool::builder()
        .build()
        .map_err(io::Error::other)?;
    let jobs = (0..FILES).map(|index| FileJob {
        text_dir: text_dir.as_os_str().as_bytes().to_vec(),
        index,
    });
    let sizes = pool.map(jobs, write_file).map_err(io::Error::other)?;
    sizes
        .into_iter()
        .try_fold(0u64, |total, size| Ok::<u64, String>(total + size?))
        .map_err(io::Error::other)
}
