"""Labels from working-size scores, computed tile by tile and only where they can differ.

The labels of a run are the argmax over classes of the scores resized (bilinear) to the
image, optionally snapped to edges (PAMR). Full-resolution work dominates large images, and
most of it can be skipped without changing a single label:

- Bilinear resizing and PAMR both give each pixel a convex combination (non-negative weights
  summing to one) of input scores within a known reach: one coarse pixel for the resize, plus
  ``iterations x max(dilations)`` pixels for PAMR. Where one query beats every other class's
  queries throughout a tile's reach, it wins at every pixel of the tile: no per-pixel work.
- Both are monotone in every input (non-negative weights; rounding is monotone too). After a
  change of the coarse scores (a stroke, a class added), a pixel whose class's scores only
  rose and every other class's only fell within its reach keeps its label; any other pixel
  keeps it while its previous margin (winner minus runner-up) exceeds the largest rise of
  another class plus the largest fall of its own within its reach, plus a rounding bound.

Everything else is recomputed in regions with a halo wide enough that a region's edge reaches
none of its tiles, with arithmetic that does not depend on where a region starts: a pixel gets
the very value a whole-image computation gives it.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from . import compiled_labels, compiled_snapping, fresh_memory
from .affinity_tiles import AffinityTiles
from .refine import Buffers

#: Side of the tiles that are either skipped or recomputed, in output pixels.
TILE = 64
#: Bound on rounding differences between two computations of the same scores, relative to the
#: largest score: far above float32's error after resizing and 100 PAMR iterations (~1e-5).
ROUNDING = 1e-4
#: Skip what cannot differ (False: compute every pixel, the reference the skipping is tested against).
SKIPPING = True
#: Above this share of tiles to recompute, regions are the tallest bands that fit in memory.
DENSE_SHARE = 0.5
#: Working memory for one region without edge snapping (nothing to gain from larger ones).
RESIZE_MEMORY_BYTES = 1 << 28
#: Working memory for one recomputed region (besides the outputs); larger regions go in row bands. Bands are sized
#: for every query, even where a region snaps fewer: sized by the queries snapped, 6000 x 6000 with 30 classes peaked
#: at 2.88 GiB on a first run and 3.76 GiB on a class typed (2.42 and 2.75 GiB sized for every query).
REGION_MEMORY_BYTES = 3 << 29


def bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """Source indices (low, high) and weight of PyTorch's bilinear resize (align_corners=False) along one axis."""
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    source = ((torch.arange(out_size, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_(min=0)
    low = source.long().clamp_(max=in_size - 1)
    high = (low + 1).clamp_(max=in_size - 1)
    return low.numpy(), high.numpy(), source - low.float()


#: Classes snapped over one region as one stack, at most (their weights are read once for all of them). Eight, so
#: that up to nine classes snap in one pass: six or eight classes on a 4096 x 4096 mosaic took 10-12% less time for a
#: first run than with four a pass, a class typed at 8192 x 8192 11% less; 6000 x 6000 with 30 classes peaked at
#: 2.47 GiB (2.42 GiB with four).
SNAPPED_TOGETHER = 8
#: Output bytes resized at a time: the products of a few rows, not full-size temporaries.
RESIZED_AT_ONCE_BYTES = 1 << 21


def upsample(source: torch.Tensor, rows, cols, out: torch.Tensor | None = None) -> torch.Tensor:
    """Bilinear resize of ``source`` (Q, h, w) at the output pixels whose taps are ``rows`` x ``cols``
    (into ``out`` when given, e.g. the inside of a padded buffer).

    Width first, then height, each as separate element-wise operations: a pixel's value
    depends on its four source values and weights only, never on which region is computed.
    """
    (row_low, row_high, row_weight), (col_low, col_high, col_weight) = rows, cols
    if _identity(rows) and _identity(cols):  # the source at the output size: each value as it is (x * 1 + y * 0)
        block = source[:, int(row_low[0]) : int(row_low[-1]) + 1, int(col_low[0]) : int(col_low[-1]) + 1].float()
        if out is None:
            return block.clone()
        out.copy_(block)
        return out
    first, last = int(row_low.min()), int(row_high.max())
    slab = source[:, first : last + 1].float()
    col_low_t, col_high_t = torch.from_numpy(col_low), torch.from_numpy(col_high)
    across = slab.index_select(2, col_low_t) * (1 - col_weight) + slab.index_select(2, col_high_t) * col_weight
    row_low_t, row_high_t = torch.from_numpy(row_low - first), torch.from_numpy(row_high - first)
    height, width = len(row_low), across.shape[2]
    if out is None:
        out = torch.empty((source.shape[0], height, width))
    if compiled_snapping.resized_rows(across, row_low - first, row_high - first, row_weight, out):
        return out  # the same values, compiled
    step = max(1, RESIZED_AT_ONCE_BYTES // (4 * source.shape[0] * width))
    for start in range(0, height, step):
        stop = min(start + step, height)
        weight = row_weight[start:stop].view(1, -1, 1)
        block = out[:, start:stop]
        torch.mul(across.index_select(1, row_low_t[start:stop]), 1 - weight, out=block)
        block += across.index_select(1, row_high_t[start:stop]) * weight
    return out


def _identity(taps) -> bool:
    """Whether resize taps read each source pixel as it is (the source at the output size: weights 0, and
    consecutive sources)."""
    low, _, weight = taps
    return len(low) > 0 and low[-1] - low[0] == len(low) - 1 and not bool(weight.any()) and bool(
        (np.diff(low) == 1).all())


def class_scores(scores: torch.Tensor, spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    """(C, ...) the best query of each class (synonyms share a class)."""
    if all(b - a == 1 for a, b in spans):
        return scores
    return torch.stack([scores[a:b].amax(0) for a, b in spans])


def labels_and_margins(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1-based argmax over classes (first on ties) and the winner's lead over the runner-up."""
    index, margin, _ = _leaders(scores)
    return index, margin


def _leaders(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`labels_and_margins`, and the winner's value."""
    best, index = scores.max(0)
    if scores.shape[0] == 1:
        return index + 1, torch.full_like(best, float("inf")), best
    others = scores.scatter(0, index[None], float("-inf"))
    return index + 1, best - others.amax(0), best


def label_dtype(classes: int):
    """The smallest unsigned type for labels 0..classes."""
    return np.uint8 if classes < 256 else np.uint16 if classes < 65536 else np.int32


def lower_half(values):
    """``values`` in float16, rounded down: still a lower bound (margins are stored at half the size)."""
    half = np.asarray(values, dtype=np.float32).astype(np.float16)
    high = half.astype(np.float32) > values
    if np.any(high):
        half = np.where(high, np.nextafter(half, np.float16(-np.inf)), half)
    return half


def _half_below(values: torch.Tensor) -> np.ndarray:
    """:func:`lower_half` for large arrays: float16 at most ``values`` (a step or two lower), in one pass.

    Lowered by more than half a float16 step (relative 2^-11, absolute 2^-25 near zero) before
    rounding to the nearest, the result cannot land above the value.
    """
    lowered = (values - values.abs() * 2.0 ** -10 - 2.0 ** -24).clamp_(max=65504.0)
    return torch.where(torch.isfinite(values), lowered, values).to(torch.float16).numpy()


@dataclass
class LabelState:
    """What a run leaves for the next one on the same image: its coarse scores, labels and margins."""

    scores: torch.Tensor          # (Q, h, w) working-size scores
    spans: tuple                  # the queries of each class
    names: tuple                  # each class's synonyms (to match classes between runs)
    labels: np.ndarray            # (H, W) 1..C, in the smallest type that holds them
    margins: np.ndarray           # (H, W) float16, a lower bound of the winner's lead (in score units)
    snap: tuple                   # (iterations, dilations) or () without snapping
    computed: float = 1.0         # fraction of tiles computed per pixel in the run that made it
    present: np.ndarray | None = None  # (tiles_y, tiles_x, classes + 1): which labels occur in each tile
    winners: np.ndarray | None = None  # (H, W) float32: the winner's value (relative to the reference query)
    exact: np.ndarray | None = None    # (tiles_y, tiles_x): where ``winners`` holds the values of these scores
    highest: np.ndarray | None = None  # (tiles_y, tiles_x, classes) float32: each class's value (relative to the
    #                                    reference query) at most this over the tile's pixels; inf: not known
    extra: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        winners = 0 if self.winners is None else self.winners.nbytes
        return self.labels.nbytes + self.margins.nbytes + self.scores.numel() * 4 + winners


class SpareArrays:
    """Labels, margins and winners' values of a label state no one uses any more, kept for the next run on an image of
    that size to copy the previous state's into: memory already mapped, where a fresh 120 MB at 4096 x 4096 costs the
    next run a page fault per 4 KiB (0.1-0.3 s on some machines) before it can show anything. At most one state's,
    and the labels and margins mapped ahead for a fresh run (:meth:`map_ahead`) until it takes them."""

    def __init__(self):
        self._arrays: dict[tuple, np.ndarray] = {}
        self._lock = threading.Lock()
        self._mapping: dict[tuple, threading.Event] = {}

    def take(self, shape: tuple, dtype, written_whole: bool = False) -> np.ndarray:
        """An array of that shape and type: a spare one (its values stale; one being mapped is waited for), else a
        new one (``written_whole``: see :func:`.fresh_memory.empty`)."""
        key = (tuple(shape), np.dtype(dtype))
        with self._lock:
            mapping = self._mapping.get(key)
        if mapping is not None:
            mapping.wait()
        with self._lock:
            spare = self._arrays.pop(key, None)
        return spare if spare is not None else fresh_memory.empty(shape, dtype, written_whole)

    def map_ahead(self, shape: tuple, dtypes) -> None:
        """Map memory for a run's fresh labels and margins (written whole) in a background thread, while the run
        reads its image's features: a new session re-opening a stored 4096 x 4096 image waits 0.01-0.02 s less.
        Types of that shape already spare, or being mapped, are left as they are."""
        keys = []
        with self._lock:
            for dtype in dtypes:
                key = (tuple(shape), np.dtype(dtype))
                small = int(np.prod(shape)) * key[1].itemsize < fresh_memory.SMALL_PAGES_FROM   # NumPy's own
                if not small and key not in self._arrays and key not in self._mapping:
                    self._mapping[key] = threading.Event()
                    keys.append(key)
        if not keys:
            return

        def mapped():
            for key in keys:
                try:
                    array = fresh_memory.empty(*key, written_whole=True)
                    with self._lock:
                        self._arrays.setdefault(key, array)
                except MemoryError:  # the run maps its own (and says what it cannot)
                    pass
                finally:
                    with self._lock:
                        self._mapping.pop(key).set()
        threading.Thread(target=mapped, name="clearclip-map-ahead", daemon=True).start()

    def prepare(self, state: LabelState) -> int:
        """Map and touch spares for the copies the next run on ``state``'s image makes of its labels, margins and
        winners' values, where there are none yet: done while nothing runs. Returns the bytes mapped."""
        made = 0
        for array in (state.labels, state.margins, state.winners):
            if array is None:
                continue
            key = (tuple(array.shape), array.dtype)
            with self._lock:
                if key in self._arrays:
                    continue
            spare = fresh_memory.empty(array.shape, array.dtype)
            spare.fill(0)
            with self._lock:
                self._arrays.setdefault(key, spare)
            made += spare.nbytes
        return made

    def donate(self, state: LabelState, holders: int) -> bool:
        """Keep ``state``'s margins and winners' values as spares, if nothing but ``holders`` references to the state
        and its arrays' own attributes hold them (a run in flight that started from it keeps it whole), and its labels
        too where nothing else holds them (a result the caller still has reads them). The state is then emptied: it
        can no longer seed a run (one that finds it starts afresh)."""
        if sys.getrefcount(state) > holders + 2:   # the caller's, this parameter, getrefcount's argument
            return False
        free = {}
        for name in ("labels", "margins", "winners"):
            array = getattr(state, name)
            # the state's attribute, this variable and getrefcount's argument: no view of it anywhere
            free[name] = (array is not None and sys.getrefcount(array) <= 3 and fresh_memory.owns_its_memory(array)
                          and array.flags.writeable)
            del array
        if not (free["margins"] and free["winners"]):
            return False
        arrays = [getattr(state, name) for name in ("labels", "margins", "winners") if free[name]]
        with self._lock:
            self._arrays = {(a.shape, a.dtype): a for a in arrays}
        state.labels = state.margins = state.winners = None
        return True


class _Geometry:
    """Tiles of the output, and the coarse pixels each tile's labels can depend on."""

    def __init__(self, coarse: tuple[int, int], size: tuple[int, int], reach: int, tile: int = TILE):
        self.size, self.tile, self.reach = size, tile, reach
        height, width = size
        self.rows = bilinear_taps(coarse[0], height)
        self.cols = bilinear_taps(coarse[1], width)
        self.tile_rows = np.arange(0, height, tile)
        self.tile_cols = np.arange(0, width, tile)
        self.row_window = self._windows(self.rows, self.tile_rows, height)
        self.col_window = self._windows(self.cols, self.tile_cols, width)

    def _windows(self, taps, starts: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
        low, high, _ = taps
        ends = np.minimum(starts + self.tile, length)
        first = low[np.maximum(starts - self.reach, 0)]
        last = high[np.minimum(ends + self.reach, length) - 1]
        return first, last

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.tile_rows), len(self.tile_cols)

    def reduce(self, coarse: np.ndarray, how: str, within: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """(tiles_y, tiles_x, ...) min or max of ``coarse`` (h, w, ...) over each tile's window.

        Each window is covered by a window of the largest size anchored at its start (clipped
        at the far edge): a superset, so a bound over it is still a bound. Where windows span many
        coarse pixels (scores at the output size: native resolution), the coarse values are first
        reduced over blocks of :func:`bound_block` pixels and the windows widened to whole blocks:
        still a superset, for a pass over the values instead of a dozen. ``within`` (first and
        last + 1 tile row, then column) limits the work to those tiles, with the same values.
        """
        reducer = np.maximum if how == "max" else np.minimum
        out = coarse
        for axis, (first, last) in enumerate((self.row_window, self.col_window)):
            moved = np.moveaxis(out, axis, 0)
            span = min(int((last - first).max()) + 1, moved.shape[0])
            block = bound_block(span)
            if block > 1:
                moved = _block_reduce(out, axis, block, reducer)
                first, last = first // block, last // block
                span = min(int((last - first).max()) + 1, moved.shape[0])
            start = np.minimum(first, moved.shape[0] - span)
            if within is not None:
                start = start[within[2 * axis] : within[2 * axis + 1]]
            out = np.moveaxis(_sliding_reduce(moved, start, span, reducer), 0, axis)
        return out

    def tile_slices(self, ty: int, tx: int) -> tuple[slice, slice]:
        y, x = int(self.tile_rows[ty]), int(self.tile_cols[tx])
        return slice(y, min(y + self.tile, self.size[0])), slice(x, min(x + self.tile, self.size[1]))


#: Bounds over windows of at least this many coarse pixels per block are taken over whole blocks (see
#: :func:`bound_block`): a window then widens by less than 2 / BLOCK_SHARE of its span.
BLOCK_SHARE = 16


def bound_block(span: int) -> int:
    """The block (a power of two, at most ``span / BLOCK_SHARE``; 1 for short windows) that windows of ``span``
    coarse pixels are widened to whole blocks of before bounds are taken over them."""
    return 1 << max(0, (span // BLOCK_SHARE).bit_length() - 1)


def _block_reduce(values: np.ndarray, axis: int, block: int, reducer) -> np.ndarray:
    """``reducer`` over consecutive blocks of ``block`` entries along ``axis`` (the last block may be shorter),
    with that axis moved first: the whole blocks reduced in their own layout, which keeps the pass contiguous."""
    length = values.shape[axis]
    whole = length // block
    head = np.take(values, np.arange(whole * block), axis=axis) if whole * block < length else values
    shape = values.shape[:axis] + (whole, block) + values.shape[axis + 1 :]
    reduced = reducer.reduce(head.reshape(shape), axis=axis + 1)
    if whole * block < length:
        tail = reducer.reduce(np.take(values, np.arange(whole * block, length), axis=axis), axis=axis, keepdims=True)
        reduced = np.concatenate([reduced, tail], axis=axis)
    return np.moveaxis(reduced, axis, 0)


def _sliding_reduce(values: np.ndarray, starts: np.ndarray, span: int, reducer) -> np.ndarray:
    """``reducer`` (np.maximum or np.minimum) of ``values[s : s + span]`` along the first axis, for each s in ``starts``.

    Doubling: level k holds the reduction of 2^k consecutive entries, and a window is the reduction of two
    overlapping power-of-two blocks. A few whole-array operations instead of one per window (a Python loop
    over the windows cost 1 ms per call, some 15 ms per re-run at 4096 x 4096); min and max are exact, so the
    result is the same.
    """
    if len(starts) == 0:
        return np.empty((0, *values.shape[1:]), values.dtype)
    low = int(starts.min())
    level = values[low : int(starts.max()) + span]
    starts = starts - low
    width = 1
    while 2 * width <= span:
        level = reducer(level[:-width], level[width:])
        width *= 2
    return reducer(level[starts], level[starts + span - width])


def leading_query(scores: torch.Tensor) -> np.ndarray:
    """Per coarse pixel, the index of the highest of ``scores`` (Q, h, w), the first on ties (as argmax).

    ``max(0)`` gives the same indices as ``argmax(0)``; on the CPU, argmax along the first dimension is
    about 18 times slower (12 ms against 0.7 ms for 5 x 256 x 256), a cost every re-run paid twice.
    """
    return scores.max(0).indices.numpy()


def _coarse_leaders(classes: torch.Tensor, scores: torch.Tensor, owner: np.ndarray):
    """Per coarse pixel: the leading query, and its lead over every other class (class-level margin)."""
    leader = leading_query(scores)
    if classes.shape[0] == 1:
        margin = np.full(leader.shape, np.inf, dtype=np.float32)
    else:
        top2 = classes.topk(2, dim=0).values
        margin = (top2[0] - top2[1]).numpy()
    return leader, margin, owner[leader]


@dataclass
class LabelsPreview:
    """Part of a re-run's labels, final before the run ends: ``labels`` over ``box`` (top, bottom, left, right) of
    the output, exact wherever ``final`` is True (elsewhere they are the previous run's, not yet recomputed)."""

    box: tuple[int, int, int, int]
    labels: np.ndarray
    final: np.ndarray

    @property
    def slices(self) -> tuple[slice, slice]:
        top, bottom, left, right = self.box
        return slice(top, bottom), slice(left, right)


#: Side of the first region a re-run recomputes around its focus (output pixels): small, so that what the user
#: looks at is shown first; the rest follows nearest first.
FOCUS_SIDE = 384


def _copied(array: np.ndarray, spare: SpareArrays | None) -> np.ndarray:
    """A copy of ``array``, into a spare array of its shape and type where there is one, else into memory mapped
    whole before the copy (see :func:`.fresh_memory.empty`); its rows shared between PyTorch's threads: at 4096 x
    4096 the three arrays a re-run copies took 0.017 s into spares on one core and 0.010 s on two, and 0.08-0.2 s
    into memory mapped as written against 0.04-0.05 s mapped first."""
    out = (spare or SpareArrays()).take(array.shape, array.dtype, written_whole=True)
    if array.ndim == 0 or not array.size:
        np.copyto(out, array)
        return out
    compiled_snapping.shared_rows(_copy_rows, 0, array.shape[0], int(np.prod(array.shape[1:])), out, array)
    return out


def _copy_rows(out: np.ndarray, array: np.ndarray, first: int, last: int) -> None:
    np.copyto(out[first:last], array[first:last])   # NumPy lets go of the interpreter while it copies


def label_steps(scores: torch.Tensor, guide: torch.Tensor | None, size: tuple[int, int],
                spans: Sequence[tuple[int, int]], names: Sequence[tuple[str, ...]], snap: tuple = (),
                previous: LabelState | None = None, dense: bool = False, tile: int = TILE,
                affinities: AffinityTiles | None = None, focus: tuple | None = None, spare: SpareArrays | None = None):
    """Generator: labels of ``scores`` (Q, h, w) at ``size``; yields (done, total), returns a :class:`LabelState`.

    ``focus`` (row, column of the output: where the user just painted; or top, bottom, left, right: what the
    user sees) makes a re-run recompute the tiles there first (within FOCUS_SIDE of a point), then the others
    nearest first, and yield (done, total, :class:`LabelsPreview`) as
    parts of the labels become final, so that they can be shown before the run ends. The labels do not depend
    on the order.

    ``snap=(iterations, dilations)`` snaps to the edges of ``guide`` (3, h', w') with PAMR.
    ``previous`` (the state a run on the same image left) lets unchanged pixels keep their
    labels; ``affinities`` keeps the snapping weights this run computes and lends those an earlier
    run on the same image kept (it is emptied first if they were made from another guide);
    ``dense=True`` computes every pixel (the reference the skipping is tested against). ``spare`` lends arrays
    to copy the previous state's margins and winners' values into.
    """
    scores = scores.detach().float().cpu()
    dense = dense or not SKIPPING
    iterations, dilations = (int(snap[0]), tuple(int(d) for d in snap[1])) if snap and snap[0] else (0, ())
    reach = iterations * max(dilations) if iterations else 0
    # what a region's cut edge spoils spreads max(dilations) an iteration (its weights' own error lies within the
    # first iteration's reach): a halo that wide keeps it off the region's tiles
    halo = max(dilations) * iterations if iterations else 0
    geometry = _Geometry(tuple(scores.shape[1:]), size, reach, tile)
    owner = np.repeat(np.arange(len(spans)), [b - a for a, b in spans])
    classes = class_scores(scores, spans)
    tolerance = ROUNDING * max(1.0, float(scores.abs().max()))
    leader, margin, _ = _coarse_leaders(classes, scores, owner)

    # tiles where one query leads throughout the reach: the label is that query's class
    low_leader, high_leader = geometry.reduce(leader, "min"), geometry.reduce(leader, "max")
    lowest_margin = geometry.reduce(margin, "min")
    uniform = (low_leader == high_leader) & (lowest_margin > tolerance)
    uniform_label = owner[low_leader] + 1
    uniform_margin = lowest_margin - tolerance

    state = LabelState(scores, tuple(spans), tuple(tuple(n) for n in names), None, None,
                       (iterations, dilations) if iterations else ())
    reference = _reference_query(leader, scores.shape[0])
    reuse = None if dense else _reusable(previous, state, size)
    same = reuse is not None and _same_scores(previous, reuse, state, reference)
    # only classes added: only they are computed, against the winners kept
    typed = same and None in reuse and len(reuse) - reuse.count(None) == len(previous.names)
    # the same classes (a stroke): the winners' values stay where neither their class nor the reference changed;
    # where scores only rose, only the classes that rose are computed, against the winners kept
    same_classes = not same and reuse is not None and _same_classes(previous, reuse, state, reference)
    risen = same_classes and _only_risen(previous, state, reference)
    if reuse is None:
        # both are written whole: spare ones (mapped ahead while the features were read, or a replaced state's)
        labels = (spare or SpareArrays()).take(size, label_dtype(len(spans)), written_whole=True)
        margins = (spare or SpareArrays()).take(size, np.float16, written_whole=True)
        present = np.zeros((*geometry.shape, len(spans) + 1), bool)
        dirty = ~uniform if not dense else np.ones(geometry.shape, bool)
        fill = uniform & ~dirty if dense else uniform
    else:
        labels = (_copied(previous.labels, spare) if previous.labels.dtype == label_dtype(len(spans))
                  else previous.labels.astype(label_dtype(len(spans))))
        margins = _copied(previous.margins, spare)
    # the winners' values, where they are those of these scores (kept tiles only when the scores are the same)
    winners = (_copied(previous.winners, spare) if same or same_classes
               else (spare or SpareArrays()).take(size, np.float32))
    exact = previous.exact.copy() if same or same_classes else np.zeros(geometry.shape, bool)
    if same_classes:   # where a labelled class or the reference changed within reach, the values kept are stale
        rose, steady, rises = _changed_classes(previous, state, reference, geometry)
        known = exact & steady
        exact &= steady & ~np.any(previous.present[..., 1:] & rose, axis=-1)
    highest = _carried_highest(previous, reuse, state, reference, owner, geometry, typed, rises if risen else None)
    # scores only rose: a pixel whose winner's value kept is above the highest of every other class that rose keeps
    # its label, whatever its margin
    rescue = (winners, _highest_risen(state, reference, geometry, rose, known, tolerance, highest)) if risen else None
    previews = focus is not None and reuse is not None and not dense
    judge_rest = None
    fast = np.zeros(geometry.shape, bool)   # tiles where only the classes added are computed
    if typed:
        candidate, new_competing, new_gaps, present = _typed_tiles(previous, reuse, state, reference, geometry, labels,
                                                                   margins, winners, exact, tolerance)
        fill = uniform & candidate
        fast = candidate & ~uniform
        dirty = np.zeros(geometry.shape, bool)
    elif reuse is not None and previews:
        # tiles of one class throughout need no judging (their labels are known: a kept tile's are the same), and
        # the tiles around the focus are judged first, the others only once those are computed
        judge, check, present = _kept_tiles(previous, reuse, state, reference, geometry, labels, margins, tolerance,
                                            lazily=True, rescue=rescue)
        fill = uniform & check
        near = _around(focus, geometry, check & ~uniform)
        dirty = judge(near)
        judge_rest = (judge, check & ~uniform & ~near)
    elif reuse is not None:
        kept, dirty, present = _kept_tiles(previous, reuse, state, reference, geometry, labels, margins, tolerance,
                                           rescue=rescue)
        fill = uniform & ~kept
        dirty &= ~uniform
    if previews:  # filled tiles that held only their label already change nothing: no need to show them
        alone = np.take_along_axis(present, uniform_label[..., None], -1)[..., 0] & (present.sum(-1) == 1)
        fill_shown = fill & ~alone
    present[fill] = False
    present[(*np.nonzero(fill), uniform_label[fill])] = True
    _fill_tiles(labels, margins, fill, uniform_label, uniform_margin, geometry)
    exact[fill] = False

    def unjudged():
        return judge_rest[1] if judge_rest is not None else np.zeros(geometry.shape, bool)
    if previews and fill_shown.any():  # tiles of one class throughout are final already: shown at once
        yield 0, 1, _preview(labels, fill_shown, dirty | fast | unjudged(), geometry)
    rivals = None if dense else _rivals(scores)

    def plan(dirty, nearest_first: bool = False):
        """The tiles of ``dirty`` to compute, the regions covering them (nearest the focus first, if asked), the
        queries that can win in each tile, each tile's gap (see :func:`_competing_queries`) and the queries to compute
        in each region."""
        if dense:  # every query at every tile: the reference the skipping is tested against
            competing = np.ones((*geometry.shape, scores.shape[0]), bool)
            gaps = np.full(geometry.shape, np.inf, np.float32)
        else:
            competing, gaps = _competing_queries(scores, geometry, dirty, tolerance, rivals)
        if risen:
            competing, idle = _risen_competing(rose, present, known, dirty, owner, reference, competing)
            # no class that rose can win there: the labels and winners stay, the margins come within the gap
            _lower_margins(margins, np.where(idle, gaps, np.inf), geometry)
            dirty = dirty & ~idle
        regions = _regions(dirty, geometry, halo, scores.shape[0], dilations)
        if nearest_first:
            regions = _nearest_first(regions, focus)
        channels = [sorted({int(q) for ty, tx in tiles for q in np.flatnonzero(competing[ty, tx])} - {reference})
                    for _, tiles in regions]
        return dirty, regions, competing, gaps, channels

    dirty, regions, competing, gaps, channels = plan(dirty)
    total = max(1, sum(max(1, len(c)) for c in channels) * max(1, iterations))
    if judge_rest is not None:  # what the tiles not judged yet will take, roughly: in proportion
        total = max(total, int(total * (judge_rest[1].sum() + dirty.sum()) / max(1, dirty.sum())))
    if iterations:
        guide = guide.float().cpu()
        guide_rows, guide_cols = bilinear_taps(guide.shape[1], size[0]), bilinear_taps(guide.shape[2], size[1])
        if dense:
            affinities = None
        elif affinities is not None:
            affinities.start(_guide_identity(guide, size, dilations, geometry.tile), size, geometry.tile,
                             max(dilations), 8 * len(dilations))
    differences = scores - scores[reference : reference + 1]  # every query against the reference, which scores 0
    computed = int(dirty.sum()) + int(fast.sum())
    done = 0
    buffers = Buffers()
    snapping = (guide, guide_rows, guide_cols) if iterations else None
    if fast.any():   # classes added: their values against the winners kept, in the tiles where they can win
        fast_regions = _regions(fast, geometry, halo, scores.shape[0], dilations)
        if previews:
            fast_regions = _nearest_first(fast_regions, focus)
        fast_channels = [sorted({int(q) for ty, tx in tiles for q in np.flatnonzero(new_competing[ty, tx])})
                         for _, tiles in fast_regions]
        total = (total if regions else 0) + sum(max(1, len(c)) for c in fast_channels) * max(1, iterations)
        for (bounds, tiles), queries in zip(fast_regions, fast_channels):
            values, done = yield from _channels_near(tiles, bounds, queries, new_competing, differences, snapping,
                                                     geometry, halo, (iterations, dilations), (done, total),
                                                     affinities, buffers)
            _typed_label_tiles(values, tiles, new_gaps, owner, reference, reuse, geometry, labels, margins, winners,
                               exact, tolerance, present)
            _note_highest(highest, values, tiles, new_competing, state.spans, reference, geometry)
            exact[tuple(np.array(tiles).T)] = True
            del values
            buffers.give_back()
            done_here = np.zeros(geometry.shape, bool)
            done_here[tuple(np.array(tiles).T)] = True
            fast &= ~done_here
            if previews:
                yield min(done, total), total, _preview(labels, done_here, dirty | fast, geometry)
    while True:
        for (bounds, tiles), queries in zip(regions, channels):
            values, done = yield from _channels_near(tiles, bounds, queries, competing, differences, snapping,
                                                     geometry, halo, (iterations, dilations), (done, total),
                                                     affinities, buffers)
            if risen:
                _risen_label_tiles(values, tiles, competing, gaps, owner, reference, geometry, labels, margins,
                                   winners, exact, tolerance, present)
            else:
                _label_tiles(values, tiles, reference, gaps, owner, geometry, labels, margins, tolerance, present,
                             winners)
            _note_highest(highest, values, tiles, competing, state.spans, reference, geometry)
            del values
            buffers.give_back()
            done_here = np.zeros(geometry.shape, bool)
            done_here[tuple(np.array(tiles).T)] = True
            exact |= done_here
            if previews:
                dirty = dirty & ~done_here
                yield min(done, total), total, _preview(labels, done_here, dirty | unjudged(), geometry)
        if judge_rest is None:
            break
        judge, rest = judge_rest  # the tiles around the focus are done: now the others
        judge_rest = None
        dirty = judge(rest)
        if not dirty.any():
            break
        dirty, regions, competing, gaps, channels = plan(dirty, nearest_first=True)
        computed += int(dirty.sum())
        total = done + max(1, sum(max(1, len(c)) for c in channels) * max(1, iterations))
    buffers.release()
    state.labels, state.margins, state.present, state.winners, state.exact = labels, margins, present, winners, exact
    state.highest = highest
    state.computed = computed / dirty.size
    return state


def _fill_tiles(labels: np.ndarray, margins: np.ndarray, fill: np.ndarray, tile_labels: np.ndarray,
                tile_margins: np.ndarray, geometry: _Geometry) -> None:
    """Give each tile in ``fill`` its one label and margin (a float16 lower bound of it) throughout.

    The whole tiles by a compiled loop a row of a tile at a time, or without it in masked copies over rows of
    tiles, shared between PyTorch's number of threads: a Python loop over tiles cost 0.1 s per run at 4096 x 4096,
    half of re-opening a stored image, the masked copies 0.03-0.08 s, the compiled loop 0.02 s on one thread.
    The part tiles at the far edges one by one.
    """
    tile = geometry.tile
    whole_rows, whole_cols = geometry.size[0] // tile, geometry.size[1] // tile
    inside = fill[:whole_rows, :whole_cols]
    if inside.any():
        bounds = np.zeros(inside.shape, np.float16)
        bounds[inside] = lower_half(tile_margins[:whole_rows, :whole_cols][inside].astype(np.float32))
    if inside.any() and not compiled_labels.fill_tiles(labels, margins, inside, tile_labels[:whole_rows, :whole_cols],
                                                        bounds, tile):
        label_blocks, margin_blocks = _tile_blocks(labels, tile), _tile_blocks(margins, tile)

        def fill_rows(first: int, last: int) -> None:   # NumPy's copies let the other threads run
            where = inside[first:last, :, None, None]
            np.copyto(label_blocks[first:last], tile_labels[first:last, :whole_cols, None, None], where=where,
                      casting="unsafe")
            np.copyto(margin_blocks[first:last], bounds[first:last, :, None, None], where=where)

        compiled_snapping.shared_rows(fill_rows, 0, whole_rows, whole_cols * tile * tile)
    for ty, tx in zip(*np.nonzero(fill & ~_whole_mask(geometry))):
        rows, cols = geometry.tile_slices(ty, tx)
        labels[rows, cols] = tile_labels[ty, tx]
        margins[rows, cols] = lower_half(np.float32(tile_margins[ty, tx]))


def _preview(labels: np.ndarray, shown: np.ndarray, stale: np.ndarray, geometry: _Geometry) -> LabelsPreview:
    """The labels over the bounding box of the tiles ``shown``, final except in the ``stale`` tiles (still the
    previous run's)."""
    ys, xs = np.nonzero(shown)
    tile = geometry.tile
    first_y, last_y, first_x, last_x = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    box = (first_y * tile, min(last_y * tile, geometry.size[0]), first_x * tile, min(last_x * tile, geometry.size[1]))
    tiles_final = ~stale[first_y:last_y, first_x:last_x]
    final = np.empty((tiles_final.shape[0], tile, tiles_final.shape[1], tile), bool)
    final[...] = tiles_final[:, None, :, None]   # each tile's flag over its pixels (np.repeat holds the GIL)
    final = final.reshape(tiles_final.shape[0] * tile, -1)[: box[1] - box[0], : box[3] - box[2]]
    return LabelsPreview(box, labels[box[0] : box[1], box[2] : box[3]].copy(), final)


def _focus_box(focus: tuple) -> tuple[float, float, float, float]:
    """(top, bottom, left, right) of a focus: a box as it is, a point with FOCUS_SIDE around it."""
    if len(focus) == 4:
        return tuple(float(v) for v in focus)
    half = FOCUS_SIDE / 2
    return focus[0] - half, focus[0] + half, focus[1] - half, focus[1] + half


def _around(focus: tuple, geometry: _Geometry, dirty: np.ndarray) -> np.ndarray:
    """The dirty tiles that meet the focus box (clipped to the image)."""
    near = np.zeros(dirty.shape, bool)
    top, bottom, left, right = _focus_box(focus)
    rows = slice(max(0, int(top // geometry.tile)), max(0, int(-(-bottom // geometry.tile))))
    cols = slice(max(0, int(left // geometry.tile)), max(0, int(-(-right // geometry.tile))))
    near[rows, cols] = True
    return near & dirty


def _nearest_first(regions: list, focus: tuple) -> list:
    """``regions`` ordered by the distance of their tiles' box (halo left out) from the focus's centre."""
    top, bottom, left, right = _focus_box(focus)
    focus = ((top + bottom) / 2, (left + right) / 2)

    def distance(region):
        (top, bottom, left, right), _ = region
        dy = max(top - focus[0], 0.0, focus[0] - bottom)
        dx = max(left - focus[1], 0.0, focus[1] - right)
        return dy * dy + dx * dx
    return sorted(regions, key=distance)


def _channels_near(tiles, bounds, queries, competing: np.ndarray, differences: torch.Tensor, guide, geometry: _Geometry,
                   halo: int, snap: tuple, progress: tuple[int, int], kept: AffinityTiles | None = None,
                   buffers: Buffers | None = None):
    """Generator: each query's scores (relative to the reference) resized, and snapped when ``snap`` has
    iterations, around the tiles of ``tiles`` where it can win; yields (done, total) from ``progress``.

    Returns ({query: (values, their top, their left, (top, bottom, left, right) of the query's own tiles,
    where the values are exact)}, done). The guide's affinities are computed once for the region, or
    taken from ``kept`` where an earlier run computed them. Planes come from ``buffers``.
    """
    from .refine import _finish, _refine_padded, _replicate_border

    iterations, dilations = snap
    done, total = progress
    buffers = Buffers() if buffers is None else buffers
    size = geometry.size
    image = (0, size[0], 0, size[1])
    own_tiles = {q: [t for t in tiles if competing[t[0], t[1], q]] for q in queries}
    rectangles = {q: _rectangle(own_tiles[q], geometry, halo, bounds) for q in queries}
    # where each query's values are read: the tiles of ``tiles`` within its own tiles' box (see _class_planes)
    values_read = {q: _rectangle(own_tiles[q], geometry, 0, image) for q in queries}
    tile_array = np.array(tiles, np.int64).reshape(-1, 2)
    tile_starts = (geometry.tile_rows[tile_array[:, 0]], geometry.tile_cols[tile_array[:, 1]])
    affinity, area = None, None
    if iterations and rectangles:
        area = (min(r[0] for r in rectangles.values()), max(r[1] for r in rectangles.values()),
                min(r[2] for r in rectangles.values()), max(r[3] for r in rectangles.values()))
        compute, compute_into = _weight_makers(guide, size, dilations, buffers)
        affinity = compute(area) if kept is None else kept.region(area, compute, buffers.take, buffers.give_back,
                                                                  compute_into)
    values = {}
    for (top, bottom, left, right), group in _snapped_together(rectangles, size, snap):
        taps = tuple(t[top:bottom] for t in geometry.rows), tuple(t[left:right] for t in geometry.cols)
        cut = (top > 0, bottom < size[0], left > 0, right < size[1])  # sides inside the image
        source = differences[group]
        if iterations:  # resized straight into a padded buffer, snapped with a spare one
            pad = max(dilations)
            padded = buffers.take((len(group), bottom - top + 2 * pad, right - left + 2 * pad))
            upsample(source, *taps, out=padded[:, pad:-pad, pad:-pad])
            _replicate_border(padded, pad)
            spare = buffers.take(padded.shape)
            weights = affinity[:, top - area[0] : bottom - area[0], left - area[2] : right - area[2]]
            # each iteration leaves out the band next to the cut sides that no later one reads, and whatever lies
            # farther from the tiles whose values are read than the iterations left can carry
            read = np.zeros(len(tiles), bool)
            for q in group:
                read |= _within(tile_starts, values_read[q])
            needed = _needed_columns(tile_array[read], (top, bottom, left, right), geometry, iterations, pad)
            steps = _refine_padded(padded, spare, iterations, dilations, weights, cut, needed)
            for _ in range(iterations):
                next(steps)
                done += len(group)
                yield done, total
            channel = _finish(steps)
            buffers.give_back(spare if channel.untyped_storage().data_ptr() == padded.untyped_storage().data_ptr()
                              else padded)
        else:
            channel = upsample(source, *taps)
            done += len(group)
            yield done, total
        for number, q in enumerate(group):
            values[q] = (channel[number], top, left, values_read[q])
    if not rectangles:
        done += max(1, iterations)
        yield done, total
    return values, done


def _within(starts: tuple[np.ndarray, np.ndarray], box: tuple[int, int, int, int]) -> np.ndarray:
    """Which tiles (their first rows and columns) start within ``box`` (top, bottom, left, right)."""
    ys, xs = starts
    return (box[0] <= ys) & (ys < box[1]) & (box[2] <= xs) & (xs < box[3])


def _needed_columns(tiles, rectangle: tuple[int, int, int, int], geometry: _Geometry, iterations: int,
                    reach: int) -> np.ndarray:
    """(iterations + 1, rows, 2): the columns (first, last + 1) of each row of ``rectangle`` that snapping's
    iteration t must compute for the values of ``tiles`` to be exact: every pixel within (iterations - t) x ``reach``
    (max(dilations)) of a tile, the span of each row. Iteration t + 1 reads within ``reach`` of what it computes, so
    what each iteration needs holds what the next one reads; iteration 0 (the scores) needs them all."""
    top, bottom, left, right = rectangle
    needed = np.zeros((iterations + 1, bottom - top, 2), np.int64)
    needed[0, :, 1] = right - left
    tile = geometry.tile
    tiles = np.asarray(tiles, np.int64).reshape(-1, 2)
    hulls = {}
    for ty in np.unique(tiles[:, 0]):  # each row of tiles: its leftmost and rightmost tile
        columns = geometry.tile_cols[tiles[tiles[:, 0] == ty, 1]]
        hulls[int(ty)] = (int(columns.min()), int(columns.max()) + tile)
    for t in range(1, iterations + 1):
        widen = (iterations - t) * reach
        low = np.full(bottom - top, right - left, np.int64)
        high = np.zeros(bottom - top, np.int64)
        for ty, (first, last) in hulls.items():
            y = int(geometry.tile_rows[ty])
            rows = slice(max(0, y - widen - top), max(0, min(bottom, y + tile + widen) - top))
            np.minimum(low[rows], max(0, first - widen - left), out=low[rows])
            np.maximum(high[rows], min(right - left, last + widen - left), out=high[rows])
        needed[t, :, 0], needed[t, :, 1] = low, np.maximum(low, high)
    return needed


#: What snapping one pixel costs, roughly, for one iteration: reading its weights (once for every class snapped
#: together), and each class snapped there. Only their ratio matters: which classes share a pass.
PASS_COST_PER_PIXEL, CLASS_COST_PER_PIXEL = 2.6, 2.0


def _snapped_together(rectangles: dict, size: tuple[int, int], snap: tuple) -> list[tuple[tuple, list[int]]]:
    """[(rectangle, queries)]: the passes that snap each query over at least its rectangle, at most
    :data:`SNAPPED_TOGETHER` queries in one.

    A pass reads its rectangle's weights once for all its queries, and the weights are most of a pass's cost. Queries
    over the same rectangle share a pass; passes whose rectangles overlap then share one over both, where the
    estimated cost falls (the weights they both read, against the pixels each query then snaps beyond its own
    rectangle). A query's values are the same whatever the rectangle that holds its own."""
    iterations, dilations = snap
    together: dict[tuple, list[int]] = {}
    for q, rectangle in rectangles.items():
        together.setdefault(rectangle, []).append(q)
    passes = [(rectangle, queries[i : i + SNAPPED_TOGETHER]) for rectangle, queries in together.items()
              for i in range(0, len(queries), SNAPPED_TOGETHER)]
    if not iterations:
        return passes
    pad = max(dilations)

    def cost(rectangle, count):
        top, bottom, left, right = rectangle
        cut = (top > 0, bottom < size[0], left > 0, right < size[1])
        pixels = sum(max(0, bottom - top - t * pad * (cut[0] + cut[1])) * max(0, right - left - t * pad * (cut[2] + cut[3]))
                     for t in range(1, iterations + 1))
        return pixels * (PASS_COST_PER_PIXEL + CLASS_COST_PER_PIXEL * count)

    costs = [cost(rectangle, len(queries)) for rectangle, queries in passes]
    while True:
        best = None
        for i in range(len(passes)):
            for j in range(i + 1, len(passes)):
                count = len(passes[i][1]) + len(passes[j][1])
                if count > SNAPPED_TOGETHER:
                    continue
                a, c = passes[i][0], passes[j][0]
                box = (min(a[0], c[0]), max(a[1], c[1]), min(a[2], c[2]), max(a[3], c[3]))
                saving = costs[i] + costs[j] - cost(box, count)
                if saving > 0 and (best is None or saving > best[0]):
                    best = (saving, i, j, box)
        if best is None:
            return passes
        _, i, j, box = best
        merged = (box, passes[i][1] + passes[j][1])
        passes = [p for n, p in enumerate(passes) if n not in (i, j)] + [merged]
        costs = [c for n, c in enumerate(costs) if n not in (i, j)] + [cost(box, len(merged[1]))]


def _weight_makers(guide: tuple, size: tuple[int, int], dilations: tuple, buffers: Buffers):
    """How a region's snapping weights are made from ``guide`` (values, row taps, column taps) at ``size``:
    ``compute(rectangle)`` gives them (exact away from its sides inside the image), ``compute_into(rectangle, out)``
    writes exact ones into ``out``, from the guide with the image's own pixels around the rectangle."""
    from .refine import padded_affinities, pamr_affinities, repeat_sides

    guide_values, guide_rows, guide_cols = guide
    pad = max(dilations)

    def compute(rectangle):
        top, bottom, left, right = rectangle
        resized = upsample(guide_values, tuple(t[top:bottom] for t in guide_rows),
                           tuple(t[left:right] for t in guide_cols),
                           out=buffers.take((guide_values.shape[0], bottom - top, right - left)))
        weights = pamr_affinities(resized, dilations, buffers)
        buffers.give_back(resized)
        return weights

    def compute_into(rectangle, out):
        top, bottom, left, right = rectangle
        inside = (max(0, top - pad), min(size[0], bottom + pad), max(0, left - pad), min(size[1], right + pad))
        padded = buffers.take((guide_values.shape[0], bottom - top + 2 * pad, right - left + 2 * pad))
        y, x = pad - (top - inside[0]), pad - (left - inside[2])
        upsample(guide_values, tuple(t[inside[0] : inside[1]] for t in guide_rows),
                 tuple(t[inside[2] : inside[3]] for t in guide_cols),
                 out=padded[:, y : y + inside[1] - inside[0], x : x + inside[3] - inside[2]])
        repeat_sides(padded, y, padded.shape[1] - y - (inside[1] - inside[0]), x,
                     padded.shape[2] - x - (inside[3] - inside[2]))
        padded_affinities(padded, dilations, out, buffers)
        buffers.give_back(padded)
    return compute, compute_into


def weights_steps(affinities: AffinityTiles, guide: torch.Tensor, size: tuple[int, int], dilations: tuple,
                  tile: int = TILE):
    """Generator: the snapping weights of every tile of the image that no run has needed yet, kept in
    ``affinities`` (where they keep the image's whole, and were made from this ``guide``), a band of tile rows per
    step; yields (done, total) bands and returns the pixels computed. The weights are the ones a run computes, so a
    re-run that finds them gives the same labels, and stopping between steps loses nothing computed."""
    guide = guide.detach().float().cpu()
    if affinities.identity != _guide_identity(guide, size, dilations, tile):
        return 0
    rows = affinities.missing_tile_rows()
    if not rows:
        return 0
    buffers = Buffers()
    makers = _weight_makers((guide, bilinear_taps(guide.shape[1], size[0]), bilinear_taps(guide.shape[2], size[1])),
                            size, dilations, buffers)
    before = affinities.nbytes
    try:
        for done, row in enumerate(rows, 1):
            top = row * tile
            affinities.region((top, min(top + tile, size[0]), 0, size[1]), *makers[:1], buffers.take,
                              buffers.give_back, makers[1])
            buffers.give_back()
            yield done, len(rows)
    finally:
        buffers.release()
    return (affinities.nbytes - before) // (4 * max(1, affinities.planes))


def _guide_identity(guide: torch.Tensor, size, dilations: tuple, tile: int) -> tuple:
    """What snapping weights are made from: the guide's values, the output size, the dilations, the tiles."""
    import hashlib

    digest = hashlib.blake2b(guide.contiguous().numpy().tobytes(), digest_size=16).hexdigest()
    return digest, tuple(guide.shape), tuple(size), tuple(dilations), tile


def _reference_query(leader: np.ndarray, queries: int) -> int:
    """The query every other is resized and snapped relative to: the one leading most of the image, so that
    most boundaries (an object and the background) need a single channel."""
    return int(np.bincount(leader.ravel(), minlength=queries).argmax())


def _competing_queries(scores: torch.Tensor, geometry: _Geometry, dirty: np.ndarray, tolerance: float,
                       rivals: np.ndarray | None = None):
    """(tiles_y, tiles_x, Q) which queries can win somewhere in each tile, and (tiles_y, tiles_x) how far below
    the winner every other query stays at least.

    Resizing and snapping give every query the same convex weights, so a query's lead over another
    at any pixel is at most its highest lead within the tile's reach: a query below some other
    one throughout the reach (by more than rounding) cannot win there, and neither can it come
    within that other query's deficit of the winner. Each query is compared with ``rivals`` (all
    queries by default; :func:`_rivals` picks those that lead or come close somewhere, so that
    the work follows the classes seen rather than the square of those typed). A query left out
    is always below a rival that is kept (highest leads add up along a chain of queries below one
    another, and the chain ends at a kept one), which gives each tile its gap. Two passes over
    the rivals, so that memory stays one value per tile and query.
    """
    queries = scores.shape[0]
    competing = np.ones((*geometry.shape, queries), bool)
    gaps = np.full(geometry.shape, np.inf, np.float32)
    if queries == 1 or not dirty.any():
        return competing, gaps
    rivals = np.arange(queries) if rivals is None else rivals
    rows, cols = np.nonzero(dirty.any(1))[0], np.nonzero(dirty.any(0))[0]
    within = (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)  # only the dirty tiles matter
    values = np.ascontiguousarray(scores.numpy().transpose(1, 2, 0))               # (h, w, Q)

    near = np.ones((within[1] - within[0], within[3] - within[2], queries), bool)
    # the bounds of the first pass are kept for the second where they take little memory (one pass then)
    kept = {} if near.size * len(rivals) * 4 <= KEPT_BOUNDS_BYTES else None

    def highest(rival):  # (tiles_y, tiles_x, Q) within ``within``: the highest of (q - rival) in each tile's reach
        if kept is not None and rival in kept:
            return kept.pop(rival)
        bound = geometry.reduce(values - values[..., rival : rival + 1], "max", within)
        if kept is not None:
            kept[rival] = bound
        return bound
    for rival in rivals:
        near &= highest(rival) >= -tolerance
    below = np.full(near.shape, -np.inf, np.float32)   # each query's deficit to a kept rival
    for rival in rivals:
        below = np.maximum(below, np.where(near[..., rival : rival + 1], -highest(rival), -np.inf))
    competing[within[0] : within[1], within[2] : within[3]] = near
    gaps[within[0] : within[1], within[2] : within[3]] = np.where(near, np.inf, below).min(-1)
    return competing, gaps


#: Memory for the per-tile bounds of every rival at once (else they are computed again in a second pass).
KEPT_BOUNDS_BYTES = 64 << 20


def _rivals(scores: torch.Tensor, limit: int = 32) -> np.ndarray:
    """The queries among the best three somewhere at the working size, at most ``limit`` of them (those there
    most often): what a query is compared with to tell whether it can win."""
    top = scores.topk(min(3, scores.shape[0]), dim=0).indices.flatten()
    counts = torch.bincount(top, minlength=scores.shape[0])
    order = torch.argsort(counts, descending=True, stable=True)[: min(limit, int((counts > 0).sum()))]
    return np.sort(order.numpy())


def _rectangle(tiles, geometry: _Geometry, halo: int, bounds: tuple[int, int, int, int]):
    """(top, bottom, left, right): the tiles' bounding box with a halo, within ``bounds``."""
    top = int(geometry.tile_rows[min(y for y, _ in tiles)])
    bottom = int(geometry.tile_rows[max(y for y, _ in tiles)]) + geometry.tile
    left = int(geometry.tile_cols[min(x for _, x in tiles)])
    right = int(geometry.tile_cols[max(x for _, x in tiles)]) + geometry.tile
    return (max(bounds[0], top - halo), min(bounds[1], bottom + halo), max(bounds[2], left - halo),
            min(bounds[3], right + halo))


def _label_tiles(values: dict, tiles, reference: int, gaps: np.ndarray, owner: np.ndarray, geometry: _Geometry,
                 labels: np.ndarray, margins: np.ndarray, tolerance: float, present: np.ndarray,
                 winners: np.ndarray | None = None) -> None:
    """Labels, margins, winners' values and labels present of ``tiles`` from the queries computed there, relative to
    the reference query (which scores 0). ``values``: query -> (plane, its top, its left, (top, bottom, left, right)
    of the tiles where the query can win: where the plane's values are exact); a query has no say anywhere else."""
    if compiled_labels.label_tiles(values, tiles, owner, reference, present.shape[-1] - 1, gaps, geometry.tile, labels,
                                   margins, tolerance, present, winners):
        return  # the same values, compiled, tile by tile
    box = _TilesBox(tiles, geometry)
    block_labels, block_margins, block_winners = box.blocks(labels.dtype)
    for start, stop in box.row_steps(len(values) + 1):   # a few rows of tiles at a time: small planes, in the cache
        index, margin, best = _leaders_in(values, (box.top + start, box.top + stop), (box.left, box.right), reference,
                                          owner)
        margin = box.within_gap(margin, gaps, start, stop)
        block_labels[start:stop] = index
        block_margins[start:stop] = _half_below(margin.sub_(tolerance))
        block_winners[start:stop] = best.numpy()
    box.store(present, block_labels, ((labels, block_labels), (margins, block_margins), (winners, block_winners)))


class _TilesBox:
    """The bounding box of some tiles, worked on a few rows of tiles at a time and stored back tile by tile."""

    def __init__(self, tiles, geometry: _Geometry):
        self.tiles, self.geometry, tile = tiles, geometry, geometry.tile
        self.first_y, last_y = min(y for y, _ in tiles), max(y for y, _ in tiles)
        self.first_x, self.last_x = min(x for _, x in tiles), max(x for _, x in tiles)
        self.last_y = last_y
        self.top, self.left = int(geometry.tile_rows[self.first_y]), int(geometry.tile_cols[self.first_x])
        self.bottom = min(int(geometry.tile_rows[last_y]) + tile, geometry.size[0])
        self.right = min(int(geometry.tile_cols[self.last_x]) + tile, geometry.size[1])
        self.shape = (self.bottom - self.top, self.right - self.left)

    def row_steps(self, planes: int):
        """(start, stop) rows of the box, whole rows of tiles holding about LABELLED_AT_ONCE_BYTES of ``planes``."""
        tile = self.geometry.tile
        step = max(1, LABELLED_AT_ONCE_BYTES // (4 * self.shape[1] * planes) // tile) * tile
        return [(start, min(start + step, self.shape[0])) for start in range(0, self.shape[0], step)]

    def blocks(self, label_type) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Empty labels, margins (float16) and winners' values (float32) over the box."""
        return (np.empty(self.shape, label_type), np.empty(self.shape, np.float16),
                np.empty(self.shape, np.float32))

    def per_pixel(self, tiles: np.ndarray, start: int, stop: int) -> torch.Tensor:
        """Each pixel of rows ``start:stop`` of the box, its tile's value of ``tiles`` (tiles_y, tiles_x)."""
        tile = self.geometry.tile
        values = np.ascontiguousarray(tiles[self.first_y + start // tile : self.first_y + -(-stop // tile),
                                            self.first_x : self.last_x + 1])
        expanded = torch.from_numpy(values).repeat_interleave(tile, 0).repeat_interleave(tile, 1)
        return expanded[: stop - start, : self.shape[1]]

    def within_gap(self, margin: torch.Tensor, gaps: np.ndarray, start: int, stop: int) -> torch.Tensor:
        """``margin`` over rows ``start:stop`` of the box, at most each tile's gap."""
        tile = self.geometry.tile
        gap = gaps[self.first_y + start // tile : self.first_y + -(-stop // tile), self.first_x : self.last_x + 1]
        if not np.isfinite(gap).any():
            return margin
        gap = torch.from_numpy(np.ascontiguousarray(gap)).repeat_interleave(tile, 0).repeat_interleave(tile, 1)
        return torch.minimum(margin, gap[: stop - start, : self.shape[1]])

    def store(self, present: np.ndarray, block_labels: np.ndarray, pairs) -> None:
        """Which labels occur in each tile, and each (array, block) pair's values of the tiles (an array None is left
        out)."""
        tile, shape = self.geometry.tile, self.shape
        rows, across = self.last_y - self.first_y + 1, self.last_x - self.first_x + 1
        occurs = np.zeros((rows, across, present.shape[-1]), bool)
        if not compiled_labels.labels_present(block_labels, tile, occurs):
            # each label that occurs in the box, compared over the box's tiles at once (edge tiles padded with their
            # own values): a tenth of the time of one count over (tile, label) codes
            padded = np.pad(block_labels, ((0, rows * tile - shape[0]), (0, across * tile - shape[1])), mode="edge")
            grid = padded.reshape(rows, tile, across, tile)
            for label in np.flatnonzero(np.bincount(block_labels.ravel(), minlength=present.shape[-1])):
                occurs[..., label] = (grid == label).any(axis=(1, 3))
        ys, xs = np.array(self.tiles).reshape(-1, 2).T
        present[ys, xs] = occurs[ys - self.first_y, xs - self.first_x]
        if len(self.tiles) == rows * across:   # every tile of the box: one copy of the box per array
            for array, block in pairs:
                if array is not None:
                    array[self.top : self.bottom, self.left : self.right] = block
            return
        # the whole tiles in one copy per array (a loop over them cost 0.15 s per region of a thousand tiles); the
        # part tiles at the image's far edges one by one
        whole = (ys < self.geometry.size[0] // tile) & (xs < self.geometry.size[1] // tile)
        for array, block in pairs:
            if array is not None and whole.any():
                _tile_blocks(array, tile)[ys[whole], xs[whole]] = _tile_blocks(block, tile)[
                    ys[whole] - self.first_y, xs[whole] - self.first_x]
        for ty, tx in zip(ys[~whole], xs[~whole]):
            rows_, cols = self.geometry.tile_slices(ty, tx)
            inner = (slice(rows_.start - self.top, rows_.stop - self.top),
                     slice(cols.start - self.left, cols.stop - self.left))
            for array, block in pairs:
                if array is not None:
                    array[rows_, cols] = block[inner]


#: Bytes of scores labelled at a time (a few rows of tiles).
LABELLED_AT_ONCE_BYTES = 1 << 22


def _class_planes(values: dict, rows: tuple[int, int], cols: tuple[int, int], owner: np.ndarray,
                  by_class: dict | None = None) -> dict:
    """{class: its queries' planes} over ``rows`` x ``cols`` from ``values`` (see :func:`_label_tiles`), a query -inf
    beyond where it can win, added to ``by_class``."""
    (top, bottom), (left, right) = rows, cols
    shape = (bottom - top, right - left)
    by_class = {} if by_class is None else by_class
    for query in sorted(values):
        plane, plane_top, plane_left, (exact_top, exact_bottom, exact_left, exact_right) = values[query]
        inside = slice(max(top, exact_top), min(bottom, exact_bottom))
        across = slice(max(left, exact_left), min(right, exact_right))
        if inside.start >= inside.stop or across.start >= across.stop:
            continue   # the query has no say in these rows
        exact = plane[inside.start - plane_top : inside.stop - plane_top,
                      across.start - plane_left : across.stop - plane_left]
        if exact.shape != shape:  # the query has no say beyond the tiles where it can win
            padded = torch.full(shape, float("-inf"))
            padded[inside.start - top : inside.stop - top, across.start - left : across.stop - left] = exact
            exact = padded
        by_class.setdefault(int(owner[query]), []).append(exact)
    return by_class


def _best_of(parts: list) -> torch.Tensor:
    """A class's value: the highest of its queries'."""
    return parts[0] if len(parts) == 1 else torch.stack(parts).amax(0)


def _leaders_in(values: dict, rows: tuple[int, int], cols: tuple[int, int], reference: int, owner: np.ndarray):
    """(labels, margins, the winners' values) over ``rows`` x ``cols`` of the image from the queries' planes in
    ``values`` (see :func:`_label_tiles`): each class's best query, the reference scoring 0, a query -inf beyond
    where it can win."""
    shape = (rows[1] - rows[0], cols[1] - cols[0])
    by_class = _class_planes(values, rows, cols, owner, {int(owner[reference]): [torch.zeros(shape)]})
    order = sorted(by_class)
    index, margin, best = _leaders(torch.stack([_best_of(by_class[k]) for k in order]))
    if order == list(range(len(order))):
        return index.numpy(), margin, best
    lookup = torch.tensor(order, dtype=torch.int32) + 1
    return lookup[index - 1].numpy(), margin, best


def _same_scores(previous: LabelState, mapping: list, state: LabelState, reference: int) -> bool:
    """Whether the classes kept from the previous run keep their order and their very scores, with the same reference
    query: the previous run's values of its winners then hold in this run too, wherever its labels are kept (a
    pixel of a class removed is recomputed)."""
    if previous.winners is None or previous.exact is None:
        return False
    kept = [old for old in mapping if old is not None]
    if kept != sorted(kept):
        return False
    if not _same_reference(previous, mapping, state, reference):
        return False
    for new, old in enumerate(mapping):
        if old is not None:
            (a, b), (c, d) = state.spans[new], previous.spans[old]
            if b - a != d - c or not torch.equal(state.scores[a:b], previous.scores[c:d]):
                return False
    return True


def _highest_risen(state: LabelState, reference: int, geometry: _Geometry, rose: np.ndarray, known: np.ndarray,
                   tolerance: float, bounds: np.ndarray | None = None) -> np.ndarray:
    """(tiles_y, tiles_x, classes + 1): for a pixel labelled w in each tile, the highest value any other class that
    rose there can take (relative to the reference query, plus a rounding bound); inf where the winners' values are
    not kept, -inf where no other class rose.

    Resizing and snapping give a class at most its highest coarse score within reach, so a winner whose value kept
    (its class never fell) is above that keeps its label however the others rose. ``bounds`` (tiles_y, tiles_x,
    classes; see :func:`_carried_highest`) can be lower: a class's highest value in the tile before, plus its rise.
    """
    classes = len(state.spans)
    highest = np.full((classes, *geometry.shape), -np.inf, np.float32)
    for klass, (a, b) in enumerate(state.spans):
        if rose[..., klass].any():
            coarse = geometry.reduce((state.scores[a:b] - state.scores[reference]).amax(0).numpy(), "max")
            if bounds is not None:
                coarse = np.minimum(coarse, bounds[..., klass])
            highest[klass] = np.where(rose[..., klass], coarse + 2 * tolerance, -np.inf)
    order = np.argsort(-highest, axis=0, kind="stable")
    first = np.take_along_axis(highest, order[:1], 0)[0]
    second = np.take_along_axis(highest, order[1:2], 0)[0] if classes > 1 else np.full(geometry.shape, -np.inf)
    out = np.full((*geometry.shape, classes + 1), np.inf, np.float32)
    for w in range(classes):   # the best class but w
        out[..., w + 1] = np.where(order[0] == w, second, first)
    out[~known] = np.inf
    return out


def _carried_highest(previous: LabelState | None, mapping: list | None, state: LabelState, reference: int,
                     owner: np.ndarray, geometry: _Geometry, typed: bool, rises: np.ndarray | None) -> np.ndarray:
    """(tiles_y, tiles_x, classes): each class's highest value over each tile's pixels in this run, at most (relative
    to the reference query; inf where not known), from the previous run's.

    Resizing and snapping give each pixel a convex combination of the coarse scores within its reach, so a class
    whose scores rose by at most r within a tile's reach (``rises``, scores that only rose with the same reference)
    gains at most r at any pixel of the tile; classes whose scores are the very same (``typed``: classes only added)
    keep their values. The reference query scores 0: a class of that query alone is 0 throughout. Rounding is left to
    the use (see :func:`_highest_risen`)."""
    highest = np.full((*geometry.shape, len(state.spans)), np.inf, np.float32)
    carried = previous is not None and previous.highest is not None and previous.highest.shape[:2] == geometry.shape
    if carried and typed:
        for new, old in enumerate(mapping):
            if old is not None:
                highest[..., new] = previous.highest[..., old]
    elif carried and rises is not None and previous.highest.shape == highest.shape:
        highest = previous.highest + rises
    ref_class = int(owner[reference])
    if state.spans[ref_class] == (reference, reference + 1):
        highest[..., ref_class] = 0.0
    return highest


def _note_highest(highest: np.ndarray, values: dict, tiles, competing: np.ndarray, spans, reference: int,
                  geometry: _Geometry) -> None:
    """Record in ``highest`` (see :func:`_carried_highest`), for each tile of ``tiles``, the highest value of each
    class every query of which was computed there (``competing``; the reference query scores 0), from ``values``
    (see :func:`_label_tiles`)."""
    tile = geometry.tile
    ys, xs = np.array(tiles).reshape(-1, 2).T
    maxima = {}
    for query, (plane, plane_top, plane_left, (top, bottom, left, right)) in values.items():
        block = plane[top - plane_top : bottom - plane_top, left - plane_left : right - plane_left]
        height, width = block.shape
        if height % tile or width % tile:  # a part tile at the image's far edges: its own pixels alone
            block = torch.nn.functional.pad(block[None], (0, -width % tile, 0, -height % tile),
                                            value=float("-inf"))[0]
        rows, cols = block.shape[0] // tile, block.shape[1] // tile
        maxima[query] = (block.reshape(rows, tile, cols, tile).amax((1, 3)).numpy(), top // tile, left // tile)
    for klass, (a, b) in enumerate(spans):
        known = np.ones(len(ys), bool)
        best = np.full(len(ys), 0.0 if a <= reference < b else -np.inf, np.float32)
        for query in range(a, b):
            if query == reference:
                continue
            if query not in maxima:
                known[:] = False
                break
            table, first_y, first_x = maxima[query]
            inside = competing[ys, xs, query]
            known &= inside
            values_here = np.full(len(ys), -np.inf, np.float32)
            values_here[inside] = table[ys[inside] - first_y, xs[inside] - first_x]
            best = np.maximum(best, values_here)
        highest[ys[known], xs[known], klass] = best[known]


def _same_classes(previous: LabelState, mapping: list, state: LabelState, reference: int) -> bool:
    """Whether this run has the previous run's classes, queries and reference query, in their order, and the previous
    run kept its winners' values."""
    if previous.winners is None or previous.exact is None or len(mapping) != len(previous.names):
        return False
    if mapping != list(range(len(mapping))) or tuple(state.spans) != tuple(previous.spans):
        return False
    return _same_reference(previous, mapping, state, reference)


def _only_risen(previous: LabelState, state: LabelState, reference: int) -> bool:
    """Whether, the classes being the same, the reference query kept its very scores and every other query's scores
    are at least as high as before (what a stroke does with edge snapping): a pixel's new label is then its previous
    winner or a class that rose, and only those need computing."""
    delta = state.scores - previous.scores
    return bool((delta >= 0).all()) and not bool(delta[reference].any())


def _changed_classes(previous: LabelState, state: LabelState, reference: int,
                     geometry: _Geometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tiles_y, tiles_x, classes) which classes have a query whose scores changed within each tile's reach,
    (tiles_y, tiles_x) where the reference query's did not, and (tiles_y, tiles_x, classes) the largest change of
    each class's queries within each tile's reach."""
    delta = (state.scores - previous.scores).abs_().numpy()
    most = np.zeros((*geometry.shape, len(state.spans)), np.float32)
    for klass, (a, b) in enumerate(state.spans):
        moved = delta[a:b].max(0)
        if moved.any():
            most[..., klass] = geometry.reduce(moved, "max")
    steady = ~(geometry.reduce(delta[reference], "max") > 0) if delta[reference].any() else \
        np.ones(geometry.shape, bool)
    return most > 0, steady, most


def _risen_competing(rose: np.ndarray, present: np.ndarray, known: np.ndarray, dirty: np.ndarray, owner: np.ndarray,
                     reference: int, can_win: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For a run where scores only rose: (tiles_y, tiles_x, Q) the queries to compute in each dirty tile, and the
    dirty tiles where nothing needs computing.

    Computed: every query of the classes that rose and can win there (``can_win``, see :func:`_competing_queries`),
    and where there are such, of the classes labelled there where the previous run left no winners' values
    (``known``: where it did). Where no class that rose can win, nothing is. The reference query scores 0 and is
    never computed; its class's other queries are."""
    classes = len(rose[0, 0]) if rose.ndim == 3 else 0
    winning = np.stack([can_win[..., owner == klass].any(-1) for klass in range(classes)], -1)
    rising = rose & winning & dirty[..., None]
    some = rising.any(-1)
    needed = rising | (~known[..., None] & present[..., 1:] & some[..., None])
    competing = needed[..., owner]
    competing[..., reference] = False
    return competing, dirty & ~some


def _risen_label_tiles(values: dict, tiles, competing: np.ndarray, gaps: np.ndarray, owner: np.ndarray, reference: int,
                       geometry: _Geometry, labels: np.ndarray, margins: np.ndarray, winners: np.ndarray,
                       exact: np.ndarray, tolerance: float, present: np.ndarray) -> None:
    """Labels, margins, winners' values and labels present of ``tiles`` in a run where scores only rose (see
    :func:`_only_risen`): each pixel's previous winner against the classes computed there, the first class winning
    ties as argmax does. The winner's value is its class's value in ``values`` where that class was computed (it may
    have risen), else the one ``winners`` keeps. A class not computed either kept its scores, so it stays below the
    previous winner's value by the pixel's margin at least (and the winner's value never fell), or rose but cannot
    win there, and stays below the winner by the tile's gap at least."""
    box = _TilesBox(tiles, geometry)
    ref_class = int(owner[reference])
    # the reference class's value is exact where its other queries are computed (alone, it scores 0 everywhere)
    synonyms = [q for q in np.flatnonzero(owner == ref_class) if q != reference]
    ref_needed = competing[..., synonyms].all(-1) if synonyms else np.ones(competing.shape[:2], bool)
    every = np.ones(present.shape[-1] - 1, bool)
    if compiled_labels.challenge_tiles(values, tiles, owner, reference, len(every), gaps, geometry.tile, labels, margins,
                                       winners, tolerance, present, every, every, np.zeros(geometry.shape, bool), True,
                                       ref_needed):
        exact[tuple(np.array(tiles).T)] = True
        return  # the same values, compiled, tile by tile
    block_labels, block_margins, block_winners = box.blocks(labels.dtype)
    for start, stop in box.row_steps(len(values) + 4):
        rows, cols = slice(box.top + start, box.top + stop), slice(box.left, box.right)
        shape = (stop - start, box.shape[1])
        planes = _class_planes(values, (rows.start, rows.stop), (box.left, box.right), owner,
                               {ref_class: [torch.zeros(shape)]})
        value_of = {klass: _best_of(parts) for klass, parts in planes.items()}
        # with synonyms, the reference class is known only where they are computed: elsewhere 0 may be below its best
        value_of[ref_class] = torch.where(box.per_pixel(ref_needed, start, stop), value_of[ref_class], float("-inf"))
        label = torch.from_numpy(labels[rows, cols].astype(np.int32))
        own = torch.full(shape, float("-inf"))
        for klass, value in value_of.items():
            own = torch.where(label == klass + 1, value, own)
        best = torch.where(torch.isfinite(own), own, torch.from_numpy(winners[rows, cols].copy()))
        second = best - torch.from_numpy(margins[rows, cols].astype(np.float32))
        previous_label = label
        for klass in sorted(value_of):
            number = torch.tensor(klass + 1, dtype=torch.int32)
            value = torch.where(previous_label == number, float("-inf"), value_of[klass])
            wins = (value > best) | ((value == best) & (label > number))
            second = torch.maximum(second, torch.where(wins, best, value))
            best = torch.where(wins, value, best)
            label = torch.where(wins, number, label)
        block_labels[start:stop] = label.numpy()
        block_margins[start:stop] = _half_below(box.within_gap(best - second, gaps, start, stop).sub_(tolerance))
        block_winners[start:stop] = best.numpy()
    box.store(present, block_labels, ((labels, block_labels), (margins, block_margins), (winners, block_winners)))
    exact[tuple(np.array(tiles).T)] = True


def _typed_tiles(previous: LabelState, mapping: list, state: LabelState, reference: int, geometry: _Geometry,
                 labels: np.ndarray, margins: np.ndarray, winners: np.ndarray, exact: np.ndarray, tolerance: float):
    """For a run that only adds classes to the previous one (see :func:`_same_scores`): (tiles where a new class
    can win somewhere, (tiles_y, tiles_x, Q) the new queries that can win in each tile, each tile's gap (how far
    below the winner the new classes that cannot win there stay at least), labels present renumbered).

    A new class cannot win in a tile where some earlier class leads it throughout the tile's reach (the winner
    is at least that class), nor where its highest score within the reach stays below the lowest of the winners'
    values kept there. Either bound is also how far the winner leads it there: the margins of the tiles where no
    new class can win are lowered to it, in place. ``labels`` (a copy of the previous run's) is renumbered in place.
    """
    old_to_new = np.zeros(len(previous.names) + 1, dtype=np.int32)
    for new, old in enumerate(mapping):
        if old is not None:
            old_to_new[old + 1] = new + 1
    if not np.array_equal(old_to_new, np.arange(len(old_to_new))):
        labels[...] = old_to_new[labels]
    present = np.zeros((*geometry.shape, len(state.names) + 1), bool)
    present[..., old_to_new] = previous.present
    kept = [new for new, old in enumerate(mapping) if old is not None]
    competing = np.zeros((*geometry.shape, state.scores.shape[0]), bool)
    gaps = np.full(geometry.shape, np.inf, np.float32)
    lowest_winner = _lowest_winners(state, reference, geometry, present, winners, exact, tolerance)
    for n, leads in _newcomer_leads(state, mapping, kept, geometry).items():
        a, b = state.spans[n]
        highest = geometry.reduce((state.scores[a:b] - state.scores[reference]).amax(0).numpy(), "max")
        # the best earlier class's lowest lead over n, or the winners' lowest value over n's highest
        beaten = np.maximum(np.max(list(leads.values()), axis=0), lowest_winner - highest)
        can_win = ~(beaten > 2 * tolerance)             # snapped leads are the coarse ones less rounding at most
        competing[..., a:b] = can_win[..., None]
        gaps = np.where(can_win, gaps, np.minimum(gaps, beaten - 2 * tolerance)).astype(np.float32)
    candidate = competing.any(-1)
    _lower_margins(margins, np.where(candidate, np.inf, gaps), geometry)
    # where the winners' values are not kept, they are computed again: each pixel's own class's value
    unknown = candidate & ~exact
    for klass in kept:
        a, b = state.spans[klass]
        competing[..., a:b] |= (unknown & present[..., klass + 1])[..., None]
    competing[..., reference] = False   # the reference scores 0
    return candidate, competing, gaps, present


def _lowest_winners(state: LabelState, reference: int, geometry: _Geometry, present: np.ndarray,
                    winners: np.ndarray, exact: np.ndarray, tolerance: float) -> np.ndarray:
    """(tiles_y, tiles_x) a lower bound of the winners' values in each tile: their lowest where they are kept,
    else the lowest of the classes labelled there, each at least its best query's lowest score within reach."""
    lowest = np.full(geometry.shape, np.inf, np.float32)
    for klass, (a, b) in enumerate(state.spans):
        here = present[..., klass + 1]
        if here.any():
            floor = np.max([geometry.reduce((state.scores[q] - state.scores[reference]).numpy(), "min")
                            for q in range(a, b)], axis=0)
            lowest = np.where(here, np.minimum(lowest, floor - tolerance), lowest)
    whole = exact & _whole_mask(geometry)
    if whole.any():
        inside = whole[: geometry.size[0] // geometry.tile, : geometry.size[1] // geometry.tile]
        # every whole tile's lowest at once (torch's reduction is vectorised and reads the blocks where they are;
        # NumPy's on the tiles picked copied them first), then those picked
        minima = torch.from_numpy(_tile_blocks(winners, geometry.tile)).amin(dim=(2, 3)).numpy()
        lowest[whole] = np.maximum(lowest[whole], minima[inside])
    for ty, tx in zip(*np.nonzero(exact & ~whole)):
        rows, cols = geometry.tile_slices(ty, tx)
        lowest[ty, tx] = max(lowest[ty, tx], winners[rows, cols].min())
    return lowest


def _lower_margins(margins: np.ndarray, bounds: np.ndarray, geometry: _Geometry) -> None:
    """Each tile's margins at most its value of ``bounds`` (tiles_y, tiles_x; inf: unchanged), in place."""
    finite = np.isfinite(bounds)
    if not finite.any():
        return
    halves = np.full(bounds.shape, np.inf, np.float16)
    halves[finite] = lower_half(bounds[finite].astype(np.float32))
    whole = finite & _whole_mask(geometry)
    rows, cols = geometry.size[0] // geometry.tile, geometry.size[1] // geometry.tile
    if whole.any():   # every whole tile in one operation (torch's float16 minimum is vectorised, NumPy's is not)
        blocks = torch.from_numpy(_tile_blocks(margins, geometry.tile))
        torch.minimum(blocks, torch.from_numpy(halves[:rows, :cols, None, None]), out=blocks)
    for ty, tx in zip(*np.nonzero(finite & ~whole)):   # the part tiles at the far edges
        part = geometry.tile_slices(ty, tx)
        np.minimum(margins[part], halves[ty, tx], out=margins[part])


def _typed_label_tiles(values: dict, tiles, gaps: np.ndarray, owner: np.ndarray, reference: int, mapping: list,
                       geometry: _Geometry, labels: np.ndarray, margins: np.ndarray, winners: np.ndarray,
                       exact: np.ndarray, tolerance: float, present: np.ndarray) -> None:
    """Labels, margins, winners' values and labels present of ``tiles`` in a run that only adds classes: each
    pixel's previous winner against the new classes' values in ``values`` (see :func:`_label_tiles`), the first
    class winning ties as argmax does. The winner's value is the one ``winners`` keeps in the ``exact`` tiles, else
    its own class's value in ``values``; the previous runner-up stays below it by the pixel's margin at least."""
    added = np.array([old is None for old in mapping])
    if compiled_labels.challenge_tiles(values, tiles, owner, reference, len(mapping), gaps, geometry.tile, labels,
                                       margins, winners, tolerance, present, added, ~added, exact, False,
                                       np.ones(geometry.shape, bool)):
        return  # the same values, compiled, tile by tile
    box = _TilesBox(tiles, geometry)
    block_labels, block_margins, block_winners = box.blocks(labels.dtype)
    for start, stop in box.row_steps(len(values) + 4):
        rows, cols = slice(box.top + start, box.top + stop), slice(box.left, box.right)
        shape = (stop - start, box.shape[1])
        label = torch.from_numpy(labels[rows, cols].astype(np.int32))
        planes = _class_planes(values, (rows.start, rows.stop), (box.left, box.right), owner,
                               {int(owner[reference]): [torch.zeros(shape)]})
        kept = box.per_pixel(exact, start, stop)
        best = torch.from_numpy(winners[rows, cols].copy())
        if not bool(kept.all()):
            own = torch.full(shape, float("-inf"))
            for klass in planes:
                if mapping[klass] is not None:
                    own = torch.where(label == klass + 1, _best_of(planes[klass]), own)
            best = torch.where(kept, best, own)
        second = best - torch.from_numpy(margins[rows, cols].astype(np.float32))
        for klass in sorted(k for k in planes if mapping[k] is None):
            value, number = _best_of(planes[klass]), torch.tensor(klass + 1, dtype=torch.int32)
            wins = (value > best) | ((value == best) & (label > number))
            second = torch.maximum(second, torch.where(wins, best, value))
            best = torch.where(wins, value, best)
            label = torch.where(wins, number, label)
        margin = box.within_gap(best - second, gaps, start, stop)
        block_labels[start:stop] = label.numpy()
        block_margins[start:stop] = _half_below(margin.sub_(tolerance))
        block_winners[start:stop] = best.numpy()
    box.store(present, block_labels, ((labels, block_labels), (margins, block_margins), (winners, block_winners)))


def _reusable(previous: LabelState | None, state: LabelState, size) -> list | None:
    """For each class now, its index in ``previous`` (None: new), or None when nothing can be reused."""
    if previous is None or previous.labels is None or previous.labels.shape != tuple(size):
        return None
    if previous.scores.shape[1:] != state.scores.shape[1:] or previous.snap != state.snap:
        return None
    old = {name: index for index, name in enumerate(previous.names)}
    mapping = [old.get(name) for name in state.names]
    if all(m is None for m in mapping):
        return None
    return mapping


def _kept_tiles(previous: LabelState, mapping: list, state: LabelState, reference: int,
                geometry: _Geometry, labels: np.ndarray, margins: np.ndarray, tolerance: float, lazily: bool = False,
                rescue: tuple | None = None):
    """Which tiles keep the previous labels (renumbered to the new classes), which must be recomputed, and
    which labels occur in each tile (renumbered). ``labels`` (a copy of the previous run's) is renumbered in place.
    ``lazily``: instead (judge, tiles that need judging, labels present), where ``judge(within)`` gives which of
    the tiles ``within`` must be recomputed, so that some tiles are judged (and computed) before the others.

    Only tiles holding a label whose pixels might change are looked at pixel by pixel. A pixel keeps its label
    without a look at its margin only where a fresh run would repeat the previous run's arithmetic there (see
    :func:`_same_arithmetic`); anywhere else a near tie, which rounding may settle either way, is recomputed.
    ``rescue`` (winners' values, (tiles_y, tiles_x, labels) the value above which a pixel's winner keeps its label):
    a pixel also keeps its label where its winner's value kept is above that (see :func:`_highest_risen`).
    """
    n_new, n_old = len(state.names), len(previous.names)
    old_to_new = np.zeros(n_old + 1, dtype=np.int32)  # 0: a class that is gone
    for new, old in enumerate(mapping):
        if old is not None:
            old_to_new[old + 1] = new + 1
    if not np.array_equal(old_to_new, np.arange(n_old + 1)):  # classes renumbered or gone
        labels[...] = old_to_new[labels]
    present = np.zeros((*geometry.shape, n_new + 1), bool)
    for old, new in enumerate(old_to_new):
        present[..., new] |= previous.present[..., old]
    falls, rises = {}, {}   # per kept class: its scores' largest fall and rise within each tile's reach
    for new, old in enumerate(mapping):
        if old is None:
            continue
        a, b = state.spans[new]
        c, _ = previous.spans[old]
        delta = (state.scores[a:b] - previous.scores[c : c + b - a]).numpy()
        falls[new] = geometry.reduce(delta.min(0), "min")
        rises[new] = geometry.reduce(delta.max(0), "max")
    kept = sorted(falls)
    leads = _newcomer_leads(state, mapping, kept, geometry)
    exact = _same_arithmetic(previous, mapping, state, reference, geometry)

    # threshold[ty, tx, w]: a pixel labelled w keeps its label if its margin exceeds this; a kept pixel's
    # margin then becomes margin - shrink[w], and at most lead[w, n] or that plus other[w, n] for a new class n
    threshold = np.full((*geometry.shape, n_new + 1), np.inf)  # label 0: its class is gone
    shrinks = np.zeros((*geometry.shape, n_new + 1), np.float32)
    new_leads = np.full((len(leads), *geometry.shape, n_new + 1), -np.inf, np.float32)
    new_others = np.full((len(leads), *geometry.shape, n_new + 1), -np.inf, np.float32)
    for w in kept:
        others = [rises[c] for c in rises if c != w]
        rise = np.max(others, axis=0) if others else np.zeros(geometry.shape)
        monotone = (falls[w] >= 0) & (rise <= 0)
        # how much w's lead over any other kept class can have shrunk (0: w only rose, the others only fell)
        shrink = np.where(monotone, 0.0, rise - falls[w])
        shrinks[..., w + 1] = shrink
        # w only rose and the others only fell, in the very arithmetic of the previous run (rounding is monotone
        # too): every pixel labelled w keeps it, ties included
        needed = np.where(monotone & exact[w], -np.inf, shrink + tolerance)
        for i, lead in enumerate(leads.values()):
            # w beats the new class n at a pixel when its own lowest lead over n is positive there, or when
            # (w over another class c) + (c over n) is: margin - shrink + lead[c] > 0
            best_other = np.max([lead[c] for c in kept if c != w], axis=0) if len(kept) > 1 else np.full(
                geometry.shape, -np.inf)
            against_new = np.where(lead[w] > 2 * tolerance, -np.inf, shrink + 2 * tolerance - best_other)
            needed = np.maximum(needed, against_new)
            new_leads[i, ..., w + 1], new_others[i, ..., w + 1] = lead[w], best_other
        threshold[..., w + 1] = needed

    # tiles holding a label whose pixels might change (label 0, a class gone, never stays), or whose margins a
    # new class may lower (below what the new class trails by, when no other class bridges the gap)
    check = np.any(present & ~np.isneginf(threshold), axis=-1)
    if leads:
        check |= np.any(present & np.any(new_others < 0, axis=0), axis=-1)
    highest = None if rescue is None else rescue[1]
    bounds = _TileBounds(threshold, shrinks, new_leads, new_others, tolerance, highest)
    winners = None if rescue is None else rescue[0]
    blocks = (_tile_blocks(labels, geometry.tile), _tile_blocks(margins, geometry.tile),
              None if winners is None else _tile_blocks(winners, geometry.tile))
    whole_tiles = _whole_mask(geometry)

    def judge(within: np.ndarray) -> np.ndarray:
        """Which of the tiles ``within`` must be recomputed (the others keep their labels; their margins are
        lowered in place to bounds for the next run). Each tile is to be judged once."""
        dirty = np.zeros(geometry.shape, bool)
        whole = np.nonzero(check & whole_tiles & within)
        if len(whole[0]) and compiled_labels.judge_tiles(bounds, whole[0], whole[1], labels, margins, winners,
                                                         geometry.tile, dirty):
            whole = (whole[0][:0], whole[1][:0])   # judged, compiled: the same values
        for start in range(0, len(whole[0]), JUDGED_AT_ONCE):
            ys, xs = whole[0][start : start + JUDGED_AT_ONCE], whole[1][start : start + JUDGED_AT_ONCE]
            judged, kept_margins = bounds.judge(ys, xs, blocks[0][ys, xs], blocks[1][ys, xs],
                                                None if winners is None else blocks[2][ys, xs])
            dirty[ys, xs] = judged
            blocks[1][ys[~judged], xs[~judged]] = kept_margins
        for ty, tx in zip(*np.nonzero(check & ~whole_tiles & within)):  # the part tiles at the far edges
            rows, cols = geometry.tile_slices(ty, tx)
            ys, xs = np.array([ty]), np.array([tx])
            judged, kept_margins = bounds.judge(ys, xs, labels[rows, cols][None], margins[rows, cols][None],
                                                None if winners is None else winners[rows, cols][None])
            dirty[ty, tx] = judged[0]
            if not judged[0]:
                margins[rows, cols] = kept_margins[0]
        return dirty

    if lazily:
        return judge, check, present
    dirty = judge(np.ones(geometry.shape, bool))
    return ~dirty, dirty, present


#: Tiles judged at once when a re-run decides which tiles keep their labels (bounds the memory of the copies).
JUDGED_AT_ONCE = 256


def _tile_blocks(array: np.ndarray, tile: int) -> np.ndarray:
    """(rows of tiles, columns of tiles, tile, tile): a writable view of the whole tiles of ``array``."""
    rows, cols = array.shape[0] // tile, array.shape[1] // tile
    step_y, step_x = array.strides
    return np.lib.stride_tricks.as_strided(array, (rows, cols, tile, tile),
                                           (step_y * tile, step_x * tile, step_y, step_x), writeable=True)


def _whole_mask(geometry: _Geometry) -> np.ndarray:
    """(tiles_y, tiles_x) which tiles are whole (not cut by the image's far edges)."""
    mask = np.zeros(geometry.shape, bool)
    mask[: geometry.size[0] // geometry.tile, : geometry.size[1] // geometry.tile] = True
    return mask


def _per_pixel(table: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each pixel's entry of its tile's row of ``table`` (n, labels), for ``labels`` (n, h, w): one gather."""
    index = np.arange(labels.shape[0], dtype=np.intp)[:, None, None] * table.shape[1] + labels
    return np.take(table.ravel(), index)


@dataclass
class _TileBounds:
    """Per tile and label: the margin a pixel needs to keep its label, and how its margin is lowered when kept."""

    threshold: np.ndarray   # (tiles_y, tiles_x, labels): a pixel keeps its label if its margin exceeds this
    shrinks: np.ndarray     # (tiles_y, tiles_x, labels): how much a kept pixel's lead may have shrunk
    new_leads: np.ndarray   # (new classes, tiles_y, tiles_x, labels): the label's lowest lead over a new class
    new_others: np.ndarray  # (new classes, tiles_y, tiles_x, labels): the best lead of another class over it
    tolerance: float
    highest: np.ndarray | None = None  # (tiles_y, tiles_x, labels): a winner's value kept above this keeps its label

    def judge(self, ys: np.ndarray, xs: np.ndarray, labels: np.ndarray, margins: np.ndarray,
              winners: np.ndarray | None = None):
        """For the tiles at (ys, xs), with their ``labels``, ``margins`` (and winners' values, with ``highest``)
        (n, h, w): which must be recomputed, and the margins the others keep (lower bounds for the next run), for
        those others alone."""
        margin = margins.astype(np.float32)
        keeps = margin > _per_pixel(self.threshold[ys, xs], labels)   # a NaN margin: recomputed
        above = None
        if self.highest is not None and winners is not None:
            highest = _per_pixel(self.highest[ys, xs], labels)
            with np.errstate(invalid="ignore"):   # winners' values not kept are rescued by nothing (highest inf)
                above = np.where(np.isfinite(highest), winners - highest, -np.inf)
            keeps |= above > 0
        dirty = ~np.all(keeps, axis=(1, 2))
        kept = ~dirty
        ys, xs, labels = ys[kept], xs[kept], labels[kept]
        kept_margin = margin[kept] - _per_pixel(self.shrinks[ys, xs], labels)
        if above is not None:   # every class that rose stays below the winner by ``above``, the others by the margin
            kept_margin = np.maximum(kept_margin, np.minimum(margin[kept], above[kept]))
        for lead, others in zip(self.new_leads, self.new_others):
            other = _per_pixel(others[ys, xs], labels)
            with np.errstate(invalid="ignore"):  # inf + -inf where there is no other class: no bound
                through_other = np.where(np.isneginf(other), -np.inf, kept_margin + other)
            against = np.maximum(_per_pixel(lead[ys, xs], labels), through_other)
            kept_margin = np.minimum(kept_margin, against)
        return dirty, lower_half(kept_margin - 2 * self.tolerance)


def _same_arithmetic(previous: LabelState, mapping: list, state: LabelState, reference: int,
                     geometry: _Geometry) -> dict:
    """For each kept class w: (tiles_y, tiles_x) where a pixel labelled w whose class only rose while every other
    class only fell keeps its label in a fresh run's floating-point arithmetic, not only in exact arithmetic.

    Labels are computed on every query's scores minus the reference query's, resized and snapped. Those
    operations round monotonically, so w's values only rise and the others' only fall when the reference
    query is the previous run's (by name) and its scores did not change within reach, or when it is w's only
    query (w then scores 0 and every other query's difference to it only falls). The kept classes must also
    keep their order, which settles exact ties. Elsewhere a near tie may round the other way: a fresh run
    whose reference is another query (the class leading most of the image changed, or the old one was
    removed) can label it otherwise, so such pixels are only kept with a margin clear of rounding.
    """
    none = np.zeros(geometry.shape, bool)
    old_order = [old for old in mapping if old is not None]
    if old_order != sorted(old_order) or not _same_reference(previous, mapping, state, reference):
        return {w: none for w, old in enumerate(mapping) if old is not None}
    old_reference = _reference_query(leading_query(previous.scores), previous.scores.shape[0])
    now_class = int(np.repeat(np.arange(len(state.spans)), [b - a for a, b in state.spans])[reference])
    delta = (state.scores[reference] - previous.scores[old_reference]).numpy()
    steady = (geometry.reduce(delta, "min") == 0) & (geometry.reduce(delta, "max") == 0)
    alone = state.spans[now_class][1] - state.spans[now_class][0] == 1
    return {w: (steady | alone) if w == now_class else steady for w, old in enumerate(mapping) if old is not None}


def _same_reference(previous: LabelState, mapping: list, state: LabelState, reference: int) -> bool:
    """Whether this run's reference query is the previous run's: the same query of the same class."""
    old_reference = _reference_query(leading_query(previous.scores), previous.scores.shape[0])
    owner_now = np.repeat(np.arange(len(state.spans)), [b - a for a, b in state.spans])
    owner_then = np.repeat(np.arange(len(previous.spans)), [b - a for a, b in previous.spans])
    now_class, then_class = int(owner_now[reference]), int(owner_then[old_reference])
    return (mapping[now_class] == then_class
            and reference - state.spans[now_class][0] == old_reference - previous.spans[then_class][0])


def _newcomer_leads(state: LabelState, mapping: list, kept: list, geometry: _Geometry) -> dict:
    """For each new class n: {kept class c: the lowest lead of c over n within each tile's reach}.

    Resizing and snapping give every pixel a convex combination of coarse values within reach, for
    each query alike, so a query's snapped lead over another is at least its lowest coarse lead
    there; a class leads n by at least the best of its synonyms' lowest leads over all of n's.
    """
    leads = {}
    for n, old in enumerate(mapping):
        if old is not None:
            continue
        a, b = state.spans[n]
        newcomer = state.scores[a:b]
        leads[n] = {}
        for c in kept:
            first, last = state.spans[c]
            best = None
            for q in range(first, last):
                lowest = geometry.reduce((state.scores[q][None] - newcomer).amin(0).numpy(), "min")
                best = lowest if best is None else np.maximum(best, lowest)
            leads[n][c] = best
    return leads


def _regions(dirty: np.ndarray, geometry: _Geometry, halo: int, n_queries: int, dilations: tuple):
    """Rectangles (top, bottom, left, right), halo included, that cover the dirty tiles, each with its tiles.

    Dirty tiles are taken in bands of tile rows as tall as memory allows (at most about four
    halos, so that a ring of boundary tiles does not pull in its whole interior), from the first
    row that holds any; within a band, the columns holding dirty tiles form runs, joined when the
    gap between two runs is narrower than the two halos they would otherwise compute twice. A
    run's rectangle spans the tile rows its tiles hold, not the whole band.
    """
    from .refine import _bytes_per_row

    height, width = geometry.size
    tile = geometry.tile
    if dilations:
        rows_fit = max(tile, REGION_MEMORY_BYTES // _bytes_per_row(width, n_queries, 3, dilations) - 2 * halo)
    else:  # resizing alone: a few copies of the region's scores, and no halo to amortise
        rows_fit = max(tile, RESIZE_MEMORY_BYTES // (24 * width * n_queries))
    if dirty.mean() > DENSE_SHARE:  # mostly dirty: the tallest bands that fit, fewest halos computed twice
        band_tiles = max(1, rows_fit // tile)
    else:
        band_tiles = max(1, min(rows_fit, max(4 * halo, 8 * tile)) // tile)
    join = -(-2 * halo // tile)
    regions = []
    dirty_rows = np.flatnonzero(dirty.any(1))
    # bands start at the first dirty row: a small patch (the view, or around a stroke) is one region, not two
    # split at a fixed band boundary, each with its own halo
    for first in range(int(dirty_rows[0]) if len(dirty_rows) else 0, dirty.shape[0], band_tiles):
        band = dirty[first : first + band_tiles]
        columns = np.flatnonzero(band.any(0))
        if not len(columns):
            continue
        breaks = np.flatnonzero(np.diff(columns) > join + 1)
        starts = np.concatenate([[columns[0]], columns[breaks + 1]])
        ends = np.concatenate([columns[breaks], [columns[-1]]])
        for start, end in zip(starts, ends):
            tiles = [(first + int(y), int(start + x)) for y, x in np.argwhere(band[:, start : end + 1]).tolist()]
            top = int(geometry.tile_rows[min(y for y, _ in tiles)])      # the rows this run's tiles hold,
            bottom = min(int(geometry.tile_rows[max(y for y, _ in tiles)]) + tile, height)  # not the whole band
            left, right = int(geometry.tile_cols[start]), min(int(geometry.tile_cols[end]) + tile, width)
            regions.append(((max(0, top - halo), min(height, bottom + halo), max(0, left - halo),
                             min(width, right + halo)), tiles))
    return regions
