//! sluice's global allocator, and the calls that hand its free memory back.
//!
//! mimalloc instead of glibc's malloc: its per-thread free lists make the request path's
//! small allocations cheaper, and it returns freed pages to the kernel. It does that
//! lazily, from the allocating thread: pages a thread freed (or that other threads freed
//! into it) stay resident until that thread allocates from them again or collects. A
//! worker that served a burst (1000 slow clients' buffers) and then went quiet would keep
//! them for good, so the runtime calls [`collect_when_idle`] whenever a worker parks, and
//! start-up work calls [`release_free_memory`] once.
//!
//! The binary installs it with `#[global_allocator] static A: sluice_alloc::Allocator`.
// The FFI calls below need `unsafe`; the rest of the workspace denies it.
#![allow(unsafe_code)]

use std::cell::Cell;
use std::time::{Duration, Instant};

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

/// Least time between two collections on one thread by [`collect_when_idle`].
pub const IDLE_COLLECT_INTERVAL: Duration = Duration::from_secs(1);

thread_local! {
    /// When this thread last collected in [`collect_when_idle`]; `None` before the first.
    static LAST_IDLE_COLLECT: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Returns the calling thread's free pages to the kernel, at most once per
/// [`IDLE_COLLECT_INTERVAL`] on each thread; a call inside the interval only reads the
/// clock. Meant for a runtime's `on_thread_park` hook: a busy worker parks thousands of
/// times a second, and the rate limit keeps that to one `mi_collect` a second (measured:
/// ~50 ns for a call inside the interval, ~0.2 ms for a collection of a heap with 25k
/// live blocks and as many freed), while a worker that went idle after a burst gives the
/// burst's memory back when it parks.
pub fn collect_when_idle() {
    let now = Instant::now();
    let due = LAST_IDLE_COLLECT.with(|last| match last.get() {
        Some(t) if now.saturating_duration_since(t) < IDLE_COLLECT_INTERVAL => false,
        _ => {
            last.set(Some(now));
            true
        }
    });
    if due {
        // SAFETY: as in `release_free_memory`: no pointers, no preconditions, any
        // thread. `force = false` frees the thread's empty pages and purges what
        // mimalloc's delay allows, without the abandoned-segment sweep of `true`.
        unsafe { libmimalloc_sys::mi_collect(false) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rate limit: a second call right after the first only reads the clock, and
    /// either way the allocator keeps working.
    #[test]
    fn collect_when_idle_is_rate_limited_per_thread() {
        collect_when_idle();
        let first = LAST_IDLE_COLLECT.with(Cell::get);
        assert!(first.is_some());
        let v: Vec<u8> = vec![1; 1 << 20];
        drop(v);
        collect_when_idle();
        assert_eq!(LAST_IDLE_COLLECT.with(Cell::get), first);
        // Another thread has its own clock.
        std::thread::spawn(|| {
            assert!(LAST_IDLE_COLLECT.with(Cell::get).is_none());
            collect_when_idle();
            assert!(LAST_IDLE_COLLECT.with(Cell::get).is_some());
        })
        .join()
        .expect("thread");
    }
}
