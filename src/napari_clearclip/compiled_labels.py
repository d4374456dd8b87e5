"""Two passes over labels, compiled with numba (the loops are in :mod:`._compiled_loops`, ready with edge snapping's,
see :mod:`.compiled_snapping`): which labels each tile holds, and which values a labels layer holds. Each is one
pass over the labels, on every core, where NumPy makes one pass per label (or copies uint8 labels to 64-bit
integers first). Without numba the callers' NumPy and PyTorch paths run: the same results.
"""

from __future__ import annotations

import numpy as np
import torch

from . import compiled_snapping
from .compiled_snapping import _loops, _shared, _threads


def labels_present(block: np.ndarray, tile: int, occurs: np.ndarray) -> bool:
    """``occurs[ty, tx, label]`` set where ``label`` occurs in tile (ty, tx) of ``block`` (uint8 labels, the first
    tile at its top left, tiles at its far edges cut short), in one pass over it; False, with nothing set, where the
    compiled loop does not apply (other label types, or no numba)."""
    loops = _loops()
    if (not loops or block.dtype != np.uint8 or occurs.dtype != np.bool_ or block.ndim != 2
            or not block.flags.c_contiguous or not occurs.flags.c_contiguous or not block.flags.writeable):
        return False
    _shared(loops.labels_present, 0, occurs.shape[0], occurs.shape[1] * tile * tile, block, tile, occurs)
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
