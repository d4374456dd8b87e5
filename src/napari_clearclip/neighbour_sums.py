"""PAMR's weighted sums of neighbours, compiled with numba: a row at a time instead of a neighbour at a time.

One PAMR iteration gives every pixel the weighted sum of its neighbours' scores. Done with PyTorch's
element-wise operations, that is one pass per neighbour over a block of rows (a product, then one
fused multiply-add per neighbour), each pass reading and writing the whole block again. Here each
row of output is finished while it is in the processor's fastest cache, and the rows are shared
between threads (the compiled loop releases the GIL).

The arithmetic is the very one of the element-wise path: the first neighbour's product, then each
further neighbour added with one fused multiply-add (one rounding), in the same order. The values
are the same to the last bit, so a run gives the same labels with or without this module, on any
split of the rows. Without numba (or with ``NAPARI_CLEARCLIP_COMPILED=0``) the element-wise path runs.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch

#: Output values one thread's share of a block must hold at least, or the block is not shared.
SHARED_FROM = 1 << 15

_lock = threading.Lock()
_kernel = None           # the compiled loop, once compiled; False when numba cannot be used
_pool: ThreadPoolExecutor | None = None
_pool_threads = 0
_warming: threading.Thread | None = None


def _compile():
    """The compiled loop, or False when numba is missing or cannot compile it."""
    try:
        from ._compiled_sums import weighted_rows as loop
    except Exception:  # numba absent, or not built for this NumPy
        return False
    return loop


def _loop():
    global _kernel
    if _kernel is None:
        with _lock:
            if _kernel is None:
                _kernel = _compile() if os.environ.get("NAPARI_CLEARCLIP_COMPILED", "1") != "0" else False
    return _kernel


def _warm_up() -> None:
    loop = _loop()
    if loop:  # compiled now, or read from numba's cache on disk: a first run does not wait for it
        tiny = np.zeros((1, 3, 3), np.float32)
        loop(tiny, tiny.copy(), np.zeros(1, np.float32), 0, 0, np.zeros(1, np.int64), np.zeros(1, np.int64), 1, 1, 0,
             1)


def prepare() -> None:
    """Compile the loop (or read it from numba's cache) in a background thread, once per process: called when a
    run that snaps starts, so that the loop is ready while the model runs."""
    global _warming
    with _lock:
        if _warming is not None:
            return
        _warming = threading.Thread(target=_warm_up, name="clearclip-compile", daemon=True)
    _warming.start()


def available() -> bool:
    """Whether the compiled sums run here (numba importable, not turned off)."""
    return bool(_loop())


def _threads(count: int) -> ThreadPoolExecutor:
    global _pool, _pool_threads
    with _lock:
        if _pool is None or _pool_threads < count:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(count, thread_name_prefix="clearclip-sums")
            _pool_threads = count
        return _pool


def _fits(current: torch.Tensor, spare: torch.Tensor, weights: torch.Tensor) -> bool:
    return (current.device.type == "cpu" and current.dtype == spare.dtype == weights.dtype == torch.float32
            and current.is_contiguous() and spare.is_contiguous() and weights.stride(-1) == 1
            and not (current.requires_grad or spare.requires_grad or weights.requires_grad))


def weighted_rows(current: torch.Tensor, spare: torch.Tensor, weights: torch.Tensor,
                  offsets: Sequence[tuple[int, int]], pad: int, width: int, first: int, last: int) -> bool:
    """Rows ``first``..``last`` of one PAMR iteration (see :func:`napari_clearclip.refine._average_rows`),
    compiled; False, with nothing written, where the compiled loop does not apply (not float32 on the CPU, or
    no numba): the caller then uses the element-wise path."""
    loop = _loop()
    if not loop or not _fits(current, spare, weights):
        return False
    source, target = current.numpy(), spare.numpy()
    span = 1 + sum((size - 1) * step for size, step in zip(weights.shape, weights.stride()))
    planes = torch.as_strided(weights, (span,), (1,), weights.storage_offset()).numpy()
    plane_step, row_step = weights.stride(0), weights.stride(1)
    rows_off = np.array([dy for dy, _ in offsets], np.int64)
    cols_off = np.array([dx for _, dx in offsets], np.int64)
    threads = max(1, min(torch.get_num_threads(), (last - first) * width * current.shape[0] // SHARED_FROM))
    if threads == 1:
        loop(source, target, planes, plane_step, row_step, rows_off, cols_off, pad, width, first, last)
        return True
    bounds = np.linspace(first, last, threads + 1).round().astype(int)
    pending = [_threads(threads - 1).submit(loop, source, target, planes, plane_step, row_step, rows_off, cols_off, pad, width,
                                            int(bounds[i]), int(bounds[i + 1])) for i in range(1, threads)]
    loop(source, target, planes, plane_step, row_step, rows_off, cols_off, pad, width, int(bounds[0]), int(bounds[1]))
    for job in pending:
        job.result()
    return True
