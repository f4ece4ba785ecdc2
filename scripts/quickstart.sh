#!/usr/bin/env bash
# Builds dr and takes a first encrypted backup on the embedded default: a file:// repository,
# of a throwaway PostgreSQL database made for the purpose. Everything lands in one directory
# (printed at the end); the throwaway server is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

pg_bin=/usr/lib/postgresql/15/bin
if [ ! -x "$pg_bin/initdb" ]; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    echo "==> installing PostgreSQL 15 from Debian"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends postgresql-15 >/dev/null
fi

echo "==> building dr (release)"
cargo build --release --quiet -p dr-agent
dr="$PWD/target/release/dr"

work="$(mktemp -d /tmp/dr-quickstart.XXXXXX)"
chmod 755 "$work"
as_pg=()
if [ "$(id -u)" = 0 ]; then
    # initdb refuses root: the throwaway server runs as the postgres system user.
    mkdir "$work/pg" && chown postgres: "$work/pg"
    as_pg=(runuser -u postgres --)
else
    mkdir "$work/pg"
fi
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

stop() { "${as_pg[@]}" "$pg_bin/pg_ctl" -D "$work/pg/data" -m fast stop >/dev/null 2>&1 || true; }
trap stop EXIT

echo "==> starting a throwaway PostgreSQL on 127.0.0.1:$port"
"${as_pg[@]}" "$pg_bin/initdb" -D "$work/pg/data" -U postgres --auth=trust >/dev/null
"${as_pg[@]}" "$pg_bin/pg_ctl" -D "$work/pg/data" -l "$work/pg/log" -w \
    -o "-p $port -k $work/pg -c listen_addresses=127.0.0.1" start >/dev/null
psql() { command psql -X -q -h 127.0.0.1 -p "$port" -U postgres "$@"; }
psql -c "create database shop"
psql -d shop <<'SQL'
create table customers (id bigint primary key, name text, email text, created timestamptz default now());
insert into customers select g, 'customer ' || g, 'c' || g || '@example.com' from generate_series(1, 50000) g;
create table orders (id bigserial primary key, customer bigint references customers, total numeric(12,2), items jsonb);
insert into orders (customer, total, items)
  select 1 + g % 50000, (g % 997) * 1.25, jsonb_build_object('sku', 'SKU-' || g % 300, 'qty', g % 7)
  from generate_series(1, 200000) g;
SQL

echo "==> dr keygen: the identity stays here; backup hosts only need the recipient"
recipient=$("$dr" keygen --output "$work/identity.txt")

cat > "$work/agent.toml" <<TOML
environment = "quickstart"

[storage]
url = "file://$work/repo"

[encryption]
recipients = ["$recipient"]
identity_file = "$work/identity.txt"

[[databases]]
name = "shop"
url = "postgres://postgres@127.0.0.1:$port/shop"
rpo = "26h"
rto = "1h"

  [[databases.schedules]]
  class = "daily"
  cron = "0 3 * * *"
  keep = "30d"
TOML

export DR_CONFIG="$work/agent.toml"
echo "==> dr config check"
"$dr" config check
echo "==> dr backup"
"$dr" --log-format human backup --database shop --class daily
echo "==> dr list"
"$dr" list

echo "==> dr verify --deep: sha256, age and zstd checks, and pg_restore reads the archive"
"$dr" --log-format human verify --deep
echo "==> dr restore into a new database"
"$dr" --log-format human restore --database shop --target "postgres://postgres@127.0.0.1:$port/shop_restored" --create
psql -d shop_restored -Atc "select 'restored orders: ' || count(*) from orders"

data=$(ls "$work"/repo/quickstart/shop/backups/*/data.dump.zst.age | tail -n 1)
if command -v age >/dev/null && command -v zstd >/dev/null; then
    echo "==> break-glass check with stock tools only: age | zstd | pg_restore -l"
    age -d -i "$work/identity.txt" "$data" | zstd -dc | "$pg_bin/pg_restore" -l | head -n 8 || true
fi
echo
echo "Everything is in $work (config: $work/agent.toml). Try: DR_CONFIG=$work/agent.toml $dr list --json"
