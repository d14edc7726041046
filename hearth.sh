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

# What hearth needs from Debian, as "command:package" pairs.
PACKAGES=(
  mmdebstrap:mmdebstrap curl:curl zip:zip cc:gcc # runtime images, downloads, packages, cargo's linker
  ip:iproute2 nft:nftables                       # a network namespace, veth pair and NAT per sandbox
  mkfs.ext4:e2fsprogs losetup:mount              # each sandbox's /tmp: a loop-mounted ext4 disk
)
# runsc comes from Debian's bookworm-backports (systrap); elsewhere at least this version.
BACKPORTS=bookworm-backports
BACKPORTS_SOURCES=/etc/apt/sources.list.d/$BACKPORTS.sources
RUNSC_MIN=0.0~20240729
SUITE=$(sed -n 's/^VERSION_CODENAME=//p' /etc/os-release 2>/dev/null | tr -d '"' || true)
APT_UPDATED=

have() { # an executable on PATH or in the sbin directories (not on a user's PATH)
  local d dirs
  IFS=: read -ra dirs <<<"$PATH:/usr/sbin:/sbin"
  for d in "${dirs[@]}"; do [ -f "$d/$1" ] && [ -x "$d/$1" ] && return 0; done
  return 1
}

# Whether an apt source (one-line or deb822) already lists bookworm-backports.
backports_listed() {
  grep -qsE "^[^#]*[[:space:]]$BACKPORTS([[:space:]]|\$)" \
    /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources
}

# The runsc version bookworm-backports offers, as apt's lists know it (empty if they know none).
backports_runsc() {
  apt-cache madison runsc 2>/dev/null \
    | awk -F'|' -v suite=" $BACKPORTS/" 'index($3, suite) { gsub(/ /, "", $2); print $2; exit }'
}

# Why runsc must be installed (empty if it need not be). Reads dpkg's database and apt's lists
# only: no root, no capabilities.
runsc_missing() {
  local installed want stamp
  installed=$(dpkg-query -W -f='${db:Status-Abbrev} ${Version}\n' runsc 2>/dev/null | awk '$1 == "ii" { print $2 }')
  if [ "$SUITE" != bookworm ]; then
    have runsc || echo "runsc (not installed)"
    return 0
  fi
  want=$(backports_runsc)
  if [ -n "$installed" ]; then
    if [ -n "$want" ]; then
      dpkg --compare-versions "$installed" ge "$want" && return 0
      echo "runsc (installed: $installed; $BACKPORTS has $want)"
    else
      dpkg --compare-versions "$installed" ge "$RUNSC_MIN" && return 0
      echo "runsc (installed: $installed; hearth needs $BACKPORTS' $RUNSC_MIN or newer)"
    fi
  elif have runsc; then
    # A runsc dpkg does not know (e.g. an upstream release) is kept if it is as recent.
    stamp=$(runsc --version 2>/dev/null | grep -oE '20[0-9]{6}' | head -n1 || true)
    [ -n "$stamp" ] && [ "$stamp" -ge "${RUNSC_MIN##*~}" ] && return 0
    echo "runsc ($(command -v runsc) is from ${stamp:-an unknown date}; hearth needs $BACKPORTS' $RUNSC_MIN or newer)"
  else
    echo "runsc (not installed; from $BACKPORTS)"
  fi
}

# Everything missing, one "package (why)" per line.
missing_report() {
  local pair
  for pair in "${PACKAGES[@]}"; do
    have "${pair%%:*}" || echo "${pair#*:} (no ${pair%%:*})"
  done
  runsc_missing
}

need_root() { # the command line, for the message
  [ "$(id -u)" = 0 ] && return 0
  local missing
  missing=$(missing_report)
  echo "hearth needs root: runsc creates sandboxes and cgroups, each sandbox gets a network namespace and a loop-mounted /tmp, apt-get installs packages. Run: sudo $0 $*" >&2
  if [ -n "$missing" ]; then
    echo "missing (that command installs them):" >&2
    sed 's/^/  /' <<<"$missing" >&2
  fi
  exit 1
}

# Whether the disk holding the build has room for what a test run adds: the debug build (none
# if one exists), the runtime images (none if cached) and the tests' sandboxes and snapshots.
# Measured on a fresh clone (CI=true): the build 2.2 GiB, the images 1.3 GiB, all of it 3.6.
need_disk() {
  local need=1 avail dir=$ROOT/target
  [ -d "$ROOT/target/debug/deps" ] || need=$((need + 3))
  [ -n "$(ls -A "$ROOT/target/hearth-images" 2>/dev/null)" ] || need=$((need + 2))
  [ -d "$dir" ] || dir=$ROOT
  avail=$(df -P -BG "$dir" | awk 'NR == 2 { sub(/G$/, "", $4); print $4 }')
  if [ -n "$avail" ] && [ "$avail" -lt "$need" ]; then
    echo "not enough disk: the tests need about $need GiB free at $dir, and $avail GiB is." >&2
    echo "Free some space (an old build: cargo clean; stale clones) and run it again." >&2
    exit 1
  fi
}

apt_update() { # at most once per run
  [ -n "$APT_UPDATED" ] && return 0
  step "updating apt's package lists"
  apt-get update -qq </dev/null
  APT_UPDATED=1
}

apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o Dpkg::Use-Pty=0 "$@" </dev/null >/dev/null
}

install_packages() {
  local missing=() pair runsc_why
  for pair in "${PACKAGES[@]}"; do
    have "${pair%%:*}" || missing+=("${pair#*:}")
  done
  runsc_why=$(runsc_missing)
  if [ -n "$runsc_why" ] && [ "$SUITE" = bookworm ] && ! backports_listed; then
    step "adding Debian's $BACKPORTS to apt's sources: $BACKPORTS_SOURCES"
    cat >"$BACKPORTS_SOURCES" <<EOF
Types: deb
URIs: http://deb.debian.org/debian
Suites: $BACKPORTS
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  fi
  if [ ${#missing[@]} -gt 0 ] || [ -n "$runsc_why" ]; then
    apt_update
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    step "installing Debian packages: ${missing[*]}"
    apt_install "${missing[@]}"
  fi
  if [ -n "$runsc_why" ]; then
    if [ "$SUITE" = bookworm ]; then
      step "installing $(runsc_missing)"
      # -t applies to this command only: runsc (and what it needs) from backports, nothing else.
      apt_install -t "$BACKPORTS" runsc
    else
      step "installing runsc"
      apt_install runsc
    fi
    runsc_why=$(runsc_missing)
    if [ -n "$runsc_why" ]; then
      echo "runsc is still not what hearth needs after installing it: $runsc_why" >&2
      exit 1
    fi
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
  need_root up "$@"
  install_packages
  step "building hearth (release)"
  cargo build --release -p hearth
  build_static --release hearth-agent
  step "starting hearth (runtime images are built on first start, about 6 minutes on two cores)"
  exec "$ROOT/target/release/hearth" up --agent "$ROOT/target/$TARGET/release/hearth-agent" "$@"
}

cmd_test() {
  # The end-to-end tests need python3 and, for boto3, awscli, pytest and moto (the S3 server
  # the cluster test starts), pip (nsenter is in util-linux, which every Debian has).
  PACKAGES+=(python3:python3)
  python3 -c 'import boto3, pytest, awscli, moto.server' 2>/dev/null || python3 -m pip --version >/dev/null 2>&1 \
    || PACKAGES+=(pip3:python3-pip)
  need_root test "$@"
  need_disk
  # CI builds once from scratch: incremental state would only double the build's size on disk.
  [ -z "${CI:-}" ] || export CARGO_INCREMENTAL=0
  install_packages
  step "installing Python test tools (boto3, awscli, pytest, moto)"
  # Debian's python3 is "externally managed": these go to /usr/local, beside Debian's packages.
  python3 -c 'import boto3, pytest, awscli, moto.server' 2>/dev/null \
    || PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore \
      python3 -m pip install --quiet --disable-pip-version-check boto3 awscli pytest 'moto[server]'
  step "checking format"
  cargo fmt --all -- --check
  step "building (debug) and the static agent + Rust test function"
  cargo build --workspace --all-targets
  build_static "" hearth-agent rust-echo
  export HEARTH_AGENT="$ROOT/target/$TARGET/debug/hearth-agent"
  export HEARTH_RUST_FIXTURE="$ROOT/target/$TARGET/debug/rust-echo"
  export HEARTH_IMAGE_CACHE="$ROOT/target/hearth-images"
  export HEARTH_BIN="$ROOT/target/debug/hearth"
  # Images record the digest of the recipe they were built from: a stale one is rebuilt here.
  step "building runtime images into $HEARTH_IMAGE_CACHE (missing or stale ones; cached otherwise)"
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
