"""Shared processor: image loading and dynamic tiling, chat templates, tokenizers, labels, collate.

Pure Python/torch (no Ray): the same code runs in training workers, Ray Data actors, Serve replicas
and tests, so (image, question, answer) always becomes the same tensors.
"""

from phantom_ray.processing.errors import ImageError, ProcessingError, SampleError
from phantom_ray.processing.images import (
    DEFAULT_MAX_ASPECT_RATIO,
    DEFAULT_MAX_PIXELS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    candidate_grids,
    choose_grid,
    dynamic_tiles,
    load_image,
    tile_pixel_values,
    tiles_to_tensor,
    to_rgb,
)
from phantom_ray.processing.processor import (
    IMAGE_PLACEHOLDER,
    PROMPT_RULES,
    PairSample,
    PhantomProcessor,
    Sample,
    split_content_parts,
)
from phantom_ray.processing.tokenizers import (
    SentencePieceTokenizer,
    build_tiny_tokenizer,
    check_image_token,
    load_tokenizer,
    save_tokenizer,
    tokenizer_files,
)
from phantom_ray.processing.chat_template import chat_template

__all__ = [
    "DEFAULT_MAX_ASPECT_RATIO", "DEFAULT_MAX_PIXELS", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_PLACEHOLDER",
    "ImageError", "PROMPT_RULES", "PairSample", "PhantomProcessor", "ProcessingError", "Sample", "SampleError",
    "SentencePieceTokenizer", "build_tiny_tokenizer", "chat_template", "candidate_grids", "check_image_token", "choose_grid",
    "dynamic_tiles", "load_image", "load_tokenizer", "save_tokenizer", "split_content_parts", "tile_pixel_values", "tiles_to_tensor", "to_rgb",
    "tokenizer_files",
]
