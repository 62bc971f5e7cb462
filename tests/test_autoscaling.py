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
    # >=: the v1 autoscaler may overshoot for a moment (it queues nodes for demand it is already meeting
    # and terminates the surplus at once, "max_workers_per_type"), so a 4th raylet can be seen alive
    assert max(n for _, n, _ in samples) >= MAX_WORKERS, "the cluster never grew to 3 worker nodes"
    assert max(w for _, _, w in samples) == MAX_WORKERS, "the actor pool never reached 3 replicas"
    assert samples[-1][1] == 0, "idle worker nodes were not removed after the job"
    growth = [n for _, n, _ in samples]
    peak = growth.index(MAX_WORKERS)
    assert growth[:peak + 1] == sorted(growth[:peak + 1]), "nodes were removed while the pool was growing"


@pytest.mark.timeout(240)
def test_a_node_killed_mid_captioning_loses_and_duplicates_nothing(cluster, image_bucket):
    """A pool of 2 replicas on 2 nodes; when half the chunks are done one node is SIGKILLed. Ray Data
    restarts its actor, whose demand makes the autoscaler start a new node. The fake provider keeps a
    killed node in its node list (a cloud provider's list drops the dead instance once the autoscaler
    or the cloud terminates it), so the dead node still counts against max_workers: hence 2 replicas
    of at most 3 nodes. The surviving replica could finish the other half before the node is declared
    dead (~3 s) and replaced, after which nothing would ask for one: so the driver, as it reads the next
    chunk's counts, waits (at most 90 s) until a node that was not there at the kill is alive. The job
    cannot finish meanwhile (its output is not read), so the replacement is made for this job."""
    from phantom_ray.caption.job import run_caption

    root, uris = image_bucket
    _no_worker_nodes(cluster)
    n_chunks = len(uris) // SHARD
    killed: dict = {}
    before: set[str] = set()

    def on_chunk(i: int) -> None:  # on the driver, as each chunk's counts come back
        on_chunk.done += 1
        if killed:
            if "replaced_after_s" not in killed:
                def replacement():
                    return {n["NodeID"] for n in cluster.worker_nodes()} - before
                new = _wait_for(replacement, 90, "a replacement for the killed node")
                killed.update(replaced_after_s=time.monotonic() - killed["t"], replacement=sorted(new))
            return
        if on_chunk.done < n_chunks // 2:
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
        summary = run_caption(_caption_cfg(f"{root}/images/", f"{root}/captions/node-killed", max_replicas=2),
                              on_chunk=on_chunk)
    print("\n" + s.format("captioning, a node killed"))
    print(f"killed node {killed.get('node')} ({len(killed.get('pids', []))} processes) after chunk "
          f"{killed.get('at_chunk')} of {n_chunks}; replacement {killed.get('replacement')} alive "
          f"{killed.get('replaced_after_s', float('nan')):.1f}s after the kill")
    assert killed, "no node was killed"
    _assert_exactly_once(f"{root}/captions/node-killed", uris)
    assert summary["images_processed"] == len(uris)
    assert killed["node"] not in set().union(*node_ids[-3:]), "the killed node is still listed alive"
    assert "replaced_after_s" in killed, "the job ended before a chunk came back after the kill"


# ---- serving -------------------------------------------------------------------------------------

APP = "phantom-autoscale"
MODEL = "tiny-qwen2"


def _serve_args():
    from phantom_ray.serving.config import ServeArgs

    # one replica per worker node (0.9 + the ingress' 0.1 fill the first node); Serve's autoscaler
    # aims at one ongoing request per replica, decides every 0.5 s and scales down after 3 s idle
    model = {"name": MODEL, "checkpoint": MODEL, "engine": "torch", "dtype": "float32", "num_cpus": 0.9,
             "torch_num_threads": 1, "max_ongoing_requests": 4, "max_queued_requests": -1, "max_batch_size": 4,
             "batch_wait_timeout_s": 0.01, "max_prompt_tokens": 256, "max_tokens_limit": 64,
             "default_max_tokens": 8,
             "autoscaling_config": {"min_replicas": 1, "max_replicas": MAX_WORKERS, "target_ongoing_requests": 1,
                                    "upscale_delay_s": 0.5, "downscale_delay_s": 3, "metrics_interval_s": 0.5,
                                    "look_back_period_s": 2}}
    return ServeArgs.model_validate({"models": [model], "api_keys_env": None, "ingress_num_cpus": 0.1})


def _replicas() -> dict:
    from ray import serve

    from phantom_ray.serving.config import deployment_name

    app = serve.status().applications.get(APP)
    if app is None or deployment_name(MODEL) not in app.deployments:
        return {}
    return {str(k.value if hasattr(k, "value") else k): v
            for k, v in app.deployments[deployment_name(MODEL)].replica_states.items() if v}


def _running() -> int:
    return _replicas().get("RUNNING", 0)


@pytest.mark.timeout(300)
def test_serving_scales_replicas_and_nodes_with_load_and_back_without_failing_a_request(cluster):
    import socket

    import httpx
    from ray import serve

    from phantom_ray.serving.app import build_app

    _no_worker_nodes(cluster)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    statuses: list[tuple[str, int]] = []  # (phase, HTTP status) of every request
    phase = {"now": "start"}
    stop = threading.Event()

    def ask(client: httpx.Client, i: int) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"request {i}: what is shown?"}],
                "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        try:
            r = client.post(f"{base}/v1/chat/completions", json=body, timeout=120)
            statuses.append((phase["now"], r.status_code))
        except httpx.HTTPError as exc:  # a dropped connection counts as a failure too
            statuses.append((phase["now"], 599))
            print(f"request {i} failed: {exc!r}")

    def user(k: int, burst: threading.Event) -> None:
        with httpx.Client() as client:
            i = 0
            while not stop.is_set():
                if k > 0 and not burst.is_set():  # outside the burst only one user keeps asking
                    time.sleep(0.1)
                    continue
                ask(client, k * 100000 + i)
                i += 1

    with Sampler(extra=_replicas) as s:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        serve.run(build_app(_serve_args()), name=APP, route_prefix="/", blocking=False)
        _wait_for(lambda: _running() == 1, 180, "the first replica")

        def route_up() -> bool:
            try:
                return httpx.get(f"{base}/v1/models", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        _wait_for(route_up, 60, "the HTTP route")
        burst = threading.Event()
        users = [threading.Thread(target=user, args=(k, burst), daemon=True) for k in range(8)]
        for t in users:
            t.start()
        try:
            time.sleep(2)
            phase["now"] = "burst"
            burst.set()  # a bounded burst: 8 concurrent users until 3 replicas serve, at most 150 s
            _wait_for(lambda: _running() == MAX_WORKERS, 150, "3 running replicas")
            time.sleep(3)
            burst.clear()
            phase["now"] = "scale-down"  # one user keeps asking while the extra replicas drain and stop
            _wait_for(lambda: _replicas() == {"RUNNING": 1}, 90, "scale-down to one replica")
            # the nodes of the stopped replicas idle out (6 s) while the one replica keeps serving
            _wait_for(lambda: len(cluster.worker_nodes()) < MAX_WORKERS, 60, "an idle node to be removed")
            nodes_at_min = len(cluster.worker_nodes())
        finally:
            stop.set()
            for t in users:
                t.join(timeout=130)
        phase["now"] = "idle"
        serve.shutdown()
        _no_worker_nodes(cluster)
    print("\n" + s.format("serving (replica states)"))
    by_phase = {p: sorted({c for q, c in statuses if q == p}) for p in ("start", "burst", "scale-down")}
    counts = {p: sum(1 for q, _ in statuses if q == p) for p in ("start", "burst", "scale-down")}
    print(f"requests per phase {counts}, HTTP statuses {by_phase}; worker nodes at one replica: {nodes_at_min}")
    assert all(c == 200 for _, c in statuses), by_phase
    assert counts["burst"] > 0 and counts["scale-down"] > 0
    nodes = [n for _, n, _ in s.samples if n >= 0]
    assert max(nodes) == MAX_WORKERS, "the burst did not add worker nodes"
    assert nodes_at_min < MAX_WORKERS, "no node was released after the scale-down"


# ---- training ------------------------------------------------------------------------------------

@pytest.mark.timeout(600)
def test_training_survives_a_node_loss_and_keeps_its_data_position(cluster, s3_server, tmp_path, caplog):
    import logging

    from ray import cloudpickle

    import train_helpers
    from phantom_ray.train.config import TrainConfig
    from phantom_ray.train.ray_trainer import list_checkpoints, run_training
    from phantom_ray.train.recipe import read_trainer_states

    import boto3

    bucket = f"scale-train-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # 64 pairs, 2 workers x 4 per batch: 8 steps; checkpoints at 3, 6, 8; the node of rank 1 is killed at step 5
    cfg = TrainConfig.from_yaml(os.path.join(repo, "configs/train/tiny-cpu.yaml"), overrides=[
        f"data.shards=s3://{bucket}/packed", f"data.val_shards=s3://{bucket}/packed-val",
        f"run.storage_path=s3://{bucket}/runs", "run.name=node-loss", "synth.num_samples=64", "run.epochs=1",
        "data.batch_size=4", "run.checkpoint_every=3", "run.report_every=1", "run.val_every=null",
        "run.max_failures=2", "run.num_to_keep=null", "data.preprocess_num_cpus=0.25", "data.read_num_cpus=0.25",
        # one Ray Train worker per worker node (each node has one worker_slot), as one per GPU on a real cluster
        "scaling.resources_per_worker={CPU: 0.5, worker_slot: 1}"])
    _no_worker_nodes(cluster)
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    killed: dict = {}

    def killer():
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and not killed:
            marker = pid_dir / "rank1.pid"
            if marker.exists():
                pid = int(marker.read_text())
                node = cluster.node_of_pid(pid)
                killed.update(node=node, pids=cluster.kill_node(node), t=time.monotonic())
            time.sleep(0.2)

    node_ids: list[set[str]] = []

    def nodes():
        ids = {n["NodeID"] for n in cluster.worker_nodes()}
        node_ids.append(ids)
        return sorted(i[-2:] for i in ids)

    nodes.__name__ = "node ids"
    t = threading.Thread(target=killer, daemon=True)
    t.start()
    cloudpickle.register_pickle_by_value(train_helpers)  # the workers cannot import tests/
    caplog.set_level(logging.INFO, logger="phantom_ray.train.ray_trainer")
    with Sampler(extra=nodes) as s:
        t0 = time.monotonic()
        metrics = run_training(cfg, step_callbacks=[train_helpers.PauseAtStep(str(pid_dir), step=5, rank=1,
                                                                              pause_s=120)])
        t_run = time.monotonic() - t0
    t.join(timeout=5)
    resumes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resuming")]
    print("\n" + s.format("training, a node killed"))
    print(f"run {t_run:.1f}s; killed node {killed.get('node')} at step 5; {resumes}")
    assert killed, "the node of rank 1 was never killed"
    assert metrics["failures"] == 1 and metrics["step"] == 8
    assert len(resumes) == 1 and "(step 3," in resumes[0], resumes
    ckpts = list_checkpoints(cfg)
    assert [c["step"] for c in ckpts] == [3, 6, 8]
    consumed = []
    for sid in read_trainer_states(storage.download_dir(ckpts[-1]["uri"], str(tmp_path / "final"))).values():
        consumed.extend(sid["consumed"])
    assert len(consumed) == len(set(consumed)) == 64, "a sample was seen twice or skipped in the epoch"
    after = set().union(*[ids for ids in node_ids[-5:]])
    assert killed["node"] not in after
    assert len(set().union(*node_ids)) > 2, "no replacement node was started"
