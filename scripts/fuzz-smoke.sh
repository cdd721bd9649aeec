#!/usr/bin/env bash
# Runs every cargo-fuzz target in core/fuzz/fuzz_targets/ for N seconds (default 20), one after
# the other (they would only fight over the cores in parallel). Exits non-zero if any target
# crashes; the reproducer is left in core/fuzz/artifacts/<target>/.
#
#   scripts/fuzz-smoke.sh [seconds]        (or FUZZ_SECONDS=...)
#
# cargo-fuzz passes nightly-only sanitizer flags; RUSTC_BOOTSTRAP=1 lets the stable toolchain
# accept them. Builds use debug assertions so integer overflow panics instead of wrapping.
set -euo pipefail

seconds="${1:-${FUZZ_SECONDS:-20}}"
root="$(cd "$(dirname "$0")/.." && pwd)"
fuzz_dir="$root/core/fuzz"

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/build/fuzz}"

cd "$fuzz_dir"
failed=()
for target_file in fuzz_targets/*.rs; do
    target="$(basename "$target_file" .rs)"
    mkdir -p "corpus/$target"
    # Hand-made seeds (checked in) join the local corpus; new inputs go to corpus/ only.
    corpora=("corpus/$target")
    if [[ -d "seeds/$target" ]]; then
        corpora+=("seeds/$target")
    fi
    echo "==> fuzzing $target for ${seconds}s"
    if ! cargo fuzz run --debug-assertions "$target" "${corpora[@]}" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1; then
        failed+=("$target")
    fi
done

if ((${#failed[@]})); then
    echo "fuzz-smoke: crashes in: ${failed[*]} (reproducers in core/fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz-smoke: all targets ran ${seconds}s without a crash"
