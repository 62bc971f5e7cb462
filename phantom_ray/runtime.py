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


def resolve_num_gpus(num_gpus: float | None) -> float:
    """GPUs per model replica: ``num_gpus`` as given, or for None one GPU when the cluster has (or can
    autoscale to) GPUs, else 0 (CPU replicas). Starts Ray (through :func:`init_ray`) if needed."""
    if num_gpus is not None:
        return float(num_gpus)
    ray = init_ray(log_to_driver=False)
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
