//! SharedSlice, Shared: read-only inputs behind a sealed memory map that cross to
//! workers as small handles.
//!
//! The bytes live in a memfd sealed against shrink, grow and write, mapped read-only
//! in every process that uses them (`region.rs`, which holds every unsafe operation:
//! the one `unsafe` block here only forwards [`SharedSlice::map_file`]'s contract to
//! it).
//! Encoding a `SharedSlice` or `Shared` writes a handle of a few dozen bytes; the
//! receiving process opens the sender's descriptor through `/proc`, checks it is the
//! same sealed file, and maps it. The kernel frees the memory when the last process
//! holding it exits or drops it, whatever killed it: nothing is left in `/dev/shm`
//! or a temporary directory.

pub(crate) mod region;

use std::fmt;
use std::marker::PhantomData;
use std::ops::Deref;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};
use crate::wire::codec;
use region::{Fault, Region, RegionHandle};

/// A read-only array of plain-old-data values shared with workers without copying.
///
/// Build it once in the parent ([`SharedSlice::from_vec`], [`SharedSlice::from_iter`],
/// [`SharedSlice::from_file`]); it dereferences to `&[T]` in every process. Passed as
/// the context of [`Pool::map_with`](crate::Pool::map_with) or inside items, it
/// crosses as a handle of a few dozen bytes, never as its contents, and a worker
/// maps it once per pool however many calls use it. Cloning is cheap (a reference
/// count).
///
/// The memory is a memfd sealed against shrink, grow and write and mapped read-only:
/// no process can change it while it is mapped. The process that encodes a handle
/// must still hold the slice when the receiver decodes it (the receiver opens the
/// sender's descriptor): a pool keeps what its chunks name alive until they are
/// answered, so an item may own the only handle; a handle carried some other way
/// whose sender has dropped the slice fails to decode with an error saying so.
///
/// # Examples
///
/// ```standalone_crate
/// use multiproc::SharedSlice;
///
/// fn main() -> multiproc::Result<()> {
///     multiproc::init();
///     let data = SharedSlice::from_iter(0..1_000_000u64)?;
///     let pool = multiproc::Pool::builder().workers(2).build()?;
///     let ranges: Vec<(usize, usize)> = (0..10).map(|i| (i * 100_000, (i + 1) * 100_000)).collect();
///     let sums = pool.map_with(ranges, &data, |data: &SharedSlice<u64>, r: (usize, usize)| {
///         data[r.0..r.1].iter().sum::<u64>()
///     })?;
///     assert_eq!(sums.iter().sum::<u64>(), data.iter().sum::<u64>());
///     Ok(())
/// }
/// ```
pub struct SharedSlice<T> {
    region: Arc<Region>,
    len: usize,
    _type: PhantomData<fn() -> T>,
}

impl<T: bytemuck::Pod> SharedSlice<T> {
    /// Shares a copy of `values`.
    ///
    /// # Errors
    ///
    /// [`Error::Share`] when the memory cannot be had (the message says how much).
    pub fn from_vec(values: Vec<T>) -> Result<Self> {
        Self::from_slice(&values)
    }

    /// Shares a copy of `values`.
    ///
    /// # Errors
    ///
    /// As [`SharedSlice::from_vec`].
    pub fn from_slice(values: &[T]) -> Result<Self> {
        let what = || describe::<T>(values.len());
        check_size::<T>(&what)?;
        let region = Region::from_bytes(kind::<T>(), bytemuck::cast_slice(values))
            .map_err(|f| share_error(what(), f))?;
        Ok(Self::wrap(region))
    }

    /// Shares the values of `iter`, written straight into the shared memory.
    ///
    /// An iterator whose length is known ([`Iterator::size_hint`] exact, as for
    /// ranges and `map`s of them) writes into a map of the final size; otherwise the
    /// values go through a buffer of 1 MiB.
    ///
    /// # Errors
    ///
    /// As [`SharedSlice::from_vec`], and when the iterator yields a different number
    /// of values than its exact size hint claimed.
    #[allow(clippy::should_implement_trait)] // fallible, so not `FromIterator`
    pub fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Result<Self> {
        let mut iter = iter.into_iter();
        let size = std::mem::size_of::<T>();
        match iter.size_hint() {
            (lower, Some(upper)) if lower == upper => {
                let what = || describe::<T>(lower);
                check_size::<T>(&what)?;
                let bytes = lower
                    .checked_mul(size)
                    .ok_or_else(|| share_error(what(), Fault::plain("too large")))?;
                let region = Region::from_writer(kind::<T>(), bytes, |out| {
                    let out: &mut [T] = bytemuck::try_cast_slice_mut(out)
                        .map_err(|e| Fault::plain(format!("bad layout: {e}")))?;
                    let mut n = 0;
                    for value in iter.by_ref() {
                        let Some(slot) = out.get_mut(n) else {
                            return Err(Fault::plain(
                                "the iterator gave more values than its exact size hint",
                            ));
                        };
                        *slot = value;
                        n += 1;
                    }
                    Ok(n * size)
                })
                .map_err(|f| share_error(what(), f))?;
                Ok(Self::wrap(region))
            }
            _ => {
                let what = || format!("an iterator of {}", std::any::type_name::<T>());
                check_size::<T>(&what)?;
                let per_buffer = ((1 << 20) / size).max(1);
                let region = Region::from_chunks(kind::<T>(), |buffer| {
                    for value in iter.by_ref().take(per_buffer) {
                        buffer.extend_from_slice(bytemuck::bytes_of(&value));
                    }
                    buffer.len() == per_buffer * size
                })
                .map_err(|f| share_error(what(), f))?;
                Ok(Self::wrap(region))
            }
        }
    }

    /// Shares a copy of the file at `path`, read as consecutive `T` values in this
    /// machine's byte order.
    ///
    /// The file is copied into the sealed shared memory inside the kernel
    /// (`copy_file_range`), at about memory speed for a cached file; later changes to
    /// the file do not reach the copy. See [`SharedSlice::map_file`] to map a file
    /// without copying it.
    ///
    /// # Errors
    ///
    /// [`Error::Share`] naming the file when it cannot be opened or read, is empty,
    /// or its length is not a multiple of `size_of::<T>()`; or when memory is short.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let (file, len) = open_input::<T>(path)?;
        let region = Region::from_file(kind::<T>(), &file, len)
            .map_err(|f| share_error(format!("file {}", path.display()), f))?;
        Ok(Self::wrap(region))
    }

    /// Maps the file at `path` read-only without copying it, and shares that map.
    ///
    /// Zero-copy, and the fastest way to share a file that is already on a fast
    /// disk or in the page cache. Workers that receive it map the same file.
    ///
    /// It reaches only the workers of this process's pools (as an item, a context,
    /// an `apply_async` or initializer argument) and its [`Process`](crate::Process)
    /// children: the request that carries it tells them this one file may be mapped
    /// without seals. A handle decoded anywhere else (a result sent back, a
    /// [`Queue`](crate::Queue) or [`Pipe`](crate::Pipe) item) must name a sealed
    /// memfd, so there a mapped file fails to decode with an error saying it is not
    /// sealed; use [`SharedSlice::from_file`] for those.
    ///
    /// # Safety
    ///
    /// The file must not be written to, truncated or grown, by this or any other
    /// process, while any process holds a map of it (this slice, its clones, or a
    /// worker that received it; workers keep what they received until their pool is
    /// dropped). A truncated file kills the readers with `SIGBUS`; a changed one
    /// breaks the guarantee that `&[T]` does not change. The same contract as
    /// [`memmap2::Mmap::map`].
    ///
    /// # Errors
    ///
    /// As [`SharedSlice::from_file`].
    pub unsafe fn map_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let (file, _) = open_input::<T>(path)?;
        // SAFETY: requirements forwarded to the caller (the file does not change
        // while mapped, in any process).
        let region = unsafe { Region::from_user_file(kind::<T>(), file) }
            .map_err(|f| share_error(format!("file {}", path.display()), f))?;
        Ok(Self::wrap(region))
    }

    fn wrap(region: Arc<Region>) -> Self {
        let len = region.bytes().len() / std::mem::size_of::<T>();
        SharedSlice {
            region,
            len,
            _type: PhantomData,
        }
    }

    /// The values, as a slice (also what `Deref` gives).
    pub fn as_slice(&self) -> &[T] {
        let bytes = &self.region.bytes()[..self.len * std::mem::size_of::<T>()];
        if bytes.is_empty() {
            return &[];
        }
        // Maps start on a page boundary and the length is a multiple of the
        // element size (checked when made and when attached), so this cannot fail.
        bytemuck::cast_slice(bytes)
    }

    pub(crate) fn region(&self) -> &Region {
        &self.region
    }
}

impl<T: bytemuck::Pod> Deref for SharedSlice<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        self.as_slice()
    }
}

impl<T> Clone for SharedSlice<T> {
    fn clone(&self) -> Self {
        SharedSlice {
            region: Arc::clone(&self.region),
            len: self.len,
            _type: PhantomData,
        }
    }
}

impl<T> fmt::Debug for SharedSlice<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedSlice")
            .field("type", &std::any::type_name::<T>())
            .field("len", &self.len)
            .finish()
    }
}

impl<T: bytemuck::Pod> Serialize for SharedSlice<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        self.region.handle_pinned().serialize(serializer)
    }
}

impl<'de, T: bytemuck::Pod> Deserialize<'de> for SharedSlice<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let handle = RegionHandle::deserialize(deserializer)?;
        let region = attach(&handle, kind::<T>(), std::any::type_name::<[T]>())
            .map_err(serde::de::Error::custom)?;
        if region.bytes().len() % std::mem::size_of::<T>().max(1) != 0 {
            return Err(serde::de::Error::custom(
                "a shared slice's length is not a multiple of its element size",
            ));
        }
        Ok(Self::wrap(region))
    }
}

/// Any serializable value, encoded once into shared memory and decoded once per
/// worker.
///
/// `Shared::new(value)` encodes the value into a sealed memfd. Sent to workers (as a
/// context or inside items) it crosses as a small handle; each worker maps the bytes,
/// decodes them the first time it sees the handle, and keeps the value for later
/// calls of the same pool. Tasks see `&T`. In the process that made it, the value is
/// the original, never decoded. For arrays of plain data, [`SharedSlice`] avoids the
/// decoding altogether.
///
/// # Examples
///
/// ```standalone_crate
/// use std::collections::HashMap;
/// use multiproc::Shared;
///
/// fn main() -> multiproc::Result<()> {
///     multiproc::init();
///     let table: HashMap<String, u32> = [("a".to_string(), 1), ("b".to_string(), 2)].into();
///     let table = Shared::new(table)?;
///     let pool = multiproc::Pool::builder().workers(2).build()?;
///     let keys: Vec<String> = vec!["a".into(), "b".into(), "c".into()];
///     let found = pool.map_with(keys, &table,
///         |t: &Shared<HashMap<String, u32>>, k: String| t.get(&k).copied())?;
///     assert_eq!(found, [Some(1), Some(2), None]);
///     Ok(())
/// }
/// ```
pub struct Shared<T> {
    region: Arc<Region>,
    value: Arc<T>,
}

impl<T: Serialize + DeserializeOwned + Send + Sync + 'static> Shared<T> {
    /// Encodes `value` into shared memory and keeps it.
    ///
    /// # Errors
    ///
    /// [`Error::Share`] when the value cannot be encoded (a type the codec does not
    /// carry) or the memory cannot be had.
    pub fn new(value: T) -> Result<Self> {
        let what = || format!("a value of type {}", std::any::type_name::<T>());
        let mut bytes = Vec::new();
        codec::encode_into(&value, &mut bytes).map_err(|e| Error::Share {
            what: what(),
            reason: format!("it could not be encoded: {e}"),
            source: None,
        })?;
        let region = Region::from_bytes(kind::<T>(), &bytes).map_err(|f| share_error(what(), f))?;
        let value = Arc::new(value);
        region.keep_value(Arc::clone(&value) as _);
        Ok(Shared { region, value })
    }

    /// The number of bytes the value takes in shared memory.
    pub fn encoded_len(&self) -> usize {
        self.region.bytes().len()
    }
}

impl<T> Deref for Shared<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Shared {
            region: Arc::clone(&self.region),
            value: Arc::clone(&self.value),
        }
    }
}

impl<T: fmt::Debug> fmt::Debug for Shared<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Shared").field(&self.value).finish()
    }
}

impl<T> Serialize for Shared<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        self.region.handle_pinned().serialize(serializer)
    }
}

impl<'de, T: DeserializeOwned + Send + Sync + 'static> Deserialize<'de> for Shared<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let handle = RegionHandle::deserialize(deserializer)?;
        let region = attach(&handle, kind::<T>(), std::any::type_name::<T>())
            .map_err(serde::de::Error::custom)?;
        if region.value().is_none_or(|v| !v.is::<T>()) {
            let value: T = codec::decode(region.bytes()).map_err(|e| {
                serde::de::Error::custom(format!("could not decode a shared value: {e}"))
            })?;
            DECODES.fetch_add(1, Ordering::Relaxed);
            region.keep_value(Arc::new(value));
        }
        let value = Arc::clone(region.value().expect("stored just above"))
            .downcast::<T>()
            .map_err(|_| {
                serde::de::Error::custom("a shared value of another type is already kept")
            })?;
        Ok(Shared { region, value })
    }
}

/// How many `Shared` values this process decoded (tests count them).
static DECODES: AtomicU64 = AtomicU64::new(0);

/// How many `Shared` values this process decoded.
pub(crate) fn decodes() -> u64 {
    DECODES.load(Ordering::Relaxed)
}

/// Attaches the region a handle names, checking it was made for `expected`.
fn attach(
    handle: &RegionHandle,
    expected: u64,
    type_name: &str,
) -> std::result::Result<Arc<Region>, String> {
    if handle.kind() != expected {
        return Err(format!(
            "the shared input was not made for type {type_name}"
        ));
    }
    handle
        .attach(true)
        .map_err(|f| format!("could not attach a shared input: {f}"))
}

/// A fingerprint of `T`, to refuse a handle decoded as another type.
fn kind<T: ?Sized>() -> u64 {
    let name = std::any::type_name::<T>();
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn describe<T>(len: usize) -> String {
    format!("{len} values of type {}", std::any::type_name::<T>())
}

fn check_size<T>(what: &dyn Fn() -> String) -> Result<()> {
    if std::mem::size_of::<T>() == 0 {
        return Err(Error::Share {
            what: what(),
            reason: "zero-sized values take no memory to share".into(),
            source: None,
        });
    }
    Ok(())
}

fn share_error(what: String, fault: Fault) -> Error {
    Error::Share {
        what,
        reason: fault.reason,
        source: fault.source,
    }
}

/// Opens an input file and checks its length suits `T`.
fn open_input<T>(path: &Path) -> Result<(std::fs::File, u64)> {
    let what = || format!("file {}", path.display());
    let fail = |reason: String, source: Option<std::io::Error>| Error::Share {
        what: what(),
        reason,
        source,
    };
    check_size::<T>(&what)?;
    let file = std::fs::File::open(path).map_err(|e| fail("could not open it".into(), Some(e)))?;
    let meta = file
        .metadata()
        .map_err(|e| fail("could not read its length".into(), Some(e)))?;
    if !meta.is_file() {
        return Err(fail("it is not a regular file".into(), None));
    }
    let len = meta.len();
    let size = std::mem::size_of::<T>() as u64;
    if len == 0 {
        return Err(fail(
            format!(
                "it is empty: no {} values to share",
                std::any::type_name::<T>()
            ),
            None,
        ));
    }
    if len % size != 0 {
        return Err(fail(
            format!(
                "its {len} bytes are not a whole number of {size}-byte {} values",
                std::any::type_name::<T>()
            ),
            None,
        ));
    }
    Ok((file, len))
}

/// For this crate's tests: what a process attached, decoded and kept.
pub(crate) mod stats {
    /// Regions attached from other processes, `Shared` values decoded, regions kept.
    pub(crate) fn counts() -> (u64, u64, usize) {
        (
            super::region::attaches(),
            super::decodes(),
            super::region::kept(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<A: Serialize, B: DeserializeOwned>(value: &A) -> std::result::Result<B, String> {
        let mut bytes = Vec::new();
        codec::encode_into(value, &mut bytes).map_err(|e| e.to_string())?;
        codec::decode::<B>(&bytes).map_err(|e| e.to_string())
    }

    #[test]
    fn a_handle_is_small_and_decodes_to_the_same_region() {
        let data = SharedSlice::from_iter(0..1_000_000u64).unwrap();
        let mut bytes = Vec::new();
        codec::encode_into(&data, &mut bytes).unwrap();
        assert_eq!(bytes.len(), 40, "pid, fd, dev, ino, len, type");
        let back: SharedSlice<u64> = round_trip(&data).unwrap();
        assert_eq!(back.as_ptr(), data.as_ptr(), "the same map, not a copy");
    }

    #[test]
    fn a_handle_of_another_type_is_refused() {
        let data = SharedSlice::from_vec(vec![1u32, 2]).unwrap();
        let err = round_trip::<_, SharedSlice<u64>>(&data).unwrap_err();
        assert!(err.contains("not made for type"), "{err}");
        let value = Shared::new(7u64).unwrap();
        let err = round_trip::<_, Shared<i64>>(&value).unwrap_err();
        assert!(err.contains("not made for type"), "{err}");
        let same: Shared<u64> = round_trip(&value).unwrap();
        assert_eq!(*same, 7);
    }

    /// A process of another program that holds `file` as its standard output (fd
    /// 1), waiting on its input until dropped.
    struct Holder(std::process::Child);

    impl Holder {
        fn new(file: &std::fs::File) -> Self {
            let child = std::process::Command::new("cat")
                .stdin(std::process::Stdio::piped())
                .stdout(file.try_clone().unwrap())
                .spawn()
                .unwrap();
            Holder(child)
        }
    }

    impl Drop for Holder {
        fn drop(&mut self) {
            drop(self.0.stdin.take());
            let _ = self.0.wait();
        }
    }

    #[test]
    fn a_forged_handle_to_an_unsealed_file_is_refused() {
        use std::io::Write;
        use std::os::unix::fs::MetadataExt;
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[7u8; 4096]).unwrap();
        let meta = file.metadata().unwrap();
        let holder = Holder::new(&file);
        // A handle's fields naming the ordinary file, as `/proc/<pid>/fd/1`; once
        // as they are, once with the `true` that old handles carried to say "a
        // user's file: map it without seals".
        let fields = (
            holder.0.id(),
            1i32,
            meta.dev(),
            meta.ino(),
            meta.len(),
            kind::<u8>(),
        );
        let mut plain = Vec::new();
        codec::encode_into(&fields, &mut plain).unwrap();
        let mut flagged = plain.clone();
        codec::encode_into(&true, &mut flagged).unwrap();
        for forged in [&plain, &flagged] {
            let err = match codec::decode::<SharedSlice<u8>>(forged) {
                Ok(slice) => panic!(
                    "a forged handle mapped {} bytes of a plain file",
                    slice.len()
                ),
                Err(err) => err.to_string(),
            };
            assert!(err.contains("is not sealed"), "{err}");
        }
        // Even listed as a grant, it names no parent this process trusts.
        let handle = codec::decode::<RegionHandle>(&plain).unwrap();
        let err = region::with_unsealed(&[handle], || handle.attach(false))
            .err()
            .expect("no grant outside a worker")
            .to_string();
        assert!(err.contains("is not sealed"), "{err}");
    }

    #[test]
    fn a_dropped_input_cannot_be_attached() {
        let data = SharedSlice::from_vec(vec![1u8]).unwrap();
        let mut bytes = Vec::new();
        codec::encode_into(&data, &mut bytes).unwrap();
        drop(data);
        let err = codec::decode::<SharedSlice<u8>>(&bytes)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no longer holds"), "{err}");
    }
}
