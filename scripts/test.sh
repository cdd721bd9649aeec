#!/usr/bin/env bash
# Runs every test rvhost has: formatting, lints, unit and property tests, the no_std builds, fuzz
# smoke runs, and the real-QEMU-guest integration tests. This is what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

echo "== cargo fmt"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

echo "== core builds without std, for bare metal"
cargo build -p rvhost-core --target x86_64-unknown-none
cargo build -p rvhost-core --target thumbv7em-none-eabihf

echo "== build the binaries the guest tests run"
# Built once here, in the same build dir and profile as the tests below, so the guest harness does
# not build rvhost again in a directory of its own.
cargo build --release -p rvhost-target --bin rvhost -p rvhost-tests --bin blkcheck
export RVHOST_BIN="$PWD/build/release/rvhost"
export RVHOST_BLKCHECK="$PWD/build/release/blkcheck"

echo "== cargo test (unit, property and QEMU guest tests)"
cargo test --workspace --release

echo "== fuzz smoke (every core fuzz target, briefly; long runs are recorded in core/README.md)"
bash scripts/fuzz-smoke.sh "${FUZZ_SECONDS:-15}"

echo "== all tests passed"
