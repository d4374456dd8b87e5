"""How an image is segmented: one frozen, validated options object shared by the API, widget, CLI and batches.

``SegmentOptions`` holds every setting of a run that is not data (the image, the classes,
strokes). It is built from keywords or a dict, checked in one place, and resolved against a
model: settings left at ``DEFAULT`` take the model's own (the official ones, except for models
trained at another scale such as ``synthetic-tiny``). Adding an option is one field here (and,
for the widget, one row of its field table).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping, Sequence

from .errors import InvalidOptionError

REFINEMENTS = (None, "pamr")
PAMR_ITERATIONS = 10
PAMR_DILATIONS = (8, 16)
#: Upper bounds that keep a mistyped option from running for days or allocating terabytes.
PAMR_MAX_ITERATIONS = 100
PAMR_MAX_DILATION = 1024
#: The widget and the command line snap masks to edges unless told not to (the Python API follows
#: the paper and does not): on the demo scenes snapping lifts pixel accuracy from 0.93 to 0.98.
SNAP_IN_TOOLS = True


class _Default:
    """Marks an option left to the model's default."""

    _instance = None

    def __new__(cls):  # one instance, also after pickling to a dask worker
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "DEFAULT"

    def __reduce__(self):
        return (_Default, ())


DEFAULT = _Default()


def _whole(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class SegmentOptions:
    """Window, scoring and refinement settings (defaults: the official ClearCLIP protocol).

    - ``short_side``, ``crop``, ``stride``: resize and sliding windows (448, 448, 224 officially;
      ``short_side=None`` keeps the native size); ``DEFAULT`` takes the model's own.
    - ``logit_scale`` (50; ResCLIP's 40), ``prob_threshold`` (0: every pixel labelled).
    - ``templates``: prompt templates with ``{}`` (None: the 80 ImageNet templates).
    - ``contrast_limits``: (low, high) intensity scaling for non-uint8 images (None: the image's range).
    - ``refine``: None (the paper) or "pamr" (edge snapping), with ``pamr_iterations`` and ``pamr_dilations``.
    - ``preset``: the official per-benchmark settings of ResCLIP by name ("demo", the default, "voc21",
      "voc20", "context60", "context59", "coco_object", "coco_stuff", "cityscapes", "ade20k"); its
      window settings apply where the windows are left to their defaults.
    - ``logit_scale`` left at ``DEFAULT`` is 50, or the method's own (ResCLIP: 40; CLIP-DIY: 1, no temperature).
    - ``keep_aspect`` (CLIP-DIY only): keep the image's proportions, short side ``short_side`` (officially the
      image is squashed to a ``short_side`` square, 256 x 256).
    - ``background_class``: the class a foreground map's complement scores (CLIP-DIY's fusion); None: the
      class named "background" (or "bg", "backdrop").
    - ``templates=None`` takes the method's own: the 80 ImageNet templates, CLIP-DIY's one "a photo of a {}".
    """

    short_side: Any = DEFAULT
    crop: Any = DEFAULT
    stride: Any = DEFAULT
    logit_scale: Any = DEFAULT
    prob_threshold: float = 0.0
    templates: Any = None
    contrast_limits: Any = None
    refine: str | None = None
    pamr_iterations: int = PAMR_ITERATIONS
    pamr_dilations: Any = PAMR_DILATIONS
    preset: str | None = None
    keep_aspect: bool = False
    background_class: str | None = None

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def build(cls, options: "SegmentOptions | Mapping[str, Any] | None" = None, **keywords) -> "SegmentOptions":
        """Options from an options object, a dict or keywords (keywords win); unknown names are refused."""
        if options is None:
            base: dict = {}
        elif isinstance(options, SegmentOptions):
            base = {f.name: getattr(options, f.name) for f in fields(cls)}
        elif isinstance(options, Mapping):
            base = dict(options)
        else:
            raise InvalidOptionError(f"options={options!r} must be a SegmentOptions, a dict of options, or None.")
        base.update(keywords)
        unknown = sorted(set(base) - set(cls.names()))
        if unknown:
            hint = (" Probability maps are asked for per run (maps=...), or with save_probabilities in batches."
                    if "maps" in unknown else "")
            raise InvalidOptionError(f"Unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: "
                                     f"the options are {', '.join(cls.names())}.{hint}")
        return cls(**base)

    def replace(self, **changes) -> "SegmentOptions":
        return replace(self, **changes)

    def resolved(self, model_name: str, patch: int = 16, method: str | None = None) -> "SegmentOptions":
        """Defaults filled in from the model (and method), every value checked and in its plain type."""
        from .choices import MODEL_OPTIONS, default_options

        defaults = default_options(model_name, method)
        if method == "resclip" and self.preset is not None and model_name not in MODEL_OPTIONS:
            from .resclip import PRESETS, resclip_settings

            resclip_settings(self.preset)
            windows = PRESETS[str(self.preset).lower()][1]
            defaults = {**defaults, **{k: v for k, v in windows.items() if k in ("short_side", "crop", "stride")}}
            if defaults["crop"] == "whole":  # the whole image in one window
                defaults["crop"] = defaults["stride"] = 1 << 20
        short_side = defaults["short_side"] if self.short_side is DEFAULT else self.short_side
        crop = defaults["crop"] if self.crop is DEFAULT else self.crop
        stride = defaults["stride"] if self.stride is DEFAULT else self.stride
        if short_side is not None and (not _whole(short_side) or short_side < patch):
            raise _out_of_range("short_side", short_side, f"must be a whole number of at least {patch} pixels",
                                ", or None to keep the native size")
        if not _whole(crop) or crop < patch:
            raise _out_of_range("crop", crop, f"must be a whole number of at least {patch} pixels "
                                "(the official value is 448)")
        if not _whole(stride) or not 0 < stride <= crop:
            raise _out_of_range("stride", stride, f"must be a whole number between 1 and the window size {crop} "
                                "(the official value is 224)")
        logit_scale = defaults["logit_scale"] if self.logit_scale is DEFAULT else self.logit_scale
        threshold = self.prob_threshold
        if not _number(logit_scale) or not math.isfinite(logit_scale) or not logit_scale > 0:
            raise _out_of_range("logit_scale", logit_scale, "must be a finite positive number "
                                "(the official value is 50)")
        if not _number(threshold) or not 0.0 <= threshold <= 1.0:
            raise _out_of_range("prob_threshold", threshold, "must be a number between 0 and 1 (0 labels every pixel)")
        from .image import check_contrast_limits
        from .prompts import check_templates

        if self.templates is None and method == "clipdiy":
            from .clipdiy import CLIPDIY_TEMPLATES

            templates = CLIPDIY_TEMPLATES
        else:
            templates = None if self.templates is None else check_templates(self.templates)
        keep_aspect = check_flag("keep_aspect", self.keep_aspect)
        if keep_aspect and method is not None and method != "clipdiy":
            rule = f"applies to CLIP-DIY's crops; the method is {method}, whose windows always keep the aspect ratio"
            raise InvalidOptionError(f"keep_aspect {rule}.", "keep_aspect", keep_aspect, rule)
        background = self.background_class
        if background is not None and (not isinstance(background, str) or not background.strip()):
            raise _out_of_range("background_class", background, "must be a class name",
                                ", or None for the class called background")
        if self.refine not in REFINEMENTS:
            raise InvalidOptionError(f"refine={self.refine!r} is not known: use None (the official pipeline) "
                                     "or 'pamr'.")
        iterations, dilations = check_pamr_options(self.pamr_iterations, self.pamr_dilations)
        preset = self.preset
        if preset is not None:
            from .resclip import resclip_settings

            resclip_settings(preset)  # a known name, or the error that lists them
            if method is not None and method != "resclip":
                rule = f"names settings of ResCLIP; the method is {method}"
                raise InvalidOptionError(f"preset={preset!r} {rule}.", "preset", preset, rule)
            preset = str(preset).lower()
        return SegmentOptions(None if short_side is None else int(short_side), int(crop), int(stride),
                              float(logit_scale), float(threshold), templates,
                              check_contrast_limits(self.contrast_limits), self.refine, iterations, dilations, preset,
                              keep_aspect, None if background is None else background.strip())

    def to_dict(self) -> dict:
        """Plain values (DEFAULT as None), for fingerprints, settings and reports."""
        values = asdict(self)
        return {k: (None if v is DEFAULT else list(v) if isinstance(v, tuple) else v) for k, v in values.items()}


def _out_of_range(option: str, value, rule: str, python_hint: str = "") -> InvalidOptionError:
    """``option=value must ...`` in Python's terms, with what the widget and the command line need to say it in
    theirs (``python_hint``: what only Python can pass, such as None)."""
    return InvalidOptionError(f"{option}={value!r} {rule}{python_hint}.", option, value, rule)


def check_pamr_options(iterations, dilations) -> tuple[int, tuple[int, ...]]:
    """(iterations, dilations) as plain ints, or an error that says the allowed range (numpy integers are fine)."""
    import numpy as np

    if not _whole(iterations) or not 0 <= int(iterations) <= PAMR_MAX_ITERATIONS:
        raise InvalidOptionError(f"pamr_iterations={iterations!r} must be a whole number from 0 to "
                                 f"{PAMR_MAX_ITERATIONS} (NACLIP uses 10).")
    try:
        values = tuple(np.asarray(dilations, dtype=object).ravel().tolist()) if not isinstance(dilations, str) else ()
        ok = bool(values) and all(_whole(d) and 1 <= int(d) <= PAMR_MAX_DILATION for d in values)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InvalidOptionError(f"pamr_dilations={dilations!r} must be whole numbers from 1 to {PAMR_MAX_DILATION} "
                                 "pixels, e.g. (8, 16).")
    return int(iterations), tuple(int(d) for d in values)


def check_dilations_fit(dilations: Sequence[int], size: tuple[int, int]) -> None:
    """Dilations must stay within the image: a neighbour farther than its longer side is only padding
    (and the padding would grow the memory needed without limit)."""
    if max(dilations) > max(size):
        raise InvalidOptionError(
            f"pamr_dilations={tuple(dilations)} reach past this {size[0]} x {size[1]} image: each must be at most "
            f"its longer side ({max(size)} pixels), e.g. (8, 16).")


def check_flag(name: str, value) -> bool:
    """True or False (numpy's too); a string such as "no" is refused, not taken as true."""
    import numpy as np

    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise InvalidOptionError(f"{name}={value!r} must be True or False.")
