"""The loops of :mod:`.compiled_snapping` and :mod:`.compiled_labels`, compiled by numba when first used (and
cached on disk by it).

Every snapping loop does, value by value, the arithmetic of the element-wise PyTorch path it replaces, in the
same order and with the same roundings (PyTorch's addcmul is a fused multiply-add: one rounding).
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

#: Columns of a row the loops computing weights finish together: their values stay in the fastest cache.
COLUMNS_AT_ONCE = 256


@intrinsic
def fused_multiply_add(typing_context, a, b, c):
    """a x b + c rounded once, as PyTorch's vectorised addcmul computes it."""
    signature = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, sig, args):
        return builder.fma(*args)
    return signature, codegen


#: Columns of a row the snapping loop finishes together (in effect whole rows): each pass over them adds eight
#: neighbours, so the output is read and written once per eight neighbours rather than once per neighbour. Against
#: adding them one pass each over 256 columns: 1.6x faster strokes and 1.3x faster first runs on a 4096 x 4096
#: mosaic, with the same roundings in the same order. Longer passes were faster up to whole rows; sixteen
#: neighbours a pass slower.
SNAPPED_COLUMNS_AT_ONCE = 1 << 14


@njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
def weighted_rows(source, target, weights, plane_step, row_step, rows_off, cols_off, pad, width, height, spans,
                  left, right, first, last):
    """Rows ``first``..``last``, columns ``left``..``right`` of the interior of ``target`` = the weighted sum of
    each pixel's neighbours in ``source`` at offsets (``rows_off``, ``cols_off``); both padded by ``pad``. Neighbour
    k's weight at (y, x) is ``weights[k * plane_step + y * row_step + x]`` (a flat view: weights cut out of a larger
    region keep their rows contiguous, which the compiled loop then knows). With ``height`` (the interior's; 0: not
    asked) the border of those rows then repeats their edges, as ``refine._repeat_edges_of_rows`` does. ``spans``
    (rows, 2; or empty: none) narrows row y to its columns ``spans[y, 0]``..``spans[y, 1]``.

    Each value is the first neighbour's product, then one fused multiply-add per neighbour in order, as PyTorch's
    element-wise path computes it; the neighbours are taken eight to a pass over the columns, and the channels two
    to a pass, so that each weight read serves both."""
    channels = source.shape[0]
    narrowed = spans.shape[0] > 0
    for y in range(first, last):
        low, high = left, right
        if narrowed:
            low, high = max(left, spans[y, 0]), min(right, spans[y, 1])
        for start in range(low, high, SNAPPED_COLUMNS_AT_ONCE):
            stop = min(start + SNAPPED_COLUMNS_AT_ONCE, high)
            count = stop - start
            row = y * row_step + start
            at = pad + start
            paired = channels - channels % 2
            for c in range(0, paired, 2):
                _two_channels(source[c], source[c + 1], target[c, pad + y, at : at + count],
                              target[c + 1, pad + y, at : at + count], weights, plane_step, row, rows_off, cols_off,
                              pad + y, at, count)
            if paired < channels:
                _one_channel(source[paired], target[paired, pad + y, at : at + count], weights, plane_step, row,
                             rows_off, cols_off, pad + y, at, count)
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


@njit(inline="always", nogil=True, cache=True, boundscheck=False, error_model="numpy")
def _eight_weights(weights, plane_step, row, k, count):
    """The weights of neighbours k..k + 7 over ``count`` columns from flat index ``row`` (see :func:`weighted_rows`)."""
    return (weights[k * plane_step + row : k * plane_step + row + count],
            weights[(k + 1) * plane_step + row : (k + 1) * plane_step + row + count],
            weights[(k + 2) * plane_step + row : (k + 2) * plane_step + row + count],
            weights[(k + 3) * plane_step + row : (k + 3) * plane_step + row + count],
            weights[(k + 4) * plane_step + row : (k + 4) * plane_step + row + count],
            weights[(k + 5) * plane_step + row : (k + 5) * plane_step + row + count],
            weights[(k + 6) * plane_step + row : (k + 6) * plane_step + row + count],
            weights[(k + 7) * plane_step + row : (k + 7) * plane_step + row + count])


@njit(inline="always", nogil=True, cache=True, boundscheck=False, error_model="numpy")
def _eight_neighbours(plane, rows_off, cols_off, k, y, at, count):
    """Neighbours k..k + 7 of ``count`` values of padded row ``y`` from column ``at`` of ``plane``."""
    return (plane[rows_off[k] + y, at + cols_off[k] : at + cols_off[k] + count],
            plane[rows_off[k + 1] + y, at + cols_off[k + 1] : at + cols_off[k + 1] + count],
            plane[rows_off[k + 2] + y, at + cols_off[k + 2] : at + cols_off[k + 2] + count],
            plane[rows_off[k + 3] + y, at + cols_off[k + 3] : at + cols_off[k + 3] + count],
            plane[rows_off[k + 4] + y, at + cols_off[k + 4] : at + cols_off[k + 4] + count],
            plane[rows_off[k + 5] + y, at + cols_off[k + 5] : at + cols_off[k + 5] + count],
            plane[rows_off[k + 6] + y, at + cols_off[k + 6] : at + cols_off[k + 6] + count],
            plane[rows_off[k + 7] + y, at + cols_off[k + 7] : at + cols_off[k + 7] + count])


@njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
def _one_channel(plane, out, weights, plane_step, row, rows_off, cols_off, y, at, count):
    """``out`` (``count`` values of row ``y`` from column ``at`` of a padded plane) = the weighted sum of their
    neighbours in ``plane``, eight neighbours a pass (see :func:`weighted_rows`)."""
    neighbours = rows_off.shape[0]
    k = 0
    while k + 8 <= neighbours:
        w0, w1, w2, w3, w4, w5, w6, w7 = _eight_weights(weights, plane_step, row, k, count)
        n0, n1, n2, n3, n4, n5, n6, n7 = _eight_neighbours(plane, rows_off, cols_off, k, y, at, count)
        if k == 0:
            for x in range(count):
                sum4 = fused_multiply_add(w3[x], n3[x], fused_multiply_add(
                    w2[x], n2[x], fused_multiply_add(w1[x], n1[x], n0[x] * w0[x])))
                out[x] = fused_multiply_add(w7[x], n7[x], fused_multiply_add(w6[x], n6[x], fused_multiply_add(
                    w5[x], n5[x], fused_multiply_add(w4[x], n4[x], sum4))))
        else:
            for x in range(count):
                sum4 = fused_multiply_add(w3[x], n3[x], fused_multiply_add(w2[x], n2[x], fused_multiply_add(
                    w1[x], n1[x], fused_multiply_add(w0[x], n0[x], out[x]))))
                out[x] = fused_multiply_add(w7[x], n7[x], fused_multiply_add(w6[x], n6[x], fused_multiply_add(
                    w5[x], n5[x], fused_multiply_add(w4[x], n4[x], sum4))))
        k += 8
    while k < neighbours:   # neighbours beyond a multiple of eight: a pass each
        weight = weights[k * plane_step + row : k * plane_step + row + count]
        near = plane[rows_off[k] + y, at + cols_off[k] : at + cols_off[k] + count]
        if k == 0:
            for x in range(count):
                out[x] = near[x] * weight[x]
        else:
            for x in range(count):
                out[x] = fused_multiply_add(weight[x], near[x], out[x])
        k += 1


@njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
def _two_channels(plane, other, out, other_out, weights, plane_step, row, rows_off, cols_off, y, at, count):
    """:func:`_one_channel` for two planes at once: each pass reads the eight neighbours' weights once for both
    (whole rows of weights do not stay in the fastest cache from one channel to the next). Each value is computed
    as :func:`_one_channel` computes it."""
    neighbours = rows_off.shape[0]
    if neighbours % 8:   # the passes of one neighbour each stay a channel at a time
        _one_channel(plane, out, weights, plane_step, row, rows_off, cols_off, y, at, count)
        _one_channel(other, other_out, weights, plane_step, row, rows_off, cols_off, y, at, count)
        return
    for k in range(0, neighbours, 8):
        w0, w1, w2, w3, w4, w5, w6, w7 = _eight_weights(weights, plane_step, row, k, count)
        a0, a1, a2, a3, a4, a5, a6, a7 = _eight_neighbours(plane, rows_off, cols_off, k, y, at, count)
        b0, b1, b2, b3, b4, b5, b6, b7 = _eight_neighbours(other, rows_off, cols_off, k, y, at, count)
        first = k == 0   # the first pass starts from the first neighbour's product
        for x in range(count):
            p = a0[x] * w0[x] if first else fused_multiply_add(w0[x], a0[x], out[x])
            q = b0[x] * w0[x] if first else fused_multiply_add(w0[x], b0[x], other_out[x])
            p = fused_multiply_add(w1[x], a1[x], p)
            q = fused_multiply_add(w1[x], b1[x], q)
            p = fused_multiply_add(w2[x], a2[x], p)
            q = fused_multiply_add(w2[x], b2[x], q)
            p = fused_multiply_add(w3[x], a3[x], p)
            q = fused_multiply_add(w3[x], b3[x], q)
            p = fused_multiply_add(w4[x], a4[x], p)
            q = fused_multiply_add(w4[x], b4[x], q)
            p = fused_multiply_add(w5[x], a5[x], p)
            q = fused_multiply_add(w5[x], b5[x], q)
            p = fused_multiply_add(w6[x], a6[x], p)
            q = fused_multiply_add(w6[x], b6[x], q)
            out[x] = fused_multiply_add(w7[x], a7[x], p)
            other_out[x] = fused_multiply_add(w7[x], b7[x], q)


@njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
def guide_spread(padded, dilations, pad, origin, spread, top, bottom):
    """Rows ``top``..``bottom`` of each guide channel's variance over its 3 x 3 neighbourhoods at every dilation
    (centre included; the sum of squares divided by their count less one), into ``spread`` (channels, rows,
    width; row y at y - ``origin``). ``padded``: the whole guide, padded by ``pad`` (its border repeating its
    edges).

    Each of the nine neighbours is a view of its own that the loops index by the column alone: indexing one row at
    column + d, with d known only when running, made the compiler gather the values one by one (2.4x slower)."""
    channels, width = padded.shape[0], spread.shape[2]
    count = 9 * dilations.shape[0]
    mean = np.empty(COLUMNS_AT_ONCE, np.float32)
    for c in range(channels):
        for y in range(top, bottom):
            variance_row = spread[c, y - origin]
            for start in range(0, width, COLUMNS_AT_ONCE):
                n = min(start + COLUMNS_AT_ONCE, width) - start
                variance = variance_row[start:]
                for number in range(dilations.shape[0]):
                    a0, a1, a2, m0, m1, m2, b0, b1, b2 = _window(padded[c], pad + y, pad + start, dilations[number])
                    # rows of three, then three rows: the order of the element-wise window sums
                    if number == 0:
                        for x in range(n):
                            mean[x] = (((a0[x] + a1[x]) + a2[x]) + ((m0[x] + m1[x]) + m2[x])) + ((b0[x] + b1[x]) + b2[x])
                    else:
                        for x in range(n):
                            mean[x] = mean[x] + ((((a0[x] + a1[x]) + a2[x]) + ((m0[x] + m1[x]) + m2[x]))
                                                 + ((b0[x] + b1[x]) + b2[x]))
                for x in range(n):
                    mean[x] = mean[x] / np.float32(count)
                    variance[x] = np.float32(0.0)
                for number in range(dilations.shape[0]):
                    a0, a1, a2, m0, m1, m2, b0, b1, b2 = _window(padded[c], pad + y, pad + start, dilations[number])
                    for x in range(n):   # the nine squares in the element-wise order: row by row
                        mu = mean[x]
                        total = variance[x]
                        total = fused_multiply_add(a0[x] - mu, a0[x] - mu, total)
                        total = fused_multiply_add(a1[x] - mu, a1[x] - mu, total)
                        total = fused_multiply_add(a2[x] - mu, a2[x] - mu, total)
                        total = fused_multiply_add(m0[x] - mu, m0[x] - mu, total)
                        total = fused_multiply_add(m1[x] - mu, m1[x] - mu, total)
                        total = fused_multiply_add(m2[x] - mu, m2[x] - mu, total)
                        total = fused_multiply_add(b0[x] - mu, b0[x] - mu, total)
                        total = fused_multiply_add(b1[x] - mu, b1[x] - mu, total)
                        variance[x] = fused_multiply_add(b2[x] - mu, b2[x] - mu, total)
                for x in range(n):
                    variance[x] = variance[x] / np.float32(count - 1)


@njit(inline="always", nogil=True, cache=True, boundscheck=False, error_model="numpy")
def _window(plane, y, x, d):
    """The nine values around padded (``y``, ``x``) of ``plane`` at dilation ``d``, row by row, each a view from its
    own column on."""
    above, middle, below = plane[y - d], plane[y], plane[y + d]
    return (above[x - d:], above[x:], above[x + d:], middle[x - d:], middle[x:], middle[x + d:],
            below[x - d:], below[x:], below[x + d:])


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
def filled_tiles(labels, margin_bits, fill, tile_labels, tile_margin_bits, tile, first, last):
    """For the tile rows ``first``..``last``: each tile set in ``fill`` (whole tiles, the first at the top left of
    ``labels``) gets its one label and its margin's float16 bits throughout, a row of the tile at a time (where
    NumPy's masked copy tests every pixel's flag)."""
    for ty in range(first, last):
        for y in range(ty * tile, (ty + 1) * tile):
            label_row = labels[y]
            margin_row = margin_bits[y]
            for tx in range(fill.shape[1]):
                if fill[ty, tx]:
                    label = tile_labels[ty, tx]
                    bits = tile_margin_bits[ty, tx]
                    for x in range(tx * tile, (tx + 1) * tile):
                        label_row[x] = label
                        margin_row[x] = bits


@njit(nogil=True, cache=True, boundscheck=False)
def values_seen(flat, seen, first, last):
    """``seen[value]`` set for every value of ``flat[first:last]`` (uint8: ``seen`` holds 256)."""
    for i in range(first, last):
        seen[flat[i]] = True


@njit(nogil=True, cache=True, boundscheck=False)
def half_bits(bits):
    """The float16 bits nearest the float32 of ``bits`` (uint32), ties to even: NumPy's and PyTorch's conversion."""
    sign = (bits >> 16) & 0x8000
    size = bits & 0x7FFFFFFF
    if size >= 0x7F800000:                       # infinite, or not a number
        return sign | 0x7C00 | (0x200 if size > 0x7F800000 else 0)
    if size >= 0x477FF000:                       # 65520 and above round to infinity
        return sign | 0x7C00
    if size >= 0x38800000:                       # a normal float16: 13 bits dropped, ties to even
        return sign | ((size + 0xFFF + ((size >> 13) & 1) - 0x38000000) >> 13)
    if size <= 0x33000000:                       # 2^-25 and below round to zero
        return sign
    shift = 126 - (size >> 23)                   # a subnormal float16: its significand in steps of 2^-24
    significand = (size & 0x7FFFFF) | 0x800000
    steps = significand >> shift
    rest = significand & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    if rest > half or (rest == half and (steps & 1)):
        steps += 1
    return sign | steps


@njit(nogil=True, cache=True, boundscheck=False)
def float_bits_of_half(bits):
    """The float32 bits of the float16 of ``bits`` (uint16): exact."""
    sign = (np.uint32(bits) & 0x8000) << 16
    exponent = (np.uint32(bits) >> 10) & 0x1F
    mantissa = np.uint32(bits) & 0x3FF
    if exponent == 0x1F:                         # infinite, or not a number
        return sign | 0x7F800000 | (mantissa << 13)
    if exponent:
        return sign | ((exponent + 112) << 23) | (mantissa << 13)
    if mantissa == 0:
        return sign
    shift = 0                                    # a subnormal float16: a normal float32
    while not (mantissa & 0x400):
        mantissa <<= 1
        shift += 1
    return sign | ((113 - shift) << 23) | ((mantissa & 0x3FF) << 13)


@njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
def class_values_of_tile(values, planes, row_steps, origins, exact, query_class, reference_class, top, bottom, left,
                         right):
    """``values[c, y - top, x - left]``: class c's best query over the tile's pixels, -inf where none counts, the
    reference class at least 0 (see :func:`leaders_of_tiles`)."""
    negative = np.float32(-np.inf)
    count = right - left
    for c in range(values.shape[0]):
        start = np.float32(0.0) if c == reference_class else negative
        for y in range(bottom - top):
            for x in range(count):
                values[c, y, x] = start
    for q in range(len(planes)):   # a plane taken from the list once a tile: each taking counts a reference
        a, b = max(left, exact[q, 2]), min(right, exact[q, 3])
        rows_from, rows_to = max(top, exact[q, 0]), min(bottom, exact[q, 1])
        if a >= b or rows_from >= rows_to:
            continue
        plane, step = planes[q], row_steps[q]
        for y in range(rows_from, rows_to):
            start = (y - origins[q, 0]) * step + a - origins[q, 1]
            row = plane[start : start + b - a]
            own = values[query_class[q], y - top, a - left : b - left]
            for x in range(b - a):
                own[x] = row[x] if row[x] > own[x] else own[x]


@njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
def leaders_of_tiles(planes, row_steps, origins, exact, query_class, reference_class, classes, tiles, tile, gaps,
                     tolerance, labels, margin_bits, winners, keep_winners, present, first, last):
    """Tiles ``first``..``last`` of ``tiles`` (n, 2): each pixel's label (1 + the class whose best query leads, the
    first class on ties), its margin over the runner-up at most the tile's gap, less ``tolerance``, in float16 a
    step below (the bits into ``margin_bits``) and the winner's value (into ``winners`` with ``keep_winners``); and
    which labels occur in each tile (``present``).

    Query q's values are ``planes[q]`` (flat: value (y, x) at ``y * row_steps[q] + x``, its rows contiguous), its
    first value at ``origins[q]`` of the image; they count only within ``exact[q]`` (top, bottom, left, right). The
    reference class scores at least 0 everywhere, a class with no query there nothing."""
    height, width = labels.shape
    negative = np.float32(-np.inf)
    scale, floor, highest = np.float32(2.0 ** -10), np.float32(2.0 ** -24), np.float32(65504.0)
    values = np.empty((classes, tile, tile), np.float32)   # each class's best over a tile
    best = np.empty(tile, np.float32)
    second = np.empty(tile, np.float32)
    index = np.empty(tile, np.int64)
    lowered = np.empty(tile, np.float32)
    lowered_bits = lowered.view(np.uint32)
    for n in range(first, last):
        ty, tx = tiles[n, 0], tiles[n, 1]
        top, left = ty * tile, tx * tile
        bottom, right = min(top + tile, height), min(left + tile, width)
        count = right - left
        seen = present[ty, tx]
        seen[:] = False
        gap = gaps[ty, tx]
        class_values_of_tile(values, planes, row_steps, origins, exact, query_class, reference_class, top, bottom,
                             left, right)
        for y in range(top, bottom):
            line = y - top
            for x in range(count):
                best[x] = values[0, line, x]
                second[x] = negative
                index[x] = 0
            for c in range(1, classes):
                for x in range(count):
                    value, leader = values[c, line, x], best[x]
                    rises = value > leader
                    second[x] = leader if rises else (value if value > second[x] else second[x])
                    best[x] = value if rises else leader
                    index[x] = c if rises else index[x]
            label_row, bits_row = labels[y, left:right], margin_bits[y, left:right]
            for x in range(count):
                margin = best[x] - second[x]
                if margin > gap:
                    margin = gap
                margin = margin - tolerance
                if np.isfinite(margin):   # lowered by more than half a float16 step, then rounded: still below
                    margin = min((margin - abs(margin) * scale) - floor, highest)
                lowered[x] = margin
                label_row[x] = index[x] + 1
                seen[index[x] + 1] = True
            for x in range(count):
                bits_row[x] = half_bits(lowered_bits[x])
            if keep_winners:
                winners[y, left:right] = best[:count]


@njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
def lowered_half_bits(margin, tolerance, number, bits):
    """``margin`` less ``tolerance``, then lowered by more than half a float16 step and rounded: float16 bits at
    most the value (``tiled_labels._half_below``'s arithmetic). ``number``, ``bits``: a float32 scratch value and a
    uint32 view of it."""
    margin = margin - tolerance
    if np.isfinite(margin):
        margin = min((margin - abs(margin) * np.float32(2.0 ** -10)) - np.float32(2.0 ** -24),
                     np.float32(65504.0))
    number[0] = margin
    return half_bits(bits[0])


@njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
def challenged_tiles(planes, row_steps, origins, exact, query_class, reference_class, classes, tiles, tile, gaps,
                     tolerance, challengers, own_allowed, trust_winners, fallback, reference_known, labels,
                     margin_bits, winners, present, first, last):
    """Tiles ``first``..``last`` of ``tiles`` (n, 2) in a run that starts from the previous one's labels: each
    pixel's previous winner against the ``challengers`` classes (not its own), in class order, a challenger winning
    where it is higher or equal and of a lower class (argmax's first class on ties).

    The winner's value starts as the kept one (``winners``) in the tiles of ``trust_winners``; elsewhere as its own
    class's value (classes of ``own_allowed`` only; -inf otherwise), and with ``fallback`` the kept one where that
    is -inf. The runner-up starts the pixel's margin below it. The reference class's value counts only in the
    tiles of ``reference_known``. Labels, margins (as :func:`leaders_of_tiles`), winners and ``present`` are
    written in place. Values of queries as in :func:`leaders_of_tiles`."""
    height, width = labels.shape
    negative = np.float32(-np.inf)
    values = np.empty((classes, tile, tile), np.float32)
    number = np.empty(1, np.float32)
    bits = number.view(np.uint32)
    for n in range(first, last):
        ty, tx = tiles[n, 0], tiles[n, 1]
        top, left = ty * tile, tx * tile
        bottom, right = min(top + tile, height), min(left + tile, width)
        seen = present[ty, tx]
        seen[:] = False
        gap = gaps[ty, tx]
        trusted = trust_winners[ty, tx]
        class_values_of_tile(values, planes, row_steps, origins, exact, query_class, reference_class, top, bottom,
                             left, right)
        if not reference_known[ty, tx]:
            values[reference_class, :, :] = negative
        for y in range(top, bottom):
            line = y - top
            for x in range(left, right):
                label = np.int64(labels[y, x])
                if trusted:
                    best = winners[y, x]
                else:
                    best = values[label - 1, line, x - left] if own_allowed[label - 1] else negative
                    if fallback and not np.isfinite(best):
                        best = winners[y, x]
                bits[0] = float_bits_of_half(margin_bits[y, x])
                second = best - number[0]
                previous = label
                for c in range(classes):
                    if not challengers[c] or c + 1 == previous:
                        continue
                    value = values[c, line, x - left]
                    if value > best or (value == best and label > c + 1):
                        second = max(second, best)
                        best = value
                        label = c + 1
                    else:
                        second = max(second, value)
                margin = best - second
                if margin > gap:
                    margin = gap
                margin_bits[y, x] = lowered_half_bits(margin, tolerance, number, bits)
                labels[y, x] = label
                winners[y, x] = best
                seen[label] = True


@njit(nogil=True, cache=True, boundscheck=False)
def lower_half_bits(value, number, number_bits):
    """The float16 bits of ``value`` (float32) rounded to the nearest, then a step down where that lands above it:
    ``tiled_labels.lower_half``. ``number``, ``number_bits``: a float32 scratch value and a uint32 view of it (a
    scratch array made per call cost more than the rest of the pixel's judging)."""
    number[0] = value
    bits = half_bits(number_bits[0])
    number_bits[0] = float_bits_of_half(bits)
    if number[0] > value:   # one float16 step towards -inf
        if bits == 0x0000 or bits == 0x8000:
            return 0x8001
        return bits - 1 if bits < 0x8000 else bits + 1
    return bits


@njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
def judged_tiles(labels, margin_bits, winners, rescued, ys, xs, tile, threshold, shrinks, new_leads, new_others,
                 highest, allowance, dirty, first, last):
    """Whole tiles ``first``..``last`` at (``ys``, ``xs``): ``dirty[n]`` where some pixel's margin is not above its
    label's ``threshold`` (nor, with ``rescued``, its winner's value above its label's ``highest``); in each tile
    that keeps its labels, each margin lowered in place to a bound for the next run (see
    ``tiled_labels._TileBounds.judge``, whose arithmetic this repeats value by value)."""
    negative = np.float32(-np.inf)
    number = np.empty(1, np.float32)
    bits = number.view(np.uint32)
    for n in range(first, last):
        ty, tx = ys[n], xs[n]
        top, left = ty * tile, tx * tile
        keeps_all = True
        for y in range(top, top + tile):
            for x in range(left, left + tile):
                label = labels[y, x]
                bits[0] = float_bits_of_half(margin_bits[y, x])
                if number[0] > threshold[ty, tx, label]:
                    continue
                if rescued:
                    bound = highest[ty, tx, label]
                    if np.isfinite(bound) and winners[y, x] - bound > 0:
                        continue
                keeps_all = False
                break
            if not keeps_all:
                break
        dirty[n] = not keeps_all
        if not keeps_all:
            continue
        for y in range(top, top + tile):
            for x in range(left, left + tile):
                label = labels[y, x]
                bits[0] = float_bits_of_half(margin_bits[y, x])
                margin = number[0]
                kept = margin - shrinks[ty, tx, label]
                if rescued:
                    bound = highest[ty, tx, label]
                    above = winners[y, x] - bound if np.isfinite(bound) else negative
                    lower = margin if margin < above else above
                    kept = kept if kept > lower else lower
                for i in range(new_leads.shape[0]):
                    other = new_others[i, ty, tx, label]
                    through = negative if other == negative else kept + other
                    lead = new_leads[i, ty, tx, label]
                    against = lead if lead > through else through
                    kept = kept if kept < against else against
                margin_bits[y, x] = lower_half_bits(kept - allowance, number, bits)
