"""A labels store too large to hold, made editable without writing it: strokes go into a copy of the chunks they
touch, kept in the user cache.

Labels the command line wrote tile by tile (``<name>_labels.zarr``, a slide's) are the user's file: opening them in
napari must not change them, yet a scientist opens them to correct them. The array napari is given reads the store,
except in the chunks painted since, which it reads from a working store (``labels/<name>-edits-<time>.zarr`` in the
user cache) where each chunk is copied whole before its first stroke. Reading a region gives exactly what the store
holds with the strokes painted over it; Save labels... writes the corrected labels out under a new name.

A working store outlives napari: it records the store it is a copy of (and that store's state) and the chunks it
holds. Strokes not saved when napari closed are there again when the same store is opened again, unchanged; a
working store whose strokes were all saved is removed then (they are in the saved labels).
"""

from __future__ import annotations

import logging
import threading
import weakref
from pathlib import Path

import numpy as np

from .labels_cache import labels_folder, last_written

_log = logging.getLogger(__name__)

#: Where a working store keeps what it is a copy of (in its attributes).
WORKING_KEY = "napari-clearclip working copy"
#: Working stores in use in this process: an opening of their store is given the same object, never a second one.
_IN_USE: "weakref.WeakValueDictionary[str, EditableCopy]" = weakref.WeakValueDictionary()


def store_state(path) -> str:
    """What tells a labels store from the same store written again since: its metadata files' sizes and times."""
    path = Path(path)
    parts = []
    for item in (path / "zarr.json", path / "labels" / "zarr.json"):
        try:
            stat = item.stat()
            parts.append(f"{stat.st_size}:{stat.st_mtime_ns}")
        except OSError:
            parts.append("-")
    return "/".join(parts)


def _working_attrs(path: Path) -> dict | None:
    try:
        import json

        attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {}).get(WORKING_KEY)
        return attrs if isinstance(attrs, dict) else None
    except (OSError, ValueError, AttributeError):
        return None


def working_copy_of(store, name: str) -> tuple[Path, dict | None]:
    """The working store for labels opened from ``store`` (shown as ``name``): one holding strokes not saved from an
    earlier opening of that store, unchanged since (the newest, when several; or of the same store before its folder
    was moved or renamed), with what it records; else a new path and None. Working stores of ``store`` whose strokes
    were all saved are removed."""
    import shutil

    source = str(Path(store).resolve())
    state = store_state(source)
    folder = labels_folder()
    unsaved = []
    for path in sorted(folder.glob("*-edits-*.zarr")) if folder.is_dir() else []:
        attrs = _working_attrs(path)
        if attrs is None:
            continue
        recorded = str(attrs.get("source"))
        moved = (recorded != source and Path(recorded).name == Path(source).name and attrs.get("state") == state
                 and not Path(recorded).exists())   # the store moved (its folder renamed): the same files
        if recorded != source and not moved:
            continue
        if attrs.get("saved"):
            if str(path) not in _IN_USE:   # (one still in use is left to its layer)
                shutil.rmtree(path, ignore_errors=True)
        elif attrs.get("state") == state and isinstance(attrs.get("copied"), list):
            unsaved.append((last_written(path), path, attrs))
    if unsaved:   # the newest, should the store have been painted in two layers at once
        written, path, attrs = max(unsaved, key=lambda item: (item[0], str(item[1])))
        import time

        return path, {**attrs, "changed": time.strftime("%Y-%m-%d %H:%M", time.localtime(written))}
    return edits_store_path(name), None


def edits_store_path(name: str) -> Path:
    """A new working store in the user cache for the edits on labels named ``name``: ``labels/<name>-edits-<time>.zarr``
    (not created here: it is made at the first stroke)."""
    import re
    import time

    folder = labels_folder()
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
    by hand before ``source`` was saved (a boolean array of its shape, read a region at a time), or None.
    ``origin``: the store ``source`` was read from, recorded in the working store so that strokes not saved are
    found again (:func:`working_copy_of`); a working store that exists already is resumed (``resumed`` is True)."""

    @classmethod
    def open(cls, source, store, name: str | None = None, painted_before=None) -> tuple["EditableCopy", dict | None]:
        """Labels read from ``store`` (``source``: its labels array), painted in the working store that holds the
        strokes not saved from an earlier opening (see :func:`working_copy_of`; the same object when that opening's
        layer may still be alive, so two never write one working store), else in a new one. Returns it and what the
        earlier working store records (None for a new one)."""
        edits, earlier = working_copy_of(store, Path(name or Path(store).name).stem)
        live = _IN_USE.get(str(edits))
        if live is not None and live.shape == tuple(int(n) for n in source.shape):
            return live, earlier
        if earlier is not None:
            try:
                return cls(source, edits, name=name, painted_before=painted_before, origin=store), earlier
            except (OSError, KeyError, ValueError, TypeError) as exc:   # damaged: left as it is, a new one made
                _log.warning("The working copy %s of %s cannot be read (%s): the labels open as saved, and their "
                             "strokes go into a new working copy.", edits, store, exc)
                edits = edits_store_path(Path(name or Path(store).name).stem)
        return cls(source, edits, name=name, painted_before=painted_before, origin=store), None

    def __init__(self, source, edits: str | Path, name: str | None = None, painted_before=None,
                 origin: str | Path | None = None):
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
        self.origin = None if origin is None else str(Path(origin).resolve())
        self.version = 0                # writes so far: a save marks the working store saved if none came since
        self._saved = False
        self.resumed = False
        attrs = _working_attrs(self.edits_path)
        if attrs is not None:           # strokes not saved from an earlier opening
            import zarr

            edits = zarr.open_group(str(self.edits_path), mode="r+")["labels"]
            if tuple(edits.shape) != self.shape:
                raise ValueError(f"the working copy {self.edits_path} is of labels of shape {tuple(edits.shape)}, not "
                                 f"{self.shape}")
            for cy, cx in attrs.get("copied", []):
                self._copied[int(cy), int(cx)] = True
            self._edits, self._saved, self.resumed = edits, bool(attrs.get("saved")), True
            if self.origin and attrs.get("source") != self.origin:   # the store was moved: found there from now on
                self._record(source=self.origin)
        _IN_USE[str(self.edits_path)] = self

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def edited(self) -> bool:
        """Whether anything was painted (and so the working store exists)."""
        return self._edits is not None

    def mark_saved(self, version: int, saved_to: str | Path) -> None:
        """The labels as they were at ``version`` were saved (to ``saved_to``): the working store is marked so, unless
        painted since (it is removed when its store is opened again)."""
        with self._lock:
            if self._edits is None or version != self.version:
                return
            self._record(saved=True, saved_to=str(saved_to))
            self._saved = True

    def _record(self, **changes) -> None:
        """Update what the working store records (its attributes; the chunks are written before)."""
        group = self._group
        attrs = dict(group.attrs.get(WORKING_KEY) or {})
        attrs.update(changes)
        group.attrs[WORKING_KEY] = attrs

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
            self.version += 1
            if self._saved:             # painted since it was saved: strokes to keep again
                self._record(saved=False)
                self._saved = False
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

    @property
    def _group(self):
        import zarr

        return zarr.open_group(str(self.edits_path), mode="r+")

    def _open_edits(self):
        if self._edits is None:
            import zarr

            self.edits_path.parent.mkdir(parents=True, exist_ok=True)
            group = zarr.open_group(str(self.edits_path), mode="w")
            self._edits = group.create_array("labels", shape=self.shape, chunks=self.chunks, dtype=self.dtype,
                                             fill_value=0)
            state = store_state(self.origin) if self.origin else None
            self._record(source=self.origin, state=state, name=self.name, copied=[], saved=False)
        return self._edits

    def _copy_chunks(self, chunk_rows: np.ndarray, chunk_cols: np.ndarray, pairs: np.ndarray | None = None) -> None:
        """Copy the chunks about to be written (all of ``chunk_rows`` x ``chunk_cols``, or just ``pairs``) from the
        source, whole, where not copied yet."""
        wanted = (np.stack(np.meshgrid(chunk_rows, chunk_cols, indexing="ij")).reshape(2, -1)
                  if pairs is None else pairs)
        copied = False
        for cy, cx in wanted.T:
            if self._copied[cy, cx]:
                continue
            region = (slice(int(cy) * self.chunks[0], min(self.shape[0], (int(cy) + 1) * self.chunks[0])),
                      slice(int(cx) * self.chunks[1], min(self.shape[1], (int(cx) + 1) * self.chunks[1])))
            self._edits[region] = np.asarray(self.source[region])
            self._copied[cy, cx] = True
            copied = True
        if copied:   # recorded once the chunks are written: a working store read again never holds a chunk half
            self._record(copied=np.argwhere(self._copied).tolist())
