"""Starting Ray for phantom_ray's own runs: ``init_ray(address=None, **kw)``.

Use this instead of a bare ``ray.init`` so every local run starts the same way:

* no dashboard unless asked for (``include_dashboard=True``): local jobs do not use it, it costs
  ~1 s of start-up and ~300 MB, and its usage-stats module probes cloud metadata addresses
  (169.254.169.254, metadata.google.internal) on every start, even with usage stats disabled;
* usage stats off (``RAY_USAGE_STATS_ENABLED=0``) unless the caller's environment set it;
* Ray's own logging stays at WARNING, so a CLI prints its own lines, not Ray's start-up chatter
  (worker output still reaches the console unless the caller passes ``log_to_driver=False``);
* ``address`` connects to an existing cluster (``"auto"`` or ``host:port``); then the cluster's
  own settings apply and only ``runtime_env``/namespace-like options are passed on.

An already-initialised Ray is reused (``ray.init`` would raise), so library code may call this
freely.
"""

from __future__ import annotations

import logging
import os
from typing import Any


def init_ray(address: str | None = None, **kw: Any):
    """Initialise Ray (or reuse the running one); returns the ``ray`` module."""
    import ray

    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kw.setdefault("logging_level", logging.WARNING)
    kw.setdefault("configure_logging", True)
    if kw.get("runtime_env"):
        kw["runtime_env"] = _without_job_env_vars(kw["runtime_env"])
    if address is None:
        kw.setdefault("include_dashboard", False)
    else:
        # connecting to a running cluster: options that describe a new local cluster are refused by Ray
        for key in ("num_cpus", "num_gpus", "include_dashboard", "object_store_memory", "resources"):
            kw.pop(key, None)
    ray.init(address=address, **kw)
    return ray


def _without_job_env_vars(runtime_env: dict) -> dict | None:
    """``runtime_env`` less the environment variables the submitted job's own runtime env already sets
    to the same value. Inside a Ray job (``ray job submit``, a KubeRay RayJob) Ray merges the job's
    runtime env with the driver's ``ray.init(runtime_env=...)`` and refuses any variable named in
    both, even with the same value: a job submitted with ``AWS_ENDPOINT_URL`` in its ``env_vars`` (an
    S3-compatible store) would fail where we hand our storage settings on. Other fields pass as given."""
    import json

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    env_vars = runtime_env.get("env_vars")
    if not raw or not env_vars:
        return runtime_env
    try:
        job_env = (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}
    except (ValueError, AttributeError):
        return runtime_env
    kept = {k: v for k, v in env_vars.items() if job_env.get(k) != v}
    out = {k: v for k, v in runtime_env.items() if k != "env_vars"}
    if kept:
        out["env_vars"] = kept
    return out or None


def resolve_num_gpus(num_gpus: float | None) -> float:
    """GPUs per model replica: ``num_gpus`` as given, or for None one GPU when the cluster has (or can
    autoscale to) GPUs, else 0 (CPU replicas). Starts Ray (through :func:`init_ray`) if needed."""
    if num_gpus is not None:
        return float(num_gpus)
    init_ray(log_to_driver=False)
    return 1.0 if cluster_ceiling("GPU") > 0 else 0.0


def cluster_ceiling(resource: str) -> float:
    """How much of ``resource`` the running cluster can have once its autoscaler has added every node
    it may: the autoscaler's cluster config where Ray exposes it (KubeRay and the cluster launcher
    publish each node group's resources and max count; Ray Train and Ray Data read the same figure),
    else (a fixed cluster, a local Ray) the cluster's resources now; the larger of the two. A node
    group without a max count gives ``sys.maxsize``. Call after Ray is initialised."""
    import ray

    limits: dict | None = None
    try:
        from ray._private import state as _state

        limits = _state.state.get_max_resources_from_cluster_config()
    except Exception as exc:  # an older Ray, or no GCS cluster config: fall back to the resources now
        logging.getLogger(__name__).debug("no autoscaler cluster config (%s); using current resources", exc)
    return max(float(ray.cluster_resources().get(resource, 0)), float((limits or {}).get(resource, 0) or 0))


def max_replicas(num_gpus: float, num_cpus: float) -> int | None:
    """The most replicas asking ``num_gpus`` / ``num_cpus`` each that the running cluster can hold
    once its autoscaler has added every node it may (:func:`cluster_ceiling`); ``None`` when a node
    group the replica fits on has no max count (the pool may grow without bound). At least 1."""
    import sys

    counts = []
    if num_gpus > 0:
        counts.append(cluster_ceiling("GPU") / num_gpus)
    if num_cpus > 0:
        counts.append(cluster_ceiling("CPU") / num_cpus)
    if not counts:
        return 1
    n = min(counts)
    if n >= sys.maxsize / 2:
        return None
    return max(1, int(n + 1e-9))
