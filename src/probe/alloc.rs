//! A counting global allocator: live bytes now and the highest live bytes since the last reset,
//! across all threads. The `memplan` binary installs it (`#[global_allocator]` in `main.rs`);
//! a test binary that measures memory installs its own.
//!
//! It counts requested sizes (`Layout::size`), not what the system allocator rounds them up to,
//! which is the quantity the estimate models.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// [`System`] with counting.
#[derive(Debug, Default, Clone, Copy)]
pub struct CountingAlloc;

fn grew(by: usize) {
    let now = CURRENT.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call forwards to `System` with the caller's arguments; the counters do not affect
// the returned memory.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                CURRENT.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

/// Live bytes now.
pub fn current() -> usize {
    CURRENT.load(Ordering::Relaxed)
}

/// Highest live bytes since the last [`reset_peak`].
pub fn peak() -> usize {
    PEAK.load(Ordering::Relaxed)
}

/// Starts a new peak window from the live bytes now.
pub fn reset_peak() {
    PEAK.store(current(), Ordering::Relaxed);
}

/// Whether [`CountingAlloc`] is this process's global allocator (a 64 KiB allocation shows up).
pub fn is_installed() -> bool {
    let before = current();
    let v: Vec<u8> = Vec::with_capacity(1 << 16);
    let seen = current() >= before + (1 << 16);
    drop(std::hint::black_box(v));
    seen
}
