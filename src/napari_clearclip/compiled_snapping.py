"""Edge snapping's inner loops, and the resizing of scores to the image, compiled with numba: a row at a time
instead of a plane at a time.

PAMR weighs each pixel's neighbours by how alike the image is there, then repeatedly gives every
pixel the weighted sum of its neighbours' scores. Done with PyTorch's element-wise operations, each
step is a pass over a block of rows (one per neighbour, channel and operation: about 300 passes for
the weights), each reading and writing the whole block again. Here each row is finished while it is
in the processor's fastest cache, and the rows are shared between threads (the compiled loops release
the GIL).

The arithmetic is the very one of the element-wise path, value by value, in the same order and with
the same roundings; the square roots and exponentials are still PyTorch's own. The values are the same
to the last bit, so a run gives the same labels with or without this module, on any split of the rows.
Without numba (or with ``NAPARI_CLEARCLIP_COMPILED=0``) the element-wise path runs.
"""

from __future__ import annotations

import atexit
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np
import torch

#: Values one thread's share of a block must hold at least, or the block is not shared.
SHARED_FROM = 1 << 15

_lock = threading.Lock()
_compiling = threading.Lock()
_compiled = None         # the module of compiled loops, once ready; False when numba cannot be used
_exercised = threading.local()   # the module being compiled, in the thread that compiles it
_pool: ThreadPoolExecutor | None = None
_pool_threads = 0
_warming: threading.Thread | None = None


def _load():
    """The compiled loops' module, or False when numba is missing, cannot compile them, or is turned off."""
    if os.environ.get("NAPARI_CLEARCLIP_COMPILED", "1") == "0":
        return False
    try:
        from . import _compiled_loops
    except Exception:  # numba absent, or not built for this NumPy
        return False
    return _compiled_loops


def _ready():
    """The module with every loop compiled (or read from numba's cache), on tiny inputs of the types runs give them;
    False where that fails (the element-wise path then runs)."""
    module = _load()
    if not module:
        return False
    _exercised.loops = module
    try:
        guide = torch.zeros((1, 5, 5))
        logits = torch.zeros((8, 3, 3))
        weights_of_rows(guide, 1, (1,), logits, 0, 3)
        weighted_rows(torch.zeros((1, 5, 5)), torch.zeros((1, 5, 5)), logits, [(0, 0)] * 8, 1, 3, 0, 3, True)
        taps = np.zeros(3, np.int64)
        resized_rows(torch.zeros((1, 1, 3)), taps, taps, torch.zeros(3), torch.zeros((1, 3, 3)))
        from .compiled_labels import challenge_tiles, fill_tiles, label_tiles, labels_present, values_present

        labels_present(np.zeros((3, 3), np.uint8), 2, np.zeros((2, 2, 2), bool))
        fill_tiles(np.zeros((2, 2), np.uint8), np.zeros((2, 2), np.float16), np.ones((1, 1), bool),
                   np.ones((1, 1), np.uint8), np.ones((1, 1), np.float16), 2)
        values_present(np.zeros(3, np.uint8))
        label_tiles({0: (torch.zeros((2, 2)), 0, 0, (0, 2, 0, 2))}, [(0, 0)], np.zeros(2, np.int64), 1, 1,
                    np.full((1, 1), np.inf, np.float32), 2, np.zeros((2, 2), np.uint8), np.zeros((2, 2), np.float16),
                    0.0, np.zeros((1, 1, 2), bool), np.zeros((2, 2), np.float32))
        challenge_tiles({0: (torch.zeros((2, 2)), 0, 0, (0, 2, 0, 2))}, [(0, 0)], np.zeros(2, np.int64), 1, 1,
                        np.full((1, 1), np.inf, np.float32), 2, np.ones((2, 2), np.uint8),
                        np.zeros((2, 2), np.float16), np.zeros((2, 2), np.float32), 0.0, np.zeros((1, 1, 2), bool),
                        np.ones(1, bool), np.ones(1, bool), np.zeros((1, 1), bool), True, np.ones((1, 1), bool))
        from .compiled_labels import judge_tiles
        from .tiled_labels import _TileBounds

        table = np.zeros((1, 1, 2), np.float32)
        judge_tiles(_TileBounds(np.zeros((1, 1, 2)), table, table[None], table[None], 0.0, table),
                    np.zeros(1, np.int64), np.zeros(1, np.int64), np.ones((2, 2), np.uint8),
                    np.zeros((2, 2), np.float16), np.zeros((2, 2), np.float32), 2, np.zeros((1, 1), bool))
    except Exception:  # numba could not compile them here
        return False
    finally:
        _exercised.loops = None
    return module


def _loops():
    """The compiled loops, or False: while they are compiled in the background, the element-wise path runs (the
    very same values), rather than waiting (the first compiling on a machine takes several seconds)."""
    global _compiled
    exercised = getattr(_exercised, "loops", None)
    if exercised is not None:
        return exercised
    if _compiled is not None:
        return _compiled
    warming = _warming
    if warming is not None and warming.is_alive():
        return False
    with _compiling:
        if _compiled is None:
            _compiled = _ready()
    return _compiled


def _warm_up() -> None:
    global _compiled
    with _compiling:
        if _compiled is None:
            _compiled = _ready()


def prepare() -> None:
    """Compile the loops (or read them from numba's cache) in a background thread, once per process: called when
    a segmenter is made (on a GPU too: labels alone are snapped on the host), so that they are ready by the first
    run that snaps."""
    global _warming
    with _lock:
        if _warming is not None or _compiled is not None:
            return
        _warming = threading.Thread(target=_warm_up, name="clearclip-compile", daemon=True)
    _warming.start()
    # a process that ends while numba compiles in the background (a command with nothing to do) could abort in
    # LLVM's code at exit: it waits for the loops instead (seconds at most, once)
    atexit.register(_warming.join, EXIT_WAIT_S)


#: The longest a process waits at exit for the loops being compiled in the background.
EXIT_WAIT_S = 120


def available() -> bool:
    """Whether the compiled loops run here (numba importable, not turned off); waits for them if they are being
    compiled."""
    warming = _warming
    if warming is not None and warming is not threading.current_thread():
        warming.join()
    return bool(_loops())


def _threads(count: int) -> ThreadPoolExecutor:
    global _pool, _pool_threads
    with _lock:
        if _pool is None or _pool_threads < count:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(count, thread_name_prefix="clearclip-snap")
            _pool_threads = count
        return _pool


def shared_rows(loop: Callable, first: int, last: int, values_per_row: int, *arguments,
                threads_of_their_own: bool = False) -> None:
    """``loop(*arguments, first_row, last_row)`` over rows ``first``..``last``, split between PyTorch's number of
    threads when each share holds at least :data:`SHARED_FROM` values. With ``threads_of_their_own`` the other shares
    run on threads started for this call, which end with it (see :func:`_on_threads_of_their_own`)."""
    threads = max(1, min(torch.get_num_threads(), (last - first) * values_per_row // SHARED_FROM, last - first))
    if threads == 1:
        loop(*arguments, first, last)
        return
    bounds = [first + (last - first) * i // threads for i in range(threads + 1)]
    if threads_of_their_own:
        _on_threads_of_their_own(loop, arguments, bounds)
        return
    pending = []
    for i in range(1, threads):
        try:
            pending.append(_threads(threads - 1).submit(loop, *arguments, bounds[i], bounds[i + 1]))
        except RuntimeError:  # the interpreter is exiting and starts no thread: the rest here (the same values)
            loop(*arguments, bounds[i], bounds[i + 1])
    loop(*arguments, bounds[0], bounds[1])
    for job in pending:
        job.result()


def _on_threads_of_their_own(loop: Callable, arguments: tuple, bounds: list[int]) -> None:
    """``loop`` over the first share here and over each other share on a thread started for it, all ended on return
    (the first error raised again then).

    For loops that call PyTorch's parallel operations: on a thread other than the one that first used them, GNU
    OpenMP starts threads of that thread's own, which last as long as it does. While they exist OpenMP counts more
    threads than cores and lets its threads sleep right after each operation, so every small parallel operation
    of the process waits to wake them: 3,600 copies of 256 KiB took 0.27-0.32 s against 0.033-0.044 s. A thread
    that ends takes its OpenMP threads with it."""
    errors: list[BaseException] = []

    def share(low: int, high: int) -> None:
        try:
            loop(*arguments, low, high)
        except BaseException as error:  # raised again by the caller, once every share has ended
            errors.append(error)

    started = []
    try:
        for low, high in zip(bounds[1:-1], bounds[2:]):
            thread = threading.Thread(target=share, args=(low, high), name="clearclip-weights", daemon=True)
            try:
                thread.start()
            except RuntimeError:  # the interpreter is exiting and starts no thread: the share here (the same values)
                share(low, high)
                continue
            started.append(thread)
        share(bounds[0], bounds[1])
    finally:
        for thread in started:
            thread.join()
    if errors:
        raise errors[0]


def _cpu_float32(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and not t.requires_grad for t in tensors)


def _flat(tensor: torch.Tensor) -> np.ndarray:
    """The memory under ``tensor`` (whose rows are contiguous) as one contiguous array from its first value: a view
    cut out of a larger array, which the compiled loops index with its strides."""
    span = 1 + sum((size - 1) * step for size, step in zip(tensor.shape, tensor.stride()))
    return torch.as_strided(tensor, (span,), (1,), tensor.storage_offset()).numpy()


def averaging(current: torch.Tensor, spare: torch.Tensor, weights: torch.Tensor,
              offsets: Sequence[tuple[int, int]], pad: int, width: int,
              repeat_edges: bool = False) -> Callable[[int, int], None] | None:
    """``rows(first, last, columns, spans)``: rows ``first``..``last`` (columns ``columns``, all by default; row y
    further narrowed to columns ``spans[y, 0]``..``spans[y, 1]`` when ``spans``, (height, 2) int64, is given) of one
    PAMR iteration from ``current`` into ``spare`` (see
    :func:`napari_clearclip.refine._average_rows`), compiled, and with ``repeat_edges`` the border of those rows
    filled as :func:`napari_clearclip.refine._repeat_edges_of_rows` fills it; None where the compiled loop does
    not apply (not float32 on the CPU, or no numba): the caller then uses the element-wise path.

    The arguments are prepared once, so that an iteration done in many blocks of rows pays for them once."""
    if (not _cpu_float32(current, spare, weights) or not current.is_contiguous() or not spare.is_contiguous()
            or weights.stride(-1) != 1):
        return None  # checked first: a GPU's tensors never wait for the loops to be compiled
    loops = _loops()
    if not loops:
        return None
    arguments = (current.numpy(), spare.numpy(), _flat(weights), weights.stride(0), weights.stride(1),
                 np.array([dy for dy, _ in offsets], np.int64), np.array([dx for _, dx in offsets], np.int64), pad,
                 width, spare.shape[1] - 2 * pad if repeat_edges else 0)
    values_per_row = width * current.shape[0]

    def rows(first: int, last: int, columns: tuple[int, int] = (0, width), spans: np.ndarray | None = None) -> None:
        narrowed = _NO_SPANS if spans is None else spans
        shared_rows(loops.weighted_rows, first, last, values_per_row * (columns[1] - columns[0]) // max(1, width),
                *arguments, narrowed, *columns)
    return rows


#: No narrowing of the rows' columns (see :func:`averaging`).
_NO_SPANS = np.zeros((0, 2), np.int64)


def weighted_rows(current: torch.Tensor, spare: torch.Tensor, weights: torch.Tensor,
                  offsets: Sequence[tuple[int, int]], pad: int, width: int, first: int, last: int,
                  repeat_edges: bool = False) -> bool:
    """Rows ``first``..``last`` of one PAMR iteration (see :func:`averaging`); False, with nothing written, where the
    compiled loop does not apply."""
    rows = averaging(current, spare, weights, offsets, pad, width, repeat_edges)
    if rows is None:
        return False
    rows(first, last)
    return True


#: Pixels of weights a thread takes through every step at a time (the guide's spread, PyTorch's square root, the
#: logits, PyTorch's exponential, the division by their sum): a block's logits stay in the processor's cache from
#: one step to the next. Against each step over blocks of 512 whole rows shared between the threads: 1.3-1.45x
#: faster at 4096 and 8192 pixels wide on two cores, though PyTorch's steps then start its threads more often.
WEIGHT_PIXELS_AT_ONCE = 1 << 16


def weights_of_rows(padded: torch.Tensor, pad: int, dilations: Sequence[int], logits: torch.Tensor, top: int,
                    bottom: int) -> bool:
    """Rows ``top``..``bottom`` of :func:`napari_clearclip.refine.pamr_affinities`' weights, into ``logits``
    (8 x len(dilations), height, width; its rows contiguous, e.g. a view of a larger array), from ``padded``, the
    whole guide padded by ``pad``; False, with nothing written, where the compiled loops do not apply.

    The rows are shared between threads; each takes a few rows at a time through the guide's spread, PyTorch's
    square root, the logits, PyTorch's exponential and the division by their sum."""
    if not _cpu_float32(padded, logits) or not padded.is_contiguous() or logits.stride(-1) != 1:
        return False
    loops = _loops()
    if not loops:
        return False
    from .refine import NEIGHBOURS

    guide, out = padded.numpy(), _flat(logits)
    plane_step, row_step = logits.stride(0), logits.stride(1)
    channels, width = padded.shape[0], logits.shape[2]
    offsets = [(dy * d, dx * d) for d in dilations for dy, dx in NEIGHBOURS]
    first_same = np.array([offsets.index(offset) for offset in offsets], np.int64)
    rows_off = np.array([dy for dy, _ in offsets], np.int64)
    cols_off = np.array([dx for _, dx in offsets], np.int64)
    steps = np.array(dilations, np.int64)
    rows_at_once = max(1, WEIGHT_PIXELS_AT_ONCE // width)
    inference = logits.is_inference()

    def weights_of_share(first: int, last: int) -> None:
        # inference mode is the calling thread's alone: logits made in it are written in it here too
        with torch.inference_mode(inference):
            deviation = torch.empty((channels, min(rows_at_once, last - first), width), dtype=torch.float32)
            spread = deviation.numpy()
            for start in range(first, last, rows_at_once):
                stop = min(start + rows_at_once, last)
                loops.guide_spread(guide, steps, pad, start, spread, start, stop)
                deviation[:, : stop - start].sqrt_()             # PyTorch's own square root, as the element-wise path
                loops.weight_logits(guide, spread, start, rows_off, cols_off, first_same, pad, out, plane_step,
                                    row_step, width, start, stop)
                logits[:, start:stop].exp_()                     # PyTorch's own exponential
                loops.normalised(out, len(offsets), plane_step, row_step, width, start, stop)

    # PyTorch's steps run on the threads too: threads that end with the call (see _on_threads_of_their_own)
    shared_rows(weights_of_share, top, bottom, len(offsets) * channels * width, threads_of_their_own=True)
    return True


def resized_rows(across: torch.Tensor, row_low: np.ndarray, row_high: np.ndarray, row_weight: torch.Tensor,
                 out: torch.Tensor) -> bool:
    """The height pass of :func:`napari_clearclip.tiled_labels.upsample` (``across``: the source already resized
    along the width), into ``out`` (a view whose rows are contiguous, e.g. the inside of a padded buffer);
    False, with nothing written, where the compiled loop does not apply."""
    if (not _cpu_float32(across, out, row_weight) or not across.is_contiguous() or out.stride(-1) != 1
            or not row_weight.is_contiguous()):
        return False
    loops = _loops()
    if not loops:
        return False
    flat = _flat(out)
    shared_rows(loops.resized_rows, 0, out.shape[1], out.shape[0] * out.shape[2], across.numpy(),
            np.ascontiguousarray(row_low, np.int64), np.ascontiguousarray(row_high, np.int64), row_weight.numpy(),
            flat, out.stride(0), out.stride(1))
    return True

