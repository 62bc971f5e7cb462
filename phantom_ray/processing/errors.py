"""Errors with a short ``reason`` code, usable as the reason column of an error table."""

from __future__ import annotations


class ProcessingError(ValueError):
    """A sample or image cannot be processed. ``reason`` is a short code such as
    ``undecodable_image`` or ``image_tokens_exceed_max_length``; ``message`` says what to do."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    def __reduce__(self):  # keep (reason, message) across pickling (Ray ships exceptions)
        return (type(self), (self.reason, self.message))


class ImageError(ProcessingError):
    """An input image cannot be used (corrupt, empty, too large, absurd aspect ratio, ...)."""


class SampleError(ProcessingError):
    """A conversation cannot become a training/generation sample (malformed, too long, ...)."""
