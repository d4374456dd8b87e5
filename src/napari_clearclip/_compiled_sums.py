"""The loop of :mod:`.neighbour_sums`, compiled by numba when first used (and cached on disk by it)."""

from __future__ import annotations

from numba import njit, types
from numba.extending import intrinsic

#: Columns of a row finished together: the channels' outputs of that many columns stay in the fastest cache.
COLUMNS_AT_ONCE = 256


@intrinsic
def fused_multiply_add(typing_context, a, b, c):
    """a x b + c rounded once, as PyTorch's vectorised addcmul computes it."""
    signature = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, sig, args):
        return builder.fma(*args)
    return signature, codegen


@njit(nogil=True, cache=True, boundscheck=False)
def weighted_rows(source, target, weights, plane_step, row_step, rows_off, cols_off, pad, width, first, last):
    """Rows ``first``..``last`` of the interior of ``target`` = the weighted sum of each pixel's neighbours in
    ``source`` at offsets (``rows_off``, ``cols_off``); both padded by ``pad``. Neighbour k's weight at (y, x) is
    ``weights[k * plane_step + y * row_step + x]`` (a flat view: weights cut out of a larger region keep their rows
    contiguous, which the compiled loop then knows)."""
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
