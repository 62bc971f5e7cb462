"""PhantomProcessor: (images, conversation) -> token ids, labels, pixel values; and collation.

docs/phantom.md (#image-tiling, #phantom-token, #prompts). Fixes of the reference (#defects):

* D10: ``<image>`` is prepended iff images are given and the text has no placeholder; a stray
  placeholder in a text-only sample is removed.
* D11: every ``<image>`` placeholder gets the tiles of its own image (count checked), and the
  phantom index is taken from the padding side actually used.
* D17: ids are built segment by segment (special tokens by id, the text between them with the
  tokenizer, each assistant answer on its own), so the label mask boundary is exact.

The processor is pure Python/torch; it pickles, so Ray Data actors and Serve replicas can carry it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from phantom_ray.model.config import PhantomConfig
from phantom_ray.processing.errors import SampleError
from phantom_ray.processing.images import (
    DEFAULT_MAX_ASPECT_RATIO,
    DEFAULT_MAX_PIXELS,
    choose_grid,
    load_image,
    tile_pixel_values,
)
from phantom_ray.processing.tokenizers import check_image_token

IMAGE_PLACEHOLDER = "<image>"
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"

# the original's prompt_rule dicts (docs/phantom.md#prompts) (split is "" for every family)
PROMPT_RULES: dict[str, dict[str, str]] = {
    "chatml": {
        "system_start": "<|im_start|>system\n", "system_end": "<|im_end|>",
        "user_start": "<|im_start|>user\n", "user_end": "<|im_end|>",
        "assistant_start": "<|im_start|>assistant\n", "assistant_end": "<|im_end|>",
        "test_start": "assistant\n", "test_end": "<|im_end|>", "split": "",
    },
    "phi3": {
        "system_start": "<|system|>\n", "system_end": "<|end|>",
        "user_start": "<|user|>\n", "user_end": "<|end|>",
        "assistant_start": "<|assistant|>\n", "assistant_end": "<|end|>",
        "test_start": "<|assistant|>\n", "test_end": "<|end|>", "split": "",
    },
}
ROLE_TOKENS = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "phi3": ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
}


@dataclass
class Sample:
    """One encoded sample. ``labels`` is None for generation prompts from ``encode_prompt``."""

    input_ids: torch.Tensor  # (L,) long
    labels: torch.Tensor | None  # (L,) long, ignore_index outside assistant answers + end tokens
    pixel_values: torch.Tensor | None = None  # (T, 3, S, S) float32, tiles of all images in order
    num_tiles: list[int] = field(default_factory=list)  # per image
    truncated_tokens: int = 0

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class PairSample:
    """A Phantom Optimization triple: same prompt and image, two answers."""

    chosen: Sample
    rejected: Sample


# Segment kinds: ("text", str) | ("special", token) | ("image", index) | ("answer", str) | ("end", token)
Segment = tuple[str, Any]


def split_content_parts(messages) -> tuple[list, list]:
    """OpenAI-style content lists -> (messages with string content, images in order).

    ``{"type": "text", "text": ...}`` parts are joined; each ``{"type": "image", "image": src}`` or
    ``{"type": "image_url", "image_url": {"url": src}}`` part becomes an ``<image>`` placeholder at
    its position, and ``src`` (data URI, path, s3:// URI, bytes or PIL image) is collected.
    String contents pass through unchanged."""
    if not isinstance(messages, (list, tuple)):
        return messages, []
    out, images = [], []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), (list, tuple)):
            out.append(m)
            continue
        text = []
        for part in m["content"]:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                text.append(str(part.get("text", "")))
            elif kind in ("image", "image_url"):
                src = part.get(kind)
                if isinstance(src, dict):
                    src = src.get("url")
                if src is None:
                    raise SampleError("malformed_conversation", f"message {k}: {kind} part has no image")
                if isinstance(src, str) and src.startswith(("http://", "https://")):
                    raise SampleError("unsupported_input", f"message {k}: http(s) image URLs are not fetched by the "
                                      "processor; download the image or send it as a data URI")
                if m.get("role") != "user":
                    raise SampleError("malformed_conversation", f"message {k}: images are only allowed in user turns")
                text.append(IMAGE_PLACEHOLDER)
                images.append(src)
            else:
                raise SampleError("malformed_conversation", f"message {k}: unknown content part {part!r:.80}")
        out.append({**m, "content": "".join(text)})
    return out, images


class PhantomProcessor:
    """Turns conversations and images into model inputs, identically for training, batch
    captioning and serving."""

    def __init__(
        self,
        config: PhantomConfig,
        tokenizer,
        max_length: int = 2048,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO,
    ):
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.config = config
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_pixels = max_pixels
        self.max_aspect_ratio = max_aspect_ratio
        self.template = config.template
        if self.template not in PROMPT_RULES:
            raise ValueError(f"config.template={self.template!r} has no prompt rule; expected {sorted(PROMPT_RULES)}")
        self.rule = PROMPT_RULES[self.template]
        self.image_size = config.image_size
        self.num_image_token = config.num_image_token
        # dynamic_image_size=False means one tile per image (the reference ignored the flag, docs/phantom.md#d13-config-fields)
        self.min_tiles = config.min_dynamic_patch if config.dynamic_image_size else 1
        self.max_tiles = config.max_dynamic_patch if config.dynamic_image_size else 1
        self.use_thumbnail = config.use_thumbnail
        self.ignore_index = config.ignore_index

        check_image_token(tokenizer, config)
        self.image_token_id = config.image_token_index
        self.img_start_id = self._token_id(IMG_START, config.img_start_token_index)
        self.img_end_id = self._token_id(IMG_END, config.img_end_token_index)
        self._special_ids = {t: self._token_id(t, None) for t in ROLE_TOKENS[self.template]}
        self.end_token_id = self._special_ids[self.rule["assistant_end"]]
        self._reserved_ids = {self.image_token_id, self.img_start_id, self.img_end_id}
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = config.llm_config.pad_token_id if config.llm_config.pad_token_id is not None else self.end_token_id
        self.pad_token_id = int(pad)
        self._split_re = re.compile("(" + "|".join(re.escape(t) for t in ROLE_TOKENS[self.template]) + ")")
        self._fragment_cache: dict[str, list[int]] = {}

    def _token_id(self, token: str, expected: int | None) -> int:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        unk = getattr(self.tokenizer, "unk_token_id", None)
        if tid is None or (unk is not None and tid == unk):
            raise ValueError(f"tokenizer has no single token for {token!r} (needed by the {self.template} template)")
        if expected is not None and tid != expected:
            raise ValueError(f"tokenizer maps {token!r} to {tid} but the config says {expected}")
        return int(tid)

    @property
    def stop_token_ids(self) -> list[int]:
        """Generation stops on config.eos_token_id and on the assistant end token (docs/phantom.md#prompts)."""
        ids = list(self.config.stop_token_ids)
        if self.end_token_id not in ids:
            ids.append(self.end_token_id)
        return ids

    # ---- prompts ---------------------------------------------------------------------------------
    def _template(self, text: str) -> list[Segment]:
        """A template fragment such as "<|im_start|>user\\n" as special/text segments."""
        return [("special", p) if p in self._special_ids else ("text", p)
                for p in self._split_re.split(text) if p]

    def _user_text(self, text: str) -> list[Segment]:
        segs: list[Segment] = []
        parts = text.split(IMAGE_PLACEHOLDER)
        for k, part in enumerate(parts):
            if k:
                segs.append(("image", None))
            if part:
                segs.append(("text", part))
        return segs

    def _normalise(self, messages, system: str | None, add_generation_prompt: bool, n_images: int,
                   training: bool) -> tuple[list[dict], str | None]:
        if not isinstance(messages, (list, tuple)) or not messages:
            raise SampleError("malformed_conversation", "messages must be a non-empty list of {'role', 'content'} dicts")
        msgs = []
        for k, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise SampleError("malformed_conversation", f"message {k} must be a dict with 'role' and 'content'")
            if not isinstance(m["content"], str):
                raise SampleError("malformed_conversation",
                                  f"message {k} content must be a string, got {type(m['content']).__name__}")
            msgs.append({"role": m["role"], "content": m["content"]})
        if msgs[0]["role"] == "system":
            if system is not None:
                raise SampleError("malformed_conversation", "system prompt given both as argument and as message 0")
            system = msgs.pop(0)["content"]
        if not msgs:
            raise SampleError("malformed_conversation", "conversation has no user turn")
        for k, m in enumerate(msgs):
            want = "user" if k % 2 == 0 else "assistant"
            if m["role"] != want:
                raise SampleError(
                    "malformed_conversation",
                    f"turn {k} has role {m['role']!r}, expected {want!r} (turns alternate user/assistant from a user turn)",
                )
        last = msgs[-1]["role"]
        if add_generation_prompt and last != "user":
            raise SampleError("malformed_conversation", "a generation prompt must end with a user turn")
        if training and not add_generation_prompt and last != "assistant":
            raise SampleError("malformed_conversation", "a training sample must end with an assistant turn")
        for k, m in enumerate(msgs):
            if m["role"] == "assistant" and not m["content"].strip() and training and not add_generation_prompt:
                raise SampleError("empty_answer", f"assistant turn {k} is empty")
        n_placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in msgs if m["role"] == "user")
        if n_images == 0 and n_placeholders:
            for m in msgs:  # docs/phantom.md#d10-image-placeholder: no stray <image> in text-only samples
                if m["role"] == "user":
                    m["content"] = m["content"].replace(IMAGE_PLACEHOLDER, "")
        elif n_images and n_placeholders == 0:
            msgs[0]["content"] = IMAGE_PLACEHOLDER * n_images + msgs[0]["content"]  # image first (docs/phantom.md#prompts)
        elif n_images != n_placeholders:
            raise SampleError(
                "image_count_mismatch",
                f"{n_images} images given but the user turns contain {n_placeholders} {IMAGE_PLACEHOLDER} placeholders",
            )
        return msgs, system

    def _segments(self, msgs: list[dict], system: str | None, add_generation_prompt: bool) -> list[Segment]:
        r = self.rule
        segs: list[Segment] = []
        if system is not None:
            segs += self._template(r["system_start"]) + [("text", system)] + self._template(r["system_end"] + r["split"])
        for m in msgs:
            if m["role"] == "user":
                segs += self._template(r["user_start"]) + self._user_text(m["content"])
                segs += self._template(r["user_end"] + r["split"])
            else:
                segs += self._template(r["assistant_start"])
                if m["content"]:
                    segs.append(("answer", m["content"]))
                segs.append(("end", r["assistant_end"]))
        if add_generation_prompt:
            segs += self._template(r["assistant_start"])
        return segs

    def build_prompt(self, messages, system: str | None = None, add_generation_prompt: bool = True,
                     num_tiles: Sequence[int] | None = None) -> str:
        """The exact template string (docs/phantom.md#prompts). With ``num_tiles`` (one entry per image) the
        ``<image>`` placeholders are expanded to ``<img><IMG_CONTEXT>*K</img>``; otherwise they stay."""
        messages, part_images = split_content_parts(messages)
        n_images = len(num_tiles) if num_tiles is not None else (len(part_images) or None)
        if n_images is None:
            n_images = sum(m.get("content", "").count(IMAGE_PLACEHOLDER) for m in messages
                           if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str))
        msgs, system = self._normalise(messages, system, add_generation_prompt, n_images, training=False)
        out = []
        img = 0
        for kind, val in self._segments(msgs, system, add_generation_prompt):
            if kind == "image":
                if num_tiles is None:
                    out.append(IMAGE_PLACEHOLDER)
                else:
                    out.append(IMG_START + IMG_CONTEXT * (self.num_image_token * num_tiles[img]) + IMG_END)
                img += 1
            else:
                out.append(val)
        return "".join(out)

    # ---- images ----------------------------------------------------------------------------------
    def process_images(self, images, with_pixels: bool = True) -> tuple[torch.Tensor | None, list[int]]:
        """Load and tile images -> (pixel_values (T,3,S,S), tiles per image). ``with_pixels=False``:
        the tile counts only (pixel_values None), for an engine that tiles the images itself."""
        if images is None:
            return None, []
        if not isinstance(images, (list, tuple)):
            images = [images]
        tensors, counts = [], []
        for src in images:
            img = load_image(src, max_pixels=self.max_pixels, max_aspect_ratio=self.max_aspect_ratio)
            if not with_pixels:
                i, j = choose_grid(*img.size, self.image_size, self.min_tiles, self.max_tiles)
                counts.append(i * j + int(self.use_thumbnail and i * j != 1))
                continue
            pv = tile_pixel_values(img, self.image_size, self.min_tiles, self.max_tiles, self.use_thumbnail)
            tensors.append(pv)
            counts.append(int(pv.shape[0]))
        if not tensors:
            return None, counts
        return (tensors[0] if len(tensors) == 1 else torch.cat(tensors, 0)), counts

    # ---- tokenization ----------------------------------------------------------------------------
    def _encode_text(self, text: str, cache: bool = False) -> list[int]:
        if cache and text in self._fragment_cache:
            return self._fragment_cache[text]
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        bad = self._reserved_ids.intersection(ids)
        if bad:
            raise SampleError(
                "reserved_token_in_text",
                f"text contains image marker tokens ({', '.join(sorted(str(b) for b in bad))}); use the {IMAGE_PLACEHOLDER} "
                "placeholder, not <img>/<IMG_CONTEXT>/</img>",
            )
        if cache:
            self._fragment_cache[text] = ids
        return ids

    def _tokenize(self, segs: list[Segment], num_tiles: list[int], supervise: bool):
        ids: list[int] = []
        labels: list[int] = []
        image_spans: list[tuple[int, int]] = []
        pending: list[str] = []
        template_text = {"user\n", "assistant\n", "system\n", "\n"}
        ign = self.ignore_index

        def flush():
            if pending:
                text = "".join(pending)
                t = self._encode_text(text, cache=text in template_text)
                ids.extend(t)
                labels.extend([ign] * len(t))
                pending.clear()

        img = 0
        for kind, val in segs:
            if kind == "text":
                pending.append(val)
                continue
            flush()
            if kind == "special":
                ids.append(self._special_ids[val])
                labels.append(ign)
            elif kind == "image":
                k = self.num_image_token * num_tiles[img]
                start = len(ids)
                ids.append(self.img_start_id)
                ids.extend([self.image_token_id] * k)
                ids.append(self.img_end_id)
                labels.extend([ign] * (k + 2))
                image_spans.append((start, len(ids)))
                img += 1
            elif kind == "answer":
                t = self._encode_text(val)
                ids.extend(t)
                labels.extend(t if supervise else [ign] * len(t))
            elif kind == "end":
                tid = self._special_ids[val]
                ids.append(tid)
                labels.append(tid if supervise else ign)
        flush()
        return ids, labels, image_spans

    def _apply_length_policy(self, ids, labels, image_spans, generation: bool):
        image_tokens = sum(e - s for s, e in image_spans)
        if image_tokens > self.max_length:
            raise SampleError(
                "image_tokens_exceed_max_length",
                f"the images alone take {image_tokens} tokens, over max_length={self.max_length}; "
                "use fewer tiles (max_dynamic_patch) or a larger max_length",
            )
        if len(ids) <= self.max_length:
            return ids, labels, 0
        if generation:
            raise SampleError("prompt_exceeds_max_length",
                              f"prompt is {len(ids)} tokens, over max_length={self.max_length}")
        cut = self.max_length
        if image_spans and cut < image_spans[-1][1]:
            raise SampleError(
                "truncation_would_cut_image",
                f"sample is {len(ids)} tokens; cutting to max_length={self.max_length} would split an image "
                f"(last image ends at token {image_spans[-1][1]})",
            )
        if all(x == self.ignore_index for x in labels[:cut]):
            raise SampleError(
                "answer_truncated_away",
                f"sample is {len(ids)} tokens; at max_length={self.max_length} no answer token is left",
            )
        return ids[:cut], labels[:cut], len(ids) - cut

    def _encode(self, messages, system, add_generation_prompt, pixel_values, num_tiles, with_labels=True) -> Sample:
        msgs, system = self._normalise(messages, system, add_generation_prompt, len(num_tiles), training=with_labels)
        segs = self._segments(msgs, system, add_generation_prompt)
        ids, labels, spans = self._tokenize(segs, num_tiles, supervise=not add_generation_prompt)
        ids, labels, truncated = self._apply_length_policy(ids, labels, spans, generation=add_generation_prompt)
        return Sample(
            input_ids=torch.tensor(ids, dtype=torch.long),
            labels=torch.tensor(labels, dtype=torch.long) if with_labels else None,
            pixel_values=pixel_values,
            num_tiles=list(num_tiles),
            truncated_tokens=truncated,
        )

    def encode(self, messages, images=None, system: str | None = None, add_generation_prompt: bool = False,
               with_pixels: bool = True) -> Sample:
        """A conversation (OpenAI-like role/content dicts, ``<image>`` placeholders in user turns)
        and its images -> Sample. Every assistant answer and its end token are supervised.
        Content may also be an OpenAI-style list of text and image parts (see split_content_parts)."""
        messages, part_images = split_content_parts(messages)
        if part_images:
            if images is not None:
                raise SampleError("malformed_conversation", "images given both as content parts and as images=")
            images = part_images
        pixel_values, num_tiles = self.process_images(images, with_pixels=with_pixels)
        return self._encode(messages, system, add_generation_prompt, pixel_values, num_tiles)

    def encode_raw(self, text: str) -> Sample:
        """A raw completion prompt (``/v1/completions``): the text tokenized as it is, no chat
        template and no BOS added; special-token text (``<|im_start|>``) becomes its token, so the
        text of a rendered chat (:meth:`build_prompt`) gives that chat's own prompt ids. Text only."""
        if not text:
            raise SampleError("empty_prompt", "the prompt is empty")
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        if self._reserved_ids.intersection(ids):
            raise SampleError("reserved_token_in_text", "a completion prompt is text only: it must not contain the "
                              "image marker tokens (<img>, <IMG_CONTEXT>, </img>); send images as a chat")
        ids, _, _ = self._apply_length_policy(ids, ids, [], generation=True)
        return Sample(input_ids=torch.tensor(ids, dtype=torch.long), labels=None)

    def encode_prompt(self, question: str, images=None, system: str | None = None) -> Sample:
        """Single-turn generation prompt (labels None), as the reference's inference prompt."""
        pixel_values, num_tiles = self.process_images(images)
        return self._encode([{"role": "user", "content": question}], system, True, pixel_values, num_tiles,
                            with_labels=False)

    def encode_triple(self, question: str, chosen: str, rejected: str, image=None,
                      system: str | None = None) -> PairSample:
        """Phantom Optimization triple: both answers after the same prompt and the same pixel values."""
        pixel_values, num_tiles = self.process_images(image)
        c = self._encode([{"role": "user", "content": question}, {"role": "assistant", "content": chosen}],
                         system, False, pixel_values, num_tiles)
        r = self._encode([{"role": "user", "content": question}, {"role": "assistant", "content": rejected}],
                         system, False, pixel_values, num_tiles)
        return PairSample(chosen=c, rejected=r)

    # ---- batching --------------------------------------------------------------------------------
    def collate(self, samples: Sequence[Sample], padding_side: str = "right") -> dict:
        """Pad a list of samples into a batch. ``phantom_index`` is the first real token of each row
        (docs/phantom.md#phantom-token) for the padding side used; ``num_tiles`` is the total tiles per row."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        with_labels = [s.labels is not None for s in samples]
        if any(with_labels) and not all(with_labels):
            raise ValueError("cannot collate samples with labels together with samples without labels")
        B = len(samples)
        L = max(len(s) for s in samples)
        input_ids = torch.full((B, L), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((B, L), dtype=torch.long)
        labels = torch.full((B, L), self.ignore_index, dtype=torch.long) if all(with_labels) else None
        phantom_index = torch.zeros(B, dtype=torch.long)
        for b, s in enumerate(samples):
            n = len(s)
            start = L - n if padding_side == "left" else 0
            input_ids[b, start:start + n] = s.input_ids
            attention_mask[b, start:start + n] = 1
            if labels is not None:
                labels[b, start:start + n] = s.labels
            phantom_index[b] = start
        pixel = [s.pixel_values for s in samples if s.pixel_values is not None]
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": (pixel[0] if len(pixel) == 1 else torch.cat(pixel, 0)) if pixel else None,
            "num_tiles": torch.tensor([sum(s.num_tiles) for s in samples], dtype=torch.long),
            "phantom_index": phantom_index,
        }
        if labels is not None:
            batch["labels"] = labels
        return batch

    def collate_pairs(self, pairs: Sequence[PairSample], padding_side: str = "right") -> dict:
        """PO batch: rows 0..B-1 chosen, B..2B-1 rejected; pixel values of the B samples once and
        ``image_repeat=2`` (the model repeats the image features for the rejected rows)."""
        if not pairs:
            raise ValueError("cannot collate an empty list of pairs")
        _check_pairs(pairs)
        batch = self.collate([p.chosen for p in pairs] + [p.rejected for p in pairs], padding_side)
        batch["pixel_values"] = _cat_pixels([p.chosen for p in pairs])
        batch["image_repeat"] = 2
        return batch

    # ---- packing (training) -------------------------------------------------------------------------
    def pack(self, samples: Sequence[Sample], max_tokens_per_row: int) -> dict:
        """Several samples per row, up to ``max_tokens_per_row`` tokens (a longer sample gets a row of
        its own), instead of one padded row each. Besides the :meth:`collate` keys: ``segment_ids``
        (R, L) sample number within the row (-1 on padding), ``sample_index`` (R, L) the sample's
        index in ``samples`` (-1 on padding), ``position_ids`` restarting at 0 per sample,
        ``num_samples``. Pixel values follow the samples' order in the rows (row-major)."""
        if not samples:
            raise ValueError("cannot pack an empty list of samples")
        plan = plan_rows([len(s) for s in samples], max_tokens_per_row)
        batch = self._pack_rows([[(samples[i], i) for i in row] for row in plan])
        batch["pixel_values"] = _cat_pixels([samples[i] for row in plan for i in row])
        batch["num_samples"] = len(samples)
        return batch

    def pack_pairs(self, pairs: Sequence[PairSample], max_tokens_per_row: int) -> dict:
        """PO batch, packed: rows 0..R-1 hold the chosen answers and rows R..2R-1 the rejected ones,
        with the same pairs in the same places (so the image features repeat as in
        :meth:`collate_pairs`, ``image_repeat=2``). Sample k is pair k's chosen answer, B+k its
        rejected answer (``sample_index``). Rows are planned on max(chosen, rejected) length."""
        if not pairs:
            raise ValueError("cannot pack an empty list of pairs")
        _check_pairs(pairs)
        B = len(pairs)
        plan = plan_rows([max(len(p.chosen), len(p.rejected)) for p in pairs], max_tokens_per_row)
        rows = [[(pairs[i].chosen, i) for i in row] for row in plan]
        rows += [[(pairs[i].rejected, B + i) for i in row] for row in plan]
        batch = self._pack_rows(rows)
        batch["pixel_values"] = _cat_pixels([pairs[i].chosen for row in plan for i in row])
        batch["num_samples"] = 2 * B
        batch["image_repeat"] = 2
        return batch

    def _pack_rows(self, rows: list[list[tuple[Sample, int]]]) -> dict:
        R = len(rows)
        L = max(sum(len(s) for s, _ in row) for row in rows)
        with_labels = all(s.labels is not None for row in rows for s, _ in row)
        input_ids = torch.full((R, L), self.pad_token_id, dtype=torch.long)
        labels = torch.full((R, L), self.ignore_index, dtype=torch.long)
        segment_ids = torch.full((R, L), -1, dtype=torch.long)
        sample_index = torch.full((R, L), -1, dtype=torch.long)
        position_ids = torch.zeros((R, L), dtype=torch.long)
        num_tiles = torch.zeros(R, dtype=torch.long)
        for r, row in enumerate(rows):
            at = 0
            for j, (s, k) in enumerate(row):
                n = len(s)
                input_ids[r, at:at + n] = s.input_ids
                if with_labels:
                    labels[r, at:at + n] = s.labels
                    labels[r, at] = self.ignore_index  # never predict a sample from its predecessor
                segment_ids[r, at:at + n] = j
                sample_index[r, at:at + n] = k
                position_ids[r, at:at + n] = torch.arange(n)
                num_tiles[r] += sum(s.num_tiles)
                at += n
        batch = {"input_ids": input_ids, "attention_mask": (segment_ids >= 0).long(), "segment_ids": segment_ids,
                 "sample_index": sample_index, "position_ids": position_ids, "num_tiles": num_tiles}
        if with_labels:
            batch["labels"] = labels
        return batch

    # ---- decoding --------------------------------------------------------------------------------
    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode([i for i in ids if i >= 0], skip_special_tokens=True)

    def decode_generation(self, ids) -> str:
        """Generated ids -> answer text: stop at the first stop token, skip specials, strip."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        stops = set(self.stop_token_ids)
        out = []
        for i in ids:
            if i in stops:
                break
            out.append(i)
        return self.decode(out).strip()


def _cat_pixels(samples: Sequence[Sample]) -> torch.Tensor | None:
    pixel = [s.pixel_values for s in samples if s.pixel_values is not None]
    return (pixel[0] if len(pixel) == 1 else torch.cat(pixel, 0)) if pixel else None


def plan_rows(lengths: Sequence[int], max_tokens_per_row: int) -> list[list[int]]:
    """First-fit decreasing bin packing of sample lengths into rows of at most ``max_tokens_per_row``
    tokens (a longer sample alone in its row). Deterministic; returns sample indices per row."""
    if max_tokens_per_row < 1:
        raise ValueError(f"max_tokens_per_row must be >= 1, got {max_tokens_per_row}")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_tokens_per_row - n)
    return rows


def _check_pairs(pairs) -> None:
    """Chosen and rejected answers of a pair share one image set (the features are computed once)."""
    for k, p in enumerate(pairs):
        if p.chosen.num_tiles != p.rejected.num_tiles:
            raise ValueError(f"pair {k}: chosen and rejected have different images ({p.chosen.num_tiles} vs "
                             f"{p.rejected.num_tiles} tiles)")
