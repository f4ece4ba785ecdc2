#!/usr/bin/env bash
# Restore benchmark: how much does `dr restore` from S3 cost over `pg_restore -j N` of a local
# archive file, and how much memory does it take?
#
# Starts a throwaway PostgreSQL 15 and a throwaway Garage S3 server, fills a database with
# SIZE_GB of mixed data (the generator of backup.sh), takes two `dr backup`s into Garage (one
# archive, `dump_jobs = 1`; and split, `dump_jobs = DUMP_JOBS`) and prepares, unmeasured, the
# one-archive backup as a local file (`dr restore --output local.dump`) and its stored object
# as a local file (data.age, downloaded with curl). Then it alternates RUNS rounds of, a and
# b into a freshly created empty database, c and d with --create into none (as in an incident:
# a split backup streams only into a database dr creates, so it can drop it on failure):
#   a. pg_restore -j JOBS -d DB local.dump                 the floor: a local, decoded archive
#   b. age -d -i KEY data.age | zstd -d | pg_restore -d DB  the hand-written pipeline (1 job:
#                                                           a pipe cannot be restored in parallel;
#                                                           reads a local file, so no download)
#   c. dr restore --target DB --create --jobs JOBS --json   the split backup from Garage:
#                                                           schema staged, data archives streamed
#                                                           side by side, post-data -j JOBS
#   d. dr restore --backup ONE --create --jobs JOBS --json  the one-archive backup from Garage:
#                                                           download, verify, stage, restore
# and prints median wall times, ratios to (a), dr's median stage breakdown and peak RSS. The
# results are appended to bench/RESULTS.md.
#
#   SIZE_GB=1 RUNS=3 bench/restore.sh
#
# Environment: SIZE_GB (default 1, fractions allowed), RUNS (default 5), JOBS (default nproc),
# DUMP_JOBS (the split backup's data archives, default 2), DOMINANT=1 (one table holds about
# 80 % of the data),
# BUILD (default 1; 0 uses the existing target/release/dr), KEEP=1 keeps the temporary
# directory, TMPDIR (where the cluster, Garage's data, the archives and dr's staging file go:
# needs about 5 × SIZE_GB free), DR_GARAGE_BIN (default ~/.cache/dr-tests/garage/bin/garage).
set -euo pipefail

# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "$0")/lib.sh"

SIZE_GB="${SIZE_GB:-1}"
RUNS="${RUNS:-5}"
JOBS="${JOBS:-$(nproc)}"
DUMP_JOBS="${DUMP_JOBS:-2}"
BUILD="${BUILD:-1}"
KEEP="${KEEP:-0}"

target_db=restored

psql_admin() { "$pg_bin/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d postgres "$@"; }

# An empty database for the next run; the checkpoint keeps the previous run's dirty pages
# from being flushed on the next one's time.
fresh_target() {
    psql_admin -c "set client_min_messages = warning" -c "drop database if exists $target_db" \
        -c "create database $target_db" -c "checkpoint"
}

# No target database at all: `dr restore --create` makes it, which is what lets a split
# backup stream (into an existing database dr stages every archive first).
no_target() {
    psql_admin -c "set client_min_messages = warning" -c "drop database if exists $target_db" \
        -c "checkpoint"
}

# Row counts of every table, to check that each run restored everything.
row_counts() {
    "$pg_bin/psql" -X -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d "$1" -c \
        "select (select count(*) from customers) || ' ' || (select count(*) from orders) || ' ' ||
                (select count(*) from events) || ' ' || (select count(*) from attachments)"
}

# ---------------------------------------------------------------------------------------------
# dr's key, config and Garage repository.

setup_dr() {
    if ! recipient=$("$dr" keygen --output "$tmp/id.txt" 2>"$tmp/keygen.log"); then
        cat "$tmp/keygen.log" >&2
        die "dr keygen failed"
    fi
    config="$tmp/dr.toml"
    cat >"$config" <<TOML
environment = "bench"

$(garage_storage_toml)

[encryption]
recipients = ["$recipient"]
identity_file = "$tmp/id.txt"

[[databases]]
name = "bench"
url = "$db_url"
split_min_mib = 0
TOML
    config1="$tmp/dr1.toml"
    cp "$config" "$config1"
    echo "dump_jobs = 1" >>"$config1"
    echo "dump_jobs = $DUMP_JOBS" >>"$config"
    # The standard AWS chain: dr (and only dr) needs these, but exporting is harmless for
    # the PostgreSQL tools, age and zstd.
    export AWS_ACCESS_KEY_ID="$s3_key_id" AWS_SECRET_ACCESS_KEY="$s3_secret"
    export AWS_EC2_METADATA_DISABLED=true
}

# Runs dr with its log in $tmp/dr.log; on failure prints the log and stops.
dr_or_die() {
    local what=$1
    shift
    if ! "$@" 2>"$tmp/dr.log"; then
        echo "$what failed; its log:" >&2
        cat "$tmp/dr.log" >&2
        exit 1
    fi
}

prepare() {
    log "dr backup into Garage, one archive (dump_jobs = 1)"
    dr_or_die "dr backup" /usr/bin/time -f '%e %M' -o "$tmp/backup.time" \
        "$dr" --config "$config1" --log-format json backup >/dev/null
    backup_seconds=$(cut -d' ' -f1 "$tmp/backup.time")
    backup_rss=$(kib_to_mib "$(cut -d' ' -f2 "$tmp/backup.time")")
    "$dr" --config "$config" --log-format json list --json 2>>"$tmp/dr.log" >"$tmp/list.json"
    stored_bytes=$(jq '.[-1].stored_bytes' "$tmp/list.json")
    raw_archive_bytes=$(jq '.[-1].raw_bytes' "$tmp/list.json")
    one_id=$(jq -r '.[-1].id' "$tmp/list.json")
    log "dr backup into Garage, split (dump_jobs = $DUMP_JOBS)"
    dr_or_die "dr backup" /usr/bin/time -f '%e %M' -o "$tmp/backup-split.time" \
        "$dr" --config "$config" --log-format json backup >/dev/null
    split_backup_seconds=$(cut -d' ' -f1 "$tmp/backup-split.time")
    split_backup_rss=$(kib_to_mib "$(cut -d' ' -f2 "$tmp/backup-split.time")")
    "$dr" --config "$config" --log-format json list --json 2>>"$tmp/dr.log" >"$tmp/list.json"
    split_stored_bytes=$(jq '.[-1].stored_bytes' "$tmp/list.json")
    split_archives=$(jq '[.[-1].objects[] | select(.role == "data")] | length' "$tmp/list.json")

    log "dr restore --output local.dump (the archive as a local file, for pg_restore -j)"
    dr_or_die "dr restore --output" \
        "$dr" --config "$config" --log-format json restore --database bench \
        --backup "$one_id" --output "$tmp/local.dump" --json >"$tmp/output.json"
    output_seconds=$(jq -r '.seconds.total * 100 | round / 100' "$tmp/output.json")

    log "downloading the stored object with curl (data.age, for the shell pipeline)"
    local key t0
    key=$(s3_curl "$(s3_url "/?list-type=2&prefix=bench%2F")" |
        { grep -o "<Key>[^<]*/$one_id/data\\.dump\\.zst\\.age</Key>" || true; } | sed 's/<[^>]*>//g')
    [ -n "$key" ] || die "no data.dump.zst.age object in bucket $s3_bucket"
    t0=$(date +%s.%N)
    s3_curl -o "$tmp/data.age" "$(s3_url "/$key")"
    download_seconds=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
    [ "$(stat -c %s "$tmp/data.age")" = "$stored_bytes" ] ||
        die "downloaded $(stat -c %s "$tmp/data.age") bytes of $key, the manifest says $stored_bytes"

    # The pipeline must produce exactly the archive dr wrote: same input for a and b.
    if ! age -d -i "$tmp/id.txt" "$tmp/data.age" | zstd -q -d | cmp -s - "$tmp/local.dump"; then
        die "age -d | zstd -d of the stored object differs from dr restore --output"
    fi
    expected_counts=$(row_counts bench)
}

# ---------------------------------------------------------------------------------------------
# Measuring (see timed in lib.sh). Each run restores into a fresh empty database.

check_restored() {
    local got
    got=$(row_counts "$target_db")
    [ "$got" = "$expected_counts" ] || die "$1 restored row counts $got, expected $expected_counts"
}

run_local() {
    fresh_target
    if ! timed local "$pg_bin/pg_restore" -j "$JOBS" -d "$target_url" "$tmp/local.dump" 2>"$tmp/run.log"; then
        cat "$tmp/run.log" >&2
        exit 1
    fi
    check_restored "pg_restore -j $JOBS"
}

run_shell() {
    fresh_target
    # shellcheck disable=SC2016 # $1..$4 are the inner shell's arguments, expanded there
    if ! timed shell bash -c 'set -o pipefail; age -d -i "$1" "$2" | zstd -q -d | "$3" -d "$4"' \
        _ "$tmp/id.txt" "$tmp/data.age" "$pg_bin/pg_restore" "$target_url" 2>"$tmp/run.log"; then
        cat "$tmp/run.log" >&2
        exit 1
    fi
    check_restored "age | zstd | pg_restore"
}

run_dr() {
    no_target
    if ! timed dr "$dr" --config "$config" --log-format json restore --database bench \
        --target "$target_url" --create --jobs "$JOBS" --staging-dir "$tmp" --json \
        >"$tmp/dr.json" 2>"$tmp/dr.log"; then
        echo "dr restore failed; its log:" >&2
        cat "$tmp/dr.log" >&2
        exit 1
    fi
    jq -r '.seconds | [.fetch, .decrypt_decompress, .pg_restore, .total] | map(. * 100 | round / 100) | join(" ")' "$tmp/dr.json" \
        >>"$tmp/drstages.times"
    dr_mode=$(jq -r '.mode' "$tmp/dr.json")
    jq -r '.seconds.sections // {} | [.pre_data, .data, .post_data] | map((. // 0) * 100 | round / 100) | join(" ")' "$tmp/dr.json" \
        >>"$tmp/drsections.times"
    check_restored "dr restore"
}

run_drone() {
    no_target
    if ! timed drone "$dr" --config "$config" --log-format json restore --database bench \
        --backup "$one_id" --target "$target_url" --create --jobs "$JOBS" --staging-dir "$tmp" --json \
        >"$tmp/drone.json" 2>"$tmp/dr.log"; then
        echo "dr restore (one archive) failed; its log:" >&2
        cat "$tmp/dr.log" >&2
        exit 1
    fi
    drone_mode=$(jq -r '.mode' "$tmp/drone.json")
    check_restored "dr restore (one archive)"
}

run_rounds() {
    local round order cmd
    for round in $(seq 1 "$RUNS"); do
        case $(( (round - 1) % 3 )) in
            0) order="local shell dr drone" ;;
            1) order="shell dr drone local" ;;
            *) order="dr drone local shell" ;;
        esac
        for cmd in $order; do "run_$cmd"; done
        log "round $round/$RUNS: pg_restore -j $JOBS $(last local)s, shell $(last shell)s, dr $(last dr)s, dr one archive $(last drone)s"
    done
    psql_admin -c "drop database if exists $target_db"
}

# ---------------------------------------------------------------------------------------------
# Reporting.

tool_version() { "$@" 2>&1 | head -n 1; }
two() { awk -v x="$1" 'BEGIN { printf "%.2f", x }'; }

report() {
    local a b c d ra rb rc rd fetch decode restore total pre data post
    a=$(two "$(col local 1 | median)")
    d=$(two "$(col drone 1 | median)")
    rd=$(kib_to_mib "$(col drone 2 | median)")
    pre=$(two "$(col drsections 1 | median)")
    data=$(two "$(col drsections 2 | median)")
    post=$(two "$(col drsections 3 | median)")
    b=$(two "$(col shell 1 | median)")
    c=$(two "$(col dr 1 | median)")
    ra=$(kib_to_mib "$(col local 2 | median)")
    rb=$(kib_to_mib "$(col shell 2 | median)")
    rc=$(kib_to_mib "$(col dr 2 | median)")
    fetch=$(two "$(col drstages 1 | median)")
    decode=$(two "$(col drstages 2 | median)")
    restore=$(two "$(col drstages 3 | median)")
    total=$(two "$(col drstages 4 | median)")
    cat <<EOF
## $(date -u '+%Y-%m-%d %H:%M UTC') — restore.sh, SIZE_GB=$SIZE_GB, RUNS=$RUNS, DOMINANT=${DOMINANT:-0}, JOBS=$JOBS

- machine: $(machine)
- pg_restore: $("$pg_bin/pg_restore" --version); age $(tool_version age --version); zstd $(zstd -V | grep -o 'v[0-9.]*' | head -n 1); Garage $("$garage_bin" --version 2>/dev/null | awk '{ print $2 }'); curl $(curl --version | awk 'NR == 1 { print $2 }')
- dr commit: $(dr_commit)
- database: pg_database_size $(human "$db_bytes"); archive (\`dr restore --output\`, decoded) $(human "$raw_archive_bytes"); stored in Garage (zstd + age) $(human "$stored_bytes"); largest table $(largest_share) % of it
- split backup: $split_archives data archives (dump_jobs = $DUMP_JOBS), stored $(human "$split_stored_bytes")
- unmeasured preparation: \`dr backup\` into Garage ${backup_seconds} s, peak RSS ${backup_rss} MiB (one archive), ${split_backup_seconds} s, ${split_backup_rss} MiB (split); \`dr restore --output local.dump\` from Garage ${output_seconds} s; curl download of the stored object ${download_seconds} s
- load average (1/5/15 min) before the rounds: $load_before; after: $load_after

| command | median wall | × pg_restore -j $JOBS | median peak RSS |
|---|---:|---:|---:|
| a. \`pg_restore -j $JOBS\` of local.dump | ${a} s | 1.00 | ${ra} MiB |
| b. \`age -d < data.age \| zstd -d \| pg_restore\` (1 job, local file) | ${b} s | $(ratio "$b" "$a") | ${rb} MiB |
| c. \`dr restore --jobs $JOBS\` from Garage ($dr_mode) | ${c} s | $(ratio "$c" "$a") | ${rc} MiB |
| d. \`dr restore --jobs $JOBS\` of the one-archive backup from Garage ($drone_mode) | ${d} s | $(ratio "$d" "$a") | ${rd} MiB |

Split restore sections (median): pre-data ${pre} s, data archives side by side ${data} s, post-data ${post} s.

dr's stages, median of its JSON summaries: fetch ${fetch} s, decrypt_decompress ${decode} s (overlaps fetch; for a split backup, until the last data archive is loaded), pg_restore ${restore} s (includes \`pg_restore --list\` for the progress bar), total ${total} s; the rest of the wall time (process start, manifest listing, target checks) is $(awk -v w="$c" -v t="$total" 'BEGIN { printf "%.2f", w - t }') s.

Wall times per run (s): pg_restore -j $JOBS $(col local 1 | xargs); shell $(col shell 1 | xargs); dr $(col dr 1 | xargs); dr one archive $(col drone 1 | xargs). \
dr's stages per run (fetch decrypt_decompress pg_restore total): $(paste -sd ';' "$tmp/drstages.times" | sed 's/;/; /g'). \
dr peak RSS per run: $(col dr 2 | while read -r k; do kib_to_mib "$k"; echo; done | xargs) MiB.

Target: dr restore ≤ 1.00× local \`pg_restore -j $JOBS\`: $(ratio "$c" "$a")× $(pass "$(ratio "$c" "$a")" 1.00).

What each line measures: (a) only PostgreSQL loading an archive that is already decoded on local disk, $JOBS jobs; (b) decrypting and decompressing a local copy of the stored object straight into a single pg_restore — the download is *not* included, which favours it (the curl download alone took ${download_seconds} s); (c) everything from a cold start of \`dr\` for the split backup: listing manifests in Garage, creating the database, staging the small schema archive, restoring pre-data, then downloading every data archive over HTTP, verifying it (sha256, age, zstd) and streaming it into its own \`pg_restore --data-only\`, all side by side, then post-data with \`pg_restore -j $JOBS\`; (d) the same for the one-archive backup, which is downloaded, verified and decoded into a staging file before \`pg_restore -j $JOBS\` of it. Peak RSS is GNU time's %M: the largest of the process and its reaped descendants, so for (a) and (c) it includes pg_restore's workers.
EOF
}

# ---------------------------------------------------------------------------------------------

main() {
    [ "$RUNS" -ge 1 ] || die "RUNS must be at least 1"
    [ "$JOBS" -ge 1 ] || die "JOBS must be at least 1"
    awk -v s="$SIZE_GB" 'BEGIN { exit !(s > 0) }' || die "SIZE_GB must be a positive number"
    trap cleanup EXIT
    trap 'exit 130' INT # exit, so the EXIT trap stops the cluster and Garage
    trap 'exit 143' TERM

    ensure_tools
    build_dr
    start_postgres
    target_url="postgres://postgres@127.0.0.1:$port/$target_db"
    start_garage

    local target
    target=$(awk -v s="$SIZE_GB" 'BEGIN { printf "%.0f", s * 1073741824 }')
    log "generating at least $(human "$target") of data"
    create_schema
    grow_to "$target"
    db_bytes=$(db_size)
    log "pg_database_size $(human "$db_bytes")"

    setup_dr
    prepare
    log "archive $(human "$raw_archive_bytes"), stored $(human "$stored_bytes"); $RUNS rounds with JOBS=$JOBS"

    load_before=$(loadavg)
    run_rounds
    load_after=$(loadavg)

    publish_report
}

main "$@"
