"""Labels that ``clearclip-segment`` wrote, read back: their class names, and where they sit on their image.

A labels file carries the run's record (see :mod:`.provenance`): its classes, so the labels open with their names,
and, for an image too large to hold that was segmented at a reduced size, where they sit on it in its pixels, so the
labels cover the image as napari opens it. Labels saved from napari (Save labels...) also keep the pixels the user
painted (:func:`encode_edits` in a TIFF's record; an ``edited`` array beside the labels in a zarr store), which stay
the user's when the labels are opened again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InvalidImageError
from .provenance import LABELS_SUFFIXES, class_table_names, read_record

#: Labels of at most this many pixels are read into memory (an editable copy: the file is never written); larger
#: ``_labels.zarr`` stores are read as they are shown, and napari paints on them through
#: :class:`~napari_clearclip.editable_copy.EditableCopy` (the store is never written either).
IN_MEMORY_PIXELS = 8192 * 8192


@dataclass(frozen=True)
class LabelsOutput:
    """Labels read back: the array (a NumPy copy, or a read-only zarr array when too large), the class names of
    labels 1, 2, ..., the scale and translation that place them on their image's pixels, the run's record
    (the image file they were made from: ``source``, ``size``) and the pixels painted by hand before they were
    saved (a boolean array like ``data``: NumPy or zarr; None where none were)."""

    data: object
    names: list[str]
    scale: tuple[float, ...]
    translate: tuple[float, ...]
    record: dict
    in_memory: bool
    edited: object = None


def is_labels_output(path) -> bool:
    """Whether ``path`` is labels this command wrote: by its name, and the record in it or the class table beside it
    (labels corrected and saved over by another program, such as napari, keep their table)."""
    path = Path(path)
    return path.name.endswith(LABELS_SUFFIXES) and path.exists() and (
        read_record(path) is not None or class_table_names(path) is not None)


def read_labels_output(path) -> LabelsOutput:
    """Read labels this command wrote, with their classes and placement; raise InvalidImageError for any other
    file (one with neither the record nor the class table beside it: written elsewhere)."""
    from ..prompts import parse_classes

    path = Path(path)
    ours = path.name.endswith(LABELS_SUFFIXES) and path.exists()
    record = read_record(path) if ours else None
    if record is not None and isinstance(record.get("classes"), list):
        names = [query.name for query in parse_classes(record["classes"])]
    else:   # saved over by another program: the classes from the table the run wrote beside them
        record, names = {}, class_table_names(path) if ours else None
        if names is None:
            raise InvalidImageError(f"{path} is not labels written by clearclip-segment (it has no record of their "
                                    "classes, and no class table beside it): open it as an image, or with napari's "
                                    "own reader.")
    if path.is_dir():
        import zarr

        group = zarr.open_group(str(path), mode="r")
        array = group["labels"]
        in_memory = int(np.prod(array.shape)) <= IN_MEMORY_PIXELS
        data = array[...] if in_memory else array
        edited = group["edited"] if "edited" in group else None
        if edited is not None and (tuple(edited.shape) != tuple(array.shape) or edited.dtype != bool):
            edited = None   # not what Save labels... writes: the labels are read without it
        if edited is not None and in_memory:
            edited = edited[...]
    else:
        import tifffile

        data, in_memory = tifffile.imread(path), True
        edited = decode_edits(record, data.shape)
    scale, translate = _placement(record, data.ndim)
    return LabelsOutput(data, names, scale, translate, record, in_memory, edited)


def encode_edits(edited: np.ndarray) -> dict:
    """The pixels a user painted (a boolean mask) as a record keeps them: packed bits, compressed, in text (a few
    kilobytes for strokes)."""
    import base64
    import zlib

    mask = np.asarray(edited, dtype=bool)
    packed = zlib.compress(np.packbits(mask.ravel()).tobytes(), 9)
    return {"shape": list(mask.shape), "bits": base64.b64encode(packed).decode("ascii")}


def decode_edits(record: dict, shape: tuple[int, ...]) -> np.ndarray | None:
    """The painted pixels a record keeps for labels of ``shape`` (see :func:`encode_edits`), or None."""
    import base64
    import zlib

    edits = record.get("edited")
    try:
        if not isinstance(edits, dict) or tuple(edits["shape"]) != tuple(shape):
            return None
        bits = np.frombuffer(zlib.decompress(base64.b64decode(edits["bits"])), dtype=np.uint8)
        count = int(np.prod(shape))
        return np.unpackbits(bits, count=count).astype(bool).reshape(shape)
    except (KeyError, TypeError, ValueError, zlib.error):
        return None


def _placement(record: dict, ndim: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The labels' scale and translation in their image's pixels: none, or for labels of an image segmented at a
    reduced size, as the record keeps them (along the plane's two axes)."""
    scale, translate = [1.0] * ndim, [0.0] * ndim
    placement = record.get("placement")
    try:
        plane_scale = [float(v) for v in placement["scale"]]
        plane_translate = [float(v) for v in placement["translate"]]
    except (TypeError, KeyError, ValueError):
        return tuple(scale), tuple(translate)
    if len(plane_scale) == len(plane_translate) == 2 and ndim >= 2 and min(plane_scale) > 0:
        scale[-2:], translate[-2:] = plane_scale, plane_translate
    return tuple(scale), tuple(translate)
