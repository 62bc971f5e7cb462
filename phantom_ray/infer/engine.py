"""PhantomEngine: (image, prompt) pairs -> generated text, batched, on one device.

The engine owns a model, its tokenizer and a :class:`~phantom_ray.processing.PhantomProcessor`, and
is what a Ray Data captioning actor, the eval job and tests hold. No Ray here.

* Greedy decoding is batch-invariant: the caption of an image does not depend on which other
  images share its batch (the model's ``generate`` keeps rows independent; prompts are left padded).
* Sampling draws from one ``torch.Generator`` per row, seeded from ``(seed, key)`` where ``key``
  names the request (the image URI in a captioning job), so a sampled caption is reproducible and
  does not depend on the batch either.
* Beam search (``num_beams > 1``, what the original eval harness used with 3 beams) runs on the
  model's step API: one prefill per prompt batch, then one step per token on ``B * num_beams`` rows;
  ``cache.index_select`` reorders the KV and phantom states when beams are reselected.

    engine = PhantomEngine.load("tiny-qwen2")                      # preset: random weights, warns
    outs = engine.generate([(png_bytes, "Describe the image in detail.")], GenerationConfig(max_new_tokens=32))
    outs[0].text, outs[0].tokens, outs[0].finish_reason, outs[0].error
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from phantom_ray.processing import PhantomProcessor, ProcessingError, Sample

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "Describe the image in detail."


@dataclass
class GenerationConfig:
    """Decoding settings; written next to every caption so outputs say how they were made."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0  # beam search: hypothesis score = sum logprob / length ** length_penalty
    seed: int = 0  # sampling: per-request generators are seeded from (seed, request key)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("num_beams > 1 is beam search (deterministic); do not combine it with do_sample")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "GenerationConfig":
        return dataclasses.replace(self, **changes)


@dataclass
class Generation:
    """One request's result. ``error`` is a short reason code (``undecodable_image``, ...) or None."""

    text: str | None
    tokens: int = 0  # generated tokens, the stop token included
    finish_reason: str | None = None  # "stop" | "length" | None on error
    num_tiles: int = 0
    error: str | None = None
    error_detail: str | None = None

    @classmethod
    def failed(cls, exc: Exception, num_tiles: int = 0) -> "Generation":
        reason = getattr(exc, "reason", None) or type(exc).__name__
        return cls(text=None, num_tiles=num_tiles, error=reason, error_detail=error_detail(exc))


def error_detail(exc: Exception) -> str:
    """The message of ``exc`` without memory addresses (PIL names ``<BytesIO object at 0x...>``),
    so that the error rows of two runs over the same input are identical."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", str(exc))[:2000]


def is_preset(model_id: str) -> bool:
    from phantom_ray.model import list_presets

    return str(model_id) in set(list_presets())


def _row_seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\0{key}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype | None:
    """``"auto"``: bfloat16 on CUDA, float32 on CPU; None keeps the checkpoint's dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    try:
        out = getattr(torch, dtype)
    except AttributeError:
        out = None
    if not isinstance(out, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return out


def default_device(num_gpus: float = 1.0) -> str:
    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


class PhantomEngine:
    """A model + tokenizer + processor on one device, generating for batches of (image, prompt)."""

    def __init__(self, model, tokenizer, processor: PhantomProcessor | None = None, model_id: str | None = None,
                 max_length: int = 4096):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.processor = processor or PhantomProcessor(model.config, tokenizer, max_length=max_length)
        self.model_id = model_id or "unnamed"

    # ---- construction ------------------------------------------------------------------------------
    @classmethod
    def load(cls, model_id: str, *, device: str | None = None, dtype: str | torch.dtype | None = "auto",
             attn_implementation: str = "sdpa", seed: int = 0, max_length: int = 4096,
             max_pixels: int | None = None) -> "PhantomEngine":
        """``model_id``: a preset name (random weights seeded by ``seed``, with a warning), a local
        checkpoint directory or an ``s3://`` prefix holding config.json, safetensors and tokenizer files."""
        from phantom_ray.model import PhantomForCausalLM
        from phantom_ray.processing import load_tokenizer

        device = device or default_device()
        torch_dtype = resolve_dtype(dtype, device)
        if is_preset(model_id):
            warnings.warn(f"model {model_id!r} is a preset name: randomly initialised weights (seed {seed}); "
                          "captions are noise. Pass a checkpoint directory or s3:// URI for real output.",
                          stacklevel=2)
            model = PhantomForCausalLM.from_preset(model_id, attn_implementation=attn_implementation, seed=seed)
            tok_src = model_id
        else:
            from phantom_ray.model.loading import resolve_checkpoint

            local = resolve_checkpoint(model_id)  # downloads an s3:// checkpoint once per node
            model = PhantomForCausalLM.from_pretrained(str(local), dtype=torch_dtype,
                                                       attn_implementation=attn_implementation, device="cpu")
            tok_src = str(local)
        if torch_dtype is not None:
            model = model.to(dtype=torch_dtype)
        model = model.to(device)
        tokenizer = load_tokenizer(tok_src, model.config)
        processor = PhantomProcessor(model.config, tokenizer, max_length=max_length,
                                     **({"max_pixels": max_pixels} if max_pixels is not None else {}))
        return cls(model, tokenizer, processor, model_id=str(model_id))

    # ---- preprocessing -----------------------------------------------------------------------------
    def prepare(self, image: Any, prompt: str) -> Sample:
        """(image bytes / PIL / URI / None, prompt) -> generation prompt Sample; raises ProcessingError."""
        return self.processor.encode_prompt(prompt, images=image if image is not None else None)

    # ---- generation --------------------------------------------------------------------------------
    def generate(self, requests: Sequence[tuple[Any, str]], config: GenerationConfig | None = None,
                 batch_size: int = 8, keys: Sequence[str] | None = None) -> list[Generation]:
        """Generate for every (image, prompt); a bad image or prompt gives an error Generation."""
        config = config or GenerationConfig()
        samples: list[Sample | Exception] = []
        for image, prompt in requests:
            try:
                samples.append(self.prepare(image, prompt))
            except ProcessingError as exc:
                samples.append(exc)
        return self.generate_samples(samples, config, batch_size=batch_size, keys=keys)

    def generate_samples(self, samples: Sequence[Sample | Exception], config: GenerationConfig,
                         batch_size: int = 8, keys: Sequence[str] | None = None) -> list[Generation]:
        """Generate for prepared samples (an Exception in the list passes through as an error row)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        keys = list(keys) if keys is not None else [str(i) for i in range(len(samples))]
        if len(keys) != len(samples):
            raise ValueError(f"{len(keys)} keys for {len(samples)} samples")
        out: list[Generation | None] = [None] * len(samples)
        good = []
        for i, s in enumerate(samples):
            if isinstance(s, Exception):
                out[i] = Generation.failed(s)
            else:
                good.append(i)
        for start in range(0, len(good), batch_size):
            idx = good[start:start + batch_size]
            batch = [samples[i] for i in idx]
            results = self._generate_batch(batch, config, [keys[i] for i in idx])
            for i, r in zip(idx, results):
                out[i] = r
        return out  # type: ignore[return-value]

    def _inputs(self, samples: Sequence[Sample]) -> dict:
        batch = self.processor.collate(samples, padding_side="left")
        dev = self.model.device
        pv = batch["pixel_values"]
        return {
            "input_ids": batch["input_ids"].to(dev),
            "attention_mask": batch["attention_mask"].to(dev),
            "pixel_values": pv.to(device=dev, dtype=self.model.dtype) if pv is not None else None,
        }

    @torch.inference_mode()
    def _generate_batch(self, samples: Sequence[Sample], config: GenerationConfig, keys: Sequence[str]
                        ) -> list[Generation]:
        inputs = self._inputs(samples)
        tiles = [sum(s.num_tiles) for s in samples]
        if config.num_beams > 1:
            seqs = self._beam_search(inputs, config)
            return [self._result(ids, reason, n) for (ids, reason), n in zip(seqs, tiles)]
        generator = None
        if config.do_sample:
            dev = self.model.device
            generator = [torch.Generator(device=dev).manual_seed(_row_seed(config.seed, k)) for k in keys]
        gen = self.model.generate(
            inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
            max_new_tokens=config.max_new_tokens, do_sample=config.do_sample, temperature=config.temperature,
            top_p=config.top_p, top_k=config.top_k, stop_token_ids=self.processor.stop_token_ids,
            pad_token_id=self.processor.pad_token_id, generator=generator)
        out = []
        for b in range(len(samples)):
            n = int(gen.lengths[b])
            out.append(self._result(gen.sequences[b, :n].tolist(), gen.finish_reasons[b], tiles[b]))
        return out

    def _result(self, ids: list[int], reason: str, num_tiles: int) -> Generation:
        return Generation(text=self.processor.decode_generation(ids), tokens=len(ids), finish_reason=reason,
                          num_tiles=num_tiles)

    # ---- beam search -------------------------------------------------------------------------------
    def _beam_search(self, inputs: dict, config: GenerationConfig) -> list[tuple[list[int], str]]:
        """Beam search per prompt (Hugging Face semantics with ``early_stopping=False``): a
        hypothesis ends at a stop token; its score is sum(logprob) / length ** length_penalty; a
        prompt is done once it holds ``num_beams`` finished hypotheses that no live beam can beat."""
        model, K = self.model, config.num_beams
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        B, L = ids.shape
        dev = ids.device
        stops = set(self.processor.stop_token_ids)
        pad = self.processor.pad_token_id
        cache = model.new_cache(L + config.max_new_tokens)
        out = model(ids, mask, inputs["pixel_values"], cache=cache, logits_to_keep=1)
        # (B*K) rows, beam k of prompt b at row b*K + k; only beam 0 is live at first
        cache.index_select(torch.arange(B, device=dev).repeat_interleave(K))
        logits = out.logits[:, -1].repeat_interleave(K, dim=0)
        scores = torch.full((B, K), float("-inf"), device=dev)
        scores[:, 0] = 0.0
        tokens: list[list[list[int]]] = [[[] for _ in range(K)] for _ in range(B)]
        finished: list[list[tuple[float, list[int], str]]] = [[] for _ in range(B)]
        done = [False] * B
        lp = config.length_penalty
        ones = torch.ones(B * K, 1, dtype=mask.dtype, device=dev)
        for step in range(config.max_new_tokens):
            logp = torch.log_softmax(logits.float(), dim=-1)  # (B*K, V)
            V = logp.shape[-1]
            total = (scores.reshape(-1, 1) + logp).reshape(B, K * V)
            top_scores, top_idx = total.topk(2 * K, dim=1)
            top_scores, top_idx = top_scores.tolist(), top_idx.tolist()
            next_rows, next_tok, next_scores, next_tokens = [], [], [], []
            cur_len = step + 1
            for b in range(B):
                if done[b]:  # keep the rows busy with a harmless continuation
                    next_rows += [b * K + k for k in range(K)]
                    next_tok += [pad] * K
                    next_scores += [float("-inf")] * K
                    next_tokens += [tokens[b][k] for k in range(K)]
                    continue
                chosen = 0
                for rank, (sc, flat) in enumerate(zip(top_scores[b], top_idx[b])):
                    if sc == float("-inf"):
                        break
                    beam, tok = divmod(flat, V)
                    seq = tokens[b][beam] + [tok]
                    if tok in stops:
                        if rank < K:  # as HF: only candidates ranked within the beam width may finish
                            finished[b].append((sc / (cur_len ** lp), seq, "stop"))
                        continue
                    next_rows.append(b * K + beam)
                    next_tok.append(tok)
                    next_scores.append(sc)
                    next_tokens.append(seq)
                    chosen += 1
                    if chosen == K:
                        break
                while chosen < K:  # fewer live candidates than beams (tiny vocab): pad with dead beams
                    next_rows.append(b * K)
                    next_tok.append(pad)
                    next_scores.append(float("-inf"))
                    next_tokens.append(tokens[b][0])
                    chosen += 1
                best_live = max(next_scores[-K:])
                if best_live == float("-inf"):
                    done[b] = True
                elif len(finished[b]) >= K:
                    finished[b].sort(key=lambda h: h[0], reverse=True)
                    del finished[b][K:]
                    if best_live / (cur_len ** lp) <= finished[b][-1][0]:
                        done[b] = True
            if all(done):
                break
            tokens = [next_tokens[b * K:(b + 1) * K] for b in range(B)]
            scores = torch.tensor(next_scores, device=dev).reshape(B, K)
            if step == config.max_new_tokens - 1:
                break
            cache.index_select(torch.tensor(next_rows, device=dev))
            out = model(torch.tensor(next_tok, device=dev)[:, None], ones, cache=cache, logits_to_keep=1)
            logits = out.logits[:, -1]
        results = []
        for b in range(B):
            hyps = list(finished[b])
            if not done[b]:  # ran out of tokens: live beams compete as "length" hypotheses
                for k in range(K):
                    sc = float(scores[b, k])
                    if sc > float("-inf") and tokens[b][k]:
                        hyps.append((sc / (len(tokens[b][k]) ** lp), tokens[b][k], "length"))
            if not hyps:
                results.append(([], "length"))
                continue
            best = max(hyps, key=lambda h: h[0])
            results.append((best[1], best[2]))
        return results


def model_dtype_name(engine: PhantomEngine) -> str:
    return str(engine.model.dtype).replace("torch.", "")


def greedy_reference(engine: PhantomEngine, image: Any, prompt: str, max_new_tokens: int) -> str:
    """Caption of one image by a direct ``model.generate`` call on a batch of one (tests, benchmark)."""
    s = engine.prepare(image, prompt)
    inputs = engine._inputs([s])
    gen = engine.model.generate(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                                max_new_tokens=max_new_tokens, stop_token_ids=engine.processor.stop_token_ids,
                                pad_token_id=engine.processor.pad_token_id)
    n = int(gen.lengths[0])
    return engine.processor.decode_generation(gen.sequences[0, :n].tolist())

