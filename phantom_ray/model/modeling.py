"""``PhantomForCausalLM``: InternViT + pixel shuffle + ``vision_proj`` + a phantom LLM (docs/phantom.md).

One class for every size; the LLM family comes from the config. The model takes tensors only
(prompt building and tiling live in ``phantom_ray.processing``) and keeps no request state: the
decoding state of a request is the ``PhantomCache`` passed to ``forward``.

Differences from the original (docs/phantom.md#defects): a training ``forward`` exists (D23: the original had none);
position ids always come from the attention mask (D14); phantom states are per sequence in the
cache (D1-D4, D16); every attention kernel runs the phantom branch (D6, D7); the gate is computed
in fp32 (D8); image-token/feature count mismatches raise ``ValueError`` with both counts.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from phantom_ray.model.attention import build_context, build_packed_context, resolve_attn_implementation
from phantom_ray.model.cache import PhantomCache
from phantom_ray.model.config import PhantomConfig
from phantom_ray.model.llm import PhantomLanguageModel
from phantom_ray.model.rope import rope_cos_sin
from phantom_ray.model.vision import InternVisionModel, build_projector, pixel_shuffle

logger = logging.getLogger(__name__)


@dataclass
class PhantomOutput:
    logits: torch.Tensor | None  # (B, L or logits_to_keep, V) fp32; None with return_hidden
    loss: torch.Tensor | None = None
    cache: PhantomCache | None = None
    hidden_states: torch.Tensor | None = None  # (B, L, C) after the final norm, with return_hidden


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # (B, N) generated ids, pad after a row's stop token
    lengths: torch.Tensor  # (B,) generated tokens per row, stop token included
    finish_reasons: list[str] = field(default_factory=list)  # "stop" | "length" per row


class PhantomForCausalLM(nn.Module):
    main_input_name = "pixel_values"

    def __init__(self, config: PhantomConfig, attn_implementation: str | None = "sdpa"):
        super().__init__()
        self.config = config
        self.vision_model = InternVisionModel(config.vision_config)
        self.language_model = PhantomLanguageModel(config.llm_config, config.phantom_eta)
        self.vision_proj = build_projector(config.vision_config.hidden_size, config.llm_config.hidden_size,
                                           config.downsample_ratio)
        self.attn_implementation = resolve_attn_implementation(attn_implementation)
        self.use_phantom = True  # the original's ``turn_on_phantom``
        self.gradient_checkpointing = False
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # ---- construction helpers ----------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, attn_implementation: str | None = "sdpa", seed: int | None = None,
                    **overrides) -> "PhantomForCausalLM":
        """Randomly initialised model of a preset (tests, smoke runs)."""
        if seed is not None:
            torch.manual_seed(seed)
        return cls(PhantomConfig.from_preset(name, **overrides), attn_implementation=attn_implementation)

    @classmethod
    def from_pretrained(cls, path_or_uri: str, dtype=None, attn_implementation: str | None = "sdpa",
                        device="cpu", load_in_8bit: bool = False, adapter: str = "merge",
                        **config_overrides) -> "PhantomForCausalLM":
        """Load a checkpoint (HF layout) from a local directory, ``s3://bucket/prefix`` or a hub id.
        A LoRA adapter saved next to it (peft layout) is merged in; ``adapter="skip"`` leaves it out."""
        from phantom_ray.model.loading import from_pretrained

        return from_pretrained(path_or_uri, dtype=dtype, attn_implementation=attn_implementation, device=device,
                               load_in_8bit=load_in_8bit, adapter=adapter, **config_overrides)

    def save_pretrained(self, directory: str, max_shard_bytes: int = 4 * 1024**3, extra_files=None) -> None:
        """Write config.json + safetensors shards to a local directory or an ``s3://`` prefix."""
        from phantom_ray.model.loading import save_pretrained

        save_pretrained(self, directory, max_shard_bytes=max_shard_bytes, extra_files=extra_files)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Hugging Face style init: N(0, initializer_range) linears/embeddings, zero biases, unit norms."""
        llm_std = self.config.llm_config.initializer_range
        vit_std = self.config.vision_config.initializer_range
        for prefix, root, std in (("v", self.vision_model, vit_std), ("l", self.language_model, llm_std),
                                  ("p", self.vision_proj, llm_std)):
            for m in root.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    m.weight.normal_(0.0, std)
                    if m.bias is not None:
                        m.bias.zero_()
                elif isinstance(m, nn.Embedding):
                    m.weight.normal_(0.0, std)
                elif isinstance(m, nn.LayerNorm):
                    m.weight.fill_(1.0)
                    m.bias.zero_()
                elif hasattr(m, "weight") and isinstance(getattr(m, "weight"), nn.Parameter) and m.weight.dim() == 1:
                    m.weight.fill_(1.0)  # RMSNorm
        emb = self.vision_model.embeddings
        nn.init.trunc_normal_(emb.class_embedding, std=vit_std)
        nn.init.trunc_normal_(emb.position_embedding, std=vit_std)
        for layer in self.vision_model.encoder.layers:
            layer.ls1.fill_(self.config.vision_config.initializer_factor)
            layer.ls2.fill_(self.config.vision_config.initializer_factor)

    def set_attn_implementation(self, name: str) -> None:
        self.attn_implementation = resolve_attn_implementation(name)

    def gradient_checkpointing_enable(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled
        self.vision_model.encoder.gradient_checkpointing = enabled

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def phantom_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if "_phantom" in n]

    # ---- vision ------------------------------------------------------------------------------------
    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(tiles, 3, S, S) -> (tiles, num_image_token, C_llm)."""
        vit = self.vision_model(pixel_values.to(self.vision_proj[1].weight.dtype))[:, 1:]  # drop CLS
        n, t, c = vit.shape
        side = int(math.isqrt(t))
        vit = pixel_shuffle(vit.reshape(n, side, side, c), self.config.downsample_ratio)
        return self.vision_proj(vit.reshape(n, -1, vit.shape[-1]))

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                     image_repeat: int = 1, image_features: torch.Tensor | None = None,
                     check_images: bool = True) -> torch.Tensor:
        embeds = self.language_model.model.embed(input_ids)  # (B, L, C)
        selected = input_ids == self.config.image_token_index
        n_tokens = int(selected.sum())
        if pixel_values is None and image_features is None:
            if check_images and n_tokens:
                raise ValueError(
                    f"input_ids contain {n_tokens} <IMG_CONTEXT> tokens (id {self.config.image_token_index}) "
                    "but no pixel_values were given"
                )
            return embeds
        feats = image_features if image_features is not None else self.extract_feature(pixel_values)
        tiles = feats.shape[0]
        feats = feats.reshape(-1, feats.shape[-1])
        if image_repeat > 1:  # PO batches: rejected rows reuse the chosen rows' image features
            feats = feats.repeat(image_repeat, 1)
        if n_tokens != feats.shape[0]:
            raise ValueError(
                f"input_ids contain {n_tokens} <IMG_CONTEXT> tokens but the images give {feats.shape[0]} features "
                f"({tiles} tiles x {self.config.num_image_token} tokens per tile x image_repeat {image_repeat})"
            )
        return embeds.masked_scatter(selected[..., None], feats.to(embeds.dtype))

    # ---- forward -----------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        phantom_index: torch.Tensor | None = None,
        cache: PhantomCache | None = None,
        image_repeat: int = 1,
        image_features: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        segment_ids: torch.Tensor | None = None,
        return_hidden: bool = False,
        **_unused,
    ) -> PhantomOutput:
        """input_ids (B, L); attention_mask (B, L) or (B, past + L) (1 = real token); labels (B, L)
        with -100 where not supervised; phantom_index (B,) absolute index of each row's phantom
        token (default: first real token).

        Packed training rows (several samples per row): ``segment_ids`` (B, L), each token's sample
        number in its row (contiguous runs, -1 on padding); attention stays inside each sample,
        each sample's phantom token is its own first token and positions restart per sample
        (``position_ids`` default). ``attention_mask`` and ``phantom_index`` are then ignored.
        ``return_hidden``: skip the LM head and return the final hidden states (the training loss
        applies the head chunk by chunk, ``phantom_ray.train.loss``)."""
        B, L = input_ids.shape
        if segment_ids is not None:
            return self._forward_packed(input_ids, segment_ids, pixel_values, labels, position_ids, image_repeat,
                                        image_features, return_hidden)
        past = cache.length if cache is not None else 0
        if attention_mask is None:
            mask = torch.ones(B, L, dtype=torch.long, device=input_ids.device)
        elif attention_mask.shape[1] == L:
            mask = attention_mask
        elif attention_mask.shape[1] == past + L:
            mask = attention_mask[:, past:]
        else:
            raise ValueError(f"attention_mask has {attention_mask.shape[1]} columns; expected {L} or {past + L}")
        prefill = cache is None or cache.length == 0
        h = self.embed_inputs(input_ids, pixel_values, image_repeat, image_features, check_images=prefill)
        if position_ids is None:
            base = cache.next_position if (cache is not None and cache.next_position is not None) else None
            position_ids = (mask.long().cumsum(1) - 1).clamp(min=0)  # (B, L): 0 at the first real token (docs/phantom.md#d14-position-ids)
            if base is not None:
                position_ids = position_ids + base[:, None]
        llm_cfg = self.config.llm_config
        ctx = build_context(mask, cache, phantom_index, self.attn_implementation, llm_cfg.sliding_window,
                            use_phantom=self.use_phantom)
        cos, sin = rope_cos_sin(llm_cfg, position_ids, h.dtype)
        h = self._decoder(h, cos, sin, ctx)
        if cache is not None:
            cache.commit(mask, position_ids)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self._head(h, labels, cache, return_hidden)

    def _decoder(self, h, cos, sin, ctx) -> torch.Tensor:
        """The decoder layers and final norm, shared by the padded and the packed forward."""
        for layer in self.language_model.model.layers:
            if self.gradient_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, ctx, use_reentrant=False)
            else:
                h = layer(h, cos, sin, ctx)
        return self.language_model.model.norm(h)

    def _head(self, h, labels, cache, return_hidden) -> PhantomOutput:
        if return_hidden:
            return PhantomOutput(logits=None, cache=cache, hidden_states=h)
        logits = self.language_model.head(h).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=self.config.ignore_index)
        return PhantomOutput(logits=logits, loss=loss, cache=cache)

    def _forward_packed(self, input_ids, segment_ids, pixel_values, labels, position_ids, image_repeat,
                        image_features, return_hidden) -> PhantomOutput:
        h = self.embed_inputs(input_ids, pixel_values, image_repeat, image_features)
        llm_cfg = self.config.llm_config
        ctx = build_packed_context(segment_ids, self.attn_implementation, llm_cfg.sliding_window,
                                   use_phantom=self.use_phantom)
        if position_ids is None:  # restart at 0 on each sample's first token
            idx = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
            position_ids = (idx - ctx.packed.phantom_pos).clamp(min=0)
        cos, sin = rope_cos_sin(llm_cfg, position_ids, h.dtype)
        h = self._decoder(h, cos, sin, ctx)
        return self._head(h, labels, None, return_hidden)

    # ---- generation --------------------------------------------------------------------------------
    def new_cache(self, capacity: int = 256) -> PhantomCache:
        return PhantomCache(self.config.llm_config.num_hidden_layers, initial_capacity=capacity)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 256,
        do_sample: bool = False,
        temperature: float | Sequence[float] = 1.0,
        top_p: float | Sequence[float] = 1.0,
        top_k: int = 0,
        stop_token_ids: list[int] | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | list[torch.Generator | None] | None = None,
        stream_callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
        image_repeat: int = 1,
        phantom_index: torch.Tensor | None = None,
    ) -> GenerationOutput:
        """Greedy or sampled decoding for a batch of prompts (left or right padded, any lengths).

        ``stream_callback(step, tokens (B,), finished (B,))`` is called after every step; rows that
        already finished receive ``pad_token_id``. ``generator`` may be one ``torch.Generator`` or
        one per row (per-request seeds that do not depend on batch mates).
        """
        B = input_ids.shape[0]
        dev = input_ids.device
        stops = torch.tensor(stop_token_ids if stop_token_ids is not None else self.config.stop_token_ids,
                             dtype=torch.long, device=dev)
        pad = pad_token_id
        if pad is None:
            valid_stops = [i for i in stops.tolist() if i >= 0]
            pad = self.config.llm_config.pad_token_id
            pad = pad if pad is not None else (valid_stops[0] if valid_stops else 0)
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        aligned_ids, mask = left_align(input_ids, mask, pad)
        if aligned_ids is not input_ids:
            phantom_index = None  # rows were moved to left padding: the first real token is re-derived
        input_ids = aligned_ids
        cache = self.new_cache(input_ids.shape[1] + max_new_tokens)
        out = self(input_ids, mask, pixel_values, cache=cache, logits_to_keep=1, image_repeat=image_repeat,
                   phantom_index=phantom_index)
        finished = torch.zeros(B, dtype=torch.bool, device=dev)
        lengths = torch.zeros(B, dtype=torch.long, device=dev)
        stopped = torch.zeros(B, dtype=torch.bool, device=dev)
        steps: list[torch.Tensor] = []
        ones = torch.ones(B, 1, dtype=mask.dtype, device=dev)
        for step in range(max_new_tokens):
            logits = out.logits[:, -1]
            tok = sample_next(logits, do_sample, temperature, top_p, top_k, generator)
            tok = torch.where(finished, torch.full_like(tok, pad), tok)
            lengths += (~finished).long()
            hit = torch.isin(tok, stops) & ~finished
            stopped |= hit
            finished |= hit
            steps.append(tok)
            if stream_callback is not None:
                stream_callback(step, tok, finished.clone())
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            out = self(tok[:, None], ones, cache=cache, logits_to_keep=1)
        seqs = torch.stack(steps, dim=1) if steps else torch.empty(B, 0, dtype=torch.long, device=dev)
        reasons = ["stop" if s else "length" for s in stopped.tolist()]
        return GenerationOutput(sequences=seqs, lengths=lengths, finish_reasons=reasons)


def left_align(input_ids: torch.Tensor, mask: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Move every row's real tokens to the right end (left padding), keeping their order."""
    m = mask.bool()
    if bool(m[:, -1].all()):
        return input_ids, mask
    L = input_ids.shape[1]
    n = m.sum(1)
    # stable sort: padding (key 0) first, real tokens (key 1) after, order preserved
    order = torch.sort(m.long(), dim=1, stable=True).indices
    ids = input_ids.gather(1, order)
    new_mask = (torch.arange(L, device=ids.device)[None] >= (L - n)[:, None]).to(mask.dtype)
    ids = torch.where(new_mask.bool(), ids, torch.full_like(ids, pad))
    return ids, new_mask


def sample_next(logits: torch.Tensor, do_sample: bool, temperature: float | Sequence[float],
                top_p: float | Sequence[float], top_k: int, generator=None) -> torch.Tensor:
    """Pick the next token per row: argmax, or temperature/top-k/top-p sampling.

    ``temperature`` and ``top_p`` may be one value per row (requests with different settings in one
    batch): a row with temperature <= 0 is greedy, the others are sampled one by one with their own
    settings and generator, so a row's token does not depend on its batch mates."""
    if isinstance(temperature, (list, tuple)) or isinstance(top_p, (list, tuple)):
        B = logits.shape[0]
        temps = list(temperature) if isinstance(temperature, (list, tuple)) else [temperature] * B
        ps = list(top_p) if isinstance(top_p, (list, tuple)) else [top_p] * B
        gens = list(generator) if isinstance(generator, (list, tuple)) else [generator] * B
        if not len(temps) == len(ps) == len(gens) == B:
            raise ValueError(f"per-row settings for {len(temps)}/{len(ps)}/{len(gens)} rows, batch has {B}")
        out = logits.argmax(dim=-1)
        if do_sample:
            for i in range(B):
                if temps[i] > 0:
                    out[i] = sample_next(logits[i:i + 1], True, float(temps[i]), float(ps[i]), top_k, gens[i])[0]
        return out
    if not do_sample or temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        remove = probs.cumsum(-1) - probs > top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, idx, sorted_logits)
    probs = logits.softmax(-1)
    if isinstance(generator, (list, tuple)):
        return torch.cat([torch.multinomial(probs[i : i + 1], 1, generator=g)[:, 0] for i, g in enumerate(generator)])
    return torch.multinomial(probs, 1, generator=generator)[:, 0]

