"""Running the engine over the 2-D planes of n-D, time-lapse, multichannel or lazy (dask/zarr) images."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Generator, Mapping, Sequence

import numpy as np

from .errors import InvalidImageError, InvalidOptionError
from .prompts import parse_classes
from .strokes import Exemplars, check_strokes
from .options import SegmentOptions
from .progress import Progress, on_plane
from .results import SegmentationResult
from .segmenter import Segmenter


@dataclass(frozen=True)
class ImageLayout:
    """How an array maps onto planes: RGB last axis, an optional channel axis, YX last."""

    shape: tuple[int, ...]
    rgb: bool = False
    channel_axis: int | None = None
    channel: int = 0

    def __post_init__(self):
        spatial = len(self.shape) - (1 if self.rgb else 0)
        if spatial < 2:
            raise InvalidImageError(f"An image of shape {self.shape} has no 2-D plane to segment.")
        if self.channel_axis is not None:
            axis = self.channel_axis
            if self.rgb or not 0 <= axis < spatial - 2:
                raise InvalidImageError(
                    f"Channel axis {axis} is not valid for shape {self.shape}: pick one of the leading axes before Y and X."
                )
            if not 0 <= self.channel < self.shape[axis]:
                raise InvalidImageError(f"Channel {self.channel} does not exist: axis {axis} has {self.shape[axis]} channels.")

    @property
    def label_shape(self) -> tuple[int, ...]:
        """Shape of the labels: the image's, without RGB or channel axes."""
        shape = list(self.shape[:-1] if self.rgb else self.shape)
        if self.channel_axis is not None:
            del shape[self.channel_axis]
        return tuple(shape)

    @property
    def plane_shape(self) -> tuple[int, ...]:
        return self.label_shape[:-2]

    def planes(self) -> list[tuple[int, ...]]:
        """Every leading index of the labels (one per 2-D plane)."""
        return list(itertools.product(*(range(n) for n in self.plane_shape)))

    def image_index(self, plane: tuple[int, ...]) -> tuple:
        """Index into the image data for one plane of the labels."""
        index = list(plane)
        if self.channel_axis is not None:
            index.insert(self.channel_axis, self.channel)
        return tuple(index)

    def plane_of_point(self, point: Sequence[float]) -> tuple[int, ...]:
        """The plane holding a data-space point of the image (e.g. napari's current slice)."""
        leading = [int(round(p)) for p in point[: len(self.shape) - 2 - (1 if self.rgb else 0)]]
        if self.channel_axis is not None:
            del leading[self.channel_axis]
        return tuple(min(max(i, 0), n - 1) for i, n in zip(leading, self.plane_shape))


def stack_exemplars(segmenter: Segmenter, data, layout: ImageLayout, strokes_by_plane: dict, classes, planes: int = 1,
                    options: SegmentOptions | None = None) -> Generator[Progress, None, Exemplars | None]:
    """Generator: the exemplars that the strokes on every plane make together (``strokes_by_plane``: plane -> (H, W) strokes)."""
    found = []
    for plane, plane_strokes in strokes_by_plane.items():
        image = np.asarray(data[layout.image_index(plane)])
        steps = segmenter.collect_exemplars_steps(image, plane_strokes, classes, options)
        found.append((yield from on_plane(steps, 0, planes)))
    return Exemplars.combine(found)


def segment_stack(segmenter: Segmenter, data, layout: ImageLayout, planes: Sequence[tuple[int, ...]], classes,
                  options: SegmentOptions | None = None, *, strokes_by_plane: dict | None = None,
                  exemplars: Exemplars | None = None,
                  maps: bool = True, objects=None, foreground=None, found_weights=None,
                  foreground_limits=None, focus=None) -> Generator[Progress | tuple, None, None]:
    """The one stack pipeline: exemplars from the strokes on every plane, then each plane in turn.

    Yields :class:`Progress`, and ``(plane, result)`` as each plane is done (read lazily, so
    dask or zarr data load one plane at a time); what a caller does with a plane's result
    (paste the strokes, merge into a layer) is its own business. ``objects`` (instance ids of
    the labels' shape) give each object of each plane its class. ``foreground`` (of the labels' shape, shown
    with ``foreground_limits`` if an image; or ``"found"``) fuses a foreground map into each plane. ``focus``
    (row, column of a plane) has re-runs show what is around it first (see ``Segmenter.segment_steps``).
    """
    shared = yield from stack_exemplars(segmenter, data, layout, strokes_by_plane or {}, classes, len(planes), options)
    exemplars = Exemplars.combine([exemplars, shared])
    for number, plane in enumerate(planes):
        image = np.asarray(data[layout.image_index(plane)])
        plane_objects = None if objects is None else np.asarray(objects[plane])
        plane_foreground = foreground
        if foreground is not None and not isinstance(foreground, str):
            from .clipdiy import scaled_foreground

            plane_foreground = scaled_foreground(foreground[plane], foreground_limits)
        steps = segmenter.segment_steps(image, classes, options, maps=maps, exemplars=exemplars, objects=plane_objects,
                                        foreground=plane_foreground, found_weights=found_weights, focus=focus)
        result = yield from on_plane(steps, number, len(planes))
        yield plane, result
        del result  # the caller keeps what it needs of a plane; this generator keeps nothing


def check_stack_strokes(strokes, layout: ImageLayout, n_classes: int) -> dict[tuple, np.ndarray]:
    """Per plane with strokes, its (H, W) strokes; ``strokes`` has the labels' shape (0 = no hint, k = class k)."""
    if strokes is None:
        return {}
    array = np.asarray(strokes)
    if array.shape != layout.label_shape:
        raise InvalidOptionError(
            f"strokes of shape {array.shape} do not match the labels' shape {layout.label_shape} "
            "(the image's, without RGB or channel axes).")
    strokes_by_plane = {}
    for plane in layout.planes():
        plane_strokes = check_strokes(array[plane], layout.label_shape[-2:], n_classes)
        if plane_strokes is not None:
            strokes_by_plane[plane] = plane_strokes
    return strokes_by_plane


def check_planes(planes, layout: ImageLayout) -> list[tuple[int, ...]]:
    """The planes as tuples of indices into the labels' leading axes, or an error naming the valid range."""
    import numbers

    shape = layout.plane_shape
    valid = (f"this stack's planes are indexed by {len(shape)} number(s) within {shape}, e.g. {(0,) * len(shape)}"
             if shape else "a 2-D image has one plane, ()")
    try:
        items = list(planes)
    except TypeError:
        raise InvalidOptionError(f"planes={planes!r} must be a list of plane indices: {valid}.") from None
    checked = []
    for plane in items:
        index = (plane,) if isinstance(plane, numbers.Integral) else plane
        try:
            index = tuple(index)
        except TypeError:
            raise InvalidOptionError(f"Plane {plane!r} is not an index: {valid}.") from None
        if len(index) != len(shape) or not all(
                isinstance(i, numbers.Integral) and not isinstance(i, bool) and 0 <= int(i) < n
                for i, n in zip(index, shape)):
            raise InvalidOptionError(f"Plane {plane!r} does not exist: {valid}.")
        checked.append(tuple(int(i) for i in index))
    return checked


def segment_planes(
    segmenter: Segmenter,
    data,
    layout: ImageLayout,
    planes: Sequence[tuple[int, ...]],
    classes,
    options: SegmentOptions | Mapping | None = None,
    *,
    strokes=None,
    exemplars: Exemplars | None = None,
    maps: bool = True,
    **keywords,
) -> Generator[Progress, None, list[tuple[tuple[int, ...], SegmentationResult]]]:
    """Segment each plane in turn (read lazily, so dask or zarr data load one plane at a time).

    ``strokes`` (an integer array of the labels' shape, 0 = no hint, k = class k):
    strokes on any plane, segmented or not, become exemplars for every plane segmented,
    and painted pixels keep their class.
    """
    from .segmenter import _renamed_strokes

    strokes = _renamed_strokes(strokes, keywords)
    planes = check_planes(planes, layout)
    options = segmenter.resolve_options(options, **keywords)
    strokes_by_plane = check_stack_strokes(strokes, layout, len(parse_classes(classes)))
    results = []
    for item in segment_stack(segmenter, data, layout, planes, classes, options, strokes_by_plane=strokes_by_plane,
                              exemplars=exemplars,
                              maps=maps):
        if isinstance(item, Progress):
            yield item
            continue
        plane, result = item
        painted = strokes_by_plane.get(plane)
        if painted is not None:
            result.labels[painted > 0] = painted[painted > 0]
        results.append((plane, result))
    return results
