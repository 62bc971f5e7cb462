"""Benchmark evaluation for Phantom (docs/phantom.md#evaluation): loaders, parsers, scorers, judge, results.

    from phantom_ray.eval import run_eval, load_benchmark, score_benchmark
    results = run_eval("sqa,pope", "/data/eval", "/tmp/eval_out", predict_fn)

No Ray here: ``predict_fn(items) -> list[str]`` is where the batch generator plugs in.
"""

from phantom_ray.eval.items import (BENCHMARKS, JUDGE_SCORED, RULE_SCORED, EvalItem, max_new_tokens,
                                    parse_benchmarks, with_suffix)
from phantom_ray.eval.judge import JudgeClient, JudgeConfig, judge_from_env
from phantom_ray.eval.loaders import load_benchmark
from phantom_ray.eval.results import PAPER_SCORES, results_markdown
from phantom_ray.eval.runner import run_eval, score_benchmark
from phantom_ray.eval.scorers import BenchmarkScore

__all__ = [
    "BENCHMARKS", "JUDGE_SCORED", "RULE_SCORED", "EvalItem", "max_new_tokens", "parse_benchmarks",
    "with_suffix", "JudgeClient", "JudgeConfig", "judge_from_env", "load_benchmark", "PAPER_SCORES",
    "results_markdown", "run_eval", "score_benchmark", "BenchmarkScore",
]
