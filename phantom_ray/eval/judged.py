"""Judge-scored benchmarks: MM-Vet(-v2) grading, LLaVA-W / LLaVA-Wilder reviews, MathVista and
MathVerse answer extraction + scoring, through a :class:`~phantom_ray.eval.judge.JudgeClient`.

The grading prompts are the benchmarks' published ones (MM-Vet's few-shot correctness table,
LLaVA-Bench's review rule); MathVista/MathVerse extraction prompts are short zero-shot
instructions, so those scores are close to, not identical with, the original's few-shot GPT runs.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

from phantom_ray.eval.items import EvalItem
from phantom_ray.eval.judge import JudgeClient, SKIP_MESSAGE
from phantom_ray.eval.scorers import BenchmarkScore

MMVET_PROMPT = """Compare the ground truth and prediction from AI models, to give a correctness score for the prediction. <AND> in the ground truth means it is totally right only when all elements in the ground truth are present in the prediction, and <OR> means it is totally right when any one element in the ground truth is present in the prediction. The correctness score is 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, or 1.0 (totally right). Just complete the last space of the correctness score.

Question | Ground truth | Prediction | Correctness
--- | --- | --- | ---
What is x in the equation? | -1 <AND> -5 | x = 3 | 0.0
What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 or 5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | 1.0
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme talks about Iceland and Greenland. It's pointing out that despite their names, Iceland is not very icy and Greenland isn't very green. | 0.4
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme is using humor to point out the misleading nature of Iceland's and Greenland's names. Iceland, despite its name, has lush green landscapes while Greenland is mostly covered in ice and snow. The text 'This is why I have trust issues' is a playful way to suggest that these contradictions can lead to distrust or confusion. The humor in this meme is derived from the unexpected contrast between the names of the countries and their actual physical characteristics. | 1.0
"""

LLAVA_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
LLAVA_RULE = (
    "We would like to request your feedback on the performance of two AI assistants in response to the "
    "user question displayed above. The user asks the question on observing an image. For your reference, "
    "the visual content in the image is represented with a few sentences describing the image. \nPlease "
    "rate the helpfulness, relevance, accuracy, level of details of their responses. Each assistant "
    "receives an overall score on a scale of 1 to 10, where a higher score indicates better overall "
    "performance.\nPlease first output a single line containing only two values indicating the scores for "
    "Assistant 1 and 2, respectively. The two scores are separated by a space.\nIn the subsequent line, "
    "please provide a comprehensive explanation of your evaluation, avoiding any potential bias and "
    "ensuring that the order in which the responses were presented does not affect your judgment."
)

EXTRACT_PROMPT = (
    "You are given a math question and a model's response to it. Extract the model's final answer "
    "from the response: for a multiple-choice question the option letter or the option text, otherwise "
    "the number, expression or short phrase. Output only the extracted answer with no explanation; "
    "output null if the response gives no answer.\n\nQuestion: {question}\n\nModel response: {response}\n\n"
    "Extracted answer:"
)
MATHVERSE_JUDGE_PROMPT = (
    "Below are two answers to a math question. Determine whether the model answer is consistent with the "
    "standard answer. For multiple-choice questions they are consistent only if they pick the same option; "
    "otherwise they are consistent if they express the same value or meaning (for example 0.5m and 50cm). "
    "Reply with 1 if consistent, 0 if not, and nothing else.\n\n[Question]: {question}\n"
    "[Standard Answer]: {gt}\n[Model Answer]: {extraction}\nJudgement:"
)


def _skipped(benchmark: str, items: list[EvalItem], metric: str) -> BenchmarkScore:
    return BenchmarkScore(benchmark, None, metric, len(items), skipped=SKIP_MESSAGE)


def parse_mmvet_grade(content: str) -> float | None:
    """The grade in [0, 1] from the first whitespace token, else None."""
    try:
        score = float(content.strip().split(" ")[0].strip())
    except ValueError:
        return None
    return score if 0.0 <= score <= 1.0 else None


def score_mmvet(items, predictions, judge: JudgeClient | None, benchmark: str = "mmvet") -> BenchmarkScore:
    """Mean grade x 100, per capability (an item counts for each of its capabilities). A grade that
    stays unparseable after 5 tries (temperature raised by 0.5 each) is 0, as in MM-Vet."""
    if judge is None:
        return _skipped(benchmark, items, "gpt_score")
    per_item, caps = [], defaultdict(list)
    for item, pred in zip(items, predictions):
        row = " | ".join([item.question, str(item.answer).replace("<AND>", " <AND> ").replace("<OR>", " <OR> "), pred, ""])
        prompt, grade, temperature = MMVET_PROMPT + "\n" + row, None, 0.0
        for attempt in range(5):
            grade = parse_mmvet_grade(judge.ask(prompt, temperature=temperature, max_tokens=3))
            if grade is not None:
                break
            prompt = MMVET_PROMPT + "\n" + row + "\nPredict the correctness of the answer (digit): "
            temperature += 0.5
        grade = 0.0 if grade is None else grade
        per_item.append({"id": item.id, "grade": grade})
        for cap in item.meta.get("capability", []):
            caps[cap].append(grade)
    score = 100 * sum(r["grade"] for r in per_item) / len(per_item) if per_item else 0.0
    return BenchmarkScore(benchmark, score, "gpt_score", len(items),
                          {c: 100 * sum(v) / len(v) for c, v in caps.items()}, per_item)


def score_mmvet_v2(items, predictions, judge):
    return score_mmvet(items, predictions, judge, benchmark="mmvet-v2")


def parse_review_scores(review: str) -> tuple[float, float] | None:
    """'8 7' or '8,7' on the first line -> (8.0, 7.0); anything else -> None."""
    parts = review.split("\n")[0].replace(",", " ").split()
    if len(parts) != 2:
        return None
    try:
        return float(parts[0]), float(parts[1])
    except ValueError:
        return None


def score_llava(items, predictions, judge, benchmark: str = "llava") -> BenchmarkScore:
    """LLaVA-Bench review: the judge scores the reference answer (assistant 1) and the model's
    (assistant 2) from 1 to 10; the score is 100 * mean(model) / mean(reference), per category and
    overall. Items without a reference answer or with an unparseable review are left out and
    counted in the breakdown as ``unscored``."""
    if judge is None:
        return _skipped(benchmark, items, "relative_score")
    per_item, cats = [], defaultdict(list)
    unscored = 0
    for item, pred in zip(items, predictions):
        if item.answer is None:
            unscored += 1
            per_item.append({"id": item.id, "scores": None, "reason": "no reference answer"})
            continue
        content = (f"[Context]\n{item.meta.get('caption', '')}\n\n[Question]\n{item.question}\n\n"
                   f"[Assistant 1]\n{item.answer}\n\n[End of Assistant 1]\n\n"
                   f"[Assistant 2]\n{pred}\n\n[End of Assistant 2]\n\n[System]\n{LLAVA_RULE}\n\n")
        review = judge.ask(content, system=LLAVA_SYSTEM, temperature=0.2, max_tokens=1024)
        scores = parse_review_scores(review)
        per_item.append({"id": item.id, "scores": scores, "review": review})
        if scores is None:
            unscored += 1
            continue
        cats[str(item.meta.get("category"))].append(scores)
        cats["all"].append(scores)

    def rel(pairs):
        ref = sum(p[0] for p in pairs)
        return 100 * sum(p[1] for p in pairs) / ref if ref else 0.0

    breakdown = {c: rel(v) for c, v in cats.items() if c != "all"}
    breakdown["unscored"] = float(unscored)
    return BenchmarkScore(benchmark, rel(cats["all"]) if cats["all"] else None, "relative_score", len(items),
                          breakdown, per_item)


def score_llava_wilder(items, predictions, judge):
    return score_llava(items, predictions, judge, benchmark="llava_wilder")


# --- MathVista ------------------------------------------------------------------------------------
def _quick_extract(response: str, item: EvalItem) -> str | None:
    """MathVista's rule extraction before asking the judge."""
    text = response.strip()
    if not text:
        return ""
    qtype, atype = item.meta.get("question_type"), item.meta.get("answer_type")
    choices = list(item.meta.get("choices") or [])
    if qtype == "multi_choice" and text in choices:
        return text
    if atype == "integer":
        try:
            return str(int(text))
        except ValueError:
            pass
    if atype == "float":
        try:
            return str(float(text))
        except ValueError:
            pass
    m = re.search(r'The answer is "(.*)"\.', text)
    return m.group(1) if m else None


def normalize_mathvista(extraction: str, item: EvalItem) -> str | None:
    """The extraction in the gold answer's form: an option's text, an int, a float rounded to the
    item's precision, or the raw string for lists/text."""
    qtype, atype = item.meta.get("question_type"), item.meta.get("answer_type")
    extraction = str(extraction).strip()
    if qtype == "multi_choice":
        choices = [str(c) for c in (item.meta.get("choices") or [])]
        if not choices:
            return extraction
        letter = extraction.strip("()., ").upper()
        if len(letter) == 1 and "A" <= letter < chr(ord("A") + len(choices)):
            return choices[ord(letter) - ord("A")]
        if extraction in choices:
            return extraction
        return min(choices, key=lambda c: _edit_distance(extraction.lower(), c.lower()))
    try:
        if atype == "integer":
            return str(int(float(extraction)))
        if atype == "float":
            precision = int(item.meta.get("precision") or 0)
            return str(round(float(extraction), precision))
    except ValueError:
        return None
    return extraction


def _edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def score_mathvista(items, predictions, judge) -> BenchmarkScore:
    if judge is None:
        return _skipped("mathvista", items, "accuracy")
    per_item = []
    for item, pred in zip(items, predictions):
        extraction = _quick_extract(pred, item)
        if extraction is None:
            question = item.meta.get("question") or item.question
            extraction = judge.ask(EXTRACT_PROMPT.format(question=question, response=pred), max_tokens=128).strip()
        normalized = normalize_mathvista(extraction, item)
        gold = normalize_mathvista(str(item.answer), item) if item.meta.get("question_type") != "multi_choice" else str(item.answer)
        ok = normalized is not None and normalized.strip() == str(gold).strip()
        per_item.append({"id": item.id, "extraction": extraction, "parsed": normalized, "correct": ok})
    score = 100 * sum(r["correct"] for r in per_item) / len(per_item) if per_item else 0.0
    return BenchmarkScore("mathvista", score, "accuracy", len(items), {}, per_item)


def score_mathverse(items, predictions, judge) -> BenchmarkScore:
    """Judge extraction then judge consistency (0/1); accuracy per problem version and overall."""
    if judge is None:
        return _skipped("mathverse", items, "accuracy")
    per_item, versions = [], defaultdict(list)
    for item, pred in zip(items, predictions):
        question = item.meta.get("question") or item.question
        extraction = judge.ask(EXTRACT_PROMPT.format(question=question, response=pred), max_tokens=128).strip()
        verdict = None
        for _ in range(3):
            reply = judge.ask(MATHVERSE_JUDGE_PROMPT.format(question=question, gt=item.answer, extraction=extraction),
                              max_tokens=4).replace("Judgement:", "").strip()
            if reply in ("0", "1"):
                verdict = int(reply)
                break
        ok = verdict == 1
        per_item.append({"id": item.id, "extraction": extraction, "correct": ok, "judge_failed": verdict is None})
        versions[str(item.meta.get("problem_version"))].append(ok)
    score = 100 * sum(r["correct"] for r in per_item) / len(per_item) if per_item else 0.0
    return BenchmarkScore("mathverse", score, "accuracy", len(items),
                          {v: 100 * sum(x) / len(x) for v, x in versions.items()}, per_item)


JUDGE_SCORERS: dict[str, Any] = {
    "mmvet": score_mmvet, "mmvet-v2": score_mmvet_v2, "llava": score_llava, "llava_wilder": score_llava_wilder,
    "mathvista": score_mathvista, "mathverse": score_mathverse,
}
