"""The loops of :mod:`.compiled_snapping` and :mod:`.compiled_labels`, compiled by numba when first used (and
cached on disk by it).

Every snapping loop does, value by value, the arithmetic of the element-wise PyTorch path it replaces, in the
same order and with the same roundings (PyTorch's addcmul is a fused multiply-add: one rounding).
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

#: Columns of a row finished together: the values of that many columns stay in the fastest cache.
COLUMNS_AT_ONCE = 256


@intrinsic
def fused_multiply_add(typing_context, a, b, c):
    """a x b + c rounded once, as PyTorch's vectorised addcmul computes it."""
    signature = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, sig, args):
        return builder.fma(*args)
    return signature, codegen


@njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
def weighted_rows(source, target, weights, plane_step, row_step, rows_off, cols_off, pad, width, height, first,
                  last):
    """Rows ``first``..``last`` of the interior of ``target`` = the weighted sum of each pixel's neighbours in
    ``source`` at offsets (``rows_off``, ``cols_off``); both padded by ``pad``. Neighbour k's weight at (y, x) is
    ``weights[k * plane_step + y * row_step + x]`` (a flat view: weights cut out of a larger region keep their rows
    contiguous, which the compiled loop then knows). With ``height`` (the interior's; 0: not asked) the border of
    those rows then repeats their edges, as ``refine._repeat_edges_of_rows`` does."""
    channels = source.shape[0]
    neighbours = rows_off.shape[0]
    for y in range(first, last):
        for start in range(0, width, COLUMNS_AT_ONCE):
            stop = min(start + COLUMNS_AT_ONCE, width)
            count = stop - start
            row = y * row_step + start
            weight = weights[row : row + count]
            for c in range(channels):
                out = target[c, pad + y, pad + start : pad + stop]
                near = source[c, pad + rows_off[0] + y, pad + cols_off[0] + start : pad + cols_off[0] + stop]
                for x in range(count):
                    out[x] = near[x] * weight[x]
            for k in range(1, neighbours):
                weight = weights[k * plane_step + row : k * plane_step + row + count]
                for c in range(channels):
                    out = target[c, pad + y, pad + start : pad + stop]
                    near = source[c, pad + rows_off[k] + y, pad + cols_off[k] + start : pad + cols_off[k] + stop]
                    for x in range(count):
                        out[x] = fused_multiply_add(weight[x], near[x], out[x])
        if height:
            for c in range(channels):
                line = target[c, pad + y]
                for x in range(pad):
                    line[x] = line[pad]
                    line[pad + width + x] = line[pad + width - 1]
    if height:
        if first == 0:
            for c in range(channels):
                for y in range(pad):
                    target[c, y, :] = target[c, pad, :]
        if last == height:
            for c in range(channels):
                for y in range(pad + height, height + 2 * pad):
                    target[c, y, :] = target[c, pad + height - 1, :]


@njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
def guide_spread(padded, dilations, pad, origin, spread, top, bottom):
    """Rows ``top``..``bottom`` of each guide channel's variance over its 3 x 3 neighbourhoods at every dilation
    (centre included; the sum of squares divided by their count less one), into ``spread`` (channels, rows,
    width; row y at y - ``origin``). ``padded``: the whole guide, padded by ``pad`` (its border repeating its
    edges)."""
    channels, width = padded.shape[0], spread.shape[2]
    count = 9 * dilations.shape[0]
    mean = np.empty(COLUMNS_AT_ONCE, np.float32)
    for c in range(channels):
        for y in range(top, bottom):
            for start in range(0, width, COLUMNS_AT_ONCE):
                stop = min(start + COLUMNS_AT_ONCE, width)
                n = stop - start
                variance = spread[c, y - origin, start:stop]
                for number in range(dilations.shape[0]):
                    d = dilations[number]
                    above = padded[c, pad + y - d, pad + start - d : pad + stop + d]
                    middle = padded[c, pad + y, pad + start - d : pad + stop + d]
                    below = padded[c, pad + y + d, pad + start - d : pad + stop + d]
                    # rows of three, then three rows: the order of the element-wise window sums
                    if number == 0:
                        for x in range(n):
                            mean[x] = (((above[x] + above[x + d]) + above[x + 2 * d])
                                       + ((middle[x] + middle[x + d]) + middle[x + 2 * d])) \
                                + ((below[x] + below[x + d]) + below[x + 2 * d])
                    else:
                        for x in range(n):
                            mean[x] = mean[x] + ((((above[x] + above[x + d]) + above[x + 2 * d])
                                                  + ((middle[x] + middle[x + d]) + middle[x + 2 * d]))
                                                 + ((below[x] + below[x + d]) + below[x + 2 * d]))
                for x in range(n):
                    mean[x] = mean[x] / np.float32(count)
                    variance[x] = np.float32(0.0)
                for number in range(dilations.shape[0]):
                    d = dilations[number]
                    for dy in range(-1, 2):
                        for dx in range(-1, 2):
                            line = padded[c, pad + y + dy * d, pad + start + dx * d : pad + stop + dx * d]
                            for x in range(n):
                                difference = line[x] - mean[x]
                                variance[x] = fused_multiply_add(difference, difference, variance[x])
                for x in range(n):
                    variance[x] = variance[x] / np.float32(count - 1)


@njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
def weight_logits(padded, deviation, origin, rows_off, cols_off, first_same, pad, logits, plane_step, row_step,
                  width, top, bottom):
    """Rows ``top``..``bottom`` of each neighbour's softmax logit less the pixel's highest, into ``logits``
    (neighbours, height, ``width``) at those rows: -|guide - neighbour| / (channels x (1e-8 + 0.1 std)) summed over
    the channels. ``deviation``: the guide's standard deviations (row y at y - ``origin``); ``first_same[k]``: the
    first neighbour of the same offset as k (a dilation given twice). ``logits`` is flat, as the weights of
    :func:`weighted_rows` (neighbour k's value at (y, x) at ``k * plane_step + y * row_step + x``): a view of a
    larger array can be written."""
    channels = padded.shape[0]
    neighbours = rows_off.shape[0]
    factor = np.empty((channels, COLUMNS_AT_ONCE), np.float32)
    highest = np.empty(COLUMNS_AT_ONCE, np.float32)
    for y in range(top, bottom):
        for start in range(0, width, COLUMNS_AT_ONCE):
            stop = min(start + COLUMNS_AT_ONCE, width)
            n = stop - start
            for c in range(channels):
                spread = deviation[c, y - origin, start:stop]
                for x in range(n):
                    value = (spread[x] * np.float32(0.1) + np.float32(1e-8)) * np.float32(channels)
                    factor[c, x] = -(np.float32(1.0) / value)
            row = y * row_step + start
            for k in range(neighbours):
                out = logits[k * plane_step + row : k * plane_step + row + n]
                if first_same[k] != k:
                    same = logits[first_same[k] * plane_step + row : first_same[k] * plane_step + row + n]
                    for x in range(n):
                        out[x] = same[x]
                    continue
                here = padded[0, pad + y, pad + start : pad + stop]
                there = padded[0, pad + y + rows_off[k], pad + start + cols_off[k] : pad + stop + cols_off[k]]
                for x in range(n):
                    out[x] = abs(here[x] - there[x]) * factor[0, x]
                for c in range(1, channels):
                    here = padded[c, pad + y, pad + start : pad + stop]
                    there = padded[c, pad + y + rows_off[k], pad + start + cols_off[k] : pad + stop + cols_off[k]]
                    for x in range(n):
                        out[x] = fused_multiply_add(abs(here[x] - there[x]), factor[c, x], out[x])
            first = logits[row : row + n]
            for x in range(n):
                highest[x] = first[x]
            for k in range(1, neighbours):
                out = logits[k * plane_step + row : k * plane_step + row + n]
                for x in range(n):
                    highest[x] = max(highest[x], out[x])
            for k in range(neighbours):
                out = logits[k * plane_step + row : k * plane_step + row + n]
                for x in range(n):
                    out[x] = out[x] - highest[x]


@njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
def normalised(weights, neighbours, plane_step, row_step, width, top, bottom):
    """Rows ``top``..``bottom`` of ``weights`` (``neighbours``, height, ``width``; flat, as in :func:`weight_logits`)
    divided by their sum over the neighbours, added in their order."""
    total = np.empty(COLUMNS_AT_ONCE, np.float32)
    for y in range(top, bottom):
        for start in range(0, width, COLUMNS_AT_ONCE):
            stop = min(start + COLUMNS_AT_ONCE, width)
            n = stop - start
            row = y * row_step + start
            first = weights[row : row + n]
            for x in range(n):
                total[x] = first[x]
            for k in range(1, neighbours):
                plane = weights[k * plane_step + row : k * plane_step + row + n]
                for x in range(n):
                    total[x] = total[x] + plane[x]
            for k in range(neighbours):
                plane = weights[k * plane_step + row : k * plane_step + row + n]
                for x in range(n):
                    plane[x] = plane[x] / total[x]


@njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
def resized_rows(across, row_low, row_high, row_weight, out, plane_step, row_step, first, last):
    """Rows ``first``..``last`` of a bilinear resize along the height: row y is row ``row_low[y]`` of ``across``
    times 1 - ``row_weight[y]``, plus row ``row_high[y]`` times ``row_weight[y]`` (each product rounded, then
    the sum). ``out`` is flat: value (c, y, x) at ``c * plane_step + y * row_step + x``."""
    planes, width = across.shape[0], across.shape[2]
    for y in range(first, last):
        weight = row_weight[y]
        rest = np.float32(1.0) - weight
        for c in range(planes):
            low = across[c, row_low[y]]
            high = across[c, row_high[y]]
            start = c * plane_step + y * row_step
            row = out[start : start + width]
            for x in range(width):
                row[x] = low[x] * rest + high[x] * weight


@njit(nogil=True, cache=True, boundscheck=False)
def labels_present(block, tile, occurs, first, last):
    """For the tile rows ``first``..``last`` of ``block`` (labels, the box's first tile at its top left; tiles at its
    far edges cut short): ``occurs[ty, tx, label]`` set where ``label`` occurs in tile (ty, tx). Labels from
    ``occurs.shape[2]`` on are not counted."""
    height, width = block.shape
    count = occurs.shape[2]
    for ty in range(first, last):
        for y in range(ty * tile, min((ty + 1) * tile, height)):
            row = block[y]
            for tx in range(occurs.shape[1]):
                flags = occurs[ty, tx]
                for x in range(tx * tile, min((tx + 1) * tile, width)):
                    label = row[x]
                    if label < count:
                        flags[label] = True


@njit(nogil=True, cache=True, boundscheck=False)
def values_seen(flat, seen, first, last):
    """``seen[value]`` set for every value of ``flat[first:last]`` (uint8: ``seen`` holds 256)."""
    for i in range(first, last):
        seen[flat[i]] = True
