//! `cargo xtask image`: the container image operators deploy.
//!
//! Builds a statically linked `sluice` (musl when the target can be installed, glibc
//! with `+crt-static` otherwise) with the eBPF object embedded, checks that it really is
//! static and really carries the object, then builds an OCI image `FROM scratch` with
//! buildah (no base image is pulled, so this works offline). The layout is in
//! `deploy/Containerfile`; the default config baked in is `deploy/config/`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};
use clap::Args;

/// Repository (without tag) the image is tagged as; the manifests refer to it.
pub const IMAGE_REPO: &str = "localhost/sluice";

/// Options of `cargo xtask image`.
#[derive(Args, Debug)]
pub struct ImageArgs {
    /// Skip running scripts/setup.sh first.
    #[arg(long)]
    no_setup: bool,
    /// Extra tag besides `<version>` and `latest` (e.g. a CI build id).
    #[arg(long)]
    tag: Option<String>,
    /// Also write the image as an OCI archive (`<target>/image/sluice-<version>.oci.tar`),
    /// for `ctr images import` / `kind load image-archive` on a node without a registry.
    #[arg(long)]
    archive: bool,
    /// Skip `podman run <image> --version` after building.
    #[arg(long)]
    no_smoke: bool,
}

impl ImageArgs {
    /// The build `cargo xtask test` runs: setup already done, default tags.
    pub fn for_tests() -> ImageArgs {
        ImageArgs { no_setup: true, tag: None, archive: false, no_smoke: false }
    }
}

/// Builds the binary and the image.
pub fn image(args: &ImageArgs) -> Result<()> {
    let started = Instant::now();
    crate::setup(args.no_setup, &["--image"])?;
    crate::build_ebpf()?;
    let root = crate::root();

    let (triple, static_glibc) = pick_target()?;
    let binary = build_static(&root, &triple, static_glibc)?;
    check_static(&binary)?;
    check_embeds_object(&binary, &root.join("target/ebpf/bpfel-unknown-none/release/sluice-ebpf"))?;
    let version = binary_version(&binary)?;

    let context = stage_context(&root, &binary)?;
    let commit = git_commit(&root);
    let mut tags = vec![format!("{IMAGE_REPO}:{version}"), format!("{IMAGE_REPO}:latest")];
    if let Some(extra) = &args.tag {
        tags.push(format!("{IMAGE_REPO}:{extra}"));
    }
    // The image the tags point at now: removed after the rebuild moves them, so
    // repeated builds do not pile up untagged images.
    let previous = output(
        Command::new("podman").args(["image", "inspect", "--format", "{{.Id}}"]).arg(&tags[1]),
    )
    .ok()
    .map(|s| s.trim().to_owned());
    let mut build = Command::new("buildah");
    build
        .args(["build", "--quiet", "--squash", "--layers=false"])
        // A fixed timestamp makes the image reproducible: the same binary at the same
        // commit gives the same image id, so an unchanged rebuild rolls nothing.
        .args(["--timestamp", "0"])
        .args(["--label", &format!("org.opencontainers.image.version={version}")])
        .args(["--label", &format!("org.opencontainers.image.revision={commit}")])
        .args(["--label", "org.opencontainers.image.title=sluice"])
        .args(["--label", &format!("io.sluice.rust-target={triple}")])
        .arg("-f")
        .arg(root.join("deploy/Containerfile"));
    for tag in &tags {
        build.args(["-t", tag]);
    }
    build.arg(&context);
    crate::run(&mut build)?;

    let primary = &tags[0];
    let size = output(
        Command::new("podman").args(["image", "inspect", "--format", "{{.Size}}"]).arg(primary),
    )?;
    let id = output(
        Command::new("podman").args(["image", "inspect", "--format", "{{.Id}}"]).arg(primary),
    )?;
    let size: u64 =
        size.trim().parse().with_context(|| format!("podman reported size {size:?}"))?;
    if let Some(previous) = previous.filter(|p| *p != id.trim()) {
        // Best effort: an image a container still uses stays.
        let _ = Command::new("podman").args(["rmi", &previous]).output();
    }

    if !args.no_smoke {
        smoke(primary, &version)?;
    }
    if args.archive {
        let out = target_dir(&root).join(format!("image/sluice-{version}.oci.tar"));
        let _ = fs::remove_file(&out);
        crate::run(
            Command::new("podman")
                .args(["save", "--format", "oci-archive", "-o"])
                .arg(&out)
                .arg(primary),
        )?;
        eprintln!("xtask: wrote {}", out.display());
    }
    eprintln!(
        "xtask: image {} ({}) built in {:.1}s: {} ({:.1} MiB), id {}",
        tags.join(", "),
        triple,
        started.elapsed().as_secs_f64(),
        size,
        size as f64 / (1024.0 * 1024.0),
        &id.trim()[..12.min(id.trim().len())],
    );
    Ok(())
}

/// The Rust target to build: `<arch>-unknown-linux-musl` if it is installed or can be
/// added; otherwise the glibc target with a static C runtime (the bool says so).
fn pick_target() -> Result<(String, bool)> {
    let arch = std::env::consts::ARCH;
    let musl = format!("{arch}-unknown-linux-musl");
    let installed =
        output(Command::new("rustup").args(["target", "list", "--installed"])).unwrap_or_default();
    if installed.lines().any(|l| l.trim() == musl) {
        return Ok((musl, false));
    }
    eprintln!("xtask: adding the Rust target {musl}");
    let added = Command::new("rustup").args(["target", "add", &musl]).status();
    if matches!(added, Ok(s) if s.success()) {
        return Ok((musl, false));
    }
    let gnu = format!("{arch}-unknown-linux-gnu");
    eprintln!("xtask: {musl} unavailable; building {gnu} with +crt-static");
    Ok((gnu, true))
}

/// `cargo build --release -p sluice --target <triple>`; returns the binary's path.
fn build_static(root: &Path, triple: &str, static_glibc: bool) -> Result<PathBuf> {
    let mut cmd = crate::cargo();
    cmd.args(["build", "--release", "-p", "sluice", "--target", triple]);
    // The `commit` label of `sluice_build_info`, unless the caller set it already.
    if std::env::var_os("SLUICE_COMMIT").is_none()
        && let Ok(out) = Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).output()
        && out.status.success()
    {
        cmd.env("SLUICE_COMMIT", String::from_utf8_lossy(&out.stdout).trim());
    }
    if static_glibc {
        // With an explicit --target these flags reach only target crates, not build
        // scripts or proc macros (which must stay dynamic to be loadable by rustc).
        cmd.env("CARGO_ENCODED_RUSTFLAGS", "-Ctarget-feature=+crt-static");
    } else {
        // C code in dependencies (ring, if present) must be compiled against musl too.
        let cc_var = format!("CC_{}", triple.replace('-', "_"));
        if std::env::var_os(&cc_var).is_none() && which("musl-gcc") {
            cmd.env(cc_var, "musl-gcc");
        }
    }
    crate::run(&mut cmd)?;
    let binary = target_dir(root).join(triple).join("release/sluice");
    if !binary.is_file() {
        bail!("cargo reported success but {} is missing", binary.display());
    }
    Ok(binary)
}

/// Fails unless `binary` is an ELF without a program interpreter (i.e. the kernel runs
/// it directly, with no dynamic loader or shared libraries in the image).
fn check_static(binary: &Path) -> Result<()> {
    let bytes = fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
    match elf_interpreter(&bytes) {
        Ok(None) => {}
        Ok(Some(interp)) => {
            bail!("{} is dynamically linked (interpreter {interp})", binary.display())
        }
        Err(e) => bail!("{} is not a 64-bit little-endian ELF: {e}", binary.display()),
    }
    // `file` says it in words; informative only (the check above decides).
    if let Ok(desc) = output(Command::new("file").arg("-b").arg(binary)) {
        eprintln!("xtask: {}: {}", binary.display(), desc.trim());
    }
    Ok(())
}

/// The PT_INTERP path of a 64-bit little-endian ELF, or `None` for a static binary.
fn elf_interpreter(b: &[u8]) -> Result<Option<String>, String> {
    let u16_at = |o: usize| b.get(o..o + 2).map(|s| u16::from_le_bytes([s[0], s[1]]));
    let u32_at = |o: usize| {
        b.get(o..o + 4).and_then(|s| <[u8; 4]>::try_from(s).ok()).map(u32::from_le_bytes)
    };
    let u64_at = |o: usize| {
        b.get(o..o + 8).and_then(|s| <[u8; 8]>::try_from(s).ok()).map(u64::from_le_bytes)
    };
    if b.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        return Err("bad ELF magic/class".into());
    }
    let phoff = u64_at(0x20).ok_or("short header")? as usize;
    let phentsize = usize::from(u16_at(0x36).ok_or("short header")?);
    let phnum = usize::from(u16_at(0x38).ok_or("short header")?);
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        const PT_INTERP: u32 = 3;
        if u32_at(ph).ok_or("short program header")? == PT_INTERP {
            let off = u64_at(ph + 8).ok_or("short program header")? as usize;
            let len = u64_at(ph + 32).ok_or("short program header")? as usize;
            let path = b.get(off..off + len).ok_or("interpreter out of bounds")?;
            return Ok(Some(String::from_utf8_lossy(path).trim_end_matches('\0').to_owned()));
        }
    }
    Ok(None)
}

/// Fails unless the kernel object's bytes appear verbatim in the binary (the dataplane
/// embeds it with `include_bytes!`), so the image can never ship a binary without it.
fn check_embeds_object(binary: &Path, object: &Path) -> Result<()> {
    let bin = fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
    let obj = fs::read(object).with_context(|| format!("reading {}", object.display()))?;
    if obj.len() < 64 || !contains(&bin, &obj) {
        bail!(
            "{} does not embed the eBPF object {} ({} bytes): rebuild after `cargo xtask build-ebpf`",
            binary.display(),
            object.display(),
            obj.len()
        );
    }
    eprintln!("xtask: the binary embeds the eBPF object ({} bytes)", obj.len());
    Ok(())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    let Some((&first, _)) = needle.split_first() else { return true };
    let last_start = match haystack.len().checked_sub(needle.len()) {
        Some(n) => n,
        None => return false,
    };
    (0..=last_start).any(|i| haystack[i] == first && haystack[i..i + needle.len()] == *needle)
}

/// Runs the binary on the host: proves it executes and yields the version for the tag.
fn binary_version(binary: &Path) -> Result<String> {
    let out = output(Command::new(binary).arg("--version"))?;
    // "sluice 0.1.0"
    out.split_whitespace()
        .nth(1)
        .map(str::to_owned)
        .with_context(|| format!("unexpected `sluice --version` output {out:?}"))
}

/// The build context: the binary (debug info stripped), the default config, and the
/// passwd/group entries that let the image run under a non-root uid as well.
fn stage_context(root: &Path, binary: &Path) -> Result<PathBuf> {
    let context = target_dir(root).join("image/context");
    if context.exists() {
        fs::remove_dir_all(&context).with_context(|| format!("clearing {}", context.display()))?;
    }
    let etc = context.join("etc");
    fs::create_dir_all(etc.join("sluice"))?;
    let staged = context.join("sluice");
    fs::copy(binary, &staged).with_context(|| format!("copying {}", binary.display()))?;
    // Debug info is most of the release binary (profile.release has debug = 1); symbols
    // stay so backtraces keep function names.
    crate::run(Command::new("strip").arg("--strip-debug").arg(&staged))?;
    for name in ["sluice.toml", "routes.toml"] {
        let from = root.join("deploy/config").join(name);
        fs::copy(&from, etc.join("sluice").join(name))
            .with_context(|| format!("copying {}", from.display()))?;
    }
    fs::write(
        etc.join("passwd"),
        "root:x:0:0:root:/:/sluice\nnonroot:x:65532:65532:nonroot:/:/sluice\n",
    )?;
    fs::write(etc.join("group"), "root:x:0:\nnonroot:x:65532:\n")?;
    // Readable by any uid; written by none (the config is mounted over it in a pod).
    set_mode(&staged, 0o755)?;
    for f in ["passwd", "group", "sluice/sluice.toml", "sluice/routes.toml"] {
        set_mode(&etc.join(f), 0o644)?;
    }
    Ok(context)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

/// `podman run --rm <image> --version`, with the settings this host's runtime needs.
fn smoke(image: &str, version: &str) -> Result<()> {
    let conf = target_dir(&crate::root()).join("image/containers.conf");
    fs::write(&conf, containers_conf())?;
    let out = output(Command::new("podman").env("CONTAINERS_CONF", &conf).args([
        "run",
        "--rm",
        "--network",
        "none",
        image,
        "--version",
    ]))
    .context("the image does not run (`podman run --rm <image> --version`)")?;
    if !out.contains(version) {
        bail!("`podman run {image} --version` printed {out:?}, expected version {version}");
    }
    eprintln!("xtask: podman run {image} --version: {}", out.trim());
    Ok(())
}

/// A containers.conf for hosts like CI's: limits capped at what this process may set
/// (podman asks for more than an unprivileged-rlimit sandbox allows), and runc when
/// crun cannot run here (crun refuses hybrid cgroup v1/v2 hosts).
pub fn containers_conf() -> String {
    let hard = |res: &str| -> Option<u64> {
        let limits = fs::read_to_string("/proc/self/limits").ok()?;
        let line = limits.lines().find(|l| l.starts_with(res))?;
        line.split_whitespace().nth(if res == "Max open files" { 4 } else { 3 })?.parse().ok()
    };
    let pid_max: u64 = fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(32768);
    let nofile = hard("Max open files").unwrap_or(1024).min(1 << 20);
    let nproc = hard("Max processes").unwrap_or(4096).min(pid_max);
    let hybrid = fs::read_to_string("/proc/mounts")
        .map(|m| m.contains(" cgroup ") && m.contains(" cgroup2 "))
        .unwrap_or(false);
    let runtime = if hybrid && which("runc") { "runtime = \"runc\"\n" } else { "" };
    format!(
        "[containers]\ndefault_ulimits = [\"nofile={nofile}:{nofile}\", \"nproc={nproc}:{nproc}\"]\n\
         [engine]\nevents_logger = \"file\"\ncgroup_manager = \"cgroupfs\"\n{runtime}"
    )
}

/// Cargo's target directory (`$CARGO_TARGET_DIR` or `<root>/target`).
fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"))
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

fn git_commit(root: &Path) -> String {
    output(Command::new("git").current_dir(root).args(["rev-parse", "--short=12", "HEAD"]))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// Runs `cmd` and returns its stdout; fails with its stderr.
fn output(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("cannot start {shown}"))?;
    if !out.status.success() {
        bail!("{shown} failed: {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_subslices() {
        assert!(contains(b"abcdef", b"cde"));
        assert!(!contains(b"abcdef", b"cdf"));
        assert!(!contains(b"ab", b"abc"));
    }

    #[test]
    fn reads_the_interpreter_of_this_test_binary() {
        // The test binary itself is a dynamically linked glibc executable.
        let me = fs::read(std::env::current_exe().unwrap()).unwrap();
        let interp = elf_interpreter(&me).unwrap();
        assert!(interp.as_deref().is_none_or(|p| p.contains("ld-")), "{interp:?}");
        assert!(elf_interpreter(b"not an elf").is_err());
    }
}
