"""Rule-based scorers: items + predictions -> :class:`BenchmarkScore` (docs/phantom.md#evaluation).

Scores are percentages, except MME (perception + cognition totals, out of 2800, as reported).
Each item's parse and verdict is kept in ``per_item`` so a prediction file can be audited.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

from phantom_ray.eval import parsers as P
from phantom_ray.eval.items import EvalItem
from phantom_ray.eval.text_metrics import rouge_scores, token_f1

MME_TASKS = {
    "perception": ["existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                   "artwork", "OCR"],
    "cognition": ["commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"],
}
SEED_2_PLUS_TYPES = ("chart", "map", "web")


@dataclass
class BenchmarkScore:
    benchmark: str
    score: float | None
    metric: str
    n: int
    breakdown: dict[str, float] = field(default_factory=dict)
    per_item: list[dict[str, Any]] = field(default_factory=list)
    skipped: str | None = None

    def to_dict(self, with_items: bool = False) -> dict[str, Any]:
        out = {"benchmark": self.benchmark, "score": self.score, "metric": self.metric, "n": self.n,
               "breakdown": self.breakdown, "skipped": self.skipped}
        if with_items:
            out["per_item"] = self.per_item
        return out


def _pct(values: list[bool] | list[float]) -> float:
    return 100.0 * sum(values) / len(values) if values else 0.0


def _check(items: list[EvalItem], predictions: list[str]) -> None:
    if len(items) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(items)} items")


def _accuracy(benchmark: str, items, predictions, judge_one: Callable[[EvalItem, str], tuple[Any, bool]],
              group_key: str | None = None, metric: str = "accuracy") -> BenchmarkScore:
    _check(items, predictions)
    per_item, groups = [], defaultdict(list)
    for item, pred in zip(items, predictions):
        parsed, ok = judge_one(item, pred)
        per_item.append({"id": item.id, "parsed": parsed, "correct": bool(ok)})
        if group_key:
            groups[str(item.meta.get(group_key))].append(bool(ok))
    score = _pct([r["correct"] for r in per_item])
    breakdown = {k: _pct(v) for k, v in groups.items()}
    return BenchmarkScore(benchmark, score, metric, len(items), breakdown, per_item)


def score_sqa(items, predictions):
    def one(item, pred):
        idx = P.parse_sqa(pred, item.meta["num_choices"])
        return idx, idx == item.answer
    return _accuracy("sqa", items, predictions, one)


def score_ai2d(items, predictions):
    def one(item, pred):
        idx = P.parse_ai2d(pred)
        return idx, idx == item.answer
    return _accuracy("ai2d", items, predictions, one)


def score_chartqa(items, predictions):
    def one(item, pred):
        ans = P.chartqa_postprocess(pred).strip()
        golds = item.answer if isinstance(item.answer, list) else [item.answer]
        return ans, any(P.relaxed_correctness(str(g), ans) for g in golds)
    return _accuracy("chartqa", items, predictions, one, metric="relaxed_accuracy")


def _first_char_scorer(name: str, group_key: str | None):
    def scorer(items, predictions):
        def one(item, pred):
            ch = P.first_char(pred)
            return ch, ch != "" and ch == item.answer
        return _accuracy(name, items, predictions, one, group_key)
    return scorer


score_seed = _first_char_scorer("seed", "question_type")
score_seed_2_plus = _first_char_scorer("seed-2-plus", "question_type")
score_mmbench_dev = _first_char_scorer("mmbench_dev", None)
score_mmbench_cn_dev = _first_char_scorer("mmbench_cn_dev", None)


def score_hallusionbench(items, predictions):
    def one(item, pred):
        label = P.parse_hallusionbench(pred)
        return label, label == str(item.answer)
    return _accuracy("hallusionbench", items, predictions, one, metric="question_accuracy")


def score_pope(items, predictions):
    """Accuracy (and F1, precision, recall, yes-ratio) per split; the headline is the mean accuracy
    of the splits present."""
    _check(items, predictions)
    per_item, splits = [], defaultdict(list)
    for item, pred in zip(items, predictions):
        label = P.parse_pope(pred)
        per_item.append({"id": item.id, "parsed": label, "correct": label == item.answer})
        splits[item.meta["split"]].append((label, item.answer))
    breakdown = {}
    for split, pairs in splits.items():
        tp = sum(p == "yes" and g == "yes" for p, g in pairs)
        fp = sum(p == "yes" and g == "no" for p, g in pairs)
        fn = sum(p == "no" and g == "yes" for p, g in pairs)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        breakdown[f"{split}/accuracy"] = _pct([p == g for p, g in pairs])
        breakdown[f"{split}/f1"] = 100 * (2 * precision * recall / (precision + recall) if precision + recall else 0.0)
        breakdown[f"{split}/yes_ratio"] = _pct([p == "yes" for p, _ in pairs])
    accs = [breakdown[f"{s}/accuracy"] for s in splits]
    return BenchmarkScore("pope", sum(accs) / len(accs) if accs else 0.0, "mean_accuracy", len(items),
                          breakdown, per_item)


def score_mme(items, predictions):
    """MMEEvaluator: per subtask acc + acc+ (both questions of an image right), in percent, summed;
    perception and cognition totals; headline = their sum. Images are grouped by their key, not by
    adjacent lines as in the original, and a repeated (image, question) keeps its first answer."""
    _check(items, predictions)
    per_item = []
    by_task: dict[str, dict[str, dict[str, bool]]] = defaultdict(lambda: defaultdict(dict))
    for item, pred in zip(items, predictions):
        label = P.parse_mme(pred)
        ok = label == item.answer
        per_item.append({"id": item.id, "parsed": label, "correct": ok})
        per_image = by_task[item.meta["category"]][item.meta["image_key"]]
        per_image.setdefault(item.question, ok)
    breakdown, totals = {}, {}
    for group, tasks in MME_TASKS.items():
        total = 0.0
        for task in tasks:
            if task not in by_task:
                continue
            images = by_task[task]
            answers = [ok for qs in images.values() for ok in qs.values()]
            acc = _pct(answers)
            acc_plus = _pct([all(qs.values()) and len(qs) == 2 for qs in images.values()])
            breakdown[f"{task}/acc"], breakdown[f"{task}/acc_plus"] = acc, acc_plus
            breakdown[task] = acc + acc_plus
            total += acc + acc_plus
        totals[group] = total
        breakdown[group] = total
    unknown = sorted(set(by_task) - {t for ts in MME_TASKS.values() for t in ts})
    if unknown:
        raise ValueError(f"MME: unknown categories {unknown}; expected {MME_TASKS}")
    return BenchmarkScore("mme", totals["perception"] + totals["cognition"], "perception+cognition", len(items),
                          breakdown, per_item)


def score_mmstar(items, predictions):
    """Accuracy per category and overall. Equal to the original's /250 and /1500 on the full set,
    and still right on a subset (the original's fixed denominators were not)."""
    def one(item, pred):
        return pred, P.mmstar_correct(pred, item.answer)
    return _accuracy("mmstar", items, predictions, one, "category")


def score_blink(items, predictions):
    """Mean of the sub-task accuracies (the sub-tasks present)."""
    def one(item, pred):
        parsed = P.parse_blink(pred)
        return parsed, parsed == P.blink_gold(item.answer)
    result = _accuracy("blink", items, predictions, one, "sub_task")
    result.score = sum(result.breakdown.values()) / len(result.breakdown) if result.breakdown else 0.0
    result.metric = "mean_subtask_accuracy"
    return result


def score_cvbench(items, predictions):
    """Overall = mean(2D, 3D), 2D = mean(ADE20K, COCO), 3D = Omni3D (of the sources present)."""
    def one(item, pred):
        return pred, P.cvbench_correct(pred, item.answer)
    result = _accuracy("cvbench", items, predictions, one, "source")
    b = result.breakdown
    parts_2d = [b[s] for s in ("ADE20K", "COCO") if s in b]
    if parts_2d:
        b["2D"] = sum(parts_2d) / len(parts_2d)
    if "Omni3D" in b:
        b["3D"] = b["Omni3D"]
    dims = [b[d] for d in ("2D", "3D") if d in b]
    result.score = sum(dims) / len(dims) if dims else 0.0
    result.metric = "mean(2D,3D)"
    return result


VWB_MAIN_METRIC = {"web_caption": "rouge_l", "heading_ocr": "rouge_l", "element_ocr": "rouge_l",
                   "webqa": "f1", "element_ground": "accuracy", "action_prediction": "accuracy",
                   "action_ground": "accuracy"}


def score_visualwebbench(items, predictions):
    """Per task: ROUGE-1/2/L (caption, heading OCR, element OCR), F1 against the best gold (WebQA),
    choice accuracy (grounding, action prediction). Headline: mean of each task's main metric."""
    _check(items, predictions)
    tasks: dict[str, list[tuple[EvalItem, str]]] = defaultdict(list)
    for item, pred in zip(items, predictions):
        tasks[item.meta["task_type"]].append((item, pred))
    breakdown, per_item, mains = {}, [], []
    for task, pairs in tasks.items():
        if task not in VWB_MAIN_METRIC:
            raise ValueError(f"VisualWebBench: unknown task_type {task!r}")
        if VWB_MAIN_METRIC[task] == "rouge_l":
            preds = [p if (p and not (task == "element_ocr" and len(p) == 1)) else " " for _, p in pairs]
            metrics = rouge_scores(preds, [str(i.answer) for i, _ in pairs])
            per_item += [{"id": i.id, "parsed": p} for (i, _), p in zip(pairs, preds)]
        elif task == "webqa":
            f1s = []
            for item, pred in pairs:
                golds = list(item.answer) if isinstance(item.answer, (list, tuple)) else [item.answer]
                f1s.append(max(token_f1(pred, str(g)) for g in golds) if golds else 0.0)
                per_item.append({"id": item.id, "parsed": pred, "f1": f1s[-1]})
            metrics = {"f1": 100 * sum(f1s) / len(f1s)}
        else:
            oks = []
            for item, pred in pairs:
                idx = P.parse_vwb_choice(pred)
                oks.append(idx == int(item.answer))
                per_item.append({"id": item.id, "parsed": idx, "correct": oks[-1]})
            metrics = {"accuracy": _pct(oks)}
        for k, v in metrics.items():
            breakdown[f"{task}/{k}"] = v
        mains.append(metrics[VWB_MAIN_METRIC[task]])
    return BenchmarkScore("visualwebbench", sum(mains) / len(mains) if mains else 0.0, "mean_task_score",
                          len(items), breakdown, per_item)


RULE_SCORERS: dict[str, Callable[[list[EvalItem], list[str]], BenchmarkScore]] = {
    "sqa": score_sqa, "ai2d": score_ai2d, "chartqa": score_chartqa, "seed": score_seed,
    "seed-2-plus": score_seed_2_plus, "pope": score_pope, "hallusionbench": score_hallusionbench,
    "mme": score_mme, "mmbench_dev": score_mmbench_dev, "mmbench_cn_dev": score_mmbench_cn_dev,
    "mmstar": score_mmstar, "blink": score_blink, "cvbench": score_cvbench,
    "visualwebbench": score_visualwebbench,
}
