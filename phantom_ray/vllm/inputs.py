"""Prompts for the vLLM model from our processor's output (no vLLM import here).

``PhantomProcessor`` expands every image to ``<img>`` + ``<IMG_CONTEXT>`` x K + ``</img>``. vLLM's
multimodal processor does that expansion itself (from the tiles it computes with the same tiling
code), so the prompt handed to vLLM carries ``<img></img>`` per image; after vLLM's expansion the
token ids are exactly the processor's.
"""

from __future__ import annotations

from typing import Any


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
        prompt["prompt_token_ids"] = compact_image_tokens(ids, processor.img_start_id, processor.image_token_id,
                                                          processor.img_end_id)
        prompt["multi_modal_data"] = {"image": list(images)}
    return prompt
