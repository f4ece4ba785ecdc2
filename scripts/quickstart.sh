#!/usr/bin/env bash
# The first command for a new user: builds dr and runs `dr demo`, which creates a throwaway
# PostgreSQL with sample data, a file:// repository and a fresh age key in a temporary
# directory, takes a backup, runs a restore drill, prints `dr status`, and cleans up.
# Extra arguments go to `dr demo` (e.g. --keep to keep the repository, key and config).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x /usr/lib/postgresql/15/bin/initdb ]; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    echo "==> installing PostgreSQL 15 from Debian"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends postgresql-15 >/dev/null
fi

echo "==> building dr (release)"
cargo build --release --quiet -p dr-agent
exec target/release/dr --log-format human demo "$@"
