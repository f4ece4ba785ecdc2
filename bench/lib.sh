# shellcheck shell=bash
# Shared helpers for the benchmarks (backup.sh, restore.sh): prerequisites, a throwaway
# PostgreSQL 15 cluster, the test-data generator, a throwaway Garage S3 server, timing and
# reporting. Sourced, not run. The sourcing script sets SIZE_GB, RUNS, BUILD and KEEP first.

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pg_bin=/usr/lib/postgresql/15/bin
dr="${DR_BIN:-$root/target/release/dr}" # DR_BIN: benchmark another build (BUILD=0)

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
    command -v curl >/dev/null || missing+=(curl) # restore.sh's S3 download
    if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi
}

build_dr() {
    if [ "$BUILD" = 1 ] && [ -n "${DR_BIN:-}" ]; then die "DR_BIN is set: run with BUILD=0"; fi
    if [ "$BUILD" = 1 ]; then
        log "building dr (cargo build --release -p dr-agent)"
        (cd "$root" && cargo build --release --quiet -p dr-agent)
    fi
    [ -x "$dr" ] || die "$dr does not exist; run with BUILD=1"
    dr_built=$(date -u -r "$dr" '+%Y-%m-%d %H:%M UTC')
}

# ---------------------------------------------------------------------------------------------
# The throwaway PostgreSQL cluster.

as_pg=()
tmp=""
pg_started=0

cleanup() {
    local status=$?
    stop_garage
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
        "-p $port -k $tmp/pg -c listen_addresses=127.0.0.1 -c fsync=off -c shared_buffers=256MB ${PG_OPTS:-}" \
        start >/dev/null
    db_url="postgres://postgres@127.0.0.1:$port/bench"
    "$pg_bin/psql" -X -q -h 127.0.0.1 -p "$port" -U postgres -c "create database bench"
}

psql_bench() { "$pg_bin/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d bench "$@"; }
db_size() { psql_bench -At -c "select pg_database_size('bench')"; }
# The largest table's share of the database, in percent (DOMINANT=1 makes it about 80).
largest_share() {
    psql_bench -At -c "select round(100.0 * max(pg_total_relation_size(c.oid)) / pg_database_size('bench'))
        from pg_class c join pg_namespace n on n.oid = c.relnamespace
        where c.relkind = 'r' and n.nspname = 'public'"
}

# ---------------------------------------------------------------------------------------------
# A throwaway single-node Garage S3 server in $tmp/garage (as tests/src/garage.rs sets it up),
# with one bucket ($s3_bucket) and one key ($s3_key_id, $s3_secret) allowed on it, reachable at
# http://127.0.0.1:$s3_port. cleanup stops it; its data goes with $tmp.

garage_bin="${DR_GARAGE_BIN:-${DR_TEST_CACHE:-$HOME/.cache/dr-tests}/garage/bin/garage}"
garage_pid=""
s3_bucket="dr-bench"

random_hex() { head -c "$1" /dev/urandom | od -An -tx1 | tr -d ' \n'; }
garage_cli() { RUST_LOG=warn "$garage_bin" -c "$tmp/garage/garage.toml" "$@" </dev/null; }

# curl signs S3 requests itself (SigV4); Garage insists on the payload hash header. Query
# strings must be in canonical form (sorted, '/' as %2F) or the signature does not match.
s3_curl() {
    curl -sS --fail --aws-sigv4 "aws:amz:garage:s3" --user "$s3_key_id:$s3_secret" \
        -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" "$@"
}
s3_url() { echo "http://127.0.0.1:$s3_port/$s3_bucket$1"; }

# Runs the garage CLI until it succeeds (the server needs a moment after it listens), for at
# most 30 s; prints its output.
garage_retry() {
    local out
    for _ in $(seq 1 60); do
        if out=$(garage_cli "$@" 2>&1); then
            echo "$out"
            return 0
        fi
        sleep 0.5
    done
    echo "$out" >&2
    die "garage $* kept failing; log: $tmp/garage/log"
}

start_garage() {
    [ -x "$garage_bin" ] || die "no Garage at $garage_bin (set DR_GARAGE_BIN; scripts/test.sh installs it)"
    local dir="$tmp/garage" rpc_port admin_port node key_info
    mkdir -p "$dir"
    s3_port=$(free_port)
    rpc_port=$(free_port)
    admin_port=$(free_port)
    cat >"$dir/garage.toml" <<TOML
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "sqlite"
metadata_fsync = false
data_fsync = false
replication_factor = 1

rpc_bind_addr = "127.0.0.1:$rpc_port"
rpc_public_addr = "127.0.0.1:$rpc_port"
rpc_secret = "$(random_hex 32)"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$s3_port"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$admin_port"
admin_token = "$(random_hex 32)"
metrics_token = "$(random_hex 32)"
TOML
    log "starting Garage $("$garage_bin" --version 2>/dev/null | awk '{ print $2 }') on 127.0.0.1:$s3_port in $dir"
    RUST_LOG=garage=warn "$garage_bin" -c "$dir/garage.toml" server </dev/null >"$dir/log" 2>&1 &
    garage_pid=$!
    for _ in $(seq 1 60); do
        kill -0 "$garage_pid" 2>/dev/null || { cat "$dir/log" >&2; die "Garage exited"; }
        if (exec 3<>"/dev/tcp/127.0.0.1/$s3_port") 2>/dev/null; then break; fi
        sleep 0.5
    done
    node=$(garage_retry node id -q | tail -n 1)
    node=${node%%@*}
    garage_retry layout assign -z dc1 -c 1G "$node" >/dev/null
    garage_retry layout apply --version 1 >/dev/null
    key_info=$(garage_retry key create dr-bench-key)
    s3_key_id=$(awk -F: '$1 ~ /^Key ID/ { sub(/^[^:]*:[ \t]*/, ""); print; exit }' <<<"$key_info")
    s3_secret=$(awk -F: '$1 ~ /^Secret key/ { sub(/^[^:]*:[ \t]*/, ""); print; exit }' <<<"$key_info")
    if [ -z "$s3_key_id" ] || [ -z "$s3_secret" ]; then die "no Key ID / Secret key in: $key_info"; fi
    garage_retry bucket create "$s3_bucket" >/dev/null
    garage_retry bucket allow --read --write --owner "$s3_bucket" --key "$s3_key_id" >/dev/null
    # Garage answers before the layout has reached its tables: wait for a real S3 request.
    for _ in $(seq 1 60); do
        if s3_curl -o /dev/null "$(s3_url "/?list-type=2")" 2>/dev/null; then return 0; fi
        sleep 0.5
    done
    s3_curl -o /dev/null "$(s3_url "/?list-type=2")" || die "Garage's S3 API is not answering; log: $dir/log"
}

stop_garage() {
    if [ -n "$garage_pid" ]; then
        kill "$garage_pid" 2>/dev/null || true
        wait "$garage_pid" 2>/dev/null || true
        garage_pid=""
    fi
}

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

# Adds units first+1 .. first+n. DOMINANT=1 gives every unit 16 times as many attachments,
# so that one table holds about 80 % of the data (the case a split by table cannot help).
insert_units() {
    local first=$1 n=$2 per10=1
    if [ "${DOMINANT:-0}" = 1 ]; then per10=16; fi
    psql_bench -v first="$first" -v n="$n" -v per10="$per10" <<'SQL'
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
select a, a * 10 / :per10, 'scan-' || a || '.bin',
       (select decode(string_agg(md5(random()::text || i || a), ''), 'hex') from generate_series(1, 512) i)
from generate_series(:first * :per10 / 10 + 1, (:first + :n) * :per10 / 10) a;
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

last() { tail -n 1 "$tmp/$1.times" | cut -d' ' -f1; }

col() { cut -d' ' -f"$2" "$tmp/$1.times"; }

# ---------------------------------------------------------------------------------------------
# Reporting.

machine() {
    local cpu mem
    cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
    mem=$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
    echo "$(nproc) cores (${cpu:-unknown CPU}), $mem memory, Linux $(uname -r)"
}

# The 1, 5 and 15 minute load averages, to show whether something else shared the cores.
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

# The checked-out commit; the binary's build time says whether it matches.
dr_commit() {
    local c
    c=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
    if [ -n "$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
        c="$c (with uncommitted changes)"
    fi
    echo "$c; binary $dr built $dr_built"
}

pass() { awk -v x="$1" -v lim="$2" 'BEGIN { print (x <= lim) ? "PASS" : "FAIL" }'; }

# The [storage] section for the Garage started by start_garage.
garage_storage_toml() {
    cat <<TOML
[storage]
url = "s3://$s3_bucket/bench"
endpoint = "http://127.0.0.1:$s3_port"
region = "garage"
path_style = true
TOML
}

# Prints the script's `report` and appends it to RESULTS.md.
publish_report() {
    report >"$tmp/report.md"
    echo
    cat "$tmp/report.md"
    echo
    append_results "$tmp/report.md"
}

append_results() {
    local file="$root/bench/RESULTS.md"
    if [ ! -f "$file" ]; then
        cat >"$file" <<'EOF'
# Benchmark results

Produced by `bench/backup.sh` and `bench/restore.sh` (see bench/README.md); each run appends
a section. Run them on a quiet machine:

```sh
SIZE_GB=1 RUNS=5 bench/backup.sh
SIZE_GB=1 RUNS=3 bench/restore.sh
```
EOF
    fi
    { echo; cat "$1"; } >>"$file"
    log "appended to $file"
}
