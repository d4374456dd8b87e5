"""The napari dock widget: collects parameters, runs the engine in a thread worker, shows the result.

All computation lives in the engine (``Segmenter``, ``segment_layer``, the labels
merger); this module only wires it to napari. The GUI thread sets layers and text,
nothing more: merging, reducing and colouring happen in the worker.
"""

from __future__ import annotations

import html
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import open_clip
import torch
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    LineEdit,
    PushButton,
    SpinBox,
    TextEdit,
)

import napari
from qtpy.QtCore import QEvent, QObject, QTimer
from qtpy.QtWidgets import QFrame, QScrollArea, QSizePolicy
from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.colormaps import DirectLabelColormap
from napari.utils.notifications import show_error, show_info

from .annotate import PROBABILITY_OUTPUTS, LayerRequest, probability_layer_names, segment_layer
from .editing import apply_update
from .errors import ClearClipError, WeightsUnavailableError
from .choices import COMMON_MODELS, DEMO_MODEL, METHOD_DESCRIPTIONS, METHOD_NAMES
from .options import SNAP_IN_TOOLS, SegmentOptions
from .models import BUNDLED_WEIGHTS, default_options, default_pretrained, is_checkpoint_path, segmentable_models
from .planes import ImageLayout
from .progress import Progress
from .prompts import parse_classes
from .segmenter import Segmenter
from .settings import load_settings, save_settings
from .synthetic import DEMO_CLASSES, DEMO_SAMPLE_NAME

log = logging.getLogger(__name__)
DEFAULT_CLASSES = "cell, nucleus\nbackground"
SCOPES = ("current slice", "all slices")
LIVE_DELAY_MS = 300   # live re-runs wait this long after the last stroke or keystroke
STATUS_LINES = 6      # the status box is this many lines high, whatever it says (longer messages scroll)
LEGEND_LINES = 7      # and so is the legend
DEMO_NOTE = ("The offline demo model knows only coloured shapes on grey (red, green, blue, yellow, background), "
             "as in File > Open Sample > Synthetic shapes; on other images its labels mean nothing.")


def model_choices(widget=None) -> list[tuple[str, str]]:
    """Common CLIP ViTs first, the offline demo, then every other model ClearCLIP can run on."""
    usable = segmentable_models()
    first = [(m, m) for m in COMMON_MODELS if m in usable]
    demo = [(f"{DEMO_MODEL} (offline demo)", DEMO_MODEL)] if DEMO_MODEL in usable else []
    rest = [(m, m) for m in usable if m not in COMMON_MODELS and m != DEMO_MODEL]
    return first + demo + rest


def device_choices(widget=None) -> list[str]:
    choices = ["auto", "cpu"]
    if torch.cuda.is_available():
        choices.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        choices.append("mps")
    return choices


def _wrapping(label: Label, rich: bool = False) -> Label:
    """A label whose text wraps inside the dock and never widens it, however long the message."""
    native = label.native
    native.setWordWrap(True)
    policy = QSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Minimum)
    policy.setHeightForWidth(True)
    native.setSizePolicy(policy)
    native.setMinimumWidth(1)
    from qtpy.QtCore import Qt

    native.setTextFormat(Qt.TextFormat.RichText if rich else Qt.TextFormat.PlainText)
    return label


class _FitToWidth(QObject):
    """Keeps a wrapping label in a scroll box exactly as tall as its text at the box's width."""

    def __init__(self, box: QScrollArea, label):
        super().__init__(box)
        self._box, self._label = box, label
        self._fitted = None                       # (text, width) of the last fit
        box.viewport().installEventFilter(self)

    def eventFilter(self, watched, event) -> bool:
        if event.type() in (QEvent.Type.Resize, QEvent.Type.LayoutRequest):
            self.fit()
        return False

    def fit(self) -> None:
        label, width = self._label, self._box.viewport().width()
        if self._fitted == (label.text(), width):
            return
        self._fitted = (label.text(), width)
        label.setMinimumHeight(0)                 # measure the text alone, not the height set last time
        label.setMaximumHeight(16777215)
        label.setFixedHeight(max(1, label.heightForWidth(width)))


def _in_fixed_box(label: Label, lines: int) -> QScrollArea:
    """Put a wrapping label (already in its container) in a scroll box ``lines`` high, so no text changes the dock's size."""
    from qtpy.QtCore import Qt

    native = label.native
    row = native.parentWidget().layout()
    box = QScrollArea()
    box.setWidgetResizable(True)
    box.setFrameShape(QFrame.Shape.NoFrame)
    box.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    box.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
    box.setFixedHeight(native.fontMetrics().lineSpacing() * lines + 6)
    box.setMinimumWidth(1)
    row.replaceWidget(native, box)
    box.setWidget(native)
    native.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop)
    box._fit = _FitToWidth(box, native)
    return box


@dataclass
class _Output:
    """What the widget remembers of a Labels layer it wrote, to recognise the user's edits."""

    layer: Labels
    baseline: np.ndarray
    names: list[str] = field(default_factory=list)
    colours: dict = field(default_factory=dict)
    edited: np.ndarray | None = None  # every pixel the user has painted (kept on every run)


class ClearClipWidget(Container):
    """Type the classes, press Run, correct the Labels layer by hand."""

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self._viewer = napari_viewer
        self._segmenter: Segmenter | None = None
        self._worker = None
        self._progress = None
        self._closed = False
        self._writing = False  # set while the widget adds its own layers, which the Image field must not follow
        self._outputs: dict[str, _Output] = {}  # by layer unique id (plugins see layers through proxies)
        self._undone: dict[str, np.ndarray] = {}  # pixels undone while a run was computing, by layer
        self._redone: dict[str, np.ndarray] = {}  # pixels redone while a run was computing, by layer
        saved = load_settings()

        self.image = ComboBox(name="image", label="Image", choices=self._image_choices, nullable=True,
                              tooltip="The image layer to segment (follows the newest opened image)")
        self.channel_axis = ComboBox(name="channel_axis", label="Channel axis", choices=self._channel_axis_choices,
                                     tooltip="For multichannel images: the axis that holds the channels")
        self.channel = SpinBox(name="channel", label="Channel", min=0, max=0, tooltip="Which channel to segment")
        self.classes = TextEdit(name="classes", label="Classes", value=saved.get("classes", DEFAULT_CLASSES),
                                tooltip="One class per line; commas separate synonyms, e.g. 'cell, nucleus'")
        self.model = ComboBox(name="model", label="Model", choices=model_choices,
                              tooltip="The CLIP model: ViT-B-16 is the paper's; larger ViTs are slower. "
                                      "synthetic-tiny works offline but knows only coloured shapes")
        self.pretrained = LineEdit(name="pretrained", label="Weights",
                                   tooltip="An open_clip pretrained tag (downloaded once, then cached) or a checkpoint file")
        self.checkpoint = FileEdit(name="checkpoint", label="Checkpoint", mode="r",
                                   filter="Checkpoints (*.pt *.pth *.bin *.ckpt *.safetensors)",
                                   tooltip="A local weights file (torch.save(model.state_dict(), path)), for use without "
                                           "a network. For OpenAI weights choose the model's -quickgelu variant")
        self.method = ComboBox(name="method", label="Method", choices=list(METHOD_NAMES), value="clearclip",
                               tooltip="\n".join(METHOD_DESCRIPTIONS.values()))
        self.device = ComboBox(name="device", label="Device", choices=device_choices, value="auto",
                               tooltip="auto: the GPU when there is one (CUDA or Apple MPS), else the CPU")
        self.prob_threshold = FloatSpinBox(name="prob_threshold", label="Background threshold", min=0.0, max=1.0,
                                           step=0.05, value=0.0,
                                           tooltip="Pixels whose best class probability is below this stay unlabelled (0)")
        self.scope = ComboBox(name="scope", label="Slices", choices=list(SCOPES), value="current slice",
                              tooltip="Segment the slice on screen, or every slice of the stack")
        self.keep_edits = CheckBox(name="keep_edits", text="Keep my edits", value=True,
                                   tooltip="Pixels you painted since the last run keep their class")
        self.learn = CheckBox(name="learn", text="Learn from my edits", value=True,
                              tooltip="Pixels you painted with a class teach it: similar regions in the image (and in "
                                      "every slice segmented) change class too. The eraser teaches nothing")
        self.snap = CheckBox(name="snap", text="Snap to edges", value=SNAP_IN_TOOLS,
                             tooltip="Refine the masks along image edges (PAMR, as NACLIP uses it); "
                                     "off gives the paper's exact pipeline")
        self.live = CheckBox(name="live", text="Live", value=False,
                             tooltip="Run again by itself after each paint stroke on the result and after the classes "
                                     "change; only the image features' cache is used, so re-runs are quick")
        self.new_layer = CheckBox(name="new_layer", text="Result in a new layer", value=False,
                                  tooltip="Add a new Labels layer instead of updating the last result of this image")
        self.probability_output = ComboBox(name="probability_output", label="Probabilities",
                                           choices=list(PROBABILITY_OUTPUTS), value="none",
                                           tooltip="Also show probability maps: none, the winning class's probability, "
                                                   "or one map per class (memory grows with the classes)")
        self.show_advanced = CheckBox(name="show_advanced", text="Advanced options", value=False)
        self.resize = CheckBox(name="resize", text="Resize (short side)", value=True,
                               tooltip="Off: segment at native resolution (large images stream in windows)")
        self.short_side = SpinBox(name="short_side", label="Short side", min=8, max=8192, value=448,
                                  tooltip="The image is resized so that its short side has this many pixels (official: 448)")
        self.crop = SpinBox(name="crop", label="Window", min=8, max=4096, value=448,
                            tooltip="Sliding-window size in pixels (official: 448)")
        self.stride = SpinBox(name="stride", label="Stride", min=1, max=4096, value=224,
                              tooltip="Step between windows in pixels; smaller is smoother and slower (official: 224)")
        self.logit_scale = FloatSpinBox(name="logit_scale", label="Logit scale", min=0.1, max=1000.0, value=50.0,
                                        tooltip="Sharpness of the softmax over classes (official: 50); "
                                                "affects probabilities and the background threshold")
        self.precision = ComboBox(name="precision", label="Precision", choices=["auto", "fp32", "bf16", "fp16"],
                                  value="auto", tooltip="auto: fp16 on a GPU, exact fp32 on the CPU; "
                                                        "bf16 is faster on recent CPUs, slightly less exact")
        self.templates = TextEdit(name="templates", label="Templates",
                                  tooltip="One prompt template per line with {} for the class; empty = the 80 ImageNet templates")
        self.advanced = Container(name="advanced", label=" ", widgets=[
            self.resize, self.short_side, self.crop, self.stride, self.logit_scale, self.precision, self.templates],
            visible=False)
        self.run_button = PushButton(name="run_button", text="Run")
        self.cancel_button = PushButton(name="cancel_button", text="Cancel", enabled=False)
        self.buttons = Container(name="buttons", label=" ", layout="horizontal", labels=False,
                                 widgets=[self.run_button, self.cancel_button])
        self.status = _wrapping(Label(name="status", label="Status", value="Ready"))
        self.use_demo = PushButton(name="use_demo", text="Use the offline demo model", visible=False)
        self.legend = _wrapping(Label(name="legend", label="Legend", value=""), rich=True)
        self.extend([self.image, self.channel_axis, self.channel, self.classes, self.model, self.pretrained,
                     self.checkpoint, self.method, self.device, self.prob_threshold, self.scope, self.keep_edits,
                     self.learn, self.snap, self.live, self.new_layer, self.probability_output, self.show_advanced, self.advanced, self.buttons,
                     self.status, self.use_demo, self.legend])
        self._status_box = _in_fixed_box(self.status, STATUS_LINES)
        self._legend_box = _in_fixed_box(self.legend, LEGEND_LINES)

        self.model.changed.connect(self._on_model_changed)
        self.checkpoint.changed.connect(self._on_checkpoint_chosen)
        self.image.changed.connect(self._on_image_changed)
        self.channel_axis.changed.connect(self._on_channel_axis_changed)
        self.show_advanced.changed.connect(lambda on: setattr(self.advanced, "visible", on))
        self.resize.changed.connect(lambda on: setattr(self.short_side, "enabled", on))
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.use_demo.changed.connect(self.switch_to_demo_model)
        self._pending = False                      # a live re-run asked for while one is running
        self._live_timer = QTimer()
        self._live_timer.setSingleShot(True)
        self._live_timer.setInterval(LIVE_DELAY_MS)
        self._live_timer.timeout.connect(self._live_run)
        # every keystroke (magicgui's own "changed" of a TextEdit waits for the focus to leave)
        self.classes.native.textChanged.connect(self._on_live_trigger)
        self._viewer.layers.events.inserted.connect(self._on_layer_inserted)
        self._viewer.layers.events.removed.connect(self._on_layer_removed)
        self.native.destroyed.connect(lambda *_: self.close_down())
        self._restore(saved)
        self._refresh_layers()

    # -- lifetime -----------------------------------------------------------------------------
    def close_down(self) -> None:
        """Stop a running worker and drop every connection and reference to the viewer's layers."""
        if self.__dict__.get("_closed", True):  # already closed, or being garbage-collected
            return
        self._closed = True
        for emitter, callback in ((self._viewer.layers.events.inserted, self._on_layer_inserted),
                                  (self._viewer.layers.events.removed, self._on_layer_removed)):
            try:
                emitter.disconnect(callback)
            except (TypeError, ValueError, RuntimeError):
                pass
        self._live_timer.stop()
        for output in self._outputs.values():
            _disconnect_paint(output.layer, self._on_painted)
        worker, self._worker = self._worker, None
        if worker is not None:
            for signal in (worker.yielded, worker.returned, worker.errored, worker.aborted, worker.finished):
                try:
                    signal.disconnect()
                except (TypeError, RuntimeError):
                    pass
            worker.quit()
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        self._outputs.clear()
        self._segmenter = None

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
        live = {_layer_key(layer) for layer in self._viewer.layers}
        for key in [k for k in self._outputs if k not in live]:
            _disconnect_paint(self._outputs[key].layer, self._on_painted)
            del self._outputs[key]  # a deleted result layer is forgotten, with its baseline
        self._refresh_layers()

    def _refresh_layers(self, event=None):
        previous = self.image.value
        self.image.reset_choices()
        if self.image.value is None and self.image.choices:
            self.image.value = self.image.choices[-1]
        if self.image.value is not previous:
            self._on_image_changed()

    def _on_image_changed(self, *_):
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
        # a checkpoint the user picked stays (it is usually picked to go with the model), except for
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
                                   f"Known tags: {', '.join(tags) or 'none'}; or a local checkpoint file")
        self.use_demo.visible = False
        if hasattr(self, "_pending"):
            self._pending = False
        if name == DEMO_MODEL:
            if self.classes.value.strip() == DEFAULT_CLASSES:
                self.classes.value = DEMO_CLASSES
            self._set_status(DEMO_NOTE)

    def _on_checkpoint_chosen(self, path):
        if path and os.path.isfile(str(path)):
            self.pretrained.value = str(path)

    def switch_to_demo_model(self, *_):
        """The one-click way out when CLIP weights cannot be downloaded."""
        self.model.value = DEMO_MODEL
        self._on_model_changed(DEMO_MODEL)

    def _restore(self, saved: dict) -> None:
        model_values = [value for _, value in self.model.choices] if self.model.choices and isinstance(self.model.choices[0], tuple) else list(self.model.choices)
        model = saved.get("model", "ViT-B-16")
        self.model.value = model if model in model_values else "ViT-B-16"
        self._on_model_changed(self.model.value)
        if saved.get("pretrained"):
            self.pretrained.value = saved["pretrained"]
        for name in ("method", "device", "precision", "probability_output"):
            widget = getattr(self, name)
            if saved.get(name) in widget.choices:
                widget.value = saved[name]
        for name in ("prob_threshold", "logit_scale", "crop", "stride", "short_side", "keep_edits", "resize", "learn",
                     "snap"):
            if name in saved:
                try:
                    getattr(self, name).value = saved[name]
                except (ValueError, TypeError):
                    pass
        if isinstance(saved.get("templates"), str):
            self.templates.value = saved["templates"]
        self.status.value = "Ready"

    def settings(self) -> dict:
        """The values that persist between sessions."""
        return {
            "classes": self.classes.value, "model": self.model.value, "pretrained": self.pretrained.value,
            "method": self.method.value, "device": self.device.value, "prob_threshold": self.prob_threshold.value,
            "precision": self.precision.value, "probability_output": self.probability_output.value,
            "keep_edits": self.keep_edits.value, "learn": self.learn.value, "snap": self.snap.value,
            "resize": self.resize.value, "short_side": self.short_side.value,
            "crop": self.crop.value, "stride": self.stride.value, "logit_scale": self.logit_scale.value,
            "templates": self.templates.value,
        }

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

    # -- live mode ----------------------------------------------------------------------------
    def _on_live_trigger(self, *_):
        if self.live.value and not self._closed:
            self._live_timer.start()  # restarts the delay: typing or painting on postpones the run

    def _on_painted(self, event=None):
        self._on_live_trigger()

    def _on_history_replayed(self, layer, before: np.ndarray, action: str = "undo") -> None:
        """After an undo on a result, the pixels it restored are the model's again, not edits to learn from;
        after a redo, the stroke it brought back is the user's again: kept, and teaching."""
        output = self._outputs.get(_layer_key(layer))
        if output is None or self._closed:
            return
        data = np.asarray(layer.data)
        if data.shape != before.shape or data.shape != output.baseline.shape:
            return
        changed = data != before
        if not changed.any():
            return
        if action == "redo":
            _claim_edits(output, changed)
        else:
            _forget_edits(output, changed, data)
        if self._worker is not None:  # the run in flight started from the pixels as they were: redo this on its result
            key = _layer_key(layer)
            mine, other = (self._redone, self._undone) if action == "redo" else (self._undone, self._redone)
            mine[key] = changed | mine[key] if key in mine else changed
            if key in other:
                other[key] = other[key] & ~changed
        self._on_live_trigger()

    def _live_run(self):
        """Run now, or as soon as the run in flight ends (the newest request wins; at most one in flight)."""
        if self._closed or not self.live.value:
            return
        if self._worker is not None:
            self._pending = True
            return
        try:
            parse_classes(self.classes.value)
        except ClearClipError:
            return  # half-typed class list: wait for the next change
        self.run()

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
        model_request = dict(model=self.model.value, pretrained=self.pretrained.value or None,
                             device=self.device.value, precision=self.precision.value)
        new_layer = None if target is not None else {"name": f"{layer.name} classes",
                                                      **self._layer_geometry(layer, layout)}
        worker = create_worker(_segmentation_job, self._segmenter, model_request, self.method.value, request,
                               new_layer, _start_thread=False, _ignore_errors=True)
        context = {"layer": layer, "layout": layout, "target": target, "model": self.model.value}
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

    def _choose_target(self, layer: Image, layout: ImageLayout) -> _Output | None:
        """The Labels layer this run updates, or None for a new one."""
        if self.new_layer.value:
            return None
        target = self._target_output(layer, layout)
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
                    "downloaded now (no network). Choose a weights file in the Checkpoint field"
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
        self._undone.clear()  # applied to the run's result, or the run left the layer as it was
        self._redone.clear()
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        if not self._closed:
            self.run_button.enabled = True
            self.cancel_button.enabled = False
            if self._pending:
                self._pending = False
                QTimer.singleShot(0, self._live_run)

    def _on_returned(self, value, context):
        if self._closed:
            return
        segmenter, result, prepared_layer = value
        self._segmenter = segmenter
        if result is None:
            return
        self._writing = True
        try:
            labels_layer, kept = self._write_labels(context, result, prepared_layer)
            self._write_probabilities(context, result)
        finally:
            self._writing = False
        update = result.update
        self._update_legend(update.names, update.counts, update.colours)
        note = f"; kept {kept} edited pixels" if kept else ""
        planes = result.planes
        text = f"Done: {labels_layer.name} ({planes} slice{'s' if planes > 1 else ''}){note}."
        for extra in result.notes:
            text += " Note: " + extra
        if context["model"] == DEMO_MODEL and context["layer"].name != DEMO_SAMPLE_NAME:
            text += " " + DEMO_NOTE
        self._set_status(text)

    # -- output layers ------------------------------------------------------------------------
    def _layer_geometry(self, layer: Image, layout: ImageLayout) -> dict:
        scale, translate = list(layer.scale), list(layer.translate)
        if layout.channel_axis is not None:
            del scale[layout.channel_axis], translate[layout.channel_axis]
        return {"scale": scale, "translate": translate}

    def _target_output(self, layer: Image, layout: ImageLayout) -> _Output | None:
        name = f"{layer.name} classes"
        live = {_layer_key(layer) for layer in self._viewer.layers}
        for key, output in self._outputs.items():
            if output.layer.name == name and key in live and output.layer.data.shape == layout.label_shape:
                return output
        return None

    def _write_labels(self, context, result, prepared_layer=None):
        """Set the merged labels: in place into the layer the run updated, else as a new layer.

        A new layer comes ready-made from the worker (``prepared_layer``): the GUI thread only adds it.
        """
        update = result.update
        layer, layout, target = context["layer"], context["layout"], context["target"]
        features = labels_features(update.names)
        alive = target is not None and _layer_key(target.layer) in {_layer_key(l) for l in self._viewer.layers}
        kept = update.kept_pixels
        if alive:
            labels_layer = target.layer
            data = labels_layer.data
            if isinstance(data, np.ndarray) and data.flags.writeable and data.shape == layout.label_shape:
                kept += apply_update(data, update)
                labels_layer.refresh()
            else:
                fresh = np.array(data, copy=True)
                kept += apply_update(fresh, update)
                labels_layer.data = fresh
            labels_layer.features = features
            if target.colours != update.colours:  # setting a colormap is costly: only when a class changed
                labels_layer.colormap = DirectLabelColormap(color_dict=update.colours)
        elif prepared_layer is not None:
            # added hidden (nothing to slice or upload yet), shown on the next turn of the event loop:
            # the insertion and the first draw of a large layer are two short steps, not one long one
            labels_layer = self._viewer.add_layer(prepared_layer)
            QTimer.singleShot(0, lambda: _show(labels_layer))
        else:  # the layer this run was updating was deleted meanwhile
            data = update.full if update.full is not None else update.baseline.copy()
            labels_layer = self._viewer.add_labels(
                data, name=f"{layer.name} classes", features=features,
                colormap=DirectLabelColormap(color_dict=update.colours), **self._layer_geometry(layer, layout))
        key = _layer_key(labels_layer)
        if key not in self._outputs:
            labels_layer.events.paint.connect(self._on_painted)
            _watch_undo(labels_layer, self._on_history_replayed)
        self._outputs[key] = _Output(labels_layer, update.baseline, update.names, update.colours, update.edited)
        undone = self._undone.pop(key, None)
        if undone is not None and undone.shape == update.baseline.shape:
            _forget_edits(self._outputs[key], undone, np.asarray(labels_layer.data))
        redone = self._redone.pop(key, None)
        if redone is not None and redone.shape == update.baseline.shape:
            _claim_edits(self._outputs[key], redone)
        return labels_layer, kept

    def _write_probabilities(self, context, result):
        layer, layout = context["layer"], context["layout"]
        for name, volume in result.maps.items():
            existing = self._viewer.layers[name] if name in self._viewer.layers else None
            if existing is not None and getattr(existing, "data", None) is not None and existing.data.shape == volume.shape:
                existing.data = volume
            else:
                self._viewer.add_image(volume, name=name, colormap="viridis", contrast_limits=(0, 1),
                                       blending="additive", visible=False, **self._layer_geometry(layer, layout))

    def _update_legend(self, names: list[str], counts: np.ndarray, colours: dict):
        total = max(1, int(counts.sum()))
        rows = []
        for index, name in enumerate(names, start=1):
            share = counts[index] / total * 100 if index < len(counts) else 0.0
            rows.append(f'<span style="color:{colours.get(index, "#c8c8c8")}">&#9632;</span> {index}: '
                        f'{html.escape(name)} <span style="color:gray">({share:.0f}%)</span>')
        self.legend.value = "<br>".join(rows)


def _show(layer) -> None:
    try:
        layer.visible = True
    except RuntimeError:  # the viewer closed meanwhile
        pass


def _forget_edits(output: _Output, pixels: np.ndarray, data: np.ndarray) -> None:
    """These pixels hold the model's answer, not the user's: no longer edits to keep or learn from."""
    output.baseline = output.baseline.copy()  # a run in flight may be reading the old arrays
    output.baseline[pixels] = data[pixels]
    if output.edited is not None:
        output.edited = output.edited & ~pixels


def _claim_edits(output: _Output, pixels: np.ndarray) -> None:
    """These pixels hold what the user painted (a redone stroke): edits to keep and learn from."""
    edited = np.zeros(output.baseline.shape, dtype=bool) if output.edited is None else output.edited.copy()
    edited |= pixels  # a copy: a run in flight may be reading the old mask
    output.edited = edited


def _watch_undo(layer, callback) -> None:
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


def _disconnect_paint(layer, callback) -> None:
    try:
        layer.events.paint.disconnect(callback)
    except (TypeError, ValueError, RuntimeError, AttributeError):
        pass
    for name in ("undo", "redo"):  # napari's own methods again
        vars(layer).pop(name, None)


def _layer_key(layer) -> str:
    return str(getattr(layer, "unique_id", None) or id(layer))


def labels_features(names: list[str]) -> dict:
    return {"index": np.arange(len(names) + 1), "class": ["unassigned"] + list(names)}


def _segmentation_job(segmenter, request, method, layer_request: LayerRequest, new_layer: dict | None = None):
    """Worker body: load (or reuse) the model, segment and merge plane by plane (yielding progress),
    and build the new Labels layer, if one is to be added, so that the GUI thread only inserts it."""
    key = (request["model"], request["pretrained"], request["device"], request["precision"])
    if segmenter is None or getattr(segmenter, "_request_key", None) != key:
        yield Progress("loading", 0, 1, detail=f"Loading {request['model']} "
                                                f"({request['pretrained'] or 'default weights'})...")
        segmenter = Segmenter(request["model"], request["pretrained"], method=method, device=request["device"],
                              precision=request["precision"])
        segmenter._request_key = key
    segmenter.method = method
    result = yield from segment_layer(segmenter, layer_request)
    _preload_layer_modules()
    layer = None
    if new_layer is not None and result.update.full is not None:
        update = result.update
        layer = Labels(update.full, features=labels_features(update.names),
                       colormap=DirectLabelColormap(color_dict=update.colours), visible=False, **new_layer)
    return segmenter, result, layer


def _preload_layer_modules() -> None:
    """Import here, in the worker, what napari imports lazily the first time a Labels layer with
    features is added (pandas, scikit-image's colour module: about 0.8 s), so the GUI thread does not."""
    import pandas  # noqa: F401
    import skimage.color  # noqa: F401
