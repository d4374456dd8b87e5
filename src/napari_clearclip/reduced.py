"""Images too large to hold, segmented resized: at the pyramid level, or a reduced copy, that a run holds.

A run that resizes (napari's Resize on, the command line's default) shows the model the image at its short side
(a few hundred pixels). The pixels of a 20000 x 20000 slide then add nothing to its scores that a 2500 x 2500
pyramid level does not hold, while reading them would take the whole slide into memory and labels at full size
would take 0.4-1.6 GB more. A lazy image whose planes exceed :data:`LARGE_PIXELS` is therefore segmented at the
finest pyramid level of at most :data:`REDUCED_SIDE` pixels a side (squared; a setting: ``large_side``) or,
without one, at a copy reduced by block means (read a band of rows at a time); its labels are placed on the image
with that level's scale. Without resizing, a large image is segmented at full resolution, tile by tile
(:mod:`.lazy_tiles`).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Generator, Sequence

import numpy as np

from .progress import Progress, run_to_end

#: Pixels of the source reduced at once when a reduced copy is made (a band of rows this large, whole blocks); a band
#: read is larger where the source's chunks are higher (each chunk is read once), and is reduced in such parts.
BAND_PIXELS = 4 * 1024 * 1024

#: A lazy image whose planes have more pixels than this is too large to hold: with Resize on it is reduced.
LARGE_PIXELS = 4096 * 4096

#: The side of the largest level (or reduced copy) segmented then, by default (squared: its pixels): a run with
#: snapping on a boundary-rich image peaks at 2.0-2.5 GB of the whole process there, against 3.1 GB at 4096 x 4096.
REDUCED_SIDE = 3000
REDUCED_PIXELS = REDUCED_SIDE * REDUCED_SIDE
#: The sides a user may choose for it: below a model's short side the model would see an enlarged image, and far
#: above 4096 a run with snapping needs many GB.
SIDE_RANGE = (128, 16384)


def check_large_side(side) -> int:
    """``side`` (the ``large_side`` setting: pixels a side of the largest level of a large image segmented with
    resizing), checked where it enters."""
    from .errors import InvalidOptionError

    low, high = SIDE_RANGE
    if isinstance(side, bool) or not isinstance(side, (int, np.integer)) or not low <= int(side) <= high:
        raise InvalidOptionError(f"large_side={side!r} must be a whole number of pixels from {low} to {high} (the side "
                                 f"of the largest level a large image is segmented at with resizing; default "
                                 f"{REDUCED_SIDE}).")
    return int(side)


def limits_for_side(side: int = REDUCED_SIDE, large_pixels: int | None = None) -> tuple[int, int]:
    """(planes larger than this are reduced, to a level of at most this many pixels) for a ``large_side`` of
    ``side``: an image of up to side x side pixels is segmented as it is even above :data:`LARGE_PIXELS`."""
    area = check_large_side(side) ** 2
    return max(LARGE_PIXELS if large_pixels is None else large_pixels, area), area


@dataclass(frozen=True)
class Reduction:
    """Where the labels of a reduced image sit on the full image."""

    level: int | None            # the pyramid level segmented; None for a copy reduced by block means
    factors: tuple[float, ...]   # full-size pixels per label pixel, along each axis of the labels
    shape: tuple[int, ...]       # the labels' shape

    def geometry(self, scale: Sequence[float], translate: Sequence[float], rotate: np.ndarray | None = None,
                 shear: np.ndarray | None = None, **placement) -> dict:
        """The labels' placement on an image of ``scale``, ``translate``, ``rotate`` and ``shear`` (matrices; per
        label axis), the rest of ``placement`` (affine, units) as the image's: each label pixel covers ``factor``
        image pixels, centred on their centre (an offset in the image's pixels, turned as the image is)."""
        ndim = len(scale)
        rotate = np.eye(ndim) if rotate is None else np.asarray(rotate, float)
        shear = np.eye(ndim) if shear is None else np.asarray(shear, float)
        offset = rotate @ shear @ (np.asarray(scale, float) * (np.asarray(self.factors, float) - 1) / 2)
        return {**placement, "scale": [float(s) * f for s, f in zip(scale, self.factors)],
                "translate": [float(t) + float(o) for t, o in zip(translate, offset)],
                "rotate": rotate, "shear": shear}

    def describe(self) -> str:
        """The reduction in words, e.g. "pyramid level 3 (2500 x 2500, 1/8 of full size)"."""
        size = " x ".join(str(n) for n in self.shape[-2:])
        factor = max(self.factors[-2:])
        share = f"1/{factor:.0f}" if abs(factor - round(factor)) < 0.05 else f"1/{factor:.1f}"
        what = f"pyramid level {self.level}" if self.level is not None else "a copy reduced by block means"
        return f"{what} ({size}, {share} of full size)"


def plane_pixels(shape: Sequence[int], rgb: bool = False, channel_axis: int | None = None) -> int:
    """Pixels of one 2-D plane of an image of ``shape`` (its labels' last two axes)."""
    from .planes import ImageLayout   # here: the command line's --help reads this module's settings without torch

    height, width = ImageLayout(tuple(shape), rgb=rgb, channel_axis=channel_axis).label_shape[-2:]
    return int(height) * int(width)


def finest_level_within(level_shapes: Sequence[Sequence[int]], max_pixels: int, rgb: bool = False,
                        channel_axis: int | None = None) -> int | None:
    """The finest pyramid level (levels finest first) whose planes have at most ``max_pixels``; None if none."""
    for index, shape in enumerate(level_shapes):
        if plane_pixels(shape, rgb, channel_axis) <= max_pixels:
            return index
    return None


def block_factor(height: int, width: int, max_pixels: int) -> int:
    """The smallest whole factor that brings a plane to at most ``max_pixels`` (edge blocks may be partial)."""
    factor = max(1, math.isqrt(max(0, height * width // max(1, max_pixels))))
    while math.ceil(height / factor) * math.ceil(width / factor) > max_pixels:
        factor += 1
    return factor


class BlockMeans:
    """A lazy image reduced by a whole ``factor`` along Y and X: each pixel the mean of a factor x factor block (the
    blocks at the bottom and right edges over the pixels they have), integers rounded to the nearest value.

    Array-like for what a run reads: a plane (an index of whole numbers on the leading axes) is computed on first
    reading, a band of rows of the source at a time, and kept for the next run; reading it all gives every plane.
    """

    def __init__(self, image, factor: int, rgb: bool = False, band_pixels: int = BAND_PIXELS):
        if not isinstance(factor, int) or factor < 1:
            raise ValueError(f"factor={factor!r} must be a whole number, at least 1.")
        self.source, self.factor, self.rgb = image, factor, bool(rgb)
        shape = [int(n) for n in image.shape]
        self._y = len(shape) - (3 if rgb else 2)
        if self._y < 0:
            raise ValueError(f"An image of shape {tuple(shape)} has no 2-D plane to reduce.")
        self.source_shape = tuple(shape)
        shape[self._y] = math.ceil(shape[self._y] / factor)
        shape[self._y + 1] = math.ceil(shape[self._y + 1] / factor)
        self.shape = tuple(shape)
        self.dtype = np.dtype(image.dtype)
        self.ndim = len(shape)
        width = self.source_shape[self._y + 1] * (self.source_shape[-1] if rgb else 1)
        self._reduced_rows = factor * max(1, band_pixels // max(1, width * factor))   # reduced at once
        chunk_rows = _chunk_rows(image, self._y)   # read at once: whole parts, each chunk read at most twice
        self._band_rows = self._reduced_rows * -(-chunk_rows // self._reduced_rows)
        self._planes: dict[tuple, np.ndarray] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index):
        if self._lead(index) is not None:
            return run_to_end(self.plane_steps(index))
        return np.asarray(self)[index]

    def __array__(self, dtype=None, copy=None):
        whole = np.empty(self.shape, self.dtype)
        for lead in np.ndindex(*self.shape[: self._y]):
            whole[lead] = self[lead]
        return whole if dtype is None else whole.astype(dtype)

    def _lead(self, index) -> tuple | None:
        """The plane an index of whole numbers on the leading axes names; None for any other index."""
        index = index if isinstance(index, tuple) else (index,)
        if len(index) == self._y and all(isinstance(i, (int, np.integer)) for i in index):
            return tuple(int(i) % n for i, n in zip(index, self.shape))
        return None

    def plane_steps(self, index) -> Generator[Progress, None, np.ndarray]:
        """Generator: the plane at ``index`` (whole numbers on the leading axes), read a band of rows at a time (as
        high as the source's chunks) and reduced a part of ``band_pixels`` at a time, with a ``Progress("reading",
        ...)`` per part (a run can stop between parts), or as kept from before."""
        lead = self._lead(index)
        if lead is None:
            raise IndexError(f"{index!r} does not name a plane of an image of shape {self.shape}.")
        with self._lock:
            kept = self._planes.get(lead)
        if kept is not None:
            return kept
        factor = self.factor
        height, width = self.source_shape[self._y], self.source_shape[self._y + 1]
        out = np.empty(self.shape[self._y:], self.dtype)
        columns = np.arange(0, width, factor)
        column_counts = np.diff(np.append(columns, width)).astype(np.float64)
        parts = -(-height // self._reduced_rows)
        done = 0
        for top in range(0, height, self._band_rows):
            band = np.asarray(self.source[lead + (slice(top, min(top + self._band_rows, height)),)])
            for start in range(0, band.shape[0], self._reduced_rows):   # the sums' memory bounded, whatever the band
                part = band[start : start + self._reduced_rows]
                rows = np.arange(0, part.shape[0], factor)
                row_counts = np.diff(np.append(rows, part.shape[0])).astype(np.float64)
                sums = np.add.reduceat(np.add.reduceat(part, rows, axis=0, dtype=np.float64), columns, axis=1)
                counts = np.multiply.outer(row_counts, column_counts)
                means = sums / (counts[..., None] if self.rgb else counts)
                if self.dtype.kind in "ui":
                    info = np.iinfo(self.dtype)
                    means = np.clip(np.rint(means), info.min, info.max)
                first = (top + start) // factor
                out[first : first + len(rows)] = means.astype(self.dtype)
                done += 1
                yield Progress("reading", done, parts,
                               detail=f"Reading the image at 1/{factor} of its size: {done}/{parts}")
            del band
        with self._lock:  # kept for the next run; a plane two runs computed at once is kept once
            return self._planes.setdefault(lead, out)


def _chunk_rows(image, axis: int) -> int:
    """Rows of the chunks a lazy array is read by (zarr, dask), so that a band reads each chunk at most twice;
    1 for anything else."""
    chunks = getattr(image, "chunksize", None) or getattr(image, "chunks", None)
    try:
        return max(1, int(chunks[axis]))
    except (TypeError, IndexError, ValueError):
        return 1


def reduced_for_resize(levels: Sequence, max_pixels: int, rgb: bool = False, channel_axis: int | None = None,
                       level_pixels: int | None = None) -> tuple[object, Reduction | None]:
    """What to segment of an image with Resize on: ``(array, None)`` for one whose planes fit ``max_pixels``
    (``levels[0]``, as it is), else the finest pyramid level of at most ``level_pixels`` (``max_pixels`` when
    None) or a :class:`BlockMeans` copy of ``levels[0]`` that size, with the :class:`Reduction` that places its
    labels. ``levels``: a pyramid's arrays, finest first, or a one-item list."""
    from .planes import ImageLayout

    full = levels[0]
    full_layout = ImageLayout(tuple(full.shape), rgb=rgb, channel_axis=channel_axis)
    if plane_pixels(full.shape, rgb, channel_axis) <= max_pixels:
        return full, None
    level_pixels = max_pixels if level_pixels is None else level_pixels
    level = finest_level_within([tuple(a.shape) for a in levels], level_pixels, rgb, channel_axis)
    if level is not None:
        array = levels[level]
    else:
        height, width = full_layout.label_shape[-2:]
        array = BlockMeans(full, block_factor(height, width, level_pixels), rgb)
    label_shape = ImageLayout(tuple(array.shape), rgb=rgb, channel_axis=channel_axis).label_shape
    if level is not None:  # as napari places a pyramid's levels
        factors = tuple(f / n for f, n in zip(full_layout.label_shape, label_shape))
    else:  # whole blocks (the last ones partial)
        factors = (1.0,) * (len(label_shape) - 2) + (float(array.factor),) * 2
    return array, Reduction(level, factors, label_shape)


def full_size_labels(labels, shape: Sequence[int], factors: Sequence[float] | None = None, out=None,
                     rows_at_once: int = 2048):
    """The labels of a reduced image brought to the full image's ``shape`` (height, width), e.g. to save them beside
    a slide: each full-size pixel takes the label of the reduced pixel whose area holds its centre (as the labels
    sit on the image in napari), written ``rows_at_once`` rows at a time.

    ``factors``: full-size pixels per label pixel, (rows, columns): a :class:`Reduction`'s last two, or in napari
    the labels layer's scale over the image's; None takes ``shape`` over the labels' shape (a pyramid level's).
    ``out``: None (a NumPy array), an array of ``shape`` to write into (e.g. a zarr array), or a path where a zarr
    store is written (a group with a ``labels`` array; written in a ``.partial`` folder renamed into place when
    complete; an existing path is refused, never overwritten). Returns what was written.
    """
    from .errors import InvalidOptionError
    from .lazy_tiles import DEFAULT_TILE, _open_output

    labels = np.asarray(labels)
    height, width = (int(n) for n in shape)
    if labels.ndim != 2 or labels.dtype.kind not in "ui":
        raise InvalidOptionError(f"labels of shape {labels.shape} and dtype {labels.dtype}: give a 2-D integer array.")
    if height < labels.shape[0] or width < labels.shape[1]:
        raise InvalidOptionError(f"shape {(height, width)} is smaller than the labels' {labels.shape}: give the full "
                                 "image's height and width.")
    if factors is None:
        factors = (height / labels.shape[0], width / labels.shape[1])
    if len(factors) != 2 or not all(math.isfinite(float(f)) and float(f) >= 1 for f in factors):
        raise InvalidOptionError(f"factors={tuple(factors)!r}: give two numbers of at least 1 (full-size pixels per "
                                 "label pixel, rows and columns).")
    rows = np.minimum(((np.arange(height) + 0.5) / float(factors[0])).astype(np.int64), labels.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) / float(factors[1])).astype(np.int64), labels.shape[1] - 1)
    target, _, finish, _ = _open_output(out, (height, width), labels.dtype, DEFAULT_TILE,
                                        repr(("full size", labels.shape, (height, width))))
    for top in range(0, height, rows_at_once):
        target[top : top + rows_at_once] = labels[rows[top : top + rows_at_once]][:, cols]
    if finish is not None:
        finish()
        import zarr
        from pathlib import Path

        return zarr.open_group(str(Path(out).expanduser()), mode="r+")["labels"]
    return target
