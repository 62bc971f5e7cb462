"""Held-out answer accuracy on the synthetic shapes corpus (closed answer sets, spec-free sanity check).

For each held-out triple, every answer of its question's class set (6 colours, 3 shapes, 3 counts)
is scored by the model's summed log-prob after the prompt; the prediction is the best-scoring
answer. Chance is 1/6 for colour and 1/3 for shape and count questions.

    acc = choice_accuracy("runs/tiny-cpu/export", "runs/tiny-cpu/packed/_synth/heldout/synth_triples.json")
"""

from __future__ import annotations

import json

import torch

from phantom_ray import storage


def choice_accuracy(model_dir: str, triples_uri: str, limit: int | None = None, items: list | None = None) -> dict:
    """Held-out answer accuracy: the option with the highest log-probability counts as the answer.
    ``items``, when given, receives one dict per question (image, question, answer, chosen, correct)."""
    from phantom_ray.loader import load_model

    loaded = load_model(model_dir, device="cpu", dtype=None, max_length=512)  # the checkpoint's dtype
    return choice_accuracy_of(loaded.model, loaded.processor, triples_uri, limit, items)


def choice_accuracy_of(model, proc, triples_uri: str, limit: int | None = None, items: list | None = None) -> dict:
    """:func:`choice_accuracy` of a model in memory (validation during training)."""
    from phantom_ray.data.synth import COLOURS, COUNT_WORDS, SHAPES
    from phantom_ray.processing.images import load_image
    from phantom_ray.train.loss import sequence_logps

    classes = {"colour": list(COLOURS), "shape": list(SHAPES), "count": list(COUNT_WORDS)}
    device, dtype = model.device, model.dtype
    records = json.loads(storage.read_text(triples_uri))[:limit]
    root = triples_uri.rsplit("/", 1)[0]
    correct, chance = 0, 0.0
    for rec in records:
        qtype = rec["meta"]["qtype"]
        options = classes[qtype]
        image = load_image(storage.read_bytes(storage.join(root, rec["image"])))
        samples = [proc.encode([{"role": "user", "content": rec["question"]}, {"role": "assistant", "content": o}],
                               images=[image]) for o in options]
        batch = proc.collate(samples)
        with torch.no_grad():
            out = model(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                        batch["pixel_values"].to(device, dtype), phantom_index=batch["phantom_index"].to(device))
        logps, _ = sequence_logps(out.logits, batch["labels"].to(device))
        answer = options[int(logps.argmax())]
        correct += int(answer == rec["chosen"])
        if items is not None:
            items.append({"image": storage.join(root, rec["image"]), "question": rec["question"], "answer": answer,
                          "chosen": rec["chosen"], "correct": answer == rec["chosen"]})
        chance += 1 / len(options)
    n = max(1, len(records))
    return {"accuracy": correct / n, "chance": chance / n, "n": len(records)}
