"""``run_eval``: load benchmarks, generate through a pluggable ``predict_fn``, score, write results.

``predict_fn(items) -> list[str]`` receives every item of one benchmark (each carries its own
``max_new_tokens``) and returns one answer per item, in order: the lead plugs in the Ray Data batch
generator; tests plug in a plain function. Output layout under ``output`` (local or ``s3://``)::

    predictions/<benchmark>.jsonl   one record per item: id, question, answer, prediction, parse
    results.json                    scores, breakdowns, paper scores, settings
    results.md                      the markdown table
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable

from phantom_ray import storage
from phantom_ray.eval.items import EvalItem, JUDGE_SCORED, parse_benchmarks
from phantom_ray.eval.judge import JudgeClient, judge_from_env
from phantom_ray.eval.loaders import load_benchmark
from phantom_ray.eval.results import build_results, results_markdown
from phantom_ray.eval.scorers import RULE_SCORERS, BenchmarkScore

log = logging.getLogger(__name__)

PredictFn = Callable[[list[EvalItem]], list[str]]
_FROM_ENV = object()


def score_benchmark(name: str, items: list[EvalItem], predictions: list[str],
                    judge: JudgeClient | None = None) -> BenchmarkScore:
    if len(items) != len(predictions):
        raise ValueError(f"{name}: {len(predictions)} predictions for {len(items)} items")
    if name in JUDGE_SCORED:
        from phantom_ray.eval.judged import JUDGE_SCORERS

        return JUDGE_SCORERS[name](items, predictions, judge)
    return RULE_SCORERS[name](items, predictions)


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def run_eval(benchmarks: str | list[str], data_root: str, output: str, predict_fn: PredictFn, *,
             model: str | None = None, paper_size: str | None = None, limit: int | None = None,
             judge: Any = _FROM_ENV, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate ``benchmarks`` (names or ``"sqa,pope"``/``"all"``) and write predictions and results.

    ``judge``: a :class:`JudgeClient`, ``None`` to skip judge-scored benchmarks, or (default) built
    from the environment. Returns the results dict also written to ``results.json``.
    """
    names = parse_benchmarks(benchmarks)
    if judge is _FROM_ENV:
        judge = judge_from_env() if any(n in JUDGE_SCORED for n in names) else None
    scores = []
    for name in names:
        t0 = time.perf_counter()
        items = load_benchmark(name, data_root, limit=limit)
        if not items:
            raise ValueError(f"{name}: no items under {data_root}")
        predictions = list(predict_fn(items))
        if len(predictions) != len(items):
            raise ValueError(f"{name}: predict_fn returned {len(predictions)} answers for {len(items)} items")
        if not all(isinstance(p, str) for p in predictions):
            raise TypeError(f"{name}: predict_fn must return strings")
        gen_s = time.perf_counter() - t0
        score = score_benchmark(name, items, predictions, judge)
        parses = {r["id"]: r for r in score.per_item}
        lines = []
        for item, pred in zip(items, predictions):
            rec = item.to_record()
            rec.pop("images")
            rec["prediction"] = pred
            rec["scoring"] = parses.get(item.id)
            lines.append(json.dumps(_jsonable(rec), ensure_ascii=False))
        storage.write_text_atomic(storage.join(output, "predictions", f"{name}.jsonl"), "\n".join(lines) + "\n")
        log.info("%s: %s = %s over %d items (%.1fs)", name, score.metric, score.score, score.n, gen_s)
        scores.append(score)
    results = build_results(scores, model, paper_size,
                            extra={"data_root": str(data_root), "limit": limit, "settings": settings or {}})
    results = _jsonable(results)
    storage.write_text_atomic(storage.join(output, "results.json"), json.dumps(results, indent=2) + "\n")
    storage.write_text_atomic(storage.join(output, "results.md"), results_markdown(results))
    return results
