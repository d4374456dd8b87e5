"""The widget's fields in one table: name, widget (with its default and tooltip), section, and whether it is saved.

The table drives building the dock, saving the settings and restoring them, so a new
option is one row here (and one field of :class:`~napari_clearclip.options.SegmentOptions`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from magicgui.widgets import CheckBox, ComboBox, FloatSpinBox, LineEdit, PushButton, SpinBox, TextEdit
from magicgui.widgets.bases import ValueWidget

from ..annotate import PROBABILITY_OUTPUTS
from ..choices import COMMON_MODELS, DEMO_MODEL, DEVICES, METHOD_DESCRIPTIONS, METHOD_NAMES, PRECISIONS
from ..options import SNAP_IN_TOOLS
from ..reduced import REDUCED_SIDE, SIDE_RANGE

DEFAULT_CLASSES = "cell, nucleus\nbackground"
SCOPES = ("current slice", "all slices")
SECTIONS = ("input", "corrections", "output", "advanced")


@dataclass(frozen=True)
class Field:
    """One field: ``make(widget)`` builds it (default and tooltip included); ``saved`` fields persist."""

    name: str
    make: Callable[[object], ValueWidget]
    section: str = "input"
    saved: bool = True


def model_choices(widget=None) -> list[tuple[str, str]]:
    """Common CLIP ViTs first, the offline demo, then every other model ClearCLIP can run on."""
    from ..models import segmentable_models

    usable = segmentable_models()
    first = [(m, m) for m in COMMON_MODELS if m in usable]
    demo = [(f"{DEMO_MODEL} (offline demo)", DEMO_MODEL)] if DEMO_MODEL in usable else []
    rest = [(m, m) for m in usable if m not in COMMON_MODELS and m != DEMO_MODEL]
    return first + demo + rest


def device_choices(widget=None) -> list[str]:
    """The devices this computer has (auto and cpu always)."""
    available = {"auto", "cpu"}
    if torch.cuda.is_available():
        available.add("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        available.add("mps")
    return [d for d in DEVICES if d in available]


FIELDS: tuple[Field, ...] = (
    Field("image", lambda w: ComboBox(name="image", label="Image", choices=w._image_choices, nullable=True,
                                      tooltip="The image layer to segment (follows the newest opened image)"),
          saved=False),
    Field("channel_axis", lambda w: ComboBox(name="channel_axis", label="Channel axis",
                                             choices=w._channel_axis_choices, visible=False,
                                             tooltip="For multichannel images: the axis that holds the channels"),
          saved=False),
    Field("channel", lambda w: SpinBox(name="channel", label="Channel", min=0, max=0, visible=False,
                                       tooltip="Which channel to segment"), saved=False),
    Field("scope", lambda w: ComboBox(name="scope", label="Slices", choices=list(SCOPES), value="current slice",
                                      visible=False, tooltip="Segment the slice on screen, or every slice of the stack"),
          saved=False),
    Field("classes", lambda w: TextEdit(name="classes", label="Classes", value=DEFAULT_CLASSES,
                                        tooltip="One class per line; commas separate synonyms, e.g. 'cell, nucleus'")),
    Field("model", lambda w: ComboBox(name="model", label="Model", choices=model_choices,
                                      tooltip="The CLIP model: ViT-B-16 is the paper's; larger ViTs are slower. "
                                              "synthetic-tiny works offline but knows only coloured shapes")),
    Field("pretrained", lambda w: LineEdit(name="pretrained", label="Weights",
                                           tooltip="An open_clip pretrained tag (downloaded once, then cached), or "
                                                   "a local weights file (Choose file...); for OpenAI weights in a "
                                                   "file choose the model's -quickgelu variant")),
    Field("method", lambda w: ComboBox(name="method", label="Method", choices=list(METHOD_NAMES), value="clearclip",
                                       tooltip="\n".join(METHOD_DESCRIPTIONS.values()))),
    Field("device", lambda w: ComboBox(name="device", label="Device", choices=device_choices, value="auto",
                                       tooltip="auto: the GPU when there is one (CUDA or Apple MPS), else the CPU")),
    Field("objects", lambda w: ComboBox(name="objects", label="Objects", choices=w._objects_choices,
                                        tooltip="Optional: a Labels layer of objects (from cellpose, StarDist, "
                                                "micro-sam ...): each object gets one class, listed in that layer's "
                                                "features table (id, class, confidence, area)"), saved=False),
    Field("foreground", lambda w: ComboBox(name="foreground", label="Foreground", choices=w._foreground_choices,
                                           visible=False,
                                           tooltip="CLIP-DIY: a foreground map to fuse with the class scores (the "
                                                   "background class is weighted by 1 - map, the others by the map): "
                                                   "an Image layer of probabilities or a mask, a Labels layer (cellpose, "
                                                   "micro-sam: every object is foreground), or FOUND's saliency"),
          saved=False),
    Field("found_weights", lambda w: LineEdit(name="found_weights", label="FOUND weights", visible=False,
                                              tooltip="FOUND's two weights files, separated by ';': the DINO ViT-S/8 "
                                                      "checkpoint and decoder_weights.pt; empty: torch's cache "
                                                      "(downloaded once with a network)")),
    Field("background", lambda w: ComboBox(name="background", label="Background", choices=w._background_choices,
                                           tooltip="The class drawn transparent, so that it does not tint the image: "
                                                   "'by name' picks classes called background, other, nothing ...; "
                                                   "with a foreground map, the class scored outside the foreground"),
          saved=False),
    Field("keep_edits", lambda w: CheckBox(name="keep_edits", text="Keep my edits", value=True,
                                           tooltip="Pixels you painted since the last run keep their class"),
          section="corrections"),
    Field("learn", lambda w: CheckBox(name="learn", text="Learn from my edits", value=True,
                                      tooltip="Pixels you painted with a class teach it: similar regions in the image "
                                              "(and in every slice segmented) change class too. The eraser teaches "
                                              "nothing"), section="corrections"),
    Field("share_lesson", lambda w: CheckBox(name="share_lesson", text="Use strokes on other images", value=True,
                                             tooltip="Strokes painted on one image teach runs on the other images of "
                                                     "this session too (same classes and model); Save lesson... keeps "
                                                     "them for later sessions and the command line (--lesson)"),
          section="corrections"),
    Field("snap", lambda w: CheckBox(name="snap", text="Snap to edges", value=SNAP_IN_TOOLS,
                                     tooltip="Refine the masks along image edges (PAMR, as NACLIP uses it); "
                                             "off gives the paper's exact pipeline"), section="corrections"),
    Field("live", lambda w: CheckBox(name="live", text="Live", value=False,
                                     tooltip="Run again by itself after each paint stroke on the result and after the "
                                             "classes change; only the image features' cache is used, so re-runs are "
                                             "quick"), section="corrections", saved=False),
    Field("new_layer", lambda w: CheckBox(name="new_layer", text="Result in a new layer", value=False,
                                          tooltip="Add a new Labels layer instead of updating the last result of this "
                                                  "image"), section="output", saved=False),
    Field("prob_threshold", lambda w: FloatSpinBox(name="prob_threshold", label="Background threshold", min=0.0,
                                                   max=1.0, step=0.05, value=0.0,
                                                   tooltip="Pixels whose best class probability is below this stay "
                                                           "unlabelled (0)"), section="output"),
    Field("probability_output", lambda w: ComboBox(name="probability_output", label="Probabilities",
                                                   choices=list(PROBABILITY_OUTPUTS), value="none",
                                                   tooltip="Also show probability maps: none, the winning class's "
                                                           "probability, or one map per class (memory grows with the "
                                                           "classes)"), section="output"),
    Field("resize", lambda w: CheckBox(name="resize", text="Resize (short side)", value=True,
                                       tooltip="Off: segment at native resolution (large images stream in windows)"),
          section="advanced"),
    Field("short_side", lambda w: SpinBox(name="short_side", label="Short side", min=8, max=8192, value=448,
                                          tooltip="The image is resized so that its short side has this many pixels "
                                                  "(official: 448)"), section="advanced"),
    Field("large_side", lambda w: SpinBox(name="large_side", label="Large images at", min=SIDE_RANGE[0],
                                          max=SIDE_RANGE[1], step=256, value=REDUCED_SIDE,
                                          tooltip="With Resize on, an image too large to hold (a pyramid, dask or zarr "
                                                  "layer over 4096 x 4096) is labelled at its pyramid level, or a "
                                                  "copy by block means, of at most this many pixels a side. Larger "
                                                  "gives finer labels and takes more memory (a 20000 x 20000 slide "
                                                  "with snapping: 1.3-1.7 GiB at 2048, 2.1-2.5 GiB at 3000, up to "
                                                  "3.6 GiB at 4096)"),
          section="advanced"),
    Field("crop", lambda w: SpinBox(name="crop", label="Window", min=8, max=4096, value=448,
                                    tooltip="Sliding-window size in pixels (official: 448)"), section="advanced"),
    Field("stride", lambda w: SpinBox(name="stride", label="Stride", min=1, max=4096, value=224,
                                      tooltip="Step between windows in pixels; smaller is smoother and slower "
                                              "(official: 224)"), section="advanced"),
    Field("logit_scale", lambda w: FloatSpinBox(name="logit_scale", label="Logit scale", min=0.1, max=1000.0,
                                                value=50.0, tooltip="Sharpness of the softmax over classes (official: "
                                                                    "50); affects probabilities and the background "
                                                                    "threshold"), section="advanced"),
    Field("keep_aspect", lambda w: CheckBox(name="keep_aspect", text="Keep aspect ratio (CLIP-DIY)", value=False,
                                            visible=False,
                                            tooltip="CLIP-DIY officially squashes the image to a square (256 x 256); "
                                                    "on: keep its proportions, with the short side above"),
          section="advanced"),
    Field("precision", lambda w: ComboBox(name="precision", label="Precision", choices=list(PRECISIONS), value="auto",
                                          tooltip="auto: fp16 on a GPU, exact fp32 on the CPU; bf16 is faster on "
                                                  "recent CPUs (the model about 3-4x faster than in fp32 on CPUs with AMX), "
                                                  "slightly less exact"), section="advanced"),
    Field("feature_store", lambda w: LineEdit(name="feature_store", label="Feature store",
                                              tooltip="A folder of image features on disk, e.g. one a cluster filled "
                                                      "with clearclip-segment --features-only: images whose features "
                                                      "are there are not encoded again, and new ones are added. "
                                                      "Nothing in a folder chosen here is removed. Empty: the user "
                                                      "cache (2 GiB, the least used removed first), or the folder "
                                                      "NAPARI_CLEARCLIP_FEATURE_STORE names"),
          section="advanced"),
    Field("templates", lambda w: TextEdit(name="templates", label="Templates",
                                          tooltip="One prompt template per line with {} for the class; empty = the 80 "
                                                  "ImageNet templates"), section="advanced"),
)


def build_fields(widget) -> dict[str, ValueWidget]:
    """Every field of the table, built for ``widget`` and set as its attribute of the same name."""
    built = {}
    for field in FIELDS:
        built[field.name] = field.make(widget)
        setattr(widget, field.name, built[field.name])
    return built


def saved_values(widget) -> dict:
    """The values that persist between sessions."""
    return {field.name: getattr(widget, field.name).value for field in FIELDS if field.saved}


def restore_values(widget, saved: dict) -> None:
    """Set the saved values in table order (the model first, so its defaults do not override what was saved);
    a value that no longer fits its field (a model that is gone, a device this computer lacks) is skipped."""
    for field in FIELDS:
        if not field.saved or field.name not in saved:
            continue
        target = getattr(widget, field.name)
        value = saved[field.name]
        if field.name == "pretrained" and not value:
            continue  # the model's own weights, as just set
        if isinstance(target, ComboBox):
            choices = [c[1] if isinstance(c, tuple) else c for c in target.choices]
            if value not in choices:
                continue
        try:
            target.value = value
        except (ValueError, TypeError):
            pass


def lesson_buttons() -> tuple[PushButton, PushButton]:
    save = PushButton(name="save_lesson", text="Save lesson...",
                      tooltip="Save what your strokes taught (classes, exemplars, model) to a file, to load in "
                              "another session or to use on a folder: clearclip-segment --lesson FILE")
    load = PushButton(name="load_lesson", text="Load lesson...",
                      tooltip="Load a saved lesson: it fills the classes and teaches every run with them")
    return save, load


def save_labels_button() -> PushButton:
    return PushButton(name="save_labels", text="Save labels...", visible=False,
                      tooltip="Save this image's result, your edits included, as <name>_labels.tif with its class "
                              "table (<name>_classes.csv) beside: the command line's format, which opens again in "
                              "napari with its class names and as this image's result")


def full_size_button() -> PushButton:
    return PushButton(name="save_full_size", text="Save at full size...", visible=False,
                      tooltip="The labels of an image segmented at a reduced size (with Resize on, one too large to "
                              "hold), edits included, written at the image's full size into a new zarr store, a band "
                              "of rows at a time: each pixel takes the label shown over it")


def choose_folder_button() -> PushButton:
    return PushButton(name="choose_feature_store", text="Choose folder...",
                      tooltip="Pick the feature store folder (for example a shared one a cluster filled)")


def choose_file_button() -> PushButton:
    return PushButton(name="choose_weights", text="Choose file...",
                      tooltip="Pick a local weights file (.pt, .pth, .bin, .ckpt, .safetensors) for use without a "
                              "network")
