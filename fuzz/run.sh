#!/usr/bin/env bash
# Runs the fuzz targets for a bounded time each, starting from the committed corpus.
#
#   fuzz/run.sh                    every target, with the budgets below (about 4 minutes)
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
budgets=(config:60 manifest:60 decode:60 recipients:20 drill_report:20)

if [ $# -gt 0 ]; then
    budgets=("$1:${2:-60}")
fi

export RUSTC_BOOTSTRAP=1
fuzz=(cargo fuzz)

targets=()
for b in "${budgets[@]}"; do targets+=("${b%%:*}"); done
echo "==> building fuzz targets: ${targets[*]}"
if [ $# -gt 0 ]; then
    "${fuzz[@]}" build -s none "$1"
else
    "${fuzz[@]}" build -s none
fi

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

for b in "${budgets[@]}"; do
    target=${b%%:*}
    seconds=${b##*:}
    mkdir -p "$scratch/$target" "corpus/$target"
    echo "==> fuzzing $target for ${seconds}s"
    # The first corpus directory receives new inputs; the committed one is only read.
    if ! "${fuzz[@]}" run -s none "$target" "$scratch/$target" "corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 >"$scratch/$target.log" 2>&1; then
        tail -n 60 "$scratch/$target.log"
        echo "fuzz target $target failed; the input is in fuzz/artifacts/$target/." >&2
        echo "Reproduce: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run -s none $target <input>" >&2
        exit 1
    fi
    grep -E "^stat::number_of_executed_units|^stat::new_units_added|Done [0-9]+ runs" \
        "$scratch/$target.log" | tr '\n' ' '
    echo
done
echo "==> fuzzing found nothing in ${targets[*]}"
