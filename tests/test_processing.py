"""Processor tests: tiling, prompts and labels (docs/phantom.md), length policy, collate, PO pairs."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from helpers import noise_pil, tiny_processor
from PIL import Image

from phantom_ray.model.config import PhantomConfig
from phantom_ray.processing import (
    ImageError,
    PhantomProcessor,
    SampleError,
    build_tiny_tokenizer,
    candidate_grids,
    choose_grid,
    dynamic_tiles,
    tile_pixel_values,
)

torch.set_num_threads(1)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


# ------------------------------------------------------------------------------------------------
# Tiling: an independent implementation of the docs/phantom.md#image-tiling rule, written from that text
# ------------------------------------------------------------------------------------------------

SPEC_ORDER = [(1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (4, 1), (1, 4), (2, 2), (1, 5), (5, 1), (6, 1), (2, 3),
              (1, 6), (3, 2)]


def spec_grid(w: int, h: int, size: int = 448) -> tuple[int, int]:
    """docs/phantom.md#image-tiling rule 2 over the literal order of rule 1, with exact fractions for the diffs the
    spec computes in floating point (same result: the ties below are exact in binary too)."""
    ar = w / h
    best, best_diff = (1, 1), float("inf")
    for cols, rows in SPEC_ORDER:
        diff = abs(ar - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and w * h > 0.5 * size * size * cols * rows:
            best = (cols, rows)
    return best


# (w, h, expected grid). Ties: square images tie (1,1) with (2,2) (switch above 633.6 px side);
# ratio 2.5 ties (2,1) with (3,1) (area threshold 301056); 3.5 ties (3,1)/(4,1) (401408);
# 4.5 ties (4,1)/(5,1) (501760).
GRID_TABLE = [
    (448, 448, (1, 1)), (100, 100, (1, 1)),
    (633, 633, (1, 1)), (634, 634, (2, 2)),
    (865, 346, (2, 1)), (870, 348, (3, 1)),
    (346, 865, (1, 3)), (348, 870, (1, 3)),  # 1/2.5 is not an exact tie in binary: closer to 1/3
    (1183, 338, (3, 1)), (1190, 340, (4, 1)),
    (1494, 332, (4, 1)), (1503, 334, (5, 1)),
    (640, 480, (3, 2)), (1920, 1080, (2, 1)), (4000, 3000, (3, 2)), (480, 640, (2, 3)),
    (3000, 500, (6, 1)), (500, 3000, (1, 6)), (1000, 200, (5, 1)), (300, 1200, (1, 4)),
    (900, 300, (3, 1)), (896, 448, (2, 1)), (448, 896, (1, 2)),
]


def test_candidate_grid_order_is_the_spec_order():
    assert candidate_grids(1, 6) == SPEC_ORDER


@pytest.mark.parametrize("w,h,grid", GRID_TABLE)
def test_grid_and_tile_count_follow_the_spec_rule(w, h, grid):
    assert spec_grid(w, h) == grid  # the table itself agrees with the independent rule
    assert choose_grid(w, h) == grid
    tiles = dynamic_tiles(noise_pil(w, h, w + h))
    n = grid[0] * grid[1]
    assert len(tiles) == (n if n == 1 else n + 1)
    assert all(t.size == (448, 448) and t.mode == "RGB" for t in tiles)


def test_tiles_are_direct_crops_of_the_resized_image_and_thumbnail_is_last():
    img = noise_pil(700, 300, 3)  # ratio 2.33 -> (2,1)
    cols, rows = spec_grid(700, 300)
    resized = img.resize((448 * cols, 448 * rows), Image.BICUBIC)
    tiles = dynamic_tiles(img)
    assert len(tiles) == cols * rows + 1
    for k in range(cols * rows):
        box = ((k % cols) * 448, (k // cols) * 448, (k % cols + 1) * 448, (k // cols + 1) * 448)
        assert np.array_equal(np.asarray(tiles[k]), np.asarray(resized.crop(box)))
    assert np.array_equal(np.asarray(tiles[-1]), np.asarray(img.resize((448, 448), Image.BICUBIC)))
    assert len(dynamic_tiles(img, use_thumbnail=False)) == cols * rows


def test_tile_limits_come_from_arguments():
    img = noise_pil(3000, 500)
    assert len(dynamic_tiles(img, max_tiles=2)) == 3  # (2,1) + thumbnail
    assert [t.size for t in dynamic_tiles(img, image_size=32, max_tiles=12)][0] == (32, 32)
    assert len(dynamic_tiles(noise_pil(40, 40), min_tiles=2, max_tiles=4)) == 5  # (2,2): (1,1) not allowed


def test_fast_normalisation_equals_per_tile_totensor_normalize():
    img = noise_pil(1000, 620, 5)
    ref = torch.stack([
        (torch.from_numpy(np.array(t)).permute(2, 0, 1).float().div(255) - MEAN) / STD
        for t in dynamic_tiles(img)
    ])
    fast = tile_pixel_values(img)
    assert fast.shape == ref.shape and fast.dtype == torch.float32
    assert torch.allclose(fast, ref, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# Prompts and labels
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def procs():
    out = {}
    for preset in ("tiny-qwen2", "tiny-internlm2", "tiny-phi3"):
        out[preset] = tiny_processor(preset, max_length=512)
    return out


def real_size_processor(template: str, **kw) -> PhantomProcessor:
    """448 px tiles and 256 tokens per tile (the released models), on the tiny tokenizer's ids."""
    preset = {"chatml": "tiny-qwen2", "phi3": "tiny-phi3"}[template]
    tiny = PhantomConfig.from_preset(preset)
    cfg = PhantomConfig.from_preset(
        "phantom-0.5b" if template == "chatml" else "phantom-3.8b",
        image_token_index=tiny.image_token_index, img_start_token_index=tiny.img_start_token_index,
        img_end_token_index=tiny.img_end_token_index, eos_token_id=tiny.eos_token_id,
    )
    return PhantomProcessor(cfg, build_tiny_tokenizer(template), **kw)


def test_prompt_strings_match_the_spec_byte_for_byte(procs):
    q = [{"role": "user", "content": "Describe the image in detail"}]
    chatml, phi3 = procs["tiny-qwen2"], procs["tiny-phi3"]
    assert chatml.build_prompt(q) == "<|im_start|>user\nDescribe the image in detail<|im_end|><|im_start|>assistant\n"
    assert phi3.build_prompt(q) == "<|user|>\nDescribe the image in detail<|end|><|assistant|>\n"
    assert procs["tiny-internlm2"].build_prompt(q) == chatml.build_prompt(q)
    img_q = [{"role": "user", "content": "<image>Describe the image in detail"}]
    assert chatml.build_prompt(img_q, num_tiles=[1]) == (
        "<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 4 + "</img>Describe the image in detail<|im_end|>"
        "<|im_start|>assistant\n")
    assert chatml.build_prompt(img_q) == "<|im_start|>user\n<image>Describe the image in detail<|im_end|><|im_start|>assistant\n"
    real = real_size_processor("chatml")
    assert real.build_prompt(img_q, num_tiles=[7]) == (
        "<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 1792 + "</img>Describe the image in detail<|im_end|>"
        "<|im_start|>assistant\n")
    # training text (docs/phantom.md#prompts) with a system prompt and two turns
    conv = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
    assert phi3.build_prompt(conv, system="S", add_generation_prompt=False) == (
        "<|system|>\nS<|end|><|user|>\nQ1<|end|><|assistant|>\nA1<|end|><|user|>\nQ2<|end|><|assistant|>\nA2<|end|>")


@pytest.mark.parametrize("template", ["chatml", "phi3"])
def test_image_token_count_is_256_per_tile(template):
    proc = real_size_processor(template)
    s = proc.encode_prompt("What is this?", images=noise_pil(1920, 1080))
    assert s.num_tiles == [3]
    assert s.pixel_values.shape == (3, 3, 448, 448)
    assert int((s.input_ids == proc.image_token_id).sum()) == 256 * 3
    assert s.input_ids[0].item() == proc.tokenizer.convert_tokens_to_ids("<|im_start|>" if template == "chatml" else "<|user|>")


@pytest.mark.parametrize("preset", ["tiny-qwen2", "tiny-internlm2", "tiny-phi3"])
def test_segment_ids_equal_tokenizing_the_prompt_string(procs, preset):
    proc = procs[preset]
    s = proc.encode_prompt("What color is the circle?", images=noise_pil(64, 32), system="Answer briefly.")
    text = proc.build_prompt([{"role": "user", "content": "What color is the circle?"}], system="Answer briefly.",
                             num_tiles=s.num_tiles)
    assert s.input_ids.tolist() == proc.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert s.labels is None


@pytest.mark.parametrize("preset", ["tiny-qwen2", "tiny-phi3"])
def test_labels_cover_exactly_the_answers_and_their_end_tokens(procs, preset):
    proc = procs[preset]
    tok = proc.tokenizer
    answers = ["The circle is red.", " Two squares\nand one triangle."]
    conv = [{"role": "user", "content": "What color is the circle?"}, {"role": "assistant", "content": answers[0]},
            {"role": "user", "content": "How many shapes?"}, {"role": "assistant", "content": answers[1]}]
    s = proc.encode(conv, images=noise_pil(40, 40), system="You are a helpful assistant.")
    ids, labels = s.input_ids.tolist(), s.labels.tolist()
    sup = [k for k, x in enumerate(labels) if x != -100]
    assert all(labels[k] == ids[k] for k in sup)
    want = []
    for a in answers:
        want += tok.encode(a, add_special_tokens=False) + [proc.end_token_id]
    assert [ids[k] for k in sup] == want  # answer ids exactly as the answer alone tokenizes (docs/phantom.md#d17-label-boundary)
    # two contiguous runs, each ending with the end token, each preceded by "assistant\n"
    runs = np.split(np.array(sup), np.where(np.diff(sup) != 1)[0] + 1)
    assert len(runs) == 2
    for run, a in zip(runs, answers):
        assert ids[run[-1]] == proc.end_token_id
        assert tok.decode(ids[run[0]:run[-1]]) == a
        head = tok.decode(ids[:run[0]])
        assert head.endswith("assistant|>\n" if preset == "tiny-phi3" else "<|im_start|>assistant\n")
    assert proc.decode(s.labels[s.labels != -100]) == "".join(answers)
    # generation mode: nothing supervised
    g = proc.encode(conv[:3], images=noise_pil(40, 40), add_generation_prompt=True)
    assert (g.labels == -100).all()


def test_image_placeholders_h10_and_multiple_images(procs):
    proc = procs["tiny-qwen2"]
    ctx = proc.image_token_id
    # text-only sample with a stray <image>: removed, no image tokens
    s = proc.encode_prompt("<image>What is red?")
    assert ctx not in s.input_ids.tolist() and s.pixel_values is None and s.num_tiles == []
    assert "<image>" not in proc.tokenizer.decode(s.input_ids)
    # image without placeholder: prepended to the question
    s = proc.encode_prompt("What is red?", images=noise_pil(32, 32))
    head = proc.tokenizer("<|im_start|>user\n<img>", add_special_tokens=False)["input_ids"]
    assert s.input_ids.tolist()[:len(head)] == head
    # two images, two placeholders: each gets its own tiles, in order
    a, b = noise_pil(32, 32, 1), noise_pil(96, 32, 2)  # 1 tile; (3,1) + thumbnail = 4 tiles
    s = proc.encode([{"role": "user", "content": "<image>left, <image>right: which is wider?"},
                     {"role": "assistant", "content": "The right one."}], images=[a, b])
    assert s.num_tiles == [1, 4]
    ids = s.input_ids
    starts = (ids == proc.img_start_id).nonzero().flatten().tolist()
    ends = (ids == proc.img_end_id).nonzero().flatten().tolist()
    assert [e - st - 1 for st, e in zip(starts, ends)] == [4 * 1, 4 * 4]
    assert torch.equal(s.pixel_values, torch.cat([tile_pixel_values(a, 32), tile_pixel_values(b, 32)]))
    with pytest.raises(SampleError) as e:
        proc.encode_prompt("<image><image>two?", images=[a])
    assert e.value.reason == "image_count_mismatch"


def test_malformed_conversations_are_rejected_with_reasons(procs):
    proc = procs["tiny-phi3"]
    cases = [
        ([], "malformed_conversation"),
        ([{"role": "assistant", "content": "hi"}], "malformed_conversation"),
        ([{"role": "user", "content": "q"}], "malformed_conversation"),  # training needs an answer
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}], "empty_answer"),
        ([{"role": "user", "content": "see <IMG_CONTEXT>"}, {"role": "assistant", "content": "a"}],
         "reserved_token_in_text"),
        ([{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}], "malformed_conversation"),
    ]
    for conv, reason in cases:
        with pytest.raises(SampleError) as e:
            proc.encode(conv)
        assert e.value.reason == reason, conv
        assert pickle.loads(pickle.dumps(e.value)).reason == reason


def test_config_tiling_settings_are_used():
    cfg = PhantomConfig.from_preset("tiny-qwen2", max_dynamic_patch=2, use_thumbnail=False)
    proc = tiny_processor(cfg)
    s = proc.encode_prompt("q", images=noise_pil(300, 40))
    assert s.num_tiles == [2] and s.pixel_values.shape == (2, 3, 32, 32)
    cfg = PhantomConfig.from_preset("tiny-qwen2", dynamic_image_size=False)
    assert tiny_processor(cfg).encode_prompt("q", images=noise_pil(300, 40)).num_tiles == [1]


# ------------------------------------------------------------------------------------------------
# Length policy
# ------------------------------------------------------------------------------------------------

def test_length_policy():
    cfg = PhantomConfig.from_preset("tiny-qwen2")
    tok = build_tiny_tokenizer("chatml")
    img = noise_pil(96, 32)  # 4 tiles -> 16 context tokens + 2 markers
    conv = [{"role": "user", "content": "What is it?"},
            {"role": "assistant", "content": "There are three red circles and two blue squares on the left."}]
    full = PhantomProcessor(cfg, tok, max_length=4096).encode(conv, images=img)
    n_answer = int((full.labels != -100).sum())
    # image tokens alone over the budget: rejected, never cut inside an image
    with pytest.raises(SampleError) as e:
        PhantomProcessor(cfg, tok, max_length=17).encode(conv, images=img)
    assert e.value.reason == "image_tokens_exceed_max_length"
    # answer truncated from its end and counted
    budget = len(full) - 5
    s = PhantomProcessor(cfg, tok, max_length=budget).encode(conv, images=img)
    assert len(s) == budget and s.truncated_tokens == 5
    assert torch.equal(s.input_ids, full.input_ids[:budget]) and torch.equal(s.labels, full.labels[:budget])
    assert int((s.labels != -100).sum()) == n_answer - 5
    # a budget that leaves no answer token, or would cut the image, is an error with a reason
    prompt_len = len(full) - n_answer
    with pytest.raises(SampleError) as e:
        PhantomProcessor(cfg, tok, max_length=prompt_len).encode(conv, images=img)
    assert e.value.reason == "answer_truncated_away"
    with pytest.raises(SampleError) as e:
        PhantomProcessor(cfg, tok, max_length=20).encode(conv, images=img)
    assert e.value.reason == "truncation_would_cut_image"
    with pytest.raises(SampleError) as e:
        PhantomProcessor(cfg, tok, max_length=30).encode_prompt("What is it? " * 10, images=img)
    assert e.value.reason == "prompt_exceeds_max_length"


# ------------------------------------------------------------------------------------------------
# Collate and PO pairs
# ------------------------------------------------------------------------------------------------

def test_collate_right_and_left(procs):
    proc = procs["tiny-qwen2"]
    imgs = [noise_pil(32, 32, 1), None, noise_pil(96, 32, 2)]
    samples = [
        proc.encode([{"role": "user", "content": q}, {"role": "assistant", "content": a}], images=im)
        for q, a, im in [("What color?", "Red.", imgs[0]), ("Count the stars in the sky.", "Three stars.", None),
                         ("Shape?", "A square.", imgs[2])]
    ]
    lens = [len(s) for s in samples]
    L = max(lens)
    for side in ("right", "left"):
        b = proc.collate(samples, padding_side=side)
        assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (3, L)
        assert b["num_tiles"].tolist() == [1, 0, 4]
        assert torch.equal(b["pixel_values"], torch.cat([samples[0].pixel_values, samples[2].pixel_values]))
        for r, s in enumerate(samples):
            n = lens[r]
            sl = slice(L - n, L) if side == "left" else slice(0, n)
            assert torch.equal(b["input_ids"][r, sl], s.input_ids)
            assert torch.equal(b["labels"][r, sl], s.labels)
            assert b["attention_mask"][r].sum() == n and b["attention_mask"][r, sl].all()
            assert b["phantom_index"][r] == (L - n if side == "left" else 0)
            assert b["input_ids"][r, b["phantom_index"][r]] == proc.tokenizer.convert_tokens_to_ids("<|im_start|>")
            pad = b["attention_mask"][r] == 0
            assert (b["input_ids"][r][pad] == proc.pad_token_id).all() and (b["labels"][r][pad] == -100).all()
        # the model's bookkeeping: context tokens == tiles x tokens per tile
        assert int((b["input_ids"] == proc.image_token_id).sum()) == b["num_tiles"].sum() * proc.num_image_token
    gen = proc.collate([proc.encode_prompt("q?", images=imgs[0]), proc.encode_prompt("longer question?")], "left")
    assert "labels" not in gen and gen["phantom_index"].tolist()[1] == 0


def test_po_pairs_share_prompt_and_pixels(procs):
    proc = procs["tiny-phi3"]
    pairs = [
        proc.encode_triple("What color is the circle?", "The circle is red.", "It is blue.", image=noise_pil(64, 32, 1)),
        proc.encode_triple("How many stars?", "Two.", "There are seven yellow stars.", image=noise_pil(32, 32, 2)),
    ]
    for p in pairs:
        assert p.chosen.pixel_values is p.rejected.pixel_values
        c, r = p.chosen, p.rejected
        pc = int((c.labels != -100).nonzero()[0])  # first supervised token = prompt length
        pr = int((r.labels != -100).nonzero()[0])
        assert pc == pr and torch.equal(c.input_ids[:pc], r.input_ids[:pr])
        assert proc.decode(c.labels[c.labels != -100]) != proc.decode(r.labels[r.labels != -100])
    b = proc.collate_pairs(pairs)
    B = len(pairs)
    assert b["input_ids"].shape[0] == 2 * B and b["image_repeat"] == 2
    assert torch.equal(b["pixel_values"], torch.cat([p.chosen.pixel_values for p in pairs]))
    assert b["num_tiles"].tolist() == [3, 1, 3, 1]
    for k, p in enumerate(pairs):
        for row, s in ((k, p.chosen), (B + k, p.rejected)):
            assert torch.equal(b["input_ids"][row, :len(s)], s.input_ids)
    # context tokens == tiles of the B images x tokens per tile x image_repeat
    n_ctx = int((b["input_ids"] == proc.image_token_id).sum())
    assert n_ctx == b["pixel_values"].shape[0] * proc.num_image_token * b["image_repeat"]


def test_processor_pickles(procs):
    proc = procs["tiny-internlm2"]
    clone = pickle.loads(pickle.dumps(proc))
    img = noise_pil(50, 30)
    a, b = proc.encode_prompt("What?", images=img), clone.encode_prompt("What?", images=img)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_values, b.pixel_values)


def test_decode_generation_stops_at_end_token(procs):
    proc = procs["tiny-qwen2"]
    ids = proc.tokenizer.encode(" The circle is red. ", add_special_tokens=False) + [proc.end_token_id, 7, 8]
    assert proc.decode_generation(ids) == "The circle is red."
    assert proc.end_token_id in proc.stop_token_ids


def test_openai_content_parts_equal_placeholders(procs):
    import base64
    import io

    proc = procs["tiny-qwen2"]
    img = noise_pil(64, 32, 9)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    parts = [{"role": "user", "content": [{"type": "text", "text": "Compare "},
                                          {"type": "image_url", "image_url": {"url": uri}},
                                          {"type": "text", "text": " please."}]},
             {"role": "assistant", "content": "Red."}]
    a = proc.encode(parts)
    b = proc.encode([{"role": "user", "content": "Compare <image> please."}, {"role": "assistant", "content": "Red."}],
                    images=[img])
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.pixel_values, b.pixel_values)
    assert proc.build_prompt(parts[:1]) == "<|im_start|>user\nCompare <image> please.<|im_end|><|im_start|>assistant\n"
    with pytest.raises(SampleError) as e:
        proc.encode([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
                     {"role": "assistant", "content": "a"}])
    assert e.value.reason == "unsupported_input"
