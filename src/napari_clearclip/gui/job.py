"""What the widget's thread worker runs: load (or reuse) the model, segment and merge, make the new layer.

Everything here runs off the GUI thread; the widget only inserts what comes back.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from napari.layers import Labels
from napari.utils.colormaps import DirectLabelColormap

from ..annotate import LayerRequest, probability_layer_names, segment_layer
from ..editing import SparePlanes
from ..labels_cache import labels_folder
from ..models import ModelSpec
from ..progress import Progress
from ..reduced import LARGE_PIXELS
from ..segmenter import Segmenter
from .layers import labels_features
from .worker_errors import errors_reported


@dataclass
class ModelHolder:
    """The model the widget keeps between runs; set by the worker as soon as it is loaded, so that a cancelled
    run does not make the next one load it again."""

    key: tuple | None = None
    segmenter: Segmenter | None = None

    def get(self, spec: ModelSpec) -> Segmenter | None:
        """The loaded segmenter for ``spec`` (whatever its method: that is set per run), or None."""
        if self.segmenter is not None and self.key == _model_key(spec):
            return self.segmenter
        return None

    def keep(self, spec: ModelSpec, segmenter: Segmenter) -> None:
        self.key, self.segmenter = _model_key(spec), segmenter


def _model_key(spec: ModelSpec) -> tuple:
    return spec.model, spec.pretrained, spec.device, spec.precision


def layer_request(data, layout, planes, classes, options, image_name: str, probability_output: str, target,
                  learn: bool, existing_layers: dict, background: tuple[str, ...] = (),
                  spares: SparePlanes | None = None) -> LayerRequest:
    """What a run needs: the image, the planes, and the result layer it updates (its labels as they are now,
    its baseline and edits), with copies of the planes to segment to spot strokes made during the run (into
    ``spares``, arrays an earlier run no longer uses, where there are some)."""
    request = LayerRequest(data=data, layout=layout, planes=planes, classes=[", ".join(c.synonyms) for c in classes],
                           options=options, image_name=image_name, probability_output=probability_output,
                           background=tuple(background), spares=spares)
    if target is not None:
        current = target.layer.data
        if target.baseline.dtype != current.dtype:   # the layer was given data of another type since its run
            target.baseline = target.baseline.astype(current.dtype)
            target.publish()
        request.current, request.baseline, request.baseline_names = current, target.baseline, target.names
        request.found = {plane: np.array(current[plane], copy=True) if spares is None else spares.copy_of(current[plane])
                         for plane in planes}
        request.learn_from_edits = learn
        request.edited = target.edited
    for name in probability_layer_names(image_name, probability_output, [c.name for c in classes]):
        if name in existing_layers:
            request.existing_maps[name] = existing_layers[name]
    return request


#: Native-resolution runs on 2-D images larger than this go tile by tile into a zarr store (the labels layer is
#: then backed by it), so that neither the image nor its scores are ever held whole.
TILED_PIXELS = LARGE_PIXELS


@dataclass
class TiledResult:
    """A tile-by-tile run's outcome: where its labels are stored, the classes, their pixel counts and colours."""

    path: Path
    names: list[str]
    counts: np.ndarray
    colours: dict
    absent_chunks: tuple[int, int] | None = None   # (not in the image's zarr store, in all): read as its fill value
    taught: bool = False                           # a lesson (loaded, or strokes on other images) taught the tiles
    notes: tuple[str, ...] = ()                    # why a lesson was left out
    objects: dict | None = None                    # with objects: id, class, confidence, area per object
    painted: int = 0                               # pixels painted on the earlier result that taught this run
    late: int = 0                                  # pixels painted (or erased) there while it went: for the next
    superseded: tuple = ()                         # results a closed napari left of the same pixels (no file)
    left_when_closed: bool = False                 # the earlier result that taught was left by a closed napari


def tiled_store_path(image_name: str) -> Path:
    """A new zarr store in the user cache for a tiled result: ``labels/<image>-<time>.zarr``."""
    import re
    import time

    folder = labels_folder()
    folder.mkdir(parents=True, exist_ok=True)
    # a layer named after a long file name: cut, so that the store's name (and its ".partial") fits the file system
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", image_name).strip("_")[:100].rstrip("_") or "image"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = folder / f"{safe}-{stamp}.zarr"
    number = 1
    while path.exists() or path.with_name(path.name + ".partial").exists():
        number += 1
        path = folder / f"{safe}-{stamp}-{number}.zarr"
    return path


def _loaded(holder: ModelHolder, spec: ModelSpec, feature_store: str | None = None):
    """Generator: the model for ``spec``, loaded once and kept (progress while loading), keeping image features in
    the ``feature_store`` folder (None: the default one)."""
    segmenter = holder.get(spec)
    if segmenter is None:
        yield Progress("loading", 0, 1, detail=f"Loading {spec.model} ({spec.pretrained or 'default weights'})...")
        segmenter = Segmenter(spec.model, spec.pretrained, method=spec.method, device=spec.device,
                              precision=spec.precision)
        holder.keep(spec, segmenter)
    segmenter.method = spec.method
    use_feature_store(segmenter, feature_store)
    return segmenter


def use_feature_store(segmenter: Segmenter, folder: str | None) -> None:
    """Keep ``segmenter``'s image features in ``folder`` (the Feature store field; None: the user cache, or the
    folder ``NAPARI_CLEARCLIP_FEATURE_STORE`` names), switching only when it names another folder."""
    from ..feature_store import FeatureStore, default_root

    root = Path(folder).expanduser() if folder else default_root()
    current = segmenter.feature_store
    if current is None or current.root != root:
        segmenter.feature_store = FeatureStore(root if folder else None)


@errors_reported
def tiled_job(holder: ModelHolder, spec: ModelSpec, image, classes, options, store: Path, new_layer: dict,
              background: tuple[str, ...] = (), lessons: tuple = (), objects=None, painted_on: tuple | None = None,
              feature_store: str | None = None, image_file: str | None = None, unfiled: tuple = (),
              image_array: str | None = None, image_sample: str | None = None):
    """Worker body for a large image: segment it tile by tile into ``store`` (yielding progress per tile), taught by
    the ``lessons`` that fit the run and by what the user painted on an earlier result of the image (``painted_on``:
    its store and class names, and True for a result no layer shows, done without if it cannot be read), each of
    the ``objects`` (instance ids of the image's size) given a class, and build the Labels layer backed by that
    store, so that the GUI thread only inserts it. The store records the image's file (``image_file``) and the
    classes: a later run on that file finds it, should no layer show it any more, and learns what was painted on
    it. An image of no file is known by its pixels: ``unfiled`` lists the results left by a closed napari that may
    be of it ((store, class names, their image's pixels), the newest first); those of the same pixels are
    superseded, and the newest teaches this run. ``image_array``: where in its store the image's array lies, and
    ``image_sample``: a digest of its pixels on a grid, recorded with the file (two images of one store, or two
    scenes a reader gives from one file, share its location)."""
    from ..annotate import lesson_exemplars
    from ..image_locations import remote_address
    from ..prompts import parse_classes
    from ..zarr_images import absent_chunk_count

    segmenter = yield from _loaded(holder, spec, feature_store)
    # the image is on screen, where chunks missing from its store show as the fill value: the run reads them so
    # too (a store may leave out chunks that hold only that value), and the status says how many there were
    absent = absent_chunk_count(image)
    notes: list[str] = []
    if image_file and remote_address(image_file) is not None:
        yield Progress("reading", 0, 1, detail="reading a few chunks of the remote store, to know it again later")
    identity = _identity_of(image_file)   # the file as this run reads it, for the record a later run checks
    if identity is not None:
        place = {"array": image_array, "image_sample": image_sample}
        identity = {**identity, **{key: value for key, value in place.items() if value is not None}}
    superseded: tuple = ()
    if not image_file:   # no file: its pixels find its results in a later napari
        from ..tiled_edits import pixels_identity

        yield Progress("reading", 0, 1, detail="recognising the image, to find its earlier results")
        identity = pixels_identity(image)
        same = [kept for kept in unfiled if identity is not None and kept[2] == identity["pixels"]]
        superseded = tuple(path for path, _, _ in same)
        if same:   # (given only when no earlier result of the image in the viewer teaches)
            painted_on = (same[0][0], list(same[0][1]), True)
    if painted_on is not None and len(painted_on) > 2 and painted_on[2] and image_file:
        from ..tiled_edits import image_changed_since

        if image_changed_since(painted_on[0], image_file):   # strokes on what the file showed before
            notes.append(f"An earlier result of this image left in the cache ({painted_on[0]}) was made before its "
                         "file was written again; what was painted on it did not teach this run.")
            painted_on = None
    exemplars = lesson_exemplars(segmenter, classes, segmenter.resolve_options(options), list(lessons), notes)
    parts = crop = None
    if painted_on is not None:  # the strokes since (and before) that result, in this run's classes
        from ..lazy_tiles import painted_parts, resolve_tiled_options
        from ..tiled_edits import EditedStrokes

        crop = resolve_tiled_options(segmenter, options, {}).crop
        yield Progress("reading", 0, 1, detail=f"reading what was painted on the earlier result ({painted_on[0].name})")
        try:
            edits = EditedStrokes(painted_on[0], painted_on[1], [c.name for c in parse_classes(classes)])
            parts = painted_parts(edits, edits.shape, len(parse_classes(classes)), crop)
        except Exception as exc:   # a result left in the cache is no layer's: one that cannot be read is done without
            if len(painted_on) < 3 or not painted_on[2]:
                raise
            notes.append(f"An earlier result of this image left in the cache ({painted_on[0]}) could not be read "
                         f"({exc}); this run did without what was painted on it.")
            painted_on, parts = None, None
    labels = yield from segmenter.segment_tiled_steps(image, classes, options, out=store, absent_chunks="fill",
                                                      exemplars=exemplars, objects=objects, strokes=parts)
    table = None
    if objects is not None:
        labels, table = labels
    try:  # the store is in place now: a run stopped or failed from here leaves none behind, as before it
        result, layer = yield from _tiled_outcome(labels, table, store, parts, painted_on, parse_classes(classes),
                                                  crop, background, new_layer, absent, exemplars is not None, notes,
                                                  image_file, identity)
        return replace(result, superseded=superseded, left_when_closed=bool(
            painted_on is not None and len(painted_on) > 2 and painted_on[2])), layer
    except BaseException:
        import shutil

        shutil.rmtree(store, ignore_errors=True)
        raise


def _identity_of(image_file: str | None) -> dict | None:
    """:func:`~napari_clearclip.tiled_edits.image_identity` of the image's file, or None (no file, or not readable)."""
    from ..tiled_edits import image_identity

    try:
        return image_identity(image_file) if image_file else None
    except OSError:
        return None


def _tiled_outcome(labels, table, store: Path, parts, painted_on, parsed, crop, background, new_layer, absent,
                   taught: bool, notes: list, image_file: str | None = None, identity: dict | None = None):
    """Generator: keep the store's baseline (and the strokes to carry: those that taught the run, and any painted on
    the earlier result meanwhile), count the classes, and build the Labels layer backed by the store."""
    from ..colours import colormap_dict
    from ..lazy_tiles import label_counts, painted_parts
    from ..tiled_edits import EditedStrokes, changed_pixels, keep_baseline, keep_result_record, painted_count

    yield Progress("reading", 1, 1, detail="keeping the labels as written, to tell corrections from them")
    carried, late = parts, 0
    if painted_on is not None and not (len(painted_on) > 2 and painted_on[2]):
        # strokes painted on that result while this run went are kept for the next run (none on one no layer shows)
        edits = EditedStrokes(painted_on[0], painted_on[1], [c.name for c in parsed])
        carried = painted_parts(edits, edits.shape, len(parsed), crop)
        late = changed_pixels(parts, carried)
    keep_baseline(store, carried)  # what the run wrote, to tell what is painted on it next (3 s at 20000 x 20000)
    names = [c.name for c in parsed]
    keep_result_record(store, image_file, names, identity)
    counts = label_counts(labels, len(names))
    colours = colormap_dict(names, tuple(background))
    prepare_first_draw(np.zeros((2, 2), labels.dtype), colours)
    layer = Labels(labels, features=labels_features(names), colormap=DirectLabelColormap(color_dict=colours),
                   visible=False, **new_layer)
    return TiledResult(store, names, counts, colours, absent if absent and absent[0] else None, taught, tuple(notes),
                       table, painted_count(parts), late), layer


@errors_reported
def segmentation_job(holder: ModelHolder, spec: ModelSpec, request: LayerRequest, new_layer: dict | None = None,
                     feature_store: str | None = None):
    """Worker body: load (or reuse) the model, segment and merge plane by plane (yielding progress), and build
    the new Labels layer, if one is to be added, so that the GUI thread only inserts it."""
    segmenter = yield from _loaded(holder, spec, feature_store)
    result = yield from segment_layer(segmenter, request)
    update = result.update
    prepare_first_draw(update.full if update.full is not None else update.baseline, update.colours)
    layer = None
    if new_layer is not None and update.full is not None:
        layer = Labels(update.full, features=labels_features(update.names),
                       colormap=DirectLabelColormap(color_dict=update.colours), visible=False, **new_layer)
    return result, layer


@errors_reported
def ready_job(segmenter: Segmenter, spares: SparePlanes, plane: tuple | None):
    """Worker body while nothing runs: ready the next re-run (see ``Segmenter.prepare_rerun_steps``), and the
    copies of the result layer's plane (``plane``: its shape and type) that re-run makes: the plane as it finds it,
    as its previews leave it, and merged with the user's strokes."""
    if plane is not None:
        spares.prepare(plane[0], plane[1], 3)
    yield Progress("weights", 0, 1)   # a stop between every step
    return (yield from segmenter.prepare_rerun_steps())


def prepare_first_draw(labels: np.ndarray, colours: dict) -> None:
    """Do here, in the worker, what napari does lazily the first time a Labels layer is drawn: import pandas
    and scikit-image's colour module (about 0.8 s), and map labels of this type through a direct colormap
    (numba compiles that mapping once per type when it is installed: seconds on the GUI thread otherwise)."""
    import pandas  # noqa: F401
    import skimage.color  # noqa: F401

    sample = np.zeros((2, 2), dtype=labels.dtype)
    sample[0, 0] = 1
    colormap = DirectLabelColormap(color_dict=colours)
    colormap.map(sample)
    try:  # the texture mapping napari runs on the first draw (no public name; skipped where it moved)
        colormap._data_to_texture(sample)
    except Exception:
        pass
