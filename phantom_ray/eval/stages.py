"""Eval's Ray Data generation stages (used by :func:`phantom_ray.eval.predict.make_predict_fn`):
decode tasks (image bytes -> tokenized prompt + pixels, on CPU) feeding a generation actor pool
(``Captioner`` on the torch engine), or one ``VLLMCaptioner`` actor stage on the vllm engine (vLLM
opens and tiles images itself). Bucket captioning (``phantom_ray.caption``) has its own stage.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass

from phantom_ray import storage
from phantom_ray.caption.stage import actor_pool
from phantom_ray.errors import clean_detail, row_reason
from phantom_ray.infer.api import Generation, SamplingParams

DECODE_MEMORY_BYTES = 512 * 1024 * 1024  # reserved per decode task (an 8K x 8K RGB image is 200 MB decoded)
VLLM_MIN_BATCH = 64          # rows per vllm actor call (each row a request submitted at once)
VLLM_BATCHES_PER_ACTOR = 4   # calls one vllm actor works on at once: 256 requests in flight


def load_processor(model_id: str, max_length: int, max_pixels: int | None):
    """The model's processor without its weights (config.json + tokenizer files only); cached per
    worker process, so a decode task pays for the tokenizer once."""
    from phantom_ray.loader import load_processor as _load

    return _load(model_id, max_length, max_pixels)


def _decoded_schema():
    import pyarrow as pa

    return pa.schema([
        ("key", pa.string()), ("shard", pa.string()), ("max_tokens", pa.int32()),
        ("input_ids", pa.list_(pa.int32())), ("pixel_values", pa.binary()), ("pixel_shape", pa.list_(pa.int32())),
        ("num_tiles", pa.int32()), ("error", pa.string()), ("error_detail", pa.string()),
    ])


def _read_image(row: dict, max_image_bytes: int | None) -> bytes | None:
    """One row's encoded image: its bytes as given, or read from its URI (:func:`phantom_ray.ingest.read_uri`);
    more than ``max_image_bytes`` (None: the ingest limit) is an ``image_too_large`` ImageError."""
    from phantom_ray.ingest import DEFAULT_MAX_BYTES, ImageError, read_uri

    if row.get("image") is not None:
        data = bytes(row["image"])
    elif row.get("uri"):
        data = read_uri(row["uri"])
    else:
        return None
    limit = max_image_bytes or DEFAULT_MAX_BYTES
    if len(data) > limit:
        raise ImageError("image_too_large", f"{row.get('uri') or 'image'} is {len(data)} bytes, over the limit of {limit}")
    return data


def decode_batch(batch, model_id: str, max_length: int, max_pixels: int | None, max_image_bytes: int | None):
    """Rows (key, shard, uri | image bytes, prompt, max_tokens) -> tokenized prompts and
    float32 pixel values; a bad image or prompt becomes a row with ``error`` set."""
    import pyarrow as pa

    from phantom_ray.data.schema import encode_pixels
    from phantom_ray.processing import ProcessingError

    processor = load_processor(model_id, max_length, max_pixels)
    out = []
    for row in batch.to_pylist():
        rec = {"key": row["key"], "shard": row.get("shard"), "max_tokens": row.get("max_tokens"),
               "input_ids": None, "pixel_values": None, "pixel_shape": None, "num_tiles": 0,
               "error": None, "error_detail": None}
        try:
            data = _read_image(row, max_image_bytes)
            sample = processor.encode_prompt(row["prompt"], images=data)
        except ProcessingError as exc:
            rec["error"], rec["error_detail"] = row_reason(exc.reason), clean_detail(str(exc))
        else:
            rec["input_ids"] = sample.input_ids.tolist()
            rec["num_tiles"] = sum(sample.num_tiles)
            # float32 pixels: eval compares with an in-process run, which never rounds them
            rec["pixel_values"], rec["pixel_shape"] = encode_pixels(sample.pixel_values, "float32")
        out.append(rec)
    return pa.Table.from_pylist(out, schema=_decoded_schema())


# ---- stage 2: generate (actor pool) ------------------------------------------------------------

def _caption_schema():
    import pyarrow as pa

    return pa.schema([
        ("key", pa.string()), ("shard", pa.string()), ("caption", pa.string()), ("num_tiles", pa.int32()),
        ("generated_tokens", pa.int32()), ("finish_reason", pa.string()), ("error", pa.string()),
        ("error_detail", pa.string()),
    ])


class Captioner:
    """map_batches callable class: loads the model once per actor and generates for its batches."""

    def __init__(self, model_id: str, generation: dict, batch_size: int, dtype: str = "auto",
                 attn_implementation: str = "sdpa", seed: int = 0, max_length: int = 4096,
                 num_gpus: float = 0.0, torch_threads: int | None = None):
        import warnings

        import torch

        from phantom_ray.infer.api import load_engine
        from phantom_ray.loader import default_device

        if torch_threads:
            torch.set_num_threads(torch_threads)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the driver already warned about preset weights
            self.engine = load_engine(model_id, backend="torch", device=default_device(num_gpus), dtype=dtype,
                                      attn_implementation=attn_implementation, seed=seed, max_length=max_length)
        self.generation = SamplingParams.from_dict(generation)
        self.batch_size = batch_size

    def __call__(self, batch):
        import pyarrow as pa

        from phantom_ray.data.schema import row_to_sample

        rows = batch.to_pylist()
        results: list[Generation | None] = [None] * len(rows)
        by_len: dict[int, list[int]] = collections.defaultdict(list)
        for i, r in enumerate(rows):
            if r["error"] is not None:
                results[i] = Generation(text=None, num_tiles=r["num_tiles"] or 0, error=r["error"],
                                        error_detail=r["error_detail"])
            else:
                by_len[r["max_tokens"] or self.generation.max_tokens].append(i)
        for max_new, idx in by_len.items():
            samples = []
            for i in idx:
                r = rows[i]
                samples.append(row_to_sample(r["input_ids"], None, r["pixel_values"], r["pixel_shape"],
                                             [r["num_tiles"]] if r["pixel_values"] is not None else [], "float32"))
            gens = self.engine.generate_samples(samples, self.generation.replace(max_tokens=max_new),
                                                [rows[i]["key"] for i in idx], batch_size=self.batch_size)
            for i, g in zip(idx, gens):
                results[i] = g
        # a caption is the answer without surrounding whitespace
        out = [{"key": r["key"], "shard": r["shard"], "caption": g.text.strip() if g.text is not None else None,
                "num_tiles": g.num_tiles, "generated_tokens": g.completion_tokens, "finish_reason": g.finish_reason, "error": g.error,
                "error_detail": g.error_detail} for r, g in zip(rows, results)]
        return pa.Table.from_pylist(out, schema=_caption_schema())


class VLLMCaptioner:
    """map_batches callable class for the ``vllm`` engine: vLLM preprocesses images itself (the same
    tiling as our processor), so its actors take the raw rows (image bytes or URI + prompt) instead of
    the decode stage's pixel values. Each batch's requests go into the actor's async engine at once
    (``VLLMEngine.submit``) and the actor takes :data:`VLLM_BATCHES_PER_ACTOR` batches at a time, so
    vLLM's continuous batching sees several batches' requests in flight, not one blocking call's."""

    def __init__(self, model_id: str, generation: dict, batch_size: int, dtype: str = "auto", seed: int = 0,
                 max_length: int = 4096, max_pixels: int | None = None,
                 max_image_bytes: int | None = None, num_gpus: float = 0.0):
        import warnings

        from phantom_ray.infer.api import load_engine
        from phantom_ray.loader import default_device

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the driver already warned about preset weights
            self.engine = load_engine(model_id, backend="vllm", device=default_device(num_gpus), dtype=dtype,
                                      seed=seed, max_length=max_length, max_pixels=max_pixels,
                                      max_batch_size=batch_size)
        self.generation = SamplingParams.from_dict(generation)
        self.max_image_bytes = max_image_bytes

    def __call__(self, batch):
        import pyarrow as pa

        from phantom_ray.infer.api import Request
        from phantom_ray.processing import ProcessingError

        rows = batch.to_pylist()
        results: list[Generation | None] = [None] * len(rows)
        reqs, idx = [], []
        for i, r in enumerate(rows):
            try:
                data = _read_image(r, self.max_image_bytes)
            except ProcessingError as exc:
                results[i] = Generation(text=None, error=row_reason(exc.reason), error_detail=clean_detail(str(exc)))
                continue
            params = self.generation.replace(max_tokens=r.get("max_tokens") or self.generation.max_tokens)
            reqs.append(Request.user(r["prompt"], images=[data] if data is not None else [], params=params,
                                     key=r["key"]))
            idx.append(i)
        for i, fut in zip(idx, [self.engine.submit(r) for r in reqs]):
            results[i] = fut.result()
        out = [{"key": r["key"], "shard": r.get("shard"), "caption": g.text.strip() if g.text is not None else None,
                "num_tiles": g.num_tiles, "generated_tokens": g.completion_tokens, "finish_reason": g.finish_reason,
                "error": g.error, "error_detail": g.error_detail} for r, g in zip(rows, results)]
        return pa.Table.from_pylist(out, schema=_caption_schema())


@dataclass
class StageOptions:
    """Resources and settings of the two Ray Data stages (shared by captioning and eval)."""

    model: str
    generation: SamplingParams
    engine: str = "torch"                # resolved backend ("torch" | "vllm"), not "auto"
    batch_size: int = 8
    min_replicas: int = 1
    max_replicas: int = 1
    num_gpus: float | None = None
    num_cpus: float = 1.0
    decode_num_cpus: float = 1.0
    decode_concurrency: int | None = None
    max_pixels: int | None = None
    max_image_bytes: int | None = None  # None: the ingest limit (phantom_ray.ingest.ImageLimits)
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    seed: int = 0
    max_length: int = 4096




def build_generation_dataset(rows: list[dict], opts: StageOptions):
    """rows (key, shard, uri | image, prompt, max_tokens) -> Ray Dataset of generation rows."""
    import ray

    from phantom_ray.runtime import init_ray, resolve_num_gpus

    init_ray(log_to_driver=False)
    num_gpus = resolve_num_gpus(opts.num_gpus)
    runtime_env = storage.storage_runtime_env()  # S3 settings reach tasks and actors through Ray
    # vllm: larger batches, several per actor at once (continuous batching wants requests in flight)
    batch_size = max(opts.batch_size, VLLM_MIN_BATCH) if opts.engine == "vllm" else opts.batch_size
    blocks = max(1, min(len(rows), math.ceil(len(rows) / batch_size)))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ray.data.DataContext.get_current().enable_progress_bars = False  # the caller shows its own
    if opts.engine == "vllm":  # one stage: vLLM opens and tiles the images in its actors
        return ds.map_batches(
            VLLMCaptioner, batch_format="pyarrow", batch_size=batch_size,
            compute=actor_pool("vllm", opts.min_replicas, opts.max_replicas, VLLM_BATCHES_PER_ACTOR),
            num_gpus=num_gpus, num_cpus=opts.num_cpus,
            fn_constructor_kwargs={"model_id": opts.model, "generation": opts.generation.to_dict(),
                                   "batch_size": opts.batch_size, "dtype": opts.dtype, "seed": opts.seed,
                                   "max_length": opts.max_length, "max_pixels": opts.max_pixels,
                                   "max_image_bytes": opts.max_image_bytes, "num_gpus": num_gpus},
            runtime_env=runtime_env)
    if opts.engine != "torch":
        raise ValueError(f"StageOptions.engine must be torch or vllm (resolved), got {opts.engine!r}")
    # Decoding must not run inside (and hold) a GPU replica. Ray Data fuses consecutive maps whose
    # remote args are equal; the decode tasks' memory reservation (full-size images are decoded
    # there) differs from the actors' args, so the stages stay apart.
    ds = ds.map_batches(
        decode_batch, batch_format="pyarrow", batch_size=opts.batch_size, num_cpus=opts.decode_num_cpus,
        memory=DECODE_MEMORY_BYTES, concurrency=opts.decode_concurrency,
        fn_kwargs={"model_id": opts.model, "max_length": opts.max_length, "max_pixels": opts.max_pixels,
                   "max_image_bytes": opts.max_image_bytes}, runtime_env=runtime_env)
    # one torch thread per CPU the replica reserves, so replicas sharing a node do not oversubscribe it
    threads = max(1, int(opts.num_cpus)) if num_gpus == 0 else None
    return ds.map_batches(
        Captioner, batch_format="pyarrow", batch_size=opts.batch_size,
        compute=actor_pool("torch", opts.min_replicas, opts.max_replicas),
        num_gpus=num_gpus, num_cpus=opts.num_cpus,
        fn_constructor_kwargs={"model_id": opts.model, "generation": opts.generation.to_dict(),
                               "batch_size": opts.batch_size, "dtype": opts.dtype,
                               "attn_implementation": opts.attn_implementation, "seed": opts.seed,
                               "max_length": opts.max_length, "num_gpus": num_gpus, "torch_threads": threads},
        runtime_env=runtime_env)


__all__ = ["StageOptions", "build_generation_dataset", "Captioner", "VLLMCaptioner", "decode_batch", "load_processor"]
