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

/// Asks glibc to serve every allocation from its heap and to keep freed memory there
/// (`mallopt(M_MMAP_MAX, 0)`, `mallopt(M_TRIM_THRESHOLD, max)`): by default each allocation above
/// 32 MiB is a fresh `mmap`, returned with `munmap` when freed, so every large tensor of every
/// step is faulted in again page by page (a third of the CPU time of a 1B-shaped probe step).
/// The counted bytes do not change: [`CountingAlloc`] counts requested sizes. Returns whether
/// glibc accepted both settings; a no-op elsewhere.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; glibc documents both options
        // (mallopt(3)) as safe to set at any time.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
