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

    kind = "windows"

    def new_scores(self, n_queries: int, device) -> torch.Tensor:
        """Zeroed (Q, height, width) sums that :meth:`add_scores` adds windows into."""
        return torch.zeros((n_queries, self.height, self.width), device=device)

    def add_scores(self, scores: torch.Tensor, batch, logits: torch.Tensor) -> None:
        """Add a batch's patch scores (B, patches, Q), resized bilinearly to the window size, into ``scores``."""
        left, _, top, _ = self.padding
        win_h, win_w = self.window_size
        rows, cols = self.patch_grid
        logits = logits.transpose(1, 2).reshape(len(batch), -1, rows, cols)
        logits = torch.nn.functional.interpolate(logits, size=self.padded_size, mode="bilinear", align_corners=False)
        logits = logits[:, :, top : top + win_h, left : left + win_w]
        for (y1, y2, x1, x2), window in zip(batch, logits):
            scores[:, y1:y2, x1:x2] += window

    def finish_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """The sums divided by how many windows cover each pixel (in place)."""
        row_count, col_count = self.coverage()
        scores /= row_count.to(scores.device)[:, None]
        scores /= col_count.to(scores.device)[None, :]
        return scores

    def cell_counts(self, strokes: torch.Tensor, box, n_classes: int) -> torch.Tensor:
        """(C, patches): how many pixels of each class are painted in each patch of a window."""
        left, right, top, bottom = self.padding
        rows, cols = self.patch_grid
        ph, pw = self.patch
        y1, y2, x1, x2 = box
        window = torch.nn.functional.pad(strokes[y1:y2, x1:x2], (left, right, top, bottom))
        return torch.stack([(window == k).reshape(rows, ph, cols, pw).sum((1, 3)).flatten()
                            for k in range(1, n_classes + 1)])

    def cell_largest(self, values: torch.Tensor, box) -> torch.Tensor:
        """(patches,): the largest of ``values`` (non-negative, at the working size) in each patch of a window."""
        left, right, top, bottom = self.padding
        rows, cols = self.patch_grid
        ph, pw = self.patch
        y1, y2, x1, x2 = box
        window = torch.nn.functional.pad(values[y1:y2, x1:x2], (left, right, top, bottom))
        return window.reshape(rows, ph, cols, pw).amax((1, 3)).flatten()

    def to_dict(self) -> dict:
        return {"height": self.height, "width": self.width, "crop": self.crop, "stride": self.stride,
                "patch": list(self.patch)}

    def crop_batch(self, image: torch.Tensor, windows: list[tuple[int, int, int, int]]) -> torch.Tensor:
        """Stack the given windows of a (3, H, W) image, zero-padded to whole patches."""
        left, right, top, bottom = self.padding
        crops = torch.stack([image[:, y1:y2, x1:x2] for (y1, y2, x1, x2) in windows])
        if any(self.padding):
            crops = torch.nn.functional.pad(crops, (left, right, top, bottom))
        return crops


def grid_from_dict(values: dict):
    """A window grid (or CLIP-DIY's crop pyramid) from what :meth:`to_dict` wrote."""
    if values.get("kind") == "crops":
        from .clipdiy import CropPyramid

        return CropPyramid(int(values["height"]), int(values["width"]), tuple(int(s) for s in values["sizes"]),
                           tuple(int(s) for s in values["input_size"]))
    return WindowGrid(int(values["height"]), int(values["width"]), int(values["crop"]), int(values["stride"]),
                      tuple(int(p) for p in values["patch"]))
