"""Errors raised where a user's input enters the engine.

Every message says what went wrong and what to do about it. All derive from
:class:`ClearClipError` so that callers (the widget, the CLI) can show the
message instead of a traceback.
"""


class ClearClipError(Exception):
    """Base class for errors a user can act on."""


class ModelLoadError(ClearClipError):
    """The model name, weights or checkpoint cannot be used."""


class WeightsUnavailableError(ModelLoadError):
    """Pretrained weights are neither cached nor downloadable right now."""


class InvalidClassesError(ClearClipError, ValueError):
    """The class list is empty, has empty or duplicate names, or bad templates."""


class InvalidImageError(ClearClipError, ValueError):
    """The image has an unsupported shape or dtype, is too small, or holds NaN/inf."""


class OutOfMemoryError(ClearClipError):
    """The device ran out of memory even with one window per batch."""
