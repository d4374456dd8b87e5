"""Reading regions of a dask image whose chunks are larger than the regions, each chunk computed once a pass.

A dask array computes a whole chunk for any slice of it. Reader plugins (bioio's, aicsimageio's) give a slide as
one chunk per plane, so a tile-by-tile run, which reads the plane a region at a time, would read and decode the
whole file once per tile: a hundred times for a 20000 x 20000 slide. :class:`KeptBlocks` computes each chunk
once and keeps it while the reads go down over its rows (a run reads top to bottom, left to right), then lets it
go: it holds the chunks that meet the rows being read, as the plain dask array held each for a moment, and no
more than :data:`KEPT_BYTES` of them beyond what a read needs (chunks as high as the image are let go, least
recently read first, and computed again when needed). A pass
that starts again at the top (the tiles after a pass that gathered the image's statistics) finds the chunks of
the last rows still there: an image of one chunk is computed once for the whole run.
"""

from __future__ import annotations

import sys

import numpy as np

#: Bytes of chunks kept beyond those the current read needs (the least recently read go first): chunks that span
#: the image's height, which no read leaves behind, are held within this.
KEPT_BYTES = 2 << 30


def with_kept_blocks(image, tile: int):
    """``image`` read through :class:`KeptBlocks` where it is a dask array with chunks higher or wider than a
    ``tile`` (each would be computed for several regions); ``image`` itself otherwise."""
    dask_array = sys.modules.get("dask.array")   # (a dask array exists only where dask was imported)
    if dask_array is None or not isinstance(image, dask_array.Array) or image.ndim < 2:
        return image
    if max(image.chunks[0]) <= tile and max(image.chunks[1]) <= tile:
        return image
    return KeptBlocks(image)


class KeptBlocks:
    """A 2-D (or 2-D with samples last) dask image read by regions ``image[y0:y1, x0:x1]`` (or bands of rows
    ``image[y0:y1]``), each chunk computed once and kept until a read starts below its last row. The regions
    equal the dask array's own; a read that goes back up computes the chunks it needs again."""

    def __init__(self, image, budget: int = KEPT_BYTES):
        self.image, self.budget = image, budget
        self.shape, self.dtype, self.ndim = tuple(image.shape), np.dtype(image.dtype), image.ndim
        self._row_edges = np.cumsum((0,) + tuple(image.chunks[0]))
        self._column_edges = np.cumsum((0,) + tuple(image.chunks[1]))
        self._kept: dict[tuple[int, int], np.ndarray] = {}
        #: chunks computed so far (to say what reading cost)
        self.computed = 0

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        whole = self[:, :]
        return whole if dtype is None else whole.astype(dtype)

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        if len(key) > 2 or not all(isinstance(part, slice) for part in key):
            return np.asarray(self.image[key])   # (not a region: read as dask reads it)
        rows = range(*key[0].indices(self.shape[0]))
        columns = range(*(key[1] if len(key) > 1 else slice(None)).indices(self.shape[1]))
        if rows.step != 1 or columns.step != 1:
            return np.asarray(self.image[key])
        top, bottom, left, right = rows.start, max(rows.start, rows.stop), columns.start, max(columns.start,
                                                                                               columns.stop)
        for index in [index for index in self._kept if self._row_edges[index[0] + 1] <= top]:
            del self._kept[index]   # above every later read of this pass
        read = []
        out = np.empty((bottom - top, right - left) + self.shape[2:], self.dtype)
        if out.size == 0:
            return out
        first_row = int(np.searchsorted(self._row_edges, top, side="right")) - 1
        last_row = int(np.searchsorted(self._row_edges, bottom, side="left")) - 1
        first_column = int(np.searchsorted(self._column_edges, left, side="right")) - 1
        last_column = int(np.searchsorted(self._column_edges, right, side="left")) - 1
        for i in range(first_row, last_row + 1):
            y0, y1 = int(self._row_edges[i]), int(self._row_edges[i + 1])
            for j in range(first_column, last_column + 1):
                x0, x1 = int(self._column_edges[j]), int(self._column_edges[j + 1])
                block = self._kept.pop((i, j), None)
                if block is None:
                    block = np.asarray(self.image[y0:y1, x0:x1])
                    self.computed += 1
                self._kept[(i, j)] = block   # the most recently read last
                read.append((i, j))
                a, b, c, d = max(top, y0), min(bottom, y1), max(left, x0), min(right, x1)
                out[a - top : b - top, c - left : d - left] = block[a - y0 : b - y0, c - x0 : d - x0]
        self._within_budget(set(read))
        return out

    def _within_budget(self, needed: set) -> None:
        """Let the least recently read chunks go while those kept exceed the budget (those this read needed stay)."""
        total = sum(block.nbytes for block in self._kept.values())
        for index in list(self._kept):
            if total <= self.budget:
                break
            if index not in needed:
                total -= self._kept.pop(index).nbytes
