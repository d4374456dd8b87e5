"""Checking user images and turning them into normalised RGB tensors the way the official pipeline does."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InvalidImageError

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


def to_rgb_255(array: np.ndarray, contrast_limits: Sequence[float] | None = None) -> tuple[torch.Tensor, bool]:
    """(3, H, W) float32 intensities in 0..255 and whether they are whole uint8 values.

    uint8 images pass unchanged; others are scaled by ``contrast_limits`` when
    given, else by their own range. Grey is repeated to RGB; alpha is dropped.
    """
    if array.ndim == 3:
        array = array[..., :3]
    if contrast_limits is not None:
        low, high = (float(v) for v in contrast_limits)
        if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
            raise InvalidImageError(f"Contrast limits {tuple(contrast_limits)} are invalid: the upper limit must exceed the lower.")
    if array.dtype == np.uint8 and (contrast_limits is None or (low, high) == (0.0, 255.0)):
        data = torch.from_numpy(np.ascontiguousarray(array)).float()
        whole = True
    else:
        if contrast_limits is None:
            low, high = float(array.min()), float(array.max())
        data = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        span = high - low
        data = ((data - low) * (255.0 / span)).clamp_(0, 255) if span > 0 else torch.zeros_like(data)
        whole = False
    data = data.unsqueeze(0).expand(3, -1, -1) if data.ndim == 2 else data.permute(2, 0, 1)
    return data.contiguous(), whole


def resized_size(height: int, width: int, short_side: int | None, long_side: int = LONG_SIDE_CAP) -> tuple[int, int]:
    """The official keep-ratio rescale: short side to ``short_side``, long side at most ``long_side``."""
    if short_side is None:
        return height, width
    scale = min(long_side / max(height, width), short_side / min(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def prepare(
    array: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    short_side: int | None = 448,
    contrast_limits: Sequence[float] | None = None,
) -> torch.Tensor:
    """Resize (bilinear) and normalise an image into a (3, h, w) float32 tensor."""
    rgb, whole = to_rgb_255(array, contrast_limits)
    size = resized_size(rgb.shape[1], rgb.shape[2], short_side)
    if size != tuple(rgb.shape[1:]):
        rgb = F.interpolate(rgb[None], size=size, mode="bilinear", align_corners=False)[0]
        if whole:  # the official pipeline resizes the uint8 image and keeps it uint8
            rgb = rgb.round_().clamp_(0, 255)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (rgb - mean_t) / std_t
