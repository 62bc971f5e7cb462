"""Inference: the generation engine (no Ray) and the Ray Data batch captioning pipeline.

    from phantom_ray.infer import PhantomEngine, GenerationConfig
    from phantom_ray.infer.caption import caption, CaptionConfig   # Ray Data job over a bucket of images
    from phantom_ray.infer import make_predict_fn              # eval: predict_fn(items) -> list[str]

Ray is imported lazily (by ``caption`` and the predict functions), so importing the engine does
not import Ray.
"""

from phantom_ray.infer.engine import DEFAULT_PROMPT, Generation, GenerationConfig, PhantomEngine

__all__ = ["DEFAULT_PROMPT", "Generation", "GenerationConfig", "PhantomEngine", "CaptionConfig", "make_predict_fn"]


def __getattr__(name):
    # lazy, so that importing the engine does not import the pipeline module (``caption`` is the
    # submodule's name: its function is phantom_ray.infer.caption.caption)
    if name in ("CaptionConfig", "make_predict_fn"):
        import importlib

        return getattr(importlib.import_module("phantom_ray.infer.caption"), name)
    raise AttributeError(f"module 'phantom_ray.infer' has no attribute {name!r}")
