"""Ray Serve application: one deployment per Phantom model behind one OpenAI-compatible ingress.

    serve run phantom_ray.serving.app:build_app --address auto ...     # or, with a config file:
    serve deploy serve/gpu-cluster.yaml
    phantom-ray serve --config serve/local-cpu.yaml --port 8000

``build_app(args)`` validates ``args`` (``phantom_ray.serving.config.ServeArgs``) and binds:

* ``PhantomModel-<name>`` per model: a replica loads the checkpoint (``ModelWorker``) and batches
  concurrent requests into one generation (its engine, ``phantom_ray.infer.api``); it has its own resources
  (fractional GPUs allowed), ``max_ongoing_requests``, ``max_queued_requests`` and autoscaling;
* ``PhantomIngress``: the FastAPI app of ``phantom_ray.serving.api``, routing by the ``model`` field
  to the model deployments' handles (streaming calls). A model whose queue is full answers 503.

A model on ``engine: vllm`` holds vLLM's async engine (``phantom_ray.vllm.engine.VLLMEngine``) in
its replica; vLLM's engine core runs in a child process of the replica actor, inherits the actor's
environment (the application's and the model's ``runtime_env`` ``env_vars``) and is shut down when
Serve stops the replica (``__del__``). Its concurrency is vLLM's own (``max_num_seqs``,
``max_num_batched_tokens``, the KV-cache share; unset: vLLM's defaults for the device), bounded by
what Serve hands the replica (``max_ongoing_requests``).

The OpenAI surface vLLM has (``/v1/completions``, ``n``, ``logprobs``/``top_logprobs``,
``response_format`` JSON schemas, ``seed``, ``/metrics`` with vLLM's engine metrics) is served by
OUR ingress over vLLM's ``AsyncLLM`` features (``SamplingParams.logprobs``, ``structured_outputs``,
per-request seeds, its ``PrometheusStatLogger``), not by ``ray.serve.llm``'s ``LLMServer`` behind a
custom ingress, nor by vLLM's own OpenAI serving classes. Why:

* one request path for both engines: the ingress validates a request once (API keys, the
  image-URL allowlist with SSRF checks, body/image/prompt limits of ``phantom_ray.ingest``, our
  error shapes, ``unsupported_parameter`` for what an engine cannot do) and the replica answers it
  through the ``Engine`` interface, so the torch engine answers the same requests or refuses them
  with a 400 naming the engine, and per-engine tests compare like with like;
* Phantom's processor builds every prompt (chat template, tiling) and vLLM gets token ids: the vLLM
  answer equals the torch engine's, greedy, for chats and raw prompts alike; ``LLMServer`` and
  vLLM's serving classes render chats themselves and fetch image URLs themselves (outside our
  allowlist, limits and SSRF checks), so every request field would have to be re-validated in
  front of them anyway and two prompt builders kept equal;
* ``LLMServer`` puts its own deployment, autoscaling and config (``LLMConfig``) in place of
  ``ModelSpec``; our replicas keep one config, Serve's back-pressure (503) and per-model resources.
  ``ray.serve.llm`` still serves our exports as they are (docs/vllm.md), for users who want it.

``GET /metrics``: the ingress asks every replica of every model (``DeploymentHandle.broadcast``;
a scrape is a control-plane call, seconds apart) for its Prometheus text and joins them with a
``replica`` label (``phantom_ray.serving.metrics``).
"""

from __future__ import annotations

import logging
import os
from typing import AsyncIterator

from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from phantom_ray.serving.api import Frontend, create_api
from phantom_ray.serving.config import ServeArgs, parse_args
from phantom_ray.serving.protocol import APIError
from phantom_ray.serving.worker import ModelWorker

log = logging.getLogger(__name__)


@serve.deployment
class PhantomModelDeployment:
    """A replica of one model: batched generation, events streamed back to the ingress."""

    def __init__(self, spec: dict, max_image_pixels: int):
        self.worker = ModelWorker(spec, max_image_pixels=max_image_pixels, use_ray_metrics=True)

    async def generate(self, payload: dict) -> AsyncIterator[dict]:
        async for event in self.worker.generate(payload):
            yield event

    def stats(self) -> dict:
        return self.worker.stats()

    def metrics_text(self) -> tuple[str, str]:
        """(this replica's id, its metrics in Prometheus' text format)."""
        return serve.get_replica_context().replica_id.unique_id, self.worker.metrics_text()

    def __del__(self):
        # Serve calls this when it stops the replica (scale-down, redeploy, shutdown): the vLLM engine's
        # engine-core process is a child of this actor and must not outlive it holding the GPU/KV cache
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.close()


class _HandleBackend:
    """Reaches a model deployment through its handle, as a stream of engine events."""

    def __init__(self, name: str, handle: DeploymentHandle):
        self.name = name
        self.handle = handle.options(stream=True)
        self.control = handle

    async def metrics_texts(self) -> list[tuple[str, str]]:
        """(replica id, Prometheus text) of every running replica of this model."""
        return list(await self.control.broadcast("metrics_text").results_async())

    async def stream(self, payload: dict) -> AsyncIterator[dict]:
        try:
            async for event in self.handle.generate.remote(payload):
                yield event
        except BackPressureError as exc:
            raise APIError(503, f"model {self.name!r} is at capacity (its request queue is full); retry later",
                           "model_overloaded", headers={"Retry-After": "1"}) from exc


@serve.deployment
@serve.ingress()
class PhantomIngress:
    """OpenAI-compatible HTTP front; the FastAPI app is built per replica from the model handles."""

    def __init__(self, args: dict, handles: dict[str, DeploymentHandle]):
        self.args = parse_args(args)
        keys: list[str] = []
        if self.args.api_keys_env:
            keys = [k.strip() for k in os.environ.get(self.args.api_keys_env, "").split(",") if k.strip()]
            if not keys:
                log.warning("api_keys_env=%s is unset or empty: the API accepts requests without a key",
                            self.args.api_keys_env)
        backends = {name: _HandleBackend(name, h) for name, h in handles.items()}
        from ray.serve import metrics

        self._http_requests = metrics.Counter("phantom_http_requests_total", description="HTTP responses",
                                              tag_keys=("route", "status"))
        self.backends = backends
        self.frontend = Frontend(self.args, backends, api_keys=keys, on_response=self._count, metrics=self._metrics)

    async def _metrics(self) -> str:
        import asyncio

        from phantom_ray.serving.metrics import merge_prometheus

        per_model = await asyncio.gather(*(b.metrics_texts() for b in self.backends.values()))
        return merge_prometheus([pair for texts in per_model for pair in texts])

    def _count(self, path: str, status: int) -> None:
        route = path if path in ("/health", "/metrics", "/v1/models", "/v1/chat/completions",
                                 "/v1/completions") else "other"
        self._http_requests.inc(tags={"route": route, "status": str(status)})

    def __serve_build_asgi_app__(self):
        return create_api(self.frontend)


def build_app(args: dict | ServeArgs) -> serve.Application:
    """The Serve application for ``args`` (the ``args`` block of a Serve config file)."""
    parsed = parse_args(args)
    handles = {}
    for spec in parsed.models:
        handles[spec.name] = PhantomModelDeployment.options(**spec.deployment_options()).bind(
            spec.model_dump(), parsed.max_image_pixels)
    return PhantomIngress.options(
        ray_actor_options={"num_cpus": parsed.ingress_num_cpus},
        num_replicas=parsed.ingress_num_replicas,
        max_ongoing_requests=parsed.ingress_max_ongoing_requests,
    ).bind(parsed.model_dump(), handles)
