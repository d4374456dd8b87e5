"""Errors raised where a user's input enters the engine.

Every message says what went wrong and what to do about it. All derive from
:class:`ClearClipError` (so the widget and the CLI can show the message instead
of a traceback) and from the matching Python built-in, so that ordinary
``except ValueError`` / ``except FileNotFoundError`` code works as expected.
"""


class ClearClipError(Exception):
    """Base class for errors a user can act on."""

    def __reduce__(self):
        # rebuilt by calling the class with its arguments, then its attributes set: dask pickles a worker's errors
        # with tblib's support, which rebuilds a class that is both a ValueError and an OSError (or has an __init__
        # of its own) only this way; else the command line got a plain Exception and a traceback
        return type(self), self.args, self.__dict__ or None


class ModelLoadError(ClearClipError, ValueError):
    """The model name, pretrained tag, device, precision or checkpoint cannot be used."""


class CheckpointNotFoundError(ModelLoadError, FileNotFoundError):
    """A checkpoint path names no file."""


class WeightsUnavailableError(ModelLoadError, ConnectionError):
    """Pretrained weights are neither cached nor downloadable right now."""

    def __init__(self, message: str, model: str = "", tag: str = ""):
        super().__init__(message)
        self.model = model
        self.tag = tag


class InvalidClassesError(ClearClipError, ValueError):
    """The class list is empty, unordered, has empty or duplicate names, or bad templates."""


class InvalidImageError(ClearClipError, ValueError):
    """The image has an unsupported shape or dtype, is too small, or holds NaN/inf."""


class ImageNotFoundError(InvalidImageError, FileNotFoundError):
    """An image path names no file."""


class StoreUnreachableError(ClearClipError, ConnectionError):
    """A zarr store at an address cannot be read now: no connection, an error of the network, or a server silent
    past the time limit. Running again later may succeed; nothing of it was written."""


class InvalidOptionError(ClearClipError, ValueError):
    """An option (window size, logit scale, threshold, contrast limits ...) is out of range or of the wrong type.

    ``option`` (its Python name), ``value`` and ``rule`` (what it must be, in no interface's words), where given, let
    the widget and the command line say the error in their own terms."""

    def __init__(self, message: str, option: str = "", value=None, rule: str = ""):
        super().__init__(message)
        self.option = option
        self.value = value
        self.rule = rule


class FeatureStoreNotFoundError(InvalidOptionError, FileNotFoundError):
    """The feature store folder named does not exist (a typo would otherwise start an empty store)."""


class OutOfMemoryError(ClearClipError, MemoryError):
    """The device or the host ran out of memory even in the smallest pieces the engine can use."""


class OutputError(ClearClipError, OSError):
    """An output folder or file cannot be written."""


class DistributedMissingError(ClearClipError, ImportError):
    """dask.distributed is needed for this and is not installed."""


class SchedulerUnreachableError(ClearClipError, ConnectionError):
    """No dask scheduler answers at the address given (nothing listens, or something else does)."""


class TooManyLabelsError(ClearClipError, OverflowError):
    """The labels a run needs do not fit the data type of the layer it updates."""


class LessonError(ClearClipError, ValueError):
    """A lesson file that cannot be read, or a lesson that does not fit this run (model, method, classes)."""


class LessonNotFoundError(LessonError, FileNotFoundError):
    """A lesson path names no file."""


class LessonExistsError(ClearClipError, FileExistsError):
    """Saving would replace an existing file (pass ``overwrite=True`` to replace it)."""
