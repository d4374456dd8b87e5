"""Edge-snapping weights kept tile by tile between runs on the same image.

PAMR weighs each pixel's neighbours by how alike the image is there. The weights depend on
the image alone, not on the scores, yet computing them is about 40% of a live re-run at
4096 x 4096. A run keeps the weights of the tiles it computed, and the next run on the same
image (after a stroke, or with a class typed) uses them instead of computing them again.
Weights are computed element by element in a fixed order, so a kept tile holds the very values
any region containing it would get: the labels stay those of a computation from scratch.

An image whose weights fit in the memory allowed keeps them in one image-sized tensor, filled
tile by tile as runs compute them: a region is then a view of it, with nothing copied, and
every weight once computed stays. A larger image keeps separate tiles, up to half that memory
(its runs' own buffers are larger), assembled into each region that needs them.
"""

from __future__ import annotations

import threading
from typing import Callable

import numpy as np
import torch

#: Memory kept for the weights of one image, at most (16 float32 weights per pixel with the default
#: dilations: 64 MiB per 1024 x 1024 pixels, 1 GiB for a whole 4096 x 4096 image).
AFFINITY_TILES_BYTES = 1 << 30


class AffinityTiles:
    """The weights of one image at one size and set of dilations, by tile of ``tile`` x ``tile`` pixels,
    at most ``max_bytes`` of them.

    ``context`` is how far a weight looks (the largest dilation): weights computed over a region
    are exact except within ``context`` pixels of a side of the region that lies inside the image.
    An image whose ``planes`` weights per pixel (float32) fit in ``max_bytes`` is kept whole (see the module).
    """

    def __init__(self, max_bytes: int = AFFINITY_TILES_BYTES):
        self.max_bytes = max_bytes
        self.identity: tuple | None = None
        self.size, self.tile, self.context = (0, 0), 1, 0
        self._tiles: dict[tuple[int, int], torch.Tensor] = {}
        self._whole: torch.Tensor | None = None   # the image's weights, where ``_done`` says they are computed
        self._done: np.ndarray | None = None      # (tile rows, tile columns): kept in ``_whole``
        self.whole_image = False
        self.planes = 0
        self.nbytes = 0
        self._lock = threading.Lock()  # runs on one image from two threads share these

    def start(self, identity: tuple, size: tuple[int, int], tile: int, context: int, planes: int = 0) -> None:
        """Before a run: the weights kept are dropped unless they were made from this very ``identity``."""
        with self._lock:
            if identity != self.identity:
                self._tiles.clear()
                self.nbytes = 0
                self.identity, self.size, self.tile, self.context = identity, tuple(size), tile, context
                self.planes = planes
                self.whole_image = 0 < 4 * planes * size[0] * size[1] <= self.max_bytes
                self._whole = None  # a run still on the weights before keeps its own
                self._done = np.zeros((-(-size[0] // tile), -(-size[1] // tile)), bool) if self.whole_image else None

    def __len__(self) -> int:
        return int(self._done.sum()) if self.whole_image else len(self._tiles)

    def missing_tile_rows(self) -> list[int]:
        """The rows of tiles some of whose weights are not computed yet, where the image's are kept whole (none
        otherwise: separate tiles are kept only as runs need them)."""
        with self._lock:
            if not self.whole_image or self._done is None:
                return []
            return [int(row) for row in np.flatnonzero(~self._done.all(axis=1))]

    def _span(self, ty: int, tx: int) -> tuple[int, int, int, int]:
        top, left = ty * self.tile, tx * self.tile
        return top, min(top + self.tile, self.size[0]), left, min(left + self.tile, self.size[1])

    def region(self, area: tuple[int, int, int, int],
               compute: Callable[[tuple[int, int, int, int]], torch.Tensor],
               empty: Callable[[tuple[int, ...]], torch.Tensor] | None = None,
               release: Callable[[torch.Tensor], None] | None = None,
               compute_into: Callable[[tuple[int, int, int, int], torch.Tensor], None] | None = None) -> torch.Tensor:
        """The weights over ``area`` (top, bottom, left, right), from kept tiles where there are some;
        ``compute(rectangle)`` gives the weights of any rectangle (exact away from its inner sides), ``empty(shape)``
        the float32 tensor they are assembled in (default: a new one), and ``release(weights)`` is called with what
        ``compute`` gave once it is copied. With the image kept whole, the weights are a view of it, exact over the
        whole area; ``compute_into(rectangle, out)``, if given, writes the exact weights of a rectangle into ``out``
        (else ``compute`` is used)."""
        if self.whole_image:
            return self._whole_region(area, compute, release, compute_into)
        top, bottom, left, right = area
        wanted = [(ty, tx) for ty in range(top // self.tile, (bottom - 1) // self.tile + 1)
                  for tx in range(left // self.tile, (right - 1) // self.tile + 1)]
        with self._lock:
            found = {key: self._tiles[key] for key in wanted if key in self._tiles}
            identity = self.identity
        if not found:  # nothing kept here (a first run): the area at once, as without keeping
            weights = compute(area)
            self._keep(self._exact_tiles(area, weights), identity)
            return weights
        computed, outputs = {}, []
        for rectangle in self._rectangles([key for key in wanted if key not in found]):
            outer = self._with_context(rectangle)
            outputs.append(compute(outer))
            computed.update(self._exact_tiles(outer, outputs[-1], within=rectangle))
        found.update(computed)
        first = next(iter(found.values()))
        shape = (first.shape[0], bottom - top, right - left)
        weights = torch.empty(shape, dtype=first.dtype) if empty is None else empty(shape)
        for key in wanted:
            y0, y1, x0, x1 = self._span(*key)
            ya, yb, xa, xb = max(y0, top), min(y1, bottom), max(x0, left), min(x1, right)
            weights[:, ya - top : yb - top, xa - left : xb - left] = found[key][:, ya - y0 : yb - y0, xa - x0 : xb - x0]
        self._keep(computed, identity)
        del computed, found
        for output in outputs if release is not None else ():
            release(output)
        return weights

    def _whole_region(self, area, compute, release, compute_into) -> torch.Tensor:
        """The image-sized tensor's view of ``area``, its tiles not computed yet computed first: tile-aligned
        rectangles written in place by ``compute_into`` (exact throughout), or computed with ``context`` around
        them and copied in."""
        top, bottom, left, right = area
        rows = range(top // self.tile, (bottom - 1) // self.tile + 1)
        cols = range(left // self.tile, (right - 1) // self.tile + 1)
        with self._lock:  # what a run that starts on another guide meanwhile replaces stays this region's
            if self._whole is None:
                self._whole = torch.empty((self.planes, *self.size))
            whole, done_map = self._whole, self._done
            done = done_map[rows.start : rows.stop, cols.start : cols.stop].copy()
        missing = [(ty, tx) for ty in rows for tx in cols if not done[ty - rows.start, tx - cols.start]]
        for rectangle in self._rectangles(missing):
            y0, y1, x0, x1 = rectangle
            if compute_into is not None:
                compute_into(rectangle, whole[:, y0:y1, x0:x1])
            else:
                outer = self._with_context(rectangle)
                computed = compute(outer)
                whole[:, y0:y1, x0:x1] = computed[:, y0 - outer[0] : y1 - outer[0], x0 - outer[2] : x1 - outer[2]]
                if release is not None:
                    release(computed)
                del computed
            with self._lock:
                done_map[y0 // self.tile : -(-y1 // self.tile), x0 // self.tile : -(-x1 // self.tile)] = True
                if done_map is self._done:
                    self.nbytes = 4 * self.planes * self._pixels_done()
        return whole[:, top:bottom, left:right]

    def _pixels_done(self) -> int:
        heights = np.minimum(self.tile, self.size[0] - self.tile * np.arange(self._done.shape[0]))
        widths = np.minimum(self.tile, self.size[1] - self.tile * np.arange(self._done.shape[1]))
        return int(heights @ self._done.astype(np.int64) @ widths)

    def _with_context(self, rectangle):
        top, bottom, left, right = rectangle
        return (max(0, top - self.context), min(self.size[0], bottom + self.context),
                max(0, left - self.context), min(self.size[1], right + self.context))

    def _exact_tiles(self, area, weights: torch.Tensor, within=None) -> dict:
        """The tiles of ``weights`` (computed over ``area``) whose values are exact, as views of it."""
        top, bottom, left, right = area
        exact = (top if top == 0 else top + self.context, bottom if bottom == self.size[0] else bottom - self.context,
                 left if left == 0 else left + self.context, right if right == self.size[1] else right - self.context)
        if within is not None:
            exact = (max(exact[0], within[0]), min(exact[1], within[1]), max(exact[2], within[2]),
                     min(exact[3], within[3]))
        tiles = {}
        for ty in range(-(-exact[0] // self.tile), exact[1] // self.tile + 1):
            for tx in range(-(-exact[2] // self.tile), exact[3] // self.tile + 1):
                y0, y1, x0, x1 = self._span(ty, tx)
                if y0 < y1 and x0 < x1 and y1 <= exact[1] and x1 <= exact[3]:
                    tiles[(ty, tx)] = weights[:, y0 - top : y1 - top, x0 - left : x1 - left]
        return tiles

    def _rectangles(self, missing: list) -> list:
        """Tile-aligned rectangles covering the ``missing`` tiles: runs along each tile row, with runs of the
        same columns in consecutive rows joined."""
        runs: dict[int, list] = {}
        for ty, tx in sorted(missing):
            row = runs.setdefault(ty, [])
            if row and row[-1][1] == tx:
                row[-1][1] = tx + 1
            else:
                row.append([tx, tx + 1])
        open_runs: dict[tuple, list] = {}  # (first, last column) -> [first row, last row + 1]
        rectangles = []
        for ty in sorted(runs):
            current = {tuple(run) for run in runs[ty]}
            for columns in list(open_runs):
                if columns not in current or open_runs[columns][1] != ty:
                    rectangles.append((columns, open_runs.pop(columns)))
            for columns in current:
                if columns in open_runs:
                    open_runs[columns][1] = ty + 1
                else:
                    open_runs[columns] = [ty, ty + 1]
        rectangles += list(open_runs.items())
        out = []
        for (first_x, last_x), (first_y, last_y) in rectangles:
            out.append((first_y * self.tile, min(last_y * self.tile, self.size[0]),
                        first_x * self.tile, min(last_x * self.tile, self.size[1])))
        return out

    def _keep(self, tiles: dict, identity: tuple | None) -> None:
        """Keep copies of new tiles while there is room (half of ``max_bytes``: see the module). Once full, later
        tiles are not kept and none is dropped: runs sweep the image in the same order, so dropping the least
        recently used would drop each tile just before the next run needs it, and keep none of those it will use."""
        with self._lock:
            if identity != self.identity:  # a run on another guide started meanwhile: these are not its weights
                return
            for key, value in tiles.items():
                size = value.numel() * value.element_size()
                if key in self._tiles or self.nbytes + size > self.max_bytes // 2:
                    continue
                self._tiles[key] = value.clone()
                self.nbytes += size
