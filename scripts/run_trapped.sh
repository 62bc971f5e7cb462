#!/usr/bin/env bash
# Run a command with proxy-aware clients sent to a loopback proxy trap (tests/net_trap.py) that logs
# and refuses every connection: nothing the command starts (Ray's dashboard probing cloud metadata,
# requests, botocore) can reach an address off this machine through a proxy-aware client. Loopback
# and this host's own addresses stay direct (NO_PROXY). Used by `make quickstart` and scripts/run_tests.sh.
#   VENV=.venv bash scripts/run_trapped.sh .venv/bin/phantom-ray quickstart
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${VENV:-.venv}/bin"
trap_dir=$(mktemp -d /tmp/phantom_net_trap.XXXXXX)
"$BIN/python" tests/net_trap.py --log "$trap_dir/trap.log" --env-file "$trap_dir/env" &
trap_pid=$!
trap 'kill $trap_pid 2>/dev/null || true' EXIT
for _ in $(seq 50); do [ -f "$trap_dir/env" ] && break; sleep 0.1; done
# shellcheck disable=SC1091
source "$trap_dir/env"
status=0
"$@" || status=$?
if [ -s "$trap_dir/trap.log" ]; then
  echo "network trap: $(wc -l <"$trap_dir/trap.log") refused proxy connection(s), log: $trap_dir/trap.log"
fi
exit $status
