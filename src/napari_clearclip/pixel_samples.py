"""Painted pixels as a run without edge snapping scores them: a bilinear mix of window patches.

A run scores each window's patches, resizes them bilinearly to the window's pixels and averages
the windows that cover a pixel. A pixel painted beside an object therefore takes part of the
object's patch score, and that is where the text's bias shows: objects swell by a few pixels on
every side. A lesson's class offsets fitted on the painted *patches* cannot see it; fitted on
the painted *pixels* (each one's mix of patches, kept here), they correct it
(``strokes.lesson_offsets``).

A sample is one painted pixel at the working size; its taps are the patches (rows of
``context``) and weights whose sum is its score, exactly as the windows give it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

#: At most this many painted pixels per class and image are kept, drawn the same way on every run: one offset per
#: class is fitted on them, and a lesson file stays small (five 3 px disks on each of three scenes keep 500-590).
SAMPLES_PER_CLASS = 1024


@dataclass
class PixelSamples:
    """Painted pixels (``classes``, ``image_ids``: (S,)) and the patches they are mixed from (``context``: (K, E),
    raw window patches as exemplars are kept, from images ``context_ids``: (K,)); ``taps``: (T, 2) pairs of
    (sample, context row) with ``weights`` (T,), summing to one per sample."""

    context: torch.Tensor
    context_ids: torch.Tensor
    taps: torch.Tensor
    weights: torch.Tensor
    classes: torch.Tensor
    image_ids: torch.Tensor

    def __len__(self) -> int:
        return len(self.classes)

    @staticmethod
    def concatenate(parts: list["PixelSamples"], image_starts) -> "PixelSamples":
        """One set from several, the images of part i numbered from ``image_starts[i]``."""
        contexts = np.cumsum([0] + [len(p.context) for p in parts])
        samples = np.cumsum([0] + [len(p.classes) for p in parts])
        shift = [torch.tensor([[int(s), int(c)]]) for s, c in zip(samples, contexts)]
        return PixelSamples(
            torch.cat([p.context.float().cpu() for p in parts]),
            torch.cat([p.context_ids.cpu() + int(start) for p, start in zip(parts, image_starts)]),
            torch.cat([p.taps.cpu() + offset for p, offset in zip(parts, shift)]),
            torch.cat([p.weights.float().cpu() for p in parts]),
            torch.cat([p.classes.cpu() for p in parts]),
            torch.cat([p.image_ids.cpu() + int(start) for p, start in zip(parts, image_starts)]))

    def of_image(self, image: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(its context patches (K, E), taps (T, 2) renumbered within the image, weights (T,), classes (S,))."""
        context_rows = torch.nonzero(self.context_ids == image).flatten()
        sample_rows = torch.nonzero(self.image_ids == image).flatten()
        mine = torch.isin(self.taps[:, 0], sample_rows)
        taps = self.taps[mine]
        new_sample = torch.searchsorted(sample_rows, taps[:, 0].contiguous())
        new_context = torch.searchsorted(context_rows, taps[:, 1].contiguous())
        return (self.context[context_rows].float(), torch.stack([new_sample, new_context], 1),
                self.weights[mine].float(), self.classes[sample_rows])

    def is_consistent(self, n_classes: int, images: int, width: int) -> bool:
        """Whether the arrays fit together (a lesson file is checked with this before it is used)."""
        samples, contexts = len(self.classes), len(self.context)
        return bool(
            self.context.ndim == 2 and self.context.shape[1] == width and self.context_ids.shape == (contexts,)
            and self.taps.ndim == 2 and self.taps.shape[1] == 2 and self.weights.shape == (len(self.taps),)
            and self.image_ids.shape == (samples,) and torch.isfinite(self.context).all()
            and torch.isfinite(self.weights).all()
            and (not samples or (0 <= int(self.classes.min()) and int(self.classes.max()) < n_classes
                                 and 0 <= int(self.image_ids.min()) and int(self.image_ids.max()) < images))
            and (not contexts or (0 <= int(self.context_ids.min()) and int(self.context_ids.max()) < images))
            and (not len(self.taps) or (0 <= int(self.taps[:, 0].min()) and int(self.taps[:, 0].max()) < samples
                                        and 0 <= int(self.taps[:, 1].min()) and int(self.taps[:, 1].max()) < contexts)))


def mixed_scores(scores: torch.Tensor, taps: torch.Tensor, weights: torch.Tensor, samples: int) -> torch.Tensor:
    """(S, Q) each sample's scores: its taps' rows of ``scores`` (K, Q), weighted and summed."""
    out = torch.zeros(samples, scores.shape[1], dtype=scores.dtype, device=scores.device)
    taps = taps.to(scores.device)
    out.index_add_(0, taps[:, 0], scores[taps[:, 1]] * weights[:, None].to(scores))
    return out


def chosen_pixels(painted: np.ndarray, limit: int = SAMPLES_PER_CLASS) -> np.ndarray:
    """A boolean mask of at most ``limit`` painted pixels per class (``painted``: 0 = none, k = class k), drawn the
    same way on every run."""
    chosen = painted > 0
    for k in np.unique(painted[chosen]).tolist():
        where = np.flatnonzero(painted == k)
        if len(where) > limit:
            drop = np.random.default_rng(k).permutation(len(where))[limit:]
            chosen.flat[where[drop]] = False
    return chosen


class SampleCollector:
    """Gathers, window by window, the patches and weights that score the chosen painted pixels of one image."""

    def __init__(self, painted: np.ndarray):
        self.painted = painted                      # (h, w) at the working size: 0 = none, k = class k
        self.chosen = chosen_pixels(painted)
        self._pixels, self._taps, self._weights, self._context = [], [], [], []
        self._count = 0
        self._grid = None

    def add(self, grid, box, features: torch.Tensor) -> None:
        """Keep the taps of the chosen pixels of window ``box`` (a :class:`~.windows.WindowGrid` window), whose
        patch features are ``features`` (P, E)."""
        from .tiled_labels import bilinear_taps

        y1, y2, x1, x2 = box
        ys, xs = np.nonzero(self.chosen[y1:y2, x1:x2])
        if not len(ys):
            return
        self._grid = grid
        left, _, top, _ = grid.padding
        rows, cols = grid.patch_grid
        padded_h, padded_w = grid.padded_size
        row_low, row_high, row_weight = bilinear_taps(rows, padded_h)
        col_low, col_high, col_weight = bilinear_taps(cols, padded_w)
        ry, cx = ys + top, xs + left
        wy, wx = row_weight.numpy()[ry], col_weight.numpy()[cx]
        patches = np.stack([row_low[ry] * cols + col_low[cx], row_low[ry] * cols + col_high[cx],
                            row_high[ry] * cols + col_low[cx], row_high[ry] * cols + col_high[cx]], 1)
        weights = np.stack([(1 - wy) * (1 - wx), (1 - wy) * wx, wy * (1 - wx), wy * wx], 1)
        used, index = np.unique(patches, return_inverse=True)
        self._context.append(features[torch.from_numpy(used)].float().cpu())
        self._taps.append(index.reshape(patches.shape) + self._count)
        self._count += len(used)
        self._weights.append(weights.astype(np.float32))
        self._pixels.append(np.repeat((ys + y1) * self.painted.shape[1] + (xs + x1), 4))

    def result(self) -> PixelSamples | None:
        if not self._pixels:
            return None
        pixels = np.concatenate(self._pixels)
        keys, sample = np.unique(pixels, return_inverse=True)
        ys, xs = np.divmod(keys, self.painted.shape[1])
        row_count, col_count = self._grid.coverage()
        covering = (row_count.numpy()[ys] * col_count.numpy()[xs])[sample]   # windows averaged at each pixel
        weights = np.concatenate([w.ravel() for w in self._weights]) / covering
        taps = np.stack([sample, np.concatenate([t.ravel() for t in self._taps])], 1)
        keep = weights > 0
        return PixelSamples(torch.cat(self._context), torch.zeros(len(torch.cat(self._context)), dtype=torch.long),
                            torch.from_numpy(taps[keep].astype(np.int64)),
                            torch.from_numpy(weights[keep].astype(np.float32)),
                            torch.from_numpy(self.painted[ys, xs].astype(np.int64) - 1),
                            torch.zeros(len(keys), dtype=torch.long))
