"""What the widget says, in its own terms: errors, the result line, the legend (plain functions, testable without Qt)."""

from __future__ import annotations

import html

import numpy as np

from ..errors import ClearClipError, InvalidOptionError, WeightsUnavailableError

DEMO_NOTE = ("The offline demo model knows only coloured shapes on grey (red, green, blue, yellow, background), "
             "as in File > Open Sample > Synthetic shapes; on other images its labels mean nothing.")
NO_CLASSES = "No classes: type at least one class in Classes, one per line (e.g. 'cell, nucleus' and 'background')."
NO_IMAGE = "No image: open an image layer (File > Open, or File > Open Sample) first."


def image_changed_text(image_name: str, removed: bool) -> str:
    """Why a finished run's labels were not used: the image it segmented left the viewer, or got new data."""
    if removed:
        return f"'{image_name}' was removed from the viewer while it was segmented: nothing was added or changed."
    return (f"'{image_name}' was given new data while it was segmented, so the labels of its old data were not "
            "used: nothing was added or changed. Press Run to segment it as it is now.")


#: The widget's field for each engine option (Advanced options), and what it can say beyond the engine's rule.
OPTION_FIELDS = {"short_side": ("Short side", "; or turn Resize off to keep the image's own size"),
                 "crop": ("Window", ""), "stride": ("Stride", ""), "logit_scale": ("Logit scale", ""),
                 "prob_threshold": ("Background threshold", ""), "keep_aspect": ("Keep aspect ratio", "")}


def error_text(exc: BaseException, model: str, weights: str) -> tuple[str, bool]:
    """An engine error as the widget says it, and whether to offer the offline demo model."""
    exc = getattr(exc, "runtime_error", exc)   # carried out of napari's worker (see .worker_errors)
    if isinstance(exc, WeightsUnavailableError):
        model = exc.model or model
        quickgelu = f" (for OpenAI weights, with model {model}-quickgelu)" if exc.tag == "openai" else ""
        return (f"The {model} weights ('{exc.tag or weights}') are not on this computer and cannot be downloaded "
                f"now (no network). Choose a weights file with Weights > Choose file...{quickgelu}, or click the "
                "button below to try the offline demo model.", True)
    if isinstance(exc, InvalidOptionError) and exc.option in OPTION_FIELDS and exc.rule:
        field, more = OPTION_FIELDS[exc.option]
        given = "" if isinstance(exc.value, bool) else f" {exc.value:g}" if isinstance(exc.value, float) else \
            f" {exc.value}"
        return f"{field}{given} {exc.rule}{more}.", False
    if isinstance(exc, ClearClipError):
        return str(exc), False
    if isinstance(exc, (ConnectionError, TimeoutError)) or type(exc).__module__.split(".")[0] == "aiohttp":
        # a remote store's chunks, read by its reader plugin while the run went: the connection, not the run
        return (f"The image could not be read over the network ({type(exc).__name__}: {exc or 'no answer'}). Check the "
                "connection and press Run again; nothing was changed.", False)
    return f"Unexpected error ({type(exc).__name__}: {exc}). Nothing was changed.", False


def done_text(layer_name: str, planes: int, kept: int, notes: list[str], demo_note: bool) -> str:
    """The status line after a result."""
    text = f"Done: {layer_name} ({planes} slice{'s' if planes > 1 else ''}){'; kept %d edited pixels' % kept if kept else ''}."
    if demo_note:
        text += " " + DEMO_NOTE
    for note in notes:
        text += " Note: " + note
    return text


def reduced_note(reduction) -> str:
    """What a run on an image too large to hold segmented, and how to get labels at full resolution."""
    return (f"The image is too large to hold at full resolution: it was segmented at {reduction.describe()}, which "
            "holds what the model sees with Resize on, and the labels sit on the image at that scale. For finer "
            "labels, raise Large images at (Advanced options); for labels at full resolution, turn Resize off (a 2-D "
            "image is then segmented tile by tile).")


def legend_html(names: list[str], counts: np.ndarray, colours: dict) -> str:
    """One line per class: its colour (an outline for transparent classes), number, name and share of pixels."""
    total = max(1, int(counts.sum()))
    rows = []
    for index, name in enumerate(names, start=1):
        share = counts[index] / total * 100 if index < len(counts) else 0.0
        colour = colours.get(index, "#c8c8c8")
        swatch = ('<span style="color:gray">&#9633;</span>' if colour == "transparent" else
                  f'<span style="color:{colour}">&#9632;</span>')
        rows.append(f'{swatch} {index}: {html.escape(name)} <span style="color:gray">({share:.0f}%)</span>')
    return "<br>".join(rows)
