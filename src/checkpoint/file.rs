//! The checkpoint file: its header and records (the format is in the parent
//! module's docs), reading them back with a torn tail cut off, and the log that
//! appends and syncs them.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// The file's first bytes; the last one is the format's version.
pub(super) const MAGIC: &[u8; 8] = b"mpckpt\0\x02";
/// The first bytes of every record.
pub(super) const RECORD_TAG: &[u8; 4] = b"rec2";
/// A record's first bytes: tag, three fields, their checksum.
pub(super) const RECORD_FIXED: usize = 4 + 4 * 8;
/// Bytes of each range a record covers: first, end, input checksum.
pub(super) const RANGE_BYTES: usize = 3 * 8;
/// Records written between two `fsync`s, at most.
pub(crate) const SYNC_RECORDS: usize = 64;
/// The longest a written record waits for its `fsync` (checked as records come).
pub(crate) const SYNC_INTERVAL: Duration = Duration::from_millis(100);

/// A record found in the file: which items of which stage it covers, and where its
/// payload is. A chunk's record covers one range; a fold stage's accumulator covers
/// every chunk it folded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Recorded {
    pub(super) stage: usize,
    pub(super) covers: Vec<Cover>,
    pub(super) offset: u64,
    pub(super) len: usize,
}

impl Recorded {
    /// The items of a chunk's record (its first range).
    pub(super) fn items(&self) -> &Range<usize> {
        &self.covers[0].items
    }
}

/// Items a record covers, with the checksum of their encodings end to end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Cover {
    pub(super) items: Range<usize>,
    pub(super) input: u64,
}

/// Opens (or creates) the checkpoint at `path` for `job`: the file positioned for
/// appending, and its records sorted by first item. A torn last record is cut off.
pub(super) fn open(path: &Path, job: &str) -> Result<(File, Vec<Recorded>)> {
    let fail = |reason: &str| {
        let reason = reason.to_owned();
        move |source| Error::Checkpoint {
            path: path.to_owned(),
            reason,
            source: Some(source),
        }
    };
    let created = !path.exists();
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(fail("could not open"))?;
    let header = header(job);
    let len = file.metadata().map_err(fail("could not read"))?.len();
    let mut existing = Vec::new();
    (&file)
        .take(header.len() as u64)
        .read_to_end(&mut existing)
        .map_err(fail("could not read"))?;
    if existing.len() < header.len() && header.starts_with(&existing) {
        // New, or its header was torn by a crash as it was written: nothing recorded.
        file.set_len(0).map_err(fail("could not truncate"))?;
        file.write_all_at(&header, 0)
            .map_err(fail("could not write"))?;
        file.sync_data().map_err(fail("could not sync"))?;
        if created {
            sync_parent(path).map_err(fail("could not sync the directory holding"))?;
        }
        file.seek(SeekFrom::End(0))
            .map_err(fail("could not seek"))?;
        return Ok((file, Vec::new()));
    }
    check_header(path, &file, &existing, job)?;
    let mut reader = BufReader::new(&file);
    reader
        .seek(SeekFrom::Start(header.len() as u64))
        .map_err(fail("could not seek"))?;
    let (mut recorded, valid_end) = read_records(path, &mut reader, header.len() as u64, len)?;
    drop(reader);
    if valid_end < len {
        // A torn last record: drop it, so the next record follows the last good one.
        file.set_len(valid_end)
            .map_err(fail("could not cut the torn last record of"))?;
        file.sync_data().map_err(fail("could not sync"))?;
    }
    file.seek(SeekFrom::Start(valid_end))
        .map_err(fail("could not seek"))?;
    recorded.sort_by_key(|r| (r.stage, r.items().start));
    let mut covered: Vec<(usize, &Range<usize>)> = recorded
        .iter()
        .flat_map(|r| r.covers.iter().map(|c| (r.stage, &c.items)))
        .collect();
    covered.sort_by_key(|&(stage, items)| (stage, items.start));
    if let Some(pair) = covered
        .windows(2)
        .find(|pair| pair[0].0 == pair[1].0 && pair[0].1.end > pair[1].1.start)
    {
        return Err(Error::Checkpoint {
            path: path.to_owned(),
            reason: format!(
                "records of items {:?} and {:?}{} overlap",
                pair[0].1,
                pair[1].1,
                stage_name(pair[0].0)
            ),
            source: None,
        });
    }
    Ok((file, recorded))
}

/// The header a checkpoint of `job` starts with.
pub(super) fn header(job: &str) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(MAGIC.len() + 4 + job.len() + 8);
    bytes.extend_from_slice(MAGIC);
    let len = u32::try_from(job.len()).expect("a job's name is shorter than 4 GiB");
    bytes.extend_from_slice(&len.to_le_bytes());
    bytes.extend_from_slice(job.as_bytes());
    let sum = checksum(&[&bytes]);
    bytes.extend_from_slice(&sum.to_le_bytes());
    bytes
}

/// Refuses a file that is not a checkpoint, or is one of another job. `start` holds
/// the file's first bytes, as many as this job's header has (fewer if it is short).
pub(super) fn check_header(path: &Path, file: &File, start: &[u8], job: &str) -> Result<()> {
    let not_checkpoint = |reason: &str| Error::Checkpoint {
        path: path.to_owned(),
        reason: format!("not a multiproc checkpoint ({reason})"),
        source: None,
    };
    if start.len() < MAGIC.len() + 4 || &start[..MAGIC.len()] != MAGIC {
        return Err(not_checkpoint("its first bytes are not a checkpoint's"));
    }
    let len = u32::from_le_bytes(start[8..12].try_into().expect("4 bytes")) as usize;
    // The other job's header may be longer than ours: read what it claims.
    let mut found = vec![0; len];
    let mut sum = [0; 8];
    let read = file
        .read_exact_at(&mut found, 12)
        .and_then(|()| file.read_exact_at(&mut sum, 12 + len as u64));
    if read.is_err() {
        return Err(not_checkpoint("its header is cut short"));
    }
    let mut bytes = start[..12].to_vec();
    bytes.extend_from_slice(&found);
    if checksum(&[&bytes]) != u64::from_le_bytes(sum) {
        return Err(not_checkpoint("its header fails its checksum"));
    }
    if found != job.as_bytes() {
        return Err(Error::CheckpointOfAnotherJob {
            path: path.to_owned(),
            found: String::from_utf8_lossy(&found).into_owned(),
            expected: job.to_owned(),
        });
    }
    Ok(())
}

/// Reads every record from `at` to the file's end (`len`). Returns them and where
/// the last good one ends: before `len` when the last record is torn (cut short,
/// failing its checksum, or zeros), which is dropped. A bad record followed by
/// anything else is an error.
pub(super) fn read_records(
    path: &Path,
    reader: &mut impl Read,
    mut at: u64,
    len: u64,
) -> Result<(Vec<Recorded>, u64)> {
    let damaged = |at: u64, reason: &str| Error::Checkpoint {
        path: path.to_owned(),
        reason: format!("the record at byte {at} is damaged ({reason}) and more follows it"),
        source: None,
    };
    let io_error = |source| Error::Checkpoint {
        path: path.to_owned(),
        reason: "could not read".into(),
        source: Some(source),
    };
    let mut recorded = Vec::new();
    let mut body = Vec::new();
    while at < len {
        let left = len - at;
        if left < (RECORD_FIXED + 8) as u64 {
            return Ok((recorded, at));
        }
        let mut fixed = [0; RECORD_FIXED];
        reader.read_exact(&mut fixed).map_err(io_error)?;
        let word = |i: usize| {
            u64::from_le_bytes(fixed[4 + 8 * i..12 + 8 * i].try_into().expect("8 bytes"))
        };
        let (stage, ranges, size) = (word(0), word(1), word(2));
        if &fixed[..4] != RECORD_TAG || checksum(&[&fixed[..RECORD_FIXED - 8]]) != word(3) {
            // A crash of the machine can leave zeros where the last writes were.
            let mut rest = Vec::new();
            reader.read_to_end(&mut rest).map_err(io_error)?;
            if fixed.iter().chain(&rest).all(|&b| b == 0) {
                return Ok((recorded, at));
            }
            return Err(damaged(at, "its fields fail their checksum"));
        }
        let total = (RECORD_FIXED as u64 + 8)
            .saturating_add(ranges.saturating_mul(RANGE_BYTES as u64))
            .saturating_add(size);
        if total > left {
            return Ok((recorded, at));
        }
        let ranges = usize::try_from(ranges).expect("the ranges fit in the file");
        let size = usize::try_from(size).expect("the payload fits in the file");
        body.clear();
        body.resize(ranges * RANGE_BYTES + size, 0);
        let mut sum = [0; 8];
        reader
            .read_exact(&mut body)
            .and_then(|()| reader.read_exact(&mut sum))
            .map_err(io_error)?;
        let next = at + total;
        if checksum(&[&fixed, &body]) != u64::from_le_bytes(sum) {
            if next == len {
                return Ok((recorded, at));
            }
            return Err(damaged(at, "it fails its checksum"));
        }
        let Ok(stage) = usize::try_from(stage) else {
            return Err(damaged(at, "its stage is out of range"));
        };
        let mut covers = Vec::with_capacity(ranges);
        for range in body[..ranges * RANGE_BYTES].chunks_exact(RANGE_BYTES) {
            let word =
                |i: usize| u64::from_le_bytes(range[8 * i..8 * i + 8].try_into().expect("8 bytes"));
            let (first, end) = (word(0), word(1));
            if first >= end || end > usize::MAX as u64 {
                return Err(damaged(at, "it covers no items"));
            }
            covers.push(Cover {
                items: first as usize..end as usize,
                input: word(2),
            });
        }
        if covers.is_empty() {
            return Err(damaged(at, "it covers no items"));
        }
        recorded.push(Recorded {
            stage,
            covers,
            offset: at + (RECORD_FIXED + ranges * RANGE_BYTES) as u64,
            len: size,
        });
        at = next;
    }
    Ok((recorded, at))
}

/// Makes a new file's name durable: `fsync` of the directory holding it.
pub(super) fn sync_parent(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

/// The checksum of records, headers and a record's input (its items' encodings end
/// to end): 64 bits, 8 bytes a step.
///
/// Each step (xor a word, multiply by an odd constant, rotate) is a bijection of the
/// state, so changing any one word (or byte) always changes the sum; each part's
/// length is mixed in after it. Not cryptographic: it finds damage, not forgery.
pub(super) fn checksum(parts: &[&[u8]]) -> u64 {
    let mut hash = SEED;
    for part in parts {
        let mut words = part.chunks_exact(8);
        for word in &mut words {
            hash = mix(hash, u64::from_le_bytes(word.try_into().expect("8 bytes")));
        }
        let mut tail = [0; 8];
        tail[..words.remainder().len()].copy_from_slice(words.remainder());
        hash = mix(hash, u64::from_le_bytes(tail));
        hash = mix(hash, part.len() as u64);
    }
    hash
}

pub(super) const SEED: u64 = 0xcbf2_9ce4_8422_2325;

pub(super) fn mix(hash: u64, word: u64) -> u64 {
    (hash ^ word)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .rotate_left(27)
}

/// Encodes the record of stage `stage` covering `covers` (items and their input
/// checksum) into `staged`.
pub(super) fn encode_record(
    staged: &mut Vec<u8>,
    stage: usize,
    covers: &[(Range<usize>, u64)],
    payload: &[u8],
) {
    staged.clear();
    staged.extend_from_slice(RECORD_TAG);
    for word in [stage as u64, covers.len() as u64, payload.len() as u64] {
        staged.extend_from_slice(&word.to_le_bytes());
    }
    let fields = checksum(&[&staged[..]]);
    staged.extend_from_slice(&fields.to_le_bytes());
    for (items, input) in covers {
        for word in [items.start as u64, items.end as u64, *input] {
            staged.extend_from_slice(&word.to_le_bytes());
        }
    }
    staged.extend_from_slice(payload);
    let sum = checksum(&[&staged[..RECORD_FIXED], &staged[RECORD_FIXED..]]);
    staged.extend_from_slice(&sum.to_le_bytes());
}

/// The file being appended to, and when it was last synced.
pub(super) struct Log {
    pub(super) file: File,
    pub(super) path: PathBuf,
    pub(super) unsynced: usize,
    pub(super) synced_at: Instant,
}

impl Log {
    pub(super) fn new(file: File, path: &Path) -> Self {
        Self {
            file,
            path: path.to_owned(),
            unsynced: 0,
            synced_at: Instant::now(),
        }
    }

    /// Writes one encoded record (one `write(2)`); syncs when the batch is full or
    /// old enough.
    pub(super) fn append(&mut self, record: &[u8]) -> Result<()> {
        self.file
            .write_all(record)
            .map_err(|source| self.error("could not write", source))?;
        self.unsynced += 1;
        if self.unsynced >= SYNC_RECORDS || self.synced_at.elapsed() >= SYNC_INTERVAL {
            self.sync()?;
        }
        Ok(())
    }

    pub(super) fn sync(&mut self) -> Result<()> {
        if self.unsynced > 0 {
            self.file
                .sync_data()
                .map_err(|source| self.error("could not sync", source))?;
            self.unsynced = 0;
        }
        self.synced_at = Instant::now();
        Ok(())
    }

    /// A record's payload, read back from the file.
    pub(super) fn read(&self, record: &Recorded) -> Result<Vec<u8>> {
        let mut bytes = vec![0; record.len];
        self.file
            .read_exact_at(&mut bytes, record.offset)
            .map_err(|source| self.error("could not read", source))?;
        Ok(bytes)
    }

    pub(super) fn error(&self, reason: &str, source: io::Error) -> Error {
        Error::Checkpoint {
            path: self.path.clone(),
            reason: reason.to_owned(),
            source: Some(source),
        }
    }
}

/// The items a checkpoint file records for stage `stage` (0 for a pool's call),
/// ascending, whatever its job (for tests).
pub(crate) fn recorded_items(path: &Path, stage: usize) -> Result<Vec<Range<usize>>> {
    let error = |source| Error::Checkpoint {
        path: path.to_owned(),
        reason: "could not read".into(),
        source: Some(source),
    };
    let file = File::open(path).map_err(error)?;
    let len = file.metadata().map_err(error)?.len();
    let mut start = [0; MAGIC.len() + 4];
    file.read_exact_at(&mut start, 0).map_err(error)?;
    let job_len = u64::from(u32::from_le_bytes(start[8..].try_into().expect("4 bytes")));
    let at = start.len() as u64 + job_len + 8;
    let mut reader = BufReader::new(&file);
    reader.seek(SeekFrom::Start(at)).map_err(error)?;
    let (recorded, _) = read_records(path, &mut reader, at, len)?;
    let mut items: Vec<Range<usize>> = recorded
        .into_iter()
        .filter(|r| r.stage == stage)
        .flat_map(|r| r.covers.into_iter().map(|c| c.items))
        .collect();
    items.sort_by_key(|items| items.start);
    Ok(items)
}

/// " of stage N" for a pipeline's stage, nothing for a pool's call.
pub(super) fn stage_name(stage: usize) -> String {
    if stage == 0 {
        String::new()
    } else {
        format!(" of stage {stage}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(items: Range<usize>, payload: &[u8]) -> Vec<u8> {
        let mut staged = Vec::new();
        encode_record(&mut staged, 0, &[(items, 7)], payload);
        staged
    }

    fn read(bytes: &[u8]) -> Result<(Vec<Recorded>, u64)> {
        read_records(Path::new("x"), &mut &bytes[..], 0, bytes.len() as u64)
    }

    #[test]
    fn a_torn_or_zeroed_tail_is_dropped_and_damage_before_it_is_refused() {
        let mut bytes = record(0..3, b"abc");
        let first = bytes.len() as u64;
        bytes.extend(record(3..5, b"defgh"));
        let (recorded, end) = read(&bytes).unwrap();
        assert_eq!(recorded.len(), 2);
        assert_eq!(end, bytes.len() as u64);
        for cut in 1..bytes.len() - first as usize {
            let (recorded, end) = read(&bytes[..bytes.len() - cut]).unwrap();
            assert_eq!((recorded.len(), end), (1, first), "cut {cut}");
        }
        let mut zeroed = bytes.clone();
        zeroed[first as usize..].fill(0);
        assert_eq!(read(&zeroed).unwrap().1, first);
        // The last record's payload damaged: torn. The first's: damage.
        let mut last = bytes.clone();
        *last.last_mut().unwrap() ^= 1;
        assert_eq!(read(&last).unwrap().1, first);
        for at in [0, 5, RECORD_FIXED + 1] {
            let mut damaged = bytes.clone();
            damaged[at] ^= 1;
            assert!(
                matches!(read(&damaged), Err(Error::Checkpoint { .. })),
                "byte {at}"
            );
        }
    }

    #[test]
    fn a_record_covering_several_ranges_reads_back_whole() {
        let mut bytes = Vec::new();
        encode_record(&mut bytes, 3, &[(4..9, 11), (20..21, 12)], b"accumulator");
        let (recorded, end) = read(&bytes).unwrap();
        assert_eq!(end, bytes.len() as u64);
        assert_eq!(recorded.len(), 1);
        let record = &recorded[0];
        assert_eq!(record.stage, 3);
        let covers: Vec<_> = record
            .covers
            .iter()
            .map(|c| (c.items.clone(), c.input))
            .collect();
        assert_eq!(covers, vec![(4..9, 11), (20..21, 12)]);
        let at = record.offset as usize;
        assert_eq!(&bytes[at..at + record.len], b"accumulator");
        // A record covering nothing is damage, not a record.
        let mut empty = Vec::new();
        encode_record(&mut empty, 3, &[], b"x");
        empty.extend(record_bytes_after());
        assert!(matches!(read(&empty), Err(Error::Checkpoint { .. })));
    }

    /// A good record, so that a bad one before it is damage rather than a torn end.
    fn record_bytes_after() -> Vec<u8> {
        record(0..1, b"y")
    }

    #[test]
    fn a_header_torn_as_it_was_written_starts_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("torn.ckpt");
        let full = header("map of a to b by c");
        std::fs::write(&path, &full[..full.len() - 3]).unwrap();
        let (_, recorded) = open(&path, "map of a to b by c").unwrap();
        assert!(recorded.is_empty());
        assert_eq!(std::fs::read(&path).unwrap(), full);
        let error = open(&path, "map of a to b by d").unwrap_err();
        assert!(
            matches!(error, Error::CheckpointOfAnotherJob { .. }),
            "{error:?}"
        );
    }

    #[test]
    fn the_checksum_sees_every_changed_byte() {
        let bytes: Vec<u8> = (0..37).collect();
        let sum = checksum(&[&bytes]);
        for at in 0..bytes.len() {
            let mut changed = bytes.clone();
            changed[at] ^= 0x80;
            assert_ne!(checksum(&[&changed]), sum, "byte {at}");
        }
        assert_ne!(checksum(&[&bytes[..8], &bytes[8..]]), sum);
    }
}
