#!/usr/bin/env bash
# hearth's set-up script. Two commands do everything on a fresh Debian machine:
#
#   ./hearth.sh up [hearth up flags]   install what is missing, build, start the platform
#   ./hearth.sh test                   install what is missing, build, run every test
#
# Needs root (apt-get, runsc) and the Debian, PyPI and crates.io registries.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
TARGET=x86_64-unknown-linux-gnu
step() { printf '\n==> %s\n' "$*" >&2; }

need_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "hearth needs root: runsc creates sandboxes and cgroups, apt-get installs packages. Run: sudo $0 $*" >&2
    exit 1
  fi
}

install_packages() {
  local missing=()
  command -v runsc >/dev/null || missing+=(runsc)
  command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
  command -v curl >/dev/null || missing+=(curl)
  command -v zip >/dev/null || missing+=(zip)
  if [ ${#missing[@]} -gt 0 ]; then
    step "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  command -v cargo >/dev/null || { echo "cargo is missing: install Rust (https://rustup.rs)" >&2; exit 1; }
  rustup target list --installed 2>/dev/null | grep -q "$TARGET" || rustup target add "$TARGET" 2>/dev/null || true
}

# The agent runs inside every sandbox: a static binary, so it works in any runtime image.
build_static() { # profile-flag, packages...
  local flag=$1; shift
  local pkgs=()
  for p in "$@"; do pkgs+=(-p "$p"); done
  RUSTFLAGS="-C target-feature=+crt-static" cargo build $flag --target "$TARGET" "${pkgs[@]}"
}

cmd_up() {
  need_root "$@"
  install_packages
  step "building hearth (release)"
  cargo build --release -p hearth
  build_static --release hearth-agent
  step "starting hearth (runtime images are built on first start, ~1 minute)"
  exec "$ROOT/target/release/hearth" up --agent "$ROOT/target/$TARGET/release/hearth-agent" "$@"
}

cmd_test() {
  need_root "$@"
  install_packages
  step "installing Python test tools (boto3, awscli, pytest)"
  python3 -c 'import boto3, pytest, awscli' 2>/dev/null \
    || python3 -m pip install --quiet --disable-pip-version-check boto3 awscli pytest
  step "checking format"
  cargo fmt --all -- --check
  step "building (debug) and the static agent + Rust test function"
  cargo build --workspace --all-targets
  build_static "" hearth-agent rust-echo
  export HEARTH_AGENT="$ROOT/target/$TARGET/debug/hearth-agent"
  export HEARTH_RUST_FIXTURE="$ROOT/target/$TARGET/debug/rust-echo"
  export HEARTH_IMAGE_CACHE="$ROOT/target/hearth-images"
  export HEARTH_BIN="$ROOT/target/debug/hearth"
  step "building runtime images into $HEARTH_IMAGE_CACHE (cached after the first run)"
  "$HEARTH_BIN" image build --image-cache "$HEARTH_IMAGE_CACHE"
  step "clippy"
  cargo clippy --workspace --all-targets -- -D warnings
  step "Rust tests (unit, integration, real runsc sandboxes)"
  if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast
  else
    cargo test --workspace --no-fail-fast
  fi
  step "end-to-end tests: boto3 and the AWS CLI against hearth up"
  python3 -m pytest -q tests/e2e
  step "all tests passed"
}

case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  test) shift; cmd_test "$@" ;;
  *) echo "usage: $0 up [hearth up flags] | $0 test" >&2; exit 2 ;;
esac
