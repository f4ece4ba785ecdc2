#!/usr/bin/env bash
# Runs the fuzz targets for a bounded time each, starting from the committed corpus.
#
#   fuzz/run.sh                    every target, with the budgets below (about 5 minutes)
#   fuzz/run.sh config 3600        one target for an hour
#
# New inputs go to a temporary directory, so the committed corpus (fuzz/corpus/<target>/)
# is only read; README ("Tests") says how to grow and minimise it. A crash, a panic, a
# timeout or running out of memory fails the run and leaves the input in
# fuzz/artifacts/<target>/. Needs `cargo fuzz` (scripts/test.sh installs it) and builds with
# the stable toolchain through RUSTC_BOOTSTRAP, without a sanitizer: the parsers are safe
# Rust, so the instrumentation that matters is libFuzzer's coverage, not ASan.
set -euo pipefail
cd "$(dirname "$0")"

# Seconds per target in a full run; the parsers of what an operator or the repository
# writes get the most.
budgets=(config:60 manifest:60 decode:60 segment:40 recipients:20 drill_report:20)

if [ $# -gt 0 ]; then
    budgets=("$1:${2:-60}")
fi

export RUSTC_BOOTSTRAP=1
# scripts/test.sh keeps the build in its cache, so a fresh clone does not rebuild it all.
fuzz_build=(-s none)
[ -z "${DR_FUZZ_TARGET_DIR:-}" ] || fuzz_build+=(--target-dir "$DR_FUZZ_TARGET_DIR")
fuzz=(cargo fuzz)

targets=()
for b in "${budgets[@]}"; do targets+=("${b%%:*}"); done
echo "==> building fuzz targets: ${targets[*]}"
if [ $# -gt 0 ]; then
    "${fuzz[@]}" build "${fuzz_build[@]}" "$1"
else
    "${fuzz[@]}" build "${fuzz_build[@]}"
fi

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

for b in "${budgets[@]}"; do
    target=${b%%:*}
    seconds=${b##*:}
    mkdir -p "$scratch/$target" "corpus/$target"
    echo "==> fuzzing $target for ${seconds}s"
    # The first corpus directory receives new inputs; the committed one is only read. The
    # outer timeout bounds the run even if libFuzzer's own per-input timeout cannot fire.
    if ! timeout --kill-after=10 $((seconds + 120)) \
        "${fuzz[@]}" run "${fuzz_build[@]}" "$target" "$scratch/$target" "corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        </dev/null >"$scratch/$target.log" 2>&1; then
        tail -n 60 "$scratch/$target.log"
        echo "fuzz target $target failed; the input is in fuzz/artifacts/$target/." >&2
        echo "Reproduce: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run -s none $target <input>" >&2
        exit 1
    fi
    grep -a -E "^Done [0-9]+ runs" "$scratch/$target.log" || true
done
echo "==> fuzzing found nothing in ${targets[*]}"
