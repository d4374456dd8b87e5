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


def postprocess(scores, size, classes, logit_scale, prob_threshold, method, maps: bool = True,
                 chunk_bytes: int = 64 << 20) -> SegmentationResult:
    """Resize to the input size, softmax over queries, max over synonyms, argmax, threshold: in row chunks.

    Only one chunk of the full-size scores exists at a time, so memory beyond the
    outputs stays bounded whatever the image size and number of classes.
    """
    height, width = size
    n_classes, n_queries = len(classes), scores.shape[0]
    labels = _allocate((height, width), np.int32, "labels")
    confidence = _allocate((height, width), np.float32, "winning-class probabilities")
    probabilities = _allocate((n_classes, height, width), np.float32, "probability maps") if maps else None
    similarity = _allocate((n_classes, height, width), np.float32, "similarity maps") if maps else None
    spans, start = [], 0
    for query in classes:
        spans.append((start, start + len(query.synonyms)))
        start += len(query.synonyms)
    single = n_queries == n_classes  # no synonyms: class probabilities are the query probabilities
    resize = tuple(scores.shape[1:]) != (height, width)
    if resize:
        rows = _bilinear_taps(scores.shape[1], height, scores.device)
        cols = _bilinear_taps(scores.shape[2], width, scores.device)
    step = max(1, chunk_bytes // max(1, 4 * n_queries * width * 3))
    try:
        for r0 in range(0, height, step):
            r1 = min(r0 + step, height)
            if not resize:
                chunk = scores[:, r0:r1]
            elif step >= height:  # one chunk: PyTorch's own whole-image resize
                chunk = F.interpolate(scores[None], size=(height, width), mode="bilinear", align_corners=False)[0]
            else:
                chunk = _resized_rows(scores, rows, cols, r0, r1)
            chunk = chunk.float()
            probs = torch.softmax(chunk * logit_scale, dim=0)
            class_probs = probs if single else torch.stack([probs[a:b].amax(0) for a, b in spans])
            best, index = class_probs.max(0)
            chunk_labels = index + 1
            chunk_labels[best < prob_threshold] = 0
            labels[r0:r1] = chunk_labels.cpu().numpy()
            confidence[r0:r1] = best.cpu().numpy()
            if maps:
                probabilities[:, r0:r1] = class_probs.cpu().numpy()
                similarity[:, r0:r1] = (chunk if single else torch.stack([chunk[a:b].amax(0) for a, b in spans])).cpu().numpy()
    except (MemoryError, torch.OutOfMemoryError):
        raise OutOfMemoryError("Ran out of memory while scoring: use fewer classes or a smaller image.") from None
    return SegmentationResult(labels, probabilities, similarity, [c.name for c in classes], list(classes), method,
                              confidence)
