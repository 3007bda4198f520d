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

/// mimalloc's `mi_option_arena_eager_commit` (the same index in its v2 and v3 option
/// enums; `libmimalloc-sys` names only the v2-only options around it).
const OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

/// Sets the allocator's options before anything allocates: a constructor in
/// `.init_array` runs before Rust's runtime start-up, whose first allocation reserves
/// the first arena (an option set in `main` comes too late for it).
///
/// Arenas are committed on demand instead of eagerly: with eager commit, pages freed after
/// start-up (the eBPF object and the kernel's BTF) were never decommitted, and an idle
/// sluice held about 8 MiB of anonymous memory instead of under 3.
extern "C" fn configure() {
    // SAFETY: `mi_option_set` takes an option index and a value, no pointers; an index
    // mimalloc does not know is ignored. It only stores the value, so it is sound this
    // early (libc is initialised before `.init_array` runs).
    unsafe { libmimalloc_sys::mi_option_set(OPTION_ARENA_EAGER_COMMIT, 0) }
}

// SAFETY: `.init_array` holds `extern "C" fn()` pointers the dynamic loader calls once at
// start-up; `configure` has that signature, and `#[used]` keeps the entry from being
// dropped as unreferenced.
#[used]
#[unsafe(link_section = ".init_array")]
static CONFIGURE: extern "C" fn() = configure;

/// Returns the calling thread's free allocator pages (and those of threads that exited)
/// to the kernel. Call it after a burst of start-up work, on the thread that did it.
pub fn release_free_memory() {
    // SAFETY: `mi_collect` takes no pointers and has no preconditions: it walks
    // mimalloc's own heap structures for the calling thread and purges free pages. It is
    // sound to call at any time from any thread.
    unsafe { libmimalloc_sys::mi_collect(true) }
}
