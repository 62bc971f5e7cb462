"""A Ray autoscaling test cluster on this machine: Ray's own ``AutoscalingCluster`` (the fake
multi-node provider its autoscaler tests use: every worker node is a real raylet, started and
stopped by the real autoscaler), started so that it stays this test's own.

Why a subclass and not ``AutoscalingCluster`` as it is (Ray 2.60):
- its config template ``autoscaler/_private/fake_multi_node/example.yaml`` is not in the wheel
  (``AutoscalingCluster(...)`` raises FileNotFoundError); the same keys are written here;
- its ``start()`` and ``shutdown()`` run ``ray stop --force``, which stops every Ray instance on the
  machine (other test sessions' too), and its head takes the fixed port 6379. Here the head is one
  ``ray start --head --block`` process group on a free port with its own temp dir, the fake
  provider is pointed at that port, and shutdown kills that process group only (the monitor starts
  the fake worker nodes as its own children, so they are in it as well).

Cluster events the tests need: :meth:`sample` (alive worker nodes), :meth:`node_pids` (every
process of one fake node, found by the node id the provider puts in its environment) and
:meth:`kill_node` (SIGKILL all of them at once: a machine lost with its local disk and object
store; the autoscaler notices the missing heartbeats and replaces it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ray.cluster_utils import AutoscalingCluster

from helpers import free_port

REPO = Path(__file__).resolve().parents[1]
FAKE_NODE_ENV = "RAY_OVERRIDE_NODE_ID_FOR_TESTING"  # set by the fake provider on each node it starts

# what example.yaml holds upstream (the keys the v1 autoscaler reads), minus its node types
_BASE_CONFIG = {
    "cluster_name": "phantom-fake",
    "max_workers": 8,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True, "launch_multiple": True},
    "head_node_type": "ray.head.default",
    "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1, "docker": {},
    "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
    "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
    "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
}


class LocalAutoscalingCluster(AutoscalingCluster):
    """``AutoscalingCluster(head_resources, worker_node_types, idle_timeout_minutes=...)`` that owns
    its processes; ``start()`` returns the GCS address to ``ray.init`` with."""

    def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
        config = json.loads(json.dumps(_BASE_CONFIG))
        config["available_node_types"] = dict(worker_node_types)
        config["available_node_types"]["ray.head.default"] = {"resources": head_resources, "node_config": {},
                                                             "max_workers": 0}
        config.update(config_kwargs)
        return config

    def start(self, _system_config=None, override_env=None, timeout_s: float = 120.0) -> str:
        port = free_port()
        self.temp_dir = tempfile.mkdtemp(prefix="rayas", dir="/tmp")  # short: unix socket path limit
        self.address = f"127.0.0.1:{port}"
        self._config["provider"]["gcs_address"] = self.address  # else the provider dials :6379
        config_path = os.path.join(self.temp_dir, "autoscaling.json")
        with open(config_path, "w") as f:
            json.dump(self._config, f)
        head = dict(self._head_resources)
        bin_dir = Path(sys.executable).parent
        cmd = [str(bin_dir / "ray"), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
               f"--autoscaling-config={config_path}", f"--temp-dir={self.temp_dir}", "--include-dashboard=false",
               "--disable-usage-stats", f"--num-cpus={int(head.pop('CPU', 0))}", f"--num-gpus={int(head.pop('GPU', 0))}"]
        if "object_store_memory" in head:
            cmd.append(f"--object-store-memory={head.pop('object_store_memory')}")
        if head:
            cmd.append(f"--resources={json.dumps(head)}")
        if _system_config is not None:
            cmd.append(f"--system-config={json.dumps(_system_config, separators=(',', ':'))}")
        env = dict(os.environ, AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_FAKE_CLUSTER="1", RAY_AUTH_MODE="disabled",
                   PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        env.update(override_env or {})
        self.log_path = os.path.join(self.temp_dir, "head.log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while not self._gcs_up(port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.shutdown()
                raise RuntimeError(f"the autoscaling cluster's head did not come up: {self.head_log()[-3000:]}")
            time.sleep(0.5)
        return self.address

    @staticmethod
    def _gcs_up(port: int) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    def head_log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def monitor_log(self) -> str:
        """The autoscaler's log (node launches and terminations)."""
        out = []
        for p in sorted(Path(self.temp_dir).glob("session_*/logs/monitor.log")):
            out.append(p.read_text(errors="replace"))
        return "\n".join(out)

    def _group_pids(self) -> list[int]:
        """The head's process group and every descendant of it (raylets start their workers in
        process groups of their own)."""
        import psutil

        pids = set()
        for p in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(p.info["pid"]) == self.proc.pid:
                    pids.add(p.info["pid"])
                    pids.update(c.pid for c in p.children(recursive=True))
            except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
                continue
        return sorted(pids)

    def shutdown(self) -> None:
        """SIGTERM, then SIGKILL, to this cluster's process group (head, monitor, fake nodes, workers)."""
        proc = getattr(self, "proc", None)
        if proc is not None:
            for sig, wait_s in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                deadline = time.monotonic() + wait_s
                while time.monotonic() < deadline and (proc.poll() is None or self._group_pids()):
                    time.sleep(0.2)
                if proc.poll() is not None and not self._group_pids():
                    break
            self._log.close()
        if os.environ.get("PHANTOM_KEEP_CLUSTER_LOGS"):  # the session logs (monitor.log: launches, terminations)
            print(f"autoscaling cluster logs kept in {self.temp_dir}")
        else:
            shutil.rmtree(getattr(self, "temp_dir", ""), ignore_errors=True)

    # ---- observing and breaking nodes ------------------------------------------------------------

    @staticmethod
    def worker_nodes() -> list[dict]:
        """Alive nodes other than the head (``ray.nodes()`` of the connected driver)."""
        import ray

        return [n for n in ray.nodes() if n["Alive"] and not n["Resources"].get("node:__internal_head__")]

    def node_pids(self, node_id: str) -> list[int]:
        """Every process of the fake node ``node_id``: its raylet (the provider gives it the node id
        in its environment) and the raylet's children (dashboard and runtime-env agents, workers)."""
        import psutil

        pids = []
        for pid in self._group_pids():
            try:
                raylet = psutil.Process(pid)
                if raylet.environ().get(FAKE_NODE_ENV) == node_id:
                    pids.append(pid)
                    pids.extend(c.pid for c in raylet.children(recursive=True))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return pids

    def node_of_pid(self, pid: int) -> str:
        """The fake node a process runs on (the node id of the raylet it descends from)."""
        import psutil

        p = psutil.Process(pid)
        while p is not None:
            node = p.environ().get(FAKE_NODE_ENV)
            if node and "raylet" in p.name():
                return node
            p = p.parent()
        raise RuntimeError(f"process {pid} is not on a node of this cluster")

    def kill_node(self, node_id: str) -> list[int]:
        """SIGKILL every process of one fake worker node at once; returns the PIDs."""
        pids = self.node_pids(node_id)
        if not pids:
            raise RuntimeError(f"no processes found for node {node_id}")
        for pid in pids:  # stopped first, so that none notices the others dying and exits on its own
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids


class Sampler:
    """A thread that records ``(t, alive worker nodes, extra())`` every ``interval`` seconds."""

    def __init__(self, extra=None, interval: float = 0.5):
        self.extra = extra or (lambda: None)
        self.interval = interval
        self.samples: list[tuple[float, int, object]] = []
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                nodes = len(LocalAutoscalingCluster.worker_nodes())
                self.samples.append((time.monotonic() - self._t0, nodes, self.extra()))
            except Exception as exc:  # a transient GCS error while a node dies: keep sampling
                self.samples.append((time.monotonic() - self._t0, -1, repr(exc)))
            self._stop.wait(self.interval)

    def timeline(self) -> list[tuple[float, int, object]]:
        """The samples where something changed (first and last kept)."""
        out = []
        for s in self.samples:
            if not out or s[1:] != out[-1][1:]:
                out.append(s)
        if self.samples and out[-1] is not self.samples[-1]:
            out.append(self.samples[-1])
        return out

    def format(self, label: str) -> str:
        return "\n".join([f"{label} (t s, worker nodes, {getattr(self.extra, '__name__', 'extra')}):"]
                         + [f"  {t:7.1f}  {n}  {x}" for t, n, x in self.timeline()])
