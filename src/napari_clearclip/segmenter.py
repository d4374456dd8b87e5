"""The Segmenter: ClearCLIP dense inference over sliding windows, with caches for interactive use."""

from __future__ import annotations

import hashlib
import math
import numbers
from dataclasses import dataclass, field, replace
from typing import Generator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .cache import ByteLRU
from .errors import InvalidOptionError, OutOfMemoryError
from .image import check_contrast_limits, check_image, prepare
from .methods import encode_dense, get_method, interpolated_positions
from .models import LoadedModel, default_options, load_model
from .prompts import ClassQuery, TextEncoder, check_templates, parse_classes
from .refine import PAMR_DILATIONS, PAMR_ITERATIONS, check_dilations_fit, check_pamr_options, pamr_steps
from .scribbles import ExemplarCollector, Exemplars, FeatureStats, check_scribbles, whitened_norms
from .windows import WindowGrid

REFINEMENTS = (None, "pamr")



class _Default:
    """Marks an option left to the model's default."""

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT = _Default()


@dataclass
class Progress:
    """One step of a run: ``stage`` is "text", "windows" or "edges" (snapping); ``done`` of ``total`` units."""

    stage: str
    done: int
    total: int
    then_edges: bool = False   # windows are followed by edge snapping (for progress bars)

    @property
    def message(self) -> str:
        what = {"text": "class names encoded", "edges": "snapping to edges"}.get(self.stage, "windows")
        return f"{what}: {self.done}/{self.total}"


@dataclass
class SegmentationResult:
    """Labels 1..C (0 where no class reaches the threshold), the winning probability, and per-class maps.

    ``probabilities`` and ``similarity`` are (C, H, W) float32, or None when the run
    was asked not to keep them (``maps=False``), which saves 8 bytes per pixel and class.
    """

    labels: np.ndarray
    probabilities: np.ndarray | None
    similarity: np.ndarray | None
    class_names: list[str]
    classes: list[ClassQuery] = field(default_factory=list)
    method: str = "clearclip"
    confidence: np.ndarray | None = None

    def class_table(self) -> list[dict]:
        """One row per label value, with its pixel count, for CSV export and legends."""
        counts = np.bincount(self.labels.ravel(), minlength=len(self.class_names) + 1)
        rows = [{"label": 0, "name": "unassigned", "synonyms": "", "pixels": int(counts[0])}]
        for index, query in enumerate(self.classes or [ClassQuery(n, (n,)) for n in self.class_names], start=1):
            rows.append({"label": index, "name": query.name, "synonyms": ", ".join(query.synonyms), "pixels": int(counts[index])})
        return rows


@dataclass
class _Features:
    """Patch embeddings of every window of one image, kept to re-score new classes instantly."""

    grid: WindowGrid
    batches: list[tuple[list[tuple[int, int, int, int]], torch.Tensor]]
    whitening: tuple[torch.Tensor, torch.Tensor] | None = None  # of these patches, once exemplars need it
    norms: list[torch.Tensor] | None = None                      # each batch's whitened patch lengths


class Segmenter:
    """Open-vocabulary segmentation with ClearCLIP (or a related method) on a frozen CLIP.

    >>> seg = Segmenter(model="ViT-B-16", pretrained="openai")          # doctest: +SKIP
    >>> res = seg.segment(image, ["sky", "horse, pony", "grass"])       # doctest: +SKIP
    >>> res.labels  # (H, W): 1 = sky, 2 = horse, 3 = grass              # doctest: +SKIP

    Text embeddings are cached per class name (in memory and on disk), and the patch
    embeddings of recent images in memory, so re-running with other classes is fast.
    """

    def __init__(
        self,
        model: str = "ViT-B-16",
        pretrained: str | None = None,
        method: str = "clearclip",
        device: str = "auto",
        precision: str = "auto",
        *,
        window_batch_size: int | None = None,
        feature_cache_bytes: int = 1 << 30,
        disk_cache: bool = True,
    ):
        self.method = method
        self.model: LoadedModel = load_model(model, pretrained, device, precision)
        self.pretrained = pretrained
        self.text = TextEncoder(self.model, disk_cache=disk_cache)
        self.window_batch_size = window_batch_size  # None: sized from the window area, see _batch_size
        self._features = ByteLRU(feature_cache_bytes)

    @property
    def method(self) -> str:
        return self._method_state[0]

    @method.setter
    def method(self, name: str) -> None:
        # one tuple, swapped in one assignment: a run reads name and function together
        function = get_method(name)
        self._method_state = (name.lower(), function)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def __repr__(self) -> str:
        return (f"Segmenter(model={self.model.name!r}, weights={self.model.weights_id!r}, method={self.method!r}, "
                f"device={str(self.device)!r}, precision={self.model.precision!r})")

    def segment(self, image, classes: str | Sequence[str], **options) -> SegmentationResult:
        """Segment ``image`` into ``classes``; see :meth:`segment_steps` for the options."""
        return run_to_end(self.segment_steps(image, classes, **options))

    def encode_classes(self, classes: str | Sequence[str], templates: Sequence[str] | None = None) -> torch.Tensor:
        """Text embeddings (queries, E) of every synonym, encoding only what is not cached."""
        queries = [s for c in parse_classes(classes) for s in c.synonyms]
        return self.text.embeddings(queries, check_templates(templates))

    def segment_steps(
        self,
        image,
        classes: str | Sequence[str],
        *,
        short_side: int | None | _Default = DEFAULT,
        crop: int | _Default = DEFAULT,
        stride: int | _Default = DEFAULT,
        logit_scale: float = 50.0,
        prob_threshold: float = 0.0,
        templates: Sequence[str] | None = None,
        contrast_limits: Sequence[float] | None = None,
        maps: bool = True,
        scribbles=None,
        refine: str | None = None,
        pamr_iterations: int = PAMR_ITERATIONS,
        pamr_dilations: Sequence[int] = PAMR_DILATIONS,
        exemplars: Exemplars | None = None,
    ) -> Generator[Progress, None, SegmentationResult]:
        """A generator that yields :class:`Progress` and returns the :class:`SegmentationResult`.

        Stop iterating (or close it) to cancel between batches. Defaults follow the
        official ClearCLIP protocol: short side 448, 448 crops at stride 224,
        logit scale 50, no probability threshold, the 80 ImageNet templates.
        Window settings left at ``DEFAULT`` take the model's own (the official ones,
        except for models trained at another scale such as ``synthetic-tiny``).
        ``maps=False`` skips the per-class probability and similarity maps (labels and
        the winning probability only), for large images with many classes.

        ``scribbles`` (an (H, W) integer array: 0 = no hint, k = class k) makes painted
        pixels keep class k and turns the patches under them into exemplars of class k, so
        similar regions elsewhere change class too; cached image features are reused.
        ``refine="pamr"`` snaps the scores to image edges with PAMR (``pamr_iterations``
        rounds over neighbours at ``pamr_dilations``), as NACLIP applies it. Both default
        to off: the official pipeline. ``exemplars`` (from :meth:`collect_exemplars` on
        other images, e.g. other slices of a stack) are used as well as the scribbles'.

        The method is read once at the start, so changing ``segmenter.method`` from
        another thread never mixes methods within a run or in the feature cache.
        """
        method_name, method_fn = self._method_state
        parsed = parse_classes(classes)
        array = check_image(image, min_side=max(self.model.patch_size))
        short_side, crop, stride, templates, contrast_limits = self._resolve_options(
            short_side, crop, stride, logit_scale, prob_threshold, templates, contrast_limits)
        scribbles = check_scribbles(scribbles, array.shape[:2], len(parsed))
        pamr_iterations, pamr_dilations = _check_refine(refine, pamr_iterations, pamr_dilations)
        if refine == "pamr" and pamr_iterations:
            check_dilations_fit(pamr_dilations, array.shape[:2])
        maps = _check_flag("maps", maps)
        exemplars = _check_exemplars(exemplars)

        queries = [s for c in parsed for s in c.synonyms]
        self.text.check_distinct(queries, templates)
        for done, total in self.text.encode_steps(queries, templates):
            yield Progress("text", done, total)
        text = self.text.embeddings(queries, templates).to(self.device)

        key = self._feature_key(array, contrast_limits, short_side, crop, stride, method_name)
        args = (array, key, contrast_limits, short_side, crop, stride, method_fn)
        features = self._features.get(key)
        mark = _then_edges if refine is not None else (lambda steps: steps)
        if scribbles is not None:
            own = yield from mark(self._collect(args, scribbles, len(parsed)))
            exemplars = Exemplars.combine([exemplars, own])
            features = self._features.get(key)
        if exemplars is not None:
            if exemplars.n_classes != len(parsed):
                raise InvalidOptionError(f"The exemplars are for {exemplars.n_classes} classes, not {len(parsed)}.")
            whitening = yield from mark(self._whitening(args, features))
            features = self._features.get(key)
            exemplars = exemplars.to(self.device).whitened(whitening)
            exemplars.query_classes = torch.tensor(
                [index for index, c in enumerate(parsed) for _ in c.synonyms], device=self.device)
        if features is None:
            scores = yield from mark(self._encode_and_score(*args, text=text, exemplars=exemplars))
        else:
            scores = self._score_cached(features, text, exemplars)
            yield Progress("windows", len(features.grid.windows), len(features.grid.windows), refine is not None)
        if refine == "pamr":
            scores = yield from self._pamr(scores, array, contrast_limits, short_side, pamr_iterations,
                                           pamr_dilations)
        result = _postprocess(scores, array.shape[:2], parsed, float(logit_scale), float(prob_threshold), method_name,
                              maps=maps)
        if scribbles is not None:
            result.labels[scribbles > 0] = scribbles[scribbles > 0]  # what the user painted is what they get
        return result

    def collect_exemplars(self, image, scribbles, classes: str | Sequence[str], *, short_side=DEFAULT,
                          crop=DEFAULT, stride=DEFAULT, contrast_limits=None, **_ignored) -> Exemplars | None:
        """The exemplars that ``scribbles`` on ``image`` make (None without strokes), for use on other images."""
        return run_to_end(self.collect_exemplars_steps(image, scribbles, classes, short_side=short_side, crop=crop,
                                                       stride=stride, contrast_limits=contrast_limits))

    def collect_exemplars_steps(self, image, scribbles, classes, *, short_side=DEFAULT, crop=DEFAULT, stride=DEFAULT,
                                contrast_limits=None, **_ignored) -> Generator[Progress, None, Exemplars | None]:
        """:meth:`collect_exemplars` as a generator that yields progress (image features are cached on the way)."""
        method_name, method_fn = self._method_state
        parsed = parse_classes(classes)
        array = check_image(image, min_side=max(self.model.patch_size))
        short_side, crop, stride, _, contrast_limits = self._resolve_options(
            short_side, crop, stride, 50.0, 0.0, None, contrast_limits)
        scribbles = check_scribbles(scribbles, array.shape[:2], len(parsed))
        if scribbles is None:
            return None
        key = self._feature_key(array, contrast_limits, short_side, crop, stride, method_name)
        exemplars = yield from self._collect((array, key, contrast_limits, short_side, crop, stride, method_fn),
                                             scribbles, len(parsed))
        return exemplars

    def _whitening(self, args, features: _Features | None):
        """Generator: this image's patch whitening (to compare patches with exemplars), kept with its cached features."""
        if features is not None and features.whitening is not None:
            return features.whitening
        stats = FeatureStats()
        if features is None:
            yield from self._encode_and_score(*args, text=None, collect=stats.add)
        else:
            for batch, patch_features in features.batches:
                stats.add(features.grid, batch, patch_features)
        whitening = stats.whitening(self.device)
        features = self._features.get(args[1])
        if features is not None:
            features.whitening = whitening
            features.norms = [whitened_norms(patch_features, whitening) for _, patch_features in features.batches]
        return whitening

    def _collect(self, args, scribbles, n_classes: int):
        """Generator: exemplars under ``scribbles``, from cached features or one encoding pass (which caches them)."""
        collector = ExemplarCollector(scribbles, n_classes)
        features = self._features.get(args[1])
        if features is None:
            yield from self._encode_and_score(*args, text=None, collect=collector.add)
        else:
            for batch, patch_features in features.batches:
                collector.add(features.grid, batch, patch_features)
        return collector.result(self.device)

    def _pamr(self, scores, array, contrast_limits, short_side, iterations, dilations):
        """Generator: PAMR on the cosine scores at the output size, guided by the normalised input at that size."""
        size = tuple(array.shape[:2])
        guide = prepare(array, self.model.mean, self.model.std, short_side, contrast_limits).to(self.device)
        try:
            if tuple(scores.shape[1:]) != size:
                scores = F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0]
            if tuple(guide.shape[1:]) != size:
                guide = F.interpolate(guide[None], size=size, mode="bilinear", align_corners=False)[0]
            steps = pamr_steps(scores.float(), guide, iterations, dilations)
            yield Progress("edges", 0, iterations)
            while True:
                try:
                    done, total = next(steps)
                except StopIteration as stop:
                    return stop.value
                yield Progress("edges", done, total)
        except (MemoryError, torch.OutOfMemoryError, RuntimeError) as exc:
            if isinstance(exc, RuntimeError) and "memory" not in str(exc).lower():
                raise
            raise OutOfMemoryError("Not enough memory for edge snapping (PAMR) at this image size: "
                                   "turn it off or use a smaller image.") from None

    def check_options(
        self,
        *,
        short_side: int | None | _Default = DEFAULT,
        crop: int | _Default = DEFAULT,
        stride: int | _Default = DEFAULT,
        logit_scale: float = 50.0,
        prob_threshold: float = 0.0,
        templates: Sequence[str] | None = None,
        contrast_limits: Sequence[float] | None = None,
        maps: bool = True,
        refine: str | None = None,
        pamr_iterations: int = PAMR_ITERATIONS,
        pamr_dilations: Sequence[int] = PAMR_DILATIONS,
    ) -> None:
        """Raise the error :meth:`segment` would raise for these options, before any image is read."""
        self._resolve_options(short_side, crop, stride, logit_scale, prob_threshold, templates, contrast_limits)
        _check_refine(refine, pamr_iterations, pamr_dilations)
        _check_flag("maps", maps)

    def _resolve_options(self, short_side, crop, stride, logit_scale, prob_threshold, templates, contrast_limits):
        defaults = default_options(self.model.name)
        short_side = defaults["short_side"] if short_side is DEFAULT else short_side
        crop = defaults["crop"] if crop is DEFAULT else crop
        stride = defaults["stride"] if stride is DEFAULT else stride
        templates = check_templates(templates)
        _check_options(short_side, crop, stride, logit_scale, prob_threshold, max(self.model.patch_size))
        return short_side, crop, stride, templates, check_contrast_limits(contrast_limits)

    # -- image side ---------------------------------------------------------------------------

    def _feature_key(self, array: np.ndarray, contrast_limits, short_side, crop, stride, method: str) -> str:
        digest = hashlib.blake2b(digest_size=20)
        digest.update(np.ascontiguousarray(array).data)
        digest.update(repr((array.shape, str(array.dtype), contrast_limits, short_side, crop, stride,
                            method, self.model.cache_id)).encode())
        return digest.hexdigest()

    def _encode_and_score(self, array, key, contrast_limits, short_side, crop, stride, method_fn, *,
                          text=None, exemplars: Exemplars | None = None, collect=None):
        """Generator: encode the windows batch by batch and add their scores up, yielding progress.

        Patch features are kept for later re-scoring only when they fit the cache budget,
        so a huge image streams through with one batch of features in memory. With
        ``text=None`` nothing is scored (a pass that only caches and ``collect``s).
        """
        pixels = prepare(array, self.model.mean, self.model.std, short_side, contrast_limits)
        grid = WindowGrid(pixels.shape[1], pixels.shape[2], crop, stride, self.model.patch_size)
        windows = grid.windows
        rows, cols = grid.patch_grid
        width = self.model.clip.visual.output_dim
        estimate = len(windows) * rows * cols * width * 4
        keep = _Features(grid, []) if estimate <= self._features.max_bytes else None
        scores = None if text is None else torch.zeros((text.shape[0], grid.height, grid.width), device=self.device)
        position = 0
        yield Progress("windows", 0, len(windows))
        while position < len(windows):
            batch = windows[position : position + self._batch_size(grid)]
            patch_features = self._encode_crops(grid.crop_batch(pixels, batch).to(self.device), method_fn)
            if collect is not None:
                collect(grid, batch, patch_features)
            if scores is not None:
                self._accumulate(scores, grid, batch, patch_features, text, exemplars)
            if keep is not None:
                keep.batches.append((batch, patch_features))
            position += len(batch)
            yield Progress("windows", position, len(windows))
        if keep is not None:
            self._features.put(key, keep, estimate)
        return None if scores is None else self._average(scores, grid)

    def _score_cached(self, features: _Features, text: torch.Tensor, exemplars: Exemplars | None = None) -> torch.Tensor:
        grid = features.grid
        scores = torch.zeros((text.shape[0], grid.height, grid.width), device=self.device)
        norms = features.norms if exemplars is not None and features.norms else [None] * len(features.batches)
        for (batch, patch_features), patch_norms in zip(features.batches, norms):
            self._accumulate(scores, grid, batch, patch_features, text, exemplars, patch_norms)
        return self._average(scores, grid)

    @torch.inference_mode()
    def _accumulate(self, scores, grid: WindowGrid, batch, patch_features, text, exemplars=None,
                    patch_norms=None) -> None:
        """Add the cosine similarities of a batch of windows, upsampled to the window size, into ``scores``."""
        left, _, top, _ = grid.padding
        win_h, win_w = grid.window_size
        rows, cols = grid.patch_grid
        logits = patch_features @ text.T
        if exemplars is not None:
            logits = logits + exemplars.bonus(patch_features, patch_norms)[..., exemplars.query_classes]
        logits = logits.transpose(1, 2).reshape(len(batch), -1, rows, cols)
        logits = F.interpolate(logits, size=grid.padded_size, mode="bilinear", align_corners=False)
        logits = logits[:, :, top : top + win_h, left : left + win_w]
        for (y1, y2, x1, x2), window in zip(batch, logits):
            scores[:, y1:y2, x1:x2] += window

    def _average(self, scores: torch.Tensor, grid: WindowGrid) -> torch.Tensor:
        row_count, col_count = grid.coverage()
        scores /= row_count.to(self.device)[:, None]
        scores /= col_count.to(self.device)[None, :]
        return scores

    def _batch_size(self, grid: WindowGrid) -> int:
        """Windows per batch: as set, else about two 448x448 windows' worth of pixels (eight on a GPU)."""
        if self.window_batch_size:
            return self.window_batch_size
        budget = (2 if self.device.type == "cpu" else 8) * 448 * 448
        height, width = grid.padded_size
        return max(1, budget // (height * width))

    def _encode_crops(self, crops: torch.Tensor, method_fn) -> torch.Tensor:
        """Patch embeddings of a batch of crops; on GPU out-of-memory, retry in smaller batches."""
        try:
            with torch.inference_mode(), self.model.autocast():
                rows = crops.shape[-2] // self.model.patch_size[0]
                cols = crops.shape[-1] // self.model.patch_size[1]
                positions = interpolated_positions(self.model.visual, rows, cols)
                return encode_dense(self.model.visual, crops, method_fn, positions)
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(crops) == 1:
                raise OutOfMemoryError(
                    f"The {self.device} device ran out of memory even with one window per batch. "
                    "Use a smaller crop, precision='fp16', or device='cpu'."
                ) from None
            self.window_batch_size = max(1, len(crops) // 2)
            half = len(crops) // 2
            return torch.cat([self._encode_crops(crops[:half], method_fn), self._encode_crops(crops[half:], method_fn)])


def _then_edges(steps: Generator):
    """Generator: ``steps`` with their window progress marked as followed by edge snapping."""
    while True:
        try:
            step = next(steps)
        except StopIteration as stop:
            return stop.value
        yield replace(step, then_edges=True) if step.stage == "windows" else step


def run_to_end(steps: Generator):
    """Run a progress generator to its end and return what it returns."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_flag(name: str, value) -> bool:
    """True or False (numpy's too); a string such as "no" is refused, not taken as true."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise InvalidOptionError(f"{name}={value!r} must be True or False.")


def _check_exemplars(exemplars) -> Exemplars | None:
    if exemplars is None or isinstance(exemplars, Exemplars):
        return exemplars
    raise InvalidOptionError(
        f"exemplars={exemplars!r} is not a set of exemplars: pass what Segmenter.collect_exemplars returns, or None.")


def _check_refine(refine, pamr_iterations, pamr_dilations) -> tuple[int, tuple[int, ...]]:
    if refine not in REFINEMENTS:
        raise InvalidOptionError(f"refine={refine!r} is not known: use None (the official pipeline) or 'pamr'.")
    return check_pamr_options(pamr_iterations, pamr_dilations)


def _check_options(short_side, crop, stride, logit_scale, prob_threshold, patch: int) -> None:
    def whole(value) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    if short_side is not None and (not whole(short_side) or short_side < patch):
        raise InvalidOptionError(f"short_side={short_side!r} must be a whole number of at least {patch} pixels, or None to keep the native size.")
    if not whole(crop) or crop < patch:
        raise InvalidOptionError(f"crop={crop!r} must be a whole number of at least {patch} pixels (the official value is 448).")
    if not whole(stride) or not 0 < stride <= crop:
        raise InvalidOptionError(f"stride={stride!r} must be a whole number between 1 and the crop size {crop} (the official value is 224).")
    if not _is_number(logit_scale) or not math.isfinite(logit_scale) or not logit_scale > 0:
        raise InvalidOptionError(f"logit_scale={logit_scale!r} must be a finite positive number (the official value is 50).")
    if not _is_number(prob_threshold) or not 0.0 <= prob_threshold <= 1.0:
        raise InvalidOptionError(f"prob_threshold={prob_threshold!r} must be a number between 0 and 1 (0 labels every pixel).")


def _bilinear_taps(in_size: int, out_size: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices and weights of PyTorch's bilinear resize (align_corners=False) along one axis, in float32 as it computes them."""
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


def _postprocess(scores, size, classes, logit_scale, prob_threshold, method, maps: bool = True,
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
