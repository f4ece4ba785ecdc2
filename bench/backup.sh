#!/usr/bin/env bash
# Backup benchmark: how much does `dr backup` cost over `pg_dump` alone, and how much memory
# does it take?
#
# Starts a throwaway PostgreSQL 15, fills a database with SIZE_GB of mixed data, then
# alternates RUNS rounds of:
#   a. pg_dump -Fc -Z0 > /dev/null                    the floor: dr cannot be faster
#   b. pg_dump -Fc -Z0 | zstd -3 -T0 | age -r KEY     what an admin would script by hand
#   c. dr backup (file:// repository), dump_jobs = 2  split: a schema and 2 data archives, one
#                                                     snapshot, each its own pipeline
#   d. dr backup, dump_jobs = 1                       one archive: the pipeline, in process
# and prints median wall times, ratios to (a), stored sizes and dr's peak RSS; with DOUBLE=1 it
# then doubles the database and shows dr's peak RSS does not grow with it. The results are
# appended to bench/RESULTS.md.
#
#   SIZE_GB=1 RUNS=5 bench/backup.sh
#
# Environment: SIZE_GB (default 1, fractions allowed), RUNS (default 5), BUILD (default 1;
# 0 uses the existing target/release/dr), DOUBLE (default 1 when SIZE_GB >= 1, else 0),
# DOMINANT=1 (one table holds about 80 % of the data: the split cannot help), KEEP=1 keeps
# the temporary directory (the database is still stopped), TMPDIR (where the
# cluster, dumps and repository go: needs about 3 × SIZE_GB free, 5 × with DOUBLE=1).
set -euo pipefail


# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "$0")/lib.sh"

SIZE_GB="${SIZE_GB:-1}"
RUNS="${RUNS:-5}"
BUILD="${BUILD:-1}"
KEEP="${KEEP:-0}"
if [ -z "${DOUBLE:-}" ]; then
    DOUBLE=$(awk -v s="$SIZE_GB" 'BEGIN { print (s >= 1) ? 1 : 0 }')
fi

# ---------------------------------------------------------------------------------------------
# dr's key, config and repository.

setup_dr() {
    # keygen prints the recipient on stdout and a reminder on stderr, kept quiet unless it fails.
    if ! recipient=$("$dr" keygen --output "$tmp/id.txt" 2>"$tmp/keygen.log"); then
        cat "$tmp/keygen.log" >&2
        die "dr keygen failed"
    fi
    config="$tmp/dr.toml"
    cat >"$config" <<TOML
environment = "bench"

[storage]
url = "file://$tmp/repo"

[encryption]
recipients = ["$recipient"]

[[databases]]
name = "bench"
url = "$db_url"
split_min_mib = 0
TOML
    config1="$tmp/dr1.toml"
    cp "$config" "$config1"
    echo "dump_jobs = 1" >>"$config1"
    echo "dump_jobs = ${DUMP_JOBS:-2}" >>"$config"
}

# ---------------------------------------------------------------------------------------------
# Measuring. Each run appends "wall_seconds max_rss_kib" to $tmp/<name>.times. GNU time's %M is
# the largest RSS of the process and of the children it reaped (the kernel reports the
# maximum), so for dr it covers pg_dump too, and for the shell pipeline its largest member.


run_pg_dump() {
    timed pg_dump "$pg_bin/pg_dump" -Fc -Z0 -d "$db_url" >/dev/null
}

run_shell() {
    # pipefail inside: a failing pg_dump must fail the run, not hide behind age's success.
    # shellcheck disable=SC2016 # $1..$4 are the inner shell's arguments, expanded there
    timed shell bash -c 'set -o pipefail; "$1" -Fc -Z0 -d "$2" | zstd -q -3 -T0 | age -r "$3" > "$4"' \
        _ "$pg_bin/pg_dump" "$db_url" "$recipient" "$tmp/shell.age"
    shell_bytes=$(stat -c %s "$tmp/shell.age")
}

# $1 names the series: dr at the main size, dr2x after DOUBLE, dr1 for one archive.
run_dr() {
    local name=${1:-dr} cfg=${2:-$config}
    if ! timed "$name" "$dr" --config "$cfg" --log-format json backup >/dev/null 2>"$tmp/dr.log"; then
        echo "dr backup failed; its log:" >&2
        cat "$tmp/dr.log" >&2
        exit 1
    fi
    local stored
    stored=$("$dr" --config "$config" --log-format json list --json 2>>"$tmp/dr.log" | jq '.[-1].stored_bytes')
    if [ "$name" = dr ]; then dr_bytes=$stored; fi
    # dr's own CPU (zstd, age, sha256, upload; not pg_dump's), from its log.
    jq -r 'select(.message == "backup complete") | .dr_cpu_seconds' "$tmp/dr.log" >>"$tmp/$name.cpu"
    if [ "$name" = dr1 ]; then dr1_bytes=$stored; fi
    # Only the newest backup matters; removing it keeps the disk from filling over the runs.
    rm -rf "$tmp/repo/bench/bench/backups"
}


run_dr1() { run_dr dr1 "$config1"; }

run_rounds() {
    local round order cmd
    for round in $(seq 1 "$RUNS"); do
        # Rotating the order as well as alternating spreads cache and thermal drift evenly.
        case $(( (round - 1) % 3 )) in
            0) order="pg_dump shell dr dr1" ;;
            1) order="shell dr dr1 pg_dump" ;;
            *) order="dr dr1 pg_dump shell" ;;
        esac
        for cmd in $order; do "run_$cmd"; done
        log "round $round/$RUNS: pg_dump $(last pg_dump)s, shell $(last shell)s, dr $(last dr)s, dr one archive $(last dr1)s"
    done
}

# Column $2 (1 = wall seconds, 2 = RSS KiB) of series $1.
# ---------------------------------------------------------------------------------------------
# Reporting.


report() {
    local a b c d ra rb rc rd dr_rss_med dr_rss_max cpu cpu1 gib
    a=$(col pg_dump 1 | median)
    d=$(col dr1 1 | median)
    rd=$(kib_to_mib "$(col dr1 2 | median)")
    cpu=$(median <"$tmp/dr.cpu")
    cpu1=$(median <"$tmp/dr1.cpu")
    gib=$(awk -v b="$raw_bytes" 'BEGIN { printf "%.3f", b / 1073741824 }')
    b=$(col shell 1 | median)
    c=$(col dr 1 | median)
    ra=$(kib_to_mib "$(col pg_dump 2 | median)")
    rb=$(kib_to_mib "$(col shell 2 | median)")
    rc=$(kib_to_mib "$(col dr 2 | median)")
    dr_rss_med=$rc
    dr_rss_max=$(kib_to_mib "$(col dr 2 | max)")
    cat <<EOF
## $(date -u '+%Y-%m-%d %H:%M UTC') — backup.sh, SIZE_GB=$SIZE_GB, RUNS=$RUNS, DOMINANT=${DOMINANT:-0}

- machine: $(machine)
- pg_dump: $("$pg_bin/pg_dump" --version)
- dr commit: $(dr_commit)
- database: pg_database_size $(human "$db_bytes"), \`pg_dump -Fc -Z0\` $(human "$raw_bytes"); largest table $(largest_share) % of it
- load average (1/5/15 min) before the rounds: $load_before; after: $load_after

| command | median wall | × pg_dump | median peak RSS | stored |
|---|---:|---:|---:|---:|
| a. \`pg_dump -Fc -Z0 > /dev/null\` | ${a} s | 1.00 | ${ra} MiB | — |
| b. \`pg_dump -Fc -Z0 \| zstd -3 -T0 \| age\` | ${b} s | $(ratio "$b" "$a") | ${rb} MiB | $(human "$shell_bytes") |
| c. \`dr backup\` (file://), dump_jobs = ${DUMP_JOBS:-2} | ${c} s | $(ratio "$c" "$a") | ${rc} MiB | $(human "$dr_bytes") |
| d. \`dr backup\` (file://), dump_jobs = 1 | ${d} s | $(ratio "$d" "$a") | ${rd} MiB | $(human "$dr1_bytes") |

dr's own CPU (zstd + age + sha256 + writing; pg_dump excluded), median: $(awk -v c="$cpu" -v g="$gib" 'BEGIN { printf "%.1f", c / g }') CPU-s per GiB of archive split, $(awk -v c="$cpu1" -v g="$gib" 'BEGIN { printf "%.1f", c / g }') one archive.

Wall times per run (s): pg_dump $(col pg_dump 1 | xargs), shell $(col shell 1 | xargs), dr $(col dr 1 | xargs), dr one archive $(col dr1 1 | xargs).

Targets: dr ≤ 1.10× pg_dump alone: $(ratio "$c" "$a")× $(pass "$(ratio "$c" "$a")" 1.10); \
dr (split) ≤ the shell script: $(ratio "$c" "$b")× of it $(pass "$(ratio "$c" "$b")" 1.00); \
dr peak RSS ≤ 64 MiB: median ${dr_rss_med} MiB, max ${dr_rss_max} MiB $(pass "$dr_rss_max" 64).
EOF
    if [ "$DOUBLE" = 1 ]; then
        echo
        echo "Database doubled to pg_database_size $(human "$db2_bytes") (\`pg_dump -Fc -Z0\` $(human "$raw2_bytes")):" \
            "dr backup $(col dr2x 1 | xargs) s;" \
            "peak RSS at 1x: ${dr_rss_max} MiB, at 2x: $(kib_to_mib "$(col dr2x 2 | max)") MiB (max of runs)."
    fi
}


# ---------------------------------------------------------------------------------------------

main() {
    [ "$RUNS" -ge 1 ] || die "RUNS must be at least 1"
    awk -v s="$SIZE_GB" 'BEGIN { exit !(s > 0) }' || die "SIZE_GB must be a positive number"
    trap cleanup EXIT
    trap 'exit 130' INT # exit, so the EXIT trap stops the cluster
    trap 'exit 143' TERM

    ensure_tools
    build_dr
    start_postgres

    local target
    target=$(awk -v s="$SIZE_GB" 'BEGIN { printf "%.0f", s * 1073741824 }')
    log "generating at least $(human "$target") of data"
    create_schema
    grow_to "$target"
    db_bytes=$(db_size)
    # Also warms the page cache, so the first measured run is not the only cold one.
    raw_bytes=$(dump_size)
    log "pg_database_size $(human "$db_bytes"), pg_dump -Fc -Z0 $(human "$raw_bytes")"

    setup_dr
    load_before=$(loadavg)
    run_rounds
    load_after=$(loadavg)

    if [ "$DOUBLE" = 1 ]; then
        log "doubling the database to measure dr's memory at 2x"
        grow_to $((2 * db_bytes))
        db2_bytes=$(db_size)
        raw2_bytes=$(dump_size)
        run_dr dr2x
        run_dr dr2x
    fi

    publish_report
}

main "$@"
