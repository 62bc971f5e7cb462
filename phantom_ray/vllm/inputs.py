"""Prompts for the vLLM model from our processor's output (no vLLM import here).

``PhantomProcessor`` expands every image to ``<img>`` + ``<IMG_CONTEXT>`` x K + ``</img>``. vLLM's
multimodal processor does that expansion itself (from the tiles it computes with the same tiling
code), so the prompt handed to vLLM carries ``<img></img>`` per image; after vLLM's expansion the
token ids are exactly the processor's.
"""

from __future__ import annotations

from typing import Any

from phantom_ray.processing.processor import PROMPT_RULES, ROLE_TOKENS


def template_first_token(template: str) -> str:
    """The token a prompt of the family's chat template without a system turn starts with:
    ``<|im_start|>`` for ChatML, ``<|user|>`` for Phi-3. The vLLM model computes its phantom states
    when the weights load (any other first token's states are computed on first use)."""
    user_start = PROMPT_RULES[template]["user_start"]
    return next(t for t in ROLE_TOKENS[template] if user_start.startswith(t))


def phantom_token_id(config, tokenizer) -> int:
    tok = template_first_token(config.template)
    tid = tokenizer.convert_tokens_to_ids(tok)
    if tid is None or tid == getattr(tokenizer, "unk_token_id", None):
        raise ValueError(f"the tokenizer has no single token for {tok!r}, the {config.template} template's first token")
    return int(tid)


def compact_image_tokens(ids: list[int], img_start: int, img_context: int, img_end: int) -> list[int]:
    """Drop the ``<IMG_CONTEXT>`` runs between ``<img>`` and ``</img>``."""
    out: list[int] = []
    inside = False
    for t in ids:
        if t == img_start:
            inside = True
        elif t == img_end:
            inside = False
        elif inside and t == img_context:
            continue
        out.append(t)
    return out


def vllm_prompt(processor, sample, images: list[Any] | None) -> dict:
    """A vLLM ``TokensPrompt`` dict for an encoded ``Sample`` and its (opened) images."""
    ids = [int(t) for t in sample.input_ids.tolist()]
    prompt: dict = {"prompt_token_ids": ids}
    if images:
        from phantom_ray.processing.images import load_image

        # the RGB image the processor tiled (EXIF, mode, array inputs resolved the same way), so
        # vLLM's tiling of it gives the processor's tiles
        images = [load_image(im, max_pixels=processor.max_pixels, max_aspect_ratio=processor.max_aspect_ratio)
                  for im in images]
        prompt["prompt_token_ids"] = compact_image_tokens(ids, processor.img_start_id, processor.image_token_id,
                                                          processor.img_end_id)
        prompt["multi_modal_data"] = {"image": list(images)}
    return prompt
