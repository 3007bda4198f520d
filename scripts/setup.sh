#!/usr/bin/env bash
# Idempotent installer for everything sluice's build, tests, demo and benches need on a
# fresh Debian machine of this kind. A second run only checks and takes seconds.
#
#   scripts/setup.sh          # build + test prerequisites
#   scripts/setup.sh --bench  # also the benchmark peers (nginx, haproxy, wrk)
#   scripts/setup.sh --image  # also the container tools (`cargo xtask image`, podman test)
set -euo pipefail

BPF_LINKER_VERSION=0.13.0
LLVM_MAJOR=22
LLVM_PREFIX=/usr/lib/llvm-${LLVM_MAJOR}

say() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

want_bench=0
want_image=0
for arg in "$@"; do
  case "$arg" in
    --bench) want_bench=1 ;;
    --image) want_image=1 ;;
    *) die "unknown argument '$arg' (expected --bench or --image)" ;;
  esac
done

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || die "not root and no sudo: run as root to install packages"
  SUDO=sudo
fi

# Debian packages: the eBPF toolchain's LLVM, tools the tests drive (bpftool, h2load,
# etcd, iproute2 for network namespaces, pebble as a test ACME server), and what the
# kernel-tier tests use.
packages=(
  "llvm-${LLVM_MAJOR}-dev" "libpolly-${LLVM_MAJOR}-dev" libzstd-dev zlib1g-dev
  bpftool nghttp2-client etcd-server etcd-client iproute2 libcap2-bin curl
  protobuf-compiler libprotobuf-dev  # protoc + well-known types, for etcd-client
  python3-venv  # scripts/validate-manifests.sh installs kubernetes-validate into a venv
  pebble  # test-only ACME server (and pebble-challtestsrv as its DNS) for tests/e2e_acme
)
if [ "$want_bench" = 1 ]; then
  packages+=(nginx-light haproxy wrk linux-perf util-linux procps valgrind)  # taskset, prlimit, setpriv, renice, kill; valgrind for P9
fi
if [ "$want_image" = 1 ]; then
  # buildah builds FROM scratch offline; podman runs it (runc: crun refuses hybrid
  # cgroup v1/v2 hosts); musl-tools for C code in a static musl build; file to show it.
  packages+=(buildah podman runc crun musl-tools binutils file)
fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq || die "apt-get update failed"
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install failed for: ${missing[*]}"
else
  say "Debian packages present"
fi

command -v rustup >/dev/null || die "rustup not found: install a Rust toolchain first"
command -v cargo >/dev/null || die "cargo not found"

# The kernel crate builds core from source on nightly.
if ! rustup toolchain list | grep -q '^nightly'; then
  say "installing the nightly toolchain (rust-src)"
  rustup toolchain install nightly --profile minimal --component rust-src \
    || die "cannot install the nightly toolchain"
elif ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
  say "adding rust-src to nightly"
  rustup component add rust-src --toolchain nightly || die "cannot add rust-src to nightly"
else
  say "nightly rust-src present"
fi

# bpf-linker links the kernel object; built against Debian's LLVM.
cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
if "$cargo_bin/bpf-linker" --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
  say "bpf-linker $BPF_LINKER_VERSION present"
else
  [ -d "$LLVM_PREFIX" ] || die "$LLVM_PREFIX missing after install (llvm-${LLVM_MAJOR}-dev)"
  say "building bpf-linker $BPF_LINKER_VERSION against LLVM ${LLVM_MAJOR} (about a minute)"
  # llvm-sys reads LLVM_SYS_<ver>_PREFIX; bpf-linker's own build script reads LLVM_PREFIX
  # and otherwise finds Debian's default llvm-config (an older LLVM) on PATH.
  env "LLVM_SYS_${LLVM_MAJOR}1_PREFIX=$LLVM_PREFIX" "LLVM_PREFIX=$LLVM_PREFIX" cargo install bpf-linker \
      --version "$BPF_LINKER_VERSION" --no-default-features --features "llvm-${LLVM_MAJOR}" \
      --locked --quiet \
    || die "cargo install bpf-linker failed"
fi

# kosoku (PyPI) drives the Autobahn WebSocket cases through sluice in the tests.
KOSOKU_VERSION=0.1.0
if command -v kosoku >/dev/null 2>&1; then
  say "kosoku present"
else
  command -v python3 >/dev/null || die "python3 not found: needed for the Autobahn test driver (kosoku)"
  say "installing kosoku $KOSOKU_VERSION (PyPI) for the Autobahn WebSocket tests"
  python3 -m pip install --quiet --disable-pip-version-check "kosoku==$KOSOKU_VERSION" \
    || die "pip install kosoku==$KOSOKU_VERSION failed"
  command -v kosoku >/dev/null 2>&1 || hash -r
fi

# bpffs: where sluice pins its maps. Mount it if it is not (needs CAP_SYS_ADMIN).
if [ "$(id -u)" -eq 0 ] && ! grep -q ' /sys/fs/bpf bpf ' /proc/mounts; then
  if mount -t bpf bpf /sys/fs/bpf 2>/dev/null; then
    say "mounted bpffs at /sys/fs/bpf"
  else
    say "warning: bpffs not mounted and mount failed; kernel-tier tests will report it"
  fi
fi

say "done"
