"""Phantom (arXiv 2409.14713) as a vLLM model: our torch modules around vLLM's paged attention.

The decoder is ``phantom_ray.model.llm`` itself (all three families: Qwen2, InternLM2 with packed
``wqkv``, Phi-3 with long RoPE), run on vLLM's flattened batch as one row of N tokens. Only the
attention kernel changes: the phantom branch widens every head to 2D (``[q, q*]``, ``[k, k*]``,
``[v, v*]``) and vLLM's ``Attention`` runs on the widened heads with the original scale 1/sqrt(D)
(``phantom_ray.model.attention.phantom_attention`` does the widening and the gate mixing, exactly
as in the torch engine). vLLM's KV cache therefore stores the augmented keys/values, which is exact:
k* and v* of a token depend only on that token's own k, v and the phantom states of its sequence
(``phantom_ray.model.cache`` caches them the same way).

Phantom states. They are the q/k/v of a sequence's first token at every layer. Under causal
attention the first token attends only to itself (at position 0, where every RoPE variant is the
identity up to a per-model constant), so its states depend on that token id alone
(docs/phantom.md#phantom-token). They are therefore kept per distinct first-token id, computed once
by the torch model's own forward on that one token and cached in a slot table
(:class:`PhantomStateTable`); any prompt is served, whatever its first token (a Phi-3 chat with a
system turn, a raw completion prompt), exactly as the torch engine serves it.

Which sequence a token of vLLM's flattened step belongs to, and that sequence's first token, come
from vLLM's per-step attention metadata (``query_start_loc``, ``seq_lens``, ``block_table``,
``slot_mapping``), vectorised: :func:`phantom_ray.vllm.states.first_tokens` explains why the
look-up through KV blocks is exact under prefix caching. A step whose sequences share one first
token (the common case) broadcasts one set of states; a mixed step gathers them per token.

Images go through vLLM's multimodal interface with our tiling (``phantom_ray.processing.images``,
PIL/numpy): the prompt carries ``<img></img>`` per image and vLLM expands it to
``<img>`` + ``<IMG_CONTEXT>`` x (tiles x tokens per tile) + ``</img>``, the layout of
``PhantomProcessor``. The vision side (InternViT, pixel shuffle, ``vision_proj``) is our module.

Limits: tensor/pipeline parallel size 1 (our ``nn.Linear`` layers are not sharded); a LoRA adapter
saved next to the weights (an unmerged training export, :mod:`phantom_ray.model.adapters`) is merged
into them at load, as the torch loader does; vLLM's own per-request LoRA is not wired up.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property

import torch
from torch import nn
from transformers import BatchFeature

from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.interfaces import SupportsMultiModal
from vllm.model_executor.models.utils import _merge_multimodal_embeddings
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageProcessorItems, MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
    PromptUpdateDetails,
)
from vllm.sequence import IntermediateTensors

from phantom_ray.model import attention as phantom_attn
from phantom_ray.model.adapters import PEFT_PREFIX, adapter_deltas, has_adapter, merge_lora_weight
from phantom_ray.model.attention import AttnContext, build_context
from phantom_ray.model.cache import PhantomCache
from phantom_ray.model.config import PhantomConfig
from phantom_ray.model.llm import LMHead, PhantomLanguageModel
from phantom_ray.model.loading import remap_key
from phantom_ray.model.rope import rope_kind, rope_cos_sin
from phantom_ray.model.vision import InternVisionModel, build_projector, pixel_shuffle
from phantom_ray.processing.images import tile_pixel_values
from phantom_ray.processing.processor import IMG_END, IMG_START
from phantom_ray.vllm.inputs import phantom_token_id
from phantom_ray.vllm.states import PhantomStateTable, TokenStates, first_tokens


# ------------------------------------------------------------------------------------------------
# The attention kernel: vLLM's paged attention on the phantom-widened heads
# ------------------------------------------------------------------------------------------------
class _StepState:
    """What ``phantom_attention`` reads from its cache argument during one vLLM forward: each
    token's phantom states (``phantom[layer].derived``, gathered lazily per layer from the state
    table), and the layer whose paged-attention module the kernel must call. vLLM owns the KV cache,
    so ``update`` only records the layer and passes k, v through."""

    length = 0

    def __init__(self, phantom, paged: nn.ModuleList):
        self.phantom = phantom
        self.paged = paged
        self.layer = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        self.layer = layer
        return k, v


def vllm_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext, scale: float) -> torch.Tensor:
    """q (1, H, N, 2D), k/v (1, Hk, N, 2D) -> (1, H, N, 2D) through vLLM's ``Attention`` (which
    writes k, v to the paged cache and attends over each sequence's cached keys)."""
    paged = ctx.cache.paged[ctx.cache.layer]
    _, H, N, Dk = q.shape
    out = paged(q[0].transpose(0, 1).reshape(N, H * Dk), k[0].transpose(0, 1).reshape(N, -1),
                v[0].transpose(0, 1).reshape(N, -1))  # (N, H * Dk)
    return out.view(N, H, Dk).transpose(0, 1)[None]


phantom_attn.KERNELS["vllm"] = vllm_kernel


def _packed_forward(m: nn.Linear):
    def forward(x: torch.Tensor) -> torch.Tensor:
        y = m.cpu_linear(x.reshape(-1, x.shape[-1]), m.weight, m.bias)
        return y.view(*x.shape[:-1], y.shape[-1])

    return forward


def _attn_metadata():
    if not is_forward_context_available():
        return None
    md = get_forward_context().attn_metadata
    if isinstance(md, list):
        md = md[0] if md else None
    if isinstance(md, dict):
        md = next(iter(md.values()), None)
    return md


# ------------------------------------------------------------------------------------------------
# Multimodal processing: our tiling, vLLM's placeholder bookkeeping
# ------------------------------------------------------------------------------------------------
class PhantomProcessingInfo(BaseProcessingInfo):
    @cached_property
    def phantom_config(self) -> PhantomConfig:
        return self.get_hf_config().phantom_config()

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def tiling(self) -> tuple[int, int, int, bool]:
        c = self.phantom_config
        lo, hi = (c.min_dynamic_patch, c.max_dynamic_patch) if c.dynamic_image_size else (1, 1)
        return c.image_size, lo, hi, c.use_thumbnail

    def max_tiles(self) -> int:
        _, _, hi, thumb = self.tiling()
        return hi + (1 if thumb and hi > 1 else 0)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.max_tiles() * self.phantom_config.num_image_token}

    def token_ids(self) -> tuple[int, int, int]:
        c = self.phantom_config
        tok = self.get_tokenizer()
        start = c.img_start_token_index if c.img_start_token_index is not None else tok.convert_tokens_to_ids(IMG_START)
        end = c.img_end_token_index if c.img_end_token_index is not None else tok.convert_tokens_to_ids(IMG_END)
        return int(start), int(c.image_token_index), int(end)


class PhantomDummyInputsBuilder(BaseDummyInputsBuilder[PhantomProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return (IMG_START + IMG_END) * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        size, _, hi, _ = self.info.tiling()
        # a (hi x 1) grid image gets the most tiles
        return {"image": self._get_dummy_images(width=size * hi, height=size, num_images=mm_counts.get("image", 0),
                                                overrides=(mm_options or {}).get("image"))}


class PhantomMultiModalProcessor(BaseMultiModalProcessor[PhantomProcessingInfo]):
    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        size, lo, hi, thumb = self.info.tiling()
        images = hf_data.get("images") or []
        tiles = [tile_pixel_values(img, size, lo, hi, thumb) for img in images]  # PhantomProcessor's tiling
        return BatchFeature({
            "pixel_values_flat": torch.cat(tiles) if tiles else torch.empty(0, 3, size, size),
            "image_num_patches": torch.tensor([t.shape[0] for t in tiles], dtype=torch.long),
        })

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]):
        num_patches = hf_inputs.get("image_num_patches", torch.empty(0))
        return dict(
            pixel_values_flat=MultiModalFieldConfig.flat_from_sizes("image", num_patches),
            image_num_patches=MultiModalFieldConfig.batched("image", keep_on_cpu=True),
        )

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        start, ctx_id, end = self.info.token_ids()
        per_tile = self.info.phantom_config.num_image_token
        counts = out_mm_kwargs.get_data().get("image_num_patches")
        counts = counts.tolist() if isinstance(counts, torch.Tensor) else list(counts or [])

        def replacement(i: int):
            return PromptUpdateDetails.select_token_id([start] + [ctx_id] * (per_tile * int(counts[i])) + [end], ctx_id)

        return [PromptReplacement(modality="image", target=[start, end], replacement=replacement)]


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------
@MULTIMODAL_REGISTRY.register_processor(PhantomMultiModalProcessor, info=PhantomProcessingInfo,
                                        dummy_inputs=PhantomDummyInputsBuilder)
class PhantomVLLMForCausalLM(nn.Module, SupportsMultiModal):
    """Checkpoint keys as in ``PhantomForCausalLM`` (spec 6.1): ``vision_model.*``,
    ``language_model.*``, ``vision_proj.*`` (``mlp1.*`` accepted for the projector)."""

    merge_by_field_config = True

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        return IMG_START + IMG_END if modality.startswith("image") else None

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        pc: PhantomConfig = vllm_config.model_config.hf_config.phantom_config()
        par = vllm_config.parallel_config
        if par.tensor_parallel_size > 1 or par.pipeline_parallel_size > 1:
            raise ValueError("the Phantom vLLM model runs with tensor_parallel_size=1 and pipeline_parallel_size=1 "
                             "(its layers are not sharded); run one replica per device instead")
        self.pconfig = pc
        llm = pc.llm_config
        self.vision_model = InternVisionModel(pc.vision_config)
        self.language_model = PhantomLanguageModel(llm, pc.phantom_eta)
        self.vision_proj = build_projector(pc.vision_config.hidden_size, llm.hidden_size, pc.downsample_ratio)
        D = llm.head_dim
        window = llm.sliding_window
        self.paged_attn = nn.ModuleList(
            Attention(llm.num_attention_heads, 2 * D, 1.0 / math.sqrt(D), num_kv_heads=llm.num_key_value_heads,
                      cache_config=vllm_config.cache_config,
                      # ours: a query sees keys at distance <= window; vLLM's window counts the query itself
                      per_layer_sliding_window=None if window is None else window + 1,
                      prefix=f"{prefix + '.' if prefix else ''}paged_attn.{i}")
            for i in range(llm.num_hidden_layers)
        )
        self.rope_kind = rope_kind(llm)
        tokenizer_path = vllm_config.model_config.tokenizer
        from phantom_ray.processing.tokenizers import load_tokenizer

        hf = vllm_config.model_config.hf_config
        self.phantom_token_id = (int(hf.phantom["phantom_token_id"]) if "phantom_token_id" in hf.phantom
                                 else phantom_token_id(pc, load_tokenizer(tokenizer_path, pc)))
        self.cache_config = vllm_config.cache_config
        self.block_size = int(vllm_config.cache_config.block_size)
        self.state_table = PhantomStateTable(self.compute_phantom_states, llm.vocab_size, "cpu",
                                             slots=int(os.environ.get("PHANTOM_VLLM_STATE_SLOTS", "64")))
        # per KV block: the first token id of the sequence that last wrote it (see the module docstring)
        self._block_first = torch.zeros(0, dtype=torch.long)
        self._step_ids: torch.Tensor | None = None
        self._model_dir = vllm_config.model_config.model  # a LoRA adapter next to the weights is merged at load

    # ---- weights ---------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        expected = {n for n in params if not n.startswith("paged_attn.")}
        head = f"language_model.{self.language_model._head_name}.weight"
        loaded: set[str] = set()
        unexpected: list[str] = []
        deltas, scaling = {}, 1.0
        if os.path.isdir(str(self._model_dir)) and has_adapter(self._model_dir):  # an unmerged LoRA export
            _, deltas, scaling = adapter_deltas(self._model_dir)
        for name, w in weights:
            if name.startswith(PEFT_PREFIX):
                continue  # vLLM globs adapter_model.safetensors with the weights: merged from there above
            name = remap_key(name)
            if name in deltas:  # the torch loader's merge, on the checkpoint tensor, before the cast
                a, b = deltas.pop(name)
                w = merge_lora_weight(w, a, b, scaling)
            if name not in params:
                if name == head and self.pconfig.llm_config.tie_word_embeddings:
                    continue  # tied to the embedding
                unexpected.append(name)
                continue
            p = params[name]
            if tuple(p.shape) != tuple(w.shape):
                raise ValueError(f"checkpoint tensor {name} has shape {tuple(w.shape)}, the model expects {tuple(p.shape)}")
            with torch.no_grad():
                p.copy_(w)
            loaded.add(name)
        missing = sorted(expected - loaded)
        if deltas:
            raise ValueError(f"{self._model_dir}: the LoRA adapter adapts weights the checkpoint does not have: "
                             f"{sorted(deltas)[:5]}")
        if missing or unexpected:
            raise ValueError(f"checkpoint keys do not match the Phantom model: missing {missing[:20]}, "
                             f"unexpected {unexpected[:20]}")
        self._use_vllm_cpu_gemm()
        self._reset_states()
        return set(params)

    def _reset_states(self) -> None:
        """A fresh state table on the weights' device, holding the template token's states (what
        nearly every prompt starts with)."""
        t = self.state_table
        dev = self.language_model.model.embed.weight.device
        self.state_table = PhantomStateTable(t.compute, t.vocab_size, dev, slots=t.slots)
        self.state_table.ensure([self.phantom_token_id])

    def _use_vllm_cpu_gemm(self) -> None:
        """On CPU, run the decoder's linears (and the LM head) through vLLM's prepacked GEMM
        (oneDNN / sgl-kernel), as vLLM's own models do; the weights stay as loaded."""
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        for m in self.language_model.modules():
            if type(m) not in (nn.Linear, LMHead) or m.weight.shape[0] < 64:  # tiny gate projections: plain torch
                continue
            dispatch_cpu_unquantized_gemm(m, remove_weight=False)
            m.forward = _packed_forward(m)

    @torch.no_grad()
    def compute_phantom_states(self, token_ids: torch.Tensor) -> list:
        """Per-layer phantom states (with their derived cross-head keys, each (U, G, D)) of sequences
        starting with ``token_ids`` (U,): the torch model's own forward on each token alone at position 0."""
        lm = self.language_model
        dev = lm.model.embed.weight.device
        ids = token_ids.reshape(-1, 1).to(dev)  # (U, 1): one single-token sequence per id
        mask = torch.ones_like(ids)
        cache = PhantomCache(self.pconfig.llm_config.num_hidden_layers, initial_capacity=1)
        ctx = build_context(mask, cache, None, "eager")
        h = lm.model.embed(ids)
        cos, sin = rope_cos_sin(self.pconfig.llm_config, torch.zeros_like(ids), h.dtype)
        for layer in lm.model.layers:
            h = layer(h, cos, sin, ctx)
        return cache.phantom

    # ---- multimodal ------------------------------------------------------------------------------
    def get_language_model(self) -> nn.Module:
        return self.language_model

    def embed_multimodal(self, **kwargs: object):
        pixel_values = kwargs.get("pixel_values_flat")
        num_patches = kwargs.get("image_num_patches")
        if pixel_values is None:
            return []
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.cat(list(pixel_values))
        counts = [int(n) for n in (num_patches.tolist() if isinstance(num_patches, torch.Tensor) else num_patches)]
        feats = self.extract_feature(pixel_values)  # (tiles, K, C)
        return [f.reshape(-1, f.shape[-1]) for f in feats.split(counts)]

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(tiles, 3, S, S) -> (tiles, K, C): ``PhantomForCausalLM.extract_feature`` on our modules."""
        vit = self.vision_model(pixel_values.to(self.vision_proj[1].weight.dtype))[:, 1:]  # drop CLS
        n, t, c = vit.shape
        side = int(math.isqrt(t))
        vit = pixel_shuffle(vit.reshape(n, side, side, c), self.pconfig.downsample_ratio)
        return self.vision_proj(vit.reshape(n, -1, vit.shape[-1]))

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings=None, *, is_multimodal=None,
                        **_unused) -> torch.Tensor:
        self._step_ids = input_ids  # this step's ids, for the first-token check in forward
        embeds = self.language_model.model.embed(input_ids)
        if multimodal_embeddings is None or len(multimodal_embeddings) == 0 or is_multimodal is None:
            return embeds
        return _merge_multimodal_embeddings(embeds, multimodal_embeddings, is_multimodal)

    # ---- forward ---------------------------------------------------------------------------------
    def _block_first_table(self, block_table: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
        """The per-block first-token table (``phantom_ray.vllm.states.first_tokens``): one entry per
        KV block plus a sink entry (last) for padding slots. Sized from the KV cache's block count
        once vLLM has set it (no host sync), else grown from this step's block ids."""
        known = self.cache_config.num_gpu_blocks
        have = self._block_first.numel()
        if known and have >= known + 1:
            return self._block_first
        if known:
            need = known + 1
        else:
            need = (int(block_table.max()) + 2) if block_table.numel() else 1
            if slot_mapping.numel():
                need = max(need, int(slot_mapping.max()) // self.block_size + 2)
            if need <= have:
                return self._block_first
            need = max(need, 2 * have)
        grown = torch.zeros(need, dtype=torch.long, device=block_table.device)
        if have > 1:
            grown[: have - 1] = self._block_first[: have - 1]  # the old sink entry is not a block
        self._block_first = grown
        return grown

    def _first_tokens(self, ids: torch.Tensor | None, positions: torch.Tensor):
        """(sequence index per token, first token per token, first token per sequence, metadata) of
        this step, or None without attention metadata (vLLM's memory-profiling dummy run)."""
        md = _attn_metadata()
        if ids is None or md is None or getattr(md, "query_start_loc", None) is None \
                or getattr(md, "block_table", None) is None:
            return None
        N = positions.shape[0]
        ids = ids[:N].to(positions.device).long()
        if ids.shape[0] < N:  # padded step: the pad tokens' ids do not matter
            ids = torch.cat([ids, ids.new_zeros(N - ids.shape[0])])
        table = self._block_first_table(md.block_table, md.slot_mapping)
        seq, first, first_per_seq = first_tokens(ids, md.query_start_loc, md.seq_lens, md.block_table,
                                                 md.slot_mapping, self.block_size, table)
        return seq, first, first_per_seq, md

    def _token_seq_lens(self, positions: torch.Tensor, layout) -> torch.Tensor | None:
        """Each token's sequence length in this step (its scaling choice for dynamic/long RoPE,
        per sequence as in the torch engine)."""
        if self.rope_kind in ("default", "linear"):
            return None
        out = positions + 1
        if layout is not None:
            req, _, _, md = layout
            out = md.seq_lens.to(positions.device)[req].to(positions.dtype)
        return out[:, None]

    def _step_states(self, layout, N: int) -> TokenStates:
        table = self.state_table
        if table.derived is None:  # weights not loaded through load_weights (dummy load format)
            self._reset_states()
            table = self.state_table
        if layout is None:  # profiling dummy run: any states will do
            return TokenStates(table, int(table.slot_of_id[self.phantom_token_id]), None)
        _, first, first_req, _ = layout
        if first.is_cuda and torch.cuda.is_current_stream_capturing():
            # CUDA-graph capture: no host look-ups; replays gather by slot (states of a sequence are
            # put in the table by its first, eager, prefill step)
            return TokenStates(table, None, table.slot_of_id[first].clamp(min=0))
        distinct = torch.unique(first_req).tolist()
        table.ensure(distinct)
        if len(distinct) == 1:
            return TokenStates(table, int(table.slot_of_id[distinct[0]]), None)
        return TokenStates(table, None, table.slot_of_id[first])

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None, inputs_embeds: torch.Tensor | None = None,
                **_unused) -> torch.Tensor:
        ids = input_ids if input_ids is not None else self._step_ids
        self._step_ids = None
        h = inputs_embeds if inputs_embeds is not None else self.language_model.model.embed(input_ids)
        N = h.shape[0]
        layout = self._first_tokens(ids, positions)
        llm = self.pconfig.llm_config
        cos, sin = rope_cos_sin(llm, positions[:, None], h.dtype, self._token_seq_lens(positions, layout))  # (N,1,1,D)
        cos, sin = cos.view(1, N, 1, -1), sin.view(1, N, 1, -1)
        step = _StepState(self._step_states(layout, N), self.paged_attn)
        ctx = AttnContext(query_mask=None, key_mask=None, allowed=None, is_causal=False, past_length=0,
                          phantom_local_index=None, cache=step, attn_implementation="vllm", use_phantom=True)
        h = h[None]  # (1, N, C): the flattened batch as one row; attention keeps sequences apart
        for layer in self.language_model.model.layers:
            h = layer(h, cos, sin, ctx)
        return self.language_model.model.norm(h)[0]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.language_model.head(hidden_states)

