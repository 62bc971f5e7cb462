"""How our runs fit the cluster they run on (phantom_ray.runtime), no Ray started:

- captioning's default replica ceiling scales with the cluster (``max_replicas``): from the
  autoscaler's cluster config where Ray exposes it, else from the resources the cluster has now
  (Ray's two sources are replaced by fakes), and the caption RayJob passes bounds that fill its group;
- inside a submitted Ray job, the driver's ``ray.init`` runtime env leaves out the variables the job's
  own runtime env sets (Ray refuses the merge otherwise)."""

from __future__ import annotations

import sys

import pytest


@pytest.fixture
def cluster(monkeypatch):
    """Set the cluster's current resources and the autoscaler's maximum (None: no cluster config)."""
    import ray
    from ray._private import state as ray_state

    def set_(now: dict, autoscaler_max: dict | None):
        monkeypatch.setattr(ray, "cluster_resources", lambda: dict(now))
        monkeypatch.setattr(ray_state.state, "get_max_resources_from_cluster_config", lambda: autoscaler_max)

    return set_


def test_gpu_replicas_up_to_every_gpu_the_autoscaler_may_add(cluster):
    from phantom_ray.runtime import max_replicas

    # the launcher / KubeRay cluster: a CPU head now, up to 4 x 8 GPUs and 16 x 64 CPUs
    cluster({"CPU": 0}, {"GPU": 32, "CPU": 4 * 192 + 16 * 64})
    assert max_replicas(num_gpus=1, num_cpus=1) == 32
    assert max_replicas(num_gpus=0.5, num_cpus=1) == 64
    assert max_replicas(num_gpus=0.25, num_cpus=8) == 128


def test_without_an_autoscaler_the_current_cluster_bounds_it(cluster):
    from phantom_ray.runtime import max_replicas

    cluster({"CPU": 2}, None)  # a local Ray on a 2-core machine
    assert max_replicas(num_gpus=0, num_cpus=1) == 2
    assert max_replicas(num_gpus=0, num_cpus=0.5) == 4
    assert max_replicas(num_gpus=0, num_cpus=4) == 1, "at least one replica"
    cluster({"CPU": 16, "GPU": 2}, None)
    assert max_replicas(num_gpus=1, num_cpus=1) == 2


def test_an_unbounded_node_group_means_no_ceiling(cluster):
    from phantom_ray.runtime import max_replicas

    cluster({"CPU": 8}, {"GPU": sys.maxsize, "CPU": sys.maxsize})
    assert max_replicas(num_gpus=1, num_cpus=1) is None


def test_the_larger_of_now_and_the_autoscaler_max(cluster):
    from phantom_ray.runtime import max_replicas

    # nodes started by hand beyond the autoscaler's groups still count
    cluster({"CPU": 64, "GPU": 16}, {"GPU": 8, "CPU": 64})
    assert max_replicas(num_gpus=1, num_cpus=1) == 16


def _cfg(**kw):
    from phantom_ray.caption.config import CaptionConfig

    return CaptionConfig.from_dict({"input": "/tmp/in", "output": "/tmp/out", "model": "tiny-qwen2", **kw})


def test_caption_default_max_replicas_follows_the_cluster(cluster):
    from phantom_ray.caption.job import replica_bounds

    cfg = _cfg()
    assert cfg.max_replicas is None, "the default is the cluster's ceiling, not a fixed number"
    cluster({"CPU": 0}, {"GPU": 32, "CPU": 1792})
    assert replica_bounds(cfg, num_gpus=1, chunks=1000) == (1, 32)
    assert replica_bounds(cfg, num_gpus=1, chunks=5) == (1, 5), "never more replicas than chunks"
    cluster({"CPU": 8}, {"GPU": sys.maxsize, "CPU": sys.maxsize})
    assert replica_bounds(cfg, num_gpus=1, chunks=7) == (1, 7)
    # explicit bounds are kept as given
    assert replica_bounds(_cfg(min_replicas=2, max_replicas=3), num_gpus=1, chunks=1000) == (2, 3)
    cluster({"CPU": 2}, None)
    assert replica_bounds(_cfg(min_replicas=2), num_gpus=0, chunks=1) == (2, 2), "min is honoured"


def test_caption_cli_leaves_max_replicas_to_the_cluster():
    import argparse

    from phantom_ray.caption.cli import add_arguments, config_from_args

    p = add_arguments(argparse.ArgumentParser())
    args = p.parse_args(["--input", "/tmp/in", "--output", "/tmp/out", "--model", "tiny-qwen2"])
    assert config_from_args(args).max_replicas is None
    args = p.parse_args(["--input", "/tmp/in", "--output", "/tmp/out", "--model", "tiny-qwen2", "--max-replicas", "4"])
    assert config_from_args(args).max_replicas == 4


def test_the_caption_rayjob_passes_bounds_that_fill_its_gpu_group():
    import cluster_files as cf

    argv = cf.rayjob_argv("rayjob-caption.yaml")
    low, high, gpus = (cf.option_value(argv, f) for f in ("--min-replicas", "--max-replicas", "--num-gpus"))
    assert low is not None and high is not None and gpus is not None, "the RayJob passes explicit bounds"
    spec = cf.manifest("rayjob-caption.yaml")["spec"]["rayClusterSpec"]
    (group,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu-8xh100"]
    (container,) = group["template"]["spec"]["containers"]
    gpus_per_pod = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert int(low) == 1 and group["minReplicas"] == 0, "start small: the autoscaler adds GPU pods as the pool grows"
    assert int(high) == group["maxReplicas"] * gpus_per_pod / float(gpus), (
        "--max-replicas is every GPU the group can grow to, divided by --num-gpus")


def test_inside_a_job_the_drivers_runtime_env_drops_the_jobs_own_variables(monkeypatch):
    """A job submitted with AWS_ENDPOINT_URL in its env_vars (an S3-compatible store): Ray refuses a
    ray.init runtime_env naming the same variable, so init_ray drops those the job already sets."""
    import json

    from phantom_ray.runtime import _without_job_env_vars

    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {"working_dir": "gcs://x.zip", "env_vars": {"AWS_ENDPOINT_URL": "http://s3.local", "A": "1"}}}))
    ours = {"env_vars": {"AWS_ENDPOINT_URL": "http://s3.local", "AWS_REGION": "us-east-1"}}
    assert _without_job_env_vars(ours) == {"env_vars": {"AWS_REGION": "us-east-1"}}
    assert _without_job_env_vars({"env_vars": {"AWS_ENDPOINT_URL": "http://s3.local"}}) is None
    # a different value is a real conflict: left for Ray to report
    assert _without_job_env_vars({"env_vars": {"A": "2"}}) == {"env_vars": {"A": "2"}}
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert _without_job_env_vars(ours) == ours
