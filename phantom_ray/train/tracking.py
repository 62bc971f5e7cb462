"""Training curves: written by rank 0 into the run directory, next to the checkpoints.

Every report (``run.report_every`` steps) and every validation appends one JSON object to
``<run dir>/metrics.jsonl`` (always, whatever ``run.tracking`` says; the quickstart draws its curves
from it) and, per ``run.tracking``:

* ``tensorboard`` (default): event files under ``<run dir>/tensorboard/`` (tensorboardX's writer:
  protobuf only, no TensorFlow or tensorboard server needed to write them);
  ``tensorboard --logdir <run dir>/tensorboard`` shows them;
* ``mlflow``: ``mlflow.log_metrics`` into ``run.mlflow_tracking_uri`` (default ``<run dir>/mlruns``);
* ``none``: metrics.jsonl only.

metrics.jsonl schema, one object per line: ``{"step": int, "time": unix seconds, "split": "train" |
"val", <scalar name>: float, ...}``. Train lines carry ``loss``, ``sft_loss``, ``pref_loss``,
``reward_margin``, ``pref_accuracy``, ``lr``, ``grad_norm``, ``tokens_per_s`` (real, non-pad tokens),
``samples_per_s``, ``row_fill`` (real tokens / row slots), ``epoch`` (and ``mfu`` on known GPUs);
val lines carry ``val/loss``, ``val/sft_loss``, ``val/pref_loss``, ``val/reward_margin``,
``val/pref_accuracy`` and, on the synthetic corpus, ``val/heldout_accuracy``.

With an ``s3://`` run directory the files are written to a local folder and uploaded after every
write (they are small).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time

from phantom_ray import storage

log = logging.getLogger(__name__)

CURVES = ("loss", "sft_loss", "pref_loss", "reward_margin", "pref_accuracy", "lr", "grad_norm", "tokens_per_s",
          "samples_per_s", "row_fill", "mfu", "epoch")


class Tracker:
    def __init__(self, run_dir: str, backend: str = "tensorboard", run_name: str = "run",
                 mlflow_tracking_uri: str | None = None, params: dict | None = None):
        self.run_dir = run_dir
        self.remote = storage.is_s3(run_dir)
        self.local = tempfile.mkdtemp(prefix="phantom-curves-") if self.remote else run_dir
        os.makedirs(self.local, exist_ok=True)
        self.jsonl = os.path.join(self.local, "metrics.jsonl")
        if self.remote and storage.exists(storage.join(run_dir, "metrics.jsonl")):  # a resumed run appends
            with open(self.jsonl, "wb") as f:
                f.write(storage.read_bytes(storage.join(run_dir, "metrics.jsonl")))
        self.backend = backend
        self.tb = self.mlflow = None
        if backend == "tensorboard":
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(self.local, "tensorboard"))
        elif backend == "mlflow":
            try:
                import mlflow
            except ImportError:
                raise ImportError("run.tracking='mlflow' needs the mlflow package (pip install mlflow)") from None
            uri = mlflow_tracking_uri or ("file://" + os.path.join(self.local, "mlruns"))
            mlflow.set_tracking_uri(uri)
            mlflow.set_experiment(run_name)
            mlflow.start_run(run_name=run_name)
            if params:
                mlflow.log_params(params)
            self.mlflow = mlflow
        elif backend != "none":
            raise ValueError(f"run.tracking={backend!r}: expected tensorboard, mlflow or none")

    def log(self, step: int, metrics: dict, split: str = "train") -> dict:
        """Write the finite scalars of ``metrics`` at ``step``; returns the line written."""
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k != "step" and math.isfinite(float(v))}
        line = {"step": int(step), "time": time.time(), "split": split, **scalars}
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(line) + "\n")
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k if split == "train" or k.startswith(split) else f"{split}/{k}", v, step)
            self.tb.flush()
        if self.mlflow is not None:
            self.mlflow.log_metrics({k.replace("/", "_"): v for k, v in scalars.items()}, step=int(step))
        if self.remote:
            self._upload()
        return line

    def _upload(self) -> None:
        storage.upload_dir(self.local, self.run_dir)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            self.mlflow.end_run()
        if self.remote:
            self._upload()


def read_metrics(run_dir: str) -> list[dict]:
    """The lines of ``<run dir>/metrics.jsonl`` (empty when the run wrote none yet)."""
    uri = storage.join(run_dir, "metrics.jsonl")
    if not storage.exists(uri):
        return []
    return [json.loads(x) for x in storage.read_text(uri).splitlines() if x.strip()]
