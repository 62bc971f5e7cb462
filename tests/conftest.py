"""Shared pytest fixtures: a moto S3 server on loopback and a local 2-CPU Ray runtime.

- ``s3_server`` (session): starts ``moto.server.ThreadedMotoServer`` on 127.0.0.1, sets
  AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION in ``os.environ``
  for the whole session (so boto3, pyarrow and Ray workers started afterwards all see it) and yields
  the endpoint URL, e.g. ``"http://127.0.0.1:51234"``.
- ``s3_bucket`` (function): a fresh, uniquely named bucket on that server; yields ``"s3://<bucket>"``.
- ``ray_local`` (session): ``ray.init(num_cpus=2, include_dashboard=False)``; shut down at the end.
- ``ray_head`` (function): a separate local Ray head on loopback for ``ray job submit`` tests; yields
  ``(dashboard URL, env)`` and stops exactly that head afterwards.
  Request ``s3_server`` before ``ray_local`` when Ray workers must reach S3, so they inherit the env.
- Network trap (whole session, set when this file is imported, before anything starts): proxy-aware
  clients in this process and every process started from it (Ray's workers and dashboard included)
  go to a loopback proxy trap (``tests/net_trap.py``) that logs and refuses; loopback and this
  host's own addresses stay direct (``NO_PROXY``). scripts/run_tests.sh starts the trap as a
  process and exports the same variables; a bare ``pytest`` starts it here, in a thread.
  ``net_trap_log`` (session fixture) is the trap's log path.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import uuid

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/ helpers (net_trap, image_corpus)
import net_trap  # noqa: E402

if not os.environ.get("PHANTOM_NET_TRAP_LOG"):
    _trap_log = os.path.join(tempfile.mkdtemp(prefix="phantom_net_trap_"), "trap.log")
    _trap_server, _trap_port = net_trap.start_trap(_trap_log)
    os.environ.update(net_trap.trap_env(_trap_port))
    os.environ["PHANTOM_NET_TRAP_LOG"] = _trap_log


@pytest.fixture(scope="session")
def net_trap_log() -> str:
    return os.environ["PHANTOM_NET_TRAP_LOG"]

_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one INFO line per S3 request otherwise
    server = None
    endpoint = os.environ.get("PHANTOM_TEST_S3_ENDPOINT")  # a moto server started by scripts/run_tests.sh
    if not endpoint:
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        endpoint = f"http://127.0.0.1:{server._server.server_port}"
    saved = {k: os.environ.get(k) for k in [*_S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(_S3_ENV)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        yield endpoint
    finally:
        if server is not None:
            server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server):
    import boto3

    name = f"test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    yield f"s3://{name}"


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture
def ray_head():
    """A separate local Ray head on loopback (not the test process's own runtime), stopped afterwards.

    ``ray start --block`` keeps the head's processes children of one Popen, so terminating it stops
    exactly this head (``ray stop`` would stop every Ray instance on the machine)."""
    import shutil
    import subprocess
    import time
    from pathlib import Path

    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    from helpers import free_port

    port, dash, agent = free_port(), free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: Ray's unix socket paths have a length limit
    proc = subprocess.Popen([str(bin_dir / "ray"), "start", "--head", "--block", f"--port={port}",
                             "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                             f"--dashboard-agent-listen-port={agent}",
                             "--num-cpus=2", f"--temp-dir={temp}", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.time() + 120
        while True:
            try:
                JobSubmissionClient(f"http://127.0.0.1:{dash}").list_jobs()
                break
            except Exception:  # not up yet: connection refused / dashboard starting
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("the local Ray head did not come up")
                time.sleep(1)
        yield f"http://127.0.0.1:{dash}", env
    finally:
        # SIGTERM, then SIGKILL after a short grace: the head's state is thrown away with its temp dir,
        # and a graceful stop of every worker took ~35 s per head
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)
