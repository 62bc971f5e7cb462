"""Inference: the generation engine (no Ray) and the Ray Data batch captioning pipeline.

    from phantom_ray.infer import PhantomEngine, GenerationConfig
    from phantom_ray.infer import caption, CaptionConfig       # Ray Data job over a bucket of images
    from phantom_ray.infer import make_predict_fn              # eval: predict_fn(items) -> list[str]

Ray is imported lazily (by ``caption`` and the predict functions), so importing the engine does
not import Ray.
"""

from phantom_ray.infer.engine import DEFAULT_PROMPT, Generation, GenerationConfig, PhantomEngine

__all__ = ["DEFAULT_PROMPT", "Generation", "GenerationConfig", "PhantomEngine", "CaptionConfig", "caption",
           "make_predict_fn"]


def __getattr__(name):
    if name in ("CaptionConfig", "caption", "make_predict_fn"):
        from phantom_ray.infer import caption as _caption_module

        return getattr(_caption_module, name)
    raise AttributeError(f"module 'phantom_ray.infer' has no attribute {name!r}")
