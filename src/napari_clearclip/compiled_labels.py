"""Two passes over labels, compiled with numba (the loops are in :mod:`._compiled_loops`, ready with edge snapping's,
see :mod:`.compiled_snapping`): which labels each tile holds, and which values a labels layer holds. Each is one
pass over the labels, on every core, where NumPy makes one pass per label (or copies uint8 labels to 64-bit
integers first). Without numba the callers' NumPy and PyTorch paths run: the same results.
"""

from __future__ import annotations

import numpy as np
import torch

from . import compiled_snapping
from .compiled_snapping import _loops, _threads, shared_rows


def labels_present(block: np.ndarray, tile: int, occurs: np.ndarray) -> bool:
    """``occurs[ty, tx, label]`` set where ``label`` occurs in tile (ty, tx) of ``block`` (uint8 labels, the first
    tile at its top left, tiles at its far edges cut short), in one pass over it; False, with nothing set, where the
    compiled loop does not apply (other label types, or no numba)."""
    loops = _loops()
    if (not loops or block.dtype != np.uint8 or occurs.dtype != np.bool_ or block.ndim != 2
            or not block.flags.c_contiguous or not occurs.flags.c_contiguous or not block.flags.writeable):
        return False
    shared_rows(loops.labels_present, 0, occurs.shape[0], occurs.shape[1] * tile * tile, block, tile, occurs)
    return True


def fill_tiles(labels: np.ndarray, margins: np.ndarray, fill: np.ndarray, tile_labels: np.ndarray,
               tile_margins: np.ndarray, tile: int) -> bool:
    """Each whole tile set in ``fill`` ((rows, columns) of whole tiles) given its label of ``tile_labels`` and its
    float16 margin of ``tile_margins`` throughout ``labels`` (uint8) and ``margins``, on every core; False, with
    nothing written, where the compiled loop does not apply (other types, or no numba)."""
    loops = _loops()
    if (not loops or labels.dtype != np.uint8 or margins.dtype != np.float16 or labels.ndim != 2
            or labels.shape != margins.shape or not labels.flags.c_contiguous or not margins.flags.c_contiguous
            or not labels.flags.writeable or not margins.flags.writeable
            or labels.shape[0] < fill.shape[0] * tile or labels.shape[1] < fill.shape[1] * tile):
        return False
    rows, columns = fill.shape
    shared_rows(loops.filled_tiles, 0, rows, columns * tile * tile, labels, margins.view(np.uint16),
                np.ascontiguousarray(fill, bool), np.ascontiguousarray(tile_labels, np.uint8),
                np.ascontiguousarray(tile_margins, np.float16).view(np.uint16), tile)
    return True


def values_present(array: np.ndarray) -> np.ndarray | None:
    """The distinct values of a contiguous, writable uint8 ``array``, ascending (as int64), in one pass shared
    between PyTorch's number of threads; None where the compiled loop does not apply (other types, read-only
    arrays, or no numba)."""
    loops = _loops()
    if not loops or array.dtype != np.uint8 or not array.flags.c_contiguous or not array.flags.writeable:
        return None   # (numba would compile the loop again for read-only arrays, in the middle of a run)
    flat = array.reshape(-1)
    threads = max(1, min(torch.get_num_threads(), flat.size // compiled_snapping.SHARED_FROM))
    seen = np.zeros((threads, 256), bool)     # one table per thread: no cache line written by two
    bounds = [flat.size * i // threads for i in range(threads + 1)]
    pending = [_threads(threads - 1).submit(loops.values_seen, flat, seen[i], bounds[i], bounds[i + 1])
               for i in range(1, threads)]
    loops.values_seen(flat, seen[0], bounds[0], bounds[1])
    for job in pending:
        job.result()
    return np.flatnonzero(seen.any(0))


def label_tiles(values: dict, tiles, owner: np.ndarray, reference: int, classes: int, gaps: np.ndarray, tile: int,
                labels: np.ndarray, margins: np.ndarray, tolerance: float, present: np.ndarray,
                winners: np.ndarray | None) -> bool:
    """The labels, margins, winners' values and labels present of ``tiles`` (see
    :func:`napari_clearclip.tiled_labels._label_tiles`), in one pass over their pixels, written into the image's
    arrays, on every core; False, with nothing written, where the compiled loop does not apply (labels other than
    uint8, or no numba)."""
    loops = _loops()
    queries = loops and _labelling_inputs(values, owner, labels, margins, present, winners)
    if not queries:
        return False
    kept = winners if winners is not None else np.zeros((1, 1), np.float32)
    spots = _spots(tiles)
    shared_rows(loops.leaders_of_tiles, 0, len(spots), tile * tile * (len(values) + classes), *queries,
            int(owner[reference]), classes, spots, tile, np.ascontiguousarray(gaps, np.float32), np.float32(tolerance),
            labels, margins.view(np.uint16), kept, winners is not None, present)
    return True


def challenge_tiles(values: dict, tiles, owner: np.ndarray, reference: int, classes: int, gaps: np.ndarray, tile: int,
                    labels: np.ndarray, margins: np.ndarray, winners: np.ndarray, tolerance: float,
                    present: np.ndarray, challengers: np.ndarray, own_allowed: np.ndarray, trust_winners: np.ndarray,
                    fallback: bool, reference_known: np.ndarray) -> bool:
    """A run that starts from the previous one's labels (classes added, or scores that only rose): each pixel's
    previous winner against the classes that can take its place, in place, in one pass over the tiles' pixels, on
    every core (see :func:`napari_clearclip._compiled_loops.challenged_tiles`); False, with nothing written, where
    the compiled loop does not apply."""
    loops = _loops()
    queries = loops and _labelling_inputs(values, owner, labels, margins, present, winners)
    if not queries:
        return False
    spots = _spots(tiles)
    shared_rows(loops.challenged_tiles, 0, len(spots), tile * tile * (len(values) + classes), *queries,
            int(owner[reference]), classes, spots, tile, np.ascontiguousarray(gaps, np.float32), np.float32(tolerance),
            np.ascontiguousarray(challengers, np.bool_), np.ascontiguousarray(own_allowed, np.bool_),
            np.ascontiguousarray(trust_winners, np.bool_), bool(fallback),
            np.ascontiguousarray(reference_known, np.bool_), labels, margins.view(np.uint16), winners, present)
    return True


def _spots(tiles) -> np.ndarray:
    return np.ascontiguousarray(np.array(tiles, np.int64).reshape(-1, 2))


def _labelling_inputs(values: dict, owner: np.ndarray, labels: np.ndarray, margins: np.ndarray, present: np.ndarray,
                      winners: np.ndarray | None):
    """(planes, their row steps, origins, exact rectangles, classes) of the queries in ``values`` as the compiled
    labelling loops take them, or None where they do not apply: labels other than uint8, arrays not contiguous and
    writable, planes not float32 rows on the CPU."""
    arrays = (labels, margins, present) + (() if winners is None else (winners,))
    if (labels.dtype != np.uint8 or margins.dtype != np.float16 or present.dtype != np.bool_
            or not all(a.flags.c_contiguous and a.flags.writeable for a in arrays)
            or (winners is not None and winners.dtype != np.float32)):
        return None
    order = sorted(values)
    if not all(values[q][0].dtype == torch.float32 and values[q][0].stride(-1) == 1 and values[q][0].numel()
               and values[q][0].device.type == "cpu" for q in order):
        return None
    from numba import typed, types

    planes = typed.List.empty_list(types.Array(types.float32, 1, "C"))
    for query in order:
        planes.append(compiled_snapping._flat(values[query][0]))
    return (planes, np.array([values[q][0].stride(0) for q in order], np.int64),
            np.array([values[q][1:3] for q in order], np.int64).reshape(-1, 2),
            np.array([values[q][3] for q in order], np.int64).reshape(-1, 4),
            np.asarray(owner, np.int64)[order] if order else np.zeros(0, np.int64))


def judge_tiles(bounds, ys: np.ndarray, xs: np.ndarray, labels: np.ndarray, margins: np.ndarray,
                winners: np.ndarray | None, tile: int, dirty: np.ndarray) -> bool:
    """Which whole tiles at (``ys``, ``xs``) must be recomputed (into ``dirty``, tiles_y x tiles_x), and the margins
    the others keep lowered in place, by ``bounds`` (a ``tiled_labels._TileBounds``), in one pass over the tiles'
    pixels on every core; False, with nothing written, where the compiled loop does not apply."""
    loops = _loops()
    rescued = bounds.highest is not None and winners is not None
    if (not loops or labels.dtype != np.uint8 or margins.dtype != np.float16 or not labels.flags.c_contiguous
            or not margins.flags.c_contiguous or not margins.flags.writeable
            or (rescued and (winners.dtype != np.float32 or not winners.flags.c_contiguous))):
        return False
    tables = (np.ascontiguousarray(bounds.threshold, np.float64), np.ascontiguousarray(bounds.shrinks, np.float32),
              np.ascontiguousarray(bounds.new_leads, np.float32), np.ascontiguousarray(bounds.new_others, np.float32),
              np.ascontiguousarray(bounds.highest if rescued else np.zeros((1, 1, 1)), np.float32))
    judged = np.zeros(len(ys), bool)
    shared_rows(loops.judged_tiles, 0, len(ys), tile * tile * 2, labels, margins.view(np.uint16),
            winners if rescued else np.zeros((1, 1), np.float32), rescued, np.ascontiguousarray(ys, np.int64),
            np.ascontiguousarray(xs, np.int64), tile, *tables, np.float32(2 * bounds.tolerance), judged)
    dirty[ys, xs] = judged
    return True
