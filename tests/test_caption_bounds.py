"""Captioning's default replica ceiling scales with the cluster (phantom_ray.runtime.max_replicas):
from the autoscaler's cluster config where Ray exposes it, else from the resources the cluster has
now. Ray's two sources are replaced by fakes here (no Ray started): a few milliseconds."""

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
