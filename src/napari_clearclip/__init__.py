"""napari-clearclip: segment images from words with ClearCLIP on frozen CLIP weights.

The public names load on first use, so that ``clearclip-segment --help`` and napari's plugin
discovery do not import torch.
"""

from ._preload import preload_triton, shorten_openmp_spin

shorten_openmp_spin()  # before torch loads OpenMP: see _preload.py
preload_triton()  # before torch: see _preload.py

__version__ = "0.1.0"

_PUBLIC = {
    "Segmenter": "segmenter",
    "SegmentationResult": "results",
    "SegmentOptions": "options",
    "Progress": "progress",
    "run_to_end": "progress",
    "METHODS": "methods",
    "IMAGENET_TEMPLATES": "prompts",
    "parse_classes": "prompts",
    "ClearClipError": "errors",
    "InvalidClassesError": "errors",
    "InvalidImageError": "errors",
    "InvalidOptionError": "errors",
    "ModelLoadError": "errors",
    "OutOfMemoryError": "errors",
    "WeightsUnavailableError": "errors",
    "SchedulerUnreachableError": "errors",
    "LessonError": "errors",
    "Lesson": "lessons",
}

__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
