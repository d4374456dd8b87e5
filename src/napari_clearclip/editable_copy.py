"""A labels store too large to hold, made editable without writing it: strokes go into a copy of the chunks they
touch, kept in the user cache.

Labels the command line wrote tile by tile (``<name>_labels.zarr``, a slide's) are the user's file: opening them in
napari must not change them, yet a scientist opens them to correct them. The array napari is given reads the store,
except in the chunks painted since, which it reads from a working store (``labels/<name>-edits-<time>.zarr`` in the
user cache) where each chunk is copied whole before its first stroke. Reading a region gives exactly what the store
holds with the strokes painted over it; Save labels... writes the corrected labels out under a new name.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np


def edits_store_path(name: str) -> Path:
    """A new working store in the user cache for the edits on labels named ``name``: ``labels/<name>-edits-<time>.zarr``
    (not created here: it is made at the first stroke)."""
    import re
    import time

    from .cache import cache_dir

    folder = cache_dir() / "labels"
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[:100].rstrip("_") or "labels"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = folder / f"{safe}-edits-{stamp}.zarr"
    number = 1
    while path.exists():
        number += 1
        path = folder / f"{safe}-edits-{stamp}-{number}.zarr"
    return path


class EditableCopy:
    """A 2-D labels array read from ``source`` (a zarr array, never written) where nothing was painted, and from a
    working store at ``edits`` (made at the first write) where something was: each chunk of ``source`` is copied
    there whole before its first write. Takes what napari's Labels layer asks of its data: regions (slices, steps,
    integers) and coordinates (a tuple of integer arrays), read and written. ``painted_before``: the pixels painted
    by hand before ``source`` was saved (a boolean array of its shape, read a region at a time), or None."""

    def __init__(self, source, edits: str | Path, name: str | None = None, painted_before=None):
        if len(source.shape) != 2:
            raise ValueError(f"an editable copy is of 2-D labels, not of shape {tuple(source.shape)}")
        if painted_before is not None and tuple(painted_before.shape) != tuple(source.shape):
            raise ValueError(f"painted pixels of shape {tuple(painted_before.shape)} are not of labels of shape "
                             f"{tuple(source.shape)}")
        self.source = source
        self.painted_before = painted_before
        self.edits_path = Path(edits)
        self.name = name or self.edits_path.name   # what the user knows the labels by (the store's file name)
        self.shape = tuple(int(n) for n in source.shape)
        self.dtype = np.dtype(source.dtype)
        self.ndim = 2
        self.chunks = tuple(int(n) for n in source.chunks)
        self._grid = tuple(-(-size // chunk) for size, chunk in zip(self.shape, self.chunks))
        self._copied = np.zeros(self._grid, bool)    # chunks held by the working store
        self._edits = None
        self._lock = threading.Lock()   # a save reading in the background while the user paints

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def edited(self) -> bool:
        """Whether anything was painted (and so the working store exists)."""
        return self._edits is not None

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        values = self[:, :]
        return values if dtype is None else values.astype(dtype, copy=False)

    # -- keys ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _coordinates(key) -> bool:
        return isinstance(key, tuple) and len(key) == 2 and all(
            isinstance(k, (np.ndarray, list)) and not isinstance(k, bool) for k in key)

    def _axes(self, key) -> tuple[list[np.ndarray], list[bool]]:
        """The indices a region key selects along each axis, and whether the axis is kept (a slice) or dropped (an
        integer)."""
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            at = key.index(Ellipsis)
            key = key[:at] + (slice(None),) * (2 - len(key) + 1) + key[at + 1 :]
        key = key + (slice(None),) * (2 - len(key))
        if len(key) != 2:
            raise IndexError(f"too many indices for labels of shape {self.shape}")
        indices, kept = [], []
        for k, size in zip(key, self.shape):
            if isinstance(k, slice):
                indices.append(np.arange(*k.indices(size)))
                kept.append(True)
            elif isinstance(k, (int, np.integer)):
                i = int(k) + size if int(k) < 0 else int(k)
                if not 0 <= i < size:
                    raise IndexError(f"index {int(k)} is out of bounds for an axis of size {size}")
                indices.append(np.array([i]))
                kept.append(False)
            else:
                raise IndexError(f"labels take slices, integers or coordinate arrays, not {type(k).__name__}")
        return indices, kept

    # -- reading ------------------------------------------------------------------------------------------------
    def __getitem__(self, key) -> np.ndarray:
        with self._lock:
            if self._coordinates(key):
                rows, cols = np.broadcast_arrays(*(np.asarray(k, dtype=np.int64) for k in key))
                rows, cols = rows % self.shape[0], cols % self.shape[1]
                values = np.asarray(self.source.vindex[rows.ravel(), cols.ravel()]).reshape(rows.shape)
                if self._edits is not None:
                    mine = self._copied[rows // self.chunks[0], cols // self.chunks[1]]
                    if mine.any():
                        values[mine] = np.asarray(self._edits.vindex[rows[mine], cols[mine]])
                return values
            values = np.array(self.source[key], copy=True)
            if self._edits is None:
                return values
            (rows, cols), kept = self._axes(key)
            mine = self._copied[np.ix_(rows // self.chunks[0], cols // self.chunks[1])]
            if mine.any():
                if mine.all():
                    return np.asarray(self._edits[key])
                values = np.where(mine.reshape(values.shape), np.asarray(self._edits[key]), values)
            return values

    # -- writing ------------------------------------------------------------------------------------------------
    def __setitem__(self, key, value) -> None:
        with self._lock:
            edits = self._open_edits()
            if self._coordinates(key):
                rows, cols = np.broadcast_arrays(*(np.asarray(k, dtype=np.int64) for k in key))
                rows, cols = rows.ravel() % self.shape[0], cols.ravel() % self.shape[1]
                self._copy_chunks(np.unique(rows // self.chunks[0]), np.unique(cols // self.chunks[1]),
                                  pairs=np.unique(np.stack([rows // self.chunks[0], cols // self.chunks[1]]), axis=1))
                values = np.broadcast_to(np.asarray(value, dtype=self.dtype), np.broadcast_shapes(
                    np.shape(key[0]), np.shape(key[1]))).ravel()
                edits.vindex[rows, cols] = values
                return
            (rows, cols), _ = self._axes(key)
            if rows.size == 0 or cols.size == 0:
                return
            self._copy_chunks(np.unique(rows // self.chunks[0]), np.unique(cols // self.chunks[1]))
            edits[key] = value

    def _open_edits(self):
        if self._edits is None:
            import zarr

            self.edits_path.parent.mkdir(parents=True, exist_ok=True)
            self._edits = zarr.create_array(str(self.edits_path), shape=self.shape, chunks=self.chunks,
                                            dtype=self.dtype, fill_value=0)
        return self._edits

    def _copy_chunks(self, chunk_rows: np.ndarray, chunk_cols: np.ndarray, pairs: np.ndarray | None = None) -> None:
        """Copy the chunks about to be written (all of ``chunk_rows`` x ``chunk_cols``, or just ``pairs``) from the
        source, whole, where not copied yet."""
        wanted = (np.stack(np.meshgrid(chunk_rows, chunk_cols, indexing="ij")).reshape(2, -1)
                  if pairs is None else pairs)
        for cy, cx in wanted.T:
            if self._copied[cy, cx]:
                continue
            region = (slice(int(cy) * self.chunks[0], min(self.shape[0], (int(cy) + 1) * self.chunks[0])),
                      slice(int(cx) * self.chunks[1], min(self.shape[1], (int(cx) + 1) * self.chunks[1])))
            self._edits[region] = np.asarray(self.source[region])
            self._copied[cy, cx] = True
