//! sluice's global allocator, and the one call that hands its free memory back.
//!
//! mimalloc instead of glibc's malloc: its per-thread free lists make the request path's
//! small allocations cheaper, and it returns freed pages to the kernel. It does that
//! lazily, from the allocating thread, so memory a thread freed and then stopped using
//! (the kernel data plane's start-up: parsing the eBPF object and the kernel's BTF peaks
//! at ~60 MiB) stays resident until [`release_free_memory`] is called.
//!
//! The binary installs it with `#[global_allocator] static A: sluice_alloc::Allocator`.
// The one FFI call below needs `unsafe`; the rest of the workspace denies it.
#![allow(unsafe_code)]

/// The global allocator type.
pub use mimalloc::MiMalloc as Allocator;

/// Returns the calling thread's free allocator pages (and those of threads that exited)
/// to the kernel. Call it after a burst of start-up work, on the thread that did it.
pub fn release_free_memory() {
    // SAFETY: `mi_collect` takes no pointers and has no preconditions: it walks
    // mimalloc's own heap structures for the calling thread and purges free pages. It is
    // sound to call at any time from any thread.
    unsafe { libmimalloc_sys::mi_collect(true) }
}
