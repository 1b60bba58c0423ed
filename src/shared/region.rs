//! The memory behind shared inputs: sealed memfds, their read-only maps, and the
//! per-process table of regions this process holds or has attached.
//!
//! This is the only file of `shared` with `unsafe`: mapping a file is unsafe because
//! the bytes behind a map may change or vanish. Every read-only map made here is of a
//! memfd sealed against shrink, grow and write (checked with `F_GET_SEALS` before
//! mapping one that another process made), so neither can happen; the one exception
//! is a user's file mapped by the `unsafe fn` `SharedSlice::map_file`, whose caller
//! promises the same. The only writable map is of a memfd nobody else has yet, and
//! it is gone before the seals go on.
//!
//! A region crosses processes as a [`RegionHandle`]: the pid of the process that
//! encoded it, its descriptor number there, the file's device and inode, its length
//! and a type fingerprint. The receiver opens `/proc/<pid>/fd/<fd>` read-only and
//! checks device and inode with `fstat`, so a descriptor number reused for another
//! file cannot be mapped as the region.
//!
//! A handle is plain serde data that anyone can forge (a file, a `Queue` item from a
//! sibling, any deserializer), so nothing in it says "no seals needed": a handle
//! decoded here is mapped only with the seals, or when it names a region this
//! process already holds. The one way around the seals is a grant: the parent of a
//! worker lists, in the header of the frame it sends (a chunk, a context, the
//! initializer's argument), the handles of the `map_file` regions the frame's values
//! name ([`Pins::unsealed`], from the regions whose handles it encoded), and the
//! worker maps such a handle without seals only while it decodes that frame
//! ([`with_unsealed`]) and only if the handle names that parent ([`trust_parent`]).
//! Headers are written by this crate in the parent and travel over the worker's own
//! channel, which only its parent writes to: user values cannot make a grant.
//! A result going back with a `map_file` slice fails to decode with an error saying
//! it is not sealed; a `Queue` or a `Pipe` refuses one when it is sent
//! ([`Pins::carried`]).
//!
//! A `Queue` item or a `Pipe` value may be decoded long after its sender dropped
//! its handles, or exited: there, copies of the regions' descriptors travel with
//! the value (SCM_RIGHTS, [`Pins::carried`]) and the receiver attaches a handle
//! from the descriptor that came with it ([`with_carried`]), with the same checks
//! (device, inode, size, seals) as through `/proc`.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use memmap2::{Mmap, MmapOptions};
use serde::{Deserialize, Serialize};

/// The seals every region carries once filled.
const SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;

/// Regions attached from other processes kept after their last local use, so a
/// worker attaches an input once however many calls use it.
const KEEP_ATTACHED: usize = 16;

/// The type fingerprint of a region holding an encoded context value.
pub(crate) const CONTEXT_KIND: u64 = 0x6d70_2d63_6f6e_7478;

/// Why a region could not be made or attached: what was being done, and the OS error.
#[derive(Debug)]
pub(crate) struct Fault {
    pub(crate) reason: String,
    pub(crate) source: Option<io::Error>,
}

impl Fault {
    fn os(reason: impl Into<String>, source: io::Error) -> Self {
        Fault {
            reason: reason.into(),
            source: Some(source),
        }
    }

    pub(crate) fn plain(reason: impl Into<String>) -> Self {
        Fault {
            reason: reason.into(),
            source: None,
        }
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.source {
            Some(source) => write!(f, "{}: {source}", self.reason),
            None => f.write_str(&self.reason),
        }
    }
}

/// What identifies a region on this machine while it exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    dev: u64,
    ino: u64,
}

/// A sealed memfd and its read-only map.
pub(crate) struct Region {
    file: File,
    /// `None` for an empty region (a map cannot be empty).
    map: Option<Mmap>,
    key: Key,
    kind: u64,
    /// A value decoded from the bytes (by `Shared<T>`), kept as long as the region.
    value: OnceLock<Arc<dyn Any + Send + Sync>>,
    /// The process and descriptor it was attached from; `None` if made here.
    source: Option<(u32, i32)>,
    /// A user's file mapped directly (`SharedSlice::map_file`, or attached under a
    /// grant of the parent that made it): not sealed, and safe only by the promise
    /// of that `unsafe fn`'s caller. Never read from a handle: see [`Pins::unsealed`].
    direct: bool,
}

/// A region as it crosses to another process. It says nothing of seals: whether a
/// receiver may map it without them is decided on the receiving side (see the
/// module's documentation), never by these bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RegionHandle {
    pid: u32,
    fd: i32,
    dev: u64,
    ino: u64,
    len: u64,
    kind: u64,
}

impl Region {
    /// A region holding a copy of `bytes`.
    pub(crate) fn from_bytes(kind: u64, bytes: &[u8]) -> Result<Arc<Region>, Fault> {
        let file = memfd(bytes.len())?;
        file.write_all_at(bytes, 0)
            .map_err(|e| space_fault(bytes.len(), e))?;
        finish(file, kind)
    }

    /// A region of `len` bytes written by `fill` through a writable map, which is
    /// unmapped before sealing; `fill` returns how many bytes it wrote, which must
    /// be `len`.
    pub(crate) fn from_writer(
        kind: u64,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<usize, Fault>,
    ) -> Result<Arc<Region>, Fault> {
        let file = memfd(len)?;
        if len > 0 {
            reserve(&file, len)?;
            // SAFETY: `file` is the memfd `memfd` created just above, reserved to
            // `len` bytes so no write through the map can fault for lack of memory;
            // nothing else in this process has it and it is not sealed yet, so no
            // one can truncate it while this writable map exists.
            let map = unsafe { MmapOptions::new().len(len).populate().map_mut(&file) };
            let mut map = map.map_err(|e| Fault::os("could not map the new shared memory", e))?;
            let written = fill(&mut map[..])?;
            // Unmapped before sealing: F_SEAL_WRITE fails while a writable map exists.
            drop(map);
            if written != len {
                return Err(Fault::plain(format!(
                    "the input gave {written} bytes where {len} were announced"
                )));
            }
        }
        finish(file, kind)
    }

    /// A region filled by `next`, which appends up to a buffer's worth of bytes per
    /// call and returns `false` at the end (for inputs of unknown length).
    pub(crate) fn from_chunks(
        kind: u64,
        mut next: impl FnMut(&mut Vec<u8>) -> bool,
    ) -> Result<Arc<Region>, Fault> {
        let file = memfd(0)?;
        let mut buffer = Vec::with_capacity(1 << 20);
        let mut offset = 0u64;
        // Past each 64 MiB written: room for the next 64 MiB.
        let mut checked = 64u64 << 20;
        loop {
            buffer.clear();
            let more = next(&mut buffer);
            if offset >= checked {
                check_room(64 << 20)?;
                checked = offset + (64 << 20);
            }
            file.write_all_at(&buffer, offset)
                .map_err(|e| space_fault(offset as usize + buffer.len(), e))?;
            offset += buffer.len() as u64;
            if !more {
                break;
            }
        }
        finish(file, kind)
    }

    /// A region holding a copy of the open file `source` (`len` bytes), copied in
    /// the kernel (`copy_file_range`, or `sendfile`) without passing through user
    /// space.
    pub(crate) fn from_file(kind: u64, source: &File, len: u64) -> Result<Arc<Region>, Fault> {
        let size = usize::try_from(len).map_err(|_| Fault::plain("too large to map"))?;
        let file = memfd(size)?;
        let mut reader = source;
        let mut writer = &file;
        // std copies File to File with copy_file_range, falling back to sendfile.
        let copied = io::copy(&mut reader, &mut writer).map_err(|e| space_fault(size, e))?;
        if copied != len {
            return Err(Fault::plain(format!(
                "the file changed while it was copied ({copied} bytes read, {len} expected)"
            )));
        }
        finish(file, kind)
    }

    /// A region that is the user's file `file`, mapped read-only without a copy.
    ///
    /// # Safety
    ///
    /// The file must not be written to, truncated or grown by any process while any
    /// process maps it (here, or in a process this region's handle reaches).
    pub(crate) unsafe fn from_user_file(kind: u64, file: File) -> Result<Arc<Region>, Fault> {
        let meta = file
            .metadata()
            .map_err(|e| Fault::os("could not stat the file", e))?;
        // SAFETY: requirements forwarded to the caller.
        let map = unsafe { map_unsealed(&file, meta.len())? };
        let key = Key {
            dev: meta.dev(),
            ino: meta.ino(),
        };
        Ok(register(Region {
            file,
            map,
            key,
            kind,
            value: OnceLock::new(),
            source: None,
            direct: true,
        }))
    }

    /// The region's bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// The value decoded from the region, if one was stored.
    pub(crate) fn value(&self) -> Option<&Arc<dyn Any + Send + Sync>> {
        self.value.get()
    }

    /// Stores the value decoded from (or encoded into) the region; the first one stays.
    pub(crate) fn keep_value(&self, value: Arc<dyn Any + Send + Sync>) {
        let _ = self.value.set(value);
    }

    /// The handle another process attaches this region with; inside
    /// [`pin_while`] the region is also returned with the pins.
    pub(crate) fn handle_pinned(self: &Arc<Self>) -> RegionHandle {
        PINS.with(|pins| {
            if let Ok(mut pins) = pins.try_borrow_mut()
                && let Some(pins) = pins.as_mut()
            {
                pins.entry(self.key).or_insert_with(|| Arc::clone(self));
            }
        });
        // A worker that made a region and sends it (in a result) keeps it like an
        // attached one, so the parent can still open it after the task dropped it.
        if self.source.is_none() && KEEP.load(Ordering::Relaxed) {
            let mut table = table().lock().unwrap_or_else(|e| e.into_inner());
            if !table.kept.iter().any(|r| Arc::ptr_eq(r, self)) {
                table.kept.push_back(Arc::clone(self));
                while table.kept.len() > KEEP_ATTACHED {
                    table.kept.pop_front();
                }
            }
        }
        self.handle()
    }

    /// The handle another process attaches this region with.
    pub(crate) fn handle(&self) -> RegionHandle {
        RegionHandle {
            pid: std::process::id(),
            fd: self.file.as_raw_fd(),
            dev: self.key.dev,
            ino: self.key.ino,
            len: self.bytes().len() as u64,
            kind: self.kind,
        }
    }

    /// The seals on the region's memfd (`F_GET_SEALS`).
    pub(crate) fn seals(&self) -> Result<libc::c_int, Fault> {
        get_seals(&self.file)
    }

    /// The region's descriptor in this process (for tests that try to write to it).
    pub(crate) fn raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }
}

impl RegionHandle {
    /// The type fingerprint the region was made with.
    pub(crate) fn kind(&self) -> u64 {
        self.kind
    }

    /// The region this handle names: the one this process already holds, or the
    /// memfd of the process that sent it, opened through `/proc`, checked and mapped
    /// read-only. With `keep`, in a worker process, an attached region stays in this
    /// process's bounded table after its last use, so a later call attaches nothing.
    pub(crate) fn attach(&self, keep: bool) -> Result<Arc<Region>, Fault> {
        let keep = keep && KEEP.load(Ordering::Relaxed);
        let key = Key {
            dev: self.dev,
            ino: self.ino,
        };
        let mut table = table().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(region) = table.live.get(&key).and_then(Weak::upgrade) {
            return self.matches(region);
        }
        let carried = carried(key);
        if carried.is_none() && self.pid == std::process::id() {
            return Err(Fault::plain(
                "this process no longer holds the shared input the handle names",
            ));
        }
        // Entries kept for inputs their sender has since dropped go first.
        table.sweep();
        let region = self.open(carried)?;
        let region = Arc::new(region);
        table.live.insert(key, Arc::downgrade(&region));
        if keep {
            table.kept.push_back(Arc::clone(&region));
            while table.kept.len() > KEEP_ATTACHED {
                table.kept.pop_front();
            }
        }
        ATTACHES.fetch_add(1, Ordering::Relaxed);
        Ok(region)
    }

    fn matches(&self, region: Arc<Region>) -> Result<Arc<Region>, Fault> {
        if region.bytes().len() as u64 != self.len || region.kind != self.kind {
            return Err(Fault::plain(
                "the handle does not match the shared input it names (length or type)",
            ));
        }
        Ok(region)
    }

    /// Opens the region through `/proc`, or from `carried`, a descriptor of it that
    /// came with the value being decoded (checked the same way).
    fn open(&self, carried: Option<File>) -> Result<Region, Fault> {
        let (file, path) = match carried {
            Some(file) => (file, "a descriptor sent with the value".to_string()),
            None => {
                let path = format!("/proc/{}/fd/{}", self.pid, self.fd);
                let file = File::open(&path).map_err(|e| {
                    Fault::os(
                        format!(
                            "could not open the shared input held by process {} as {path} \
                             (that process must hold the input until its receivers have \
                             attached it)",
                            self.pid
                        ),
                        e,
                    )
                })?;
                (file, path)
            }
        };
        let meta = file
            .metadata()
            .map_err(|e| Fault::os(format!("could not stat {path}"), e))?;
        if meta.dev() != self.dev || meta.ino() != self.ino {
            return Err(Fault::plain(format!(
                "{path} is no longer the shared input the handle names (the process \
                 dropped it and reused the descriptor)"
            )));
        }
        if meta.len() != self.len {
            return Err(Fault::plain(format!(
                "{path} holds {} bytes where the handle says {}",
                meta.len(),
                self.len
            )));
        }
        let granted = self.granted();
        let map = if granted {
            // SAFETY: `granted` holds only while this thread decodes a frame whose
            // header lists this exact handle (pid, descriptor, device, inode, length,
            // type) and only when the handle's pid is the parent that started this
            // worker (`trust_parent`). Headers are written by this crate in that
            // parent, from `Pins::unsealed`: regions whose handles it encoded and
            // that `Region::from_user_file` made, whose caller promised (the
            // contract of `SharedSlice::map_file`) that the file does not change
            // while any process maps it; the parent keeps them pinned while the
            // frame is in flight, and the worker's channel is written only by that
            // parent. The `fstat` above checked that the descriptor still names that
            // file at that size.
            unsafe { map_unsealed(&file, self.len)? }
        } else {
            let seals = get_seals(&file)?;
            if seals & SEALS != SEALS {
                return Err(Fault::plain(format!(
                    "{path} is not sealed against shrink, grow and write, so it cannot be \
                     mapped safely (a SharedSlice::map_file slice reaches only the workers \
                     of the pool that sends it)"
                )));
            }
            map_sealed(&file, self.len)?
        };
        Ok(Region {
            file,
            map,
            key: Key {
                dev: self.dev,
                ino: self.ino,
            },
            kind: self.kind,
            value: OnceLock::new(),
            source: Some((self.pid, self.fd)),
            direct: granted,
        })
    }
}

impl RegionHandle {
    /// Whether this handle may be mapped without seals here: the parent that
    /// started this worker granted it for the frame this thread is decoding.
    fn granted(&self) -> bool {
        let parent = TRUSTED_PARENT.load(Ordering::Relaxed);
        parent != 0
            && self.pid == parent
            && GRANTS.with(|grants| {
                grants
                    .try_borrow()
                    .is_ok_and(|grants| grants.iter().any(|granted| granted == self))
            })
    }
}

/// The process whose grants this process honours: the parent of a worker, set when
/// it starts serving; 0 (no process) everywhere else.
static TRUSTED_PARENT: AtomicU32 = AtomicU32::new(0);

/// Makes this worker honour the grants of `parent`, the process that started it
/// and the only one that writes to its request channel.
pub(crate) fn trust_parent(parent: u32) {
    TRUSTED_PARENT.store(parent, Ordering::Relaxed);
}

thread_local! {
    /// The `map_file` regions the frame being decoded on this thread may name.
    static GRANTS: std::cell::RefCell<Vec<RegionHandle>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `decode` with `grants` (the `unsealed` list of the header of the frame it
/// decodes, as the parent wrote it) in force on this thread: a handle among them,
/// naming the trusted parent, is mapped without seals.
pub(crate) fn with_unsealed<R>(grants: &[RegionHandle], decode: impl FnOnce() -> R) -> R {
    /// Puts the outer grants back even if `decode` panics.
    struct Scope(Vec<RegionHandle>);
    impl Drop for Scope {
        fn drop(&mut self) {
            let outer = std::mem::take(&mut self.0);
            GRANTS.with(|current| {
                if let Ok(mut current) = current.try_borrow_mut() {
                    *current = outer;
                }
            });
        }
    }
    let outer = GRANTS.with(|current| {
        current
            .try_borrow_mut()
            .map(|mut current| std::mem::replace(&mut *current, grants.to_vec()))
            .unwrap_or_default()
    });
    let _scope = Scope(outer);
    decode()
}

thread_local! {
    /// Regions whose handles were encoded on this thread inside a [`PinScope`].
    static PINS: std::cell::RefCell<Option<HashMap<Key, Arc<Region>>>> =
        const { std::cell::RefCell::new(None) };
}

/// Regions kept alive because a message that names them is on its way: the
/// receiver opens the sender's descriptor, so an item that owned the last handle
/// must not take the region with it when it is dropped after encoding.
#[derive(Default, Clone)]
pub(crate) struct Pins(Vec<Arc<Region>>);

impl std::fmt::Debug for Pins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pins({})", self.0.len())
    }
}

impl Pins {
    /// The handles of the pinned regions that are users' files mapped without seals
    /// (`SharedSlice::map_file`): what a frame's header lists so that the parent's
    /// own workers may map them (see [`with_unsealed`]).
    pub(crate) fn unsealed(&self) -> Vec<RegionHandle> {
        self.0
            .iter()
            .filter(|region| region.direct)
            .map(|region| region.handle())
            .collect()
    }
}

/// Adds `pins` to those of the [`pin_while`] running on this thread, if any: for
/// values encoded earlier (an `apply_async` argument) that go into a chunk now.
pub(crate) fn adopt(pins: Pins) {
    PINS.with(|current| {
        if let Ok(mut current) = current.try_borrow_mut()
            && let Some(current) = current.as_mut()
        {
            for region in pins.0 {
                current.entry(region.key).or_insert(region);
            }
        }
    });
}

/// Runs `encode` and returns, with its result, every region whose handle it encoded
/// on this thread (a chunk keeps them until its reply arrives).
pub(crate) fn pin_while<R>(encode: impl FnOnce() -> R) -> (R, Pins) {
    /// Puts the outer scope back even if `encode` panics.
    struct Scope(Option<HashMap<Key, Arc<Region>>>);
    impl Drop for Scope {
        fn drop(&mut self) {
            let outer = self.0.take();
            PINS.with(|pins| *pins.borrow_mut() = outer);
        }
    }
    let outer = PINS.with(|pins| pins.borrow_mut().replace(HashMap::new()));
    let scope = Scope(outer);
    let result = encode();
    let pinned = PINS.with(|pins| pins.borrow_mut().take());
    drop(scope);
    let pins = Pins(
        pinned
            .map(|p| p.into_values().collect())
            .unwrap_or_default(),
    );
    (result, pins)
}

thread_local! {
    /// Descriptors of regions that came with the value being decoded on this
    /// thread (a `Queue` item, a `Pipe` value), by what identifies them.
    static CARRIED: std::cell::RefCell<Vec<(Key, File)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// The most descriptors one message carries (the kernel's `SCM_MAX_FD`).
pub(crate) const MAX_CARRIED: usize = 253;

impl Pins {
    /// Whether no region is pinned.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Copies of the pinned regions' descriptors, to travel with a value to a
    /// process that may decode it after every handle here is gone (a `Queue` item,
    /// a `Pipe` value). Refused, naming why, for a user's file mapped without seals
    /// (`SharedSlice::map_file`: no receiver may map it) and past [`MAX_CARRIED`].
    pub(crate) fn carried(&self) -> Result<Vec<std::os::fd::OwnedFd>, Fault> {
        if self.0.iter().any(|region| region.direct) {
            return Err(Fault::plain(
                "it holds a SharedSlice::map_file slice, which reaches only the workers of \
                 the pool that sends it (its file is not sealed), never a Queue or a Pipe",
            ));
        }
        if self.0.len() > MAX_CARRIED {
            return Err(Fault::plain(format!(
                "it names {} shared inputs, more than the {MAX_CARRIED} one value may carry",
                self.0.len()
            )));
        }
        self.0
            .iter()
            .map(|region| {
                region
                    .file
                    .try_clone()
                    .map(std::os::fd::OwnedFd::from)
                    .map_err(|e| Fault::os("could not copy a shared input's descriptor", e))
            })
            .collect()
    }
}

/// Runs `decode` with `fds` (descriptors that came with the value it decodes) in
/// force on this thread: a handle naming the region one of them holds is attached
/// from it, so the value decodes whether or not its sender still holds the region.
/// The seals are checked as for any attach.
pub(crate) fn with_carried<R>(fds: &[std::os::fd::OwnedFd], decode: impl FnOnce() -> R) -> R {
    if fds.is_empty() {
        return decode();
    }
    /// Empties the list even if `decode` panics.
    struct Scope;
    impl Drop for Scope {
        fn drop(&mut self) {
            CARRIED.with(|carried| {
                if let Ok(mut carried) = carried.try_borrow_mut() {
                    carried.clear();
                }
            });
        }
    }
    let files: Vec<(Key, File)> = fds
        .iter()
        .filter_map(|fd| {
            let file = File::from(fd.try_clone().ok()?);
            let meta = file.metadata().ok()?;
            Some((
                Key {
                    dev: meta.dev(),
                    ino: meta.ino(),
                },
                file,
            ))
        })
        .collect();
    CARRIED.with(|carried| {
        if let Ok(mut carried) = carried.try_borrow_mut() {
            *carried = files;
        }
    });
    let _scope = Scope;
    decode()
}

/// A copy of the carried descriptor of the region `key`, if one came with the value
/// being decoded.
fn carried(key: Key) -> Option<File> {
    CARRIED.with(|carried| {
        let carried = carried.try_borrow().ok()?;
        let (_, file) = carried.iter().find(|(k, _)| *k == key)?;
        file.try_clone().ok()
    })
}

/// Regions this process holds (weakly) and the attached ones it keeps (strongly).
#[derive(Default)]
struct Table {
    live: HashMap<Key, Weak<Region>>,
    kept: VecDeque<Arc<Region>>,
}

impl Table {
    /// Drops dead entries, and kept regions used nowhere else here whose sender no
    /// longer holds them (its descriptor is closed or names another file now).
    fn sweep(&mut self) {
        self.live.retain(|_, region| region.strong_count() > 0);
        self.kept.retain(|region| {
            if Arc::strong_count(region) > 1 {
                return true;
            }
            let Some(source) = region.source else {
                return true;
            };
            std::fs::metadata(format!("/proc/{}/fd/{}", source.0, source.1))
                .is_ok_and(|m| m.dev() == region.key.dev && m.ino() == region.key.ino)
        });
    }
}

fn table() -> &'static Mutex<Table> {
    static TABLE: OnceLock<Mutex<Table>> = OnceLock::new();
    TABLE.get_or_init(Mutex::default)
}

/// Whether this process keeps attached regions after their last use: a worker
/// process does (its pool's later calls use them again); other processes do not.
static KEEP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes this process keep the regions it attaches (see [`RegionHandle::attach`]).
pub(crate) fn keep_attached_inputs() {
    KEEP.store(true, Ordering::Relaxed);
}

/// How many regions this process attached from other processes.
static ATTACHES: AtomicU64 = AtomicU64::new(0);

/// How many regions this process attached from other processes (tests count them).
pub(crate) fn attaches() -> u64 {
    ATTACHES.load(Ordering::Relaxed)
}

/// How many attached regions this process keeps after their last use.
pub(crate) fn kept() -> usize {
    table().lock().unwrap_or_else(|e| e.into_inner()).kept.len()
}

/// Forgets kept regions whose senders have dropped them: called when a job ends.
pub(crate) fn sweep() {
    table().lock().unwrap_or_else(|e| e.into_inner()).sweep();
}

/// Refuses to fill `len` more bytes of shared memory when the machine does not have
/// them: a memfd is RAM, and filling one past what is free wakes the OOM killer
/// rather than returning `ENOSPC`.
fn check_room(len: usize) -> Result<(), Fault> {
    if len < 1 << 20 {
        return Ok(());
    }
    // Without /proc/meminfo there is nothing to compare with; the fill reports.
    let Some(available) = mem_available() else {
        return Ok(());
    };
    if len as u64 > available {
        return Err(Fault::plain(format!(
            "not enough memory for {len} bytes of shared memory: {available} bytes are \
             available (MemAvailable in /proc/meminfo); a memfd lives in RAM, not in \
             /dev/shm or on a disk"
        )));
    }
    Ok(())
}

/// `MemAvailable` from `/proc/meminfo`, in bytes.
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?;
    let kib: u64 = line.trim().trim_end_matches("kB").trim().parse().ok()?;
    kib.checked_mul(1024)
}

/// A new memfd, close-on-exec and sealable, for `len` bytes (checked against the
/// memory available).
fn memfd(len: usize) -> Result<File, Fault> {
    check_room(len)?;
    // SAFETY: the name is a NUL-terminated string literal and the flags are valid;
    // memfd_create reads the name and returns a new descriptor or -1.
    let fd = unsafe {
        libc::memfd_create(
            c"multiproc-shared".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(Fault::os(
            format!("could not create a {len}-byte shared memory file (memfd_create)"),
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: `fd` was just returned by memfd_create, is open, and nothing else owns
    // it: the File becomes its only owner and closes it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Reserves `len` bytes of memory for the memfd, so a short machine says so now
/// instead of killing a writer with SIGBUS later.
fn reserve(file: &File, len: usize) -> Result<(), Fault> {
    let size = libc::off_t::try_from(len).map_err(|_| Fault::plain("too large to map"))?;
    // SAFETY: fallocate on a descriptor this function's caller owns, with in-range
    // offset and length; it only changes the file's allocation.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, size) };
    if rc != 0 {
        return Err(space_fault(len, io::Error::last_os_error()));
    }
    Ok(())
}

fn space_fault(len: usize, e: io::Error) -> Fault {
    let reason = match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::ENOMEM) => format!(
            "not enough memory for {len} bytes of shared memory (a memfd: RAM, not /dev/shm or a disk)"
        ),
        _ => format!("could not fill a {len}-byte shared memory file (memfd)"),
    };
    Fault::os(reason, e)
}

fn get_seals(file: &File) -> Result<libc::c_int, Fault> {
    // SAFETY: F_GET_SEALS on an open descriptor reads its seals and touches no memory.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
        // A file that cannot carry seals (not a memfd or tmpfs file) has none.
        return Ok(0);
    }
    if seals < 0 {
        return Err(Fault::os(
            "could not read the seals of a shared input",
            io::Error::last_os_error(),
        ));
    }
    Ok(seals)
}

/// Seals a filled memfd, maps it read-only and enters it in this process's table.
fn finish(file: File, kind: u64) -> Result<Arc<Region>, Fault> {
    // SAFETY: F_ADD_SEALS on an open descriptor this function owns; it changes only
    // the file's seals. It fails with EBUSY if a writable map existed, and none does.
    let rc = unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_ADD_SEALS,
            SEALS | libc::F_SEAL_SEAL,
        )
    };
    if rc != 0 {
        return Err(Fault::os(
            "could not seal the shared memory file",
            io::Error::last_os_error(),
        ));
    }
    let meta = file
        .metadata()
        .map_err(|e| Fault::os("could not stat the shared memory file", e))?;
    let map = map_sealed(&file, meta.len())?;
    let key = Key {
        dev: meta.dev(),
        ino: meta.ino(),
    };
    Ok(register(Region {
        file,
        map,
        key,
        kind,
        value: OnceLock::new(),
        source: None,
        direct: false,
    }))
}

/// Enters a region made here in this process's table, so a handle to it decoded
/// here (the inline backend) finds it.
fn register(region: Region) -> Arc<Region> {
    let key = region.key;
    let region = Arc::new(region);
    let mut table = table().lock().unwrap_or_else(|e| e.into_inner());
    table.live.retain(|_, r| r.strong_count() > 0);
    table.live.insert(key, Arc::downgrade(&region));
    region
}

/// Maps `len` bytes of a file that carries no seals, read-only.
///
/// # Safety
///
/// The file must not be written to, truncated or grown while the map exists.
unsafe fn map_unsealed(file: &File, len: u64) -> Result<Option<Mmap>, Fault> {
    if len == 0 {
        return Ok(None);
    }
    let len = usize::try_from(len).map_err(|_| Fault::plain("too large to map"))?;
    // SAFETY: requirements forwarded to the caller.
    let map = unsafe { MmapOptions::new().len(len).map(file) };
    map.map(Some)
        .map_err(|e| Fault::os("could not map the file read-only", e))
}

/// Maps `len` bytes of a memfd sealed against shrink, grow and write, read-only.
fn map_sealed(file: &File, len: u64) -> Result<Option<Mmap>, Fault> {
    if len == 0 {
        return Ok(None);
    }
    let len = usize::try_from(len).map_err(|_| Fault::plain("too large to map"))?;
    // SAFETY: every caller passes a memfd whose seals include F_SEAL_SHRINK,
    // F_SEAL_GROW and F_SEAL_WRITE (`finish` added them, `RegionHandle::open`
    // checked them), and `len` is its size: nobody can write to it, truncate it or
    // grow it while the map exists, so the mapped bytes never change or vanish.
    let map = unsafe { MmapOptions::new().len(len).map(file) };
    map.map(Some)
        .map_err(|e| Fault::os("could not map a shared input read-only", e))
}
