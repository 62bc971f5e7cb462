"""Errors with a short ``reason`` code, usable as the reason column of an error table."""

from __future__ import annotations

# The base class and the image error live with the one image-ingest function (phantom_ray.ingest),
# below processing in the layering; they are the same classes here, so ``except ProcessingError``
# and ``except ImageError`` catch what ingest raises.
from phantom_ray.ingest import ImageError, InputError

ProcessingError = InputError


class SampleError(ProcessingError):
    """A conversation cannot become a training/generation sample (malformed, too long, ...)."""
