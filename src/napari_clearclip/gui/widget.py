"""The napari dock widget: collects parameters, runs the engine in a thread worker, shows the result.

All computation lives in the engine (``Segmenter``, ``segment_layer``, the labels merger);
the widget's parts are the field table (:mod:`.fields`), the result layers with their edits
(:mod:`.layers`), live mode (:mod:`.live`) and the worker body (:mod:`.job`). The GUI thread
sets layers and text, nothing more.
"""

from __future__ import annotations

import html
import logging
import os

import napari
import numpy as np
import open_clip
from magicgui.widgets import CheckBox, Container, Label, PushButton
from napari.layers import Image
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QTimer

from ..annotate import LayerRequest, probability_layer_names
from ..choices import CHECKPOINT_SUFFIXES, DEMO_MODEL, default_options
from ..errors import ClearClipError, InvalidClassesError, WeightsUnavailableError
from ..models import BUNDLED_WEIGHTS, ModelSpec, default_pretrained, is_checkpoint_path
from ..options import SegmentOptions
from ..planes import ImageLayout
from ..progress import Progress
from ..prompts import parse_classes
from ..demo.scenes import DEMO_CLASSES, DEMO_SAMPLE_NAME
from .fields import DEFAULT_CLASSES, build_fields, choose_file_button, restore_values, saved_values
from .job import ModelHolder, segmentation_job
from .layers import ResultLayers, layer_geometry
from .layout import captioned, scrolling, wrapping
from .live import LiveMode
from .settings import load_settings, save_settings

log = logging.getLogger(__name__)
DEMO_NOTE = ("The offline demo model knows only coloured shapes on grey (red, green, blue, yellow, background), "
             "as in File > Open Sample > Synthetic shapes; on other images its labels mean nothing.")
NO_CLASSES = "No classes: type at least one class in Classes, one per line (e.g. 'cell, nucleus' and 'background')."


class ClearClipWidget(Container):
    """Type the classes, press Run, correct the Labels layer by hand."""

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__(labels=False)
        self._viewer = napari_viewer
        self._models = ModelHolder()
        self._worker = None
        self._progress = None
        self._closed = False
        self._writing = False  # set while the widget adds its own layers, which the Image field must not follow
        saved = load_settings()

        fields = build_fields(self)
        self.choose_weights = choose_file_button()
        weights_row = Container(name="weights_row", label="Weights", layout="horizontal", labels=False,
                                widgets=[fields["pretrained"], self.choose_weights])
        weights_row.native.layout().setContentsMargins(0, 0, 0, 0)
        self.show_advanced = CheckBox(name="show_advanced", text="Advanced options", value=False)
        sections = {name: [fields[f.name] for f in _fields_of(name)] for name in ("corrections", "output", "advanced")}
        self.advanced = Container(name="advanced", label=" ", widgets=sections["advanced"], visible=False)
        self.run_button = PushButton(name="run_button", text="Run")
        self.cancel_button = PushButton(name="cancel_button", text="Cancel", enabled=False)
        self.buttons = Container(name="buttons", label=" ", layout="horizontal", labels=False,
                                 widgets=[self.run_button, self.cancel_button])
        self.status = wrapping(Label(name="status", value="Ready"))
        self.use_demo = PushButton(name="use_demo", text="Use the offline demo model", visible=False)
        self.legend = wrapping(Label(name="legend", value=""), rich=True)
        inputs = [fields[f.name] for f in _fields_of("input") if f.name != "pretrained"]
        model_at = [w.name for w in inputs].index("model") + 1
        inputs.insert(model_at, weights_row)
        self.form = Container(name="form", labels=True, widgets=[
            *inputs, *sections["corrections"], *sections["output"], self.show_advanced, self.advanced, self.buttons,
            captioned("status_box", "Status", self.status), self.use_demo, captioned("legend_box", "Legend", self.legend)])
        self.scroll_area = scrolling(self.form)
        self.native.layout().addWidget(self.scroll_area)
        self.native.layout().setContentsMargins(0, 0, 0, 0)

        self.results = ResultLayers(napari_viewer, on_painted=self._on_painted, busy=lambda: self.busy)
        self.live_mode = LiveMode(enabled=lambda: self.live.value and not self._closed, busy=lambda: self.busy,
                                  ready=self._classes_ready, start=lambda: self.run())
        self.model.changed.connect(self._on_model_changed)
        self.choose_weights.changed.connect(self.choose_weights_file)
        self.image.changed.connect(self._on_image_changed)
        self.channel_axis.changed.connect(self._on_channel_axis_changed)
        self.show_advanced.changed.connect(lambda on: setattr(self.advanced, "visible", on))
        self.resize.changed.connect(lambda on: setattr(self.short_side, "enabled", on))
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.use_demo.changed.connect(self.switch_to_demo_model)
        # every keystroke (magicgui's own "changed" of a TextEdit waits for the focus to leave)
        self.classes.native.textChanged.connect(self.live_mode.trigger)
        self._viewer.layers.events.inserted.connect(self._on_layer_inserted)
        self._viewer.layers.events.removed.connect(self._on_layer_removed)
        self.native.destroyed.connect(lambda *_: self.close_down())
        self._restore(saved)
        self._refresh_layers()

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

    def close_down(self) -> None:
        """Stop a running worker and drop every connection and reference to the viewer's layers.

        Safe to call more than once, and from Qt's ``destroyed`` when Qt has already deleted
        the widget's timers: nothing here raises.
        """
        if self.__dict__.get("_closed", True):  # already closed, or being garbage-collected
            return
        self._closed = True
        for emitter, callback in ((self._viewer.layers.events.inserted, self._on_layer_inserted),
                                  (self._viewer.layers.events.removed, self._on_layer_removed)):
            try:
                emitter.disconnect(callback)
            except (TypeError, ValueError, RuntimeError):
                pass
        for part in (self.live_mode, self.results):
            try:
                part.close()
            except RuntimeError:
                pass
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
        if self._progress is not None:
            try:
                self._progress.close()
            except RuntimeError:
                pass
            self._progress = None
        self._models = ModelHolder()

    # -- choices and field logic --------------------------------------------------------------
    def _image_choices(self, widget=None):
        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, Image)]

    def _channel_axis_choices(self, widget=None):
        layer = self.image.value if hasattr(self, "image") else None
        choices = [("none (grey or RGB)", None)]
        if layer is not None and not layer.rgb and layer.ndim >= 3:
            choices += [(f"axis {axis} ({layer.data.shape[axis]})", axis) for axis in range(layer.ndim - 2)]
        return choices

    def _on_layer_inserted(self, event=None):
        layer = getattr(event, "value", None)
        self.image.reset_choices()
        if isinstance(layer, Image) and not self._writing:
            self.image.value = layer  # follow the image the user just opened
        self._refresh_layers()

    def _on_layer_removed(self, event=None):
        self.results.forget_removed()
        self._refresh_layers()

    def _refresh_layers(self, event=None):
        previous = self.image.value
        self.image.reset_choices()
        if self.image.value is None and self.image.choices:
            self.image.value = self.image.choices[-1]
        if self.image.value is not previous:
            self._on_image_changed()

    def _on_image_changed(self, *_):
        """Show only the rows that apply to this image (channels for multichannel data, slices for stacks)."""
        self.channel_axis.reset_choices()
        self._on_channel_axis_changed()
        layer = self.image.value
        stacked = layer is not None and (layer.ndim - (0 if self.channel_axis.value is None else 1)) > 2
        self.scope.visible = stacked
        self.legend.value = ""  # the legend describes the last result of the previous image
        if layer is not None and layer.name == DEMO_SAMPLE_NAME and self.classes.value.strip() == DEFAULT_CLASSES:
            self.classes.value = DEMO_CLASSES

    def _on_channel_axis_changed(self, *_):
        axis = self.channel_axis.value
        layer = self.image.value
        has_channels = axis is not None and layer is not None
        self.channel.visible = has_channels
        self.channel_axis.visible = layer is not None and not layer.rgb and layer.ndim >= 3
        if has_channels:
            self.channel.max = max(0, layer.data.shape[axis] - 1)

    def _on_model_changed(self, name: str):
        # a weights file the user picked stays (it is usually picked to go with the model), except for
        # models that ship their own weights
        if name in BUNDLED_WEIGHTS or not self.pretrained.value or not is_checkpoint_path(self.pretrained.value):
            try:
                self.pretrained.value = default_pretrained(name)
            except ClearClipError:
                self.pretrained.value = ""
        options = default_options(name)
        self.crop.value, self.stride.value = options["crop"], options["stride"]
        self.resize.value = options["short_side"] is not None
        if options["short_side"] is not None:
            self.short_side.value = options["short_side"]
        tags = open_clip.list_pretrained_tags_by_model(name)
        self.pretrained.tooltip = ("Bundled demo weights" if name in BUNDLED_WEIGHTS else
                                   f"Known tags: {', '.join(tags) or 'none'}; or a local weights file")
        self.use_demo.visible = False
        if hasattr(self, "live_mode"):
            self.live_mode.pending = False
        if name == DEMO_MODEL:
            if self.classes.value.strip() == DEFAULT_CLASSES:
                self.classes.value = DEMO_CLASSES
            self._set_status(DEMO_NOTE)

    def choose_weights_file(self, *_) -> None:
        """Pick a local weights file for the Weights field."""
        from qtpy.QtWidgets import QFileDialog

        patterns = " ".join(f"*{suffix}" for suffix in CHECKPOINT_SUFFIXES)
        path, _ = QFileDialog.getOpenFileName(self.native, "Choose a weights file", "", f"Weights ({patterns})")
        if path and os.path.isfile(path):
            self.pretrained.value = path

    def switch_to_demo_model(self, *_):
        """The one-click way out when CLIP weights cannot be downloaded."""
        self.model.value = DEMO_MODEL
        self._on_model_changed(DEMO_MODEL)

    def _restore(self, saved: dict) -> None:
        self._on_model_changed(self.model.value)
        restore_values(self, saved)
        self.status.value = "Ready"

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
        )

    def model_spec(self) -> ModelSpec:
        """Which model the fields name (the same identity the engine's batches use)."""
        return ModelSpec(self.model.value, self.pretrained.value or None, self.method.value, self.device.value,
                         self.precision.value)

    # -- live mode ----------------------------------------------------------------------------
    def _on_painted(self, event=None):
        self.live_mode.trigger()

    def _classes_ready(self) -> bool:
        try:
            parse_classes(self.classes.value)
        except ClearClipError:
            return False  # half-typed class list: wait for the next change
        return True

    # -- running ------------------------------------------------------------------------------
    def run(self, *_):
        """Start a segmentation in a thread worker and return the worker (None if the input is invalid)."""
        if self._worker is not None:
            self._set_status("A run is already going: cancel it first.")
            return None
        layer = self.image.value
        try:
            if layer is None:
                raise ClearClipError("No image: open an image layer (File > Open, or File > Open Sample) first.")
            if not self.classes.value.strip():
                raise InvalidClassesError(NO_CLASSES)
            classes = parse_classes(self.classes.value)
            data = layer.data[0] if layer.multiscale else layer.data  # full resolution of a pyramid
            layout = ImageLayout(tuple(data.shape), rgb=layer.rgb, channel_axis=self.channel_axis.value,
                                 channel=self.channel.value)
            # segment what the user sees
            options = self.options().replace(contrast_limits=tuple(float(v) for v in layer.contrast_limits))
        except ClearClipError as exc:
            self._show_error(exc)
            return None
        planes = layout.planes()
        if self.scope.value == "current slice" and len(planes) > 1:
            planes = [layout.plane_of_point(layer.world_to_data(self._viewer.dims.point))]
        save_settings(self.settings())
        class_texts = [", ".join(c.synonyms) for c in classes]
        target = self._choose_target(layer, layout)
        request = LayerRequest(
            data=data, layout=layout, planes=planes, classes=class_texts, options=options, image_name=layer.name,
            probability_output=self.probability_output.value,
        )
        if target is not None:
            current = target.layer.data
            request.current, request.baseline, request.baseline_names = current, target.baseline, target.names
            request.found = {plane: np.array(current[plane], copy=True) for plane in planes}
            request.learn_from_edits = self.learn.value and self.keep_edits.value
            request.edited = target.edited
        for name in probability_layer_names(layer.name, request.probability_output, [c.name for c in classes]):
            if name in self._viewer.layers:
                request.existing_maps[name] = self._viewer.layers[name].data
        new_layer = None if target is not None else {"name": f"{layer.name} classes",
                                                      **layer_geometry(layer, layout)}
        worker = create_worker(segmentation_job, self._models, self.model_spec(), request, new_layer,
                               _start_thread=False, _ignore_errors=True)
        context = {"layer": layer, "layout": layout, "target": target, "model": self.model.value,
                   "demo_scene": self.model.value == DEMO_MODEL and _looks_like_demo_scene(data, layout, planes[0])}
        worker.yielded.connect(self._on_yielded)
        worker.returned.connect(lambda value: self._on_returned(value, context))
        worker.errored.connect(self._on_errored)
        worker.aborted.connect(lambda: self._set_status("Cancelled: nothing was changed."))
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._progress = progress(total=1000, desc="ClearCLIP")
        self.run_button.enabled = False
        self.cancel_button.enabled = True
        self.use_demo.visible = False
        self._set_status(f"Starting on {layer.name} ({len(planes)} slice{'s' if len(planes) > 1 else ''})...")
        # start from the event loop, so that a caller can connect to the returned worker's signals first
        QTimer.singleShot(0, worker.start)
        return worker

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
        if self._worker is not None:
            self._set_status("Cancelling after the current batch...")
            self._worker.quit()

    def _set_status(self, text: str, error: bool = False):
        if self._closed:
            return
        self.status.value = text
        if error:
            show_error(text)

    def _show_error(self, exc: BaseException) -> None:
        """An engine error in the widget's terms; the legend of an earlier result no longer applies."""
        self.legend.value = ""
        if isinstance(exc, WeightsUnavailableError):
            model = exc.model or self.model.value
            text = (f"The {model} weights ('{exc.tag or self.pretrained.value}') are not on this computer and cannot be "
                    "downloaded now (no network). Choose a weights file with Weights > Choose file..."
                    f"{' (for OpenAI weights, with model ' + model + '-quickgelu)' if exc.tag == 'openai' else ''}, "
                    "or click the button below to try the offline demo model.")
            self.use_demo.visible = True
            self._set_status(text, error=True)
        elif isinstance(exc, ClearClipError):
            self._set_status(str(exc), error=True)
        else:
            log.error("ClearCLIP run failed", exc_info=exc)
            self._set_status(f"Unexpected error ({type(exc).__name__}: {exc}). Nothing was changed.", error=True)

    def _on_yielded(self, step):
        if self._closed or not isinstance(step, Progress):
            return
        self._set_status(step.message)
        if self._progress is not None:
            self._progress.update(int(step.fraction * 1000) - self._progress.n)

    def _on_errored(self, exc):
        if not self._closed:
            self._show_error(exc)

    def _on_finished(self):
        self._worker = None
        self.results.run_finished()
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        if not self._closed:
            self.run_button.enabled = True
            self.cancel_button.enabled = False
            self.live_mode.run_finished()

    def _on_returned(self, value, context):
        if self._closed:
            return
        result, prepared_layer = value
        if result is None:
            return
        self._writing = True
        try:
            labels_layer, kept = self.results.write(context, result.update, prepared_layer)
            self.results.write_maps(context, result.maps)
        finally:
            self._writing = False
        update = result.update
        self._update_legend(update.names, update.counts, update.colours)
        note = f"; kept {kept} edited pixels" if kept else ""
        planes = result.planes
        text = f"Done: {labels_layer.name} ({planes} slice{'s' if planes > 1 else ''}){note}."
        if context["model"] == DEMO_MODEL and not context["demo_scene"]:
            text += " " + DEMO_NOTE  # keyed to what the image is, not to its name
        for extra in result.notes:
            text += " Note: " + extra
        self._set_status(text)

    def _update_legend(self, names: list[str], counts: np.ndarray, colours: dict):
        total = max(1, int(counts.sum()))
        rows = []
        for index, name in enumerate(names, start=1):
            share = counts[index] / total * 100 if index < len(counts) else 0.0
            colour = colours.get(index, "#c8c8c8")
            swatch = ('<span style="color:gray">&#9633;</span>' if colour == "transparent" else
                      f'<span style="color:{colour}">&#9632;</span>')
            rows.append(f'{swatch} {index}: {html.escape(name)} <span style="color:gray">({share:.0f}%)</span>')
        self.legend.value = "<br>".join(rows)


def _looks_like_demo_scene(data, layout: ImageLayout, plane: tuple) -> bool:
    """Whether the image is the demo model's kind (coloured shapes on grey), from a small strided sample."""
    from ..demo.scenes import looks_like_demo_scene

    try:
        image = data[layout.image_index(plane)]
        step = max(1, max(image.shape[:2]) // 128)
        return looks_like_demo_scene(np.asarray(image[::step, ::step]))
    except Exception:  # a lazy array that cannot be sampled cheaply: say the note
        return False


def _fields_of(section: str):
    from .fields import FIELDS

    return [field for field in FIELDS if field.section == section]
