#!/usr/bin/env bash
# Agent scale check: one `dr agent` with N (default 100) configured databases, all due at the
# same instant every minute. How much memory and CPU does the agent take while it waits, and
# how far behind their scheduled time do the backups start when they all fire together?
#
# Starts a throwaway PostgreSQL 15 with N small databases db001..dbN (one 1000-row table
# each), writes a config with a file:// repository, max_concurrent_jobs = JOBS (default 4) and
# one schedule per database, `cron = "0 * * * * *"` (second 0 of every minute), and runs
# `dr agent` with JSON logs on stderr. Then:
#   1. catch-up: at start every database has no backup, so the agent backs each up at once
#      (RPO breached); the script waits until every database has a manifest;
#   2. idle: between two slots, samples the agent's RSS and CPU time once a second for
#      IDLE_SECONDS (default 30);
#   3. slots: DURATION (default 3) minute slots; from the "backup started" and "backup
#      complete" log lines, the delay of each start after the slot's second 0 (min, median,
#      p95, max) and when the slot's last backup completed; RSS sampled 4 times a second;
#   4. SIGTERM, and how long the agent takes to exit (limit 10 s).
# The results are appended to bench/RESULTS.md.
#
#   bench/agent-scale.sh                  # N=100 DURATION=3, about 5 minutes
#   N=5 DURATION=1 bench/agent-scale.sh   # smoke test
#
# Environment: N (default 100, at most 999), DURATION (minute slots, default 3), JOBS
# ([agent] max_concurrent_jobs, default 4), IDLE_SECONDS (default 30, at most 50), BUILD
# (default 1; 0 uses the existing target/release/dr), DR_BIN (another dr binary, with BUILD=0),
# KEEP=1 keeps the temporary directory (config, agent log, samples).
set -euo pipefail

# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "$0")/lib.sh"

N="${N:-100}"
DURATION="${DURATION:-3}"
JOBS="${JOBS:-4}"
IDLE_SECONDS="${IDLE_SECONDS:-30}"
BUILD="${BUILD:-1}"
KEEP="${KEEP:-0}"

agent_pid=""
clk_tck=$(getconf CLK_TCK)

# ---------------------------------------------------------------------------------------------
# Clock and /proc helpers, without forking where they run in sampling loops.

now_s() { echo "${EPOCHREALTIME%.*}"; }          # whole seconds since the epoch
now_f() { echo "$EPOCHREALTIME"; }               # with microseconds
iso() { date -u -d "@$1" '+%Y-%m-%dT%H:%M:%SZ'; } # epoch seconds -> UTC timestamp
hms() { date -u -d "@$1" '+%H:%M:%S'; }

# Sets rss_kib, hwm_kib and threads from /proc/$agent_pid/status (no fork).
read_status() {
    local key value _
    rss_kib=0 hwm_kib=0 threads=0
    while read -r key value _; do
        case $key in
            VmRSS:) rss_kib=$value ;;
            VmHWM:) hwm_kib=$value ;;
            Threads:) threads=$value ;;
        esac
    done <"/proc/$agent_pid/status"
}

# Sets cpu_self and cpu_children (clock ticks) from /proc/$agent_pid/stat: utime + stime of
# the agent, and cutime + cstime of the children it reaped (pg_dump, pg_dumpall, psql).
read_cpu() {
    local stat
    read -r stat <"/proc/$agent_pid/stat"
    stat=${stat##*) } # the fields after "(comm)"; field 3 of stat(5) is now the first
    # shellcheck disable=SC2086 # split into fields on purpose
    set -- $stat
    cpu_self=$(( ${12} + ${13} ))
    cpu_children=$(( ${14} + ${15} ))
}

# True while the agent process exists and is not a zombie.
agent_alive() {
    local stat
    [ -r "/proc/$agent_pid/stat" ] || return 1
    read -r stat <"/proc/$agent_pid/stat" 2>/dev/null || return 1
    stat=${stat##*) }
    [ "${stat%% *}" != Z ]
}

# Counts of log lines.
count_msg() { grep -c "\"message\":\"$1\"" "$tmp/agent.log" || true; }
started() { count_msg "backup started"; }
ended() {
    echo $(( $(count_msg "backup complete") + $(count_msg "backup failed; no backup was recorded") \
        + $(count_msg "backup aborted by shutdown; nothing was recorded") ))
}
in_flight() {
    local n
    n=$(( $(started) - $(ended) ))
    if [ "$n" -lt 0 ]; then n=0; fi
    echo "$n"
}
# Seconds since the agent last wrote a log line.
log_quiet() { echo $(( $(now_s) - $(stat -c %Y "$tmp/agent.log") )); }
# Databases that have at least one manifest in the repository.
databases_backed_up() {
    find "$tmp/repo" -name manifest.json | awk -F/ '{ print $(NF - 3) }' | sort -u | wc -l
}

# ---------------------------------------------------------------------------------------------
# Setup.

raise_max_connections() {
    # Not strictly needed with 4 jobs, but lets JOBS go up without running out of slots.
    "$pg_bin/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d postgres \
        -c "alter system set max_connections = 250"
    # pg_ctl restart reuses the options of the first start (postmaster.opts).
    "${as_pg[@]}" "$pg_bin/pg_ctl" -D "$tmp/pg/data" -l "$tmp/pg/log" -w restart >/dev/null
}

create_databases() {
    log "creating $N databases db001..db$(printf '%03d' "$N") with one 1000-row table each"
    local i name
    {
        echo "set client_min_messages = warning;"
        for i in $(seq 1 "$N"); do
            name=$(printf 'db%03d' "$i")
            echo "create database $name;"
            echo "\\connect $name"
            echo "create table items as select g as id, md5(g::text) as v, now() as at from generate_series(1, 1000) g;"
            echo "alter table items add primary key (id);"
            echo "\\connect postgres"
        done
        echo "checkpoint;"
    } | "$pg_bin/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d postgres >/dev/null
}

setup_dr() {
    if ! recipient=$("$dr" keygen --output "$tmp/id.txt" 2>"$tmp/keygen.log"); then
        cat "$tmp/keygen.log" >&2
        die "dr keygen failed"
    fi
    listen_port=$(free_port)
    config="$tmp/dr.toml"
    local i name
    {
        cat <<TOML
environment = "bench"

[storage]
url = "file://$tmp/repo"

[encryption]
recipients = ["$recipient"]

[agent]
listen = "127.0.0.1:$listen_port"
timezone = "UTC"
max_concurrent_jobs = $JOBS
TOML
        for i in $(seq 1 "$N"); do
            name=$(printf 'db%03d' "$i")
            cat <<TOML

[[databases]]
name = "$name"
url = "postgres://postgres@127.0.0.1:$port/$name"
rpo = "1h"
  [[databases.schedules]]
  class = "daily"
  cron = "0 * * * * *"
  keep = "1h"
TOML
        done
    } >"$config"
}

# ---------------------------------------------------------------------------------------------
# The agent.

start_agent() {
    log "starting dr agent with $N databases, max_concurrent_jobs = $JOBS, /healthz on 127.0.0.1:$listen_port"
    agent_t0=$(now_f)
    "$dr" --config "$config" --log-format json agent </dev/null >"$tmp/agent.out" 2>"$tmp/agent.log" &
    agent_pid=$!
    local i
    for i in $(seq 1 100); do
        if grep -q '"message":"agent started"' "$tmp/agent.log"; then break; fi
        agent_alive || { cat "$tmp/agent.log" >&2; die "dr agent exited at start"; }
        [ "$i" -lt 100 ] || { cat "$tmp/agent.log" >&2; die "dr agent did not log \"agent started\" within 10 s"; }
        sleep 0.1
    done
    read_status
    start_rss_kib=$rss_kib
}

# Every database backed up once (the RPO catch-up), nothing running any more.
wait_catch_up() {
    log "waiting for the catch-up backups of all $N databases"
    local deadline=$(( $(now_s) + 900 )) done_dbs=0
    while :; do
        agent_alive || { tail -n 20 "$tmp/agent.log" >&2; die "dr agent exited during the catch-up"; }
        done_dbs=$(databases_backed_up)
        if [ "$done_dbs" -ge "$N" ] && [ "$(in_flight)" -eq 0 ]; then break; fi
        [ "$(now_s)" -lt "$deadline" ] || die "catch-up incomplete after 15 minutes: $done_dbs of $N databases have a backup"
        sleep 0.5
    done
    catch_up_seconds=$(awk -v a="$agent_t0" -v b="$(now_f)" 'BEGIN { printf "%.1f", b - a }')
    catch_up_failures=$(count_msg "backup failed; no backup was recorded")
    log "catch-up done: $N databases in ${catch_up_seconds} s (polled every 0.5 s), $catch_up_failures failures"
}

# Up to IDLE_SECONDS samples, one a second, inside one minute and away from its second 0,
# after the log has been quiet for 3 s with no backup running (between "backup complete" and
# the next "backup started" a queued job spends the lock's settle pause, so "nothing running"
# alone is not enough). Writes "rss_kib threads" lines to $tmp/idle.samples and sets
# idle_cpu_pct.
measure_idle() {
    local latest samples deadline sec t_a t_b c_a i before t0
    t0=$(now_s)
    deadline=$(( t0 + 240 ))
    idle_note=""
    log "waiting for an idle window of ${IDLE_SECONDS} s between slots"
    while :; do
        sec=$(( $(now_s) % 60 ))
        # A window of the full IDLE_SECONDS for 2 minutes, then one of at least 10 s.
        latest=$(( 57 - IDLE_SECONDS ))
        if [ "$(now_s)" -ge $(( t0 + 120 )) ]; then latest=47; fi
        if [ "$sec" -ge 3 ] && [ "$sec" -le "$latest" ] && [ "$(in_flight)" -eq 0 ] && [ "$(log_quiet)" -ge 3 ]; then
            break
        fi
        if [ "$(now_s)" -ge "$deadline" ]; then
            idle_note="no quiet window found within 4 minutes: the samples may include backups"
            break
        fi
        sleep 0.5
    done
    # At most until second 57 of this minute, so the next slot stays out; at least 10 samples.
    sec=$(( $(now_s) % 60 ))
    samples=$IDLE_SECONDS
    if [ $((57 - sec)) -lt "$samples" ]; then samples=$((57 - sec)); fi
    if [ "$samples" -lt 10 ]; then samples=10; fi
    log "sampling idle RSS and CPU for ${samples} s from $(hms "$(now_s)") UTC"
    before=$(started)
    read_cpu
    c_a=$cpu_self
    t_a=$(now_f)
    : >"$tmp/idle.samples"
    for i in $(seq 1 "$samples"); do
        read_status
        echo "$rss_kib $threads" >>"$tmp/idle.samples"
        [ "$i" = "$samples" ] || sleep 1
    done
    read_cpu
    t_b=$(now_f)
    idle_cpu_pct=$(awk -v c=$((cpu_self - c_a)) -v hz="$clk_tck" -v a="$t_a" -v b="$t_b" \
        'BEGIN { printf "%.2f", 100 * c / hz / (b - a) }')
    idle_cpu_ticks=$((cpu_self - c_a))
    idle_wall=$(awk -v a="$t_a" -v b="$t_b" 'BEGIN { printf "%.1f", b - a }')
    idle_window="$(hms "${t_a%.*}")–$(hms "${t_b%.*}") UTC"
    if [ "$(started)" != "$before" ]; then
        idle_note="${idle_note:+$idle_note; }$(( $(started) - before )) backups started during the idle window"
    fi
}

# DURATION slots from the next second 0. Samples RSS 4 times a second into $tmp/slots.samples
# ("epoch rss_kib threads" lines) until every slot's backups have ended (at the latest 57 s after the last slot's start).
measure_slots() {
    local base target last_slot deadline i=0
    slot0=$(( ($(now_s) / 60 + 1) * 60 ))
    last_slot=$(( slot0 + 60 * (DURATION - 1) ))
    deadline=$(( last_slot + 57 ))
    base=$(started)
    target=$(( base + N * DURATION ))
    log "measuring $DURATION slot(s) from $(hms "$slot0") UTC"
    read_cpu
    slots_c_self=$cpu_self
    slots_c_children=$cpu_children
    : >"$tmp/slots.samples"
    slots_note=""
    while :; do
        agent_alive || { tail -n 20 "$tmp/agent.log" >&2; die "dr agent exited during the slots"; }
        read_status
        echo "$EPOCHREALTIME $rss_kib $threads" >>"$tmp/slots.samples"
        i=$((i + 1))
        if [ $((i % 4)) = 0 ] && [ "$(now_s)" -ge $((last_slot + 2)) ]; then
            if [ "$(started)" -ge "$target" ] && [ "$(in_flight)" -eq 0 ]; then break; fi
            if [ "$(now_s)" -ge "$deadline" ]; then
                slots_note="stopped waiting 57 s after the last slot: $(( $(started) - base )) of $target backups started, $(in_flight) still running"
                break
            fi
        fi
        sleep 0.25
    done
    read_cpu
    slots_cpu_self=$(( cpu_self - slots_c_self ))
    slots_cpu_children=$(( cpu_children - slots_c_children ))
    slots_started=$(( $(started) - base ))
    read_status
    hwm_before_stop_kib=$hwm_kib
}

stop_agent() {
    log "stopping dr agent (SIGTERM)"
    local t_a t_b status=0
    t_a=$(now_f)
    kill -TERM "$agent_pid"
    while agent_alive; do
        if awk -v a="$t_a" -v b="$(now_f)" 'BEGIN { exit !(b - a > 15) }'; then break; fi
        sleep 0.05
    done
    t_b=$(now_f)
    stop_seconds=$(awk -v a="$t_a" -v b="$t_b" 'BEGIN { printf "%.2f", b - a }')
    if agent_alive; then
        stop_exit="still running after 15 s (killed)"
        kill -KILL "$agent_pid" 2>/dev/null || true
    fi
    wait "$agent_pid" || status=$?
    agent_pid=""
    stop_exit="${stop_exit:-exit status $status}"
    stop_logged=$(count_msg "agent stopped")
}

# ---------------------------------------------------------------------------------------------
# Reporting.

# Markdown rows, one per slot, from the agent's JSON log: backups started in [slot, slot + 60)
# (the last slot: until the end), their delays after the slot's second 0, and when the last of
# them completed (matched by backup id).
slot_rows() {
    python3 - "$tmp/agent.log" "$slot0" "$DURATION" "$tmp/slots.samples" <<'PY'
import json, math, statistics, sys
from datetime import datetime, timezone

log, slot0, duration = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with open(sys.argv[4]) as f:
    samples = [(float(t), int(rss)) for t, rss, _ in (line.split() for line in f)]

def ts(s):
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()

starts, completes, failures = [], {}, []
with open(log) as f:
    for line in f:
        try:
            e = json.loads(line)
        except ValueError:
            continue
        m = e.get("message")
        if m == "backup started":
            starts.append((ts(e["timestamp"]), e.get("backup"), e.get("database")))
        elif m == "backup complete":
            completes[e.get("backup")] = ts(e["timestamp"])
        elif m in ("backup failed; no backup was recorded", "backup aborted by shutdown; nothing was recorded"):
            failures.append(ts(e["timestamp"]))

def pct(sorted_values, p):  # nearest rank
    return sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)]

for k in range(duration):
    a = slot0 + 60 * k
    b = a + 60 if k < duration - 1 else float("inf")
    mine = [s for s in starts if a <= s[0] < b]
    fails = sum(1 for t in failures if a <= t < b)
    rss = [r for t, r in samples if a <= t < b]
    peak = f"{max(rss) / 1024:.1f} MiB" if rss else "—"
    when = datetime.fromtimestamp(a, timezone.utc).strftime("%H:%M:%S")
    if not mine:
        print(f"| {when} | 0 | — | — | — | — | — | {fails} | {peak} |")
        continue
    d = sorted(s[0] - a for s in mine)
    done = [completes[s[1]] for s in mine if s[1] in completes]
    last = f"+{max(done) - a:.2f} s ({len(done)} done)" if done else "—"
    if len(done) == len(mine):
        last = f"+{max(done) - a:.2f} s"
    print(f"| {when} | {len(mine)} | {d[0]:.2f} | {statistics.median(d):.2f} | {pct(d, 95):.2f} | {d[-1]:.2f} | {last} | {fails} | {peak} |")
PY
}

report() {
    local idle_med idle_max idle_threads slot_peak slot_threads total_ticks
    idle_med=$(kib_to_mib "$(cut -d' ' -f1 "$tmp/idle.samples" | median)")
    idle_max=$(kib_to_mib "$(cut -d' ' -f1 "$tmp/idle.samples" | max)")
    idle_threads=$(cut -d' ' -f2 "$tmp/idle.samples" | median)
    slot_peak=$(kib_to_mib "$(cut -d' ' -f2 "$tmp/slots.samples" | max)")
    slot_threads=$(cut -d' ' -f3 "$tmp/slots.samples" | max)
    total_ticks=$((slots_cpu_self + slots_cpu_children))
    cat <<EOF
## $(date -u '+%Y-%m-%d %H:%M UTC') — agent-scale.sh, N=$N, DURATION=$DURATION, JOBS=$JOBS

- machine: $(machine)
- PostgreSQL: $("$pg_bin/postgres" --version)
- dr commit: $(dr_commit)
- setup: $N databases (one table of 1000 rows each, pg_database_size of db001 $(human "$db1_bytes")) on one cluster; one \`dr agent\`, file:// repository, \`max_concurrent_jobs = $JOBS\`; every database has one schedule, \`cron = "0 * * * * *"\` (all $N due at second 0 of every minute), \`keep = "1h"\`, \`rpo = "1h"\`
- load average (1/5/15 min) before the agent started: $load_before; after it stopped: $load_after

| measure | value |
|---|---:|
| RSS right after start | $(kib_to_mib "$start_rss_kib") MiB |
| catch-up (first backup of all $N databases, from process start) | ${catch_up_seconds} s, $catch_up_failures failed |
| idle RSS, median / max ($(wc -l <"$tmp/idle.samples") samples, $idle_window) | $idle_med / $idle_max MiB |
| idle CPU (utime + stime over ${idle_wall} s) | ${idle_cpu_pct} % of one core ($idle_cpu_ticks ticks of 1/$clk_tck s) |
| threads: idle median / max during the slots | $idle_threads / $slot_threads |
| peak RSS during the slots (sampled every 0.25 s) | $slot_peak MiB |
| VmHWM (peak RSS since start, catch-up included) | $(kib_to_mib "$hwm_before_stop_kib") MiB |
| CPU during the slots: agent / reaped children (pg_dump, psql…) | $(awk -v t="$slots_cpu_self" -v hz="$clk_tck" 'BEGIN { printf "%.2f", t / hz }') s / $(awk -v t="$slots_cpu_children" -v hz="$clk_tck" 'BEGIN { printf "%.2f", t / hz }') s ($(awk -v t="$total_ticks" -v hz="$clk_tck" -v n="$slots_started" 'BEGIN { printf "%.3f", n ? t / hz / n : 0 }') s per backup) |
| SIGTERM to exit (idle, after the last slot) | ${stop_seconds} s, $stop_exit, "agent stopped" logged: $([ "$stop_logged" -ge 1 ] && echo yes || echo no) $(pass "$stop_seconds" 10) (limit 10 s) |

Schedule spread: delay of each "backup started" log line after the slot's second 0, in
seconds; "last complete" is when the slot's last "backup complete" was logged; "peak RSS" is
the agent's largest sampled RSS in the slot's minute (the last slot: until the stop).

| slot (UTC) | started | min | median | p95 | max | last complete | failed | peak RSS |
|---|---:|---:|---:|---:|---:|---:|---:|---:|
$(slot_rows)

Concurrency: \`max_concurrent_jobs = $JOBS\`, so the $N backups of a slot run at most $JOBS at a
time and the spread is mostly queueing: each start waits for a job slot, then takes the
repository lock, lists the database's backups and asks the server its version before logging
"backup started".
EOF
    if [ -n "$idle_note" ]; then echo; echo "Idle window: $idle_note."; fi
    if [ -n "$slots_note" ]; then echo; echo "Slots: $slots_note."; fi
    return 0
}

# ---------------------------------------------------------------------------------------------

on_exit() {
    local status=$?
    if [ -n "$agent_pid" ] && agent_alive; then
        kill -TERM "$agent_pid" 2>/dev/null || true
        for _ in $(seq 1 100); do agent_alive || break; sleep 0.1; done
        kill -KILL "$agent_pid" 2>/dev/null || true
        wait "$agent_pid" 2>/dev/null || true
    fi
    # cleanup (lib.sh) exits with the status in $? when it is called.
    if [ "$status" = 0 ]; then cleanup; else (exit "$status") || cleanup; fi
}

main() {
    if [ "$N" -lt 1 ] || [ "$N" -gt 999 ]; then die "N must be 1 to 999"; fi
    [ "$DURATION" -ge 1 ] || die "DURATION must be at least 1"
    if [ "$IDLE_SECONDS" -lt 5 ] || [ "$IDLE_SECONDS" -gt 50 ]; then die "IDLE_SECONDS must be 5 to 50"; fi
    trap on_exit EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    ensure_tools
    build_dr
    start_postgres
    raise_max_connections
    create_databases
    db1_bytes=$("$pg_bin/psql" -X -At -h 127.0.0.1 -p "$port" -U postgres -d postgres -c "select pg_database_size('db001')")
    setup_dr

    load_before=$(loadavg)
    start_agent
    wait_catch_up
    measure_idle
    measure_slots
    stop_agent
    load_after=$(loadavg)

    publish_report
}

main "$@"
