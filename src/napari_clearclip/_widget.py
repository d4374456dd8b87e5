"""The napari dock widget: collects parameters, runs the engine in a thread worker, shows the result.

All computation lives in the engine (``Segmenter``, ``segment_planes``,
``merge_keeping_edits``); this module only wires it to napari.
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
from qtpy.QtCore import QTimer
from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.colormaps import DirectLabelColormap
from napari.utils.notifications import show_error, show_info

from .editing import class_colour, merge_keeping_edits
from .errors import ClearClipError
from .methods import METHODS
from .models import BUNDLED_WEIGHTS, default_options, default_pretrained, is_checkpoint_path
from .planes import ImageLayout, PlaneProgress, segment_planes
from .prompts import parse_classes
from .segmenter import Segmenter
from .settings import load_settings, save_settings

log = logging.getLogger(__name__)
COMMON_MODELS = ("ViT-B-16", "ViT-B-32", "ViT-L-14", "ViT-L-14-336", "ViT-B-16-quickgelu")
DEMO_MODEL = "synthetic-tiny"
DEFAULT_CLASSES = "cell, nucleus\nbackground"
SCOPES = ("current slice", "all slices")
PROBABILITY_OUTPUTS = ("none", "winning class", "all classes")


def model_choices(widget=None) -> list[tuple[str, str]]:
    """Common CLIP ViTs first, the offline demo, then every other ViT config open_clip knows."""
    def is_vit(name: str) -> bool:
        vision = (open_clip.get_model_config(name) or {}).get("vision_cfg", {})
        return "timm_model_name" not in vision and not isinstance(vision.get("layers"), (list, tuple)) and "hf_model_name" not in (open_clip.get_model_config(name) or {}).get("text_cfg", {})

    known = open_clip.list_models()
    first = [(m, m) for m in COMMON_MODELS if m in known]
    demo = [(f"{DEMO_MODEL} (offline demo)", DEMO_MODEL)] if DEMO_MODEL in known else []
    rest = [(m, m) for m in known if m not in COMMON_MODELS and m != DEMO_MODEL and is_vit(m)]
    return first + demo + rest


def device_choices(widget=None) -> list[str]:
    choices = ["auto", "cpu"]
    if torch.cuda.is_available():
        choices.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        choices.append("mps")
    return choices


@dataclass
class _Output:
    """What the widget remembers of a Labels layer it wrote, to recognise the user's edits."""

    layer: Labels
    baseline: np.ndarray
    names: list[str] = field(default_factory=list)


class ClearClipWidget(Container):
    """Type the classes, press Run, correct the Labels layer by hand."""

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self._viewer = napari_viewer
        self._segmenter: Segmenter | None = None
        self._worker = None
        self._progress = None
        self._outputs: dict[str, _Output] = {}  # by layer unique id (plugins see layers through proxies)
        saved = load_settings()

        self.image = ComboBox(name="image", label="Image", choices=self._image_choices, nullable=True)
        self.channel_axis = ComboBox(name="channel_axis", label="Channel axis", choices=self._channel_axis_choices,
                                     tooltip="For multichannel images: the axis that holds the channels")
        self.channel = SpinBox(name="channel", label="Channel", min=0, max=0)
        self.classes = TextEdit(name="classes", label="Classes", value=saved.get("classes", DEFAULT_CLASSES),
                                tooltip="One class per line; commas separate synonyms, e.g. 'cell, nucleus'")
        self.model = ComboBox(name="model", label="Model", choices=model_choices)
        self.pretrained = LineEdit(name="pretrained", label="Weights",
                                   tooltip="An open_clip pretrained tag (downloaded once, then cached) or a checkpoint file")
        self.checkpoint = FileEdit(name="checkpoint", label="Checkpoint", mode="r",
                                   filter="Checkpoints (*.pt *.pth *.bin *.ckpt *.safetensors)")
        self.method = ComboBox(name="method", label="Method", choices=list(METHODS), value="clearclip")
        self.device = ComboBox(name="device", label="Device", choices=device_choices, value="auto")
        self.prob_threshold = FloatSpinBox(name="prob_threshold", label="Background threshold", min=0.0, max=1.0,
                                           step=0.05, value=0.0,
                                           tooltip="Pixels whose best class probability is below this stay unlabelled (0)")
        self.scope = ComboBox(name="scope", label="Slices", choices=list(SCOPES), value="current slice")
        self.keep_edits = CheckBox(name="keep_edits", text="Keep my edits", value=True,
                                   tooltip="Pixels you painted since the last run keep their class")
        self.new_layer = CheckBox(name="new_layer", text="Result in a new layer", value=False)
        self.probability_output = ComboBox(name="probability_output", label="Probabilities",
                                           choices=list(PROBABILITY_OUTPUTS), value="none")
        self.show_advanced = CheckBox(name="show_advanced", text="Advanced options", value=False)
        self.resize = CheckBox(name="resize", text="Resize (short side)", value=True,
                               tooltip="Off: segment at native resolution (large images stream in windows)")
        self.short_side = SpinBox(name="short_side", label="Short side", min=8, max=8192, value=448)
        self.crop = SpinBox(name="crop", label="Window", min=8, max=4096, value=448)
        self.stride = SpinBox(name="stride", label="Stride", min=1, max=4096, value=224)
        self.logit_scale = FloatSpinBox(name="logit_scale", label="Logit scale", min=0.1, max=1000.0, value=50.0)
        self.precision = ComboBox(name="precision", label="Precision", choices=["auto", "fp32", "bf16", "fp16"], value="auto")
        self.templates = TextEdit(name="templates", label="Templates",
                                  tooltip="One prompt template per line with {} for the class; empty = the 80 ImageNet templates")
        self.advanced = Container(name="advanced", widgets=[self.resize, self.short_side, self.crop, self.stride,
                                                            self.logit_scale, self.precision, self.templates],
                                  visible=False)
        self.run_button = PushButton(name="run_button", text="Run")
        self.cancel_button = PushButton(name="cancel_button", text="Cancel", enabled=False)
        self.buttons = Container(name="buttons", label=" ", layout="horizontal", labels=False,
                                 widgets=[self.run_button, self.cancel_button])
        self.status = Label(name="status", label="Status", value="Ready")
        self.legend = Label(name="legend", label="Legend", value="")
        self.extend([self.image, self.channel_axis, self.channel, self.classes, self.model, self.pretrained,
                     self.checkpoint, self.method, self.device, self.prob_threshold, self.scope, self.keep_edits,
                     self.new_layer, self.probability_output, self.show_advanced, self.advanced, self.buttons,
                     self.status, self.legend])

        self.model.changed.connect(self._on_model_changed)
        self.checkpoint.changed.connect(self._on_checkpoint_chosen)
        self.image.changed.connect(self._on_image_changed)
        self.channel_axis.changed.connect(self._on_channel_axis_changed)
        self.show_advanced.changed.connect(lambda on: setattr(self.advanced, "visible", on))
        self.resize.changed.connect(lambda on: setattr(self.short_side, "enabled", on))
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self._viewer.layers.events.inserted.connect(self._refresh_layers)
        self._viewer.layers.events.removed.connect(self._refresh_layers)
        self._restore(saved)
        self._refresh_layers()

    # -- choices and field logic --------------------------------------------------------------
    def _image_choices(self, widget=None):
        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, Image)]

    def _channel_axis_choices(self, widget=None):
        layer = self.image.value if hasattr(self, "image") else None
        choices = [("none (grey or RGB)", None)]
        if layer is not None and not layer.rgb and layer.ndim >= 3:
            choices += [(f"axis {axis} ({layer.data.shape[axis]})", axis) for axis in range(layer.ndim - 2)]
        return choices

    def _refresh_layers(self, event=None):
        self.image.reset_choices()
        if self.image.value is None and self.image.choices:
            self.image.value = self.image.choices[-1]
        self._on_image_changed()

    def _on_image_changed(self, *_):
        self.channel_axis.reset_choices()
        self._on_channel_axis_changed()
        layer = self.image.value
        stacked = layer is not None and (layer.ndim - (0 if self.channel_axis.value is None else 1)) > 2
        self.scope.visible = stacked

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

    def _on_checkpoint_chosen(self, path):
        if path and os.path.isfile(str(path)):
            self.pretrained.value = str(path)

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
        for name in ("prob_threshold", "logit_scale", "crop", "stride", "short_side", "keep_edits", "resize"):
            if name in saved:
                try:
                    getattr(self, name).value = saved[name]
                except (ValueError, TypeError):
                    pass
        if isinstance(saved.get("templates"), str):
            self.templates.value = saved["templates"]

    def settings(self) -> dict:
        """The values that persist between sessions."""
        return {
            "classes": self.classes.value, "model": self.model.value, "pretrained": self.pretrained.value,
            "method": self.method.value, "device": self.device.value, "prob_threshold": self.prob_threshold.value,
            "precision": self.precision.value, "probability_output": self.probability_output.value,
            "keep_edits": self.keep_edits.value, "resize": self.resize.value, "short_side": self.short_side.value,
            "crop": self.crop.value, "stride": self.stride.value, "logit_scale": self.logit_scale.value,
            "templates": self.templates.value,
        }

    def options(self) -> dict:
        """Engine options from the advanced fields."""
        templates = [line.strip() for line in self.templates.value.splitlines() if line.strip()]
        return {
            "short_side": self.short_side.value if self.resize.value else None,
            "crop": self.crop.value,
            "stride": self.stride.value,
            "logit_scale": self.logit_scale.value,
            "prob_threshold": self.prob_threshold.value,
            "templates": templates or None,
        }

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
            options = self.options()
            options["contrast_limits"] = tuple(layer.contrast_limits)  # segment what the user sees
        except ClearClipError as exc:
            self._set_status(str(exc), error=True)
            return None
        planes = layout.planes()
        if self.scope.value == "current slice" and len(planes) > 1:
            planes = [layout.plane_of_point(layer.world_to_data(self._viewer.dims.point))]
        save_settings(self.settings())
        request = dict(model=self.model.value, pretrained=self.pretrained.value or None, device=self.device.value,
                       precision=self.precision.value)
        worker = create_worker(
            _segmentation_job, self._segmenter, request, self.method.value, data, layout, planes,
            [", ".join(c.synonyms) for c in classes], options, _start_thread=False, _ignore_errors=True,
        )
        context = {"layer": layer, "layout": layout, "classes": classes}
        worker.yielded.connect(self._on_yielded)
        worker.returned.connect(lambda value: self._on_returned(value, context))
        worker.errored.connect(self._on_errored)
        worker.aborted.connect(lambda: self._set_status("Cancelled: nothing was changed."))
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._progress = progress(total=1000, desc="ClearCLIP")
        self.run_button.enabled = False
        self.cancel_button.enabled = True
        self._set_status(f"Starting on {layer.name} ({len(planes)} slice{'s' if len(planes) > 1 else ''})...")
        # start from the event loop, so that a caller can connect to the returned worker's signals first
        QTimer.singleShot(0, worker.start)
        return worker

    def cancel(self, *_):
        if self._worker is not None:
            self._set_status("Cancelling after the current batch...")
            self._worker.quit()

    def _set_status(self, text: str, error: bool = False):
        self.status.value = text
        if error:
            show_error(text)

    def _on_yielded(self, step):
        if isinstance(step, str):
            self._set_status(step)
        elif isinstance(step, PlaneProgress):
            self._set_status(step.message)
            if self._progress is not None:
                self._progress.update(int(step.fraction * 1000) - self._progress.n)

    def _on_errored(self, exc):
        if isinstance(exc, ClearClipError):
            self._set_status(str(exc), error=True)
        else:
            log.error("ClearCLIP run failed", exc_info=exc)
            self._set_status(f"Unexpected error ({type(exc).__name__}: {exc}). Nothing was changed.", error=True)

    def _on_finished(self):
        self._worker = None
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        self.run_button.enabled = True
        self.cancel_button.enabled = False

    def _on_returned(self, value, context):
        segmenter, results = value
        self._segmenter = segmenter
        if not results:
            return
        layer, layout, classes = context["layer"], context["layout"], context["classes"]
        names = [c.name for c in classes]
        labels_layer, kept = self._write_labels(layer, layout, results, names)
        self._write_probabilities(layer, layout, results, names)
        counts = np.bincount(np.concatenate([r.labels.ravel() for _, r in results]), minlength=len(names) + 1)
        self._update_legend(self._outputs[_layer_key(labels_layer)].names, counts)
        note = f"; kept {kept} edited pixels" if kept else ""
        self._set_status(f"Done: {labels_layer.name} ({len(results)} slice{'s' if len(results) > 1 else ''}){note}.")

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

    def _write_labels(self, layer, layout, results, names):
        target = None if self.new_layer.value else self._target_output(layer, layout)
        if target is not None:
            edited = bool(np.any(target.layer.data != target.baseline))
            if edited and not self.keep_edits.value:
                show_info(f"'{target.layer.name}' has manual edits: the new result goes to a new layer.")
                target = None
        if target is None:
            current = np.zeros(layout.label_shape, dtype=np.int32)
            baseline, baseline_names = current.copy(), []
        else:
            current = np.asarray(target.layer.data)
            baseline, baseline_names = target.baseline, target.names
        merged_names, kept = list(baseline_names), 0
        labels, base = current, baseline
        for plane, result in results:
            merged = merge_keeping_edits(labels, base, merged_names, result.labels, names, region=plane)
            labels, base, merged_names = merged.labels, merged.baseline, merged.names
            kept += merged.kept_pixels
        features = {"index": np.arange(len(merged_names) + 1), "class": ["unassigned"] + merged_names}
        colormap = DirectLabelColormap(color_dict={None: "transparent", 0: "transparent",
                                                   **{i: class_colour(i) for i in range(1, len(merged_names) + 1)}})
        if target is None:
            labels_layer = self._viewer.add_labels(labels, name=f"{layer.name} classes", features=features,
                                                   colormap=colormap, **self._layer_geometry(layer, layout))
        else:
            labels_layer = target.layer
            labels_layer.data = labels
            labels_layer.features = features
            labels_layer.colormap = colormap
        self._outputs[_layer_key(labels_layer)] = _Output(labels_layer, base, merged_names)
        return labels_layer, kept

    def _write_probabilities(self, layer, layout, results, names):
        mode = self.probability_output.value
        if mode == "none":
            return
        if mode == "winning class":
            maps = {f"{layer.name} probability": [r.probabilities.max(0) for _, r in results]}
        else:
            maps = {f"{layer.name} P({name})": [r.probabilities[i] for _, r in results] for i, name in enumerate(names)}
        for name, planes in maps.items():
            existing = self._viewer.layers[name] if name in self._viewer.layers else None
            if existing is not None and existing.data.shape == layout.label_shape:
                data = np.array(existing.data, dtype=np.float32, copy=True)
            else:
                data = np.zeros(layout.label_shape, dtype=np.float32)
                existing = None
            for (plane, _), values in zip(results, planes):
                data[plane] = values
            if existing is None:
                self._viewer.add_image(data, name=name, colormap="viridis", contrast_limits=(0, 1), blending="additive",
                                       visible=False, **self._layer_geometry(layer, layout))
            else:
                existing.data = data

    def _update_legend(self, names: list[str], counts: np.ndarray):
        total = max(1, int(counts.sum()))
        rows = []
        for index, name in enumerate(names, start=1):
            share = counts[index] / total * 100 if index < len(counts) else 0.0
            rows.append(f'<span style="color:{class_colour(index)}">&#9632;</span> {index}: {html.escape(name)}'
                        f' <span style="color:gray">({share:.0f}%)</span>')
        self.legend.value = "<br>".join(rows)


def _layer_key(layer) -> str:
    return str(getattr(layer, "unique_id", None) or id(layer))


def _segmentation_job(segmenter, request, method, data, layout, planes, classes, options):
    """Worker body: load (or reuse) the model, then segment plane by plane, yielding progress."""
    key = (request["model"], request["pretrained"], request["device"], request["precision"])
    if segmenter is None or getattr(segmenter, "_request_key", None) != key:
        yield f"Loading {request['model']} ({request['pretrained'] or 'default weights'})..."
        segmenter = Segmenter(request["model"], request["pretrained"], method=method, device=request["device"],
                              precision=request["precision"])
        segmenter._request_key = key
    segmenter.method = method
    results = yield from segment_planes(segmenter, data, layout, planes, classes, **options)
    return segmenter, results
