"""A loopback proxy trap: proxy-aware clients (requests, urllib, botocore, Ray's dashboard) are sent
to a closed port on 127.0.0.1 that logs every connection attempt and refuses it, so a test run or
the quickstart cannot reach an address off this machine through a proxy-aware client, and what
tried to is on record.

``start_trap(log_path)`` runs the trap in a thread and returns its port; ``trap_env(port)`` is the
environment to export (``HTTP_PROXY``/``HTTPS_PROXY``/``ALL_PROXY`` and lower-case, ``NO_PROXY`` with
loopback and this host's own addresses, which must stay direct: moto, Ray's own HTTP, Serve).
``python tests/net_trap.py --log FILE --env-file FILE`` runs it as a process (scripts/run_tests.sh,
the Makefile's quickstart) and writes the environment as ``export`` lines.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import socketserver
import subprocess
import threading
import time


def own_addresses() -> list[str]:
    """Loopback, this host's names and addresses (``hostname -I``) and the address Ray picks as the
    node IP (the source address of a route to a public IP: a UDP connect, which sends no packet)."""
    out = ["127.0.0.1", "localhost", "::1"]
    try:
        out += subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5).stdout.split()
    except (OSError, subprocess.SubprocessError):
        pass
    host = socket.gethostname()
    out.append(host)
    try:
        out += [info[4][0] for info in socket.getaddrinfo(host, None)]
    except socket.gaierror:
        pass
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("8.8.8.8", 80))  # UDP: picks the route's source address, sends nothing
        out.append(s.getsockname()[0])
    except OSError:
        pass
    finally:
        s.close()
    return list(dict.fromkeys(a for a in out if a))


def trap_env(port: int) -> dict[str, str]:
    proxy = f"http://127.0.0.1:{port}"
    no_proxy = ",".join(own_addresses())
    env = {}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        env[name] = env[name.lower()] = proxy
    env["NO_PROXY"] = env["no_proxy"] = no_proxy
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # a head started by `ray start` (tests' Ray heads, the autoscaling cluster) still tells Ray's stats
    # server that usage stats are disabled (the dashboard's usage-stats module): that report goes to a
    # closed loopback port instead of https://usage-stats.ray.io/
    env["RAY_USAGE_STATS_REPORT_URL"] = "http://127.0.0.1:9/"
    # vLLM's usage reporting (a POST to its stats server, cloud-provider probes)
    env["VLLM_NO_USAGE_STATS"] = env["DO_NOT_TRACK"] = "1"
    return env


class _Handler(socketserver.StreamRequestHandler):
    def handle(self):
        self.request.settimeout(2.0)
        try:
            first = self.rfile.readline(8192).decode("latin-1").strip()
        except (OSError, UnicodeDecodeError):
            first = ""
        parts = first.split()
        target = parts[1] if len(parts) > 1 else ""
        host = target
        if "://" in host:
            host = host.split("://", 1)[1]
        host = host.split("/", 1)[0].rsplit(":", 1)[0].strip("[]") if host else ""
        entry = {"time": time.time(), "peer": self.client_address[0], "request": first[:300], "host": host}
        with self.server.lock, open(self.server.log_path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        try:
            self.wfile.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        except OSError:
            pass


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def start_trap(log_path: str) -> tuple[_Server, int]:
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.log_path = log_path
    srv.lock = threading.Lock()
    open(log_path, "a").close()
    threading.Thread(target=srv.serve_forever, daemon=True, name="net-trap").start()
    return srv, srv.server_address[1]


def read_log(log_path: str) -> list[dict]:
    if not os.path.exists(log_path):
        return []
    with open(log_path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log", required=True)
    ap.add_argument("--env-file", required=True, help="written once the trap listens: export lines")
    args = ap.parse_args()
    srv, port = start_trap(args.log)
    env = trap_env(port)
    env["PHANTOM_NET_TRAP_LOG"] = os.path.abspath(args.log)
    tmp = args.env_file + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(f"export {k}='{v}'\n" for k, v in env.items())
    os.replace(tmp, args.env_file)
    try:
        threading.Event().wait()  # the trap thread serves; this keeps the process alive until killed
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
