"""The uniform benchmark item and the per-benchmark generation settings (docs/phantom.md#evaluation).

Every loader turns its benchmark's original files into a list of :class:`EvalItem`; the generation
path only reads ``question``, ``images`` and ``max_new_tokens``, the scorers read ``answer`` and
``meta``. The question text already carries the per-benchmark suffix of the original
(``make_instruction``) but no ``<image>`` placeholder: the processor prepends one whenever an image
is supplied and the text lacks it (fixes docs/phantom.md#d10-image-placeholder); :meth:`EvalItem.user_text`
shows that string for one item.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# The public benchmark names (the original's EVAL_DATASETS). The original's data keys differ for
# MM-Vet (`mm-vet`, `mm-vet-v2`), which made `--dataset mmvet` fail (docs/phantom.md#d15-eval-harness); here the public name
# is the only key.
BENCHMARKS: tuple[str, ...] = (
    "sqa", "ai2d", "chartqa", "seed", "seed-2-plus", "pope", "hallusionbench", "mme", "mathvista",
    "mmbench_dev", "mmbench_cn_dev", "mmvet", "mmvet-v2", "llava", "llava_wilder", "mmstar",
    "mathverse", "blink", "cvbench", "visualwebbench",
)

# Scored by rules in this package (no judge model needed).
RULE_SCORED: frozenset[str] = frozenset({
    "sqa", "ai2d", "chartqa", "seed", "seed-2-plus", "pope", "hallusionbench", "mme",
    "mmbench_dev", "mmbench_cn_dev", "mmstar", "blink", "cvbench", "visualwebbench",
})
# Need an LLM judge (answer extraction or grading) configured from the environment.
JUDGE_SCORED: frozenset[str] = frozenset(set(BENCHMARKS) - RULE_SCORED)

# Accepted spellings of the original's data keys -> public name.
ALIASES = {"mm-vet": "mmvet", "mm-vet-v2": "mmvet-v2", "mmvet_v2": "mmvet-v2", "seed_2_plus": "seed-2-plus"}

MC_SUFFIX = "Answer with the option's letter from the given choices directly."
SHORT_SUFFIX = "Answer the question using a single word or phrase."
YESNO_SUFFIX = "Please answer yes or no."

_SUFFIX = {
    **{b: MC_SUFFIX for b in ("sqa", "mmbench_dev", "mmbench_cn_dev", "seed", "seed-2-plus", "ai2d",
                              "mmstar", "cvbench", "blink")},
    "pope": SHORT_SUFFIX,
    "chartqa": SHORT_SUFFIX,
}

_MAX_NEW_TOKENS = {
    **{b: 5 for b in ("mme", "pope", "sqa", "mmbench_dev", "mmbench_cn_dev", "seed", "seed-2-plus",
                      "ai2d", "mmstar", "chartqa", "hallusionbench", "cvbench", "blink")},
    **{b: 1024 for b in ("llava", "llava_wilder", "mmvet", "mmvet-v2")},
    **{b: 512 for b in ("mathvista", "mathverse", "visualwebbench")},
}


def canonical_name(name: str) -> str:
    """Public benchmark name for ``name`` (case-insensitive, original aliases accepted)."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from: {', '.join(BENCHMARKS)} (or 'all')")
    return key


def parse_benchmarks(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"sqa,pope"`` or a list -> canonical names, in order, without duplicates.

    ``all`` selects every benchmark (the original compared a single character against "all", so
    its `--dataset all` never worked: docs/phantom.md#d15-eval-harness).
    """
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for part in parts:
        part = part.strip()
        if not part:
            continue
        names = BENCHMARKS if part.lower() == "all" else (canonical_name(part),)
        for n in names:
            if n not in out:
                out.append(n)
    if not out:
        raise ValueError("no benchmark selected: pass e.g. --benchmarks sqa,pope or --benchmarks all")
    return out


def max_new_tokens(benchmark: str) -> int:
    return _MAX_NEW_TOKENS[canonical_name(benchmark)]


def with_suffix(benchmark: str, question: str) -> str:
    """The original ``make_instruction`` suffix rule (without its ``<image>`` bug: docs/phantom.md#d10-image-placeholder)."""
    benchmark = canonical_name(benchmark)
    if benchmark == "hallusionbench":
        return question if YESNO_SUFFIX in question else f"{question}\n{YESNO_SUFFIX}"
    suffix = _SUFFIX.get(benchmark)
    return f"{question}\n{suffix}" if suffix else question


@dataclass
class EvalItem:
    """One benchmark question, ready for generation and scoring.

    ``images`` holds, per image, either a URI (local path or ``s3://``) or the encoded file bytes
    (benchmarks that ship images inside parquet/TSV). Several images (BLINK, MM-Vet-v2) are
    concatenated side by side by the original before tiling; :func:`phantom_ray.ingest.load_image`
    and ``concat_horizontally`` reproduce that.
    """

    benchmark: str
    id: str
    question: str
    images: list[Any] = field(default_factory=list)
    max_new_tokens: int = 5
    answer: Any = None
    meta: dict[str, Any] = field(default_factory=dict)

    def user_text(self) -> str:
        """The user turn as the model sees it: ``<image>`` first when an image is supplied."""
        if self.images and "<image>" not in self.question:
            return "<image>" + self.question
        return self.question

    def to_record(self) -> dict[str, Any]:
        """JSON-safe dict without image bytes (for prediction files)."""
        rec = asdict(self)
        rec["images"] = [im if isinstance(im, str) else f"<{len(im)} bytes>" for im in self.images]
        return rec
