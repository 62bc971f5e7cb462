"""``make_predict_fn``: benchmark items -> predictions through the one generation engine.

eval sits above infer: this module imports the engine (``phantom_ray.infer.api``) and eval's Ray
Data generation stages (``phantom_ray.eval.stages``); infer never imports eval.

    predict_fn = make_predict_fn("BK-Lee/Phantom-0.5B", num_beams=3)   # the original harness
    run_eval("sqa,pope", data_root, output, predict_fn)
"""

from __future__ import annotations

import collections
import io
import logging
from typing import Any, Callable

from phantom_ray.infer.api import Request, SamplingParams

log = logging.getLogger(__name__)


def _item_image_bytes(refs: list) -> bytes | None:
    """One image for an eval item: the file bytes as is, several concatenated (original harness) as PNG."""
    from phantom_ray.eval.images import concat_horizontally, image_bytes
    from phantom_ray.ingest import load_image

    if not refs:
        return None
    if len(refs) == 1:
        return image_bytes(refs[0])
    buf = io.BytesIO()
    concat_horizontally([load_image(r) for r in refs]).save(buf, format="PNG")
    return buf.getvalue()


def make_predict_fn(model: str, num_beams: int = 1, batch_size: int = 8, *, engine: str = "auto",
                    min_replicas: int = 1,
                    max_replicas: int = 1, num_gpus: float | None = None, num_cpus: float = 1.0,
                    decode_num_cpus: float = 1.0, decode_concurrency: int | None = None, dtype: str = "auto",
                    seed: int = 0, max_length: int = 4096, use_ray: bool = True,
                    **sampling) -> Callable[[list], list[str]]:
    """``predict_fn(items) -> list[str]`` for :func:`phantom_ray.eval.run_eval`: each item's
    ``user_text()`` and image(s) go through the Ray Data decode tasks and the generation actor pool
    (``use_ray=False``: one in-process engine), with each item's own ``max_new_tokens``. Greedy by
    default; ``num_beams=3`` is the original harness; ``sampling``: other :class:`SamplingParams`
    fields. A failed item (bad image) predicts "". ``engine``: ``auto`` (vllm where installed, torch
    for beam search), ``torch`` or ``vllm`` (refuses ``num_beams > 1``: beam search is torch-only)."""
    from phantom_ray.eval.stages import StageOptions, build_generation_dataset
    from phantom_ray.infer.api import resolve_backend

    params = SamplingParams(num_beams=num_beams, **sampling)
    backend = resolve_backend(engine, num_beams, "eval")
    log.info("eval generation on engine %s", backend)
    opts = StageOptions(model=model, generation=params, engine=backend, batch_size=batch_size, min_replicas=min_replicas,
                        max_replicas=max_replicas, num_gpus=num_gpus, num_cpus=num_cpus,
                        decode_num_cpus=decode_num_cpus, decode_concurrency=decode_concurrency, dtype=dtype,
                        seed=seed, max_length=max_length)
    state: dict[str, Any] = {}

    def predict_local(items: list) -> list[str]:
        from phantom_ray.infer.api import load_engine

        if "engine" not in state:
            state["engine"] = load_engine(model, backend=backend, dtype=dtype, seed=seed, max_length=max_length)
        engine = state["engine"]
        out: list[str | None] = [None] * len(items)
        by_len: dict[int, list[int]] = collections.defaultdict(list)
        for i, it in enumerate(items):
            by_len[int(it.max_new_tokens)].append(i)
        for max_new, idx in by_len.items():
            p = params.replace(max_tokens=max_new)
            reqs = []
            for i in idx:
                image = _item_image_bytes(items[i].images)
                reqs.append(Request(messages=[{"role": "user", "content": items[i].user_text()}],
                                    images=[image] if image is not None else [], params=p, key=str(items[i].id)))
            for i, g in zip(idx, engine.generate(reqs, batch_size=batch_size)):
                out[i] = _prediction(items[i], g.text.strip() if g.text is not None else None, g.error,
                                     g.error_detail)
        return out

    def predict_ray(items: list) -> list[str]:
        rows = [{"key": str(i), "shard": None, "uri": None, "image": _item_image_bytes(it.images),
                 "prompt": it.user_text(), "max_tokens": int(it.max_new_tokens)} for i, it in enumerate(items)]
        got: dict[int, str] = {}
        for batch in build_generation_dataset(rows, opts).iter_batches(batch_format="pyarrow", batch_size=None):
            for r in batch.to_pylist():
                i = int(r["key"])
                got[i] = _prediction(items[i], r["caption"], r["error"], r["error_detail"])
        missing = [i for i in range(len(items)) if i not in got]
        if missing:
            raise RuntimeError(f"generation returned no answer for {len(missing)} items (first: {items[missing[0]].id})")
        return [got[i] for i in range(len(items))]

    predict = predict_ray if use_ray else predict_local
    predict.engine = backend  # the backend that runs, for the results' settings
    return predict


def _prediction(item, text: str | None, error: str | None, detail: str | None) -> str:
    if error:
        log.warning("%s/%s: no prediction (%s: %s)", item.benchmark, item.id, error, detail)
        return ""
    return text or ""


__all__ = ["make_predict_fn"]
