//! Shared memory seen as one atomic word: a worker's progress word.

use std::sync::atomic::AtomicU64;

use ipc_channel::ipc::IpcSharedMemory;

/// Leaks `memory` (at least 8 bytes, made by this process and read by at most one
/// other process that only reads) and returns its first word as an atomic that lives
/// as long as the process; `None` when it is too small or not aligned.
pub(crate) fn leak_word(mut memory: IpcSharedMemory) -> Option<&'static AtomicU64> {
    // SAFETY: `memory` was created by this process (`from_byte`) and the only other
    // view of it is the parent's copy, which only reads it once this worker is dead;
    // the mutable view is taken once, here, and the mapping is leaked so it lives as
    // long as the process.
    let bytes = unsafe { memory.deref_mut() };
    if bytes.len() < std::mem::size_of::<u64>() {
        return None;
    }
    let word = bytes.as_mut_ptr().cast::<u64>();
    std::mem::forget(memory);
    if !word.is_aligned() {
        return None;
    }
    // SAFETY: `word` points to 8 bytes of a page-aligned shared mapping (checked
    // aligned just above) that is never unmapped (leaked above) and that this
    // process accesses only through this atomic from now on.
    Some(unsafe { AtomicU64::from_ptr(word) })
}
