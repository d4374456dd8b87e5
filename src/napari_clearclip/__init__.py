"""napari-clearclip: segment images from words with ClearCLIP on frozen CLIP weights."""

from ._preload import preload_triton

preload_triton()  # before torch: see _preload.py

from .errors import (
    ClearClipError,
    InvalidClassesError,
    InvalidImageError,
    ModelLoadError,
    OutOfMemoryError,
    WeightsUnavailableError,
)
from .methods import METHODS
from .prompts import IMAGENET_TEMPLATES, parse_classes
from .segmenter import Progress, SegmentationResult, Segmenter

__version__ = "0.1.0"

__all__ = [
    "Segmenter",
    "SegmentationResult",
    "Progress",
    "METHODS",
    "IMAGENET_TEMPLATES",
    "parse_classes",
    "ClearClipError",
    "InvalidClassesError",
    "InvalidImageError",
    "ModelLoadError",
    "OutOfMemoryError",
    "WeightsUnavailableError",
]
