"""Refinements of dense scores: PAMR edge snapping (and the image guide it follows).

PAMR (pixel-adaptive mask refinement, Araslanov & Roth, CVPR 2020) as NACLIP and SCLIP
apply it: on the cosine scores at the output size, before the logit scale and softmax,
guided by the normalised input image at that size. Each pixel repeatedly takes a
weighted average of its 8 neighbours at each dilation, weighted by how alike the guide
image is there.
"""

from __future__ import annotations

import math
import mmap
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import compiled_snapping
from .options import PAMR_DILATIONS, PAMR_ITERATIONS

NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
WINDOW = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 0), (0, 1), (1, -1), (1, 0), (1, 1))


def _shifted(padded: torch.Tensor, pad: int, dy: int, dx: int, size: tuple[int, int]) -> torch.Tensor:
    """The value at (y + dy, x + dx) for every pixel, from a replicate-padded (C, H + 2 pad, W + 2 pad) tensor."""
    height, width = size
    return padded[:, pad + dy : pad + dy + height, pad + dx : pad + dx + width]


#: Buffers from this many bytes are mapped here, so that they can be given back to the system a piece at a time.
MAPPED_FROM = 64 << 20
#: A buffer mapped here reserves this many times what it was asked for (address space only, until used).
MAPPED_ROOM = 1.25
#: Bytes given back at once when a buffer mapped here is let go.
RELEASED_AT_ONCE = 32 << 20


class Buffers:
    """Float32 buffers reused within a run, so that it maps fresh memory for its largest region only.

    The C library hands large blocks back to the system when they are freed and maps them anew
    on the next request: a 4096 x 4096 first run took 9 GB of fresh pages (about 5 s of system
    time on 2 cores) before its planes were reused.

    Large buffers are mapped here and given back RELEASED_AT_ONCE bytes at a time: Linux locks
    the process's memory map while it frees pages (about 100 ms per GB), and any other thread
    that maps memory meanwhile waits, napari's GUI thread included.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = device
        self._free: list[torch.Tensor] = []
        self._taken: list[torch.Tensor] = []
        self._mappings: dict[int, mmap.mmap] = {}   # data pointer -> the mapping of a buffer mapped here

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        """An uninitialised contiguous float32 tensor of ``shape``."""
        needed = math.prod(shape)
        fitting = [i for i, buffer in enumerate(self._free) if buffer.numel() >= needed]
        if fitting:
            buffer = self._free.pop(min(fitting, key=lambda i: self._free[i].numel()))
        else:  # the smaller free buffers would only add to the peak: let them go
            self._let_go(self._free)
            self._free = []
            buffer = self._new(needed)
        self._taken.append(buffer)
        return buffer[:needed].view(shape)

    def give_back(self, view: torch.Tensor | None = None) -> None:
        """Hand back the buffer under ``view`` (None: every buffer taken)."""
        if view is None:
            self._free += self._taken
            self._taken = []
            return
        pointer = view.untyped_storage().data_ptr()
        for i, buffer in enumerate(self._taken):
            if buffer.untyped_storage().data_ptr() == pointer:
                self._free.append(self._taken.pop(i))
                return

    def release(self) -> None:
        """Give every buffer back to the system (a run is over: nothing uses them any more)."""
        self._let_go(self._free + self._taken)
        self._free, self._taken = [], []

    def _new(self, count: int) -> torch.Tensor:
        if (count * 4 < MAPPED_FROM or torch.device(self.device).type != "cpu"
                or not hasattr(mmap, "MAP_ANONYMOUS") or not hasattr(mmap.mmap, "madvise")):
            return torch.empty(count, device=self.device)
        # room to grow, which costs nothing until touched: a later, larger region (one with a halo on both sides)
        # then reuses this buffer's pages instead of a fresh mapping's
        mapping = mmap.mmap(-1, int(count * MAPPED_ROOM) * 4, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buffer = torch.frombuffer(mapping, dtype=torch.float32)
        self._mappings[buffer.data_ptr()] = mapping
        return buffer

    def _let_go(self, buffers: list[torch.Tensor]) -> None:
        """Free the pages of buffers mapped here a piece at a time; the mapping itself goes with the last view
        of it (nothing left to free then). The others are freed by PyTorch as usual."""
        for buffer in buffers:
            mapping = self._mappings.pop(buffer.data_ptr(), None)
            if mapping is None:
                continue
            for start in range(0, len(mapping), RELEASED_AT_ONCE):
                mapping.madvise(mmap.MADV_DONTNEED, start, min(RELEASED_AT_ONCE, len(mapping) - start))


def _replicate(x: torch.Tensor, pad: int) -> torch.Tensor:
    return F.pad(x[None], (pad, pad, pad, pad), mode="replicate")[0]


def _window_sum(padded: torch.Tensor, pad: int, dilation: int, size: tuple[int, int], buffers: Buffers) -> torch.Tensor:
    """The sum of each pixel's 3 x 3 values at ``dilation`` (centre included): rows of three, then three rows."""
    height, width = size
    rows = padded[:, pad - dilation : pad + height + dilation]
    across = buffers.take((padded.shape[0], height + 2 * dilation, width))
    torch.add(rows[:, :, pad - dilation : pad - dilation + width], rows[:, :, pad : pad + width], out=across)
    across += rows[:, :, pad + dilation : pad + dilation + width]
    total = buffers.take((padded.shape[0], height, width))
    torch.add(across[:, :height], across[:, dilation : dilation + height], out=total)
    total += across[:, 2 * dilation : 2 * dilation + height]
    buffers.give_back(across)
    return total


def _neighbour_distances(padded: torch.Tensor, pad: int, offsets, size: tuple[int, int], buffers: Buffers):
    """Yield (offset, |x(p) - x(p + offset)| for every pixel p) for each offset.

    The distance to p - o is the distance p - o has to its neighbour at + o: each pair of opposite
    offsets is computed once, over the image and a band beyond it (the same two values subtracted the
    other way round, so the very same magnitude).
    """
    height, width = size
    wanted = set(offsets)
    buffer = None
    for dy, dx in offsets:
        if (dy, dx) < (0, 0) and (-dy, -dx) in wanted:
            continue  # given with its opposite
        top, bottom = min(pad, pad - dy), max(pad + height, pad + height - dy)
        left, right = min(pad, pad - dx), max(pad + width, pad + width - dx)
        if buffer is None:
            buffer = buffers.take((padded.shape[0], height + 2 * pad, width + 2 * pad))
        distance = buffer[:, top:bottom, left:right]
        torch.sub(padded[:, top:bottom, left:right], padded[:, top + dy : bottom + dy, left + dx : right + dx],
                  out=distance).abs_()
        yield (dy, dx), distance[:, pad - top : pad - top + height, pad - left : pad - left + width]
        if (-dy, -dx) in wanted and (dy, dx) != (0, 0):
            rows, cols = pad - dy - top, pad - dx - left
            yield (-dy, -dx), distance[:, rows : rows + height, cols : cols + width]
    if buffer is not None:
        buffers.give_back(buffer)


#: Bytes of weights computed at a time on the CPU (a few rows of the image): every temporary plane of those rows
#: then stays in the cache (about twice as fast as whole planes at 4096 x 4096, and a few small buffers).
AFFINITIES_AT_ONCE_BYTES = 1 << 23


def pamr_affinities(guide: torch.Tensor, dilations: Sequence[int] = PAMR_DILATIONS,
                    buffers: Buffers | None = None, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """(8 x len(dilations), H, W) weights of each pixel's neighbours, summing to 1 per pixel.

    Affinity = -|guide - neighbour| / (1e-8 + 0.1 x std), std being the (unbiased) standard
    deviation of the 3x3 neighbourhoods at every dilation (centre included), then averaged
    over the guide's channels and softmax-normalised over the neighbours. Computed a few rows at
    a time, in place. Every value is a fixed sequence of element-wise operations on the guide
    within the largest dilation of its pixel: a region of the image, or a block of its rows, gets
    the very values the whole image gets (on the CPU, compiled loops of :mod:`.compiled_snapping` do the same
    arithmetic a row at a time). Temporary planes and the weights come from ``buffers``
    (the weights stay taken). With ``rows`` (first, last) only those rows are computed (the others are left
    uninitialised, for the caller to fill), with the very values the whole gives them.
    """
    guide = guide.float()
    buffers = Buffers(guide.device) if buffers is None else buffers
    channels = guide.shape[0]
    height, width = guide.shape[-2:]
    pad = max(dilations)
    padded = buffers.take((channels, height + 2 * pad, width + 2 * pad))
    padded[:, pad : pad + height, pad : pad + width] = guide
    _replicate_border(padded, pad)
    logits = buffers.take((8 * len(dilations), height, width))
    first, last = (0, height) if rows is None else (max(0, rows[0]), min(height, rows[1]))
    padded_affinities(padded, dilations, logits, buffers, rows=(first, last))
    buffers.give_back(padded)
    return logits


def padded_affinities(padded: torch.Tensor, dilations: Sequence[int], out: torch.Tensor,
                      buffers: Buffers | None = None, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """:func:`pamr_affinities` of the guide inside ``padded`` (C, h + 2 pad, w + 2 pad, pad = max(dilations)), into
    ``out`` (8 x len(dilations), h, w; its rows contiguous: it may be a view of a larger tensor), rows ``rows``
    (first, last) only if given. Where the border holds the image's own pixels around a region (its edges repeated
    only at the image's sides), every weight is the one the whole image gets: nothing inexact to leave out."""
    buffers = Buffers(padded.device) if buffers is None else buffers
    pad = max(dilations)
    height, width = padded.shape[1] - 2 * pad, padded.shape[2] - 2 * pad
    first, last = (0, height) if rows is None else rows
    if compiled_snapping.weights_of_rows(padded, pad, dilations, out, first, last):  # the same values, compiled
        return out
    if padded.device.type == "cpu":
        at_once = max(1, AFFINITIES_AT_ONCE_BYTES // (4 * len(dilations) * 8 * (width + 2 * pad)))
    else:
        at_once = height
    for top in range(first, last, at_once):
        bottom = min(top + at_once, last)
        _affinities_of_rows(padded[:, top : bottom + 2 * pad], pad, dilations, out[:, top:bottom], buffers)
    return out


def _affinities_of_rows(padded: torch.Tensor, pad: int, dilations: Sequence[int], logits: torch.Tensor,
                        buffers: Buffers) -> None:
    """:func:`pamr_affinities` of the rows of ``logits`` (8 x len(dilations), h, W), from ``padded``, those rows of
    the guide with ``pad`` rows and columns of the padded guide around them."""
    channels = padded.shape[0]
    size = tuple(logits.shape[-2:])
    count = 9 * len(dilations)
    mean = _window_sum(padded, pad, dilations[0], size, buffers)
    for dilation in dilations[1:]:
        window = _window_sum(padded, pad, dilation, size, buffers)
        mean += window
        buffers.give_back(window)
    mean /= count
    variance, difference = buffers.take((channels, *size)).zero_(), buffers.take((channels, *size))
    for value in (_shifted(padded, pad, dy * d, dx * d, size) for d in dilations for dy, dx in WINDOW):
        torch.sub(value, mean, out=difference)
        variance.addcmul_(difference, difference)
    buffers.give_back(mean)
    buffers.give_back(difference)
    # what each channel's distance is multiplied by: -1 / (channels x (1e-8 + 0.1 std)), the minus of the softmax's
    # logits and the mean over channels included
    factor = variance.div_(count - 1).sqrt_().mul_(0.1).add_(1e-8).mul_(channels).reciprocal_().neg_()
    offsets = [(dy * d, dx * d) for d in dilations for dy, dx in NEIGHBOURS]
    planes: dict[tuple[int, int], list[int]] = {}  # a dilation given twice gives its offsets twice
    for number, offset in enumerate(offsets):
        planes.setdefault(offset, []).append(number)
    for offset, distance in _neighbour_distances(padded, pad, list(planes), size, buffers):
        first, *others = planes[offset]
        logit = logits[first]
        torch.mul(distance[0], factor[0], out=logit)
        for channel in range(1, channels):  # the channels in a fixed order
            logit.addcmul_(distance[channel], factor[channel])
        for number in others:
            logits[number].copy_(logit)
    buffers.give_back(factor)
    highest = buffers.take(size)
    torch.amax(logits, 0, out=highest)
    logits -= highest                             # softmax over the neighbours, in place
    logits.exp_()
    # the sums here are element-wise additions in a fixed order: PyTorch's reductions over the first axis may add
    # in another order depending on the array's size, and a band or region of the image must get exactly the
    # values the whole image gets
    total = highest.copy_(logits[0])
    for plane_values in logits[1:]:
        total += plane_values
    logits.div_(total)
    buffers.give_back(total)


#: Memory the refinement may use at once; larger outputs are refined in bands of rows.
PAMR_MEMORY_BYTES = 3 << 30


def _bytes_per_row(width: int, channels: int, guide_channels: int, dilations: Sequence[int]) -> int:
    """What one output row costs while refining: affinities, three copies of the scores, guide buffers (float32)."""
    return 4 * width * (8 * len(dilations) + 3 * channels + 4 * guide_channels)


def repeat_sides(padded: torch.Tensor, top: int, bottom: int, left: int, right: int) -> None:
    """Fill the first ``top`` and last ``bottom`` rows and the first ``left`` and last ``right`` columns of
    ``padded`` (C, H, W) by repeating the nearest row or column inside them: the border the image's sides get
    (:func:`_replicate_border`), where a region's border holds the image's pixels on its other sides."""
    height, width = padded.shape[1], padded.shape[2]
    inner = slice(top, height - bottom)
    if left:
        padded[:, inner, :left] = padded[:, inner, left : left + 1]
    if right:
        padded[:, inner, width - right :] = padded[:, inner, width - right - 1 : width - right]
    if top:
        padded[:, :top] = padded[:, top : top + 1]
    if bottom:
        padded[:, height - bottom :] = padded[:, height - bottom - 1 : height - bottom]


def _replicate_border(padded: torch.Tensor, pad: int) -> None:
    """Fill the ``pad``-wide border of ``padded`` (C, H + 2 pad, W + 2 pad) by repeating its edge pixels."""
    height, width = padded.shape[1] - 2 * pad, padded.shape[2] - 2 * pad
    inner_cols = slice(pad, pad + width)
    padded[:, :pad, inner_cols] = padded[:, pad : pad + 1, inner_cols]
    padded[:, pad + height :, inner_cols] = padded[:, pad + height - 1 : pad + height, inner_cols]
    padded[:, :, :pad] = padded[:, :, pad : pad + 1]
    padded[:, :, pad + width :] = padded[:, :, pad + width - 1 : pad + width]


#: Bytes of output one pass over the neighbours writes at a time on the CPU: small enough to stay in the cache
#: while all the neighbours are added to it (about twice as fast as whole planes at 4096 x 4096).
AVERAGED_AT_ONCE_BYTES = 1 << 21


#: Bytes of output the compiled loops write at a time: they finish each row in the cache whatever the block, so
#: blocks are larger, and the cost of starting each block (its arguments, a second thread) is paid less often.
COMPILED_AT_ONCE_BYTES = 1 << 24


#: Bytes of weights the compiled loops read in one block of rows at most: the wave's next iteration reads the same
#: weights again, and a block this small still finds them in a large last-level cache (wide regions with few
#: classes: 15-24% faster than blocks of 16 MB of output, whose weights were up to 134 MB).
WEIGHTS_AT_ONCE_BYTES = 1 << 25


def _rows_at_once(current: torch.Tensor, width: int, height: int, compiled: bool = False, neighbours: int = 16) -> int:
    """Rows one pass over the neighbours writes at a time: :data:`AVERAGED_AT_ONCE_BYTES` of output on the CPU
    (:data:`COMPILED_AT_ONCE_BYTES` for the compiled loops, whose blocks' ``neighbours`` weights are at most
    :data:`WEIGHTS_AT_ONCE_BYTES`), all of them elsewhere."""
    if current.device.type != "cpu":
        return height
    if compiled:
        return max(1, min(COMPILED_AT_ONCE_BYTES // (current.shape[0] * width * current.element_size()),
                          WEIGHTS_AT_ONCE_BYTES // (neighbours * width * 4)))
    return max(1, AVERAGED_AT_ONCE_BYTES // (current.shape[0] * width * current.element_size()))


def _average_rows(current: torch.Tensor, spare: torch.Tensor, weights: torch.Tensor, offsets, pad: int, width: int,
                  first: int, last: int, repeat_edges: bool = False, compiled=None,
                  columns: tuple[int, int] | None = None, spans: np.ndarray | None = None) -> None:
    """Rows ``first``..``last`` of one PAMR iteration: there, the interior of ``spare`` becomes the
    ``weights``-weighted sum of each pixel's neighbours at ``offsets`` in ``current`` (both padded by ``pad``).

    Every value is the same sequence of operations (a product, then one ``addcmul`` per neighbour, in the order of
    ``offsets``) however the rows are split: the very values whole planes give. On the CPU the compiled loop of
    :mod:`.compiled_snapping` does the same arithmetic a row at a time. With ``repeat_edges`` the padded border
    of those rows then repeats their edges (:func:`_repeat_edges_of_rows`). ``compiled``: that loop already
    prepared for these buffers (:func:`.compiled_snapping.averaging`); it computes only ``columns`` (first, last;
    None: all), and of row y only the columns ``spans[y]`` (None: all), the element-wise path every column.
    """
    if compiled is not None:
        compiled(first, last, (0, width) if columns is None else columns, spans)
        return
    if compiled_snapping.weighted_rows(current, spare, weights, offsets, pad, width, first, last, repeat_edges):
        return  # the same values, compiled
    inner = spare[:, pad + first : pad + last, pad : pad + width]
    for number, (weight, (dy, dx)) in enumerate(zip(weights, offsets)):
        neighbour = current[:, pad + dy + first : pad + dy + last, pad + dx : pad + dx + width]
        if number == 0:
            torch.mul(neighbour, weight[first:last], out=inner)
        else:
            inner.addcmul_(weight[first:last], neighbour)  # one fused pass per neighbour
    if repeat_edges:
        _repeat_edges_of_rows(spare, pad, first, last)


def _repeat_edges_of_rows(padded: torch.Tensor, pad: int, first: int, last: int) -> None:
    """:func:`_replicate_border` for rows ``first``..``last`` of the interior: their left and right borders, and the
    top (bottom) border when they hold the first (last) row."""
    height, width = padded.shape[1] - 2 * pad, padded.shape[2] - 2 * pad
    rows = padded[:, pad + first : pad + last]
    rows[:, :, :pad] = rows[:, :, pad : pad + 1]
    rows[:, :, pad + width :] = rows[:, :, pad + width - 1 : pad + width]
    if first == 0:
        padded[:, :pad] = padded[:, pad : pad + 1]
    if last == height:
        padded[:, pad + height :] = padded[:, pad + height - 1 : pad + height]


def _refine_whole(scores: torch.Tensor, guide: torch.Tensor | None, iterations: int, dilations: tuple[int, ...],
                  affinity: torch.Tensor | None = None):
    """Generator: PAMR on the whole of ``scores``, yielding after each iteration.

    Two padded buffers take turns: each iteration writes into the other's interior and
    repeats its edges, so no iteration allocates or pads anew. ``affinity`` (the guide's
    :func:`pamr_affinities` at these pixels) spares computing them again.
    """
    affinity = (pamr_affinities(guide, dilations) if affinity is None else affinity).to(scores.dtype)
    return (yield from _refine_padded(_replicate(scores, max(dilations)), None, iterations, dilations, affinity))


def _refine_padded(current: torch.Tensor, spare: torch.Tensor | None, iterations: int, dilations: tuple[int, ...],
                   affinity: torch.Tensor, cut: tuple[bool, bool, bool, bool] = (False, False, False, False),
                   needed: np.ndarray | None = None):
    """Generator: :func:`_refine_whole` on scores already padded by max(dilations) (``current``, its border
    repeating its edges), with ``spare`` (None: allocated) as the other buffer; yields ``iterations`` times, as the
    work of each iteration's worth is done; returns the refined interior, a view of one of the two buffers
    (``current`` after an even number of iterations).

    On the CPU the iterations advance together down the image, as a wave: once iteration t - 1 holds the rows
    around a block, iteration t computes that block, so that the block's weights (the largest reads) are still in
    the cache for every iteration, rather than read from memory once per iteration. Iteration t writes over
    iteration t - 2's values only at rows that iteration t - 1 no longer reads, so two buffers still do, and every
    value is computed as whole iterations compute it (see :func:`_average_rows`): the very same values.

    ``cut`` (top, bottom, left, right): sides of a region cut out of a larger image. A value next to a cut is
    wrong (its neighbours beyond it are missing) and the wrong band widens by max(dilations) each iteration, so
    iteration t leaves out t x max(dilations) rows (columns) on each cut side: nothing it computes reads them, and
    the values there are left as they were (not the refined ones).

    ``needed`` (iterations + 1, height, 2; int64): the columns of each row each iteration must compute, no fewer
    than the next iteration reads (every pixel within max(dilations) of one it computes): the compiled loops compute
    only those (the element-wise path whole rows), and values elsewhere are not the refined ones.
    """
    pad = max(dilations)
    height, width = current.shape[1] - 2 * pad, current.shape[2] - 2 * pad
    offsets = [(dy * d, dx * d) for d in dilations for dy, dx in NEIGHBOURS]
    spare = torch.empty_like(current) if spare is None else spare
    buffers = (current, spare)
    compiled = [compiled_snapping.averaging(source, target, affinity, offsets, pad, width, repeat_edges=True)
                for source, target in ((current, spare), (spare, current))]
    rows = _rows_at_once(current, width, height, compiled=compiled[0] is not None, neighbours=len(offsets))
    # the rows and columns each iteration computes (iteration 0: the scores, all of them)
    top = [min(height, t * pad * int(cut[0])) for t in range(iterations + 1)]
    bottom = [max(top[t], height - t * pad * int(cut[1])) for t in range(iterations + 1)]
    columns = [(min(width, t * pad * int(cut[2])), max(min(width, t * pad * int(cut[2])), width - t * pad * int(cut[3])))
               for t in range(iterations + 1)]
    if needed is not None and compiled[0] is not None:   # only the rows whose columns some iteration needs
        for t in range(1, iterations + 1):
            rows_needed = np.flatnonzero(needed[t, :, 1] > needed[t, :, 0])
            if len(rows_needed):
                top[t], bottom[t] = max(top[t], int(rows_needed[0])), min(bottom[t], int(rows_needed[-1]) + 1)
            bottom[t] = max(top[t], bottom[t])
    else:
        needed = None
    done = list(bottom[:1]) + top[1:]   # rows of each iteration computed, from its top
    work = sum(bottom[t] - top[t] for t in range(1, iterations + 1))
    yielded = 0
    while iterations and done[iterations] < bottom[iterations]:
        for step in range(1, iterations + 1):
            # iteration ``step`` reads the previous one's rows up to ``pad`` beyond its own
            ready = bottom[step] if done[step - 1] == bottom[step - 1] else done[step - 1] - pad
            last = min(ready, done[step] + rows, bottom[step])
            if last <= done[step]:
                continue
            source, target = buffers[(step - 1) % 2], buffers[step % 2]
            _average_rows(source, target, affinity, offsets, pad, width, done[step], last, repeat_edges=True,
                          compiled=compiled[(step - 1) % 2], columns=columns[step],
                          spans=None if needed is None else needed[step])
            done[step] = last
            finished = sum(done[t] - top[t] for t in range(1, iterations + 1))
            while yielded < iterations * finished // max(1, work) and yielded < iterations:   # an iteration's worth
                yielded += 1
                yield
    while yielded < iterations:
        yielded += 1
        yield
    return _shifted(buffers[iterations % 2], pad, 0, 0, (height, width))


def pamr_steps(scores: torch.Tensor, guide: torch.Tensor, iterations: int = PAMR_ITERATIONS,
               dilations: Sequence[int] = PAMR_DILATIONS, band_rows: int | None = None):
    """:func:`pamr` as a generator that yields (done, total) iterations, for progress and cancelling.

    An output too large for :data:`PAMR_MEMORY_BYTES` is refined in bands of ``band_rows``
    rows, each with a margin of rows above and below wide enough that no band edge reaches
    its rows: the result is the same as refining the whole at once.
    """
    if iterations <= 0:
        return scores
    dilations = tuple(int(d) for d in dilations)
    height, width = scores.shape[-2:]
    # how far a band edge's error spreads: max(dilations) an iteration (the edge's wrong weights lie within the
    # first iteration's reach)
    margin = max(dilations) * iterations
    if band_rows is None:
        rows = PAMR_MEMORY_BYTES // _bytes_per_row(width, scores.shape[0], guide.shape[0], dilations)
        band_rows = height if rows >= height else max(rows - 2 * margin, margin)
    starts = list(range(0, height, band_rows))
    total = len(starts) * iterations
    if len(starts) == 1:
        steps = _refine_whole(scores, guide, iterations, dilations)
        for done in range(1, iterations + 1):
            next(steps)
            yield done, total
        return _finish(steps)
    refined = torch.empty_like(scores)
    for number, top in enumerate(starts):
        bottom = min(top + band_rows, height)
        first, last = max(0, top - margin), min(height, bottom + margin)
        steps = _refine_whole(scores[:, first:last], guide[:, first:last], iterations, dilations)
        for done in range(1, iterations + 1):
            next(steps)
            yield number * iterations + done, total
        refined[:, top:bottom] = _finish(steps)[:, top - first : bottom - first]
    return refined


def _finish(steps):
    try:
        next(steps)
    except StopIteration as stop:
        return stop.value
    raise RuntimeError("the refinement ran more iterations than asked for")


def pamr(scores: torch.Tensor, guide: torch.Tensor, iterations: int = PAMR_ITERATIONS,
         dilations: Sequence[int] = PAMR_DILATIONS, band_rows: int | None = None) -> torch.Tensor:
    """Refine (Q, H, W) scores with the (C, H, W) guide image: ``iterations`` rounds of affinity-weighted averaging."""
    from .progress import run_to_end

    return run_to_end(pamr_steps(scores, guide, iterations, dilations, band_rows))
