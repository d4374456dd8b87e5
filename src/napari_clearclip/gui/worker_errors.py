"""RuntimeErrors raised in a run, carried out of napari's worker as another type.

napari's generator workers (superqt's) take a RuntimeError from their generator for a sign that Qt has deleted the
worker, and end without a word: neither ``errored`` nor ``finished`` is emitted, so the dock would wait for the run
for ever (a damaged zarr chunk, PyTorch's own errors). Each generator the dock runs in a worker is wrapped by
:func:`errors_reported`, which raises such an error as :class:`RunError`; the dock says it as the error it was.
"""

from __future__ import annotations

import functools
from typing import Callable


class RunError(Exception):
    """A RuntimeError raised in a run (``runtime_error``), carried out of napari's worker."""

    def __init__(self, error: RuntimeError):
        super().__init__(str(error))
        self.runtime_error = error


def errors_reported(job: Callable) -> Callable:
    """``job`` (a generator function) as napari's worker runs it, its RuntimeErrors raised as :class:`RunError`."""

    @functools.wraps(job)
    def body(*args, **kwargs):
        try:
            return (yield from job(*args, **kwargs))
        except RuntimeError as exc:
            raise RunError(exc) from exc

    return body
