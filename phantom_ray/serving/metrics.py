"""Per-model serving metrics: request count, latency, time to first token, tokens/s, batch size.

``ServingMetrics`` keeps running totals in the replica (returned by the deployment's ``stats()``) and,
inside Ray, also records them as Ray Serve metrics (exported by Ray's Prometheus endpoint with the
``model`` tag), e.g. ``ray_phantom_requests_total{model="phantom-7b",status="ok"}``.

``GET /metrics`` of the API (Prometheus text): every replica renders :meth:`ServingMetrics.prometheus_text`
(our ``phantom_*`` totals and, on the vllm engine, vLLM's own engine metrics ``vllm:*``: running and
waiting requests, KV-cache use, time to first token, prompt/generation token counters, ... each
labelled ``model_name``), and :func:`merge_prometheus` joins the replicas' texts with a ``replica``
label, one family per metric name.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)

_LATENCY_BOUNDARIES_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
_TOKENS_PER_S_BOUNDARIES = [1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000]
_BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]


class ServingMetrics:
    """Thread-safe totals of one model's replica, mirrored to Ray Serve metrics when ``use_ray``."""

    def __init__(self, model: str, use_ray: bool = False):
        self.model = model
        self._lock = threading.Lock()
        self.requests = {"ok": 0, "error": 0}
        self.batches = 0
        self.batch_size_sum = 0
        self.max_batch_size = 0
        self.completion_tokens = 0
        self.latency_sum_s = 0.0
        self.ttft_sum_s = 0.0
        self.ttft_count = 0
        self._ray = self._ray_metrics() if use_ray else None

    def _ray_metrics(self):
        from ray.serve import metrics

        tags = ("model",)
        m = {
            "requests": metrics.Counter("phantom_requests_total", description="chat completions finished",
                                        tag_keys=("model", "status")),
            "latency": metrics.Histogram("phantom_request_latency_s", description="request latency (s)",
                                         boundaries=_LATENCY_BOUNDARIES_S, tag_keys=tags),
            "ttft": metrics.Histogram("phantom_time_to_first_token_s", description="time to first token (s)",
                                      boundaries=_LATENCY_BOUNDARIES_S, tag_keys=tags),
            "tps": metrics.Histogram("phantom_tokens_per_s", description="decode tokens/s per request",
                                     boundaries=_TOKENS_PER_S_BOUNDARIES, tag_keys=tags),
            "tokens": metrics.Counter("phantom_completion_tokens_total", description="generated tokens",
                                      tag_keys=tags),
            "batch": metrics.Histogram("phantom_batch_size", description="requests per batched generate",
                                       boundaries=_BATCH_BOUNDARIES, tag_keys=tags),
        }
        for metric in m.values():
            metric.set_default_tags({"model": self.model})
        return m

    # ---- engine hooks (called from the generation thread) ----------------------------------------
    def batch(self, size: int) -> None:
        with self._lock:
            self.batches += 1
            self.batch_size_sum += size
            self.max_batch_size = max(self.max_batch_size, size)
        if self._ray:
            self._ray["batch"].observe(size)

    def first_token(self, ttft_s: float) -> None:
        with self._lock:
            self.ttft_sum_s += ttft_s
            self.ttft_count += 1
        if self._ray:
            self._ray["ttft"].observe(ttft_s)

    def finished(self, latency_s: float, completion_tokens: int, decode_s: float, status: str) -> None:
        with self._lock:
            self.requests[status] = self.requests.get(status, 0) + 1
            self.completion_tokens += completion_tokens
            self.latency_sum_s += latency_s
        if self._ray:
            self._ray["requests"].inc(tags={"status": status})
            self._ray["latency"].observe(latency_s)
            if completion_tokens:
                self._ray["tokens"].inc(completion_tokens)
            if decode_s > 0 and completion_tokens:
                self._ray["tps"].observe(completion_tokens / decode_s)

    def rejected(self, status: str) -> None:
        """A request refused before generation (bad image, prompt too long)."""
        self.finished(0.0, 0, 0.0, status)

    def prometheus_text(self, engine_metrics: bool = False) -> str:
        """Our totals as Prometheus families (``model_name`` label), plus vLLM's engine metrics of
        this process (the async engine's ``PrometheusStatLogger``) when ``engine_metrics``."""
        from prometheus_client import generate_latest
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snap = self.snapshot()
        label = ["model_name"]
        requests = CounterMetricFamily("phantom_requests", "requests finished", labels=["model_name", "status"])
        for status, count in snap["requests"].items():
            requests.add_metric([self.model, status], count)
        tokens = CounterMetricFamily("phantom_completion_tokens", "tokens generated", labels=label)
        tokens.add_metric([self.model], snap["completion_tokens"])
        ttft = GaugeMetricFamily("phantom_mean_time_to_first_token_seconds", "mean time to first token",
                                 labels=label)
        ttft.add_metric([self.model], snap["mean_ttft_s"])
        families = [requests, tokens, ttft]
        if engine_metrics:
            from prometheus_client import REGISTRY

            families += [f for f in REGISTRY.collect() if f.name.startswith("vllm:")]
        return generate_latest(_Families(families)).decode()

    def snapshot(self) -> dict:
        with self._lock:
            n = sum(self.requests.values())
            return {
                "model": self.model,
                "requests": dict(self.requests),
                "batches": self.batches,
                "mean_batch_size": self.batch_size_sum / self.batches if self.batches else 0.0,
                "max_batch_size": self.max_batch_size,
                "completion_tokens": self.completion_tokens,
                "mean_latency_s": self.latency_sum_s / n if n else 0.0,
                "mean_ttft_s": self.ttft_sum_s / self.ttft_count if self.ttft_count else 0.0,
            }


class _Families:
    """A fixed list of metric families in the shape ``prometheus_client.generate_latest`` reads."""

    def __init__(self, families):
        self.families = list(families)

    def collect(self):
        return self.families


def merge_prometheus(texts: list[tuple[str, str]]) -> str:
    """Prometheus texts of several replicas, ``[(replica id, text)]``, as one text: every sample gets
    a ``replica`` label and each metric name is one family (``*_created`` series are left out)."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    merged: dict[str, object] = {}
    for replica, text in sorted(texts):
        for fam in text_string_to_metric_families(text):
            if fam.name.endswith("_created"):
                continue
            samples = [s._replace(labels={**s.labels, "replica": replica})
                       for s in fam.samples if not s.name.endswith("_created")]
            if fam.name in merged:
                merged[fam.name].samples.extend(samples)
            else:
                fam.samples = samples
                merged[fam.name] = fam
    return generate_latest(_Families(merged.values())).decode()
