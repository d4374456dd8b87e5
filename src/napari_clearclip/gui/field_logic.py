"""How the widget's fields follow the viewer and each other: the image the user opened, the rows that
apply to it, a model's own weights and window settings, a chosen weights file."""

from __future__ import annotations

import os

import open_clip
from napari.layers import Image

from ..choices import CHECKPOINT_SUFFIXES, DEMO_MODEL, default_options
from ..demo.scenes import DEMO_CLASSES, DEMO_SAMPLE_NAME
from ..errors import ClearClipError
from ..prompts import parse_classes
from ..models import BUNDLED_WEIGHTS, default_pretrained, is_checkpoint_path
from .fields import DEFAULT_CLASSES, restore_values
from .messages import DEMO_NOTE

#: The Foreground field's choice for FOUND's saliency (computed on the image).
FOUND_CHOICE = "found"


class FieldLogic:
    """The field behaviour of :class:`~napari_clearclip.gui.widget.ClearClipWidget` (a mixin: it uses the
    widget's fields, ``_viewer``, ``results``, ``live_mode`` and ``_set_status``)."""

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
        if getattr(self, "save_full_size_button", None) is not None:
            self._show_full_size_button()   # the result it would save may be the layer removed

    def _refresh_layers(self, event=None):
        self.objects.reset_choices()
        self.foreground.reset_choices()
        previous = self.image.value
        self.image.reset_choices()
        if self.image.value is None and self.image.choices:
            self.image.value = self.image.choices[-1]
        if self.image.value is not previous:
            self._on_image_changed()
        elif getattr(self, "save_full_size_button", None) is not None:
            self._show_full_size_button()   # the image kept, but a layer of its name may have come or gone

    def _on_image_changed(self, *_):
        """Show only the rows that apply to this image (channels for multichannel data, slices for stacks)."""
        self.channel_axis.reset_choices()
        self._on_channel_axis_changed()
        layer = self.image.value
        stacked = layer is not None and (layer.ndim - (0 if self.channel_axis.value is None else 1)) > 2
        self.scope.visible = stacked
        self.legend.value = ""  # the legend describes the last result of the previous image
        if getattr(self, "save_full_size_button", None) is not None:
            self._show_full_size_button()   # for this image's result segmented at a reduced size, if any
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
        self._window_defaults(name, self.method.value)
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

    def _window_defaults(self, model: str, method: str) -> None:
        """The window settings and logit scale the model and method use by default."""
        options = default_options(model, method)
        self.crop.value, self.stride.value = options["crop"], options["stride"]
        self.resize.value = options["short_side"] is not None
        if options["short_side"] is not None:
            self.short_side.value = options["short_side"]
        self.logit_scale.value = options["logit_scale"]

    def _on_method_changed(self, name: str) -> None:
        self._window_defaults(self.model.value, name)
        crops = name == "clipdiy"
        self.foreground.visible = self.keep_aspect.visible = crops
        self.crop.visible = self.stride.visible = not crops  # CLIP-DIY's crops are fixed fractions of the image
        self._on_foreground_changed()

    def _on_foreground_changed(self, *_) -> None:
        self.found_weights.visible = self.foreground.visible and self.foreground.value == FOUND_CHOICE

    def _foreground_choices(self, widget=None):
        """'none', FOUND's saliency, or an Image or Labels layer (not the widget's own results)."""
        from napari.layers import Labels

        own = self.results.of if hasattr(self, "results") else (lambda layer: None)
        layers = [(layer.name, layer) for layer in self._viewer.layers
                  if isinstance(layer, (Image, Labels)) and own(layer) is None]
        return [("none", None), ("FOUND (DINO saliency)", FOUND_CHOICE)] + layers

    def foreground_request(self, layout) -> dict:
        """The run's foreground keywords from the fields (nothing unless CLIP-DIY is chosen), or a clear error."""
        from napari.layers import Labels

        choice = self.foreground.value if self.foreground.visible else None
        if choice is None:
            return {}
        if choice == FOUND_CHOICE:
            paths = [p.strip() for p in self.found_weights.value.split(";") if p.strip()]
            if paths and len(paths) != 2:
                raise ClearClipError("FOUND weights: name two files separated by ';' (the DINO checkpoint; "
                                     "decoder_weights.pt), or leave the field empty.")
            return {"foreground": "found", "found_weights": tuple(paths) or None}
        if tuple(choice.data.shape) != layout.label_shape:
            raise ClearClipError(f"The Foreground layer '{choice.name}' is {tuple(choice.data.shape)}, but the labels "
                                 f"are {layout.label_shape}: pick a map of this image, or none.")
        limits = None if isinstance(choice, Labels) else tuple(float(v) for v in choice.contrast_limits)
        return {"foreground": choice.data, "foreground_limits": limits}

    def choose_weights_file(self, *_) -> None:
        """Pick a local weights file for the Weights field."""
        from qtpy.QtWidgets import QFileDialog

        patterns = " ".join(f"*{suffix}" for suffix in CHECKPOINT_SUFFIXES)
        path, _ = QFileDialog.getOpenFileName(self.native, "Choose a weights file", "", f"Weights ({patterns})")
        if path and os.path.isfile(path):
            self.pretrained.value = path

    def choose_feature_store_folder(self, *_) -> None:
        """Pick the folder of the Feature store field."""
        from qtpy.QtWidgets import QFileDialog

        path = QFileDialog.getExistingDirectory(self.native, "Choose the feature store folder",
                                                self.feature_store.value or "")
        if path and os.path.isdir(path):
            self.feature_store.value = path

    def switch_to_demo_model(self, *_):
        """The one-click way out when CLIP weights cannot be downloaded."""
        self.model.value = DEMO_MODEL
        self._on_model_changed(DEMO_MODEL)

    def _restore(self, saved: dict) -> None:
        self._on_model_changed(self.model.value)
        restore_values(self, saved)
        self.status.value = "Ready"

    def _objects_choices(self, widget=None):
        """'none', or a Labels layer of objects (not one of the widget's own results)."""
        from napari.layers import Labels

        own = self.results.of if hasattr(self, "results") else (lambda layer: None)
        return [("none", None)] + [(layer.name, layer) for layer in self._viewer.layers
                                   if isinstance(layer, Labels) and own(layer) is None]

    def _background_choices(self, widget=None):
        """'by name' (background-like names are transparent), or one of the classes typed."""
        names = []
        if hasattr(self, "classes"):
            try:
                names = [c.name for c in parse_classes(self.classes.value)]
            except ClearClipError:
                names = []
        return [("by name", None)] + [(name, name) for name in names]

    def _on_classes_changed(self, *_):
        previous = self.background.value
        self.background.reset_choices()
        values = list(self.background.choices)
        self.background.value = previous if previous in values else None
