"""A segmentation run for a napari Labels layer, done entirely off the GUI thread.

The widget hands over plain data (the image, the planes, the layer's current labels
and baseline); :func:`segment_layer` segments plane by plane, merges each plane into
the labels as it comes (keeping the user's edits), reduces what it does not need to
keep, and returns a :class:`LayerResult` that the GUI thread only has to set.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Generator, Sequence

import numpy as np

from .editing import LabelsMerger, LabelsUpdate, SparePlanes, layer_preview
from .hashing import digests_kept
from .options import SegmentOptions
from .errors import LessonError
from .planes import ImageLayout, segment_stack, stack_exemplars
from .progress import Progress, on_plane
from .reduced import BlockMeans
from .segmenter import Segmenter

PROBABILITY_OUTPUTS = ("none", "winning class", "all classes")


@dataclass
class LayerRequest:
    """What a run needs to know about the image and the Labels layer it writes to."""

    data: object
    layout: ImageLayout
    planes: Sequence[tuple]
    classes: list[str]
    options: SegmentOptions | dict
    image_name: str = "image"
    probability_output: str = "none"
    current: np.ndarray | None = None          # the target layer's data; None for a new layer
    baseline: np.ndarray | None = None
    baseline_names: list[str] = field(default_factory=list)
    found: dict = field(default_factory=dict)  # copies of the planes to segment, as the run started
    existing_maps: dict = field(default_factory=dict)  # name -> data of probability layers to update
    learn_from_edits: bool = False             # pixels painted since the last result become strokes
    edited: np.ndarray | None = None           # pixels painted in earlier rounds (kept, and still teaching)
    background: tuple[str, ...] = ()           # classes the user marked as background (drawn transparent)
    objects: object = None                     # instance ids of the labels' shape: each object gets a class
    lessons: list = field(default_factory=list)  # lessons to teach with (strokes on other images, loaded files)
    foreground: object = None                  # a map of the labels' shape, or "found" (CLIP-DIY's fusion)
    foreground_limits: tuple | None = None     # the contrast limits of a foreground image layer (None: labels)
    found_weights: tuple | None = None         # FOUND's (DINO, decoder) files; None: torch's cache
    view: tuple | None = None                  # (top, bottom, left, right) of a plane the user sees: shown first
    spares: SparePlanes | None = None          # arrays to copy planes into (see SparePlanes)


@dataclass
class LayerResult:
    """Merged labels, their colours and counts, and the probability volumes to show."""

    update: LabelsUpdate
    maps: dict[str, np.ndarray]
    planes: int
    notes: list[str] = field(default_factory=list)  # what the user should know about the run (names cut short)
    objects: dict | None = None  # with objects: id, class, confidence, area per object (all planes run)
    lesson: object = None        # what this run's strokes taught (a Lesson), to use on other images or save


def probability_layer_names(image_name: str, mode: str, class_names: list[str]) -> list[str]:
    if mode == "winning class":
        return [f"{image_name} probability"]
    if mode == "all classes":
        return [f"{image_name} P({name})" for name in class_names]
    return []


def painted_strokes(request: LayerRequest, class_names: list[str]) -> dict[tuple, np.ndarray]:
    """Per plane, the pixels the user painted since the last result, as strokes for the new class list.

    A painted value means the class it had in the last result; it is a hint for that class
    under its new number. The eraser (0) is no hint, and neither is a class no longer asked
    for (those pixels are kept all the same, by the merge).
    """
    if request.current is None or request.baseline is None:
        return {}
    lookup = np.zeros(max(len(request.baseline_names), 1) + 1, dtype=np.int64)
    for value, name in enumerate(request.baseline_names, start=1):
        lookup[value] = class_names.index(name) + 1 if name in class_names else 0
    strokes_by_plane = {}
    for plane in request.layout.planes():
        current = request.found.get(plane)
        if current is None:
            current = np.asarray(request.current[plane])
        shape = current.shape
        current = _rows_of(current)
        baseline = _rows_of(request.baseline[plane])
        earlier = None if request.edited is None else _rows_of(request.edited[plane])
        rows = _edited_rows(current, baseline, earlier)  # strokes cover a sliver of a plane
        if not len(rows):
            continue
        edited = current[rows] != baseline[rows]
        if earlier is not None:
            edited |= earlier[rows]
        values = np.where(edited, current[rows], 0).astype(np.int64)
        values[values >= len(lookup)] = 0  # labels the user invented are no class hint
        hints = lookup[values]
        if hints.any():  # the rows painted, not the whole plane: reading fresh zeros costs a page fault per page
            plane_strokes = np.zeros(shape, np.uint8 if len(lookup) <= 256 else np.int32)
            plane_strokes.reshape(-1, shape[-1])[rows] = hints
            strokes_by_plane[plane] = plane_strokes
    return strokes_by_plane


def _rows_of(array) -> np.ndarray:
    array = np.asarray(array)
    return array.reshape(-1, array.shape[-1])


def _edited_rows(current: np.ndarray, baseline: np.ndarray, earlier: np.ndarray | None) -> np.ndarray:
    """The rows (of 2-D ``current``) where it differs from ``baseline`` or ``earlier`` marks a pixel painted: in blocks
    of about 1 MiB, whose masks stay in the cache (a whole 4096 x 4096 one would be fresh memory on every run)."""
    step = max(1, (1 << 20) // max(1, current.shape[-1]))
    found = []
    for start in range(0, len(current), step):
        block = slice(start, start + step)
        edited = current[block] != baseline[block]
        if earlier is not None:
            edited |= earlier[block]
        found.append(start + np.flatnonzero(edited.any(axis=1)))
    return np.concatenate(found) if found else np.zeros(0, np.int64)


#: A view at most this many pixels a side is recomputed first, as one region; a larger one (zoomed out) shows
#: too little of each pixel for that to matter: the newest stroke's surroundings come first instead.
VIEW_FIRST_SIDE = 1536


def rerun_focus(request: LayerRequest) -> tuple | None:
    """Where a re-run recomputes its labels first: the view when zoomed in, else around the newest stroke, else
    the view's centre."""
    view = request.view
    if view is not None and max(view[1] - view[0], view[3] - view[2]) <= VIEW_FIRST_SIDE:
        return tuple(view)
    painted = newest_paint(request)
    if painted is not None:
        return painted
    return None if view is None else ((view[0] + view[1]) / 2, (view[2] + view[3]) / 2)


def newest_paint(request: LayerRequest) -> tuple[float, float] | None:
    """(row, column): the centre of what the user painted on a plane since the last result (first plane with
    any), where a re-run shows its labels first; None when nothing was."""
    if request.current is None or request.baseline is None:
        return None
    for plane in request.planes:
        plane = tuple(plane)
        current = request.found.get(plane)
        if current is None:
            continue
        new = np.asarray(current) != np.asarray(request.baseline[plane])
        if request.edited is not None:
            new &= ~request.edited[plane]
        rows, cols = np.flatnonzero(new.any(1)), np.flatnonzero(new.any(0))
        if len(rows):
            return (rows[0] + rows[-1] + 1) / 2, (cols[0] + cols[-1] + 1) / 2
    return None


def segment_layer(segmenter: Segmenter, request: LayerRequest) -> Generator[Progress, None, LayerResult]:
    """Segment every requested plane, merging each into the labels at once; nothing per plane is kept but the merge.

    With ``learn_from_edits``, what the user painted on any plane becomes exemplars for
    every plane segmented, and stays painted: the strokes teach through the exemplars and
    are kept by the merge, not pasted into the result, so the baseline stays the model's
    answer and they remain the user's edits later on.

    A re-run into an existing layer yields, in ``Progress.preview``, parts of its labels that are final before
    it ends (:class:`~napari_clearclip.editing.LabelsPreview`): what the user sees first (``request.view``, or
    the newest stroke's surroundings), then the rest, for the widget to write while the run goes on.
    """
    with digests_kept():  # the image is hashed where its strokes are collected and where it is labelled
        return (yield from _segment_layer(segmenter, request))


def _segment_layer(segmenter: Segmenter, request: LayerRequest) -> Generator[Progress, None, LayerResult]:
    from .prompts import parse_classes

    class_names = [c.name for c in parse_classes(request.classes)]
    if isinstance(request.data, BlockMeans):  # a reduced copy is read first: with progress, and a stop per band
        for number, plane in enumerate(request.planes):
            yield from on_plane(request.data.plane_steps(request.layout.image_index(plane)), number,
                                len(request.planes))
    strokes_by_plane = painted_strokes(request, class_names) if request.learn_from_edits else {}
    shape = request.layout.label_shape
    merger = LabelsMerger(shape, class_names, request.current, request.baseline, request.baseline_names,
                          request.found, request.edited, request.spares)
    mode = request.probability_output
    names = probability_layer_names(request.image_name, mode, class_names)
    maps = {name: _map_volume(request.existing_maps.get(name), shape) for name in names}
    tables: list[dict] = []
    notes = class_name_notes(segmenter, request) + absent_chunk_notes(request.data)
    taught = yield from stack_exemplars(segmenter, request.data, request.layout, strokes_by_plane, request.classes,
                                        len(request.planes), request.options)
    exemplars, lesson = _with_lessons(segmenter, request, taught, notes)
    checked_labels: dict = {}
    focus = rerun_focus(request)
    previewed: set = set()
    for item in segment_stack(segmenter, request.data, request.layout, request.planes, request.classes,
                              request.options, exemplars=exemplars, maps=(mode == "all classes"),
                              objects=request.objects, foreground=request.foreground,
                              found_weights=request.found_weights, foreground_limits=request.foreground_limits,
                              focus=focus if request.current is not None else None):
        if isinstance(item, Progress):
            if item.preview is not None:  # labels final before the run ends: what the layer can show meanwhile
                plane = tuple(request.planes[item.plane])
                preview = layer_preview(merger, plane, item.preview, first=plane not in previewed,
                                        spares=request.spares)
                if preview is not None:
                    previewed.add(plane)
                item = replace(item, preview=preview)
            yield item
            continue
        plane, result = item
        if lesson is not None and plane in strokes_by_plane:  # what this plane shows, strokes included, sampled
            step = segmenter.reference_step(strokes_by_plane[plane].shape, request.options)
            painted_here = strokes_by_plane[plane][::step, ::step]
            shown = np.asarray(result.stored_labels())[::step, ::step]
            checked_labels[plane] = (np.where(painted_here > 0, painted_here, shown).astype(np.int32), step,
                                     strokes_by_plane[plane].shape)
        merger.add(plane, result.stored_labels())
        if result.objects is not None:
            tables.append(result.objects)
        if mode == "winning class":
            maps[names[0]][plane] = result.confidence
        elif mode == "all classes":
            for name, values in zip(names, result.probabilities):
                maps[name][plane] = values
        del result, item  # only the merged labels and the asked-for maps outlive the plane
    if lesson is not None and set(checked_labels) == set(strokes_by_plane):
        # the painted planes' labels check this lesson's exemplars where it is joined with others: what the checks
        # are made from is kept, and they are made only then (Lesson.completed), not in every live re-run
        lesson = replace(lesson, sources=tuple(
            (request.data[request.layout.image_index(plane)], *checked_labels[plane], request.classes, request.options)
            for plane in strokes_by_plane))
    return LayerResult(merger.finish(request.background), maps, len(request.planes), notes,
                       _joined(tables) if request.objects is not None else None, lesson)


def _with_lessons(segmenter: Segmenter, request: LayerRequest, taught, notes: list[str]):
    """The exemplars for this run: this image's strokes, and every lesson that fits the run (a lesson that does
    not fit is left out, with a note saying why); and the lesson this image's strokes make."""
    from .lessons import Lesson
    from .strokes import Exemplars

    options = segmenter.resolve_options(request.options)
    lessons = lesson_exemplars(segmenter, request.classes, options, request.lessons, notes)
    lesson = None if taught is None else Lesson.from_exemplars(taught, request.classes, segmenter, options)
    return Exemplars.combine([taught, lessons]), lesson


def lesson_exemplars(segmenter: Segmenter, classes, options, lessons: list, notes: list[str]):
    """The exemplars of every lesson that fits a run of ``classes`` with (resolved) ``options``, joined where they
    can be; a lesson that does not fit is left out, with a note in ``notes`` saying why. None without any."""
    from .prompts import parse_classes
    from .strokes import Exemplars

    parsed = parse_classes(classes)
    usable = []
    for lesson in lessons:
        try:
            lesson.exemplars_for(segmenter, parsed, options, segmenter.method)
        except LessonError as exc:
            notes.append(f"A lesson was not used: {exc}")
        else:
            usable.append(lesson)
    usable = [lesson.completed(segmenter) for lesson in usable]   # checked against each other when joined
    return Exemplars.combine([lesson.exemplars_for(segmenter, parsed, options, segmenter.method)
                              for lesson in joined_lessons(usable)])


def joined_lessons(lessons: list) -> list:
    """The lessons as one where they can be joined (same classes in the same order), so that its class offsets are
    fitted on the strokes of all their images together; those that cannot stay apart."""
    from .lessons import joined

    if len(lessons) < 2:
        return lessons
    first, rest = lessons[0], []
    for other in lessons[1:]:
        try:
            first = joined(first, other)
        except LessonError:
            rest.append(other)
    return [first] + rest


def _joined(tables: list[dict]) -> dict:
    """One objects table from the planes' (an id on several planes has a row per plane)."""
    columns = ("id", "class", "confidence", "area")
    if not tables:
        return {column: np.zeros(0) for column in columns}
    return {column: np.concatenate([np.asarray(t[column]) for t in tables]) for column in columns}


def absent_chunk_notes(data) -> list[str]:
    """A note when the image (or the image a reduced copy is made from) is a zarr array whose store lacks chunks:
    zarr reads them as the fill value, as napari shows them, and a copy of a store may have lost them."""
    from .zarr_images import absent_chunk_count

    absent = absent_chunk_count(data.source if isinstance(data, BlockMeans) else data)
    if not absent or not absent[0]:
        return []
    return [f"{absent[0]} of the {absent[1]} chunks of the image are not in its zarr store: they were read as its "
            "fill value, as napari shows them. If they were lost, copy the store again."]


def class_name_notes(segmenter: Segmenter, request: LayerRequest) -> list[str]:
    """A note per class name the model's text context cuts short (the API warns; the widget says it)."""
    from .prompts import check_templates, parse_classes

    names = [s for c in parse_classes(request.classes) for s in c.synonyms]
    cut = segmenter.text.cut_names(names, check_templates(SegmentOptions.build(request.options).templates))
    if not cut:
        return []
    limit = segmenter.text.context_length()
    shown = ", ".join(repr(n if len(n) <= 40 else n[:40] + "...") for n in cut[:3])
    more = f" and {len(cut) - 3} more" if len(cut) > 3 else ""
    return [f"{shown}{more} {'is' if len(cut) == 1 else 'are'} longer than the model reads ({limit} tokens with the "
            "prompt): the words past that are ignored, so shorten the name."]


def _map_volume(existing, shape) -> np.ndarray:
    if existing is not None and tuple(existing.shape) == tuple(shape):
        return np.array(existing, dtype=np.float32, copy=True)
    return np.zeros(shape, dtype=np.float32)
