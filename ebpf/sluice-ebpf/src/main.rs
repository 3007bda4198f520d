//! sluice's kernel programs.
//!
//! Userspace (the `sluice-dataplane` crate) is the only writer of policy: it fills
//! `local_replicas`, reads the counters, and decides which programs to attach. Every
//! program here is optional at runtime; a missing one means the userspace path.
#![no_std]
#![no_main]
// The kernel side necessarily reads raw context pointers handed over by the verifier.
#![allow(unsafe_code)]

// Maps are BTF-defined so `bpftool map dump` prints keys and values with their field
// names, and are named so `bpftool map show` reads well. One module per program family.

/// Reads a 4-word address field from a context struct one word at a time, each at a
/// constant offset: copying the array whole lets LLVM form a moved context pointer,
/// which the verifier rejects ("dereference of modified ctx ptr").
macro_rules! ctx_ip6 {
    ($ptr:expr, $field:ident) => {{
        let p = $ptr;
        // SAFETY: `p` is the verifier-checked context pointer; each read is an aligned
        // u32 load at a constant offset inside the context.
        unsafe {
            [
                core::ptr::read_volatile(&(*p).$field[0]),
                core::ptr::read_volatile(&(*p).$field[1]),
                core::ptr::read_volatile(&(*p).$field[2]),
                core::ptr::read_volatile(&(*p).$field[3]),
            ]
        }
    }};
}

mod guard;
mod probe;
mod redirect;
mod splice;
mod steer;
mod vip;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// GPL-compatible license: sockmap and redirect helpers are GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
