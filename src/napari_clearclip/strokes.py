"""Strokes: pixels a user painted with a class become visual exemplars of it in the dense feature space.

A patch under a stroke of class k lends its (cached) patch embedding to class k. Every
patch then gets, for each class, a bonus that grows with its similarity s to the nearest
exemplar of that class: zero up to :data:`ALIKE_FROM`, then rising linearly to the full
strength at an exact match, ``alpha * max(0, (s - ALIKE_FROM) / (1 - ALIKE_FROM))``. It is
added to the patch's cosine similarity with the class's text queries. Regions like the
painted one change class; regions unlike every exemplar keep exactly what the text says,
but for one correction of the text itself: where a class is painted in two or more separate
strokes and still trails on one stroke's patches after the other strokes taught it, the text
under-scores that class on this image, and its scores rise on every patch
(:func:`stroke_offsets`). A class painted once never rises away from what it resembles.

The similarity ``s`` is a cosine after whitening with the image's own patch statistics
(mean and covariance). Raw CLIP patch embeddings share a large common part, so that grey
background and a blue square can be 0.95 alike in raw cosine while their text scores
differ; whitened, they are about 0.0 and 0.8 alike, and a stroke stays on what it painted.

Exemplars from other images (a lesson, strokes on other images or slices) carry the patch
covariance of the images they were painted on, and are compared after whitening with it (and
the scored image's mean): whitening with the new image's own covariance would stretch the
directions in which that one image happens to vary little, where the exemplars' images differ
from it, and exemplars of the same class would no longer look alike. That covariance is regularised
more than an image's own (:data:`OTHER_IMAGES_WHITENING_RANK`): only its leading directions describe
what a few images say about the next one.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .errors import InvalidOptionError
from .windows import WindowGrid

if TYPE_CHECKING:
    from .pixel_samples import PixelSamples

#: Strength of an exact match to an exemplar, in cosine units, when nothing is known of the image.
EXEMPLAR_WEIGHT = 0.3
#: Strength of an exact match, in units of the image's text-score spread (how much a class's text
#: cosine varies across this image's patches): text cosines of one CLIP spread over a tenth, of
#: another over a few hundredths, so a fixed strength would mean something else on every backbone.
#: (About 0.38 cosine units on the demo scenes.)
EXEMPLAR_SPREADS = 4.0
#: Whitened cosine to the nearest exemplar from which a patch counts as alike and gets a bonus.
#: Below it the bonus is exactly zero: patches unlike every exemplar keep exactly their text
#: scores (so a re-run after a stroke recomputes only what the stroke can change), however
#: closely the text scores of two classes tie there; only a class painted in two or more strokes
#: that still trails there may shift every patch's scores (see :func:`stroke_offsets`). Whitened cosines of unrelated patches
#: centre on 0 for any backbone, so the threshold means the same thing on every model.
#:
#: Chosen, with EXEMPLAR_SPREADS as it is, on synthetic-tiny alone with the simulated annotator
#: (benchmarks/benchmark_corrections.py, 12 held-out scenes, 5 strokes): thresholds 0.45, 0.5
#: and 0.55 gave mIoU 0.907, 0.921 and 0.921, keeping 97.1%, 97.5% and 97.8% of the pixels
#: unlike a stroke of a class the text cannot place; 0.55 keeps a margin above 97%. (The
#: earlier bonus, 4 spreads times exp(-10 (1 - s)) cut below 1e-3, gave 0.890 and 97.4%.)
#: The held-out models of the benchmark (tests/models) played no part in this.
ALIKE_FROM = 0.55
#: Regularisation of the whitening, relative to the largest eigenvalue of the patch covariance.
WHITENING_EPS = 1e-4
#: Exemplars from other images (a lesson, strokes on other images) are whitened with the patch covariance of
#: the images they were painted on, regularised by its eigenvalue of this rank (at least
#: :data:`WHITENING_EPS` of the largest): a few images' covariance describes what varies across images
#: only in its leading directions, while the weaker ones hold the textures of those images alone, which
#: whitening would stretch until exemplars of the same class on a new image no longer look alike.
#:
#: Chosen on the demo model and synthetic-tiny-b with benchmarks/benchmark_corrections.py's lesson (3 scenes
#: painted, 20 unpainted): ranks 4, 6, 8 and 12 gave 0.816, 0.884, 0.878 and 0.871 on the demo (0.884 with
#: 1e-4 of the largest), and 0.335, 0.791, 0.753 and 0.721 on synthetic-tiny-b (0.696 with 1e-4); rank 4
#: made whole scenes fall far below their zero-shot scores on both. synthetic-tiny-c, held out from the
#: choice, went from 0.767 to 0.810 (0.958 to 0.979 with edge snapping).
OTHER_IMAGES_WHITENING_RANK = 6
#: With edge snapping, a class that strokes on the image being scored made the leader of a patch leads it by
#: at most this many of the image's text-score spreads (see :func:`image_strength`). Which class leads each
#: patch is unchanged; only a lead beyond what that decision needs is cut. Snapping averages each pixel's scores
#: with its alike neighbours again and again: through a uniform background, a large lead spread from a taught
#: object into a class whose text barely loses there, far beyond the object (a debris stroke on one blue square
#: then turned up to 12.5% of the grey around the squares on one model). Without snapping the full lead is
#: kept: there it holds a taught object's extent when the patch scores are resized to pixels, and capping it
#: lost 0.02-0.03 mIoU.
#:
#: Chosen on the demo model and synthetic-tiny-b (benchmarks/benchmark_corrections.py, 5 strokes, with
#: snapping; and a stroke of a word the text cannot place): no cap, 3, 2, 1 and 0.5 spreads kept 97.8%,
#: 98.7%, 99.6%, 99.9% and 100% of the pixels unlike the stroke on the demo, and 94.2%, 94.7%, 96.0%,
#: 97.7% and 98.8% on synthetic-tiny-b, at mIoU 0.995, 0.995, 0.995, 0.994, 0.995 (demo) and 0.989, 0.990,
#: 0.986, 0.984, 0.975 (synthetic-tiny-b). synthetic-tiny-c, held out from the choice: 87.5% to 91.3% with
#: "debris", 98.8% to 98.9% with "junk"; mIoU 0.986 to 0.993. A lesson's exemplars (from other images) are
#: not capped: capping them too took the lesson's mIoU with snapping on synthetic-tiny-b from 0.965 to 0.941.
SNAPPED_LEAD_SPREADS = 1.0
#: How strongly a lesson's class offsets (see :func:`fit_class_offsets`) are held to zero: the weight of their
#: squared length, in the image's text-score spreads, against the mean cross-entropy of the painted patches.
#:
#: Chosen on the demo model and synthetic-tiny-b (benchmarks/benchmark_corrections.py's lesson: 5 strokes on each
#: of 3 scenes, 20 unpainted scenes): weights 1, 3, 5, 10 and 30 gave lesson mIoU 0.909, 0.898, 0.894, 0.890 and
#: 0.886 on the demo (0.884 without offsets) and 0.749, 0.833, 0.825, 0.810 and 0.798 on synthetic-tiny-b (0.791);
#: below 5 a scene fell further than 0.02 below its zero-shot score (0.050 on the demo; 0.079 and 0.090, and with
#: edge snapping 0.331 and 0.158, on synthetic-tiny-b) and object accuracy fell on synthetic-tiny-b (0.792 and
#: 0.943 against 0.962). 5 is the smallest weight that lost nothing anywhere. synthetic-tiny-c, held out from the
#: choice: 0.810 without offsets, 0.846 with (0.979 and 0.986 with edge snapping).
#:
#: Lowered to 0.5 once the offsets applied only between classes the lesson taught (see
#: :func:`offsets_between_taught_classes`), chosen on the demo, synthetic-tiny-b and synthetic-tiny-c (mean lesson
#: mIoU over five sets of training scenes, 20 unpainted scenes): weights 5, 2, 1, 0.5 and 0.25 gave 0.889, 0.891,
#: 0.893, 0.895 and 0.894 on the demo, 0.782, 0.783, 0.785, 0.787 and 0.789 on synthetic-tiny-b, and 0.800,
#: 0.807, 0.814, 0.822 and 0.819 on synthetic-tiny-c, with the same scenes lowered (1, 0 and 5); at 0.25 a demo
#: set lost 0.019. With edge snapping at 0.5: 0.996 (none lowered, against 0.994 and one), 0.963 and 0.963
#: (0.962 and 0.960). synthetic-tiny-d, held out from the choice: 0.753 to 0.763 alone, 0.929 to 0.933 with
#: snapping, the same 11 scenes lowered.
#:
#: Lowered to 0.35 once the offsets applied where one of the two best classes was painted, never taking a whole region
#: (see :func:`offsets_between_taught_classes`), chosen on the demo, synthetic-tiny-b and synthetic-tiny-c by the same
#: measure: weights 1, 0.5, 0.35, 0.25, 0.1 and 0.05 gave 0.901, 0.905, 0.908, 0.909, 0.908 and 0.898 on the demo,
#: 0.817, 0.833, 0.840, 0.848, 0.866 and 0.873 on synthetic-tiny-b, and 0.841, 0.854, 0.860, 0.866 and 0.881 on
#: synthetic-tiny-c (0.05 not measured). 0.35 is the smallest weight that lowered no scene on any of them, alone or
#: with edge snapping: at 1 one demo scene fell by 0.027, at 0.25 one by 0.034 with snapping, at 0.1 and 0.05 two
#: by up to 0.066 and 0.105 (background's offset grew to 1.9 spreads and shrank a textured green object to half).
#: With snapping at 0.35: 0.997, 0.992 and 0.995. synthetic-tiny-d, held out from the choice: 0.829 alone and
#: 0.990 with snapping, no scene lowered (0.821 and 0.988 at 0.5).
CLASS_OFFSET_WEIGHT = 0.35
#: The weight of the offsets fitted on painted pixels (see :func:`lesson_offsets`), for runs without edge snapping.
#: Chosen on the demo, synthetic-tiny-b and synthetic-tiny-c (lesson: 5 strokes on each of 3 scenes, five sets, 20
#: unpainted scenes; mean mIoU alone, and scenes more than 0.02 below zero-shot over the five sets): 0.35: 0.915
#: (2 lowered), 0.893, 0.910; 0.5: 0.916, 0.887, 0.906, none lowered; 0.75: 0.914, 0.876, 0.899; 1: 0.912, 0.868,
#: 0.891. At 0.35 the demo's background offset (1.44 spreads) shrank a green object nobody painted from 389 to 241
#: px, and a green offset of 0.98 put 7 px of green in a scene without any. The smallest weight tried that lowered
#: no scene; synthetic-tiny-d, held out: 0.829 with the patch offsets, 0.889 with these, none lowered.
PIXEL_OFFSET_WEIGHT = 0.5

#: The same weight for the offsets from the strokes on the image being scored (:func:`stroke_offsets`). Chosen on
#: the demo model and synthetic-tiny-b with benchmarks/benchmark_corrections.py's annotator (10 strokes on each of
#: 12 held-out scenes, and on 24 others from seed 30,000), by mIoU of propagation alone averaged over rounds 2-10
#: and the two sets: weights 0.25, 0.5, 1, 1.5, 2, 5, 10 and 20 gave, on the first set, 0.877, 0.898, 0.915, 0.907,
#: 0.912, 0.914, 0.913 and 0.913 on the demo and 0.875, 0.869, 0.861, 0.846, 0.850, 0.817, 0.801 and 0.784 on
#: synthetic-tiny-b; on the second set, weights 1, 2 and 5 gave 0.882, 0.911 and 0.903 on the demo and 0.870,
#: 0.847 and 0.815 on synthetic-tiny-b. Below 2 the demo's scenes fell more often (a background offset of up to
#: 2.5 spreads, fitted on background strokes alone, overtook objects); capping offsets at 0.75 or 1 spread lost
#: synthetic-tiny-b's gain and kept the falls. synthetic-tiny-c, held out from the choice: 0.862 and 0.860 with
#: weight 5, 0.881 and 0.878 with weight 2.
#:
#: Lowered to 1.5 once the offsets moved boundaries by at most a patch (:data:`STROKE_OFFSET_REACH`), chosen on the
#: demo model and synthetic-tiny-b by the same measure (12 scenes / 24 scenes): without the reach at weight 2, and
#: with it at weights 2, 1.5 and 1, the demo gave 0.913 / 0.910, 0.905 / 0.909, 0.915 / 0.912 and 0.898 / 0.897,
#: and synthetic-tiny-b 0.850 / 0.856, 0.849 / 0.849, 0.862 / 0.862 and 0.869 / 0.876 (after 5 strokes 0.832, 0.848,
#: 0.860 and 0.877 on the 12 scenes). synthetic-tiny-c: 0.885 / 0.888 without the reach, 0.890 / 0.893 at 1.5.
#: synthetic-tiny-d, held out: 0.872 / 0.868 without the reach, 0.884 / 0.874 at 1.5 (0.880 and 0.887 after 5
#: strokes).
#:
#: A lesson's offset for a class that these offsets calibrate is left out (see :meth:`Exemplars.teach`): on 12 held-out
#: scenes with the standard lesson of benchmarks/benchmark_corrections.py active, mIoU without snapping after 0-5
#: strokes went 0.919, 0.916, 0.880, 0.910, 0.917, 0.925 on the demo, 0.865, 0.860, 0.862, 0.872, 0.885, 0.909 on
#: synthetic-tiny-b, 0.889, 0.883, 0.805, 0.854, 0.881, 0.895 on synthetic-tiny-c and 0.867, 0.867, 0.788, 0.846,
#: 0.870, 0.904 on synthetic-tiny-d with both added; with the lesson's left out, 0.919, 0.916, 0.918, 0.919, 0.925,
#: 0.920; 0.865, 0.860, 0.891, 0.895, 0.902, 0.900; 0.889, 0.883, 0.887, 0.909, 0.901, 0.904; and 0.867, 0.867,
#: 0.879, 0.902, 0.903, 0.890 (mean over strokes 1-5: 0.910 to 0.920, 0.878 to 0.890, 0.864 to 0.897, 0.855 to
#: 0.888). Leaving out every lesson offset once the image has its own gave nearly the same (0.916 after 5 strokes
#: on the demo). With edge snapping the strokes fit no offsets, and a lesson's apply as they did.
#: Once a lesson's offsets were fitted on painted pixels (see :func:`lesson_offsets`), the image's own offset for a
#: class the lesson also has one for is left out instead (see :meth:`Exemplars.for_image`): the lesson's are fitted
#: on more images, and on pixels. Mean over strokes 1-5, the image's own first / the lesson's first: 0.919 / 0.921
#: (demo), 0.890 / 0.901, 0.881 / 0.918, and 0.892 / 0.901 on synthetic-tiny-d (held out); with a lesson's patch
#: offsets (a file saved before pixels were kept), demo 0.920 / 0.922 and synthetic-tiny-c 0.897 / 0.897.
STROKE_OFFSET_WEIGHT = 1.5
#: How far, in patches, the strokes' offsets (:func:`stroke_offsets`) may move the boundary of a class: a patch takes
#: the class they make lead it only where that class already led within this many patches of it (in its window).
#: The offsets correct the text's bias along edges (objects swollen by about a patch); without this limit a fifth
#: background stroke on synthetic-tiny-b raised background's offset from 0.97 to 1.04 spreads, and the blue objects
#: of the scene vanished (1,043 px to 318 px). None: the offsets apply on every patch.
STROKE_OFFSET_REACH: int | None = 1
#: Without edge snapping, on the image its strokes are on, a class that a bonus made lead a patch beside a patch
#: that another class leads leads it by at most this many times the margin of that neighbour's class over it there
#: (see :func:`balanced_edges`). Patch scores are resized to pixels bilinearly: a taught lead of several spreads
#: beside a patch where the text barely prefers another class carried the taught class 2-3 px past every taught
#: object's edge (a "debris" stroke on a blue square kept 96.1% of the grey and red pixels on synthetic-tiny-c,
#: 96.9% with "junk" on synthetic-tiny-d). None: no limit.
#:
#: Chosen on synthetic-tiny-b (propagation, benchmarks/benchmark_corrections.py's annotator, 12 scenes, after 5
#: strokes) and synthetic-tiny-c (the "debris" stroke): factors 1, 2, 3 and 5 gave 0.846, 0.852, 0.856 and 0.858
#: on synthetic-tiny-b (0.860 without the cut; mean over rounds 2-10 on 12 / 24 scenes 0.858 / 0.859 at 3,
#: against 0.862 / 0.862), and kept 99.96%, 99.7% and 99.2% of the unlike pixels on synthetic-tiny-c at 1, 2 and 3.
#: The demo model at 3: 0.917 after 5 strokes, as without (0.914 / 0.909 over rounds 2-10, against 0.915 /
#: 0.912). synthetic-tiny-d, measured alongside with no choice turning on it: 0.883 after 5 strokes (0.887
#: without) and 99.3% kept with "junk".
EDGE_LEAD_MARGINS: float | None = 3.0
#: The smallest lead a cut leaves (cosine units), so that the patch keeps its class.
_LEAST_LEAD = 1e-6
#: Exemplars kept per class: a stroke that fills a large region keeps an even sample of its patches,
#: so that re-runs stay quick (the bonus is a nearest-exemplar similarity, which a sample of a
#: uniform region hardly changes).
MAX_EXEMPLARS_PER_CLASS = 1024


#: Whether patches and exemplars are compared after taking off what each position within a window adds to every
#: patch there (see :attr:`FeatureStats.position_offsets`).
CENTRE_WINDOW_POSITIONS = True


class FeatureStats:
    """Mean and covariance of an image's patch embeddings, for whitening; and what each window position adds.

    A model may give the patches at each position of every window something of their own, which grey and blue
    patches there share (synthetic-tiny-c). Few patches carry one position's part, so whitening stretches it,
    and grey patches at some positions came out 0.60-0.71 alike to blue exemplars taken at the same positions:
    a stroke of a new word on a blue square turned grey far from it.
    Windows overlap, so each patch of the image is seen at several window positions: the part of a window's
    patch that differs from the mean of the same image patch over the windows that see it, averaged over the
    windows, is what its position adds, free of the image's content (:attr:`position_offsets`). It is measured
    on the windows that start on the image's patch grid (all but a last one shifted to the image's edge) and
    taken off at every window. Patches and the strokes on the image are compared without it, then whitened
    as before. The text scores, and the text-score spread measured with the covariance, are untouched.
    """

    def __init__(self):
        self.count = 0
        self.total = None
        self.outer = None
        self.position_total = None   # (P, E) sum of the patches at each position within a window
        self.windows: list[tuple[int, int]] = []   # each window's first patch on the image's patch grid
        self._patch_sum = None       # (rows, cols, E) sum over windows of each image patch
        self._patch_count = None     # (rows, cols) how many windows saw it
        self._window_patches = (0, 0)
        self.positions_differ = False  # windows off the image's patch grid, or of other sizes: no centring
        self._position_offsets = None

    def add(self, grid, batch, patch_features: torch.Tensor) -> None:
        features = patch_features.double().cpu()
        flat = features.reshape(-1, features.shape[-1])
        self.count += len(flat)
        self.total = flat.sum(0) if self.total is None else self.total + flat.sum(0)
        outer = flat.T @ flat
        self.outer = outer if self.outer is None else self.outer + outer
        self._position_offsets = None
        if not self.positions_differ:
            self._add_positions(grid, batch, features)

    def _add_positions(self, grid, batch, features: torch.Tensor) -> None:
        patch = getattr(grid, "patch", None)
        if (features.dim() != 3 or patch is None or batch is None or not hasattr(grid, "patch_grid")
                or any(grid.padding)):
            self.positions_differ = True
            return
        rows, cols = grid.patch_grid
        if rows * cols != features.shape[1]:
            self.positions_differ = True
            return
        if self._patch_sum is None:
            # float32: a sum over the few windows that see a patch, and half the memory on a large image
            self._patch_sum = _zeros_for_sums((grid.height // patch[0], grid.width // patch[1], features.shape[-1]))
            self._patch_count = torch.zeros(self._patch_sum.shape[:2])
            self.position_total = torch.zeros(features.shape[1:], dtype=torch.float64)
            self._window_patches = (rows, cols)
        elif self._window_patches != (rows, cols):
            self.positions_differ = True
            return
        for (y1, _, x1, _), window in zip(batch, features):
            if y1 % patch[0] or x1 % patch[1]:   # a last window shifted to the image's edge: off the patch grid
                continue
            top, left = y1 // patch[0], x1 // patch[1]
            self._patch_sum[top : top + rows, left : left + cols] += window.reshape(rows, cols, -1).float()
            self._patch_count[top : top + rows, left : left + cols] += 1
            self.windows.append((top, left))
            self.position_total += window

    def _offsets(self) -> torch.Tensor | None:
        """(P, E) float64: at each window position, the mean of (a window's patch there minus the mean of that image
        patch over every window that sees it)."""
        if not CENTRE_WINDOW_POSITIONS or self.positions_differ or not self.windows:
            return None
        rows, cols = self._window_patches
        counts = self._patch_count.clamp(min=1)[..., None]
        seen = torch.zeros_like(self.position_total)
        for top, left in self.windows:  # each patch's mean over the windows that see it, a window's patches at a time
            area = (slice(top, top + rows), slice(left, left + cols))
            seen += (self._patch_sum[area] / counts[area]).double().reshape(rows * cols, -1)
        return (self.position_total - seen) / len(self.windows)

    @property
    def position_offsets(self) -> torch.Tensor | None:
        """(P, E) float32: what to subtract from a patch at each position within a window before comparing it with
        exemplars (None: nothing)."""
        if self._position_offsets is None:
            offsets = self._offsets()
            self._position_offsets = False if offsets is None else offsets.float()
        return None if self._position_offsets is False else self._position_offsets

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def covariance(self) -> torch.Tensor:
        """Of the patches as they are (the text-score spread is measured with it; centring does not change it)."""
        mean = self.mean
        return self.outer / self.count - torch.outer(mean, mean)

    def whitening(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, W) such that (f - mean) @ W has an identity covariance (regularised)."""
        return whitening_from(self.mean, self.covariance, device)


#: Patch sums of more bytes than this (an image too large to hold, segmented tile by tile with a lesson: 3.2 GB for
#: ViT-B/16 at 20000 x 20000) are kept in a temporary file, which the system pages in as windows add to it.
SUMS_IN_MEMORY_BYTES = 1 << 28


def _zeros_for_sums(shape: tuple[int, ...]) -> torch.Tensor:
    """A zeroed float32 tensor of ``shape``: in memory, or over a temporary file (removed when it is let go) when
    larger than :data:`SUMS_IN_MEMORY_BYTES`."""
    count = int(np.prod(shape))
    if count * 4 <= SUMS_IN_MEMORY_BYTES:
        return torch.zeros(shape)
    import tempfile

    from .cache import cache_dir

    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder) as handle:   # unnamed: nothing is left behind, whatever happens
        handle.truncate(count * 4)                       # sparse: reads as zeros
        mapped = np.memmap(handle, dtype=np.float32, mode="r+", shape=shape)
    return torch.from_numpy(mapped)


def comparison_norms(patch_features: torch.Tensor, whitening: tuple | None,
                     offsets: torch.Tensor | None = None) -> torch.Tensor:
    """(..., 2) each patch's whitened length after its window position's offset is taken off (see
    :func:`centred`), and the longer of that and its whitened length as it is (equal without ``offsets``):
    :meth:`Exemplars.bonus` measures how alike a patch is with the first and whether it is alike with the second.
    Kept with cached features, as they cost matrix products."""
    plain = whitened_norms(patch_features, whitening)
    if offsets is None:
        return torch.stack([plain, plain], -1)
    lengths = whitened_norms(centred(patch_features, offsets), whitening)
    return torch.stack([lengths, torch.maximum(lengths, plain)], -1)


def centred(patch_features: torch.Tensor, offsets: torch.Tensor | None) -> torch.Tensor:
    """(B, P, E) patches with their window position's offset (:attr:`FeatureStats.position_offsets`) taken off;
    as they are without offsets."""
    if offsets is None:
        return patch_features
    return patch_features.float() - offsets.to(patch_features.device)


def whitening_from(mean: torch.Tensor, covariance: torch.Tensor, device,
                   rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, W): W = (C + r)^(-1/2) of the covariance C, regularised by r = :data:`WHITENING_EPS` of its largest
    eigenvalue, or by its eigenvalue of the given ``rank`` (1 = the largest) where that is more."""
    values, vectors = torch.linalg.eigh(covariance.double().cpu())  # ascending
    values = values.clamp(min=0)
    floor = WHITENING_EPS * float(values[-1])
    if rank is not None:
        floor = max(floor, float(values[-min(rank, len(values))]))
    values = values + floor
    transform = vectors @ torch.diag(values.rsqrt()) @ vectors.T
    return mean.float().to(device), transform.float().to(device)


_TRANSFORMS: dict = {}
_TRANSFORMS_LOCK = threading.Lock()


def _transform_of(covariance: torch.Tensor) -> torch.Tensor:
    """The whitening transform of other images' covariance (CPU), regularised at its eigenvalue of rank
    :data:`OTHER_IMAGES_WHITENING_RANK`, kept for the last few covariances used: the widget
    collects the same exemplars anew at every stroke, and an eigendecomposition of a 768-wide covariance
    costs a few tenths of a second."""
    data = covariance.detach().double().cpu().contiguous()
    key = (hashlib.blake2b(data.numpy().tobytes(), digest_size=16).hexdigest(), WHITENING_EPS,
           OTHER_IMAGES_WHITENING_RANK)
    with _TRANSFORMS_LOCK:
        if key in _TRANSFORMS:
            _TRANSFORMS[key] = _TRANSFORMS.pop(key)  # most recently used last
            return _TRANSFORMS[key]
    transform = whitening_from(torch.zeros(len(data), dtype=torch.float64), data, "cpu", OTHER_IMAGES_WHITENING_RANK)[1]
    with _TRANSFORMS_LOCK:
        _TRANSFORMS[key] = transform
        while len(_TRANSFORMS) > 8:
            _TRANSFORMS.pop(next(iter(_TRANSFORMS)))
    return transform


def image_strength(text: torch.Tensor, whitening) -> float:
    """The exemplar bonus of an exact match on this image: :data:`EXEMPLAR_SPREADS` times its text-score spread.

    The spread is the standard deviation of each query's text cosine across the image's
    patches, averaged over the queries: sqrt(t C t) for a text embedding t and the patches'
    covariance C (the inverse square of the whitening transform).
    """
    _, transform = whitening
    transform = transform.double().cpu()
    covariance = torch.linalg.inv(transform @ transform)
    queries = torch.nn.functional.normalize(text.double().cpu(), dim=-1)
    spread = torch.einsum("qe,ef,qf->q", queries, covariance, queries).clamp(min=0).sqrt().mean()
    return float(EXEMPLAR_SPREADS * spread)


def fit_class_offsets(samples: list[tuple[torch.Tensor, torch.Tensor, float]], n_classes: int,
                      logit_scale: float, weight: float | None = None, free: torch.Tensor | None = None) -> torch.Tensor:
    """(C,) offsets, in text-score spreads, that a lesson adds to each class's scores on every image.

    ``samples`` holds, per painted image, the class scores of its exemplars (N, C) as the lesson's
    exemplars from the *other* images teach them, their painted classes (N,) and the text-score spread.
    The offsets minimise the cross-entropy of the painted classes under the method's softmax plus
    :data:`CLASS_OFFSET_WEIGHT` times their squared length: a model whose text under-scores one class
    against another (e.g. grey background against the objects it touches, so that objects come out too
    large) is corrected on every image, where exemplars only correct patches alike to a painted one.
    Fitting each image on the others' exemplars keeps the offsets to what carries to an unpainted image.
    With ``free`` (C,) bool, only those classes get an offset (the others keep 0, and the offsets are not
    centred): the classes without one keep their order among themselves.
    """
    weight = CLASS_OFFSET_WEIGHT if weight is None else weight
    scores = torch.cat([s.double().cpu() / spread for s, _, spread in samples])
    scales = torch.cat([torch.full((len(s),), logit_scale * spread, dtype=torch.float64) for s, _, spread in samples])
    classes = torch.cat([c.long().cpu() for _, c, _ in samples])
    mask = torch.ones(n_classes, dtype=torch.float64) if free is None else free.cpu().double()
    offsets = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    if len(classes) == 0 or not mask.any():
        return offsets.detach().float()
    solver = torch.optim.LBFGS([offsets], max_iter=200, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def loss():
        solver.zero_grad()
        value = (torch.nn.functional.cross_entropy((scores + offsets * mask) * scales[:, None], classes)
                 + weight * ((offsets * mask) ** 2).sum())
        value.backward()
        return value

    with torch.enable_grad():
        solver.step(loss)
    offsets = offsets.detach() * mask
    return (offsets if free is not None else offsets - offsets.mean()).float()


def offsets_between_taught_classes(offsets: torch.Tensor, logits: torch.Tensor, classes: torch.Tensor,
                                   n_classes: int) -> torch.Tensor:
    """(..., Q) what a lesson's class ``offsets`` (C,) add to each query of ``logits`` (..., Q, text cosines):
    a query's class offset at the patches where one of the two classes the text scores highest has an offset
    (was painted in the lesson), nothing elsewhere. :meth:`Exemplars.teach` also leaves them off the regions
    that they and the exemplars together would take from the class the text gives them (see
    :func:`_regions_taken`).

    The offsets are fitted on painted patches: they say how the text scores a painted class against the
    classes it competed with there, e.g. background strokes on the rim that an object's text swells over. They
    say nothing of two classes nobody painted, which keep their text scores against each other.

    Where they apply was chosen on the demo model, synthetic-tiny-b and synthetic-tiny-c (lesson: 5 strokes on
    each of 3 scenes, five sets, 20 unpainted scenes; mean mIoU alone / with edge snapping, and scenes lowered by
    more than 0.02 below their zero-shot score, alone / with snapping, summed over the five sets):

    - on every patch, every class free and centred (the first version): background raised against classes nobody
      painted, and green objects vanished on synthetic-tiny-c (mean 0.788 alone);
    - where both of the two highest classes have an offset (the version before this one): demo 0.896 / 0.996
      (2 / 0 scenes lowered), synthetic-tiny-b 0.775 / 0.962, synthetic-tiny-c 0.822 / 0.981 (none lowered).
      A lesson of background strokes alone, the most common kind (the text swells objects over the grey around
      them, and the annotator paints that rim), then changed nothing: its fitted offset applied nowhere;
    - where one of them has, at the same weight (0.5): 0.905 / 0.996, 0.832 / 0.988 and 0.854 / 0.994, with no
      scene lowered but on synthetic-tiny-b (1 / 2; held-out synthetic-tiny-d the same): a blue object whose text
      barely leads background vanished from an unpainted scene, by the offset and the background exemplars
      together;
    - the same, where a region of patches would lose its class altogether getting no offset that lifts another
      class above its own (:meth:`Exemplars.teach`; first tried as no offsets at all there, which let a green
      spill spread on a demo scene that background's offset held back): 0.905 / 0.997, 0.833 / 0.990 and
      0.854 / 0.994, no scene lowered. synthetic-tiny-d, held out from the choice: 0.770 / 0.966 before, 0.821
      / 0.988 now, no scene lowered either way. Then :data:`CLASS_OFFSET_WEIGHT` was chosen anew.
    """
    per_query = offsets[classes]
    if n_classes < 2:
        return per_query
    taught = offsets != 0        # a class nobody painted has an offset of exactly 0
    best = torch.stack([logits[..., classes == k].amax(-1) for k in range(n_classes)], -1)
    applies = taught[best.topk(2, dim=-1).indices].any(-1)
    return per_query * applies[..., None].to(per_query.dtype)


def _regions_taken(before: torch.Tensor, after: torch.Tensor, layout: tuple[int, int]) -> torch.Tensor:
    """(B, P) bool: the patches of the regions (8-connected patches of one leading class in a window, ``before``
    (B, P)) of which no patch keeps that class ``after``: a calibration of the text moves the boundaries between
    classes, and must not delete an object whose text leads it only weakly."""
    from skimage.measure import label

    rows, cols = layout
    before_grid = before.reshape(-1, rows, cols).cpu().numpy().astype(np.int32)
    same = (before_grid == after.reshape(-1, rows, cols).cpu().numpy())
    if same.all():
        return torch.zeros(before.shape, dtype=torch.bool, device=before.device)
    # the windows stacked, a row of background between two, so that no region crosses from one to the next
    stacked = np.full((len(before_grid), rows + 1, cols), -1, np.int32)
    stacked[:, :rows] = before_grid
    regions = label(stacked.reshape(-1, cols), background=-1, connectivity=2).reshape(stacked.shape)[:, :rows]
    kept = np.bincount(regions[same], minlength=int(regions.max()) + 1) > 0
    taken = ~kept[regions]
    return torch.from_numpy(taken).reshape(before.shape).to(before.device)


#: A lesson's exemplar is dropped when, of the patches of the *other* painted images that it is alike to, more than
#: this share carry another class than its own. Chosen on the demo model alone (the one value tried), with lessons
#: from five sets of three training scenes (benchmarks/benchmark_corrections.py --lesson-seeds 5): the set that
#: lowered 8 held-out scenes by up to 0.45 mIoU lowered none after the check. The other models played no part.
CONTRADICTED_SHARE = 0.5
#: Patches per class and painted image that a lesson keeps to check its exemplars with.
REFERENCES_PER_CLASS = 256


def uncontradicted(features: torch.Tensor, classes: torch.Tensor, image_ids: torch.Tensor, image_means: torch.Tensor,
                   covariance: torch.Tensor, references: torch.Tensor, reference_classes: torch.Tensor,
                   reference_ids: torch.Tensor) -> torch.Tensor:
    """(N,) bool: which of a lesson's exemplars the other painted images do not contradict.

    An exemplar teaches its class to the patches alike to it, on images nobody painted. Compared, as there,
    in the lesson's whitening with each other painted image's mean, it is alike to some of that image's
    ``references`` (patches with the class its labels give them). When most of those carry another class, the
    exemplar would teach that image wrong, and others too: e.g. a stroke across an object's edge holds patches
    half object and half background, which on other images resemble plain background. Such an exemplar is
    dropped. So is one alike to most of the patches of one other class on another image, however many patches
    of its own class it is alike to there: it would take that class over (a background patch at an object's
    edge, alike to a whole small object of another colour). Exemplars alike to no reference patch of another
    image are kept.

    Its own image is asked only about the classes that no other painted image holds, where nothing else can
    check it: an exemplar alike to most of such a class's patches there, and to a larger share of them than of
    its own class's, is dropped too (background painted beside an object of a class only its image shows took
    that class's objects on unpainted images). For other classes its own image is not asked: in the lesson's
    whitening one image's patches are alike to each other whatever their class, and asking it about every
    class dropped good exemplars. (Also tried: not counting
    reference patches of the class the text gives the exemplar's patch, so that a correction of the text is
    never held against patches the text gets wrong the same way; on the demo model that let harmful exemplars
    through, and two of five sets of training scenes again lowered held-out scenes.)
    """
    transform = _transform_of(covariance).float()
    features, classes, image_ids = features.float().cpu(), classes.long().cpu(), image_ids.long().cpu()
    reference_classes, reference_ids = reference_classes.long().cpu(), reference_ids.long().cpu()
    agree = torch.zeros(len(features))
    disagree = torch.zeros(len(features))
    overruns = torch.zeros(len(features), dtype=torch.bool)
    for image in torch.unique(reference_ids).tolist():
        here = reference_ids == image
        mean = image_means[image].float().cpu()
        seen = torch.nn.functional.normalize((references[here].float().cpu() - mean) @ transform, dim=-1)
        white = torch.nn.functional.normalize((features - mean) @ transform, dim=-1)
        alike = (white @ seen.T) >= ALIKE_FROM
        seen_classes = reference_classes[here]
        shares = {k: alike[:, seen_classes == k].float().mean(1) for k in torch.unique(seen_classes).tolist()}
        own = image_ids == image
        mine = torch.zeros(len(features))                          # the share of its own class's patches it is alike to
        for k, share in shares.items():
            mine = torch.where(classes == k, share, mine)
        for k, share in shares.items():
            if bool(((reference_classes == k) & (reference_ids != image)).any()):
                continue          # no other painted image holds class k: only this one can say what takes it over
            overruns |= own & (classes != k) & (share > CONTRADICTED_SHARE) & (share > mine)
        alike[own] = False                                         # otherwise checked on other images only
        same = classes[:, None] == seen_classes[None]
        agree += (alike & same).sum(1)
        disagree += (alike & ~same).sum(1)
        for k in shares:                                           # most of one other class's patches there
            overruns |= (classes != k) & (alike[:, seen_classes == k].float().mean(1) > CONTRADICTED_SHARE)
    return (disagree <= CONTRADICTED_SHARE * (agree + disagree)) & ~overruns


def lesson_offsets(features: torch.Tensor, classes: torch.Tensor, image_ids: torch.Tensor, image_means: torch.Tensor,
                   covariance: torch.Tensor, text: torch.Tensor, query_classes: torch.Tensor, n_classes: int,
                   logit_scale: float, pixels: "PixelSamples | None" = None) -> torch.Tensor | None:
    """(C,) class offsets (see :func:`fit_class_offsets`) of a lesson's exemplars painted on two or more images;
    None for one image.

    Each image's exemplars are scored as the exemplars of the other images teach them (whitened with the
    lesson's covariance and that image's patch mean, as on a new image), so that the offsets hold what
    carries to an image nobody painted; the spread is the text-score spread of the lesson's covariance.

    With ``pixels`` (the painted pixels of those images, :class:`~.pixel_samples.PixelSamples`), the offsets are
    fitted on each painted pixel as a run without edge snapping scores it instead: the patches it is resized
    from, taught the same way, mixed with their bilinear weights. They are what such runs use. A pixel painted
    beside an object takes part of the object's patch score, so these offsets also correct the rim by which
    objects swell, which the patches alone do not show: over five sets of training scenes, the mean mIoU of a
    lesson alone rose from 0.908 / 0.840 / 0.860 to 0.916 / 0.887 / 0.906 on the demo model, synthetic-tiny-b
    and synthetic-tiny-c, and from 0.829 to 0.889 on synthetic-tiny-d (held out), no scene lowered (weight:
    :data:`PIXEL_OFFSET_WEIGHT`). With edge snapping, which draws edges from the image, the patch-fitted offsets
    stay: in a trial with offsets fitted on pixels there too, one unpainted scene of the demo fell by 0.14
    with snapping (its background offset 1.25 spreads, against 0.91 fitted on patches).

    Only the classes the lesson has exemplars of get an offset: the painted patches say nothing of how the
    text scores a class nobody painted, on its own objects. Letting every class move (and centring the
    offsets) lowered such classes wherever they competed with a painted one at a painted patch: on
    synthetic-tiny-b, a lesson of background strokes alone lowered blue by 0.11 spreads on top of background's
    rise, and small blue objects vanished from two unpainted scenes (see :data:`CLASS_OFFSET_WEIGHT`).
    """
    image_ids = image_ids.cpu()
    painted = torch.unique(image_ids).tolist()
    if len(painted) < 2:
        return None
    features, classes = features.float().cpu(), classes.cpu()
    text, query_classes = text.float().cpu(), query_classes.cpu()
    transform = _transform_of(covariance)
    queries = torch.nn.functional.normalize(text.double(), dim=-1)
    spread = float(torch.einsum("qe,ef,qf->q", queries, covariance.double().cpu(), queries).clamp(min=0).sqrt().mean())
    strength = image_strength(text, (None, transform))  # as Exemplars.for_image measures it: the same for every image
    samples = []
    for image in painted:
        here = image_ids == image
        others = Exemplars(features[~here], classes[~here], n_classes, covariance=covariance, images=len(painted) - 1)
        taught = others.whitened((image_means[image].float().cpu(), transform))
        taught.strength, taught.query_classes = strength, query_classes
        if pixels is None:
            patches, painted_classes = features[here], classes[here]
        else:
            patches, taps, weights, painted_classes = pixels.of_image(image)
            if not len(painted_classes):
                continue
        scores = taught.teach(patches[None] @ text.T, patches[None])[0]
        if pixels is not None:
            from .pixel_samples import mixed_scores

            scores = mixed_scores(scores, taps, weights, len(painted_classes))
        by_class = torch.stack([scores[:, query_classes == k].amax(-1) for k in range(n_classes)], -1)
        samples.append((by_class, painted_classes, spread))
    free = torch.zeros(n_classes, dtype=torch.bool)
    free[torch.unique(classes).long()] = True
    return fit_class_offsets(samples, n_classes, logit_scale, None if pixels is None else PIXEL_OFFSET_WEIGHT,
                             free=free)


def stroke_offsets(exemplars: "Exemplars", whitening, text: torch.Tensor, query_classes: torch.Tensor,
                   strength: float, logit_scale: float) -> torch.Tensor | None:
    """(C,) class offsets, in text-score spreads, from the strokes on the image being scored; None unless some
    class is painted in two or more separate strokes.

    Each stroke's patches are scored as the *other* strokes teach them (their text cosines plus the bonus of
    the other strokes' exemplars). Where a class painted here still trails after the other strokes of that
    class taught it, the text under-scores it on this image, e.g. grey background against the objects it
    touches (objects then come out too large, on every edge, and each edge would need a stroke). The offsets
    (:func:`fit_class_offsets`, held to zero as a lesson's are) correct that on every patch, as a lesson's
    offsets do on other images. Only patches of a class that another stroke paints too count: a class painted
    once may be new to the text (a word it cannot place) and then stays on what its stroke is alike to.
    """
    strokes = exemplars.strokes
    if strokes is None or exemplars.n_classes < 2 or len(torch.unique(strokes)) < 2:
        return None
    device = exemplars.features.device
    features, classes = exemplars.features.float(), exemplars.classes
    strokes, query_classes = strokes.to(device), query_classes.to(device)
    mean, transform = whitening
    mean, transform = mean.to(device), transform.to(device)
    white = (features - mean) @ transform
    lengths = white.norm(dim=-1).clamp(min=1e-12)
    white = white / lengths[:, None]
    uncentred = features if exemplars.uncentred is None else exemplars.uncentred.float().to(device)
    # as Exemplars.bonus compares patches: alike at the longer of the lengths with and without the positions' part
    gate = torch.maximum(lengths, ((uncentred - mean) @ transform).norm(dim=-1)) / lengths
    text_scores = uncentred @ text.float().to(device).T   # what the text gives them, on the image as it is
    spread = strength / EXEMPLAR_SPREADS
    samples = []
    for stroke in torch.unique(strokes).tolist():
        here = strokes == stroke
        taught = torch.unique(classes[~here])
        index = torch.nonzero(here & torch.isin(classes, taught)).flatten()
        if not len(index):
            continue
        similar = white[index] @ white[~here].T
        bonus = torch.zeros(len(index), exemplars.n_classes, device=device)
        for k in taught.tolist():
            nearest = similar[:, classes[~here] == k].amax(-1)
            alike = nearest >= ALIKE_FROM * gate[index]
            bonus[:, k] = torch.where(alike, strength * ((nearest - ALIKE_FROM) / (1 - ALIKE_FROM)).clamp(min=0), 0)
        scores = text_scores[index] + bonus[:, query_classes]
        by_class = torch.stack([scores[:, query_classes == k].amax(-1) for k in range(exemplars.n_classes)], -1)
        samples.append((by_class, classes[index], spread))
    if not samples:
        return None
    with torch.inference_mode(False):  # the fit needs gradients, also when scoring runs in inference mode
        samples = [(scores.detach().cpu().clone(), painted.cpu().clone(), spread) for scores, painted, spread in samples]
        free = torch.zeros(exemplars.n_classes, dtype=torch.bool)
        free[torch.cat([painted for _, painted, _ in samples]).long()] = True
        return fit_class_offsets(samples, exemplars.n_classes, logit_scale, STROKE_OFFSET_WEIGHT, free=free)


def within_reach(before: torch.Tensor, after: torch.Tensor, query_classes: torch.Tensor, n_classes: int,
                 layout: tuple[int, int], reach: int) -> torch.Tensor:
    """(B, P, Q) ``after`` at the patches whose class there (the best of its queries) already leads ``before``
    within ``reach`` patches of them in their window, ``before`` elsewhere: a change of scores that moves the
    boundaries between classes by up to ``reach`` patches, and never removes or makes a whole region.
    ``layout`` is (rows, cols) of each window's P patches."""
    def leader(scores):
        return torch.stack([scores[..., query_classes == k].amax(-1) for k in range(n_classes)], -1).argmax(-1)

    rows, cols = layout
    leads = torch.nn.functional.one_hot(leader(before), n_classes).permute(0, 2, 1).float()
    near = torch.nn.functional.max_pool2d(leads.reshape(len(before), n_classes, rows, cols), 2 * reach + 1, 1, reach)
    allowed = near.reshape(len(before), n_classes, rows * cols).gather(1, leader(after)[:, None, :])[:, 0] > 0
    return torch.where(allowed[..., None], after, before)


def balanced_edges(text: torch.Tensor, taught: torch.Tensor, boosted: torch.Tensor, query_classes: torch.Tensor,
                   n_classes: int, layout: tuple[int, int], margins: float) -> torch.Tensor:
    """(B, P, Q) ``taught`` with the lead of each class that a bonus (``boosted``) made lead a patch cut, where a
    patch next to it in its window (of its eight) is led by another class, to ``margins`` times the smallest margin
    by which such a neighbour's class beats it there; never below the lead the text gave it (``text``), and
    never so far that the patch changes class.

    Patch scores are resized to pixels bilinearly: between two patches the boundary lies where their margins
    balance, so a taught lead of several spreads beside a patch that another class leads by a hair carries the
    taught class across most of the gap (a 2-3 px ring around taught objects on 8 px patches). ``layout`` is
    (rows, cols) of each window's P patches.
    """
    def per_class(scores):
        return torch.stack([scores[..., query_classes == k].amax(-1) for k in range(n_classes)], -1)

    rows, cols = layout
    batch = len(taught)
    best = per_class(taught)                                               # (B, P, C)
    top = best.topk(2, dim=-1)
    leader = top.indices[..., 0]
    lead = top.values[..., 0] - top.values[..., 1]
    grid_best = torch.nn.functional.pad(best.permute(0, 2, 1).reshape(batch, n_classes, rows, cols), (1, 1, 1, 1))
    grid_leader = leader.reshape(batch, rows, cols)
    padded_leader = torch.nn.functional.pad(grid_leader, (1, 1, 1, 1), value=-1)
    smallest = torch.full((batch, rows, cols), float("inf"), device=taught.device)
    for dy, dx in [(dy, dx) for dy in (0, 1, 2) for dx in (0, 1, 2) if (dy, dx) != (1, 1)]:
        near_best = grid_best[:, :, dy:dy + rows, dx:dx + cols]
        near_leader = padded_leader[:, dy:dy + rows, dx:dx + cols]
        margin = (near_best.gather(1, near_leader.clamp(min=0)[:, None])[:, 0]
                  - near_best.gather(1, grid_leader[:, None])[:, 0])
        other = (near_leader >= 0) & (near_leader != grid_leader)
        smallest = torch.where(other, torch.minimum(smallest, margin), smallest)
    smallest = smallest.reshape(batch, rows * cols)
    text_best = per_class(text)
    mine = text_best.gather(-1, leader[..., None])[..., 0]
    text_lead = mine - text_best.scatter(-1, leader[..., None], -float("inf")).amax(-1)
    allowed = torch.maximum(margins * smallest.clamp(min=0), text_lead).clamp(min=_LEAST_LEAD)
    boosted_leader = torch.stack([boosted[..., query_classes == k].any(-1) for k in range(n_classes)], -1)
    boosted_leader = boosted_leader.gather(-1, leader[..., None])[..., 0]
    excess = torch.where(boosted_leader & torch.isfinite(smallest), (lead - allowed).clamp(min=0),
                         torch.zeros_like(lead))
    return taught - excess[..., None] * (query_classes == leader[..., None])


def check_strokes(strokes, shape: tuple[int, int], n_classes: int) -> np.ndarray | None:
    """``None``, or an integer (H, W) array with values 0 (no hint) .. n_classes."""
    if strokes is None:
        return None
    try:
        array = np.asarray(strokes)
    except (ValueError, TypeError):
        raise InvalidOptionError(
            "strokes must be a rectangular integer array of the image's height and width (0 = no hint, "
            "k = class k); rows of different lengths were given.") from None
    if array.dtype == bool or array.dtype.kind not in "ui":
        raise InvalidOptionError(
            f"strokes must be an integer array (0 = no hint, k = class k), not {array.dtype}: "
            "e.g. the data of a napari Labels layer.")
    if array.shape != tuple(shape):
        raise InvalidOptionError(f"strokes of shape {array.shape} do not match the image's {tuple(shape)}.")
    # one pass over the whole array: strokes cover a sliver of a large image, and the values are checked there
    painted = array[array.any(axis=1)] if array.ndim == 2 else array
    if not painted.any():
        return None
    low, high = int(painted.min()), int(painted.max())
    if low < 0 or high > n_classes:
        raise InvalidOptionError(
            f"strokes hold values {min(low, 0)}..{high}, but only 0 (no hint) to {n_classes} "
            f"(one per class) are meaningful.")
    return array


def class_counts_per_cell(strokes: np.ndarray, n_classes: int, cells: tuple[int, int]) -> np.ndarray:
    """(n_classes + 1, cells_y, cells_x) how many pixels of each value 0..n_classes each cell of a ``cells`` grid over
    ``strokes`` holds, pixel (y, x) lying in cell (y * cells_y // height, x * cells_x // width); 0 is not counted.

    Row band by row band of cells, among the rows painted: a list of every painted pixel (np.nonzero) cost
    0.05-0.15 s for a 2000 x 2000 px fill at 4096 x 4096, on every re-run after it.
    """
    height, width = strokes.shape
    cells_y, cells_x = cells
    counts = np.zeros((n_classes + 1, cells_y, cells_x), np.int64)
    rows = np.flatnonzero(strokes.any(axis=1))
    if not len(rows):
        return counts
    column_cells = np.arange(width) * cells_x // width
    row_cells = rows * cells_y // height
    for band in np.split(rows, np.flatnonzero(np.diff(row_cells)) + 1):
        values = strokes[band]
        cell_row = int(band[0]) * cells_y // height
        for k in np.flatnonzero(np.bincount(values.ravel(), minlength=n_classes + 1)[1 : n_classes + 1]) + 1:
            per_column = np.count_nonzero(values == k, axis=0)
            counts[k, cell_row] += np.bincount(column_cells, weights=per_column, minlength=cells_x).astype(np.int64)
    return counts


def paste_strokes(labels: np.ndarray, strokes: np.ndarray) -> None:
    """Give the pixels a user painted the class they painted, in place: run by run of painted rows, without a list
    of the painted pixels (which cost 0.05-0.15 s for a 2000 x 2000 px fill)."""
    rows = np.flatnonzero(strokes.any(axis=1))
    for run in np.split(rows, np.flatnonzero(np.diff(rows) > 1) + 1) if len(rows) else ():
        block = slice(int(run[0]), int(run[-1]) + 1)
        np.copyto(labels[block], strokes[block], where=strokes[block] != 0, casting="unsafe")


def whitened_norms(patch_features: torch.Tensor, whitening: tuple | None) -> torch.Tensor:
    """(..., ) lengths of patch embeddings after whitening (kept with cached features, as they cost a matrix product)."""
    features = patch_features.float()
    if whitening is None:
        return features.norm(dim=-1)
    mean, transform = whitening
    return ((features - mean) @ transform).norm(dim=-1)


def thinning_index(classes: torch.Tensor, limit: int | None = None) -> torch.Tensor | None:
    """Indices of at most ``limit`` (default :data:`MAX_EXEMPLARS_PER_CLASS`) exemplars per class, drawn the same
    way on every run; None where every exemplar is kept."""
    limit = MAX_EXEMPLARS_PER_CLASS if limit is None else limit
    if len(classes) <= limit:
        return None
    keep = []
    generator = torch.Generator().manual_seed(0)
    for k in torch.unique(classes).tolist():
        index = torch.nonzero(classes == k).flatten()
        if len(index) > limit:
            pick = torch.randperm(len(index), generator=generator)[:limit].to(index.device)
            index = index[pick].sort().values
        keep.append(index)
    keep = torch.cat(keep).sort().values
    return None if len(keep) == len(classes) else keep


def thinned(features: torch.Tensor, classes: torch.Tensor, limit: int | None = None):
    """At most ``limit`` (default :data:`MAX_EXEMPLARS_PER_CLASS`) exemplars per class (see :func:`thinning_index`)."""
    keep = thinning_index(classes, limit)
    return (features, classes) if keep is None else (features[keep], classes[keep])


@dataclass
class Exemplars:
    """Patch embeddings under strokes (N, E) and their 0-based class indices (N,).

    ``covariance`` is the patch covariance of the images they were painted on, pooled over
    ``images`` images, for exemplars used on other images; None for strokes on the image being
    scored, which is then whitened with its own statistics. ``others`` holds the exemplars from
    other images when both kinds are used together. ``source`` names the image they were painted
    on (its feature key): scoring that very image, they count as its own strokes
    (:meth:`painted_on`).
    """

    features: torch.Tensor
    classes: torch.Tensor
    n_classes: int
    query_classes: torch.Tensor | None = None   # the class of each text query (synonyms share one)
    whitening: tuple | None = None               # (mean, W) of the image being scored
    _groups: list | None = None                  # (class, its exemplars whitened and normalised), per class
    strength: float | None = None                # the bonus of an exact match on this image (see image_strength)
    covariance: torch.Tensor | None = None       # (E, E) of the images these came from (None: the image scored)
    images: int = 0                              # how many images ``covariance`` pools
    others: "Exemplars | None" = None            # exemplars from other images, with their own covariance
    _transform: torch.Tensor | None = None       # the whitening of ``covariance``, computed once
    source: str | None = None                    # the feature key of the one image these were painted on
    _parts: tuple = ()                           # the sets these were merged from (by :meth:`combine`)
    lead_cap: float | None = None                # the most a taught lead may be, in cosine units (None: no cap)
    offsets: torch.Tensor | None = None          # (C,) a lesson's class offsets, in text-score spreads
    _offset_cosines: torch.Tensor | None = None  # the same in cosine units on the image being scored
    _stroke_offsets: torch.Tensor | None = None  # (C,) offsets from the strokes on that image, in cosine units
    image_ids: torch.Tensor | None = None        # (N,) which of the images pooled in ``covariance`` each came from
    image_means: torch.Tensor | None = None      # (images, E) those images' patch means
    strokes: torch.Tensor | None = None          # (N,) which stroke (connected piece of one class's paint) each is under
    positions: torch.Tensor | None = None        # (N,) each one's position within its window, until centred
    position_offsets: torch.Tensor | None = None  # (P, E) of the image being scored (see FeatureStats)
    uncentred: torch.Tensor | None = None        # (N, E) the features as the text scores them, once centred
    pixels: "PixelSamples | None" = None          # the painted pixels, as runs without snapping score them (lessons)
    unsnapped_offsets: torch.Tensor | None = None  # (C,) a lesson's offsets for runs without edge snapping

    def __post_init__(self):
        keep = thinning_index(self.classes)
        if keep is not None:
            self.features, self.classes = self.features[keep], self.classes[keep]
            if self.positions is not None:
                self.positions = self.positions[keep.to(self.positions.device)]
            if self.uncentred is not None:
                self.uncentred = self.uncentred[keep.to(self.uncentred.device)]
            if self.image_ids is not None:
                self.image_ids = self.image_ids[keep.to(self.image_ids.device)]
            if self.strokes is not None:
                self.strokes = self.strokes[keep.to(self.strokes.device)]

    def _copy(self, whitening=None) -> "Exemplars":
        others = None if self.others is None else self.others._copy()
        return Exemplars(self.features, self.classes, self.n_classes, self.query_classes, whitening,
                         covariance=self.covariance, images=self.images, others=others, _transform=self._transform,
                         source=self.source, _parts=self._parts, lead_cap=self.lead_cap, offsets=self.offsets,
                         image_ids=self.image_ids, image_means=self.image_means, strokes=self.strokes,
                         positions=self.positions, uncentred=self.uncentred, unsnapped_offsets=self.unsnapped_offsets)

    def centred(self, offsets: torch.Tensor | None) -> "Exemplars":
        """These exemplars with the strokes on the image being scored (those without a covariance) taken without
        what their window position adds there (``offsets``: that image's :attr:`FeatureStats.position_offsets`),
        as its patches are compared with them. Exemplars from other images are left as they are: an image's
        offsets hold some of its own content, and lessons centred so fell by 0.01-0.05 mIoU on unpainted images.
        """
        if (offsets is None or self.covariance is not None or self.positions is None or not len(self.positions)
                or int(self.positions.max()) >= len(offsets)):   # taken with other windows: left as they are
            return self
        copy = self._copy(self.whitening)
        device = self.features.device
        copy.features = self.features.float() - offsets.to(device)[self.positions.to(device)]
        copy.uncentred = self.features
        copy.positions = None
        return copy

    def _pieces(self) -> list:
        """The sets this one is made of, each painted on one image or taken from a lesson."""
        pieces = []
        part = self
        while part is not None:
            pieces += list(part._parts) if part._parts else [part]
            part = part.others
        return pieces

    def painted_on(self, image_key: str) -> "Exemplars":
        """These exemplars for scoring the image whose feature key is ``image_key``.

        Those painted on that very image (collected with their image's covariance, e.g. by the widget or a
        stack, which carry strokes to every plane) are compared in its own whitening, exactly as its strokes
        are: the setting chosen, and held to the safety of a stroke, for strokes on the image they teach.
        """
        pieces = self._pieces()
        if not any(p.source == image_key and p.covariance is not None for p in pieces):
            return self
        return Exemplars.combine([
            Exemplars(p.features, p.classes, p.n_classes, source=image_key, offsets=p.offsets, strokes=p.strokes,
                      positions=p.positions, unsnapped_offsets=p.unsnapped_offsets)
            if p.source == image_key and p.covariance is not None else p for p in pieces])

    def whitened(self, whitening) -> "Exemplars":
        """A copy that scores with the given image's whitening."""
        return self._copy(whitening)

    def for_image(self, whitening, text: torch.Tensor, snapping: bool = False,
                  query_classes: torch.Tensor | None = None, logit_scale: float | None = None,
                  position_offsets: torch.Tensor | None = None, snapped_offsets: bool | None = None) -> "Exemplars":
        """A copy that scores on the image whose whitening this is, with a strength measured on it.

        Exemplars from other images are whitened with their images' covariance and this image's mean.
        With ``snapping`` (edge snapping follows), taught leads are capped at
        :data:`SNAPPED_LEAD_SPREADS` of this image's text-score spread (see :meth:`teach`).
        With ``query_classes`` (the class of each text query) and ``logit_scale`` (the method's), strokes on
        this very image that repeat a correction in two or more places also shift the classes' scores on
        every patch (see :func:`stroke_offsets`), unless edge snapping follows. ``position_offsets`` (the
        image's :attr:`FeatureStats.position_offsets`) are taken off its patches before they are compared.
        A lesson's class offsets are those fitted on painted patches where ``snapped_offsets`` (default:
        ``snapping``; also for classes of given objects, whose edges are given), else those fitted on painted
        pixels for runs without snapping.
        """
        own = whitening
        if self.covariance is not None:
            if self._transform is None:  # the same for every image this is used on
                self._transform = _transform_of(self.covariance)
            whitening = (own[0], self._transform.to(own[0].device))
        copy = self.whitened(whitening)
        if query_classes is not None:
            copy.query_classes = query_classes
        copy.strength = image_strength(text, whitening)
        snapped_offsets = snapping if snapped_offsets is None else snapped_offsets   # a lesson's, for which kind of run
        offsets = self.offsets if snapped_offsets or self.unsnapped_offsets is None else self.unsnapped_offsets
        if offsets is not None:  # in spreads of the image being scored
            copy._offset_cosines = offsets.float().to(own[0].device) * (image_strength(text, own) / EXEMPLAR_SPREADS)
        if (self.covariance is None and self.strokes is not None and query_classes is not None and logit_scale
                and not snapping):  # edge snapping already undoes the spill that these offsets correct
            fitted = stroke_offsets(self, whitening, text, query_classes, copy.strength, logit_scale)
            if fitted is not None:
                copy._stroke_offsets = fitted.to(own[0].device) * (copy.strength / EXEMPLAR_SPREADS)
        if self.others is not None:
            copy.others = self.others.for_image(own, text, snapped_offsets=snapped_offsets)
        copy.position_offsets = position_offsets
        if copy._stroke_offsets is not None:
            # a class a lesson has an offset for keeps the lesson's: both are fitted against the text, and added
            # together they corrected twice (see STROKE_OFFSET_WEIGHT); the lesson's come from more images
            lesson = copy._all_offsets()
            if lesson is not None:
                copy._stroke_offsets = torch.where(lesson.to(copy._stroke_offsets.device) != 0,
                                                   torch.zeros_like(copy._stroke_offsets), copy._stroke_offsets)
                if not bool((copy._stroke_offsets != 0).any()):
                    copy._stroke_offsets = None
        if snapping:
            copy.lead_cap = SNAPPED_LEAD_SPREADS * image_strength(text, own) / EXEMPLAR_SPREADS
        return copy

    def teach(self, logits: torch.Tensor, patch_features: torch.Tensor, norms: torch.Tensor | None = None,
              layout: tuple[int, int] | None = None):
        """(B, P, Q) text cosines of the queries with each patch's :meth:`bonus` added (needs ``query_classes``).

        With a ``lead_cap``, a class that strokes on this very image make lead a patch leads the best other
        class by at most that much (a lesson's bonus, from other images, is not capped: see
        :data:`SNAPPED_LEAD_SPREADS`). Patches without a bonus keep their text scores exactly, but for a lesson's
        class offsets (:func:`offsets_between_taught_classes`), which come first. With ``layout``, a region of
        patches (8-connected, of one class, in a window) that the text gives a class and that the offsets and the
        bonus together would take from it altogether gets no offset that lifts another class above that class's
        own: the offsets move boundaries, and must not delete an object whose text leads it only weakly.
        """
        classes = self.query_classes
        offsets = self._all_offsets()
        bonuses: dict = {}

        def bonus(which=True) -> torch.Tensor:  # each computed once, whatever the offsets
            if which not in bonuses:
                bonuses[which] = (self.others.bonus(patch_features) if which == "others"
                                  else self.bonus(patch_features, norms, with_others=which))[..., classes]
            return bonuses[which]
        if offsets is None:
            return self._taught(logits, bonus, layout)
        # a lesson's calibration of the text, between a class it taught and the classes that one competes with
        added = offsets_between_taught_classes(offsets.to(logits.device), logits, classes, self.n_classes)
        taught = self._taught(logits + added, bonus, layout)
        if layout is None or logits.dim() != 3 or self.n_classes < 2:
            return taught
        text_leader = self._leaders(logits)
        taken = _regions_taken(text_leader, self._leaders(taught), layout)
        if not taken.any():
            return taught
        # on a region that the text gives a class and the lesson would take from it altogether, no class gains on
        # that one from the offsets (the exemplars still teach it): the offsets move boundaries, and must not delete
        # an object whose text leads it only weakly
        own = offsets.to(logits.device)[text_leader]                         # (B, P): its class's offset
        own = own[..., None] * (added != 0).any(-1, keepdim=True)             # where the offsets apply
        spared = torch.where(taken[..., None], torch.minimum(added, own), added)
        return self._taught(logits + spared, bonus, layout)

    def _leaders(self, scores: torch.Tensor) -> torch.Tensor:
        """(..., ) the leading class of (..., Q) query scores (the best of its queries)."""
        classes = self.query_classes
        return torch.stack([scores[..., classes == k].amax(-1) for k in range(self.n_classes)], -1).argmax(-1)

    def _taught(self, logits: torch.Tensor, bonus_of, layout: tuple[int, int] | None) -> torch.Tensor:
        """:meth:`teach` after the lessons' offsets: ``bonus_of(True)``, ``bonus_of(False)`` and ``bonus_of("others")`` give
        the (B, P, Q) bonus of every exemplar, of these alone and of those they hold from other images."""
        classes = self.query_classes
        if layout is not None and self.lead_cap is None and (
                (self._stroke_offsets is not None and STROKE_OFFSET_REACH is not None)
                or (EDGE_LEAD_MARGINS is not None and self.covariance is None and self.n_classes >= 2)):
            bonus = bonus_of()
            taught = logits + bonus
            if self._stroke_offsets is not None:
                shifted = taught + self._stroke_offsets.to(logits.device)[classes]
                taught = (shifted if STROKE_OFFSET_REACH is None else
                          within_reach(taught, shifted, classes, self.n_classes, layout, STROKE_OFFSET_REACH))
            if EDGE_LEAD_MARGINS is None or self.covariance is not None or self.n_classes < 2:
                return taught
            # a lesson alone (exemplars from other images) keeps its whole lead: cut as strokes are, its mean mIoU
            # over five sets of training scenes fell by 0.003-0.008 on all four models
            return balanced_edges(logits, taught, bonus > 0, classes, self.n_classes, layout, EDGE_LEAD_MARGINS)
        if self._stroke_offsets is not None:
            # the strokes' calibration of the text on their own image, on every patch. Limited to the patches
            # between two classes they painted, as a lesson's offsets are, propagation alone after 5 strokes fell
            # from 0.833 to 0.761 on synthetic-tiny-b and from 0.881 to 0.832 on synthetic-tiny-c (demo: 0.911 to
            # 0.921)
            logits = logits + self._stroke_offsets.to(logits.device)[classes]
        if self.lead_cap is None or self.covariance is not None or self.n_classes < 2:
            return logits + bonus_of()
        bonus = bonus_of(False)
        taught = logits + bonus
        best = torch.stack([taught[..., classes == k].amax(-1) for k in range(self.n_classes)], -1)  # best query
        top = best.topk(2, dim=-1)
        is_first = top.indices[..., :1] == torch.arange(self.n_classes, device=taught.device)
        best_other = torch.where(is_first, top.values[..., 1:2], top.values[..., :1])[..., classes]
        capped = torch.minimum(taught, torch.maximum(logits, best_other + self.lead_cap))
        taught = torch.where(bonus > 0, capped, logits)
        if self.others is not None:
            taught = torch.maximum(taught, logits + bonus_of("others"))
        return taught

    def _all_offsets(self) -> torch.Tensor | None:
        """(C,) the lessons' class offsets in cosine units of this set and the sets it holds (None: none)."""
        found = [part._offset_cosines for part in (self, self.others) if part is not None
                 and part._offset_cosines is not None]
        return None if not found else sum(found)

    @staticmethod
    def combine(parts) -> "Exemplars | None":
        """All exemplars of several sets (None entries skipped); those from other images keep a pooled covariance."""
        flat = [piece for part in parts if part is not None for piece in part._pieces()]
        here = [p for p in flat if p.covariance is None]
        elsewhere = [p for p in flat if p.covariance is not None]
        merged = [_merged(here, None, 0) if here else None,
                  _merged(elsewhere, sum(p.covariance.double().cpu() * p.images for p in elsewhere)
                          / sum(p.images for p in elsewhere), sum(p.images for p in elsewhere)) if elsewhere else None]
        if merged[0] is None:
            return merged[1]
        merged[0].others = merged[1]
        return merged[0]

    def to(self, device) -> "Exemplars":
        others = None if self.others is None else self.others.to(device)
        if self.features.device == torch.device(device) and others is self.others:
            return self
        return Exemplars(self.features.to(device), self.classes.to(device), self.n_classes,
                         None if self.query_classes is None else self.query_classes.to(device), self.whitening,
                         covariance=self.covariance, images=self.images, others=others, _transform=self._transform,
                         source=self.source, _parts=tuple(p.to(device) for p in self._parts), offsets=self.offsets,
                         image_ids=self.image_ids, image_means=self.image_means, strokes=self.strokes,
                         positions=self.positions, uncentred=None if self.uncentred is None else self.uncentred.to(device),
                         pixels=self.pixels, unsnapped_offsets=self.unsnapped_offsets)

    def _whiten(self, features: torch.Tensor) -> torch.Tensor:
        features = features.float()
        if self.whitening is None:
            return torch.nn.functional.normalize(features, dim=-1)
        mean, transform = self.whitening
        return torch.nn.functional.normalize((features - mean) @ transform, dim=-1)

    def _projectors(self) -> list:
        """Per class, (P, c): a patch f's whitened cosine to each exemplar is (f @ P.T - c) / |whitened f|."""
        if self._groups is None:  # computed once per run, not once per batch
            white = self._whiten(self.features)
            if self.whitening is not None:
                mean, transform = self.whitening
                projector = white @ transform            # (f - m) W . e_hat = (f - m) . (e_hat W), W symmetric
                offset = projector @ mean
            else:
                projector, offset = white, torch.zeros(len(white), device=white.device)
            self._groups = [(k, projector[self.classes == k], offset[self.classes == k])
                            for k in torch.unique(self.classes).tolist()]
        return self._groups

    def bonus(self, patch_features: torch.Tensor, norms: torch.Tensor | None = None,
              alpha: float | None = None, with_others: bool = True) -> torch.Tensor:
        """(B, P, C) bonus of each patch for each class: alpha * max(0, (s - t) / (1 - t)) for the
        whitened cosine s to the class's nearest exemplar and t = :data:`ALIKE_FROM`.

        ``norms`` are the patches' :func:`comparison_norms` with the scored image's own whitening and position
        offsets, when kept from an earlier run. On the image being scored, patches and its strokes' exemplars are
        compared without what their window positions add (see :class:`FeatureStats`); a patch counts as alike
        only if it is alike at the longer of its lengths with and without that, so that taking a patch's
        position's part off never makes it alike by shortening it (a patch that is mostly its position's part
        would otherwise come out alike to anything that shares its remaining direction). With exemplars of both
        kinds, each class takes the larger bonus.
        """
        alpha = (self.strength if self.strength is not None else EXEMPLAR_WEIGHT) if alpha is None else alpha
        features = patch_features.float()
        own = self.covariance is None
        offsets = self.position_offsets
        if not own or offsets is None or tuple(features.shape[-2:]) != tuple(offsets.shape):
            offsets = None
        if norms is None or not own:
            norms = comparison_norms(features, self.whitening, offsets)
        features = centred(features, offsets)   # as the strokes on this image were taken
        norms = norms.clamp(min=1e-12)
        out = torch.zeros(*patch_features.shape[:2], self.n_classes, device=patch_features.device)
        for k, projector, offset in self._projectors():
            dots = (features @ projector.T - offset).amax(-1)     # to the nearest exemplar, as the norm is shared
            nearest = dots / norms[..., 0]
            bonus = alpha * ((nearest - ALIKE_FROM) / (1 - ALIKE_FROM)).clamp(min=0)
            out[..., k] = torch.where(dots / norms[..., 1] >= ALIKE_FROM, bonus, 0)
        if self.others is not None and with_others:
            out = torch.maximum(out, self.others.bonus(patch_features))
        return out


def _merged(parts: list, covariance, images: int) -> Exemplars:
    device = parts[0].features.device
    sources = {p.source for p in parts}
    offsets = [p.offsets.double().cpu() for p in parts if p.offsets is not None]
    # a part without offsets for runs without snapping uses its own (patch-fitted) ones there too
    unsnapped = [(p.offsets if p.unsnapped_offsets is None else p.unsnapped_offsets).double().cpu() for p in parts
                 if p.offsets is not None or p.unsnapped_offsets is not None]
    image_ids = image_means = pixels = None
    if covariance is not None and all(p.image_ids is not None and p.image_means is not None for p in parts):
        starts = np.cumsum([0] + [len(p.image_means) for p in parts])
        image_ids = torch.cat([p.image_ids.cpu() + int(start) for p, start in zip(parts, starts)])
        image_means = torch.cat([p.image_means.float().cpu() for p in parts])
        if all(p.pixels is not None for p in parts):
            from .pixel_samples import PixelSamples

            pixels = PixelSamples.concatenate([p.pixels for p in parts], starts)
    strokes = None
    if all(p.strokes is not None for p in parts):  # numbered apart: the strokes of one set are not another's
        firsts = np.cumsum([0] + [int(p.strokes.max()) + 1 if len(p.strokes) else 0 for p in parts])
        strokes = torch.cat([p.strokes.cpu() + int(first) for p, first in zip(parts, firsts)])
    positions = torch.cat([p.positions.cpu() for p in parts]) if all(p.positions is not None for p in parts) else None
    return Exemplars(torch.cat([p.features.to(device) for p in parts]),
                     torch.cat([p.classes.to(device) for p in parts]), parts[0].n_classes,
                     covariance=covariance, images=images, source=sources.pop() if len(sources) == 1 else None,
                     _parts=tuple(parts), offsets=sum(offsets).float() if offsets else None,
                     image_ids=image_ids, image_means=image_means, strokes=strokes, positions=positions, pixels=pixels,
                     unsnapped_offsets=sum(unsnapped).float() if unsnapped and any(
                         p.unsnapped_offsets is not None for p in parts) else None)


class ExemplarCollector:
    """Gathers the patch embeddings under each class's strokes, window by window."""

    def __init__(self, strokes: np.ndarray | None, n_classes: int, pixels: bool = False, parts=None):
        self.strokes = strokes
        self.n_classes = n_classes
        # ``parts`` (instead of ``strokes``, for an image too large to hold, at native resolution: the windows' own
        # size): [(origin, strokes, pieces)], parts of the image's strokes that hold every painted pixel, each with
        # every window over one of its painted pixels and no other part's, and its strokes numbered as on the whole
        self.parts = None if parts is None else [
            (origin, torch.from_numpy(np.ascontiguousarray(part)), torch.from_numpy(np.ascontiguousarray(pieces)))
            for origin, part, pieces in parts]
        self._resized: torch.Tensor | None = None
        self._pixels = None  # with ``pixels``: the painted pixels as the windows score them (for lessons)
        self._want_pixels = pixels
        self.features: list[torch.Tensor] = []
        self.classes: list[torch.Tensor] = []
        self.stroke_ids: list[torch.Tensor] = []
        self.positions: list[torch.Tensor] = []
        self._pieces: torch.Tensor | None = None

    def _at_scale(self, grid: WindowGrid) -> torch.Tensor:
        """The strokes at the scale the windows see.

        Each working-size pixel takes the class painted most within its cell of the image, so
        that a thin stroke on a large image still marks the patches it crosses (sampling one
        image pixel per cell would miss a 4-pixel stroke on a 4096-pixel side); where the
        working size is larger than the image, the nearest image pixel.
        """
        if self._resized is None:
            height, width = self.strokes.shape
            ys = np.minimum(((np.arange(grid.height) + 0.5) * height / grid.height).astype(np.int64), height - 1)
            xs = np.minimum(((np.arange(grid.width) + 0.5) * width / grid.width).astype(np.int64), width - 1)
            resized = np.ascontiguousarray(self.strokes[ys][:, xs]).astype(np.int64)
            if grid.height < height or grid.width < width:
                counts = class_counts_per_cell(self.strokes, self.n_classes, (grid.height, grid.width))
                painted = counts[1:].sum(0) > 0
                resized[painted] = counts[1:].argmax(0)[painted] + 1
            self._resized = torch.from_numpy(resized)
            from skimage.measure import label

            # each connected piece of one class's paint (at the working size) is one stroke, numbered from 1
            self._pieces = torch.from_numpy(label(resized, background=0, connectivity=2).astype(np.int64))
        return self._resized

    def _part_of(self, box):
        """(strokes, pieces, the box within them) of the part that holds painted pixels under ``box``, or None."""
        for (top, left), strokes, pieces in self.parts:
            inner = (box[0] - top, box[1] - top, box[2] - left, box[3] - left)
            if inner[1] <= 0 or inner[3] <= 0 or inner[0] >= strokes.shape[0] or inner[2] >= strokes.shape[1]:
                continue
            whole = inner[0] >= 0 and inner[2] >= 0 and inner[1] <= strokes.shape[0] and inner[3] <= strokes.shape[1]
            if whole and bool(strokes[inner[0] : inner[1], inner[2] : inner[3]].any()):
                return strokes, pieces, inner
            if not whole and bool(strokes[max(inner[0], 0) : inner[1], max(inner[2], 0) : inner[3]].any()):
                raise ValueError("A window over painted pixels reaches beyond the part of the strokes that holds them.")
        return None

    def add(self, grid: WindowGrid, batch, patch_features: torch.Tensor) -> None:
        """Keep the embeddings of patches covered by strokes; a patch takes its most painted class, and the
        stroke of that class that it holds (the highest numbered where it holds several)."""
        strokes = pieces = None
        if self.parts is None:
            strokes, pieces = self._at_scale(grid), self._pieces
        if self._want_pixels and self._pixels is None and getattr(grid, "kind", None) == "windows":
            from .pixel_samples import SampleCollector

            self._pixels = SampleCollector(strokes.numpy())
        for box, features in zip(batch, patch_features):
            if self.parts is not None:  # the part whose painted pixels this window holds, if any
                found = self._part_of(box)
                if found is None:
                    continue
                strokes, pieces, box = found
            y1, y2, x1, x2 = box
            if not bool(strokes[y1:y2, x1:x2].any()):
                continue
            if self._pixels is not None:
                self._pixels.add(grid, box, features)
            counts = grid.cell_counts(strokes, box, self.n_classes)          # (C, patches)
            best = counts.argmax(0)
            painted = counts.sum(0) > 0
            if painted.any():
                self.features.append(features[painted].float().cpu())
                self.classes.append(best[painted])
                self.positions.append(torch.nonzero(painted).flatten().cpu())
                taught, row = torch.unique(best[painted], return_inverse=True)
                largest = torch.stack([grid.cell_largest(torch.where(strokes == k + 1, pieces, 0), box)
                                       for k in taught.tolist()])                # (classes here, patches)
                self.stroke_ids.append(largest[row, torch.nonzero(painted).flatten()].long())

    def result(self, device) -> Exemplars | None:
        if not self.features:
            return None
        return Exemplars(torch.cat(self.features).to(device), torch.cat(self.classes).to(device), self.n_classes,
                         strokes=torch.cat(self.stroke_ids), positions=torch.cat(self.positions),
                         pixels=None if self._pixels is None else self._pixels.result())
