"""No traffic off this machine: a Ray start WITH the dashboard (what ``ray.init()`` and ``ray start
--head`` do), under the test runner's environment, connects only to loopback and this host's own
addresses, and resolves no outside name.

How it is observed: every Python process of the Ray start (driver, dashboard and its modules, agents,
workers) loads a ``sitecustomize`` that installs a ``sys.addaudithook`` hook logging each TCP
``socket.connect``, each ``socket.sendto`` and each ``socket.getaddrinfo`` name to a file. Ray's
usage-stats module probes 169.254.169.254 and metadata.google.internal with ``requests`` on every
dashboard start; under the runner's proxy variables those probes go to the loopback trap
(``tests/net_trap.py``) instead of the network, and the trap log records them as refused.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import shutil
import sys
import tempfile
import textwrap
from urllib.parse import urlsplit

import pytest

import net_trap

SITECUSTOMIZE = textwrap.dedent('''
    import json, os, socket, sys
    _LOG = os.environ.get("PHANTOM_NET_AUDIT_LOG")

    def _hook(event, args):
        if not _LOG or event not in ("socket.connect", "socket.sendto", "socket.getaddrinfo"):
            return
        try:
            if event == "socket.getaddrinfo":
                rec = {"event": event, "host": str(args[0])}
            else:
                sock, addr = args[0], args[1]
                if sock.family == socket.AF_UNIX:
                    return
                if event == "socket.connect" and sock.type == socket.SOCK_DGRAM:
                    return  # a UDP connect sends nothing (Ray uses one to pick its node IP)
                rec = {"event": event, "host": str(addr[0]), "port": addr[1] if len(addr) > 1 else None}
            rec["pid"] = os.getpid()
            rec["argv"] = " ".join(sys.argv[:2])[-120:]
            with open(_LOG, "a") as f:
                f.write(json.dumps(rec) + "\\n")
        except Exception:
            pass

    sys.addaudithook(_hook)
''')

RAY_START = textwrap.dedent('''
    import time, ray
    ray.init(num_cpus=1, include_dashboard=True, dashboard_host="127.0.0.1")  # the dashboard, on purpose
    @ray.remote
    def f():
        return 1
    assert ray.get(f.remote()) == 1
    time.sleep(float({wait}))  # the dashboard's usage-stats module probes right after it starts
    ray.shutdown()
''')

METADATA_HOSTS = {"169.254.169.254", "metadata.google.internal", "metadata", "fd00:ec2::254"}


def _local(host: str, own: set[str]) -> bool:
    if host in own or host in ("", "localhost", "0.0.0.0", "::"):
        return True
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    return ip.is_loopback or ip.is_unspecified or (ip.version == 6 and ip.ipv4_mapped is not None
                                                   and ip.ipv4_mapped.is_loopback)


def test_runner_environment_routes_proxy_clients_to_the_trap():
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        assert os.environ[name].startswith("http://127.0.0.1:"), name
    no_proxy = os.environ["NO_PROXY"].split(",")
    assert {"127.0.0.1", "localhost", "::1"} <= set(no_proxy)
    # Ray's usage report (sent by a `ray start` head even with usage stats disabled) stays on loopback
    assert _local(urlsplit(os.environ["RAY_USAGE_STATS_REPORT_URL"]).hostname, set())
    # a proxy-aware client asking for a metadata address reaches the trap, not the network
    import urllib.error
    import urllib.request

    before = len(net_trap.read_log(os.environ["PHANTOM_NET_TRAP_LOG"]))
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen("http://169.254.169.254/latest/meta-data/", timeout=5)
    assert e.value.code == 403
    log = net_trap.read_log(os.environ["PHANTOM_NET_TRAP_LOG"])
    assert len(log) == before + 1 and log[-1]["host"] == "169.254.169.254"


def test_ray_start_with_dashboard_connects_only_to_loopback(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    audit = tmp_path / "audit.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    env["PHANTOM_NET_AUDIT_LOG"] = str(audit)
    # a private session dir (short: Ray's socket paths must fit in 107 bytes): never another run's cluster
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="prnet", dir="/tmp")
    env.pop("RAY_ADDRESS", None)
    trap_log = os.environ["PHANTOM_NET_TRAP_LOG"]
    trap_before = len(net_trap.read_log(trap_log))
    try:
        proc = subprocess.run([sys.executable, "-c", RAY_START.format(wait=8)], env=env, capture_output=True,
                              text=True, timeout=240)
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]

    records = [json.loads(line) for line in audit.read_text().splitlines()]
    own = set(net_trap.own_addresses())
    procs = {r["pid"] for r in records}
    assert len(procs) >= 3, "the audit hook must be active in the driver, the dashboard and workers"
    assert any("dashboard" in r["argv"] for r in records), "no record from the dashboard process"
    outside = [r for r in records if not _local(r["host"], own)]
    assert not outside, f"connection attempts / lookups outside this machine: {outside[:10]}"
    # what the proxy-aware probes tried went to the trap, and was refused there
    caught = net_trap.read_log(trap_log)[trap_before:]
    print(f"trap caught {len(caught)} request(s): {sorted({c['host'] for c in caught})}")
    assert all(c["peer"] == "127.0.0.1" for c in caught)
    assert {c["host"] for c in caught} <= METADATA_HOSTS | own | {""}
