#!/usr/bin/env bash
# Continuous-capture benchmark: what capture costs the source, how far behind it runs, what
# it costs dr, and how long a restore to "latest" takes against a plain restore.
#
# Starts a throwaway PostgreSQL 15 with wal_level = logical, initializes pgbench (SCALE), then:
#   a. pgbench unthrottled for LOAD_SECONDS, capture off          the source's TPS alone
#   a2. pgbench at RATE tps for RATE_SECONDS, capture off          the server's CPU per transaction
#       alone: with c, what capture costs a source on its own host, where TPS at saturation
#       follows CPU per transaction (a and b share two cores with pgbench and dr, so their
#       TPS difference is mostly contention)
#   b. dr continuous setup, dr backup (the base), dr agent (segment_seconds = SEGMENT)
#      pgbench unthrottled for LOAD_SECONDS, capture on            the source's TPS with it,
#      and how long capture needs to catch up once the load stops (does it sustain that rate?)
#   c. pgbench at RATE tps for RATE_SECONDS, capture on           lag per segment (first commit
#      in a segment to its manifest being stored), the agent's CPU and RSS every second
#   d. dr restore --to-time latest against dr restore --latest (the base alone), both into
#      new databases
# The results are appended to bench/RESULTS.md.
#
#   bench/continuous.sh                          # defaults below, about 6 minutes
#
# Environment: SCALE (default 10), LOAD_SECONDS (default 60), RATE (default 200),
# RATE_SECONDS (default 180), SEGMENT (default 30), CLIENTS (default 4), BUILD (default 1; 0
# uses the existing target/release/dr), KEEP=1 keeps the temporary directory, PIN=1 puts the
# server and pgbench on CPU 0 and dr on CPU 1: the source and dr as on two hosts (in
# production dr runs beside the app, not on the managed database), so a and b differ only
# by what capture costs the source itself (the walsender's decoding).
set -euo pipefail

# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "$0")/lib.sh"

SCALE="${SCALE:-10}"
LOAD_SECONDS="${LOAD_SECONDS:-60}"
RATE="${RATE:-200}"
RATE_SECONDS="${RATE_SECONDS:-180}"
SEGMENT="${SEGMENT:-30}"
CLIENTS="${CLIENTS:-4}"
BUILD="${BUILD:-1}"
KEEP="${KEEP:-0}"
PIN="${PIN:-0}"
RUNS=1
SIZE_GB=0
PG_OPTS="-c wal_level=logical -c max_replication_slots=4 -c max_wal_senders=4"
agent_pid=""
src_cpu=()
dr_cpu=()
if [ "$PIN" = 1 ]; then
    src_cpu=(taskset -c 0)
    dr_cpu=(taskset -c 1)
fi

# PIN=1: every server process on CPU 0; backends forked later inherit it from the postmaster.
pin_server() {
    [ "$PIN" = 1 ] || return 0
    local pm
    pm=$(head -n 1 "$tmp/pg/data/postmaster.pid")
    for p in "$pm" $(pgrep -P "$pm"); do taskset -a -p -c 0 "$p" >/dev/null; done
}

stop_agent() {
    if [ -n "$agent_pid" ]; then
        kill -TERM "$agent_pid" 2>/dev/null || true
        wait "$agent_pid" 2>/dev/null || true
        agent_pid=""
    fi
}

pgbench_tps() { # seconds, extra args...
    local secs=$1
    shift
    "${src_cpu[@]}" "$pg_bin/pgbench" -n -h 127.0.0.1 -p "$port" -U postgres -c "$CLIENTS" -j 2 -T "$secs" "$@" bench 2>&1 |
        tee -a "$tmp/pgbench.log" | awk '/^tps = / { print $3; exit }'
}

# CPU ticks the whole server has used: the postmaster with its reaped children (pgbench's and
# capture's sessions end before we look) and the children still running.
server_ticks() {
    local pm
    pm=$(head -n 1 "$tmp/pg/data/postmaster.pid")
    {
        awk '{ print $14 + $15 + $16 + $17 }' "/proc/$pm/stat"
        for c in $(pgrep -P "$pm"); do awk '{ print $14 + $15 }' "/proc/$c/stat" 2>/dev/null || true; done
    } | awk '{ s += $1 } END { print s }'
}

# Server CPU milliseconds per transaction over a rate-limited pgbench run of $2 seconds, from
# ticks $1 (before) to now.
cpu_ms_per_txn() {
    awk -v a="$1" -v b="$(server_ticks)" -v hz="$(getconf CLK_TCK)" -v n="$((RATE * $2))" \
        'BEGIN { printf "%.3f", 1000 * (b - a) / hz / n }'
}

# Seconds since the epoch, with fractions, of an RFC 3339 time (GNU date).
epoch() { date -u -d "$1" +%s.%N; }

# The newest committed segment's covered_until, as seconds since the epoch (0 without one).
# A segment being written has no manifest yet.
covered_epoch() {
    local newest
    newest=$(find "$tmp/repo/bench/bench/changes" -name manifest.json 2>/dev/null | sort | tail -n 1)
    if [ -z "$newest" ]; then echo 0; return; fi
    epoch "$(jq -r .covered_until "$newest")"
}

main() {
    trap 'stop_agent; cleanup' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    ensure_tools
    build_dr
    start_postgres
    pin_server
    log "pgbench -i -s $SCALE"
    "$pg_bin/pgbench" -i -q -s "$SCALE" -h 127.0.0.1 -p "$port" -U postgres bench >/dev/null 2>&1
    local load_before
    load_before=$(loadavg)

    log "a. pgbench ${LOAD_SECONDS}s unthrottled, capture off"
    local tps_off
    tps_off=$(pgbench_tps "$LOAD_SECONDS")

    log "a2. pgbench at $RATE tps for ${RATE_SECONDS}s, capture off; server CPU"
    local ticks0 cpu_off cpu_on
    # Phase a's backends must have exited and been reaped first, or their CPU lands here.
    sleep 3
    ticks0=$(server_ticks)
    pgbench_tps "$RATE_SECONDS" -R "$RATE" >/dev/null
    sleep "$((SEGMENT + 5))"
    cpu_off=$(cpu_ms_per_txn "$ticks0" "$RATE_SECONDS")

    recipient=$("$dr" keygen --output "$tmp/id.txt" 2>/dev/null)
    local agent_port
    agent_port=$(free_port)
    cat >"$tmp/dr.toml" <<TOML
environment = "bench"

[storage]
url = "file://$tmp/repo"

[encryption]
recipients = ["$recipient"]
identity_file = "$tmp/id.txt"

[agent]
listen = "127.0.0.1:$agent_port"

[[databases]]
name = "bench"
url = "$db_url"

  [databases.continuous]
  segment_seconds = $SEGMENT
  replica_identity_full = ["public.pgbench_history"]
TOML
    "${dr_cpu[@]}" "$dr" -c "$tmp/dr.toml" continuous setup --database bench >/dev/null
    "${dr_cpu[@]}" "$dr" -c "$tmp/dr.toml" backup --database bench >/dev/null 2>&1
    "${dr_cpu[@]}" "$dr" -c "$tmp/dr.toml" --log-format json agent 2>"$tmp/agent.log" &
    agent_pid=$!
    sleep 2

    log "b. pgbench ${LOAD_SECONDS}s unthrottled, capture on"
    local tps_on load_end caught_up
    tps_on=$(pgbench_tps "$LOAD_SECONDS")
    load_end=$(date -u +%s.%N)
    local waited=0
    while awk -v c="$(covered_epoch)" -v e="$load_end" 'BEGIN { exit !(c < e) }'; do
        sleep 1
        waited=$((waited + 1))
        [ "$waited" -lt 900 ] || break
    done
    caught_up=$(awk -v n="$(date -u +%s.%N)" -v e="$load_end" 'BEGIN { printf "%.0f", n - e }')
    local changes_b
    # Segments being written have no manifest yet: only committed ones count.
    changes_b=$(find "$tmp/repo/bench/bench/changes" -name manifest.json -print0 |
        xargs -0 jq -s '[.[].transactions] | add')

    log "c. pgbench at $RATE tps for ${RATE_SECONDS}s, capture on; sampling the agent"
    local ticks_before ticks_after hz
    hz=$(getconf CLK_TCK)
    ticks_before=$(awk '{ print $14 + $15 }' "/proc/$agent_pid/stat")
    local seg_before
    seg_before=$(ls -1 "$tmp/repo/bench/bench/changes" | wc -l)
    sleep 3
    ticks0=$(server_ticks)
    : >"$tmp/rss"
    (while kill -0 "$agent_pid" 2>/dev/null; do awk '/^VmRSS/ { print $2 }' "/proc/$agent_pid/status" >>"$tmp/rss"; sleep 1; done) &
    local sampler=$!
    pgbench_tps "$RATE_SECONDS" -R "$RATE" >/dev/null
    sleep "$((SEGMENT + 5))"
    ticks_after=$(awk '{ print $14 + $15 }' "/proc/$agent_pid/stat")
    cpu_on=$(cpu_ms_per_txn "$ticks0" "$RATE_SECONDS")
    kill "$sampler" 2>/dev/null || true
    local cpu_pct hwm rss_first rss_last rss_max
    cpu_pct=$(awk -v a="$ticks_before" -v b="$ticks_after" -v hz="$hz" -v s="$((RATE_SECONDS + SEGMENT + 5))" \
        'BEGIN { printf "%.1f", 100 * (b - a) / hz / s }')
    hwm=$(awk '/^VmHWM/ { print $2 }' "/proc/$agent_pid/status")
    rss_first=$(head -n 10 "$tmp/rss" | max)
    rss_last=$(tail -n 10 "$tmp/rss" | max)
    rss_max=$(max <"$tmp/rss")
    # Lag per segment of phase c: manifest stored (its mtime) minus the segment's first and
    # last commit. Every commit's lag lies between the two.
    ls -1 "$tmp/repo/bench/bench/changes" | sort | tail -n "+$((seg_before + 1))" | while read -r seg; do
        local m="$tmp/repo/bench/bench/changes/$seg/manifest.json"
        [ "$(jq -r .transactions "$m")" != 0 ] || continue
        local stored
        stored=$(stat -c %.Y "$m")
        awk -v s="$stored" -v f="$(epoch "$(jq -r .first_commit_at "$m")")" -v l="$(epoch "$(jq -r .last_commit_at "$m")")" \
            'BEGIN { printf "%.2f %.2f\n", s - f, s - l }'
    done >"$tmp/lags"
    local segs lag_p50 lag_p99 lag_min
    segs=$(wc -l <"$tmp/lags")
    lag_p50=$(cut -d' ' -f1 "$tmp/lags" | median)
    lag_p99=$(cut -d' ' -f1 "$tmp/lags" | sort -g | awk '{ v[NR] = $1 } END { i = int(NR * 0.99 + 0.999); if (i < 1) i = 1; print v[i] }')
    lag_min=$(cut -d' ' -f2 "$tmp/lags" | sort -g | head -n 1)
    stop_agent

    log "d. restore to latest against the base alone"
    timed pitr "${dr_cpu[@]}" "$dr" -c "$tmp/dr.toml" restore --database bench --to-time latest \
        --target "postgres://postgres@127.0.0.1:$port/pitr" --create --json >"$tmp/pitr.json"
    timed plain "${dr_cpu[@]}" "$dr" -c "$tmp/dr.toml" restore --database bench --latest \
        --target "postgres://postgres@127.0.0.1:$port/plain" --create --json >"$tmp/plain.json"
    local replayed
    replayed=$(jq .replay.transactions "$tmp/pitr.json")
    local load_after
    load_after=$(loadavg)

    local drop
    drop=$(awk -v a="$tps_off" -v b="$tps_on" 'BEGIN { printf "%.1f", 100 * (a - b) / a }')
    cat >"$tmp/results.md" <<MD
## $(date -u '+%Y-%m-%d %H:%M UTC') — continuous.sh, SCALE=$SCALE, LOAD_SECONDS=$LOAD_SECONDS, RATE=$RATE, RATE_SECONDS=$RATE_SECONDS, SEGMENT=$SEGMENT

- machine: $(machine)
- dr commit: $(dr_commit)
- pgbench: TPC-B-like, $CLIENTS clients; $(if [ "$PIN" = 1 ]; then echo "PIN=1: the server and pgbench on CPU 0, dr on CPU 1 (as on two hosts)"; else echo "the source and dr share the machine's two cores"; fi)
- load average (1/5/15 min) before: $load_before; after: $load_after

| measure | value | target |
|---|---:|---|
| source TPS, capture off / on (unthrottled, ${LOAD_SECONDS} s each) | $tps_off / $tps_on ($drop % lower) | ≤ 5 % lower: $(pass "$drop" 5) |
| source CPU per transaction at $RATE tps, capture off / on (all server processes, decoding included) | $cpu_off / $cpu_on ms ($(awk -v a="$cpu_off" -v b="$cpu_on" 'BEGIN { printf "%.1f", 100 * (b - a) / b }') % of it is capture: the TPS a dedicated, CPU-bound source loses) | ≤ 5 %: $(pass "$(awk -v a="$cpu_off" -v b="$cpu_on" 'BEGIN { printf "%.1f", 100 * (b - a) / b }')" 5) |
| capture caught up after the unthrottled load (≈ $(awk -v t="$tps_on" 'BEGIN { printf "%.0f", t * 5 }') row changes/s, $changes_b transactions) | $caught_up s after it stopped | sustains the rate if about one segment |
| lag at $RATE tps, first commit of a segment → stored: p50 / p99 ($segs segments) | $lag_p50 s / $lag_p99 s | p99 ≤ 60 s: $(pass "$lag_p99" 60) |
| lag, last commit of a segment → stored: best | $lag_min s | |
| agent CPU at $RATE tps | $cpu_pct % of one core | |
| agent RSS: first 10 s / last 10 s / max sampled / VmHWM | $(kib_to_mib "$rss_first") / $(kib_to_mib "$rss_last") / $(kib_to_mib "$rss_max") / $(kib_to_mib "$hwm") MiB | ≤ 64 MiB, flat: $(pass "$(kib_to_mib "$hwm")" 64) |
| restore to latest (base + $replayed transactions replayed) / the base alone | $(last pitr) s / $(last plain) s | |

MD
    cat "$tmp/results.md"
    append_results "$tmp/results.md"
}

main "$@"
