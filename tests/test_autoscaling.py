"""Scale on Ray's own autoscaling test cluster (``ray.cluster_utils.AutoscalingCluster``: the fake
multi-node provider; every worker node is a real raylet the real autoscaler starts and stops).

One cluster for the module (tests/autoscaling_cluster.py): a head without model slots (0 CPUs;
Serve's controller and proxy and Ray Train's controller need none) and one worker node type of 1
CPU (plus one ``worker_slot``), at most 3 worker nodes, idle nodes removed after 6 s. Every test
starts from zero worker nodes and records node and replica counts over time (printed: ``-s``).

1. captioning grows the cluster to 3 nodes as its actor pool grows to 3 and shrinks it after the job;
   every image is captioned exactly once;
2. a worker node is killed (its raylet and everything on it) halfway through captioning: the job
   still writes every image exactly once and the autoscaler replaces the node;
3. a Serve application with ``autoscaling_config`` (1..3 replicas): a bounded burst of concurrent
   requests adds replicas (and nodes), then the application idles back to one replica; no request
   fails during scale-up or scale-down;
4. training (2 Ray Train workers on 2 nodes, DeepSpeed ZeRO-2, checkpoints on S3) loses a node mid-run:
   the run restarts from the last checkpoint on a replacement node and finishes at the planned step
   with every sample of the epoch consumed exactly once.
"""

from __future__ import annotations

import io
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from phantom_ray import storage

from autoscaling_cluster import LocalAutoscalingCluster, Sampler

pytestmark = pytest.mark.slow

MAX_WORKERS = 3
WORKER_TYPES = {"cpu1": {"resources": {"CPU": 1, "worker_slot": 1}, "node_config": {}, "min_workers": 0,
                         "max_workers": MAX_WORKERS}}
# a killed raylet is declared dead after ~3 missed 1 s health checks, and the autoscaler drops a node
# whose heartbeats stopped 5 s ago (defaults: 30 s each)
SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
AUTOSCALER_ENV = {"AUTOSCALER_HEARTBEAT_TIMEOUT_S": "5"}


@pytest.fixture(scope="module")
def cluster(s3_server):
    """The autoscaling cluster, this process connected to it as the driver. A runtime another module
    started in this process (``ray_local``) is put back afterwards."""
    import ray

    restore = ray.is_initialized()
    if restore:
        ray.shutdown()
    saved_auth = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # the head's mode (a token file from an earlier ray.init would not match)
    c = LocalAutoscalingCluster(head_resources={"CPU": 0}, worker_node_types=WORKER_TYPES, idle_timeout_minutes=0.1)
    t0 = time.monotonic()
    address = c.start(_system_config=SYSTEM_CONFIG, override_env=AUTOSCALER_ENV)
    try:
        ray.init(address=address, log_to_driver=False)
        print(f"\nautoscaling cluster up in {time.monotonic() - t0:.1f}s at {address}")
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        if saved_auth is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved_auth
        if restore:  # as tests/conftest.py's ray_local starts it
            ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)


def _wait_for(cond, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _no_worker_nodes(c: LocalAutoscalingCluster, timeout: float = 60):
    _wait_for(lambda: not c.worker_nodes(), timeout, "the idle worker nodes to be removed")


# ---- captioning ----------------------------------------------------------------------------------

N_IMAGES = 1500
SHARD = 50


def _png(i: int) -> bytes:
    arr = np.random.default_rng(i).integers(0, 255, (8 + i % 5, 8 + i % 7, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def image_bucket(s3_server):
    """N_IMAGES tiny PNGs on the S3 endpoint; returns (root, canonical image URIs)."""
    import boto3

    name = f"scale-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket=name)
    keys = [f"images/{i // 500:02d}/img{i:05d}.png" for i in range(N_IMAGES)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda ik: client.put_object(Bucket=name, Key=ik[1], Body=_png(ik[0])), enumerate(keys)))
    return f"s3://{name}", sorted(f"s3://{name}/{k}" for k in keys)


def _caption_cfg(input: str, output: str, **kw):
    from phantom_ray.caption.config import CaptionConfig

    base = dict(input=input, output=output, model="tiny-qwen2", sampling={"max_tokens": 1}, engine="torch",
                batch_size=25, min_replicas=1, max_replicas=MAX_WORKERS, num_gpus=0, num_cpus=1, shard_size=SHARD,
                io_threads=4, progress=False)
    base.update(kw)
    return CaptionConfig(**base)


def _caption_workers() -> int:
    """Caption replicas alive now (the Ray Data actor pool's worker processes, on every node)."""
    import psutil

    n = 0
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any("ChunkCaptioner" in part for part in (p.info["cmdline"] or [])):
                n += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return n


def _assert_exactly_once(output: str, uris: list[str]) -> None:
    from phantom_ray.caption.plan import read_outputs

    rows = read_outputs(output)
    got = [r["image_uri"] for r in rows]
    assert len(got) == len(set(got)), f"{len(got) - len(set(got))} duplicate rows"
    assert sorted(got) == uris
    assert all(r["error"] is None and r["generated_tokens"] == 1 for r in rows), \
        [r for r in rows if r["error"] is not None][:3]


@pytest.mark.timeout(240)
def test_captioning_grows_the_cluster_to_three_nodes_and_shrinks_it_after(cluster, image_bucket):
    from phantom_ray.caption.job import run_caption

    root, uris = image_bucket
    _no_worker_nodes(cluster)
    with Sampler(extra=_caption_workers) as s:
        t0 = time.monotonic()
        summary = run_caption(_caption_cfg(f"{root}/images/", f"{root}/captions/grow"))
        t_job = time.monotonic() - t0
        _no_worker_nodes(cluster, timeout=60)
        time.sleep(1)
    print("\n" + s.format("captioning, grow and shrink"))
    print(f"job {t_job:.1f}s: {summary['images_processed']} images, {summary['images_per_s']:.1f} images/s")
    assert summary["images_processed"] == len(uris) and summary["errors"] == 0
    _assert_exactly_once(f"{root}/captions/grow", uris)
    samples = [x for x in s.samples if x[1] >= 0]
    assert samples[0][1] == 0, "a worker node was up before the job"
    assert max(n for _, n, _ in samples) == MAX_WORKERS, "the cluster never grew to 3 worker nodes"
    assert max(w for _, _, w in samples) == MAX_WORKERS, "the actor pool never reached 3 replicas"
    assert samples[-1][1] == 0, "idle worker nodes were not removed after the job"
    growth = [n for _, n, _ in samples]
    peak = growth.index(MAX_WORKERS)
    assert growth[:peak + 1] == sorted(growth[:peak + 1]), "nodes were removed while the pool was growing"


@pytest.mark.timeout(240)
def test_a_node_killed_mid_captioning_loses_and_duplicates_nothing(cluster, image_bucket):
    from phantom_ray.caption.job import run_caption

    root, uris = image_bucket
    _no_worker_nodes(cluster)
    n_chunks = len(uris) // SHARD
    killed: dict = {}
    before: set[str] = set()

    def on_chunk(i: int) -> None:  # on the driver, as each chunk's counts come back
        on_chunk.done += 1
        if killed or on_chunk.done < n_chunks // 2:
            return
        nodes = cluster.worker_nodes()
        before.update(n["NodeID"] for n in nodes)
        victim = nodes[-1]["NodeID"]
        killed.update(node=victim, pids=cluster.kill_node(victim), at_chunk=on_chunk.done, t=time.monotonic())

    on_chunk.done = 0
    node_ids: list[set[str]] = []

    def nodes_and_workers():
        node_ids.append({n["NodeID"] for n in cluster.worker_nodes()})
        return _caption_workers()

    with Sampler(extra=nodes_and_workers) as s:
        summary = run_caption(_caption_cfg(f"{root}/images/", f"{root}/captions/node-killed"), on_chunk=on_chunk)
    print("\n" + s.format("captioning, a node killed"))
    print(f"killed node {killed.get('node')} ({len(killed.get('pids', []))} processes) after chunk "
          f"{killed.get('at_chunk')} of {n_chunks}")
    assert killed, "no node was killed"
    _assert_exactly_once(f"{root}/captions/node-killed", uris)
    assert summary["images_processed"] == len(uris)
    seen = set().union(*node_ids)
    assert killed["node"] not in set().union(*node_ids[-3:]), "the killed node is still listed alive"
    assert seen - before, "the autoscaler never started a replacement node"
