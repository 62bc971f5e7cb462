#!/usr/bin/env bash
# Run the test suite against a real S3 endpoint on loopback: start moto's server, point the tests at
# it (tests/conftest.py uses PHANTOM_TEST_S3_ENDPOINT when set, else starts its own), run pytest under
# the loopback proxy trap (scripts/run_trapped.sh: nothing a test starts may send traffic off this
# machine), stop the server. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${VENV:-.venv}/bin"
port=$("$BIN/python" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"$BIN/moto_server" -H 127.0.0.1 -p "$port" >/tmp/phantom_ray_moto_$port.log 2>&1 &
moto_pid=$!
trap 'kill $moto_pid 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  "$BIN/python" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/moto-api/')" 2>/dev/null && break
  sleep 0.2
done
export PHANTOM_TEST_S3_ENDPOINT="http://127.0.0.1:$port"
bash scripts/run_trapped.sh "$BIN/python" -m pytest -q "$@"
