"""Merging a new result into labels a user has corrected, and the class colours."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Distinct, colour-blind-friendly colours (Okabe-Ito, then Tableau), one per class, stable by position.
PALETTE = (
    "#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7",
    "#8C564B", "#17BECF", "#BCBD22", "#7F7F7F", "#9467BD", "#1F77B4", "#FF7F0E",
)


def class_colour(label: int) -> str:
    """Colour of label value ``label`` (1-based); label 0 is transparent."""
    return PALETTE[(label - 1) % len(PALETTE)]


@dataclass
class MergedLabels:
    """The labels to show, their class names, and the baseline that marks later edits."""

    labels: np.ndarray
    names: list[str]
    baseline: np.ndarray
    kept_pixels: int


def merge_keeping_edits(
    current: np.ndarray,
    baseline: np.ndarray,
    baseline_names: list[str],
    new: np.ndarray,
    new_names: list[str],
    region: tuple = (),
) -> MergedLabels:
    """Put ``new`` labels into ``current[region]`` except where the user changed them.

    ``baseline`` is what earlier runs wrote; a pixel whose value differs from it was
    painted by the user. Painted pixels keep their class: values are renumbered to
    the classes' new labels everywhere, and a class no longer requested stays as an
    extra label after the new ones, so nothing painted is lost, now or on later runs.
    """
    names = list(new_names)
    values = np.union1d(np.unique(current), np.unique(baseline))
    lookup = np.zeros(int(values.max()) + 1 if values.size else 1, dtype=current.dtype)
    for value in values:
        if value <= 0:
            continue
        name = baseline_names[value - 1] if value <= len(baseline_names) else f"label {value}"
        if name not in names:
            names.append(name)
        lookup[value] = names.index(name) + 1
    edited = current[region] != baseline[region]
    labels = lookup[current]
    new_baseline = lookup[baseline]
    new = np.asarray(new, dtype=current.dtype)
    new_baseline[region] = new
    labels[region] = np.where(edited, labels[region], new)
    return MergedLabels(labels, names, new_baseline, int(edited.sum()))
