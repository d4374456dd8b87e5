"""From window scores to labels: bilinear resize to the input size, softmax, max over synonyms, argmax, threshold.

Done in row chunks, so that only one chunk of the full-size scores exists at a time and
memory beyond the outputs stays bounded whatever the image size and number of classes.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .errors import OutOfMemoryError
from .results import SegmentationResult


def _bilinear_taps(in_size: int, out_size: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices and weights of PyTorch's bilinear resize (align_corners=False) along one axis,
    in float32 as it computes them."""
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    source = ((torch.arange(out_size, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_(min=0)
    low = source.long().clamp_(max=in_size - 1)
    high = (low + 1).clamp_(max=in_size - 1)
    weight = source - low.float()
    return low.to(device), high.to(device), weight.to(device)


def _resized_rows(scores: torch.Tensor, rows, cols, r0: int, r1: int) -> torch.Tensor:
    """Output rows r0:r1 of the bilinear resize of ``scores`` (Q, h, w), without building the whole output.

    The source rows these output rows need are first resized along the width by PyTorch
    itself (their height kept, which interpolates nothing), then each output row blends
    its two source rows: the same arithmetic, in the same order, as one whole-image call.
    """
    low, high, weight = (t[r0:r1] for t in rows)
    first, last = int(low.min()), int(high.max())
    width = cols[0].shape[0]
    slab = F.interpolate(scores[None, :, first : last + 1], size=(last + 1 - first, width), mode="bilinear",
                         align_corners=False)[0]
    w = weight.view(1, -1, 1)
    return slab.index_select(1, low - first) * (1 - w) + slab.index_select(1, high - first) * w


def _allocate(shape: tuple[int, ...], dtype, what: str) -> np.ndarray:
    try:
        return np.empty(shape, dtype=dtype)
    except MemoryError:
        gib = np.prod(shape, dtype=np.float64) * np.dtype(dtype).itemsize / 2**30
        raise OutOfMemoryError(
            f"Not enough memory for the {what} ({gib:.1f} GiB for {' x '.join(map(str, shape))}). "
            "Keep only the labels (maps=False; in napari, Probabilities: none), use fewer classes, or a smaller image."
        ) from None


class _Outputs:
    """The full-size outputs of a run, written a band of rows at a time."""

    def __init__(self, size, classes, n_queries: int, logit_scale: float, prob_threshold: float, maps: bool,
                 objects: np.ndarray | None = None):
        from .objects import ObjectTally

        height, width = size
        self.tally = None if objects is None else ObjectTally(objects, len(classes))
        self.classes, self.logit_scale, self.prob_threshold, self.maps = classes, logit_scale, prob_threshold, maps
        self.labels = _allocate((height, width), np.int32, "labels")
        self.confidence = _allocate((height, width), np.float32, "winning-class probabilities")
        n_classes = len(classes)
        self.probabilities = _allocate((n_classes, height, width), np.float32, "probability maps") if maps else None
        self.similarity = _allocate((n_classes, height, width), np.float32, "similarity maps") if maps else None
        self.spans, start = [], 0
        for query in classes:
            self.spans.append((start, start + len(query.synonyms)))
            start += len(query.synonyms)
        self.single = n_queries == n_classes  # no synonyms: class probabilities are the query probabilities

    def write(self, r0: int, chunk: torch.Tensor) -> None:
        """Rows r0.. of the labels from full-size scores (Q, rows, W): softmax, max over synonyms, argmax, threshold."""
        r1 = r0 + chunk.shape[1]
        chunk = chunk.float()
        probs = torch.softmax(chunk * self.logit_scale, dim=0)
        class_probs = probs if self.single else torch.stack([probs[a:b].amax(0) for a, b in self.spans])
        best, index = class_probs.max(0)
        chunk_labels = index + 1
        chunk_labels[best < self.prob_threshold] = 0
        self.labels[r0:r1] = chunk_labels.cpu().numpy()
        self.confidence[r0:r1] = best.cpu().numpy()
        if self.tally is not None:
            self.tally.add(r0, class_probs.cpu().numpy())
        if self.maps:
            self.probabilities[:, r0:r1] = class_probs.cpu().numpy()
            similarity = chunk if self.single else torch.stack([chunk[a:b].amax(0) for a, b in self.spans])
            self.similarity[:, r0:r1] = similarity.cpu().numpy()

    def result(self, method: str) -> SegmentationResult:
        names = [c.name for c in self.classes]
        objects = sums = None
        if self.tally is not None:  # each object's pixels take the object's class, 0 outside every object
            objects, lookup = self.tally.table(names)
            self.labels = self.tally.labels(lookup)
            sums = self.tally.parts()
        return SegmentationResult(self.labels, self.probabilities, self.similarity, names, list(self.classes), method,
                                  self.confidence, objects, sums)


def nearest_index(source: int, target: int) -> np.ndarray:
    """Source index of each output position in a nearest-neighbour resize (OpenCV's ``INTER_NEAREST``)."""
    return np.minimum((np.arange(target) * (source / target)).astype(np.int64), source - 1)


def postprocess(scores, size, classes, logit_scale, prob_threshold, method, maps: bool = True,
                chunk_bytes: int = 64 << 20, objects: np.ndarray | None = None,
                resize_mode: str = "bilinear") -> SegmentationResult:
    """Resize to the input size, softmax over queries, max over synonyms, argmax, threshold: in row chunks.

    Only one chunk of the full-size scores exists at a time, so memory beyond the
    outputs stays bounded whatever the image size and number of classes.
    ``resize_mode="nearest"`` repeats each working-size pixel instead (CLIP-DIY's official labels).
    """
    height, width = size
    n_queries = scores.shape[0]
    outputs = _Outputs(size, classes, n_queries, logit_scale, prob_threshold, maps, objects)
    resize = tuple(scores.shape[1:]) != (height, width)
    if resize and resize_mode == "nearest":
        rows_near = torch.from_numpy(nearest_index(scores.shape[1], height)).to(scores.device)
        cols_near = torch.from_numpy(nearest_index(scores.shape[2], width)).to(scores.device)
    elif resize:
        rows = _bilinear_taps(scores.shape[1], height, scores.device)
        cols = _bilinear_taps(scores.shape[2], width, scores.device)
    step = max(1, chunk_bytes // max(1, 4 * n_queries * width * 3))
    try:
        for r0 in range(0, height, step):
            r1 = min(r0 + step, height)
            if not resize:
                chunk = scores[:, r0:r1]
            elif resize_mode == "nearest":
                chunk = scores.index_select(1, rows_near[r0:r1]).index_select(2, cols_near)
            elif step >= height:  # one chunk: PyTorch's own whole-image resize
                chunk = F.interpolate(scores[None], size=(height, width), mode="bilinear", align_corners=False)[0]
            else:
                chunk = _resized_rows(scores, rows, cols, r0, r1)
            outputs.write(r0, chunk)
    except (MemoryError, torch.OutOfMemoryError):
        raise OutOfMemoryError("Ran out of memory while scoring: use fewer classes or a smaller image.") from None
    return outputs.result(method)


#: Working memory that edge snapping may use at once (besides the outputs); larger images go in bands of rows.
SNAP_MEMORY_BYTES = 3 << 29  # 1.5 GiB


def snapped_postprocess_steps(scores, guide, size, classes, logit_scale, prob_threshold, method, maps: bool,
                              iterations: int, dilations, budget: int | None = None, objects: np.ndarray | None = None):
    """Generator: edge snapping (PAMR) and labelling together, a band of rows at a time; returns the result.

    ``scores`` (Q, h, w) and ``guide`` (3, h', w') are at the working size; each band is
    resized to the output size with a margin of ``max(dilations) x iterations`` rows,
    wide enough that the band's edge reaches none of its rows, snapped, labelled and dropped.
    So neither the full-size scores nor their snapped copy ever exist whole, and the labels
    equal those of snapping the whole image at once (one band: the very same computation).
    Yields ``(done, total)`` iterations.
    """
    from .refine import _bytes_per_row, _finish, _refine_whole

    height, width = size
    dilations = tuple(int(d) for d in dilations)
    n_queries = scores.shape[0]
    outputs = _Outputs(size, classes, n_queries, logit_scale, prob_threshold, maps, objects)
    budget = SNAP_MEMORY_BYTES if budget is None else budget
    margin = max(dilations) * iterations
    fit = budget // _bytes_per_row(width, n_queries, guide.shape[0], dilations)
    band_rows = height if fit >= height else max(fit - 2 * margin, margin)
    starts = list(range(0, height, band_rows))
    total = max(1, len(starts) * iterations)
    taps = {}
    for name, source in (("scores", scores), ("guide", guide)):
        if tuple(source.shape[1:]) != (height, width) and len(starts) > 1:
            taps[name] = (_bilinear_taps(source.shape[1], height, source.device),
                          _bilinear_taps(source.shape[2], width, source.device))

    def rows_of(name: str, source: torch.Tensor, first: int, last: int) -> torch.Tensor:
        if tuple(source.shape[1:]) == (height, width):
            return source[:, first:last]
        if len(starts) == 1:  # PyTorch's own whole-image resize, as without bands
            return F.interpolate(source[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        return _resized_rows(source, *taps[name], first, last)

    try:
        for number, top in enumerate(starts):
            bottom = min(top + band_rows, height)
            first, last = max(0, top - margin), min(height, bottom + margin)
            band = rows_of("scores", scores, first, last).float()
            band_guide = rows_of("guide", guide, first, last).float()
            if iterations > 0:
                steps = _refine_whole(band, band_guide, iterations, dilations)
                for done in range(1, iterations + 1):
                    next(steps)
                    yield number * iterations + done, total
                band = _finish(steps)
            del band_guide
            outputs.write(top, band[:, top - first : bottom - first])
            del band
    except (MemoryError, torch.OutOfMemoryError):
        raise OutOfMemoryError("Not enough memory for edge snapping (PAMR) at this image size: "
                               "turn it off or use a smaller image.") from None
    return outputs.result(method)
