"""ROUGE-1/2/L and token F1 in pure python (VisualWebBench's caption, OCR and WebQA metrics).

Tokenisation follows Google's ``rouge_score``: lowercase, every non-alphanumeric character is a
separator; n-gram overlaps are clipped counts. The original harness used the ``rouge`` package
(case-sensitive, splits sentences on '.', unions LCS over sentences for ROUGE-L), so figures can
differ from it by a little; these definitions are the standard ones and need no extra dependency.
"""

from __future__ import annotations

import re
from collections import Counter

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def tokenize(text: str) -> list[str]:
    return [t for t in _NON_ALNUM.split(str(text).lower()) if t]


def _f1(overlap: int, n_pred: int, n_ref: int) -> float:
    if overlap == 0 or n_pred == 0 or n_ref == 0:
        return 0.0
    p, r = overlap / n_pred, overlap / n_ref
    return 2 * p * r / (p + r)


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def rouge_n(prediction: str, reference: str, n: int) -> float:
    """ROUGE-N F-measure in [0, 1]."""
    p, r = _ngrams(tokenize(prediction), n), _ngrams(tokenize(reference), n)
    return _f1(sum((p & r).values()), sum(p.values()), sum(r.values()))


def lcs_length(a: list[str], b: list[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence) in [0, 1]."""
    p, r = tokenize(prediction), tokenize(reference)
    return _f1(lcs_length(p, r), len(p), len(r))


def token_f1(prediction: str, reference: str) -> float:
    """Bag-of-words F1 (equal to ROUGE-1 F): VisualWebBench's WebQA metric."""
    return rouge_n(prediction, reference, 1)


def rouge_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F over pairs, in percent."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {"rouge_1": 0.0, "rouge_2": 0.0, "rouge_l": 0.0}
    n = len(predictions)
    return {
        "rouge_1": 100 * sum(rouge_n(p, r, 1) for p, r in zip(predictions, references)) / n,
        "rouge_2": 100 * sum(rouge_n(p, r, 2) for p, r in zip(predictions, references)) / n,
        "rouge_l": 100 * sum(rouge_l(p, r) for p, r in zip(predictions, references)) / n,
    }
