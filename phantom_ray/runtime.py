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
    if address is None:
        kw.setdefault("include_dashboard", False)
    else:
        # connecting to a running cluster: options that describe a new local cluster are refused by Ray
        for key in ("num_cpus", "num_gpus", "include_dashboard", "object_store_memory", "resources"):
            kw.pop(key, None)
    ray.init(address=address, **kw)
    return ray


def max_replicas(num_gpus: float, num_cpus: float) -> int | None:
    """The most replicas asking ``num_gpus`` / ``num_cpus`` each that the running cluster can hold
    once its autoscaler has added every node it may.

    The ceiling comes from the autoscaler's cluster config where Ray exposes it (KubeRay and the
    cluster launcher publish each node group's resources and max count; Ray Train and Ray Data read
    the same figure), else from the resources the cluster has now (a fixed cluster, a local Ray).
    ``None`` when a node group the replica fits on has no max count (the pool may grow without
    bound). Always at least 1. Call after Ray is initialised.
    """
    import sys

    import ray

    limits: dict | None = None
    try:
        from ray._private import state as _state

        limits = _state.state.get_max_resources_from_cluster_config()
    except Exception as exc:  # an older Ray, or no GCS cluster config: fall back to the resources now
        logging.getLogger(__name__).debug("no autoscaler cluster config (%s); using current resources", exc)
    now = ray.cluster_resources()

    def ceiling(key: str) -> float:
        return max(float(now.get(key, 0)), float((limits or {}).get(key, 0) or 0))

    counts = []
    if num_gpus > 0:
        counts.append(ceiling("GPU") / num_gpus)
    if num_cpus > 0:
        counts.append(ceiling("CPU") / num_cpus)
    if not counts:
        return 1
    n = min(counts)
    if n >= sys.maxsize / 2:
        return None
    return max(1, int(n + 1e-9))
