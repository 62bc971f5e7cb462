"""OpenAI-compatible judge client for the judge-scored benchmarks (MM-Vet, MM-Vet-v2, LLaVA-W,
LLaVA-Wilder, MathVista, MathVerse).

Configured only from the environment, never from files in the repo:

* ``PHANTOM_JUDGE_BASE_URL``: the API root, e.g. ``https://api.openai.com/v1`` or a local vLLM
  ``http://127.0.0.1:8000/v1`` (``/chat/completions`` is appended);
* ``PHANTOM_JUDGE_API_KEY``: sent as ``Authorization: Bearer ...``;
* ``PHANTOM_JUDGE_MODEL`` (optional): defaults to ``gpt-4-0613``, the grader the original used.

With no URL/key set, :func:`judge_from_env` returns ``None`` and the judge-scored benchmarks are
reported as skipped with :data:`SKIP_MESSAGE` (their predictions are still written).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

ENV_BASE_URL = "PHANTOM_JUDGE_BASE_URL"
ENV_API_KEY = "PHANTOM_JUDGE_API_KEY"
ENV_MODEL = "PHANTOM_JUDGE_MODEL"
DEFAULT_MODEL = "gpt-4-0613"

SKIP_MESSAGE = (
    f"skipped: no judge configured (set {ENV_BASE_URL} and {ENV_API_KEY}, optionally {ENV_MODEL}; "
    "predictions were written and can be scored later)"
)


class JudgeError(RuntimeError):
    """The judge endpoint failed after retries or answered in an unusable shape."""


@dataclass
class JudgeConfig:
    base_url: str
    api_key: str
    model: str = DEFAULT_MODEL
    timeout_s: float = 120.0
    max_retries: int = 4
    retry_wait_s: float = 2.0

    def __post_init__(self):
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"{ENV_BASE_URL} must be an http(s) URL, got {self.base_url!r}")
        if not self.api_key:
            raise ValueError(f"{ENV_API_KEY} is empty")
        if self.max_retries < 0:
            raise ValueError("JudgeConfig.max_retries must be >= 0")


class JudgeClient:
    """Minimal chat-completions client (httpx). ``transport`` lets tests plug a mock server."""

    def __init__(self, config: JudgeConfig, transport: Any = None):
        import httpx

        self.config = config
        self._client = httpx.Client(base_url=config.base_url.rstrip("/") + "/", timeout=config.timeout_s,
                                    transport=transport,
                                    headers={"Authorization": f"Bearer {config.api_key}"})

    def chat(self, messages: list[dict[str, str]], *, temperature: float = 0.0, max_tokens: int | None = None) -> str:
        """The first choice's message content; retries transport errors, 429 and 5xx."""
        import httpx

        body: dict[str, Any] = {"model": self.config.model, "messages": messages, "temperature": temperature}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        last = ""
        for attempt in range(self.config.max_retries + 1):
            try:
                resp = self._client.post("chat/completions", json=body)
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if resp.status_code == 200:
                    try:
                        return resp.json()["choices"][0]["message"]["content"] or ""
                    except (ValueError, KeyError, IndexError, TypeError) as exc:
                        raise JudgeError(f"judge answered 200 without choices[0].message.content: {resp.text[:200]}") from exc
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                if resp.status_code not in (408, 409, 429) and resp.status_code < 500:
                    break  # a client error will not get better by retrying
            if attempt < self.config.max_retries:
                time.sleep(self.config.retry_wait_s * (2 ** attempt))
        raise JudgeError(f"judge {self.config.base_url} model {self.config.model} failed: {last}")

    def ask(self, prompt: str, *, system: str | None = None, temperature: float = 0.0,
            max_tokens: int | None = None) -> str:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return self.chat(messages, temperature=temperature, max_tokens=max_tokens)

    def close(self) -> None:
        self._client.close()


def judge_config_from_env(environ: dict[str, str] | None = None) -> JudgeConfig | None:
    env = os.environ if environ is None else environ
    url, key = env.get(ENV_BASE_URL, "").strip(), env.get(ENV_API_KEY, "").strip()
    if not url or not key:
        return None
    return JudgeConfig(base_url=url, api_key=key, model=env.get(ENV_MODEL, "").strip() or DEFAULT_MODEL)


def judge_from_env(environ: dict[str, str] | None = None, transport: Any = None) -> JudgeClient | None:
    """A client when ``PHANTOM_JUDGE_BASE_URL`` and ``PHANTOM_JUDGE_API_KEY`` are set, else None."""
    config = judge_config_from_env(environ)
    return JudgeClient(config, transport=transport) if config else None
