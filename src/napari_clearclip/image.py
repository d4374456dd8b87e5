"""Checking user images and turning them into normalised RGB tensors the way the official pipeline does."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InvalidImageError, InvalidOptionError

LONG_SIDE_CAP = 2048


def check_image(image, min_side: int = 16) -> np.ndarray:
    """Return ``image`` as a numpy array of shape (H, W), (H, W, 3) or (H, W, 4), or raise a clear error."""
    try:
        array = np.asarray(image)
    except Exception as exc:
        raise InvalidImageError(f"Could not read the image as an array: {exc}") from None
    if array.dtype == bool or array.dtype.kind not in "uif":
        raise InvalidImageError(
            f"Images of dtype {array.dtype} are not supported: use uint8, uint16 or float (e.g. image.astype(np.float32))."
        )
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        hint = ""
        if array.ndim == 3 and array.shape[0] in (3, 4):
            hint = " It looks channels-first: move the channels last with np.moveaxis(image, 0, -1)."
        elif array.ndim >= 3:
            hint = " For a stack or multichannel image, segment one 2-D slice (or pick one or three channels) at a time."
        raise InvalidImageError(
            f"Image of shape {array.shape} is not supported: expected (H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA.{hint}"
        )
    height, width = array.shape[:2]
    if min(height, width) < min_side:
        raise InvalidImageError(f"Image of {height}x{width} pixels is too small: each side needs at least {min_side} pixels.")
    if array.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise InvalidImageError(
                f"The image holds {bad} NaN or infinite values: replace them first, e.g. np.nan_to_num(image)."
            )
    return array


def check_contrast_limits(contrast_limits) -> tuple[float, float] | None:
    """``None`` or two finite numbers, low < high, as a tuple of floats."""
    if contrast_limits is None:
        return None
    try:
        values = [float(v) for v in contrast_limits]
        if isinstance(contrast_limits, (str, bytes)) or len(values) != 2:
            raise TypeError
    except (TypeError, ValueError):
        raise InvalidOptionError(
            f"contrast_limits={contrast_limits!r} must be two numbers (low, high), e.g. (0, 4095), or None for the image's range."
        ) from None
    low, high = values
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        raise InvalidOptionError(f"Contrast limits {tuple(values)} are invalid: both must be finite and the upper "
                                 "limit must exceed the lower.")
    return low, high


def _scaled_to_255(array: np.ndarray, low: float, high: float) -> np.ndarray:
    """(array - low) / (high - low) * 255 clipped to 0..255, without overflow for any finite values."""
    if array.dtype.kind == "f" and array.dtype.itemsize > 4:
        # float64 beyond float32's range (or a span that overflows) must be scaled before the cast
        half = np.asarray(array, dtype=np.float64) * 0.5
        span = high * 0.5 - low * 0.5
        scaled = (half - low * 0.5) * (255.0 / span) if span > 0 else np.zeros_like(half)
        return np.clip(scaled, 0, 255).astype(np.float32)
    data = np.asarray(array, dtype=np.float32)
    span = high - low
    if span <= 0 or not math.isfinite(span):
        return np.zeros(data.shape, dtype=np.float32)
    return np.clip((data - np.float32(low)) * np.float32(255.0 / span), 0, 255)


def to_rgb_255(array: np.ndarray, contrast_limits: Sequence[float] | None = None,
               own_range: tuple[float, float] | None = None) -> tuple[torch.Tensor, bool]:
    """(3, H, W) float32 intensities in 0..255 and whether they are whole uint8 values.

    uint8 images pass unchanged; others are scaled by ``contrast_limits`` when
    given, else by their own range (``own_range`` when the array is a part of the image whose range
    that is). Grey is repeated to RGB; alpha is dropped.
    """
    if array.ndim == 3:
        array = array[..., :3]
    contrast_limits = check_contrast_limits(contrast_limits)
    # channels first while still in the input's own (smaller) type: one float32 copy at full size, not two
    planar = np.ascontiguousarray(np.moveaxis(array, -1, 0) if array.ndim == 3 else array)
    if array.dtype == np.uint8 and (contrast_limits is None or contrast_limits == (0.0, 255.0)):
        data = torch.from_numpy(planar).float()
        whole = True
    else:
        low, high = (contrast_limits if contrast_limits is not None else own_range if own_range is not None
                     else (float(array.min()), float(array.max())))
        data = torch.from_numpy(np.ascontiguousarray(_scaled_to_255(planar, low, high)))
        whole = False
    return (data.unsqueeze(0).expand(3, -1, -1).contiguous() if data.ndim == 2 else data), whole


def contrast_identity(array, contrast_limits: Sequence[float] | None) -> list[float] | None:
    """The contrast limits as they change what the model sees: None where they change nothing, as for a uint8 image
    at 0-255 or an image held in memory at its own range (what napari gives such layers by default), so that the
    same pixels segmented in napari and by the command line share their stored features."""
    limits = check_contrast_limits(contrast_limits)
    if limits is None:
        return None
    dtype = np.dtype(array.dtype)
    if dtype == np.uint8 and limits == (0.0, 255.0):
        return None
    if isinstance(array, np.ndarray) and array.size and dtype.kind in "uif":
        colour = array[..., :3] if array.ndim == 3 else array
        if (float(colour.min()), float(colour.max())) == limits:
            return None
    return list(limits)


def resized_size(height: int, width: int, short_side: int | None, long_side: int = LONG_SIDE_CAP) -> tuple[int, int]:
    """The official keep-ratio rescale: short side to ``short_side``, long side at most ``long_side``."""
    if short_side is None:
        return height, width
    scale = min(long_side / max(height, width), short_side / min(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def rows_read_by_resize(height: int, out_height: int) -> np.ndarray | None:
    """The input rows a bilinear resize (align_corners=False) of ``height`` rows to ``out_height`` reads, or None
    when they are most of them.

    Checked against PyTorch's own resize: a column with every other row NaN must come out free of NaN
    (a weight of zero on a NaN still gives NaN), else None.
    """
    scale = torch.tensor(height / out_height, dtype=torch.float32)
    source = ((torch.arange(out_height, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_(min=0)
    low = source.long().clamp_(max=height - 1)
    rows = torch.unique(torch.cat([low, (low + 1).clamp_(max=height - 1)]))
    if 2 * len(rows) > height:
        return None
    probe = torch.full((1, 1, height, 1), float("nan"))
    probe[0, 0, rows] = 0.0
    read = F.interpolate(probe, size=(out_height, 1), mode="bilinear", align_corners=False)
    return None if bool(torch.isnan(read).any()) else rows.numpy()


def _resized_rgb_255(array: np.ndarray, size: tuple[int, int], contrast_limits) -> tuple[torch.Tensor, bool]:
    """:func:`to_rgb_255` resized (bilinear) to ``size``, bit for bit, converting only the rows the resize reads.

    Shrinking 4096 rows to 256 reads 512 of them: the other rows of the float image are left unwritten (and
    never read), which spares converting and copying most of a large image (0.15 against 0.03 s at 4096^2).
    """
    rows = rows_read_by_resize(array.shape[0], size[0])
    if rows is None:
        rgb, whole = to_rgb_255(array, contrast_limits)
        return F.interpolate(rgb[None], size=size, mode="bilinear", align_corners=False)[0], whole
    colour = array[..., :3] if array.ndim == 3 else array
    own_range = (float(colour.min()), float(colour.max())) if contrast_limits is None and colour.dtype != np.uint8 \
        else None  # the whole image's range, as to_rgb_255 takes it
    picked, whole = to_rgb_255(colour[rows], contrast_limits, own_range)
    full = torch.empty((picked.shape[0], array.shape[0], array.shape[1]), dtype=picked.dtype)
    full[:, torch.from_numpy(rows)] = picked
    return F.interpolate(full[None], size=size, mode="bilinear", align_corners=False)[0], whole


def prepare(
    array: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    short_side: int | None = 448,
    contrast_limits: Sequence[float] | None = None,
) -> torch.Tensor:
    """Resize (bilinear) and normalise an image into a (3, h, w) float32 tensor."""
    return prepare_with_intensities(array, mean, std, short_side, contrast_limits)[0]


def prepare_with_intensities(
    array: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    short_side: int | None = 448,
    contrast_limits: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`prepare`'s pixels, and the uint8 (3, h, w) intensities they normalise when the image is uint8 (None
    otherwise): what :func:`whole_rgb` would recover from the pixels, known here without checking them."""
    size = resized_size(array.shape[0], array.shape[1], short_side)
    if size != tuple(array.shape[:2]):
        rgb, whole = _resized_rgb_255(array, size, contrast_limits)
        if whole:  # the official pipeline resizes the uint8 image and keeps it uint8
            rgb = rgb.round_().clamp_(0, 255)
    else:
        rgb, whole = to_rgb_255(array, contrast_limits)
    return normalise(rgb, mean, std), (rgb.to(torch.uint8) if whole else None)


def normalise(rgb: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(3, h, w) intensities in 0..255 (any dtype) as the model takes them: (rgb - mean) / std, in float32."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (rgb.float() - mean_t).div_(std_t)  # divided in place: one full-size copy, not two


def whole_rgb(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              rows_at_once: int = 256) -> torch.Tensor | None:
    """The uint8 (3, h, w) intensities that :func:`normalise` turns into exactly ``pixels``, or None when there are
    none (an image that was not whole values 0..255 at this size, e.g. a float image scaled by its range).

    A uint8 image resized by :func:`prepare` stays whole, so its prepared pixels keep in a quarter of the bytes,
    bit for bit. Checked ``rows_at_once`` rows at a time: a large image at its own size needs no full-size
    temporary copies.
    """
    if pixels.dtype != torch.float32 or pixels.ndim != 3 or pixels.shape[0] != 3:
        return None
    pixels = pixels.cpu()
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    whole = torch.empty(pixels.shape, dtype=torch.uint8)
    for top in range(0, pixels.shape[1], rows_at_once):
        part = pixels[:, top : top + rows_at_once]
        rgb = (part * std_t + mean_t).round_()
        if not bool(torch.isfinite(rgb).all()) or float(rgb.min()) < 0 or float(rgb.max()) > 255:
            return None
        whole[:, top : top + rows_at_once] = rgb.to(torch.uint8)
        if not torch.equal(normalise(whole[:, top : top + rows_at_once], mean, std), part):
            return None
    return whole
