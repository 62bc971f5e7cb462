"""``phantom-ray eval``: score a checkpoint on the Phantom paper's benchmarks.

    phantom-ray eval --model BK-Lee/Phantom-0.5B --benchmarks sqa,pope,chartqa \
        --data-root s3://bucket/eval_data --output s3://bucket/eval/phantom-0.5b
    phantom-ray eval --config eval.yaml num_beams=3 judge.required=true

The run is an :class:`~phantom_ray.eval.config.EvalConfig` (YAML via ``--config``; the flags set
the same fields; ``key.sub=value`` overrides come last); it is saved as ``eval_config.yaml`` next to
the results. Greedy decoding by default; ``num_beams=3`` reproduces the original harness. Judge-scored
benchmarks need PHANTOM_JUDGE_BASE_URL / PHANTOM_JUDGE_API_KEY (else they are reported as skipped).
"""

from __future__ import annotations

import argparse
import sys

from typing import TYPE_CHECKING

from phantom_ray.config import ConfigError

if TYPE_CHECKING:
    from phantom_ray.eval.config import EvalConfig

# flag -> EvalConfig field; a flag given on the command line overrides the YAML file
_FLAGS = {"model": "model", "benchmarks": "benchmarks", "data_root": "data_root", "output": "output",
          "num_beams": "num_beams", "batch_size": "batch_size", "limit": "limit", "paper_size": "paper_size",
          "engine": "engine"}


def build_config(args: argparse.Namespace):
    """The run's EvalConfig from ``--config``, the flags and the dotted overrides (in that order)."""
    from phantom_ray.config import apply_overrides, load_yaml_mapping
    from phantom_ray.eval.config import EvalConfig

    data: dict = load_yaml_mapping(args.config) if args.config else {}
    source = args.config
    for flag, field in _FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            data[field] = value
    return EvalConfig.from_dict(apply_overrides(data, args.overrides or ()), source=source or "command line")


def _judge(cfg):
    """The judge client: URL and key from the environment only; the config picks model/patience."""
    import dataclasses

    from phantom_ray.eval.judge import SKIP_MESSAGE, JudgeClient, judge_config_from_env
    from phantom_ray.eval.items import JUDGE_SCORED

    if not any(n in JUDGE_SCORED for n in cfg.benchmarks):
        return None
    env = judge_config_from_env()
    if env is None:
        if cfg.judge.required:
            raise ConfigError(f"judge.required is true but no judge is configured: {SKIP_MESSAGE}")
        return None
    changes = {"timeout_s": cfg.judge.timeout_s, "max_retries": cfg.judge.max_retries}
    if cfg.judge.model:
        changes["model"] = cfg.judge.model
    return JudgeClient(dataclasses.replace(env, **changes))


def _predict_fn(cfg: EvalConfig):
    try:
        from phantom_ray.eval.predict import make_predict_fn
    except ImportError as exc:
        print(f"phantom-ray eval: the generation path is unavailable (cannot import "
              f"phantom_ray.eval.predict.make_predict_fn: {exc}). Install the engine's dependencies, or "
              f"call phantom_ray.eval.run_eval with your own predict_fn.", file=sys.stderr)
        return None
    return make_predict_fn(cfg.model, num_beams=cfg.num_beams, batch_size=cfg.batch_size,
                           **cfg.predict_options())


def run(args: argparse.Namespace) -> int:
    from phantom_ray import storage
    from phantom_ray.eval.results import results_markdown, write_results_files
    from phantom_ray.eval.runner import run_eval
    from phantom_ray.logs import setup_logging

    setup_logging(None, verbose=args.verbose, name="eval", announce=not args.dry_run)

    try:
        cfg = build_config(args)
        judge = _judge(cfg)
    except ConfigError as exc:
        print(f"phantom-ray eval: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(cfg.to_yaml(), end="")
        return 0
    predict_fn = _predict_fn(cfg)
    if predict_fn is None:
        return 2
    cfg.save(storage.join(cfg.output, "eval_config.yaml"))
    results = run_eval(cfg.benchmarks, cfg.data_root, cfg.output, predict_fn, model=cfg.model,
                       paper_size=cfg.paper_size, limit=cfg.limit, judge=judge, settings=cfg.settings())
    print(results_markdown(results))
    files = write_results_files(results, cfg.output)
    print(f"results table: {files['markdown']}\nresults chart: {files['chart']}")
    return 0


def register(subparsers) -> None:
    from phantom_ray.eval.items import BENCHMARKS
    from phantom_ray.logs import add_verbose_flag

    p = subparsers.add_parser("eval", help="evaluate a checkpoint on the paper's benchmarks",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="benchmarks: " + ", ".join(BENCHMARKS) + "\n\nexample (the test suite's tiny "
                                     "benchmark files):\n  phantom-ray eval --model tiny-qwen2 --benchmarks sqa,pope "
                                     "--data-root tests/data/eval --output /tmp/phantom-eval --limit 2")
    p.add_argument("--config", default=None, help="EvalConfig YAML (local path or s3://); flags below override it")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="dotted overrides of EvalConfig fields, e.g. num_beams=3 judge.model=gpt-4o")
    p.add_argument("--model", default=None, help="checkpoint directory/URI or preset name")
    p.add_argument("--benchmarks", default=None,
                   help="comma-separated names or 'all'; one of: " + ", ".join(BENCHMARKS))
    p.add_argument("--data-root", default=None, help="Evaluation_Dataset_Path of the seed README (local or s3://)")
    p.add_argument("--output", default=None, help="where predictions/ and results.{json,md} go (local or s3://)")
    p.add_argument("--num-beams", type=int, default=None, help="1 = greedy (default); the original used 3")
    p.add_argument("--engine", default=None, choices=["auto", "torch", "vllm"],
                   help="generation backend (default auto: vllm where installed; beam search runs on torch)")
    p.add_argument("--batch-size", type=int, default=None, help="generation batch size per actor (default 8)")
    p.add_argument("--limit", type=int, default=None, help="only the first N items of each benchmark")
    p.add_argument("--paper-size", default=None, choices=["0.5b", "1.8b", "3.8b", "7b"],
                   help="which paper column to compare with (default: guessed from --model)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    add_verbose_flag(p)
    p.set_defaults(func=run)
