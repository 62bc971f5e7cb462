"""The table of chats that templates and tokenizers are checked over (system turns, multi-turn, 0-3
images given as parts or as ``<image>`` placeholders): shared by test_chat_template and
test_tokenizer_export."""

from __future__ import annotations

from helpers import noise_pil


def _part(img):
    return {"type": "image", "image": img}


def _text(t):
    return {"type": "text", "text": t}


A, B, C = noise_pil(30, 30, 1), noise_pil(96, 32, 2), noise_pil(20, 60, 3)
SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer briefly."}

# (name, messages, images given separately or None)
CHATS = [
    ("one turn", [{"role": "user", "content": "What colour is the circle?"}], None),
    ("system", [SYSTEM, {"role": "user", "content": "Hi"}], None),
    ("multi-turn", [{"role": "user", "content": "What shape is it?"}, {"role": "assistant", "content": "It is a square."},
                    {"role": "user", "content": "And the colour?"}], None),
    ("system multi-turn", [SYSTEM, {"role": "user", "content": "Count the shapes."},
                           {"role": "assistant", "content": "There are three shapes: one circle, one square, one star."},
                           {"role": "user", "content": "Which is left?"}], None),
    ("empty answer", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""},
                      {"role": "user", "content": "Hello?"}], None),
    ("1 image part", [{"role": "user", "content": [_part(A), _text("Describe the image.")]}], None),
    ("image after text", [{"role": "user", "content": [_text("Look: "), _part(B), _text(" what is left?")]}], None),
    ("image_url part", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": A}},
                                                     _text("What is it?")]}], None),
    ("2 images one turn", [SYSTEM, {"role": "user", "content": [_part(A), _part(B), _text("Compare them.")]}], None),
    ("3 images", [{"role": "user", "content": [_part(A), _text("and"), _part(B), _text("and"), _part(C),
                                               _text("Which is red?")]}], None),
    ("images in different turns", [{"role": "user", "content": [_part(A), _text("What is this?")]},
                                   {"role": "assistant", "content": "A red circle."},
                                   {"role": "user", "content": [_text("And this one?"), _part(C)]}], None),
    ("string placeholders", [{"role": "user", "content": "<image>What is in the picture?"}], [B]),
    ("string placeholders, two turns", [{"role": "user", "content": "<image>First?"},
                                        {"role": "assistant", "content": "A circle."},
                                        {"role": "user", "content": "Now <image> this?"}], [A, C]),
]
