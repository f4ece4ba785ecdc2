#!/usr/bin/env bash
# Directory benchmark: how much does `dr backup --directory` cost over the tar | zstd | age
# pipeline an admin would script, how much memory does it take, and how fast does `dr copy`
# move a backup between two S3 buckets compared with a download-then-upload copy?
#
# Builds two trees in a temporary directory:
#   small  SMALL_FILES files of 0.5-4 KiB (text, compressible), 100 per directory
#   large  LARGE_FILES files of LARGE_MIB MiB each (half random, half text)
# then, for each tree, alternates RUNS rounds of:
#   a. tar -cf - -C TREE . | zstd -3 -T0 | age -r KEY > file
#   a2. the same, then sync file (durable, as dr makes what it stores)
#   b. dr backup --directory (file:// repository)
# With COPY=1 (the default) it then starts a throwaway Garage with two buckets, backs the
# large tree up into the first and runs RUNS rounds of:
#   c. dr copy --to second                       (into a fresh bucket each round)
#   d. curl GET each object to a file, curl PUT it into the other bucket
# Results are appended to bench/RESULTS.md.
#
#   RUNS=3 bench/directory.sh
#
# Environment: SMALL_FILES (default 100000), LARGE_FILES (default 4), LARGE_MIB (default
# 256), RUNS (default 3), BUILD (default 1; 0 uses the existing target/release/dr), COPY
# (default 1), KEEP=1 keeps the temporary directory, TMPDIR (needs about 4 × the trees free).
set -euo pipefail

# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "$0")/lib.sh"

SMALL_FILES="${SMALL_FILES:-100000}"
LARGE_FILES="${LARGE_FILES:-4}"
LARGE_MIB="${LARGE_MIB:-256}"
RUNS="${RUNS:-3}"
BUILD="${BUILD:-1}"
COPY="${COPY:-1}"
KEEP="${KEEP:-0}"

make_trees() {
    log "writing $SMALL_FILES small files and $LARGE_FILES × $LARGE_MIB MiB into $tmp"
    python3 - "$tmp" "$SMALL_FILES" "$LARGE_FILES" "$LARGE_MIB" <<'PY'
import os, random, sys
root, small, large, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(42)
words = ("invoice customer upload report image thumbnail order receipt scan "
         "contract draft final copy archive export").split()
for i in range(small):
    d = os.path.join(root, "small", f"d{i // 100:05d}")
    if i % 100 == 0:
        os.makedirs(d)
    n = rng.randint(512, 4096)
    text = " ".join(rng.choice(words) for _ in range(n // 6)) + f" {rng.getrandbits(128):032x}\n"
    with open(os.path.join(d, f"file-{i:06d}.txt"), "w") as f:
        f.write(text[:n])
os.makedirs(os.path.join(root, "large"))
chunk = 1 << 20
line = (" ".join(words) + "\n").encode()
text = (line * (chunk // len(line) + 1))[:chunk]
for i in range(large):
    with open(os.path.join(root, "large", f"video-{i}.bin"), "wb") as f:
        for j in range(mib):
            f.write(os.urandom(chunk) if j % 2 == 0 else text)
PY
    small_bytes=$(du -sb "$tmp/small" | cut -f1)
    large_bytes=$(du -sb "$tmp/large" | cut -f1)
    # Warm the page cache for both trees, so no measured run is the only cold one.
    tar -cf - -C "$tmp/small" . >/dev/null
    tar -cf - -C "$tmp/large" . >/dev/null
}

setup_dr() {
    if ! recipient=$("$dr" keygen --output "$tmp/id.txt" 2>"$tmp/keygen.log"); then
        cat "$tmp/keygen.log" >&2
        die "dr keygen failed"
    fi
    config="$tmp/dr.toml"
    {
        printf 'environment = "bench"\n\n[storage]\nurl = "file://%s/repo"\n\n' "$tmp"
        printf '[encryption]\nrecipients = ["%s"]\nidentity_file = "%s/id.txt"\n' "$recipient" "$tmp"
        for tree in small large; do
            printf '\n[[directories]]\nname = "%s"\npath = "%s/%s"\n' "$tree" "$tmp" "$tree"
            printf '  [[directories.schedules]]\n  class = "daily"\n  cron = "0 3 * * *"\n  keep = "7d"\n'
        done
    } >"$config"
}

run_shell() {
    local tree=$1
    # shellcheck disable=SC2016 # $1..$3 are the inner shell's arguments, expanded there
    timed "shell-$tree" bash -c 'set -o pipefail; tar -cf - -C "$1" . | zstd -q -3 -T0 | age -r "$2" > "$3"' \
        _ "$tmp/$tree" "$recipient" "$tmp/shell.age"
    printf -v "shell_${tree}_stored" '%s' "$(stat -c %s "$tmp/shell.age")"
    rm -f "$tmp/shell.age"
    # The same made durable, as dr makes every object before it stores a manifest.
    # shellcheck disable=SC2016
    timed "shellsync-$tree" bash -c 'set -o pipefail; tar -cf - -C "$1" . | zstd -q -3 -T0 | age -r "$2" > "$3" && sync "$3"' \
        _ "$tmp/$tree" "$recipient" "$tmp/shell.age"
    rm -f "$tmp/shell.age"
}

run_dr() {
    local tree=$1
    if ! timed "dr-$tree" "$dr" --config "$config" --log-format json backup --directory "$tree" --json \
        >"$tmp/dr.json" 2>"$tmp/dr.log"; then
        echo "dr backup --directory $tree failed; its log:" >&2
        cat "$tmp/dr.log" >&2
        exit 1
    fi
    printf -v "dr_${tree}_stored" '%s' "$(jq '[.objects[].stored_bytes] | add' "$tmp/dr.json")"
    rm -rf "$tmp/repo/bench/$tree/backups"
}

run_tree_rounds() {
    local tree=$1 round
    for round in $(seq 1 "$RUNS"); do
        if [ $((round % 2)) = 1 ]; then run_shell "$tree"; run_dr "$tree"; else run_dr "$tree"; run_shell "$tree"; fi
        log "$tree round $round/$RUNS: shell $(last "shell-$tree")s, dr $(last "dr-$tree")s"
    done
}

# ---------------------------------------------------------------------------------------------
# Copies between two buckets of one Garage.

copy_config() {
    cat >"$tmp/copy.toml" <<TOML
environment = "bench"

$(garage_storage_toml)

[encryption]
recipients = ["$recipient"]

[[directories]]
name = "large"
path = "$tmp/large"
  [[directories.schedules]]
  class = "daily"
  cron = "0 3 * * *"
  keep = "7d"

[[copies]]
name = "second"
  [copies.storage]
  url = "s3://$1/bench"
  endpoint = "http://127.0.0.1:$s3_port"
  region = "garage"
  path_style = true
TOML
}

new_bucket() {
    garage_retry bucket create "$1" >/dev/null
    garage_retry bucket allow --read --write --owner "$1" --key "$s3_key_id" >/dev/null
}

run_copies() {
    start_garage
    export AWS_ACCESS_KEY_ID="$s3_key_id" AWS_SECRET_ACCESS_KEY="$s3_secret" AWS_EC2_METADATA_DISABLED=true
    copy_config unused
    log "dr backup --directory large into Garage"
    "$dr" --config "$tmp/copy.toml" --log-format json backup --directory large --json >"$tmp/copy-backup.json" 2>"$tmp/dr.log" ||
        { cat "$tmp/dr.log" >&2; die "dr backup into Garage failed"; }
    local keys round bucket
    keys=$(s3_curl "$(s3_url "/?list-type=2&prefix=bench%2F")" | grep -o '<Key>[^<]*</Key>' | sed 's/<[^>]*>//g')
    copy_bytes=$(jq '[.objects[].stored_bytes] | add' "$tmp/copy-backup.json")
    for round in $(seq 1 "$RUNS"); do
        bucket="dr-bench-copy-$round"
        new_bucket "$bucket"
        copy_config "$bucket"
        timed copy-dr "$dr" --config "$tmp/copy.toml" --log-format json copy --to second >/dev/null 2>"$tmp/dr.log" ||
            { cat "$tmp/dr.log" >&2; die "dr copy failed"; }
        bucket="dr-bench-plain-$round"
        new_bucket "$bucket"
        # shellcheck disable=SC2016 # the inner shell expands its own arguments
        timed copy-plain env KEYS="$keys" ID="$s3_key_id" SECRET="$s3_secret" TMP="$tmp" \
            SRC="http://127.0.0.1:$s3_port/$s3_bucket" DST="http://127.0.0.1:$s3_port/$bucket" bash -c '
            set -e
            for key in $KEYS; do
                curl -sS --fail --aws-sigv4 "aws:amz:garage:s3" --user "$ID:$SECRET" \
                    -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" -o "$TMP/obj" "$SRC/$key"
                curl -sS --fail --aws-sigv4 "aws:amz:garage:s3" --user "$ID:$SECRET" \
                    -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" -T "$TMP/obj" "$DST/$key" >/dev/null
            done
            rm -f "$TMP/obj"'
        log "copy round $round/$RUNS: dr copy $(last copy-dr)s, download + upload $(last copy-plain)s"
    done
    stop_garage
}

# ---------------------------------------------------------------------------------------------

report() {
    local tree a b ra rb
    cat <<EOF
## $(date -u '+%Y-%m-%d %H:%M UTC') — directory.sh, SMALL_FILES=$SMALL_FILES, LARGE_FILES=$LARGE_FILES × $LARGE_MIB MiB, RUNS=$RUNS

- machine: $(machine)
- dr commit: $(dr_commit)
- load average (1/5/15 min) before the rounds: $load_before; after: $load_after

| tree | command | median wall | × shell | median peak RSS | stored |
|---|---|---:|---:|---:|---:|
EOF
    for tree in small large; do
        a=$(col "shell-$tree" 1 | median)
        b=$(col "dr-$tree" 1 | median)
        ra=$(kib_to_mib "$(col "shell-$tree" 2 | median)")
        rb=$(kib_to_mib "$(col "dr-$tree" 2 | max)")
        local bytes_var="${tree}_bytes" s_var="shell_${tree}_stored" d_var="dr_${tree}_stored"
        echo "| $tree ($(human "${!bytes_var}")) | a. \`tar \| zstd -3 -T0 \| age\` | ${a} s | 1.00 | ${ra} MiB | $(human "${!s_var}") |"
        local c
        c=$(col "shellsync-$tree" 1 | median)
        echo "| | a2. the same \`&& sync FILE\` (durable, as dr's objects) | ${c} s | $(ratio "$c" "$a") | | |"
        echo "| | b. \`dr backup --directory\` | ${b} s | $(ratio "$b" "$a") (× a2: $(ratio "$b" "$c")) | ${rb} MiB (max) | $(human "${!d_var}") |"
        eval "ratio_$tree=$(ratio "$b" "$a") rss_$tree=$rb"
    done
    echo
    echo "Wall times per run (s): small shell $(col shell-small 1 | xargs), shell + sync $(col shellsync-small 1 | xargs), dr $(col dr-small 1 | xargs); large shell $(col shell-large 1 | xargs), shell + sync $(col shellsync-large 1 | xargs), dr $(col dr-large 1 | xargs)."
    echo
    # shellcheck disable=SC2154 # set by eval above
    echo "Targets: dr ≤ 1.10× the shell pipeline: small ${ratio_small}× $(pass "$ratio_small" 1.10), large ${ratio_large}× $(pass "$ratio_large" 1.10); peak RSS ≤ 64 MiB: small ${rss_small} MiB $(pass "$rss_small" 64), large ${rss_large} MiB $(pass "$rss_large" 64)."
    if [ "$COPY" = 1 ]; then
        local c d
        c=$(col copy-dr 1 | median)
        d=$(col copy-plain 1 | median)
        echo
        echo "Copy of one $(human "$copy_bytes") backup between two buckets of one local Garage: \`dr copy\` ${c} s ($(awk -v b="$copy_bytes" -v s="$c" 'BEGIN { printf "%.0f", b / 1048576 / s }') MiB/s, peak RSS $(kib_to_mib "$(col copy-dr 2 | max)") MiB, sha256 checked), download-then-upload with curl ${d} s ($(awk -v b="$copy_bytes" -v s="$d" 'BEGIN { printf "%.0f", b / 1048576 / s }') MiB/s): $(ratio "$c" "$d")× of it."
    fi
}

main() {
    [ "$RUNS" -ge 1 ] || die "RUNS must be at least 1"
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    ensure_tools
    build_dr
    tmp="$(mktemp -d "${TMPDIR:-/tmp}/dr-bench.XXXXXX")"
    make_trees
    setup_dr
    load_before=$(loadavg)
    run_tree_rounds small
    run_tree_rounds large
    if [ "$COPY" = 1 ]; then run_copies; fi
    load_after=$(loadavg)
    publish_report
}

main "$@"
