//! Embeds the kernel object built by `cargo xtask build-ebpf`.
//!
//! The object is built separately (nightly, build-std, bpf-linker), so this script only
//! locates it; when it is missing the build stops with one line naming the command.

use std::{env, path::PathBuf, process::exit};

fn main() {
    println!("cargo:rerun-if-env-changed=SLUICE_EBPF_OBJECT");
    let object = match env::var_os("SLUICE_EBPF_OBJECT") {
        Some(path) => PathBuf::from(path),
        None => {
            let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
            manifest.join("../../target/ebpf/bpfel-unknown-none/release/sluice-ebpf")
        }
    };
    println!("cargo:rerun-if-changed={}", object.display());
    match object.canonicalize() {
        Ok(path) if path.is_file() => {
            println!("cargo:rustc-env=SLUICE_EBPF_OBJECT={}", path.display());
        }
        _ => {
            eprintln!(
                "sluice: the eBPF object is not built ({}); run `cargo xtask build-ebpf` first",
                object.display()
            );
            exit(1);
        }
    }
}
