"""Independent references for the engine tests: generation by a direct ``model.generate`` call."""

from __future__ import annotations

from typing import Any

import torch


@torch.inference_mode()
def greedy_reference(engine, image: Any, prompt: str, max_new_tokens: int) -> str:
    """Caption of one image by a direct ``model.generate`` call on a batch of one, prompt built by
    ``encode_prompt`` and decoded (stripped) by ``decode_generation``: no engine code involved."""
    proc, model = engine.processor, engine.model
    s = proc.encode_prompt(prompt, images=image)
    pv = s.pixel_values.to(device=model.device, dtype=model.dtype) if s.pixel_values is not None else None
    ids = s.input_ids[None].to(model.device)
    gen = model.generate(ids, torch.ones_like(ids), pv, max_new_tokens=max_new_tokens,
                         stop_token_ids=proc.stop_token_ids, pad_token_id=proc.pad_token_id)
    n = int(gen.lengths[0])
    return proc.decode_generation(gen.sequences[0, :n].tolist())
