#!/usr/bin/env bash
# Run the test suite against a real S3 endpoint on loopback: start moto's server, point the tests at
# it (tests/conftest.py uses PHANTOM_TEST_S3_ENDPOINT when set, else starts its own), run pytest,
# stop the server. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${VENV:-.venv}/bin"
port=$("$BIN/python" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"$BIN/moto_server" -H 127.0.0.1 -p "$port" >/tmp/phantom_ray_moto_$port.log 2>&1 &
moto_pid=$!
# network trap: proxy-aware clients (Ray's dashboard probing cloud metadata, requests, botocore) go to
# a loopback proxy that logs and refuses; loopback and this host's addresses stay direct (NO_PROXY)
trap_dir=$(mktemp -d /tmp/phantom_net_trap.XXXXXX)
"$BIN/python" tests/net_trap.py --log "$trap_dir/trap.log" --env-file "$trap_dir/env" &
trap_pid=$!
trap 'kill $moto_pid $trap_pid 2>/dev/null || true' EXIT
for _ in $(seq 50); do [ -f "$trap_dir/env" ] && break; sleep 0.1; done
# shellcheck disable=SC1091
source "$trap_dir/env"
for _ in $(seq 50); do
  "$BIN/python" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/moto-api/')" 2>/dev/null && break
  sleep 0.2
done
export PHANTOM_TEST_S3_ENDPOINT="http://127.0.0.1:$port"
status=0
"$BIN/python" -m pytest -q "$@" || status=$?
if [ -s "$trap_dir/trap.log" ]; then
  echo "network trap: $(wc -l <"$trap_dir/trap.log") refused proxy connection(s), log: $trap_dir/trap.log"
fi
exit $status
