//! Project automation for sluice: `cargo xtask <command>`.
//!
//! Every command that builds first runs `scripts/setup.sh`, so a fresh machine of the
//! project's kind needs nothing but a clone.

mod bench;
mod image;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

/// The kernel crate and where its object lands (read by the dataplane's build script).
const EBPF_CRATE: &str = "sluice-ebpf";
const EBPF_TARGET: &str = "bpfel-unknown-none";
const EBPF_RUSTFLAGS: [&str; 2] = ["-Cdebuginfo=2", "-Clink-arg=--btf"];

#[derive(Parser)]
#[command(about = "sluice project automation")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the eBPF object (with BTF) that the sluice binary embeds.
    BuildEbpf {
        /// Skip running scripts/setup.sh first.
        #[arg(long)]
        no_setup: bool,
    },
    /// Everything CI checks: setup, eBPF build, fmt, clippy, manifest validation, the
    /// container image, and every test (kernel tier and podman included).
    Test {
        /// Skip running scripts/setup.sh first.
        #[arg(long)]
        no_setup: bool,
        /// Skip building the container image (the podman test then skips, outside CI).
        #[arg(long)]
        no_image: bool,
        /// Extra arguments passed to `cargo test` (after `--` go to the test binaries).
        #[arg(trailing_var_arg = true)]
        cargo_test_args: Vec<String>,
    },
    /// Run sluice on its embedded default config with demo replicas.
    Demo {
        /// Skip running scripts/setup.sh first.
        #[arg(long)]
        no_setup: bool,
    },
    /// Benchmarks against a direct connection and peers (nginx, HAProxy).
    #[command(disable_help_flag = true)]
    Bench {
        /// Scenarios (P1 … P7, default: all) and options (`--quick`; `--help` lists all).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Container image (static sluice + embedded eBPF object, FROM scratch) via buildah.
    Image(image::ImageArgs),
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::BuildEbpf { no_setup } => {
            setup(no_setup, &[])?;
            build_ebpf()
        }
        Cmd::Test { no_setup, no_image, cargo_test_args } => {
            setup(no_setup, if no_image { &[] } else { &["--image"] })?;
            test(no_image, &cargo_test_args)
        }
        Cmd::Demo { no_setup } => {
            setup(no_setup, &[])?;
            build_ebpf()?;
            run(cargo().args(["run", "--release", "-p", "sluice", "--", "demo"]))
        }
        Cmd::Bench { args } => bench::main(&args),
        Cmd::Image(args) => image::image(&args),
    }
}

/// The workspace root (xtask lives one level below it).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    eprintln!("xtask: $ {shown}");
    let status = cmd.status().with_context(|| format!("cannot start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}

fn setup(skip: bool, args: &[&str]) -> Result<()> {
    if skip {
        return Ok(());
    }
    run(Command::new(root().join("scripts/setup.sh")).args(args))
}

/// Builds the kernel object with nightly + build-std into `target/ebpf/`, a target
/// directory of its own so it never contends with (or is cleaned by) host builds.
fn build_ebpf() -> Result<()> {
    let started = Instant::now();
    let target_dir = root().join("target/ebpf");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root())
        // A rustup proxy picks the toolchain from this; the outer cargo's own
        // variables must not leak into the nightly build.
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTFLAGS")
        // Full debug info + bpf-linker's --btf: maps and programs carry BTF, so the
        // kernel verifies them with types and bpftool prints them readably.
        .env("CARGO_ENCODED_RUSTFLAGS", EBPF_RUSTFLAGS.join("\x1f"))
        .args(["+nightly", "build", "--release", "-p", EBPF_CRATE, "--target", EBPF_TARGET])
        .args(["-Z", "build-std=core", "--target-dir"])
        .arg(&target_dir);
    run(&mut cmd)?;
    let object = target_dir.join(EBPF_TARGET).join("release").join(EBPF_CRATE);
    let size = std::fs::metadata(&object)
        .with_context(|| format!("kernel object missing at {}", object.display()))?
        .len();
    eprintln!(
        "xtask: built {} ({size} bytes) in {:.1}s",
        object.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn test(no_image: bool, extra: &[String]) -> Result<()> {
    build_ebpf()?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    // The kernel crate is linted for its own target, with the build's flags so the
    // build-std artifacts are reused rather than rebuilt.
    run(Command::new("cargo")
        .current_dir(root())
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("RUSTFLAGS")
        .env("CARGO_ENCODED_RUSTFLAGS", EBPF_RUSTFLAGS.join("\x1f"))
        .args(["+nightly", "clippy", "-p", EBPF_CRATE, "--target", EBPF_TARGET])
        .args(["-Z", "build-std=core", "--target-dir"])
        .arg(root().join("target/ebpf"))
        .args(["--", "-D", "warnings"]))?;
    run(Command::new(root().join("scripts/validate-manifests.sh")).current_dir(root()))?;
    let mut cargo_test = cargo();
    if !no_image {
        // Built before the tests so the podman test runs the image of this source.
        image::image(&image::ImageArgs::for_tests())?;
        cargo_test.env("SLUICE_PODMAN_TEST", "require");
    }
    run(cargo_test.arg("test").args(extra))
}
