"""The Segmenter: ClearCLIP dense inference over sliding windows, with caches for interactive use."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, replace
from typing import Generator, Mapping, Sequence

import numpy as np
import torch

from . import compiled_snapping
from .affinity_tiles import AffinityTiles
from .cache import ByteLRU
from .clipdiy import background_index, check_foreground, fuse_foreground
from .errors import InvalidOptionError, OutOfMemoryError
from .hashing import pixel_key
from .lessons import Lesson, check_lesson
from .image import check_image, contrast_identity, normalise, prepare, prepare_with_intensities, whole_rgb
from .methods import encode_dense, get_method
from .models import LoadedModel, device_there, load_model
from .objects import check_objects
from .options import DEFAULT, SegmentOptions, _whole, check_dilations_fit, check_flag
from .progress import Progress, relabelled, run_to_end
from .prompts import TextEncoder, check_templates, parse_classes
from .results import SegmentationResult
from .scoring import postprocess, snapped_postprocess_steps
from .strokes import ExemplarCollector, Exemplars, FeatureStats, check_strokes, comparison_norms
from .windows import WindowGrid, grid_from_dict

__all__ = ["Segmenter", "SegmentationResult", "Progress", "DEFAULT", "run_to_end"]


@dataclass
class _Features:
    """Patch embeddings of every window of one image, kept to re-score new classes instantly."""

    grid: WindowGrid
    batches: list[tuple[list[tuple[int, int, int, int]], torch.Tensor]]
    whitening: tuple[torch.Tensor, torch.Tensor] | None = None  # of these patches, once exemplars need it
    norms: list[torch.Tensor] | None = None                      # each batch's comparison_norms
    statistics: FeatureStats | None = None                       # their mean and covariance
    guide: torch.Tensor | None = None   # the image the windows were cut from: normalised, or its uint8 intensities


class Segmenter:
    """Open-vocabulary segmentation with ClearCLIP (or a related method) on a frozen CLIP.

    ``feature_store`` keeps every image's features on disk (True: in the user cache, or the folder
    ``NAPARI_CLEARCLIP_FEATURE_STORE`` names; a folder: there, e.g. one a cluster filled with
    ``clearclip-segment --features-only``; False: memory only), so an image opened again in a
    new session is not encoded again. ``feature_store_bytes`` bounds the folder (the stores read least
    recently removed first); by default ``NAPARI_CLEARCLIP_FEATURE_STORE_BYTES``, else 2 GiB for the user
    cache and no bound for a folder you name, which may hold what a cluster spent hours encoding.

    >>> seg = Segmenter(model="ViT-B-16", pretrained="openai")          # doctest: +SKIP
    >>> res = seg.segment(image, ["sky", "horse, pony", "grass"])       # doctest: +SKIP
    >>> res.labels  # (H, W): 1 = sky, 2 = horse, 3 = grass              # doctest: +SKIP

    Text embeddings are cached per class name (in memory and on disk), and the patch
    embeddings of recent images in memory, so re-running with other classes is fast. The last
    labels of recent images (``label_cache_bytes``) and their edge-snapping weights
    (``affinity_cache_bytes``; 0 keeps none) let a re-run after a stroke or a class typed
    recompute only what changed.
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
        label_cache_bytes: int = 1 << 30,
        affinity_cache_bytes: int = 1 << 30,
        disk_cache: bool = True,
        feature_store=True,
        feature_store_bytes: int | None = None,
    ):
        _check_sizes(window_batch_size=window_batch_size, feature_cache_bytes=feature_cache_bytes,
                     label_cache_bytes=label_cache_bytes, affinity_cache_bytes=affinity_cache_bytes,
                     feature_store_bytes=feature_store_bytes)
        disk_cache = check_flag("disk_cache", disk_cache)
        self.method = method
        self.feature_store = _feature_store(feature_store, feature_store_bytes)
        if self.feature_store is not None:
            self.feature_store.prepare_reading()  # zarr's import overlaps the model's loading
        if threading.current_thread() is threading.main_thread() and device_there(device):
            # edge snapping's loops, read from numba's cache while the model loads (on a GPU too: labels alone are
            # snapped on the host). Not beside a GUI's main thread (a segmenter made in a worker): a third thread
            # holding Python's lock stalled napari's for 0.2-0.35 s
            compiled_snapping.prepare()
        self.model: LoadedModel = load_model(model, pretrained, device, precision)
        compiled_snapping.prepare()  # (or once the model is loaded)
        self.text = TextEncoder(self.model, disk_cache=disk_cache)
        self.window_batch_size = window_batch_size  # None: sized from the window area, see _batch_size
        self._features = ByteLRU(feature_cache_bytes)
        self._identities: dict[str, dict] = {}  # feature key -> what its features were made with (for the store)
        # per image and class list: the last run's labels, so that the next one recomputes only what changed
        self._label_states = ByteLRU(label_cache_bytes)
        from .tiled_labels import SpareArrays

        self._spare_label_arrays = SpareArrays()   # a replaced state's margins and winners, for the next run's copies
        # per image: the edge-snapping weights computed so far, which depend on the image alone
        self._affinities = ByteLRU(affinity_cache_bytes)
        self._guides = ByteLRU(64 << 20)
        self._newest_snapped: tuple | None = None   # (state key, guide, size, dilations) of the newest snapped run
        self._saliency = ByteLRU(256 << 20)  # FOUND's foreground maps per image
        self._found = None                   # (weights, FOUND model), loaded on first use

    @property
    def method(self) -> str:
        return self._method_state[0]

    @method.setter
    def method(self, name: str) -> None:
        # one tuple, swapped in one assignment: a run reads name and function together
        function = get_method(name)
        self._method_state = (name.lower(), function)

    def _method_for(self, keywords: dict) -> tuple:
        """(name, function) of the method a run uses: ``method=`` given to the call (taken out of ``keywords``),
        else this segmenter's, read once."""
        name = keywords.pop("method", None)
        if name is None:
            return self._method_state
        return str(name).lower(), get_method(name)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def __repr__(self) -> str:
        return (f"Segmenter(model={self.model.name!r}, weights={self.model.weights_id!r}, method={self.method!r}, "
                f"device={str(self.device)!r}, precision={self.model.precision!r})")

    def segment(self, image, classes: str | Sequence[str], options: SegmentOptions | Mapping | None = None,
                **keywords) -> SegmentationResult:
        """Segment ``image`` into ``classes``; see :meth:`segment_steps` for the options."""
        return run_to_end(self.segment_steps(image, classes, options, **keywords))

    def encode_classes(self, classes: str | Sequence[str], templates: Sequence[str] | None = None) -> torch.Tensor:
        """Text embeddings (queries, E) of every synonym, encoding only what is not cached."""
        queries = [s for c in parse_classes(classes) for s in c.synonyms]
        return self.text.embeddings(queries, check_templates(templates))

    def resolve_options(self, options: SegmentOptions | Mapping | None = None, *, method: str | None = None,
                        **keywords) -> SegmentOptions:
        """The options a run would use with this model and method (defaults filled in), or the error it would raise."""
        return SegmentOptions.build(options, **keywords).resolved(self.model.name, max(self.model.patch_size),
                                                                  method or self.method)

    def check_options(self, options: SegmentOptions | Mapping | None = None, **keywords) -> SegmentOptions:
        """Raise the error :meth:`segment` would raise for these options, before any image is read."""
        return self.resolve_options(options, **keywords)

    def segment_steps(
        self,
        image,
        classes: str | Sequence[str],
        options: SegmentOptions | Mapping | None = None,
        *,
        maps: bool = True,
        strokes=None,
        exemplars: Exemplars | None = None,
        objects=None,
        lesson=None,
        foreground=None,
        found_weights=None,
        remember: bool = True,
        focus: tuple | None = None,
        image_statistics: FeatureStats | None = None,
        **keywords,
    ) -> Generator[Progress, None, SegmentationResult]:
        """A generator that yields :class:`Progress` and returns the :class:`SegmentationResult`.

        Stop iterating (or close it) to cancel between batches. ``options`` (a
        :class:`SegmentOptions`, a dict, or the same as keywords) default to the official
        ClearCLIP protocol: short side 448, 448 crops at stride 224, logit scale 50, no
        probability threshold, the 80 ImageNet templates, no refinement. Window settings
        left at ``DEFAULT`` take the model's own (the official ones, except for models
        trained at another scale such as ``synthetic-tiny``).
        ``maps=False`` skips the per-class probability and similarity maps (labels and
        the winning probability only), for large images with many classes.

        ``strokes`` (an (H, W) integer array: 0 = no hint, k = class k) makes painted
        pixels keep class k and turns the patches under them into exemplars of class k, so
        similar regions elsewhere change class too; cached image features are reused.
        ``refine="pamr"`` snaps the scores to image edges with PAMR (``pamr_iterations``
        rounds over neighbours at ``pamr_dilations``), as NACLIP applies it.
        ``exemplars`` (from :meth:`collect_exemplars` on other images, e.g. other slices
        of a stack) are used as well as the strokes'.

        ``lesson`` (a :class:`~napari_clearclip.lessons.Lesson` from :meth:`make_lesson`, or a
        path to a saved one) teaches with the exemplars of strokes on other images; its classes
        must be the run's (same names, in any order: they are matched by name), its model,
        method and window settings the run's.

        ``objects`` (an (H, W) array of instance ids, 0 = no object, e.g. from cellpose or
        StarDist) gives each object the class whose probability summed over its pixels is
        highest: ``result.objects`` has columns ``id``, ``class``, ``confidence`` (that class's
        mean probability over the object) and ``area``; ``result.labels`` gives each object's
        pixels its class and 0 elsewhere. Strokes then teach without being pasted.

        ``foreground`` (an (H, W) probability map in 0..1, a mask or labels, where every nonzero pixel counts
        as foreground; or ``"found"``: FOUND's saliency from DINO, with ``found_weights=(dino_checkpoint,
        decoder_checkpoint)``) fuses with the scores as CLIP-DIY does: the background class's scores
        (``background_class``, else the class called background) times (1 - s), every other class's times s.

        ``remember=False`` keeps nothing of this image (features, labels for re-runs, the snapping guide):
        for the tiles of an image too large to hold, which are seen once. ``image_statistics`` (a
        :class:`~napari_clearclip.strokes.FeatureStats`) are the patch statistics exemplars and lessons compare with,
        in place of this image's own: a tile of a larger image is then taught as the whole image is
        (:func:`~napari_clearclip.lazy_tiles.image_statistics_steps`).

        ``focus`` (row, column: where the user just painted; or top, bottom, left, right: what the user sees)
        makes a re-run with edge snapping and ``maps=False`` recompute the labels there first and yield the
        parts that are final as they come (``Progress.preview``, a
        :class:`~napari_clearclip.tiled_labels.LabelsPreview`), to show before the
        run ends; the result is the same.

        The method is read once at the start, so changing ``segmenter.method`` from
        another thread never mixes methods within a run or in the feature cache;
        ``method="naclip"`` (any name ``segmenter.method`` takes) runs another method for
        this call alone.
        """
        method_name, method_fn = self._method_for(keywords)
        strokes = _renamed_strokes(strokes, keywords)
        parsed = parse_classes(classes)
        array = check_image(image, min_side=max(self.model.patch_size))
        opts = self.resolve_options(options, method=method_name, **keywords)
        templates = check_templates(opts.templates)
        strokes = check_strokes(strokes, array.shape[:2], len(parsed))
        if opts.refine == "pamr" and opts.pamr_iterations:
            check_dilations_fit(opts.pamr_dilations, array.shape[:2])
            compiled_snapping.prepare()  # loaded while the model runs
        maps = check_flag("maps", maps)
        remember = check_flag("remember", remember)
        focus = _checked_focus(focus)
        objects = check_objects(objects, array.shape[:2])
        exemplars = _check_exemplars(exemplars)
        lesson = check_lesson(lesson)
        foreground = check_foreground(foreground, array.shape[:2])
        if foreground is not None:
            background = background_index(parsed, opts.background_class)
            background_queries = torch.tensor([i == background for i, c in enumerate(parsed) for _ in c.synonyms])
        if lesson is not None:
            exemplars = Exemplars.combine([lesson.exemplars_for(self, parsed, opts, method_name), exemplars])

        queries = [s for c in parsed for s in c.synonyms]
        self.text.check_distinct(queries, templates)
        for done, total in self.text.encode_steps(queries, templates):
            yield Progress("text", done, total)
        text = self.text.embeddings(queries, templates).to(self.device)

        method_fn, extra = self._bind_text(method_fn, text, opts)
        key = self._feature_key(array, opts, method_name, extra)
        args = (array, key, opts, method_fn)
        tiled = not maps and objects is None and opts.prob_threshold == 0 and not (
            method_name == "clipdiy" and opts.refine is None)
        # a fresh labelling of an image whose features are at hand: its labels and margins are mapped meanwhile (not
        # while an image is encoded, whose own peak of memory they would add to)
        if (tiled and remember and self._label_states.get(self._label_state_key(key, opts)) is None
                and self._features_at_hand(key)):
            from .tiled_labels import label_dtype

            self._spare_label_arrays.map_ahead(array.shape[:2], (label_dtype(len(parsed)), np.float16))
        features = self._cached_features(key)
        refine = opts.refine is not None
        mark = (lambda steps: relabelled(steps, then_edges=True)) if refine else (lambda steps: steps)
        if exemplars is not None:  # those painted on this very image teach it as its own strokes do
            exemplars = exemplars.painted_on(key)
        if strokes is not None:
            own = yield from mark(self._collect(args, strokes, len(parsed)))
            exemplars = Exemplars.combine([exemplars, own])
            features = self._cached_features(key)
        if exemplars is not None:
            if exemplars.n_classes != len(parsed):
                raise InvalidOptionError(f"The exemplars are for {exemplars.n_classes} classes, not {len(parsed)}.")
            if image_statistics is not None:  # a region of a larger image, taught with that image's statistics
                whitening, stats = image_statistics.whitening(self.device), image_statistics
            else:
                whitening, stats = yield from mark(self._whitening(args, features))
            features = self._features.get(key)
            if image_statistics is not None and features is not None:
                features = replace(features, norms=None)   # kept from a run of this region alone: other lengths
            snapping = opts.refine == "pamr" and opts.pamr_iterations > 0
            query_classes = torch.tensor([index for index, c in enumerate(parsed) for _ in c.synonyms],
                                         device=self.device)
            offsets = stats.position_offsets  # the strokes on this image are compared without what windows add
            # the offsets fitted on painted pixels correct where edges fall; given objects are the edges, and
            # with them those offsets only shrank objects (a green object of 770 px went to background on the demo)
            exemplars = exemplars.centred(offsets).to(self.device).for_image(
                whitening, text, snapping, query_classes, opts.logit_scale,
                None if offsets is None else offsets.to(self.device), snapped_offsets=snapping or objects is not None)
        if features is None:
            scores = yield from mark(self._encode_and_score(*args, text=text, exemplars=exemplars, remember=remember))
        else:
            scores = self._score_cached(features, text, exemplars)
            yield Progress("windows", len(features.grid.windows), len(features.grid.windows), refine)
        if foreground is not None:
            saliency = yield from self._foreground_map(foreground, array, found_weights)
            scores = fuse_foreground(scores, saliency, background_queries)
        if method_name == "clipdiy" and opts.refine is None:  # official: labels of the working size, repeated
            result = postprocess(scores, array.shape[:2], parsed, opts.logit_scale, opts.prob_threshold, method_name,
                                 maps=maps, objects=objects, resize_mode="nearest")
        elif tiled:
            result = yield from self._tiled_labels(scores, array, key, opts, parsed, method_name, remember, focus)
        elif opts.refine == "pamr":
            result = yield from self._snap_and_label(scores, array, opts, parsed, method_name, maps, objects)
        else:
            result = postprocess(scores, array.shape[:2], parsed, opts.logit_scale, opts.prob_threshold, method_name,
                                 maps=maps, objects=objects)
        if strokes is not None and objects is None:
            result.paste(strokes)  # what the user painted is what they get
        return result

    def _foreground_map(self, foreground, array: np.ndarray, found_weights):
        """Generator: the foreground map as a tensor; ``"found"`` runs FOUND on the image (kept per image)."""
        if not isinstance(foreground, str):
            return torch.from_numpy(foreground)
        from .found import found_foreground_steps

        digest = hashlib.blake2b(pixel_key(array), digest_size=20)
        digest.update(repr((array.shape, str(array.dtype), found_weights)).encode())
        cached = self._saliency.get(digest.hexdigest())
        if cached is not None:
            return cached
        model = self._found_model(found_weights)
        saliency = yield from found_foreground_steps(model, array, self.device)
        self._saliency.put(digest.hexdigest(), saliency, saliency.numel() * 4)
        return saliency

    def _found_model(self, found_weights):
        from .found import load_found

        key = None if found_weights is None else tuple(str(p) for p in found_weights)
        if self._found is None or self._found[0] != key:
            self._found = (key, load_found(found_weights, self.device))
        return self._found[1]

    def segment_tiled(self, image, classes: str | Sequence[str], options: SegmentOptions | Mapping | None = None, *,
                      out=None, tile: int | None = None, absent_chunks: str = "error", **keywords):
        """Segment an image too large to hold (a dask or zarr array, an OME-Zarr level) tile by tile at native
        resolution, reading one region at a time; the labels equal :meth:`segment`'s at ``short_side=None``.

        ``out``: None (returns a NumPy array of the smallest unsigned type), an array to write into (e.g. a
        zarr array), or a path where a zarr store is written and renamed into place when complete (an
        interrupted run resumes from the tiles it finished). Returns the labels (an array or the zarr array).

        A zarr image whose store lacks chunks is refused (zarr would read them as the fill value without a
        word), unless ``absent_chunks="fill"``: for stores that leave out chunks holding only that value.

        ``lesson=`` and ``strokes=`` (an array-like of the image's size, e.g. a zarr array; read in bands, then the
        part that holds the painted pixels) teach every tile as :meth:`segment` teaches the whole image: a first
        pass over the image gathers its statistics and the exemplars under the strokes (the image is encoded once
        more), and the painted pixels keep their class.

        ``objects=`` (instance ids of the image's size, e.g. a zarr or dask array from cellpose on a slide; read a
        tile at a time) gives each object the class :meth:`segment` gives it, from its sums over every tile it
        crosses; returns ``(labels, objects table)``, the table as ``result.objects``.
        """
        return run_to_end(self.segment_tiled_steps(image, classes, options, out=out, tile=tile,
                                                   absent_chunks=absent_chunks, **keywords))

    def segment_tiled_steps(self, image, classes, options: SegmentOptions | Mapping | None = None, *, out=None,
                            tile: int | None = None, absent_chunks: str = "error", **keywords):
        """:meth:`segment_tiled` as a generator that yields :class:`Progress` per tile (close it to stop)."""
        from .lazy_tiles import DEFAULT_TILE, segment_tiled_steps

        return segment_tiled_steps(self, image, classes, options, out=out,
                                   tile=DEFAULT_TILE if tile is None else tile, absent_chunks=absent_chunks,
                                   **keywords)

    def make_lesson(self, classes: str | Sequence[str], painted: Sequence[tuple], options: SegmentOptions | Mapping
                    | None = None, **keywords) -> Lesson:
        """A :class:`~napari_clearclip.lessons.Lesson` from strokes on one or more images.

        ``painted`` is a list of ``(image, strokes)`` pairs, strokes as for :meth:`segment`
        (class k painted as k, 0 elsewhere). The lesson keeps the exemplars with the classes,
        this model and the window settings, and can be saved (``lesson.save(path)``) and used
        on other images (``segment(..., lesson=lesson)``), by the command line (``--lesson``)
        and in napari.

        With strokes on two or more images the lesson also learns class offsets: how much this
        model's text under- or over-scores each class, fitted on each image's exemplars as the
        exemplars of the *other* images teach them (see :func:`~napari_clearclip.strokes.lesson_offsets`),
        and added, in each image's text-score spreads, wherever the lesson is used.
        """
        method_name, _ = self._method_for(keywords)
        opts = self.resolve_options(options, method=method_name, **keywords)
        parts, references = [], []
        for number, pair in enumerate(painted):
            try:
                image, strokes = pair
            except (TypeError, ValueError):
                raise InvalidOptionError(f"painted[{number}] is not an (image, strokes) pair.") from None
            part = self.collect_exemplars(image, strokes, classes, opts, method=method_name)
            parts.append(part)
            if part is not None:  # the image's labels after its strokes check the exemplars of the others
                labels = self.segment(image, classes, opts, method=method_name, strokes=strokes, maps=False).labels
                references.append(self.lesson_references(image, labels, classes, opts, method=method_name))
        lesson = Lesson.from_exemplars(Exemplars.combine(parts), classes, self, opts, method_name, fit=False)
        return lesson.with_references(references).fitted()

    def reference_step(self, shape, options: SegmentOptions | Mapping | None = None, **keywords) -> int:
        """Every how many pixels :meth:`lesson_references` reads an image's labels: a few per patch."""
        rest = dict(keywords)
        opts = self.resolve_options(options, method=self._method_for(rest)[0], **rest)
        short = opts.short_side or min(shape[:2])
        return max(1, min(shape[:2]) // (2 * short))

    def lesson_references(self, image, labels, classes, options: SegmentOptions | Mapping | None = None,
                          **keywords) -> Exemplars | None:
        """A sample of ``image``'s patches (up to ``strokes.REFERENCES_PER_CLASS`` per class) with the class that
        ``labels`` (its labels after its strokes, or a user's edited labels) give each: what a lesson checks the
        exemplars painted on other images with. A large image's labels are read a few pixels per patch."""
        from .strokes import REFERENCES_PER_CLASS, thinning_index

        labels = np.asarray(labels)
        step = self.reference_step(labels.shape, options, **keywords)
        if step > 1:
            sampled = np.zeros(labels.shape, np.int32)
            sampled[::step, ::step] = labels[::step, ::step]
            labels = sampled
        found = self.collect_exemplars(image, labels, classes, options, **keywords)
        if found is None:
            return None
        keep = thinning_index(found.classes.cpu(), REFERENCES_PER_CLASS)
        if keep is not None:
            found.features, found.classes = found.features[keep.to(found.features.device)], found.classes[
                keep.to(found.classes.device)]
        return found

    def collect_exemplars(self, image, strokes, classes: str | Sequence[str],
                          options: SegmentOptions | Mapping | None = None, **keywords) -> Exemplars | None:
        """The exemplars that ``strokes`` on ``image`` make (None without strokes), for use on other images."""
        return run_to_end(self.collect_exemplars_steps(image, strokes, classes, options, **keywords))

    def collect_exemplars_steps(self, image, strokes, classes, options: SegmentOptions | Mapping | None = None,
                                **keywords) -> Generator[Progress, None, Exemplars | None]:
        """:meth:`collect_exemplars` as a generator that yields progress (image features are cached on the way)."""
        method_name, method_fn = self._method_for(keywords)
        parsed = parse_classes(classes)
        array = check_image(image, min_side=max(self.model.patch_size))
        opts = self.resolve_options(options, method=method_name, **keywords)
        strokes = check_strokes(strokes, array.shape[:2], len(parsed))
        if strokes is None:
            return None
        extra = None
        if getattr(method_fn, "needs_text", False):  # features that depend on the classes
            queries = [s for c in parsed for s in c.synonyms]
            templates = check_templates(opts.templates)
            for done, total in self.text.encode_steps(queries, templates):
                yield Progress("text", done, total)
            method_fn, extra = self._bind_text(method_fn, self.text.embeddings(queries, templates).to(self.device),
                                               opts)
        key = self._feature_key(array, opts, method_name, extra)
        args = (array, key, opts, method_fn)
        exemplars = yield from self._collect(args, strokes, len(parsed), pixels=True)
        if exemplars is not None:  # used on other images, they are compared in this image's whitening
            stats = yield from self._statistics(args, self._cached_features(key))
            exemplars.covariance, exemplars.images, exemplars.source = stats.covariance.float(), 1, key
            exemplars.image_ids = torch.zeros(len(exemplars.classes), dtype=torch.long)
            exemplars.image_means = stats.mean.float()[None]
        return exemplars

    def _statistics(self, args, features: _Features | None):
        """Generator: this image's patch mean and covariance, kept with its cached features."""
        if features is not None and features.statistics is not None:
            return features.statistics
        stats = FeatureStats()
        if features is None:
            yield from self._encode_and_score(*args, text=None, collect=stats.add)
        else:
            for batch, patch_features in features.batches:
                stats.add(features.grid, batch, patch_features)
        features = self._features.get(args[1])
        if features is not None:
            features.statistics = stats
        return stats

    def _whitening(self, args, features: _Features | None):
        """Generator: (this image's patch whitening, to compare patches with exemplars, and its statistics), kept with
        its cached features, with each patch's whitened lengths with and without what its window position adds
        (:func:`~napari_clearclip.strokes.comparison_norms`)."""
        if features is not None and features.whitening is not None and features.statistics is not None:
            return features.whitening, features.statistics
        stats = yield from self._statistics(args, features)
        whitening = stats.whitening(self.device)
        features = self._features.get(args[1])
        if features is not None:
            offsets = stats.position_offsets
            features.whitening = whitening
            features.norms = [comparison_norms(patch_features, whitening, offsets)
                              for _, patch_features in features.batches]
        return whitening, stats

    def _collect(self, args, strokes, n_classes: int, pixels: bool = False):
        """Generator: exemplars under ``strokes``, from cached features or one encoding pass (which caches them);
        with ``pixels``, also the painted pixels as the windows score them (what a lesson's offsets are fitted on)."""
        collector = ExemplarCollector(strokes, n_classes, pixels)
        features = self._cached_features(args[1])
        if features is None:
            yield from self._encode_and_score(*args, text=None, collect=collector.add)
        else:
            for batch, patch_features in features.batches:
                collector.add(features.grid, batch, patch_features)
        return collector.result(self.device)

    def _guide(self, array, key: str, opts: SegmentOptions, remember: bool = True) -> torch.Tensor:
        """The normalised image at the working size that edge snapping follows (kept per image)."""
        guide = self._guides.get(key)
        if guide is None:  # the image the features were encoded from, read from the feature store with them
            features = self._features.get(key)
            guide = None if features is None else features.guide
            if guide is not None and guide.dtype == torch.uint8:  # kept as whole intensities: the very same values
                guide = normalise(guide, self.model.mean, self.model.std)
                if remember:
                    self._guides.put(key, guide, guide.numel() * 4)
        if guide is None:
            guide = prepare(array, self.model.mean, self.model.std, opts.short_side, opts.contrast_limits)
            if remember:
                self._guides.put(key, guide, guide.numel() * 4)
        return guide

    @staticmethod
    def _label_state_key(key: str, opts: SegmentOptions) -> tuple:
        """What the labels state a run leaves for the next run on the same image is kept under."""
        snap = (opts.pamr_iterations, tuple(opts.pamr_dilations)) if opts.refine == "pamr" else ()
        return key, snap, opts.templates if opts.templates is None else tuple(opts.templates)

    def _tiled_labels(self, scores, array, key: str, opts: SegmentOptions, parsed, method_name: str,
                      remember: bool = True, focus: tuple[float, float] | None = None):
        """Generator: the labels alone, computed per pixel only where they can differ from a uniform
        class or from this image's previous run (see :mod:`.tiled_labels`); the winning probability
        is computed when first read."""
        from .tiled_labels import label_steps

        snap = (opts.pamr_iterations, tuple(opts.pamr_dilations)) if opts.refine == "pamr" else ()
        guide = self._guide(array, key, opts, remember) if snap and opts.pamr_iterations else None
        spans, start = [], 0
        for query in parsed:
            spans.append((start, start + len(query.synonyms)))
            start += len(query.synonyms)
        state_key = self._label_state_key(key, opts)
        affinities = None
        if snap and remember and self._affinities.max_bytes > 0:
            affinities = self._affinities.get(state_key) or AffinityTiles(self._affinities.max_bytes)
        steps = label_steps(scores, guide, tuple(array.shape[:2]), spans, [tuple(c.synonyms) for c in parsed], snap,
                            self._label_states.get(state_key) if remember else None, affinities=affinities,
                            focus=focus, spare=self._spare_label_arrays)
        try:
            if snap:
                yield Progress("edges", 0, 1)
                state = yield from relabelled_pairs(steps, "edges")
            else:  # quick: resizing alone
                state = run_to_end(steps)
        except (MemoryError, torch.OutOfMemoryError):
            raise OutOfMemoryError("Not enough memory to label this image: use fewer classes or a smaller image.") \
                from None
        if remember:
            replaced = self._label_states.get(state_key)
            self._label_states.put(state_key, state, state.nbytes)
            if replaced is not None and replaced is not state:
                self._spare_label_arrays.donate(replaced, holders=1)   # unless a run in flight still reads it
            del replaced
        if affinities is not None:
            self._affinities.put(state_key, affinities, affinities.nbytes)
        self._newest_snapped = (None if affinities is None else
                                (state_key, guide, tuple(array.shape[:2]), tuple(opts.pamr_dilations)))
        result = SegmentationResult(None, None, None, [c.name for c in parsed], list(parsed), method_name)
        result.keep_compact_labels(state.labels)  # the kept state's own array, read-only: int32 when first read
        size = tuple(array.shape[:2])

        def confidence():
            if snap and opts.pamr_iterations:
                dense = run_to_end(self._snap_and_label(scores, array, opts, parsed, method_name, False))
            else:
                dense = postprocess(scores, size, parsed, opts.logit_scale, 0.0, method_name, maps=False)
            return dense.confidence

        result.set_lazy_confidence(confidence)
        return result

    def prepare_rerun_steps(self) -> Generator[Progress, None, int]:
        """Generator: while nothing else runs, ready the newest image segmented with edge snapping for its next re-run
        (a stroke, a class typed): the snapping weights of the parts no run has needed yet (where the image's weights
        are kept whole), a band of rows per step, and memory for the copies of its labels a re-run makes. The
        re-run's labels are the same either way; it is quicker (a first stroke on 4096 x 4096 by about 0.4 s on
        2 cores). Stop it between steps at any time: what it computed stays. Yields Progress("weights", ...);
        returns the pixels whose weights it computed."""
        from .tiled_labels import weights_steps

        newest = self._newest_snapped
        if newest is None:
            return 0
        state_key, guide, size, dilations = newest
        state = self._label_states.get(state_key)
        if state is not None:
            self._spare_label_arrays.prepare(state)
        del state
        affinities = self._affinities.get(state_key)
        if affinities is None:
            return 0
        steps = weights_steps(affinities, guide, size, dilations)
        while True:
            try:
                done, total = next(steps)
            except StopIteration as stop:
                computed = stop.value
                break
            yield Progress("weights", done, total)
        if self._affinities.get(state_key) is affinities:   # its memory as it is now
            self._affinities.put(state_key, affinities, affinities.nbytes)
        return computed

    def _snap_and_label(self, scores, array, opts: SegmentOptions, parsed, method_name: str, maps: bool,
                        objects=None):
        """Generator: PAMR on the cosine scores at the output size, guided by the normalised input at that size,
        then the labels; in bands of rows, so that large images never hold the full-size scores."""
        guide = prepare(array, self.model.mean, self.model.std, opts.short_side, opts.contrast_limits).to(self.device)
        steps = snapped_postprocess_steps(scores, guide, tuple(array.shape[:2]), parsed, opts.logit_scale,
                                          opts.prob_threshold, method_name, maps, opts.pamr_iterations,
                                          opts.pamr_dilations, objects=objects)
        yield Progress("edges", 0, max(1, opts.pamr_iterations))
        try:
            while True:
                try:
                    done, total = next(steps)
                except StopIteration as stop:
                    return stop.value
                yield Progress("edges", done, total)
        except RuntimeError as exc:
            if "memory" not in str(exc).lower():
                raise
            raise OutOfMemoryError("Not enough memory for edge snapping (PAMR) at this image size: "
                                   "turn it off or use a smaller image.") from None

    # -- image side ---------------------------------------------------------------------------

    def _bind_text(self, method_fn, text: torch.Tensor, opts: SegmentOptions):
        """A method whose features depend on the classes (ResCLIP) gets their embeddings and its settings;
        returns it and what its features then depend on (for the cache keys), else (method, None)."""
        if not getattr(method_fn, "needs_text", False):
            return method_fn, None
        from .resclip import resclip_settings

        settings = resclip_settings(opts.preset)
        digest = hashlib.blake2b(text.float().cpu().numpy().tobytes(), digest_size=16).hexdigest()
        return method_fn.bound(text, settings), {"queries": digest, "settings": repr(settings)}

    def _feature_key(self, array: np.ndarray, opts: SegmentOptions, method: str, extra: dict | None = None) -> str:
        from . import __version__

        digest = hashlib.blake2b(digest_size=20)
        digest.update(pixel_key(array))
        identity = {"model": self.model.cache_id, "method": method, "package": __version__, "extra": extra,
                    "windows": [opts.short_side, opts.crop, opts.stride, opts.keep_aspect],
                    "contrast": contrast_identity(array, opts.contrast_limits),
                    "image": [list(array.shape), str(array.dtype)]}
        digest.update(repr(sorted(identity.items())).encode())
        key = digest.hexdigest()
        if len(self._identities) > 4096:
            self._identities.clear()
        self._identities[key] = identity
        return key

    def _features_at_hand(self, key: str) -> bool:
        """Whether this image's features are kept in memory or in the feature store (nothing is read)."""
        return self._features.get(key) is not None or (self.feature_store is not None
                                                       and self.feature_store.holds(key))

    def _cached_features(self, key: str) -> _Features | None:
        """This image's features from memory, else from the feature store on disk (then kept in memory)."""
        features = self._features.get(key)
        if features is not None or self.feature_store is None or key not in self._identities:
            return features
        stored = self.feature_store.load(key, self._identities[key])
        if stored is None:
            return None
        grid_args, batches, guide = stored
        grid = grid_from_dict(grid_args)
        features = _Features(grid, [(windows, f.to(self.device)) for windows, f in batches], guide=guide)
        self._features.put(key, features, sum(int(f.numel()) * f.element_size() for _, f in batches)
                           + (0 if guide is None else guide.numel() * guide.element_size()))
        return features

    def cache_features(self, image, options: SegmentOptions | Mapping | None = None, **keywords) -> bool:
        """Encode ``image`` (unless its features are stored already) and keep its features in the feature store.

        What ``clearclip-segment --features-only`` runs per image. Returns whether the store holds them.
        """
        method_name, method_fn = self._method_for(keywords)
        if getattr(method_fn, "needs_text", False):
            raise InvalidOptionError(f"{method_name}'s image features depend on the class names, so they cannot be "
                                     "computed ahead of them: store features with another method.")
        array = check_image(image, min_side=max(self.model.patch_size))
        opts = self.resolve_options(options, method=method_name, **keywords)
        key = self._feature_key(array, opts, method_name)
        if self.feature_store is not None:
            self.feature_store.wait(key)
            if self.feature_store.path(key).is_dir():
                return True
        if self._cached_features(key) is None:
            run_to_end(self._encode_and_score(array, key, opts, method_fn))
        features = self._features.get(key)
        if features is not None and self.feature_store is not None:
            self.feature_store.save(key, self._identities[key], features.grid.to_dict(), features.batches,
                                    features.guide)
        return self.feature_store is not None and self.feature_store.path(key).is_dir()

    def _encode_and_score(self, array, key, opts: SegmentOptions, method_fn, *,
                          text=None, exemplars: Exemplars | None = None, collect=None, remember: bool = True):
        """Generator: encode the windows batch by batch and add their scores up, yielding progress.

        Patch features are kept for later re-scoring only when they fit the cache budget,
        so a huge image streams through with one batch of features in memory. With
        ``text=None`` nothing is scored (a pass that only caches and ``collect``s).
        """
        pixels, grid, intensities = self._layout(array, opts, method_fn)
        own_layout = getattr(method_fn, "layout", None) is not None  # crops the method cuts: no guide among them
        if remember and opts.refine == "pamr" and opts.pamr_iterations and not own_layout:
            self._guides.put(key, pixels, pixels.numel() * 4)  # the very image edge snapping follows: prepared once
        windows = grid.windows
        rows, cols = grid.patch_grid
        width = self.model.clip.visual.output_dim
        estimate = len(windows) * rows * cols * width * 4
        keep = None
        if remember and estimate <= self._features.max_bytes:
            guide = None if own_layout else self._kept_guide(pixels, estimate, intensities)
            keep = _Features(grid, [], guide=guide)
        scores = None if text is None else grid.new_scores(text.shape[0], self.device)
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
            self._features.put(key, keep, estimate + (0 if keep.guide is None
                                                      else keep.guide.numel() * keep.guide.element_size()))
            if self.feature_store is not None and key in self._identities:  # written while the run goes on
                self.feature_store.save_later(key, self._identities[key], keep.grid.to_dict(), keep.batches,
                                              keep.guide)
        return None if scores is None else self._average(scores, grid)

    def _kept_guide(self, pixels: torch.Tensor, estimate: int, intensities: torch.Tensor | None = None
                    ) -> torch.Tensor | None:
        """What of the image goes with its features (and into the store): its whole intensities (uint8, a quarter of
        the bytes) when they give ``pixels`` exactly, as for any uint8 image (``intensities``, when the preparing
        knew them); else ``pixels`` when they are no larger than the features (``estimate`` bytes): a store at most
        doubles."""
        whole = intensities if intensities is not None else whole_rgb(pixels, self.model.mean, self.model.std)
        if whole is not None:
            return whole
        return pixels if pixels.numel() * 4 <= estimate else None

    def _score_cached(self, features: _Features, text: torch.Tensor, exemplars: Exemplars | None = None) -> torch.Tensor:
        grid = features.grid
        scores = grid.new_scores(text.shape[0], self.device)
        norms = features.norms if exemplars is not None and features.norms else [None] * len(features.batches)
        for (batch, patch_features), patch_norms in zip(features.batches, norms):
            self._accumulate(scores, grid, batch, patch_features, text, exemplars, patch_norms)
        return self._average(scores, grid)

    @torch.inference_mode()
    def _accumulate(self, scores, grid: WindowGrid, batch, patch_features, text, exemplars=None,
                    patch_norms=None) -> None:
        """Add the cosine similarities of a batch of windows, upsampled to the window size, into ``scores``."""
        logits = patch_features @ text.T
        if exemplars is not None:
            layout = getattr(grid, "patch_grid", None)
            if layout is not None and layout[0] * layout[1] != patch_features.shape[1]:
                layout = None
            logits = exemplars.teach(logits, patch_features, patch_norms, layout)
        grid.add_scores(scores, batch, logits)

    def _average(self, scores: torch.Tensor, grid) -> torch.Tensor:
        return grid.finish_scores(scores)

    def _layout(self, array: np.ndarray, opts: SegmentOptions, method_fn):
        """(pixels, grid, intensities): the normalised image at the working size and its windows, or what a method
        that lays out its own crops (CLIP-DIY) cuts them from; and the uint8 intensities the pixels normalise, for a
        uint8 image (else None)."""
        layout = getattr(method_fn, "layout", None)
        if layout is not None:
            return (*layout(array, opts, self.model.visual), None)
        pixels, intensities = prepare_with_intensities(array, self.model.mean, self.model.std, opts.short_side,
                                                       opts.contrast_limits)
        grid = WindowGrid(pixels.shape[1], pixels.shape[2], opts.crop, opts.stride, self.model.patch_size)
        return pixels, grid, intensities

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
                positions = self.model.positions(rows, cols)
                if getattr(method_fn, "encode_windows", None) is not None:
                    return method_fn.encode_windows(self.model.visual, crops, positions)
                return encode_dense(self.model.visual, crops, method_fn, positions)
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(crops) == 1:
                raise OutOfMemoryError(
                    f"The {self.device} device ran out of memory even with one window per batch. "
                    "Use a smaller window (crop), the precision 'fp16', or the device 'cpu'."
                ) from None
            self.window_batch_size = max(1, len(crops) // 2)
            half = len(crops) // 2
            return torch.cat([self._encode_crops(crops[:half], method_fn), self._encode_crops(crops[half:], method_fn)])


def _check_sizes(**sizes) -> None:
    """Cache sizes in bytes (whole numbers, 0 keeping nothing) and a batch size (at least 1), or None where that
    means the default, refused before the model loads when they are anything else."""
    for name, value in sizes.items():
        least = 1 if name == "window_batch_size" else 0
        if value is None and name in ("window_batch_size", "feature_store_bytes"):
            continue
        if not _whole(value) or value < least:
            kind = "a whole number of at least 1, or None to size it from the window" if least else \
                "a whole number of bytes, 0 or more (e.g. 2 << 30 for 2 GiB)"
            raise InvalidOptionError(f"{name}={value!r} must be {kind}.", name, value, f"must be {kind}")


def _feature_store(setting, max_bytes: int | None):
    """The feature store a Segmenter keeps image features in (None: memory only)."""
    from .feature_store import FOLDER_DEFAULT, FeatureStore

    if setting is None or setting is False:
        return None
    if isinstance(setting, FeatureStore):
        return setting
    return FeatureStore(None if setting is True else setting, FOLDER_DEFAULT if max_bytes is None else max_bytes)


def relabelled_pairs(steps, stage: str):
    """Generator: ``(done, total)`` pairs (or ``(done, total, preview)``) from ``steps`` as :class:`Progress` of
    ``stage``; returns what it returns."""
    while True:
        try:
            step = next(steps)
        except StopIteration as stop:
            return stop.value
        yield Progress(stage, step[0], step[1], preview=step[2] if len(step) > 2 else None)


def _checked_focus(focus) -> tuple | None:
    """``focus`` as (row, column) or (top, bottom, left, right) floats, or an error naming what it must be."""
    if focus is None:
        return None
    what = "(row, column) or (top, bottom, left, right) of the image, or None"
    try:
        values = tuple(float(v) for v in focus)
    except (TypeError, ValueError):
        raise InvalidOptionError(f"focus={focus!r} must be {what}.") from None
    if len(values) not in (2, 4) or not np.all(np.isfinite(values)):
        raise InvalidOptionError(f"focus={focus!r} must be finite numbers: {what}.")
    if len(values) == 4 and (values[1] < values[0] or values[3] < values[2]):
        raise InvalidOptionError(f"focus={focus!r}: a box's bottom and right must not be above its top and left.")
    return values


def _renamed_strokes(strokes, keywords: dict):
    """``scribbles=`` is the old name of ``strokes=``: still taken, with a DeprecationWarning."""
    if "scribbles" not in keywords:
        return strokes
    import warnings

    warnings.warn("scribbles= is now called strokes=", DeprecationWarning, stacklevel=4)
    old = keywords.pop("scribbles")
    return old if strokes is None else strokes


def _check_exemplars(exemplars) -> Exemplars | None:
    if exemplars is None or isinstance(exemplars, Exemplars):
        return exemplars
    raise InvalidOptionError(
        f"exemplars={exemplars!r} is not a set of exemplars: pass what Segmenter.collect_exemplars returns, or None.")
