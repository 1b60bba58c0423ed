//! A test-only global allocator that remembers the largest request, so a unit test
//! can tell that a corrupt length prefix did not turn into an allocation.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Forwards to the system allocator and remembers the largest request, so a test
/// can tell that a corrupt length did not turn into an allocation.
struct LargestRequest;

static LARGEST_REQUEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to `System` with the caller's own arguments, so
// `System`'s guarantees carry over unchanged; the bookkeeping only reads sizes.
unsafe impl std::alloc::GlobalAlloc for LargestRequest {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        LARGEST_REQUEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: requirements forwarded to the caller.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        LARGEST_REQUEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: requirements forwarded to the caller.
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        LARGEST_REQUEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: requirements forwarded to the caller.
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: requirements forwarded to the caller.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: LargestRequest = LargestRequest;

/// The largest allocation requested in this process so far.
pub(crate) fn largest_request() -> usize {
    LARGEST_REQUEST.load(Ordering::Relaxed)
}
