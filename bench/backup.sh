#!/usr/bin/env bash
# Backup benchmark: how much does `dr backup` cost over `pg_dump` alone, and how much memory
# does it take?
#
# Starts a throwaway PostgreSQL 15, fills a database with SIZE_GB of mixed data, then
# alternates RUNS rounds of:
#   a. pg_dump -Fc -Z0 > /dev/null                    the floor: dr cannot be faster
#   b. pg_dump -Fc -Z0 | zstd -3 -T0 | age -r KEY     what an admin would script by hand
#   c. dr backup (file:// repository)                 the same pipeline, in process
# and prints median wall times, ratios to (a), stored sizes and dr's peak RSS; with DOUBLE=1 it
# then doubles the database and shows dr's peak RSS does not grow with it. The results are
# appended to bench/RESULTS.md.
#
#   SIZE_GB=1 RUNS=5 bench/backup.sh
#
# Environment: SIZE_GB (default 1, fractions allowed), RUNS (default 5), BUILD (default 1;
# 0 uses the existing target/release/dr), DOUBLE (default 1 when SIZE_GB >= 1, else 0),
# KEEP=1 keeps the temporary directory (the database is still stopped), TMPDIR (where the
# cluster, dumps and repository go: needs about 3 × SIZE_GB free, 5 × with DOUBLE=1).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
pg_bin=/usr/lib/postgresql/15/bin
dr="$root/target/release/dr"

SIZE_GB="${SIZE_GB:-1}"
RUNS="${RUNS:-5}"
BUILD="${BUILD:-1}"
KEEP="${KEEP:-0}"
if [ -z "${DOUBLE:-}" ]; then
    DOUBLE=$(awk -v s="$SIZE_GB" 'BEGIN { print (s >= 1) ? 1 : 0 }')
fi

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------
# Arithmetic helpers (bash has integers only).

# Median of the numbers on stdin (mean of the two middle ones for an even count).
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
max() { sort -g | tail -n 1; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
kib_to_mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
human() { awk -v b="$1" 'BEGIN { if (b >= 1073741824) printf "%.2f GiB", b / 1073741824; else printf "%.1f MiB", b / 1048576 }'; }
ratio() { awk -v x="$1" -v y="$2" 'BEGIN { printf "%.2f", x / y }'; }

# ---------------------------------------------------------------------------------------------
# Prerequisites: everything comes from Debian's packages, installed only when missing.

apt_install() {
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    log "installing $* from Debian"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

ensure_tools() {
    local missing=()
    [ -x "$pg_bin/initdb" ] || missing+=(postgresql-15)
    [ -x /usr/bin/time ] || missing+=(time) # the bash keyword cannot report max RSS
    command -v zstd >/dev/null || missing+=(zstd)
    command -v age >/dev/null || missing+=(age)
    command -v jq >/dev/null || missing+=(jq)
    if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi
}

build_dr() {
    if [ "$BUILD" = 1 ]; then
        log "building dr (cargo build --release -p dr-agent)"
        (cd "$root" && cargo build --release --quiet -p dr-agent)
    fi
    [ -x "$dr" ] || die "$dr does not exist; run with BUILD=1"
}

# ---------------------------------------------------------------------------------------------
# The throwaway PostgreSQL cluster.

as_pg=()
tmp=""
pg_started=0

cleanup() {
    local status=$?
    if [ "$pg_started" = 1 ]; then
        "${as_pg[@]}" "$pg_bin/pg_ctl" -D "$tmp/pg/data" -m immediate stop >/dev/null 2>&1 || true
    fi
    if [ -n "$tmp" ]; then
        if [ "$KEEP" = 1 ]; then log "kept $tmp"; else rm -rf "$tmp"; fi
    fi
    exit "$status"
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

start_postgres() {
    tmp="$(mktemp -d "${TMPDIR:-/tmp}/dr-bench.XXXXXX")"
    chmod 755 "$tmp" # the postgres user must reach its data directory inside
    mkdir "$tmp/pg"
    if [ "$(id -u)" = 0 ]; then
        # initdb refuses to run as root: the cluster belongs to the postgres system user.
        chown postgres: "$tmp/pg"
        as_pg=(runuser -u postgres --)
    fi
    port=$(free_port)
    log "starting PostgreSQL 15 on 127.0.0.1:$port in $tmp/pg"
    # Trust auth is fine: the server listens on loopback only and lives for this run.
    "${as_pg[@]}" "$pg_bin/initdb" -D "$tmp/pg/data" -U postgres --auth=trust --no-locale -E UTF8 >/dev/null
    pg_started=1
    # fsync=off: durability is irrelevant here and it makes loading the data much faster.
    "${as_pg[@]}" "$pg_bin/pg_ctl" -D "$tmp/pg/data" -l "$tmp/pg/log" -w -o \
        "-p $port -k $tmp/pg -c listen_addresses=127.0.0.1 -c fsync=off -c shared_buffers=256MB" \
        start >/dev/null
    db_url="postgres://postgres@127.0.0.1:$port/bench"
    "$pg_bin/psql" -X -q -h 127.0.0.1 -p "$port" -U postgres -c "create database bench"
}

psql_bench() { "$pg_bin/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d bench "$@"; }
db_size() { psql_bench -At -c "select pg_database_size('bench')"; }

# ---------------------------------------------------------------------------------------------
# Test data. One "unit" is a customer with 3 orders, 4 events and, every 10th, an 8 KiB random
# attachment, so every table and index grows in step. The text is partly repetitive (names,
# statuses, lorem ipsum, JSON keys) and partly md5 hex, which compresses about like real
# application data; the random bytea (about a fifth of the database) carries no redundancy at
# all (pg_dump writes it as hex, so zstd only halves it).

create_schema() {
    psql_bench <<'SQL'
create table customers (
    id bigint primary key, name text not null, email text not null, country text not null,
    created_at timestamptz not null, balance numeric(14,2) not null, notes text);
create table orders (
    id bigint primary key, customer_id bigint not null references customers, status text not null,
    total numeric(12,2) not null, placed_at timestamptz not null, items jsonb not null);
create table events (
    id bigint primary key, customer_id bigint not null, kind text not null,
    occurred_at timestamptz not null, payload text not null, props jsonb not null);
create table attachments (
    id bigint primary key, customer_id bigint not null, filename text not null,
    content bytea not null);
create index on customers (email);
create index on orders (customer_id);
create index on orders (placed_at);
create index on events (customer_id, occurred_at);
create index on events (kind);
SQL
}

# Adds units first+1 .. first+n.
insert_units() {
    local first=$1 n=$2
    psql_bench -v first="$first" -v n="$n" <<'SQL'
begin;
insert into customers
select g,
       'Customer ' || (g % 5000),
       'user' || g || '@' || (array['example.com', 'mail.test', 'corp.invalid'])[1 + g % 3],
       (array['DE', 'FR', 'US', 'GB', 'NL', 'SE', 'PL', 'ES'])[1 + g % 8],
       timestamptz '2020-01-01 00:00:00+00' + g * interval '37 seconds',
       round((random() * 100000)::numeric, 2),
       repeat('lorem ipsum dolor sit amet ', 1 + g % 4) || md5(g::text)
from generate_series(:first + 1, :first + :n) g;

insert into orders
select o, 1 + (o - 1) / 3,
       (array['new', 'paid', 'shipped', 'delivered', 'returned'])[1 + o % 5],
       round((random() * 2000)::numeric, 2),
       timestamptz '2020-01-01 00:00:00+00' + o * interval '13 seconds',
       jsonb_build_object(
           'channel', (array['web', 'app', 'store'])[1 + o % 3],
           'ref', md5(o::text),
           'lines', jsonb_build_array(
               jsonb_build_object('sku', 'SKU-' || (o % 1000), 'qty', 1 + o % 5, 'price', (o % 997) * 0.75),
               jsonb_build_object('sku', 'SKU-' || (o % 731), 'qty', 1 + o % 3, 'price', (o % 389) * 1.25)))
from generate_series(3 * :first + 1, 3 * (:first + :n)) o;

insert into events
select e, 1 + (e - 1) / 4,
       (array['login', 'view', 'search', 'add_to_cart', 'checkout', 'logout'])[1 + e % 6],
       timestamptz '2020-01-01 00:00:00+00' + e * interval '7 seconds',
       'session=' || md5(random()::text) || ' path=/shop/item/' || (e % 2000) || ' agent=Mozilla/5.0 (X11; Linux x86_64)',
       jsonb_build_object('ip', '10.' || (e % 256) || '.' || (e / 256 % 256) || '.1',
                          'ok', e % 17 <> 0, 'ms', e % 900)
from generate_series(4 * :first + 1, 4 * (:first + :n)) e;

-- 512 md5s decoded = 8 KiB of random bytes. Referring to a makes the subquery run per row
-- (not once for all), and to i keeps string_agg an aggregate of the subquery.
insert into attachments
select a, a * 10, 'scan-' || a || '.bin',
       (select decode(string_agg(md5(random()::text || i || a), ''), 'hex') from generate_series(1, 512) i)
from generate_series(:first / 10 + 1, (:first + :n) / 10) a;
commit;
SQL
}

# Adds units until the database holds at least $1 bytes, in chunks of about 1/8 of the way
# (4 to 64 MiB), each sized from how much the previous one grew the database.
grow_to() {
    local target=$1 units size before chunk_bytes n=2000
    units=$(psql_bench -At -c "select coalesce(max(id), 0) from customers")
    size=$(db_size)
    chunk_bytes=$(( (target - size) / 8 ))
    [ "$chunk_bytes" -le $((64 << 20)) ] || chunk_bytes=$((64 << 20))
    [ "$chunk_bytes" -ge $((4 << 20)) ] || chunk_bytes=$((4 << 20))
    while [ "$size" -lt "$target" ]; do
        # Multiples of 10 keep every 10th customer's attachment in step.
        n=$(( (n + 9) / 10 * 10 ))
        before=$size
        insert_units "$units" "$n"
        units=$((units + n))
        size=$(db_size)
        # Progress on one line on a terminal; no noise in a log file.
        if [ -t 2 ]; then printf '\r    %s of %s' "$(human "$size")" "$(human "$target")" >&2; fi
        n=$(( n * chunk_bytes / (size - before + 1) ))
        [ "$n" -ge 100 ] || n=100
    done
    if [ -t 2 ]; then printf '\n' >&2; fi
    # Frozen, analyzed and checkpointed: pg_dump runs then read clean pages and no run pays for
    # setting hint bits or for a checkpoint the load left behind.
    psql_bench -c "vacuum (freeze, analyze)" -c "checkpoint"
}

dump_size() { "$pg_bin/pg_dump" -Fc -Z0 -d "$db_url" | wc -c; }

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
TOML
}

# ---------------------------------------------------------------------------------------------
# Measuring. Each run appends "wall_seconds max_rss_kib" to $tmp/<name>.times. GNU time's %M is
# the largest RSS of the process and of the children it reaped (the kernel reports the
# maximum), so for dr it covers pg_dump too, and for the shell pipeline its largest member.

timed() {
    local name=$1
    shift
    if ! /usr/bin/time -f '%e %M' -o "$tmp/time.out" "$@"; then
        echo "$name failed: $(head -n 1 "$tmp/time.out")" >&2
        return 1
    fi
    tail -n 1 "$tmp/time.out" >>"$tmp/$name.times"
}

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

# $1 names the series: dr at the main size, dr2x after DOUBLE.
run_dr() {
    local name=${1:-dr}
    if ! timed "$name" "$dr" --config "$config" --log-format json backup >/dev/null 2>"$tmp/dr.log"; then
        echo "dr backup failed; its log:" >&2
        cat "$tmp/dr.log" >&2
        exit 1
    fi
    local stored
    stored=$("$dr" --config "$config" --log-format json list --json 2>>"$tmp/dr.log" | jq '.[-1].stored_bytes')
    if [ "$name" = dr ]; then dr_bytes=$stored; fi
    # Only the newest backup matters; removing it keeps the disk from filling over the runs.
    rm -rf "$tmp/repo/bench/bench/backups"
}

last() { tail -n 1 "$tmp/$1.times" | cut -d' ' -f1; }

run_rounds() {
    local round order cmd
    for round in $(seq 1 "$RUNS"); do
        # Rotating the order as well as alternating spreads cache and thermal drift evenly.
        case $(( (round - 1) % 3 )) in
            0) order="pg_dump shell dr" ;;
            1) order="shell dr pg_dump" ;;
            *) order="dr pg_dump shell" ;;
        esac
        for cmd in $order; do "run_$cmd"; done
        log "round $round/$RUNS: pg_dump $(last pg_dump)s, shell $(last shell)s, dr $(last dr)s"
    done
}

# Column $2 (1 = wall seconds, 2 = RSS KiB) of series $1.
col() { cut -d' ' -f"$2" "$tmp/$1.times"; }

# ---------------------------------------------------------------------------------------------
# Reporting.

machine() {
    local cpu mem
    cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
    mem=$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
    echo "$(nproc) cores (${cpu:-unknown CPU}), $mem memory, Linux $(uname -r)"
}

dr_commit() {
    local c
    c=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
    if [ -n "$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
        c="$c (with uncommitted changes)"
    fi
    echo "$c"
}

pass() { awk -v x="$1" -v lim="$2" 'BEGIN { print (x <= lim) ? "PASS" : "FAIL" }'; }

report() {
    local a b c ra rb rc dr_rss_med dr_rss_max
    a=$(col pg_dump 1 | median)
    b=$(col shell 1 | median)
    c=$(col dr 1 | median)
    ra=$(kib_to_mib "$(col pg_dump 2 | median)")
    rb=$(kib_to_mib "$(col shell 2 | median)")
    rc=$(kib_to_mib "$(col dr 2 | median)")
    dr_rss_med=$rc
    dr_rss_max=$(kib_to_mib "$(col dr 2 | max)")
    cat <<EOF
## $(date -u '+%Y-%m-%d %H:%M UTC') — SIZE_GB=$SIZE_GB, RUNS=$RUNS

- machine: $(machine)
- pg_dump: $("$pg_bin/pg_dump" --version)
- dr commit: $(dr_commit)
- database: pg_database_size $(human "$db_bytes"), \`pg_dump -Fc -Z0\` $(human "$raw_bytes")

| command | median wall | × pg_dump | median peak RSS | stored |
|---|---:|---:|---:|---:|
| a. \`pg_dump -Fc -Z0 > /dev/null\` | ${a} s | 1.00 | ${ra} MiB | — |
| b. \`pg_dump -Fc -Z0 \| zstd -3 -T0 \| age\` | ${b} s | $(ratio "$b" "$a") | ${rb} MiB | $(human "$shell_bytes") |
| c. \`dr backup\` (file://) | ${c} s | $(ratio "$c" "$a") | ${rc} MiB | $(human "$dr_bytes") |

Wall times per run (s): pg_dump $(col pg_dump 1 | xargs), shell $(col shell 1 | xargs), dr $(col dr 1 | xargs).

Targets: dr ≤ 1.10× pg_dump alone: $(ratio "$c" "$a")× $(pass "$(ratio "$c" "$a")" 1.10); \
dr peak RSS ≤ 64 MiB: median ${dr_rss_med} MiB, max ${dr_rss_max} MiB $(pass "$dr_rss_max" 64).
EOF
    if [ "$DOUBLE" = 1 ]; then
        echo
        echo "Database doubled to pg_database_size $(human "$db2_bytes") (\`pg_dump -Fc -Z0\` $(human "$raw2_bytes")):" \
            "dr backup $(col dr2x 1 | xargs) s;" \
            "peak RSS at 1x: ${dr_rss_max} MiB, at 2x: $(kib_to_mib "$(col dr2x 2 | max)") MiB (max of runs)."
    fi
}

append_results() {
    local file="$root/bench/RESULTS.md"
    if [ ! -f "$file" ]; then
        cat >"$file" <<'EOF'
# Backup benchmark results

Produced by `bench/backup.sh` (see bench/README.md); each run appends a section. Run it on a
quiet machine:

```sh
SIZE_GB=1 RUNS=5 bench/backup.sh
```
EOF
    fi
    { echo; cat "$1"; } >>"$file"
    log "appended to $file"
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
    target=$(awk -v s="$SIZE_GB" 'BEGIN { printf "%d", s * 1073741824 }')
    log "generating at least $(human "$target") of data"
    create_schema
    grow_to "$target"
    db_bytes=$(db_size)
    # Also warms the page cache, so the first measured run is not the only cold one.
    raw_bytes=$(dump_size)
    log "pg_database_size $(human "$db_bytes"), pg_dump -Fc -Z0 $(human "$raw_bytes")"

    setup_dr
    run_rounds

    if [ "$DOUBLE" = 1 ]; then
        log "doubling the database to measure dr's memory at 2x"
        grow_to $((2 * db_bytes))
        db2_bytes=$(db_size)
        raw2_bytes=$(dump_size)
        run_dr dr2x
        run_dr dr2x
    fi

    report >"$tmp/report.md"
    echo
    cat "$tmp/report.md"
    echo
    append_results "$tmp/report.md"
}

main "$@"
