"""``EvalConfig``: what ``phantom-ray eval`` / ``jobs/eval.py`` run, in the one config style.

Loaded from YAML with dotted overrides like every other stage (:class:`phantom_ray.config.Config`);
the CLI flags are shorthands for the same fields::

    phantom-ray eval --config configs/eval/phantom-0.5b.yaml num_beams=3 limit=50
    phantom-ray eval --model BK-Lee/Phantom-0.5B --benchmarks sqa,pope --data-root ... --output ...

Judge credentials are never part of a config (a config is saved next to its results): the judge's
URL and key come from ``PHANTOM_JUDGE_BASE_URL`` / ``PHANTOM_JUDGE_API_KEY`` (see
:mod:`phantom_ray.eval.judge`); the config only chooses the judge model, its patience and whether
a missing judge is an error.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from phantom_ray.config import Config, resolve_path


class JudgeSettings(Config):
    """The judge of the judge-scored benchmarks (MM-Vet, LLaVA-W, MathVista, ...)."""

    model: str | None = Field(None, description="judge model name (default: PHANTOM_JUDGE_MODEL or gpt-4-0613)")
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(4, ge=0)
    required: bool = Field(False, description="fail when a judge-scored benchmark has no judge configured "
                                              "(default: report it as skipped)")


class EvalConfig(Config):
    """One evaluation run: which checkpoint, which benchmarks, where data and results live, how to
    generate (the original harness: ``num_beams: 3``) and on how many actors."""

    model: str = Field(description="checkpoint directory/URI, hub id or preset name")
    benchmarks: list[str] = Field(description="benchmark names (or one comma-separated string, or 'all')")
    data_root: str = Field(description="root of the benchmark files (local path or s3://)")
    output: str = Field(description="where predictions/ and results.{json,md} go (local path or s3://)")
    limit: int | None = Field(None, ge=1, description="only the first N items of each benchmark")
    paper_size: Literal["0.5b", "1.8b", "3.8b", "7b"] | None = Field(
        None, description="paper column to compare with (default: guessed from the model name)")
    # generation
    num_beams: int = Field(1, ge=1, description="1 = greedy; the original harness used 3")
    engine: Literal["auto", "torch", "vllm"] | None = Field(
        None, description="generation backend; None/auto = vllm where installed, torch for beam search "
                          "(num_beams > 1 is torch-only)")
    batch_size: int = Field(8, ge=1, description="generation batch size per actor")
    # None below = the generation path's own default (phantom_ray.eval's make_predict_fn), so the
    # defaults are written in one place
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None
    seed: int | None = None
    max_length: int | None = Field(None, ge=1, description="prompt + answer token budget")
    # Ray resources of the generation actor pool
    min_replicas: int | None = Field(None, ge=1)
    max_replicas: int | None = Field(None, ge=1)
    num_gpus: float | None = Field(None, ge=0, description="GPUs per actor (default: 1 where CUDA is present)")
    num_cpus: float | None = Field(None, gt=0)
    use_ray: bool | None = Field(None, description="false: one in-process engine (tests, laptops)")
    judge: JudgeSettings = Field(default_factory=JudgeSettings)

    @field_validator("benchmarks", mode="before")
    @classmethod
    def _benchmarks(cls, value: Any) -> list[str]:
        # names are checked (and aliases such as mm-vet mapped) when the config is built, not
        # after the model has loaded
        from phantom_ray.eval.items import parse_benchmarks

        return parse_benchmarks(value)

    @field_validator("data_root", "output")
    @classmethod
    def _absolute(cls, value: str) -> str:
        # relative to where the user launched, before Ray moves workers into its session folder
        return resolve_path(value)

    @field_validator("max_replicas")
    @classmethod
    def _replicas(cls, value: int | None, info) -> int | None:
        low = info.data.get("min_replicas")
        if value is not None and low is not None and value < low:
            raise ValueError(f"max_replicas ({value}) is below min_replicas ({low})")
        return value

    @model_validator(mode="after")
    def _engine_beams(self) -> "EvalConfig":
        if self.engine == "vllm" and self.num_beams > 1:
            raise ValueError(f"engine vllm cannot run num_beams={self.num_beams}: beam search is torch-only; "
                             f"use engine torch (or auto, which picks torch for beams), or num_beams 1")
        return self

    def predict_options(self) -> dict[str, Any]:
        """Keyword arguments for ``make_predict_fn`` besides the model, beams and batch size: the
        fields this config sets (None = the generation path's default)."""
        names = ("min_replicas", "max_replicas", "num_gpus", "num_cpus", "dtype", "seed", "max_length", "use_ray")
        names = ("engine",) + names
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def settings(self) -> dict[str, Any]:
        """The generation settings recorded in results.json."""
        return {"num_beams": self.num_beams, "batch_size": self.batch_size,
                **{n: getattr(self, n) for n in ("engine", "dtype", "seed", "max_length") if getattr(self, n) is not None}}
