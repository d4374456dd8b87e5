"""The napari dock widget: collects parameters, runs the engine in a thread worker, shows the result.

All computation lives in the engine (``Segmenter``, ``segment_layer``, the labels merger);
the widget's parts are the field table (:mod:`.fields`), the result layers with their edits
(:mod:`.layers`), live mode (:mod:`.live`) and the worker body (:mod:`.job`). The GUI thread
sets layers and text, nothing more.
"""

from __future__ import annotations

import logging
import os
import weakref
from pathlib import Path

import napari
import numpy as np
from magicgui.widgets import CheckBox, Container, Label, PushButton
from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QTimer

from . import discarding
from .collections import settle
from ..choices import DEMO_MODEL
from ..editing import SparePlanes
from ..labels_cache import discarded_results, labels_folder, remove_in_background, remove_stores, stale_stores
from ..errors import ClearClipError, FeatureStoreNotFoundError, InvalidClassesError
from .. import compiled_snapping
from ..models import ModelSpec, device_there
from ..options import SegmentOptions
from ..planes import ImageLayout
from ..progress import Progress
from ..prompts import parse_classes
from ..reduced import BlockMeans, Reduction, limits_for_side, reduced_for_resize
from .field_logic import FieldLogic
from .fields import (build_fields, choose_file_button, choose_folder_button, full_size_button, lesson_buttons,
                     save_labels_button, saved_values)
from .job import TILED_PIXELS, ModelHolder, layer_request, ready_job, segmentation_job, tiled_job, tiled_store_path
from .layers import (FULL_SIZE_KEY, TILED_KEY, ResultLayers, layer_geometry, layer_key, probability_layers,
                     result_of_image)
from .layout import captioned, lines_high, run_progress_bar, scrolling, wrapping
from .lessons import SessionLessons, classes_text, fitted_and_saved
from .live import LiveMode, Readying
from .previews import RunPreviews
from .reader import (OPENED_KEY, has_sibling_images, image_array_of, image_file_of, image_sample_of, record_of_image,
                     unplaced_labels_note)
from .messages import NO_CLASSES, NO_IMAGE, done_text, error_text, image_changed_text, legend_html, reduced_note
from .settings import load_settings, save_settings
from .worker_errors import errors_reported

log = logging.getLogger(__name__)

#: How often the dock shows a run's progress, at most (ms): each update repaints napari's window (20-50 ms of the GUI
#: thread with software OpenGL, holding Python's interpreter lock), time a live re-run does not get.
PROGRESS_INTERVAL_MS = 1000

#: How long after the dock opens edge snapping's compiled loops are read from numba's cache (ms), in a background
#: thread, for a model on the CPU: while the user picks an image and types classes, rather than beside the first run
#: (0.6 s of a core, much of it holding Python's lock; the first run on 4096 x 4096 took 0.3-0.7 s longer).
PREPARE_LOOPS_AFTER_MS = 1500

#: The docks open in this process (one per viewer): a result's store shown in any of their viewers is in use.
_DOCKS: "weakref.WeakSet[ClearClipWidget]" = weakref.WeakSet()


#: The user cache's labels folders tidied in this process (once each, when a dock opens).
_TIDIED: set[str] = set()


def _shown_stores() -> set[str]:
    """The stores of results segmented tile by tile that a layer of a viewer a dock was opened in shows."""
    return discarding.shown_stores(TILED_KEY)


def _saved_beside(source: str | None, image_name: str) -> Path:
    """Where Save labels... proposes to write an image's labels, before their suffix: beside its local file ("slide"
    for ``/data/slide.tif``), named after a remote store in the folder napari was started from ("slide" for
    ``https://host/slide.zarr``: nothing is written there), else after the layer."""
    from ..image_locations import location_name, remote_address

    if not source:
        return Path(image_name)
    if remote_address(source) is not None:
        return Path(location_name(source)).with_suffix("")
    return Path(source).with_suffix("")


def _any_run_going() -> bool:
    """Whether a dock of this process is running (a run may read the result it learns from)."""
    return any(dock._worker is not None for dock in list(_DOCKS))


class ClearClipWidget(FieldLogic, Container):
    """Type the classes, press Run, correct the Labels layer by hand."""

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__(labels=False)
        self._viewer = napari_viewer
        _DOCKS.add(self)
        discarding.watch(napari_viewer, TILED_KEY, _any_run_going)   # results removed: discarded (also once closed)
        self._models = ModelHolder()
        self._worker = None
        self._reduced_copy: tuple | None = None  # ((image id, factor, rgb), BlockMeans) of the last reduced image
        self._delivered = False  # whether the run in flight has returned its result (too late to cancel it)
        self._closed = False
        self._pending_step = None  # the newest progress of the run, until the next update of the dock
        self._progress_timer = QTimer()
        self._progress_timer.setInterval(PROGRESS_INTERVAL_MS)
        self._progress_timer.timeout.connect(self._show_pending_step)
        self._loops_timer = QTimer()
        self._loops_timer.setSingleShot(True)
        self._loops_timer.timeout.connect(self._prepare_loops)
        self._writing = False  # set while the widget adds its own layers, which the Image field must not follow
        self._previews: RunPreviews | None = None  # parts of the run in flight's labels shown before it ends
        self._spare_planes = SparePlanes()          # copies of the layer's planes a finished run no longer uses
        self.readying = Readying()                  # readies the next re-run while nothing runs
        self._result_plane: tuple | None = None     # (shape, dtype) of a plane of the newest result layer
        saved = load_settings()

        fields = build_fields(self)
        lines_high(self.classes, 6)
        lines_high(self.templates, 4)
        self.choose_weights = choose_file_button()
        weights_row = Container(name="weights_row", label="Weights", layout="horizontal", labels=False,
                                widgets=[fields["pretrained"], self.choose_weights])
        weights_row.native.layout().setContentsMargins(0, 0, 0, 0)
        self.show_advanced = CheckBox(name="show_advanced", text="Advanced options", value=False)
        sections = {name: [fields[f.name] for f in _fields_of(name)] for name in ("corrections", "output", "advanced")}
        self.lessons = SessionLessons()
        self.save_lesson_button, self.load_lesson_button = lesson_buttons()
        lesson_row = Container(name="lesson_row", label=" ", layout="horizontal", labels=False,
                               widgets=[self.save_lesson_button, self.load_lesson_button])
        lesson_row.native.layout().setContentsMargins(0, 0, 0, 0)
        sections["corrections"].insert([w.name for w in sections["corrections"]].index("share_lesson") + 1,
                                       lesson_row)
        self.save_labels_button = save_labels_button()
        self.save_full_size_button = full_size_button()
        sections["output"] += [self.save_labels_button, self.save_full_size_button]
        self.choose_feature_store = choose_folder_button()
        store_row = Container(name="feature_store_row", label="Feature store", layout="horizontal", labels=False,
                              widgets=[fields["feature_store"], self.choose_feature_store])
        store_row.native.layout().setContentsMargins(0, 0, 0, 0)
        at = [w.name for w in sections["advanced"]].index("feature_store")
        sections["advanced"][at] = store_row
        self.advanced = Container(name="advanced", label=" ", widgets=sections["advanced"], visible=False)
        self.run_button = PushButton(name="run_button", text="Run")
        self.cancel_button = PushButton(name="cancel_button", text="Cancel", enabled=False)
        self.buttons = Container(name="buttons", label=" ", layout="horizontal", labels=False,
                                 widgets=[self.run_button, self.cancel_button])
        self.status = wrapping(Label(name="status", value="Ready"))
        self.progress_bar = run_progress_bar()
        self.use_demo = PushButton(name="use_demo", text="Use the offline demo model", visible=False)
        self.legend = wrapping(Label(name="legend", value=""), rich=True)
        inputs = [fields[f.name] for f in _fields_of("input") if f.name != "pretrained"]
        model_at = [w.name for w in inputs].index("model") + 1
        inputs.insert(model_at, weights_row)
        self.form = Container(name="form", labels=True, widgets=[
            *inputs, *sections["corrections"], *sections["output"], self.show_advanced, self.advanced, self.buttons,
            captioned("status_box", "Status", self.status, self.progress_bar), self.use_demo,
            captioned("legend_box", "Legend", self.legend)])
        self.scroll_area = scrolling(self.form)
        self.native.layout().addWidget(self.scroll_area)
        self.native.layout().setContentsMargins(0, 0, 0, 0)

        self.results = ResultLayers(napari_viewer, on_painted=self._on_painted, busy=lambda: self.busy)
        self.live_mode = LiveMode(enabled=lambda: self.live.value and not self._closed, busy=lambda: self.busy,
                                  ready=self._classes_ready, start=self._run_live)
        self.model.changed.connect(self._on_model_changed)
        self.method.changed.connect(self._on_method_changed)
        self.foreground.changed.connect(self._on_foreground_changed)
        self.choose_weights.changed.connect(self.choose_weights_file)
        self.choose_feature_store.changed.connect(self.choose_feature_store_folder)
        self.image.changed.connect(self._on_image_changed)
        self.channel_axis.changed.connect(self._on_channel_axis_changed)
        self.show_advanced.changed.connect(lambda on: setattr(self.advanced, "visible", on))
        self.resize.changed.connect(self._on_resize_changed)
        self.live.changed.connect(lambda on: on and self._ready_next_run())
        self.learn.changed.connect(lambda on: on and self._ready_next_run())
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.use_demo.changed.connect(self.switch_to_demo_model)
        self.save_lesson_button.changed.connect(lambda *_: self.save_lesson())
        self.load_lesson_button.changed.connect(lambda *_: self.load_lesson())
        self.save_full_size_button.changed.connect(lambda *_: self.save_at_full_size())
        self.save_labels_button.changed.connect(lambda *_: self.save_labels())
        # every keystroke (magicgui's own "changed" of a TextEdit waits for the focus to leave)
        self.classes.native.textChanged.connect(self.live_mode.trigger)
        self.classes.native.textChanged.connect(self._on_classes_changed)
        self._viewer.layers.events.inserted.connect(self._on_layer_inserted)
        self._viewer.layers.events.removed.connect(self._on_layer_removed)
        self._camera().events.connect(self._on_view_moved)
        self._viewer.dims.events.ndisplay.connect(self._on_view_moved)
        self.native.destroyed.connect(lambda *_: self.close_down())
        self._restore(saved)
        self._refresh_layers()
        self._loops_timer.start(PREPARE_LOOPS_AFTER_MS)
        settle()  # napari and the plugin are loaded: keep them out of later full garbage collections

    # -- lifetime -----------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """Whether a run is computing."""
        return self._worker is not None

    def wait(self, timeout: float = 600.0) -> bool:
        """Process Qt events until the run in flight ends (scripts and tests); False if it is still going."""
        from qtpy.QtWidgets import QApplication
        import time

        deadline = time.monotonic() + timeout
        while self.busy and time.monotonic() < deadline:
            QApplication.processEvents()
            time.sleep(0.005)
        return not self.busy

    def _prepare_loops(self) -> None:
        """Read edge snapping's compiled loops in the background (once per process; a run that starts sooner reads
        them itself once its model is loaded). On a GPU too: the labels are snapped on the host. And tidy the user
        cache's results and working copies, once."""
        if self._closed:
            return
        discarding.note_window(self._viewer, self.native)
        self._tidy_cache()
        if device_there(self.device.value):
            compiled_snapping.prepare()

    def _tidy_cache(self) -> None:
        """Remove, in the background, the stores of the user cache that can no longer be used (once per process and
        cache folder; see :mod:`napari_clearclip.labels_cache`): never one a layer of a viewer with the dock shows,
        and not while a run goes (it may read a result whose layer was removed meanwhile: tidied once it is over)."""
        import threading

        folder = str(labels_folder())
        if folder in _TIDIED or self._closed:
            return
        if _any_run_going():
            QTimer.singleShot(PREPARE_LOOPS_AFTER_MS, self._tidy_cache)
            return
        _TIDIED.add(folder)
        shown = _shown_stores()
        threading.Thread(target=lambda: remove_stores(stale_stores(shown)), name="napari-clearclip tidying the cache",
                         daemon=True).start()

    def _on_layer_removed(self, event=None):
        super()._on_layer_removed(event)
        discarding.note_window(self._viewer, self.native)   # (its result, if any, is discarded: see discarding.py)

    def close_down(self) -> None:
        """Stop a running worker and drop every connection and reference to the viewer's layers.

        Safe to call more than once, and from Qt's ``destroyed`` when Qt has already deleted
        the widget's timers: nothing here raises.
        """
        if self.__dict__.get("_closed", True):  # already closed, or being garbage-collected
            return
        self._closed = True
        for timer in (self._progress_timer, self._loops_timer):
            try:
                timer.stop()
            except RuntimeError:  # Qt deleted it already
                pass
        for emitter, callback in ((self._viewer.layers.events.inserted, self._on_layer_inserted),
                                  (self._viewer.layers.events.removed, self._on_layer_removed),
                                  (self._camera().events, self._on_view_moved),
                                  (self._viewer.dims.events.ndisplay, self._on_view_moved)):
            try:
                emitter.disconnect(callback)
            except (TypeError, ValueError, RuntimeError):
                pass
        for part in (self.live_mode, self.results):
            try:
                part.close()
            except RuntimeError:
                pass
        self.readying.stop()
        worker, self._worker = self._worker, None
        if worker is not None:
            for signal in (worker.yielded, worker.returned, worker.errored, worker.aborted, worker.finished):
                try:
                    signal.disconnect()
                except (TypeError, RuntimeError):
                    pass
            try:
                worker.quit()
            except RuntimeError:
                pass
        self._models = ModelHolder()
        self._reduced_copy = None

    def settings(self) -> dict:
        """The values that persist between sessions."""
        return saved_values(self)

    def options(self) -> SegmentOptions:
        """The run's options, from the fields."""
        templates = [line.strip() for line in self.templates.value.splitlines() if line.strip()]
        return SegmentOptions(
            short_side=self.short_side.value if self.resize.value else None,
            crop=self.crop.value,
            stride=self.stride.value,
            logit_scale=self.logit_scale.value,
            prob_threshold=self.prob_threshold.value,
            templates=tuple(templates) or None,
            refine="pamr" if self.snap.value else None,
            keep_aspect=bool(self.keep_aspect.value) and self.method.value == "clipdiy",
            background_class=self.background.value or None,
        )

    def model_spec(self) -> ModelSpec:
        """Which model the fields name (the same identity the engine's batches use)."""
        return ModelSpec(self.model.value, self.pretrained.value or None, self.method.value, self.device.value,
                         self.precision.value)

    # -- live mode ----------------------------------------------------------------------------
    def _on_painted(self, event=None):
        self.live_mode.stroke_ended()

    def _classes_ready(self) -> bool:
        try:
            parse_classes(self.classes.value)
        except ClearClipError:
            return False  # half-typed class list: wait for the next change
        return True

    # -- running ------------------------------------------------------------------------------
    def _run_live(self):
        """A run that live mode starts (not the Run button): marked, so that runs that only Run should start
        (tile by tile, each adding a layer) are declined."""
        self._live_run = True
        try:
            return self.run()
        finally:
            self._live_run = False

    def run(self, *_):
        """Start a segmentation in a thread worker and return the worker (None if the input is invalid)."""
        if self._worker is not None:
            self._set_status("A run is already going: cancel it first.")
            return None
        layer = self.image.value
        try:
            if layer is None:
                raise ClearClipError(NO_IMAGE)
            if not self.classes.value.strip():
                raise InvalidClassesError(NO_CLASSES)
            classes = parse_classes(self.classes.value)
            data, reduction = self._data_to_segment(layer)
            layout = ImageLayout(tuple(data.shape), rgb=layer.rgb, channel_axis=self.channel_axis.value,
                                 channel=self.channel.value)
            # segment what the user sees
            options = self.options().replace(contrast_limits=tuple(float(v) for v in layer.contrast_limits))
            objects_layer = self.objects.value
            if objects_layer is not None and tuple(objects_layer.data.shape) != layout.label_shape:
                reduced = ("" if reduction is None else
                           f" (with Resize on, '{layer.name}' is too large to hold and is segmented at "
                           f"{reduction.describe()}: turn Resize off to classify objects at full size)")
                raise ClearClipError(f"The Objects layer '{objects_layer.name}' is {tuple(objects_layer.data.shape)}, "
                                     f"but the labels of '{layer.name}' are {layout.label_shape}{reduced}: pick the "
                                     "objects of this image, or none.")
            foreground = self.foreground_request(layout)
            store_folder = self._feature_store_folder()
        except ClearClipError as exc:
            self._show_error(exc)
            return None
        planes = layout.planes()
        if self.scope.value == "current slice" and len(planes) > 1:
            point = np.asarray(layer.world_to_data(self._viewer.dims.point), dtype=float)
            if reduction is not None:  # in the reduced level's pixels
                full = np.asarray((layer.data[0] if layer.multiscale else layer.data).shape[: len(point)], float)
                point = point * np.asarray(data.shape[: len(point)], float) / full
            planes = [layout.plane_of_point(point)]
        if self._tiled(layout, objects_layer, foreground):
            if getattr(self, "_live_run", False):  # each tiled run adds a layer and a store: only on request
                self._set_status("Live mode does not re-run images segmented tile by tile (each run adds a layer): "
                                 "press Run.")
                return None
            save_settings(self.settings())
            return self._run_tiled(layer, data, layout, classes, options,
                                   self.lessons.for_run(layer_key(layer), self.share_lesson.value), objects_layer)
        save_settings(self.settings())
        target = self._choose_target(layer, layout)
        existing = {name: item.data for name, item in probability_layers(self._viewer, layer).items()}
        request = layer_request(data, layout, planes, classes, options, layer.name, self.probability_output.value,
                                target, self.learn.value and self.keep_edits.value, existing,
                                (self.background.value,) if self.background.value else (), self._spare_planes)
        request.objects = None if objects_layer is None else objects_layer.data
        request.lessons = self.lessons.for_run(layer_key(layer), self.share_lesson.value)
        for name, value in foreground.items():
            setattr(request, name, value)
        request.view = self._view(target)
        geometry = layer_geometry(layer, layout)
        if reduction is not None:  # the labels of a level sit on the image at its scale
            geometry = reduction.geometry(**geometry)
        new_layer = None if target is not None else {"name": f"{layer.name} classes", **geometry}
        worker = create_worker(segmentation_job, self._models, self.model_spec(), request, new_layer, store_folder,
                               _start_thread=False, _ignore_errors=True)
        context = {"layer": layer, "data": layer.data, "layout": layout, "target": target, "model": self.model.value,
                   "objects": objects_layer, "reduction": reduction, "geometry": geometry,
                   "demo_scene": self.model.value == DEMO_MODEL and _looks_like_demo_scene(layer, layout, planes[0])}
        previews = context["previews"] = (None if target is None else
                                          RunPreviews(target, request.found, view=lambda: self._view(target)))
        worker.returned.connect(lambda value: self._on_returned(value, context))
        worker.aborted.connect(lambda: self._on_aborted(previews))
        worker.errored.connect(lambda *_: previews is not None and previews.revert())
        self._previews = previews
        return self._launch(worker, f"Starting on {layer.name} ({len(planes)} slice{'s' if len(planes) > 1 else ''})...")

    def _feature_store_folder(self) -> str | None:
        """The Feature store field's folder (None when empty: the default one); one that does not exist is refused,
        so that a mistyped path does not start an empty store."""
        text = self.feature_store.value.strip()
        if not text:
            return None
        folder = os.path.expanduser(text)
        if not os.path.isdir(folder):
            raise FeatureStoreNotFoundError(f"The feature store folder {text} does not exist: choose an existing "
                                            "folder in Advanced options (Feature store), or leave it empty for the "
                                            "user cache.")
        return os.path.abspath(folder)

    def _launch(self, worker, status: str):
        """Show progress and the Cancel button for ``worker``, and start it from the event loop (so that a
        caller can connect to its signals first); a live re-run, which no caller holds, starts at once, so that
        it computes while napari draws the stroke that started it."""
        worker.yielded.connect(self._on_yielded)
        worker.errored.connect(self._on_errored)
        worker.finished.connect(self._on_finished)
        self.readying.stop()   # the run has the machine to itself
        self._worker = worker
        self._delivered = False
        self.run_button.enabled = False
        self.cancel_button.enabled = True
        self.use_demo.visible = False
        self._set_status(status)
        if getattr(self, "_live_run", False):
            self._begin(worker)
        else:
            QTimer.singleShot(0, lambda: self._begin(worker))
        return worker

    def _begin(self, worker) -> None:
        """Show the progress bar and start ``worker``, in an event-loop turn of their own, after the Run step."""
        if self._worker is worker:
            self.progress_bar.value = 0
            self.progress_bar.visible = True
        worker.start()

    def _on_resize_changed(self, on: bool) -> None:
        """The short side and the size of large images apply only to runs that resize."""
        self.short_side.enabled = on
        self.large_side.enabled = on

    # -- images too large to hold ----------------------------------------------------------------
    def _data_to_segment(self, layer) -> tuple[object, Reduction | None]:
        """The array a run segments, and how it is reduced (None: the image itself, at full resolution).

        With Resize on the model sees the image at its short side, so a pyramid, or a lazy (dask, zarr) image, whose
        planes exceed TILED_PIXELS (and "Large images at" squared) is segmented at the finest level of at most "Large
        images at" pixels a side (or a copy reduced by block means, made in the worker and kept for the next run)
        rather than read whole. An image already in memory is segmented as it is, and so is any image with Resize off
        (tile by tile when large)."""
        levels = list(layer.data) if layer.multiscale else [layer.data]
        if not self.resize.value or (not layer.multiscale and isinstance(layer.data, np.ndarray)):
            return levels[0], None
        larger_than, level_pixels = limits_for_side(self.large_side.value, TILED_PIXELS)
        data, reduction = reduced_for_resize(levels, larger_than, layer.rgb, self.channel_axis.value, level_pixels)
        if isinstance(data, BlockMeans):  # the copy made for an earlier run of this image, when there is one
            key = (id(levels[0]), data.factor, data.rgb)
            if self._reduced_copy is not None and self._reduced_copy[0] == key:
                data = self._reduced_copy[1]
            else:
                self._reduced_copy = (key, data)
        return data, reduction

    def _tiled(self, layout: ImageLayout, objects_layer, foreground: dict) -> bool:
        """Whether this run goes tile by tile: a 2-D image larger than TILED_PIXELS segmented at native
        resolution (Resize off), with nothing that needs the whole image at once (objects do not: their sums are
        added up over the tiles)."""
        shape = layout.label_shape
        return (not self.resize.value and len(shape) == 2 and shape[0] * shape[1] > TILED_PIXELS
                and self.method.value != "clipdiy" and not foreground)

    def _run_tiled(self, layer, data, layout: ImageLayout, classes, options, lessons: list | None = None,
                   objects_layer=None):
        """Segment a large 2-D image tile by tile into a zarr store in the user cache; the result is a new Labels
        layer backed by that store (editable: painting writes into it). ``lessons`` (loaded, or strokes on other
        images) teach every tile with the whole image's statistics, and so do corrections painted on the newest
        earlier result of this image segmented so (read against the baseline its store keeps; that layer is left
        as it is). The objects of ``objects_layer`` get a class each (its features table), read a tile at a time."""
        import shutil

        store = tiled_store_path(layer.name)
        names = [", ".join(c.synonyms) for c in classes]
        new_layer = {"name": f"{layer.name} classes", **layer_geometry(layer, layout),
                     "metadata": {TILED_KEY: {"image": layer.name, "image_key": layer_key(layer), "store": str(store),
                                              "names": [c.name for c in classes]}}}
        learns = self.learn.value and self.keep_edits.value
        earlier = self._tiled_result_of(layer, layout) if learns else None
        kept = self._kept_result_of(layer, layout, learns and earlier is None)
        # an image of no file: the results a closed napari left that may be of it, judged by its pixels in the worker
        unfiled = self._unfiled_results_of(layer, layout) if learns and earlier is None else ()
        if kept[0] is not None:   # left by a napari that has closed: what was painted there teaches still
            painted_on = (kept[0], list(kept[1]["names"]), True)
        elif earlier is None:
            painted_on = None
        elif TILED_KEY in earlier.metadata:
            painted_on = (Path(earlier.metadata[TILED_KEY]["store"]), list(earlier.metadata[TILED_KEY]["names"]))
        else:   # labels the command line wrote, opened for painting in a working copy: the store is the baseline
            painted_on = (earlier.data, list(earlier.metadata[OPENED_KEY]["names"]))
        background = (self.background.value,) if self.background.value else ()
        objects = None
        if objects_layer is not None:
            objects = objects_layer.data[0] if objects_layer.multiscale else objects_layer.data
        worker = create_worker(tiled_job, self._models, self.model_spec(), data, names, options, store, new_layer,
                               background, tuple(lessons or ()), objects, painted_on, self._feature_store_folder(),
                               image_file_of(layer), unfiled, image_array=image_array_of(layer),
                               image_sample=image_sample_of(layer), _start_thread=False, _ignore_errors=True)

        def discard():  # a cancelled or failed run leaves no store behind
            shutil.rmtree(store.with_name(store.name + ".partial"), ignore_errors=True)

        source = (layer, layer.data)
        worker.returned.connect(lambda value: self._on_tiled_returned(value, objects_layer, earlier, source, kept))
        worker.aborted.connect(lambda: (discard(), self._set_status("Cancelled: nothing was added.")))
        worker.errored.connect(lambda *_: discard())
        return self._launch(worker, f"Starting on {layer.name}: a large image, segmented tile by tile at native "
                                    "resolution...")

    def _tiled_result_of(self, image, layout: ImageLayout):
        """The newest result of this image segmented tile by tile whose store tells what was painted on it since,
        else labels the command line wrote for the image's file, too large to hold, opened for painting (the store
        they were opened from tells what was painted on them)."""
        from ..editable_copy import EditableCopy
        from ..tiled_edits import has_baseline
        from ..tiled_edits import same_image_file

        live = {layer_key(item) for item in self._viewer.layers}
        source, siblings = image_file_of(image), has_sibling_images(self._viewer, image)
        for item in reversed(list(self._viewer.layers)):
            if not isinstance(item, Labels) or tuple(item.data.shape) != layout.label_shape:
                continue
            kept, opened = item.metadata.get(TILED_KEY), item.metadata.get(OPENED_KEY)
            if kept and result_of_image(kept, image, live) and has_baseline(kept.get("store", "")):
                return item
            if (isinstance(item.data, EditableCopy) and isinstance(opened, dict) and source
                    and same_image_file(opened.get("record") or {}, source)
                    and record_of_image(opened.get("record") or {}, image, siblings=siblings)):
                return item
        return None

    def _kept_result_of(self, image, layout: ImageLayout, learns: bool) -> tuple[Path | None, dict | None, list[Path]]:
        """Stores of earlier results segmented tile by tile that no layer of any viewer shows any more: the newest of
        this image's file that a napari now closed left (and its record), whose painted pixels teach this run when
        it ``learns``, and those that go once this run is done: the results of this session whose layer the user
        removed (discarded), and, when it learns, all of this image's file (its strokes are kept in this run's
        store; older ones were superseded, as only the newest result teaches)."""
        import time

        from ..tiled_edits import SESSION, image_changed_since, kept_results, labels_shape, same_image_file

        source, siblings = image_file_of(image), has_sibling_images(self._viewer, image)
        shown = _shown_stores()   # (a store another viewer shows is in use)
        newest, record, gone = None, None, []
        for path, kept in kept_results(before=time.time()):   # (not a run of another dock finishing now)
            if str(path) in shown:
                continue
            this_session = kept.get("session") == SESSION
            of_image = bool(source) and same_image_file(kept, source)
            if of_image:   # (another image of the same store, a collection's series, is another image)
                of_image = labels_shape(path) == tuple(layout.label_shape) and (   # (another scene, unless the
                    record_of_image(kept, image, siblings=siblings)                # file was written since)
                    or (record_of_image(kept, image, pixels=False, siblings=siblings)
                        and image_changed_since(path, source)))
            if this_session or (of_image and learns):
                gone.append(path)
            if of_image and learns and not this_session and newest is None:
                newest, record = path, kept
        gone += [path for path in discarded_results() if str(path) not in shown]
        return newest, record, gone

    @staticmethod
    def _unfiled_results_of(image, layout: ImageLayout) -> tuple:
        """For an image of no file held in memory: the results a closed napari left of images of no file, of its
        labels' shape, that no layer shows ((store, class names, their image's pixels), the newest first). Whether
        they are of this image, its pixels tell, in the run's worker."""
        import time

        from ..tiled_edits import SESSION, kept_results, labels_shape

        if image_file_of(image) or not isinstance(image.data, np.ndarray):
            return ()
        shown, found = _shown_stores(), []
        for path, kept in kept_results(before=time.time()):
            if (str(path) in shown or kept.get("session") == SESSION or kept.get("source")
                    or not isinstance(kept.get("pixels"), str)):
                continue
            if labels_shape(path) == tuple(layout.label_shape):
                found.append((path, tuple(kept.get("names") or ()), kept["pixels"]))
        return tuple(found)

    def _on_tiled_returned(self, value, objects_layer=None, earlier=None, source=None, kept=None):
        self._delivered = True
        self._result_plane = None   # a layer backed by a store: no plane copies to ready
        if self._closed:
            return
        result, layer = value
        changed = None if source is None else self._image_changed(*source)
        if changed is not None:  # labels of an image no longer there: their store goes too
            import shutil

            shutil.rmtree(result.path, ignore_errors=True)
            self._set_status(changed)
            return
        self._writing = True
        try:
            self._viewer.add_layer(layer)
            layer.visible = True
        finally:
            self._writing = False
        self.legend.value = legend_html(result.names, result.counts, result.colours)
        taught = (" The lesson (loaded, or taught on other images) taught every tile." if result.taught else "")
        notes = "".join(f" {note}" for note in result.notes)
        absent = ""
        if result.absent_chunks:
            absent = (f" {result.absent_chunks[0]} of the {result.absent_chunks[1]} chunks of the image are not in its "
                      "zarr store: they were read as its fill value, as napari shows them. If they were lost, copy "
                      "the store again.")
        classified = ""
        if result.objects is not None and objects_layer is not None:
            self._set_object_features(objects_layer, result.objects)
            classified = (f" {len(result.objects['id'])} objects of '{objects_layer.name}' got a class each (see "
                          "its features table).")
        gone = list(kept[2] if kept is not None else ()) + list(result.superseded)
        if gone:   # their strokes are in this run's store now, or were discarded: the stores go, in the
            remove_in_background(gone)   # background (a slide's has thousands of files)
        if result.painted and result.left_when_closed:
            strokes = (f" {result.painted} pixels painted on an earlier result of this image, left when napari "
                       "closed, taught this run and keep their class.")
        elif result.painted and earlier is not None:
            strokes = (f" {result.painted} pixels painted on '{earlier.name}' taught this run and keep their class; "
                       "that layer is kept as it is.")
        elif self.learn.value and self.keep_edits.value:
            strokes = " Corrections painted on it teach the next run (press Run: it adds a new layer)."
        else:
            strokes = ""
        if result.late and earlier is not None:  # painted while the run went: not lost, kept for the next
            strokes += (f" {result.late} pixels painted on '{earlier.name}' while this run went were not used by it; "
                        "they teach the next run.")
        self._set_status(f"Done: {layer.name}, segmented tile by tile; its labels are stored in {result.path} "
                         f"(painting writes there; Save labels... keeps a copy with its classes)."
                         f"{strokes}{classified}{taught}{notes}{absent}"
                         f"{'' if source is None else unplaced_labels_note(self._viewer, source[0], layer.data.shape)}")
        self.objects.reset_choices()
        self._show_full_size_button()   # Save labels..., now that the image has a result

    @staticmethod
    def _set_object_features(objects_layer, table: dict) -> None:
        """napari's features table of the objects layer: one row per object id, with its class."""
        try:
            objects_layer.features = {"index": table["id"], "class": table["class"],
                                      "confidence": table["confidence"], "area": table["area"]}
        except (ValueError, TypeError, RuntimeError) as exc:  # the layer changed or closed meanwhile
            log.info("Could not set the objects' features: %s", exc)

    # -- labels of a reduced image, at full size --------------------------------------------------
    def _full_size_layer(self):
        """The newest result of the chosen image that was segmented at a reduced size, which Save at full size...
        writes; None when there is none."""
        image = self.image.value
        if image is None:
            return None
        live = {layer_key(item) for item in self._viewer.layers}
        for layer in reversed(list(self._viewer.layers)):
            full = layer.metadata.get(FULL_SIZE_KEY) if isinstance(layer, Labels) else None
            if full and result_of_image(full, image, live):
                return layer
        return None

    def _show_full_size_button(self) -> None:
        """Show the save buttons that apply to the chosen image's results."""
        self.save_full_size_button.visible = self._full_size_layer() is not None
        self.save_labels_button.visible = self._result_to_save() is not None

    def _result_to_save(self):
        """What Save labels... writes: the chosen image's newest result held in memory, else its newest result
        segmented tile by tile (a Labels layer backed by its store), or None."""
        image = self.image.value
        if image is None:
            return None
        result = self.results.newest_of(image)
        return result if result is not None else self._tiled_result_layer(image)

    def _tiled_result_layer(self, image):
        """The newest result of this image segmented tile by tile still in the viewer, or labels the command line
        wrote for its file that were too large to hold (opened for painting in a working copy), or None."""
        from ..tiled_edits import same_image_file

        live = {layer_key(item) for item in self._viewer.layers}
        source, siblings = image_file_of(image), has_sibling_images(self._viewer, image)
        for item in reversed(list(self._viewer.layers)):
            if not isinstance(item, Labels):
                continue
            kept, opened = item.metadata.get(TILED_KEY), item.metadata.get(OPENED_KEY)
            if kept and result_of_image(kept, image, live):
                return item
            if (isinstance(opened, dict) and opened.get("edits") and source
                    and same_image_file(opened.get("record") or {}, source)
                    and record_of_image(opened.get("record") or {}, image, siblings=siblings)):
                return item
        return None

    def _save_tiled_labels(self, image, layer, path=None):
        """Save labels... for a result segmented tile by tile (or a labels store opened for painting): copied a band
        at a time into ``<name>_labels.zarr`` (the command line's format for such labels) with ``<name>_classes.csv``
        beside, in the background; an existing store is never replaced. Returns the worker (None when nothing
        starts)."""
        from ..batch.files import labels_store_path, write_labels_store_steps
        from ..editable_copy import EditableCopy
        from ..tiled_edits import PaintedPixels

        source = image_file_of(image)
        if path is None:
            from qtpy.QtWidgets import QFileDialog

            start = labels_store_path(_saved_beside(source, image.name))
            path, _ = QFileDialog.getSaveFileName(self.native, "Save labels", str(start),
                                                  "Labels store (*_labels.zarr)")
            if not path:
                return None
        target = labels_store_path(path)
        table = target.with_name(target.name[: -len("_labels.zarr")] + "_classes.csv")
        existing = [item.name for item in (target, table) if item.exists()]
        if existing:
            self._set_status(f"{existing[0]} exists: choose another name (it is never overwritten unasked).",
                             error=True)
            return None
        kept = layer.metadata.get(TILED_KEY) or layer.metadata.get(OPENED_KEY)
        names = list(kept["names"])
        self._set_status(f"Saving {layer.name} to {target}...")
        tiled = layer.metadata.get(TILED_KEY)
        # the pixels painted by hand, kept with the labels so that they teach again when opened another day
        painted = PaintedPixels.of(layer.data, tiled.get("store") if isinstance(tiled, dict) else None)
        worker = create_worker(errors_reported(write_labels_store_steps), target, layer.data, names, source, painted=painted,
                               array=image_array_of(image) if source else None,
                               sample=image_sample_of(image) if source else None, _start_thread=False,
                               _ignore_errors=True)
        worker.yielded.connect(lambda step: self._set_status(f"Saving {layer.name} to {target}: band {step[0]} of "
                                                             f"{step[1]}..."))
        version = getattr(layer.data, "version", None)   # a working copy's writes so far

        def saved(paths):
            if isinstance(layer.data, EditableCopy):   # its strokes are in the saved labels now
                layer.data.mark_saved(version, paths[0])
            self._set_status(f"Saved {layer.name} to {paths[0]}, its classes to {paths[1].name}.")
        worker.returned.connect(saved)
        worker.errored.connect(lambda exc: self._set_status(f"Could not save {layer.name}: {exc}", error=True))
        worker.start()
        return worker

    def save_labels(self, path=None):
        """Write the chosen image's result, edits included, as ``<name>_labels.tif`` with ``<name>_classes.csv`` beside
        (``path``, asked for when None; a name not ending so is given ``_labels.tif``), in the background: the
        command line's format, which opens again in napari with its classes and as this image's result. An
        existing file is replaced only when the save dialog asked. A result segmented tile by tile is copied into
        ``<name>_labels.zarr`` instead. Returns the worker (None when nothing starts)."""
        from ..batch.files import labels_file_path, write_labels_file
        from .writer import class_names, saved_parts

        result = self._result_to_save()
        if result is None:
            self._set_status("Nothing to save: run on this image first (its result is what Save labels... writes).")
            return None
        image = self.image.value
        if isinstance(result, Labels):   # segmented tile by tile: its store is copied
            return self._save_tiled_labels(image, result, path)
        layer = result.layer
        overwrite = path is None
        if path is None:
            from qtpy.QtWidgets import QFileDialog

            source = image_file_of(image)
            start = labels_file_path(_saved_beside(source, image.name))
            path, _ = QFileDialog.getSaveFileName(self.native, "Save labels", str(start), "Labels (*_labels.tif)")
            if not path:
                return None
            overwrite = labels_file_path(path) == Path(path).expanduser()   # the dialog asked about that name only
        target = labels_file_path(path)
        table = target.with_name(target.name[: -len("_labels.tif")] + "_classes.csv")
        existing = [item.name for item in (target, table) if not overwrite and item.exists()]
        if existing:
            self._set_status(f"{existing[0]} exists: choose another name (it is never overwritten unasked).",
                             error=True)
            return None
        names = class_names(layer.metadata, layer.features) or list(result.names)
        labels = np.array(layer.data)          # as shown now, edits included
        source = image_file_of(image)
        array = image_array_of(image) if source else None   # which image of its zarr store, if it is one
        sample = image_sample_of(image) if source else None  # which image of its file, where a reader gives several
        metadata = dict(layer.metadata)        # its arrays are replaced, never changed in place: safe to read there
        self._set_status(f"Saving {layer.name} to {target}...")

        def write():
            parts = saved_parts(labels, metadata)   # a reduced image's labels are placed over it when opened again
            return write_labels_file(target, labels, names, source, overwrite, parts["placement"], parts["edited"],
                                     array, sample)

        worker = create_worker(write, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(lambda paths: self._set_status(f"Saved {layer.name} to {paths[0]}, its classes to "
                                                               f"{paths[1].name}."))
        worker.errored.connect(lambda exc: self._set_status(f"Could not save {layer.name}: {exc}", error=True))
        worker.start()
        return worker

    def save_at_full_size(self, path=None):
        """Write the labels of the chosen image's reduced result at the image's full size into a new zarr store
        (``path``, asked for when None), in the background, a band of rows at a time: each full-size pixel takes
        the label shown over its centre. An existing path is refused. Returns the worker (None when nothing
        starts)."""
        import shutil

        from ..reduced import full_size_labels

        layer = self._full_size_layer()
        if layer is None:
            self._set_status("Nothing to save at full size: that is for the labels of an image segmented at a "
                             "reduced size (with Resize on, an image too large to hold).")
            return None
        if path is None:
            from qtpy.QtWidgets import QFileDialog

            path, _ = QFileDialog.getSaveFileName(self.native, "Save labels at full size",
                                                  f"{layer.name}.zarr", "Zarr stores (*.zarr)")
            if not path:
                return None
        target = Path(path).expanduser()
        if target.suffix != ".zarr":
            target = target.with_name(target.name + ".zarr")
        try:  # the store is written beside, as <name>.partial, then renamed: both names must be usable
            exists = target.exists() or target.with_name(target.name + ".partial").exists()
        except OSError as exc:  # a name longer than the file system takes, say
            self._set_status(f"Cannot save as {target.name[:40]}...: {exc.strerror or exc}. Choose another name.",
                             error=True)
            return None
        if exists:
            self._set_status(f"{target} exists: choose another name (it is never overwritten).", error=True)
            return None
        full = layer.metadata[FULL_SIZE_KEY]
        labels = np.array(layer.data)          # as shown now, edits included; a few MB at most
        height, width = full["shape"]
        self._set_status(f"Saving {layer.name} at full size ({height} x {width}) to {target}...")
        worker = create_worker(errors_reported(full_size_labels), labels, (height, width), full["factors"][-2:], out=str(target),
                               _start_thread=False, _ignore_errors=True)

        def saved(_):
            self._set_status(f"Saved {layer.name} at full size ({height} x {width}) to {target}.")

        def failed(exc):
            shutil.rmtree(target.with_name(target.name + ".partial"), ignore_errors=True)
            self._set_status(f"Could not save {layer.name} at full size: {exc}", error=True)

        worker.returned.connect(saved)
        worker.errored.connect(failed)
        worker.start()
        return worker

    # -- lessons --------------------------------------------------------------------------------
    def save_lesson(self, path=None):
        """Save what strokes taught this session (the current image's first) to ``path`` (asked for when None).

        Returns the file it is written to, in the background (the status says when it is saved)."""
        from ..errors import LessonError
        from ..lessons import Lesson

        image = self.image.value
        try:
            lessons = self.lessons.to_save(layer_key(image) if image is not None else None)
        except LessonError as exc:
            self._set_status(str(exc))
            return None
        if path is None:
            from qtpy.QtWidgets import QFileDialog

            path, _ = QFileDialog.getSaveFileName(self.native, "Save lesson", "lesson.npz", "Lessons (*.npz)")
            if not path:
                return None
        target = Lesson.file_for(path)
        self._set_status(f"Saving the lesson to {target}...")
        # checking its exemplars and fitting its class offsets take a moment: in a worker, with the model they were
        # taught with where it is loaded
        worker = create_worker(fitted_and_saved, lessons, target, self._models.get(self.model_spec()))

        def saved(result):
            done, where = result
            self._set_status(f"Saved a lesson of {len(done)} exemplars ({', '.join(done.class_names)}) to {where}.")

        def failed(exc):
            self._set_status(f"Could not save the lesson: {exc}", error=True)

        worker.returned.connect(saved)
        worker.errored.connect(failed)
        worker.start()
        return target

    def load_lesson(self, path=None):
        """Load a lesson from ``path`` (asked for when None): it fills the classes and teaches every run."""
        from ..errors import LessonError
        from ..lessons import Lesson

        if path is None:
            from qtpy.QtWidgets import QFileDialog

            path, _ = QFileDialog.getOpenFileName(self.native, "Load lesson", "", "Lessons (*.npz)")
            if not path:
                return None
        try:
            lesson = Lesson.load(path)
        except LessonError as exc:
            self._set_status(str(exc), error=True)
            return None
        self.lessons.loaded = lesson
        self.classes.value = classes_text(lesson)
        note = "" if lesson.model == self.model.value else f" It was made with the model {lesson.model}: choose it."
        self._set_status(f"Loaded a lesson of {len(lesson)} exemplars for {', '.join(lesson.class_names)}; "
                         f"it teaches every run with these classes.{note}")
        return lesson

    def _choose_target(self, layer: Image, layout: ImageLayout):
        """The result layer this run updates, or None for a new one."""
        if self.new_layer.value:
            return None
        target = self.results.target(layer, layout)
        if target is not None and not self.keep_edits.value and (
                np.any(target.layer.data != target.baseline) or (target.edited is not None and target.edited.any())):
            show_info(f"'{target.layer.name}' has manual edits: the new result goes to a new layer.")
            return None
        return target

    def cancel(self, *_):
        """Ask the run in flight to stop; too late once its result is in (its status then stays)."""
        if self._worker is not None and not self._delivered:
            self._set_status("Cancelling after the current batch...")
            self._worker.quit()

    def _set_status(self, text: str, error: bool = False):
        if self._closed:
            return
        self._pending_step = None  # a message of the widget's own supersedes any progress not shown yet
        self.status.value = text
        if error:
            show_error(text)

    def _show_error(self, exc: BaseException) -> None:
        """An engine error in the widget's terms; the legend of an earlier result no longer applies."""
        self.legend.value = ""
        text, offer_demo = error_text(exc, self.model.value, self.pretrained.value)
        if not isinstance(exc, ClearClipError):
            log.error("ClearCLIP run failed", exc_info=exc)
        self.use_demo.visible = offer_demo
        self._set_status(text, error=True)

    def _view(self, target) -> tuple[float, float, float, float] | None:
        """(top, bottom, left, right) of the result layer's plane in view, where a re-run shows its labels first;
        None in a 3-D view or without a result layer."""
        if target is None or self._viewer.dims.ndisplay != 2:
            return None
        try:
            corners = np.asarray(target.layer.corner_pixels, dtype=float)
            return float(corners[0, -2]), float(corners[1, -2]) + 1, float(corners[0, -1]), float(corners[1, -1]) + 1
        except (ValueError, IndexError, TypeError, AttributeError, RuntimeError):
            return None

    def _camera(self):
        """The viewer's camera (``viewer.scene.camera`` since napari 0.9, ``viewer.camera`` before)."""
        scene = getattr(self._viewer, "scene", None)
        return scene.camera if scene is not None else self._viewer.camera

    def _on_view_moved(self, *_) -> None:
        """Parts of a re-run written out of view are shown when the view moves onto them."""
        if self._previews is not None and not self._closed:
            self._previews.view_changed()

    def _on_aborted(self, previews: RunPreviews | None) -> None:
        if previews is not None:
            previews.revert()
        self._set_status("Cancelled: nothing was changed.")

    def _on_yielded(self, step):
        """Show a run's progress at once, then at most every PROGRESS_INTERVAL_MS: every repaint of the dock
        recomposes napari's whole window (through its OpenGL canvas), which on software OpenGL takes CPU time
        from the run itself. Labels final before the run ends go into the layer (see :mod:`.previews`)."""
        if self._closed or not isinstance(step, Progress):
            return
        if step.preview is not None and self._previews is not None:
            self._previews.add(step.preview)
        self._pending_step = step
        if not self._progress_timer.isActive():
            self._show_pending_step()
            self._progress_timer.start()

    def _show_pending_step(self) -> None:
        step, self._pending_step = self._pending_step, None
        if step is None or self._closed:
            self._progress_timer.stop()
            return
        self.status.value = step.message
        self.progress_bar.value = max(0, min(1000, int(step.fraction * 1000)))

    def _on_errored(self, exc):
        if not self._closed:
            self._show_error(exc)

    def _on_finished(self):
        previews, self._previews = self._previews, None
        if previews is not None:
            previews.stop()
            # the run's copies of the layer's planes, for the next run to copy into (those nothing else still holds)
            self._spare_planes.keep_from(previews.expected)
            self._spare_planes.keep_from(previews.found)
        self._worker = None
        self._pending_step = None
        self._progress_timer.stop()
        self.results.run_finished()
        if not self._closed:
            self.progress_bar.visible = False
            self.run_button.enabled = True
            self.cancel_button.enabled = False
            self.live_mode.run_finished()
            self._ready_next_run()

    def _ready_next_run(self) -> None:
        """With Live or Learn from my edits on (a re-run is to come: by itself, or once the user has painted and
        presses Run) and nothing running or queued, ready the next re-run in the background (see Readying)."""
        segmenter = self._models.segmenter
        expected = self.live.value or self.learn.value
        if self._closed or self.busy or not expected or segmenter is None or self.live_mode.pending:
            return
        self.readying.start(ready_job, segmenter, self._spare_planes, self._result_plane)

    def _image_changed(self, layer, data) -> str | None:
        """Why a finished run's labels no longer fit its image (removed from the viewer, or given new data since the
        run read it), or None: such labels are not used, whatever the run found."""
        if layer not in self._viewer.layers:
            return image_changed_text(layer.name, removed=True)
        if layer.data is not data:
            return image_changed_text(layer.name, removed=False)
        return None

    def _on_returned(self, value, context):
        self._delivered = True
        if self._closed:
            return
        result, prepared_layer = value
        if result is None:
            return
        changed = self._image_changed(context["layer"], context["data"])
        if changed is not None:  # the labels are of an image no longer there: what the previews wrote goes back
            if context.get("previews") is not None:
                context["previews"].revert()
            self._set_status(changed)
            return
        self._writing = True
        try:
            labels_layer, kept = self.results.write(context, result.update, prepared_layer)
            # the merged planes are in the layer now: their arrays for the next run's copies (if no one holds them)
            self._spare_planes.keep_from(result.update.written())
            data = labels_layer.data
            self._result_plane = ((tuple(data.shape[-2:]), data.dtype) if isinstance(data, np.ndarray) else None)
            self.results.write_maps(context, result.maps)
        finally:
            self._writing = False
        if result.objects is not None and context["objects"] is not None:
            self._set_object_features(context["objects"], result.objects)
        self.lessons.record(layer_key(context["layer"]), result.lesson)
        update = result.update
        self.legend.value = legend_html(update.names, update.counts, update.colours)
        demo_note = context["model"] == DEMO_MODEL and not context["demo_scene"]  # what the image is, not its name
        text = done_text(labels_layer.name, result.planes, kept, result.notes, demo_note)
        reduction = context.get("reduction")
        if reduction is not None:
            text += " " + reduced_note(reduction)
            if len(reduction.shape) == 2:  # what Save at full size... brings the labels to
                image = context["layer"]
                full = image.data[0] if image.multiscale else image.data
                shape = ImageLayout(tuple(full.shape), rgb=image.rgb, channel_axis=context["layout"].channel_axis)
                labels_layer.metadata[FULL_SIZE_KEY] = {"image": image.name, "image_key": layer_key(image),
                                                        "shape": list(shape.label_shape),
                                                        "factors": list(reduction.factors)}
        text += unplaced_labels_note(self._viewer, context["layer"], context["layout"].label_shape)
        self._show_full_size_button()   # and Save labels..., now that the image has a result
        self._set_status(text)
        self.objects.reset_choices()  # the new result layer is no objects layer



#: The largest pyramid level sampled on the GUI thread to tell whether an image is a demo scene.
DEMO_SAMPLE_PIXELS = 1024 * 1024


def _looks_like_demo_scene(layer, layout: ImageLayout, plane: tuple) -> bool:
    """Whether the image is the demo model's kind (coloured shapes on grey), from a small strided sample: of an
    array in memory, or of a pyramid's coarsest level (a lazy image is not read on the GUI thread)."""
    from ..demo.scenes import looks_like_demo_scene

    data = layer.data[-1] if layer.multiscale else layer.data
    if not isinstance(data, np.ndarray) and not layer.multiscale:
        return False  # say the note rather than read a lazy image here
    try:
        if layer.multiscale:
            layout = ImageLayout(tuple(data.shape), rgb=layout.rgb, channel_axis=layout.channel_axis,
                                 channel=layout.channel)
            if np.prod(layout.label_shape[-2:]) > DEMO_SAMPLE_PIXELS:
                return False  # a pyramid without a small level: not read here either
            plane = tuple(min(i, n - 1) for i, n in zip(plane, layout.plane_shape))
        image = data[layout.image_index(plane)]
        step = max(1, max(image.shape[:2]) // 128)
        return looks_like_demo_scene(np.asarray(image[::step, ::step]))
    except Exception:  # a lazy array that cannot be sampled cheaply: say the note
        return False


def _fields_of(section: str):
    from .fields import FIELDS

    return [field for field in FIELDS if field.section == section]
