"""Classes for objects that already exist: instance labels (cellpose, StarDist, micro-sam ...) get a class each.

Each object takes the class whose probability, summed over the object's pixels, is highest;
its confidence is that class's mean probability over the object. Sums are gathered row chunk
by row chunk with one ``bincount`` per class, so 100,000 objects cost no Python loop.
"""

from __future__ import annotations

import numpy as np

from .errors import InvalidOptionError

#: Object ids up to this are counted directly; larger (sparse) ids are renumbered first.
DIRECT_IDS = 10_000_000


def check_objects(objects, shape: tuple[int, int]) -> np.ndarray | None:
    """``None``, or a non-negative integer (H, W) array of object ids (0 = no object)."""
    if objects is None:
        return None
    try:
        array = np.asarray(objects)
    except (ValueError, TypeError):
        raise InvalidOptionError("objects must be an integer array of object ids (0 = no object), e.g. the data "
                                 "of a napari Labels layer from cellpose or StarDist.") from None
    if array.dtype == bool or array.dtype.kind not in "ui":
        raise InvalidOptionError(f"objects must be an integer array of object ids (0 = no object), not {array.dtype}: "
                                 "e.g. the data of a napari Labels layer.")
    if array.shape != tuple(shape):
        raise InvalidOptionError(f"objects of shape {array.shape} do not match the image's {tuple(shape)}.")
    if array.size and int(array.min()) < 0:
        raise InvalidOptionError(f"objects hold negative ids (down to {int(array.min())}): ids are 0 (no object) "
                                 "or positive.")
    return array


class ObjectTally:
    """Per-object sums of class probabilities, filled a row chunk at a time, and the table they give."""

    def __init__(self, objects: np.ndarray, n_classes: int):
        self.objects = objects
        flat_max = int(objects.max()) if objects.size else 0
        if flat_max <= DIRECT_IDS:
            self.ids = None                                   # index = object id
            self.count = flat_max + 1
        else:
            self.ids, inverse = np.unique(objects, return_inverse=True)
            self.index = inverse.reshape(objects.shape)
            self.count = len(self.ids)
        self.sums = np.zeros((n_classes, self.count), dtype=np.float64)
        self.area = np.zeros(self.count, dtype=np.int64)

    def _index(self, r0: int, r1: int) -> np.ndarray:
        rows = self.objects[r0:r1] if self.ids is None else self.index[r0:r1]
        return rows.ravel().astype(np.int64, copy=False)

    def add(self, r0: int, class_probs: np.ndarray) -> None:
        """Add rows r0.. of the (C, rows, W) class probabilities."""
        index = self._index(r0, r0 + class_probs.shape[1])
        self.area += np.bincount(index, minlength=self.count)
        for k, probs in enumerate(class_probs):
            self.sums[k] += np.bincount(index, weights=probs.ravel(), minlength=self.count)

    def table(self, class_names: list[str]) -> tuple[dict, np.ndarray]:
        """(the objects table, a lookup from index to label) without the background id 0."""
        ids = np.arange(self.count) if self.ids is None else self.ids
        return objects_table(ids, self.sums, self.area, class_names)

    def parts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, sums (C, n), areas) of the objects present, id 0 left out: what :class:`ObjectSums` adds up."""
        ids = np.arange(self.count) if self.ids is None else self.ids
        keep = (self.area > 0) & (ids != 0)
        return ids[keep].astype(np.int64), self.sums[:, keep], self.area[keep]

    def labels(self, lookup: np.ndarray) -> np.ndarray:
        """Each object's pixels get its class; 0 outside every object."""
        return lookup[self.objects if self.ids is None else self.index]


def objects_table(ids: np.ndarray, sums: np.ndarray, area: np.ndarray, class_names: list[str]) -> tuple[dict, np.ndarray]:
    """The objects table of per-object class sums (C, n) and areas, and a lookup from index to label (class + 1,
    0 for the id 0): each object takes the class of the highest sum, with that class's mean probability."""
    best = sums.argmax(0) if sums.shape[1] else np.zeros(0, np.int64)
    keep = (area > 0) & (ids != 0)
    confidence = np.where(area > 0, sums[best, np.arange(len(ids))] / np.maximum(area, 1), 0.0)
    names = np.array(class_names, dtype=object)
    table = {"id": ids[keep].astype(np.int64), "class": names[best[keep]] if len(names) else np.array([]),
             "confidence": confidence[keep].astype(np.float32), "area": area[keep]}
    lookup = (best + 1).astype(np.int32)
    lookup[ids == 0] = 0
    return table, lookup


def check_lazy_objects(objects, shape: tuple[int, int]):
    """``None``, or an array-like (NumPy, dask, zarr) of integer object ids of ``shape``, checked without reading
    it (negative ids are refused where each part is read: :func:`checked_block`)."""
    if objects is None:
        return None
    dtype, given = getattr(objects, "dtype", None), tuple(getattr(objects, "shape", ()))
    if dtype is None or not given:
        return check_objects(objects, shape)
    dtype = np.dtype(dtype)
    if dtype.kind not in "ui":
        raise InvalidOptionError(f"objects must be an integer array of object ids (0 = no object), not {dtype}: "
                                 "e.g. the data of a napari Labels layer.")
    if given != tuple(shape):
        raise InvalidOptionError(f"objects of shape {given} do not match the image's {tuple(shape)}.")
    return objects


def checked_block(objects, rows: slice, cols: slice) -> np.ndarray:
    """The object ids of one part of a large array of them, read now; negative ids are refused with where."""
    block = np.asarray(objects[rows, cols])
    if block.size and block.dtype.kind == "i" and int(block.min()) < 0:
        raise InvalidOptionError(f"objects hold negative ids (down to {int(block.min())}, in rows {rows.start}-"
                                 f"{rows.stop} and columns {cols.start}-{cols.stop}): ids are 0 (no object) or "
                                 "positive.")
    return block


class ObjectSums:
    """Per-object class sums added up part by part (the tiles of an image too large to hold): an object that
    crosses tiles gets the class of its sums over all of them, as in a run on the whole image."""

    def __init__(self, n_classes: int):
        self.n_classes = n_classes
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.ids = np.zeros(0, np.int64)
        self.sums = np.zeros((n_classes, 0))
        self.area = np.zeros(0, np.int64)

    def add(self, ids: np.ndarray, sums: np.ndarray, area: np.ndarray) -> None:
        """Add the sums (C, n) and areas of the objects ``ids`` over one part (as :meth:`ObjectTally.parts`)."""
        self._parts.append((np.asarray(ids, np.int64), np.asarray(sums, np.float64), np.asarray(area, np.int64)))
        if len(self._parts) > 64:
            self._merge()

    def _merge(self) -> None:
        ids = np.concatenate([self.ids] + [p[0] for p in self._parts])
        sums = np.concatenate([self.sums] + [p[1] for p in self._parts], axis=1)
        area = np.concatenate([self.area] + [p[2] for p in self._parts])
        self._parts = []
        self.ids, index = np.unique(ids, return_inverse=True)
        self.area = np.bincount(index, weights=area, minlength=len(self.ids)).astype(np.int64)
        self.sums = np.stack([np.bincount(index, weights=row, minlength=len(self.ids)) for row in sums]) \
            if self.n_classes else np.zeros((0, len(self.ids)))

    def classes(self, class_names: list[str]) -> tuple[dict, "ObjectClasses"]:
        """The objects table (as :meth:`ObjectTally.table`), and each object's label, to give its pixels."""
        self._merge()
        table, lookup = objects_table(self.ids, self.sums, self.area, class_names)
        return table, ObjectClasses(self.ids, lookup)


class ObjectClasses:
    """Each object's label (its class + 1), looked up for a block of object ids; 0 outside every object."""

    def __init__(self, ids: np.ndarray, labels: np.ndarray):
        self.ids, self.labels = ids, labels
        top = int(ids[-1]) if len(ids) else 0
        self.direct = None
        if top <= DIRECT_IDS:  # a table indexed by id
            self.direct = np.zeros(top + 1, np.int32)
            self.direct[ids] = labels

    def __call__(self, block: np.ndarray) -> np.ndarray:
        block = np.asarray(block)
        if self.direct is not None:
            inside = block <= len(self.direct) - 1
            return np.where(inside, self.direct[np.where(inside, block, 0)], 0).astype(np.int32)
        where = np.searchsorted(self.ids, block).clip(max=max(len(self.ids) - 1, 0))
        found = (self.ids[where] == block) if len(self.ids) else np.zeros(block.shape, bool)
        return np.where(found, self.labels[where] if len(self.ids) else 0, 0).astype(np.int32)
