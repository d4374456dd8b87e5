"""The Labels layers the widget wrote: what the model said (baselines), what the user painted, undo and redo.

A result layer is remembered with its *baseline* (what the runs wrote) and the mask of
pixels the user painted; a pixel that differs from the baseline, or was painted, is the
user's and is kept (and taught from) on every later run. The GUI thread only inserts a
layer made in the worker, or writes a run's planes into an existing one in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from napari.layers import Image, Labels
from napari.utils.colormaps import DirectLabelColormap
from qtpy.QtCore import QTimer

from ..colours import colormap_dict
from ..editing import apply_update
from ..planes import ImageLayout
from .reader import has_sibling_images, image_array_of, image_file_of, image_sample_of, record_of_image

#: Where a result layer keeps what saving it needs beyond its pixels (in its metadata, see :mod:`.writer`): its
#: image's file, what the runs wrote (``baseline``) and the pixels the user painted (``edited``).
RESULT_KEY = "napari-clearclip result"
#: Where a result of an image segmented at a reduced size keeps what Save at full size... needs (in its metadata).
FULL_SIZE_KEY = "napari-clearclip full size"
#: Where a result segmented tile by tile keeps its image, store and classes (in its metadata): what was painted on
#: it teaches the next run on that image.
TILED_KEY = "napari-clearclip tiled"


@dataclass
class ResultLayer:
    """What the widget remembers of a Labels layer it wrote, to recognise the user's edits."""

    layer: Labels
    baseline: np.ndarray
    names: list[str] = field(default_factory=list)
    colours: dict = field(default_factory=dict)
    edited: np.ndarray | None = None  # every pixel the user has painted (kept on every run)
    image: str | None = None          # the key of the image layer it is the result of
    source: str | None = None         # that image's file, if it has one
    array: str | None = None          # where in that file (a zarr store) the image's array lies, if known
    sample: str | None = None         # a digest of the image's pixels on a grid (tiled_edits.pixels_sample), if held

    def __post_init__(self) -> None:
        self.publish()

    def publish(self) -> None:
        """Keep in the layer's metadata what saving it from napari's File menu needs (see :mod:`.writer`): the
        arrays are replaced, never changed in place, so the metadata holds them as they are now."""
        self.layer.metadata[RESULT_KEY] = {"source": self.source, "array": self.array, "image_sample": self.sample,
                                           "baseline": self.baseline, "edited": self.edited}

    def forget_edits(self, pixels: np.ndarray, data: np.ndarray) -> None:
        """These pixels hold the model's answer (an undone stroke): no longer edits to keep or learn from."""
        self.baseline = self.baseline.copy()  # a run in flight may be reading the old arrays
        self.baseline[pixels] = data[pixels]
        if self.edited is not None:
            self.edited = self.edited & ~pixels
        self.publish()

    def claim_edits(self, pixels: np.ndarray) -> None:
        """These pixels hold what the user painted (a redone stroke): edits to keep and learn from."""
        edited = np.zeros(self.baseline.shape, dtype=bool) if self.edited is None else self.edited.copy()
        edited |= pixels  # a copy: a run in flight may be reading the old mask
        self.edited = edited
        self.publish()


def layer_key(layer) -> str:
    return str(getattr(layer, "unique_id", None) or id(layer))


#: Where a probability layer the widget wrote keeps its image's key and the name it was given (in its metadata):
#: only such layers are updated by later runs, never a layer of the user's that happens to have the name.
PROBABILITY_KEY = "napari-clearclip probability"


def probability_layers(viewer, image) -> dict:
    """The probability layers the widget wrote for ``image``, by the name each was given (napari adds a number to
    a name another layer holds)."""
    key = layer_key(image)
    found = {}
    for item in viewer.layers:
        mark = item.metadata.get(PROBABILITY_KEY)
        if isinstance(mark, dict) and mark.get("image") == key:
            found[mark.get("name")] = item
    return found


def result_of_image(recorded: dict, image, live: set) -> bool:
    """Whether a result whose metadata records its image (``"image_key"``, ``"image"``: the layer's name) is the
    result of ``image``: by the layer while the recorded one is in the viewer (``live``: the viewer's layer keys),
    else by name (the image opened again)."""
    key = recorded.get("image_key")
    if key is not None and key in live:
        return key == layer_key(image)
    return recorded.get("image") == image.name


def labels_features(names: list[str]) -> dict:
    return {"index": np.arange(len(names) + 1), "class": ["unassigned"] + list(names)}


def placed(context: dict) -> dict:
    """The scale and translation of a run's result layers: as the run worked them out (a reduced image's at its
    level's scale), else the image's own."""
    return context.get("geometry") or layer_geometry(context["layer"], context["layout"])


def layer_geometry(layer: Image, layout: ImageLayout) -> dict:
    """Where the image sits in the world, without its channel axis, for the labels to sit on it: scale,
    translation, rotation, shear, affine, units and axis names (labels in other units than the image's would
    leave napari's scale bar without units)."""
    axes = [axis for axis in range(layer.ndim) if axis != layout.channel_axis]
    square, padded = np.ix_(axes, axes), np.ix_([*axes, layer.ndim], [*axes, layer.ndim])
    placement = {"scale": [float(layer.scale[axis]) for axis in axes],
                 "translate": [float(layer.translate[axis]) for axis in axes],
                 "rotate": np.asarray(layer.rotate, float)[square],
                 "shear": shear_matrix(layer.shear, layer.ndim)[square],
                 "affine": np.asarray(layer.affine.affine_matrix, float)[padded]}
    for name in ("units", "axis_labels"):   # napari 0.6 on
        values = getattr(layer, name, None)
        if values is not None:
            placement[name] = [values[axis] for axis in axes]
    return placement


def shear_matrix(shear, ndim: int) -> np.ndarray:
    """A layer's shear as a matrix: napari gives the values above the diagonal, row by row, or the matrix."""
    shear = np.asarray(shear, float)
    if shear.ndim == 2:
        return shear
    matrix = np.eye(ndim)
    matrix[np.triu_indices(ndim, 1)] = shear
    return matrix


class ResultLayers:
    """The result layers of one viewer, their baselines and edits, and undo and redo on them.

    ``on_painted`` is called after a stroke, an undo or a redo (live mode re-runs);
    ``busy()`` says whether a run is computing, whose result must then learn of undos and redos.
    """

    def __init__(self, viewer, on_painted: Callable[[], None], busy: Callable[[], bool]):
        self._viewer = viewer
        self._on_painted = on_painted
        self._busy = busy
        self._results: dict[str, ResultLayer] = {}  # by layer unique id (plugins see layers through proxies)
        self._undone: dict[str, np.ndarray] = {}    # pixels undone while a run was computing, by layer
        self._redone: dict[str, np.ndarray] = {}    # pixels redone while a run was computing, by layer

    def __len__(self) -> int:
        return len(self._results)

    def of(self, layer) -> ResultLayer | None:
        """What is remembered of ``layer`` (None for a layer the widget did not write)."""
        return self._results.get(layer_key(layer))

    def target(self, layer: Image, layout: ImageLayout) -> ResultLayer | None:
        """The result layer of this image that a run updates in place: of its shape, and of this image layer
        (the one named after it, else the newest: a result renamed by the user is still its result), or, where
        this image layer has none, the one named after it whose own image is no longer in the viewer (the image
        opened again)."""
        name = f"{layer.name} classes"
        live = {layer_key(item) for item in self._viewer.layers}
        fitting = [result for key, result in self._results.items()
                   if key in live and result.layer.data.shape == layout.label_shape]
        image = layer_key(layer)
        own = [result for result in fitting if result.image == image]
        if own:
            return next((result for result in own if result.layer.name == name), own[-1])
        reopened = next((result for result in fitting if result.layer.name == name and result.image not in live), None)
        return reopened if reopened is not None else self._opened_labels_of(layer, layout)

    def _opened_labels_of(self, layer: Image, layout: ImageLayout) -> ResultLayer | None:
        """Labels the command line wrote for this image's file, opened in napari (see :mod:`.reader`): a run updates
        them in place, keeping what the user painted since they were read and learning from it, as on the widget's
        own results. The file is the image layer's own (or a copy: the same name and size, as when a folder
        segmented on a cluster is copied to a laptop)."""
        from ..tiled_edits import same_image_file
        from .reader import OPENED_KEY, painted_before

        source = image_file_of(layer)
        if not source:
            return None
        siblings = has_sibling_images(self._viewer, layer)   # (the scenes of one file)
        for item in reversed(list(self._viewer.layers)):
            mark = item.metadata.get(OPENED_KEY) if isinstance(item, Labels) else None
            if not isinstance(mark, dict) or layer_key(item) in self._results:
                continue
            baseline = mark.get("baseline")
            if (not isinstance(item.data, np.ndarray) or item.data.shape != layout.label_shape
                    or not isinstance(baseline, np.ndarray) or baseline.shape != item.data.shape
                    or not same_image_file(mark.get("record") or {}, source)
                    or not record_of_image(mark.get("record") or {}, layer, siblings=siblings)):
                continue
            names = list(mark.get("names", []))
            # pixels painted before the labels were saved (Save labels... keeps them) stay the user's
            edited = painted_before(mark, baseline.shape)
            result = ResultLayer(item, baseline, names, colormap_dict(names), edited=edited, image=layer_key(layer),
                                 source=str(source), array=image_array_of(layer), sample=image_sample_of(layer))
            item.events.paint.connect(self._painted)
            _watch(item, self._replayed)
            self._results[layer_key(item)] = result
            return result
        return None

    def newest_of(self, image: Image) -> ResultLayer | None:
        """The newest result of this image layer still in the viewer whose labels are in memory, or None."""
        live = {layer_key(item) for item in self._viewer.layers}
        key = layer_key(image)
        own = [result for k, result in self._results.items() if k in live and result.image == key
               and isinstance(result.layer.data, np.ndarray)]
        return own[-1] if own else None

    def forget_removed(self) -> None:
        """A deleted result layer is forgotten, with its baseline."""
        live = {layer_key(layer) for layer in self._viewer.layers}
        for key in [k for k in self._results if k not in live]:
            _unwatch(self._results[key].layer, self._painted)
            del self._results[key]

    def run_finished(self) -> None:
        """Undos and redos during the run were applied to its result, or the run left the layer as it was."""
        self._undone.clear()
        self._redone.clear()

    def close(self) -> None:
        for result in self._results.values():
            _unwatch(result.layer, self._painted)
        self._results.clear()
        self.run_finished()

    # -- strokes, undo and redo ---------------------------------------------------------------
    def _painted(self, event=None) -> None:
        self._on_painted()

    def _replayed(self, layer, before: np.ndarray, action: str) -> None:
        """After an undo the pixels it restored are the model's again; after a redo they are the user's again."""
        result = self.of(layer)
        if result is None:
            return
        data = np.asarray(layer.data)
        if data.shape != before.shape or data.shape != result.baseline.shape:
            return
        changed = data != before
        if not changed.any():
            return
        if action == "redo":
            result.claim_edits(changed)
        else:
            result.forget_edits(changed, data)
        if self._busy():  # the run in flight started from the pixels as they were: redo this on its result
            key = layer_key(layer)
            mine, other = (self._redone, self._undone) if action == "redo" else (self._undone, self._redone)
            mine[key] = changed | mine[key] if key in mine else changed
            if key in other:
                other[key] = other[key] & ~changed
        self._on_painted()

    # -- writing a run's result (GUI thread) ----------------------------------------------------
    def write(self, context: dict, update, prepared_layer=None) -> tuple[Labels, int]:
        """Set the merged labels: in place into the layer the run updated, else as a new layer.

        A new layer comes ready-made from the worker (``prepared_layer``): the GUI thread only adds it,
        hidden, and shows it on the next turn of the event loop (two short steps, not one long one).
        """
        layer, layout, target = context["layer"], context["layout"], context["target"]
        features = labels_features(update.names)
        alive = target is not None and layer_key(target.layer) in {layer_key(item) for item in self._viewer.layers}
        kept = update.kept_pixels
        previews = context.get("previews")
        expected = None if previews is None else previews.expected   # the planes as the run's previews left them
        if previews is not None:
            previews.stop(shown=True)   # the layer is shown whole below
        if alive:
            labels_layer = target.layer
            data = labels_layer.data
            if isinstance(data, np.ndarray) and data.flags.writeable and data.shape == layout.label_shape:
                kept += apply_update(data, update, expected)
                labels_layer.refresh()
            else:
                fresh = np.array(data, copy=True)
                kept += apply_update(fresh, update, expected)
                labels_layer.data = fresh
            labels_layer.features = features
            if target.colours != update.colours:  # setting a colormap is costly: only when a class changed
                labels_layer.colormap = DirectLabelColormap(color_dict=update.colours)
        elif prepared_layer is not None:
            labels_layer = self._viewer.add_layer(prepared_layer)
            QTimer.singleShot(0, lambda: _show(labels_layer))
        else:  # the layer this run was updating was deleted meanwhile
            data = update.full if update.full is not None else update.baseline.copy()
            labels_layer = self._viewer.add_labels(
                data, name=f"{layer.name} classes", features=features,
                colormap=DirectLabelColormap(color_dict=update.colours), **placed(context))
        key = layer_key(labels_layer)
        if key not in self._results:
            labels_layer.events.paint.connect(self._painted)
            _watch(labels_layer, self._replayed)
        source = image_file_of(layer)
        result = ResultLayer(labels_layer, update.baseline, update.names, update.colours, update.edited,
                             image=layer_key(layer), source=str(source) if source else None,
                             array=image_array_of(layer) if source else None,
                             sample=image_sample_of(layer) if source else None)
        self._results.pop(key, None)   # the newest result last
        self._results[key] = result
        undone = self._undone.pop(key, None)
        if undone is not None and undone.shape == update.baseline.shape:
            result.forget_edits(undone, np.asarray(labels_layer.data))
        redone = self._redone.pop(key, None)
        if redone is not None and redone.shape == update.baseline.shape:
            result.claim_edits(redone)
        return labels_layer, kept

    def write_maps(self, context: dict, maps: dict) -> None:
        """Probability volumes: into this image's probability layers of the same name and shape, else as new
        (hidden) layers; a layer of the user's with such a name is left as it is."""
        ours = probability_layers(self._viewer, context["layer"])
        for name, volume in maps.items():
            existing = ours.get(name)
            if existing is not None and getattr(existing, "data", None) is not None and existing.data.shape == volume.shape:
                existing.data = volume
            else:
                self._viewer.add_image(volume, name=name, colormap="viridis", contrast_limits=(0, 1),
                                       blending="additive", visible=False,
                                       metadata={PROBABILITY_KEY: {"image": layer_key(context["layer"]), "name": name}},
                                       **placed(context))


def _show(layer) -> None:
    try:
        layer.visible = True
    except RuntimeError:  # the viewer closed meanwhile
        pass


def _watch(layer, callback) -> None:
    """Call ``callback(layer, data before, "undo" or "redo")`` after each undo or redo of ``layer``
    (napari emits no event for them)."""
    for name in ("undo", "redo"):
        replay = getattr(layer, name, None)
        if replay is None:
            continue

        def watched(replay=replay, name=name):
            before = np.array(layer.data, copy=True) if isinstance(layer.data, np.ndarray) else None
            replay()
            if before is not None:
                callback(layer, before, name)

        setattr(layer, name, watched)  # the instance attribute is what napari's undo key calls


def _unwatch(layer, callback) -> None:
    try:
        layer.events.paint.disconnect(callback)
    except (TypeError, ValueError, RuntimeError, AttributeError):
        pass
    for name in ("undo", "redo"):  # napari's own methods again
        vars(layer).pop(name, None)
