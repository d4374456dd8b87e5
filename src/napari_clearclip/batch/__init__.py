"""Segmenting files in batches: in this process, on a local dask cluster or on a running one, and the CLI.

``segment_files`` (what ``clearclip-segment`` runs) takes files, folders and glob patterns and
writes ``<name>_labels.tif`` and ``<name>_classes.csv`` per input, resumably.
"""

from .files import FileReport, expand_inputs, read_image
from .runs import segment_files

__all__ = ["segment_files", "FileReport", "expand_inputs", "read_image"]
