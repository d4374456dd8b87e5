"""The official sliding-window geometry: crops, strides, edge shifting and patch padding."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


def _starts(size: int, crop: int, stride: int) -> list[tuple[int, int]]:
    count = max(size - crop + stride - 1, 0) // stride + 1
    spans = []
    for index in range(count):
        end = min(index * stride + crop, size)
        spans.append((max(end - crop, 0), end))
    return spans


def _pad(size: int, patch: int) -> tuple[int, int]:
    """Zero padding up to a multiple of the patch size, split evenly (extra on the far side)."""
    if size % patch == 0:
        return 0, 0
    total = patch - size % patch
    return total // 2, total - total // 2


@dataclass(frozen=True)
class WindowGrid:
    """Windows over an image of ``height`` x ``width``; all windows have the same size."""

    height: int
    width: int
    crop: int
    stride: int
    patch: tuple[int, int]

    @cached_property
    def rows(self) -> list[tuple[int, int]]:
        return _starts(self.height, self.crop, self.stride)

    @cached_property
    def cols(self) -> list[tuple[int, int]]:
        return _starts(self.width, self.crop, self.stride)

    @cached_property
    def windows(self) -> list[tuple[int, int, int, int]]:
        """(y1, y2, x1, x2) of each window, row by row."""
        return [(y1, y2, x1, x2) for (y1, y2) in self.rows for (x1, x2) in self.cols]

    @property
    def window_size(self) -> tuple[int, int]:
        return min(self.crop, self.height), min(self.crop, self.width)

    @property
    def padding(self) -> tuple[int, int, int, int]:
        """(left, right, top, bottom) zero padding of each window."""
        h, w = self.window_size
        top, bottom = _pad(h, self.patch[0])
        left, right = _pad(w, self.patch[1])
        return left, right, top, bottom

    @property
    def padded_size(self) -> tuple[int, int]:
        left, right, top, bottom = self.padding
        h, w = self.window_size
        return h + top + bottom, w + left + right

    @property
    def patch_grid(self) -> tuple[int, int]:
        h, w = self.padded_size
        return h // self.patch[0], w // self.patch[1]

    def coverage(self) -> tuple[torch.Tensor, torch.Tensor]:
        """How many windows cover each row and each column; a pixel's count is their product."""
        rows = torch.zeros(self.height)
        cols = torch.zeros(self.width)
        for y1, y2 in self.rows:
            rows[y1:y2] += 1
        for x1, x2 in self.cols:
            cols[x1:x2] += 1
        return rows, cols

    def crop_batch(self, image: torch.Tensor, windows: list[tuple[int, int, int, int]]) -> torch.Tensor:
        """Stack the given windows of a (3, H, W) image, zero-padded to whole patches."""
        left, right, top, bottom = self.padding
        crops = torch.stack([image[:, y1:y2, x1:x2] for (y1, y2, x1, x2) in windows])
        if any(self.padding):
            crops = torch.nn.functional.pad(crops, (left, right, top, bottom))
        return crops
