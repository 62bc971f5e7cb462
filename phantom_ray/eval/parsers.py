"""Answer parsers: a model's raw text -> the label a scorer compares (docs/phantom.md#evaluation).

Each function reproduces the original harness' rule, edge cases included, except where the original
crashed or was wrong (each such place says so). Pure python, no dependencies.
"""

from __future__ import annotations

import re

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def letter_index(letter: str) -> int:
    return ord(letter.upper()) - ord("A")


# --- SQA-IMG --------------------------------------------------------------------------------------
_SQA_OPTIONS = ("A", "B", "C", "D", "E")
_SQA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_sqa(prediction: str, num_choices: int) -> int:
    """Choice index, or -1. Rules in order: the text is exactly a letter A-E; or it has >= 2 chars,
    starts with a letter A-E and contains a "."; or exactly one match of ``The answer is X.``
    (X any capital; ``.`` is a regex wildcard in the original, kept). Letters past the item's
    number of choices give -1."""
    if prediction in _SQA_OPTIONS:
        letter = prediction
    elif len(prediction) >= 2 and prediction[0] in _SQA_OPTIONS and "." in prediction:
        letter = prediction[0]
    else:
        found = _SQA_ANSWER_IS.findall(prediction)
        letter = found[0] if len(found) == 1 else ""
    if letter in _SQA_OPTIONS[:num_choices]:
        return _SQA_OPTIONS.index(letter)
    return -1


# --- AI2D -----------------------------------------------------------------------------------------
_CAPITAL = re.compile(r"[A-Z]")


def parse_ai2d(prediction: str) -> int:
    """Index of the first capital letter anywhere in the text ("The answer is B" -> 'T' -> 19, as
    in the original). No capital: -1 (the original raised IndexError and lost the whole run)."""
    m = _CAPITAL.search(prediction)
    return letter_index(m.group(0)) if m else -1


# --- first-character benchmarks (SEED, SEED-2-Plus, MMBench) -------------------------------------
def first_char(prediction: str) -> str:
    """The first character, as the original compared it (case-sensitive, no strip). Empty text:
    '' (the original raised IndexError)."""
    return prediction[:1]


# --- ChartQA --------------------------------------------------------------------------------------
def chartqa_postprocess(prediction: str) -> str:
    """If the answer has a digit, keep its first space-separated token ("12 percent" -> "12")."""
    if any(ch.isdigit() for ch in prediction):
        return prediction.split(" ")[0]
    return prediction


def _to_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            # Percentages are fractions (Pix2Struct's definition). The original's second, later
            # definition, the one actually used, dropped the /100 (docs/phantom.md#d15-eval-harness).
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(target: str, prediction: str, max_relative_change: float = 0.05) -> bool:
    """ChartQA relaxed accuracy: numbers within 5% relative error of a nonzero target, else an
    exact case-insensitive string match (also for a zero target)."""
    p, t = _to_float(prediction), _to_float(target)
    if p is not None and t:
        return abs(p - t) / abs(t) <= max_relative_change
    return prediction.lower() == target.lower()


# --- POPE -----------------------------------------------------------------------------------------
def parse_pope(prediction: str) -> str:
    """'yes' or 'no': lowercased, first sentence (up to the first '.'), commas removed, split on
    single spaces; 'no' if 'no' or 'not' is one of the words, else 'yes' (so "Nope" -> yes,
    "No" -> no, "There is no dog." -> no, "not sure" -> no, "" -> yes)."""
    text = prediction.lower()
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("no" in words or "not" in words) else "yes"


# --- HallusionBench -------------------------------------------------------------------------------
def parse_hallusionbench(prediction: str) -> str:
    """'1' if "yes" occurs anywhere in the lowercased text (so "eyes" counts), else '0'."""
    return "1" if "yes" in prediction.lower() else "0"


# --- MME ------------------------------------------------------------------------------------------
def parse_mme(prediction: str) -> str:
    """'yes' / 'no' / 'other' (MMEEvaluator): lowercased; exactly yes/no, else "yes" then "no" looked
    for in the first 4 characters only ("Yes, ..." -> yes, "not really" -> no, "I think no" ->
    other)."""
    text = prediction.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


# --- MMStar ---------------------------------------------------------------------------------------
def mmstar_correct(prediction: str, answer: str) -> bool:
    """Lowercased/stripped; correct if the first char is the answer letter, or the text starts
    with '(X', 'option X' or 'the answer is X'. Empty prediction: wrong."""
    ans = str(answer).lower().strip().replace("\n", " ")
    pred = str(prediction).lower().strip().replace("\n", " ")
    if not pred:
        return False
    if pred[0] == ans:
        return True
    if pred[0] == "(" and pred[1:2] == ans:
        return True
    if pred.startswith("option ") and pred[7:8] == ans:
        return True
    return pred.startswith("the answer is ") and pred[14:15] == ans


# --- BLINK / CV-Bench -----------------------------------------------------------------------------
_PAREN_LETTER = re.compile(r"\((\w)\)")


def parse_blink(prediction: str) -> str:
    """The letter inside the first '(X)', else the raw text ("A" stays "A", "A." stays "A.")."""
    m = _PAREN_LETTER.search(prediction)
    return m.group(1) if m else prediction


def blink_gold(answer: str) -> str:
    m = _PAREN_LETTER.search(answer)
    if not m:
        raise ValueError(f"BLINK answer {answer!r} has no '(X)' letter")
    return m.group(1)


def cvbench_correct(prediction: str, answer: str) -> bool:
    """The original: correct iff the prediction is a substring of the gold '(A)' ("A", "(A)" and
    "(" all count). Fixed here: an empty/blank prediction is wrong (the original counted it, since
    '' is a substring of everything)."""
    pred = prediction.strip()
    return bool(pred) and pred in answer


# --- VisualWebBench multiple choice ---------------------------------------------------------------
def parse_vwb_choice(response: str, choices: str = "ABCDEFGH") -> int:
    """VisualWebBench's multiple-choice parser -> option index, -1 when nothing parses.

    One character: that letter (upper-cased). "X." at the start: X. Otherwise punctuation is
    removed and "(X)" candidates are searched first, then " X " as a word; several candidates: the
    one occurring last wins.
    """
    if len(response) == 1:
        letter = response.upper()
    elif not response:
        return -1
    elif re.match(r"[A-Z]\.", response):
        letter = response[0]
    else:
        for ch in ",.!?;:'\"":
            response = response.replace(ch, "")
        padded = f" {response} "
        bracketed = [c for c in choices if f"({c})" in padded]
        if bracketed:
            letter = max(bracketed, key=lambda c: padded.rfind(f"({c})"))
        else:
            bare = [c for c in choices if f" {c} " in padded]
            if not bare:
                return -1
            letter = max(bare, key=lambda c: padded.rfind(f" {c} "))
    return letter_index(letter) if "A" <= letter <= "Z" else -1
