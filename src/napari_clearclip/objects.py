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
        best = self.sums.argmax(0)
        present = self.area > 0
        ids = np.arange(self.count) if self.ids is None else self.ids
        keep = present & (ids != 0)
        confidence = np.where(self.area > 0, self.sums[best, np.arange(self.count)] / np.maximum(self.area, 1), 0.0)
        names = np.array(class_names, dtype=object)
        table = {"id": ids[keep].astype(np.int64), "class": names[best[keep]] if len(names) else np.array([]),
                 "confidence": confidence[keep].astype(np.float32), "area": self.area[keep]}
        lookup = (best + 1).astype(np.int32)
        lookup[ids == 0] = 0
        return table, lookup

    def labels(self, lookup: np.ndarray) -> np.ndarray:
        """Each object's pixels get its class; 0 outside every object."""
        return lookup[self.objects if self.ids is None else self.index]
