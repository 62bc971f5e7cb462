"""Ray Serve deployments of Phantom models behind an OpenAI-compatible HTTP API.

``phantom_ray.serving.app:build_app`` is the Serve import path; the pieces below it are usable
without Ray: ``config`` (typed args), ``protocol`` (OpenAI request parsing, image limits),
``engine`` (dynamic batching), ``worker`` (one model's replica logic), ``api`` (FastAPI app).
Ray is imported only by ``app`` and ``cli``.
"""

from phantom_ray.serving.config import ModelSpec, ServeArgs, parse_args

__all__ = ["ModelSpec", "ServeArgs", "parse_args"]
