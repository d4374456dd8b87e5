"""What a segmentation returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .prompts import ClassQuery


@dataclass
class SegmentationResult:
    """Labels 1..C (0 where no class reaches the threshold), the winning probability, and per-class maps.

    ``probabilities`` and ``similarity`` are (C, H, W) float32, or None when the run
    was asked not to keep them (``maps=False``), which saves 8 bytes per pixel and class.
    With ``objects=`` (instance labels), ``objects`` holds one row per object and ``labels``
    gives each object's pixels its class, 0 outside every object.
    """

    labels: np.ndarray
    probabilities: np.ndarray | None
    similarity: np.ndarray | None
    class_names: list[str]
    classes: list[ClassQuery] = field(default_factory=list)
    method: str = "clearclip"
    confidence: np.ndarray | None = field(default=None, repr=False)
    objects: dict | None = None  # with objects=: columns id, class, confidence, area (equal-length arrays)
    #: with objects=: (ids, class probabilities summed over each object (C, n), areas), to add up over the parts of
    #: an image segmented part by part (:class:`~napari_clearclip.objects.ObjectSums`)
    object_sums: tuple | None = field(default=None, repr=False)

    def __post_init__(self):
        self._confidence_source = None

    def keep_compact_labels(self, compact: np.ndarray) -> None:
        """Hold the labels in their compact type (uint8 for a few classes), read-only, and make the int32
        ``labels`` only when first read: at 4096 x 4096 the conversion and back cost 45-250 ms of every live
        re-run in napari, whose layer holds them compact anyway."""
        view = compact.view()
        view.flags.writeable = False
        self._labels, self._compact_labels = None, view

    def paste(self, strokes: np.ndarray) -> None:
        """Give the pixels a user painted (nonzero ``strokes``) the class they painted. Labels held compact stay
        compact: a copy of them is painted, so that the state they were kept from is not."""
        from .strokes import paste_strokes

        if self._labels is None and getattr(self, "_compact_labels", None) is not None:
            own = self._compact_labels.copy()
            paste_strokes(own, strokes)
            self.keep_compact_labels(own)
        else:
            paste_strokes(self.labels, strokes)

    def stored_labels(self) -> np.ndarray:
        """The labels as held: compact and read-only where :meth:`keep_compact_labels` was used, else ``labels``."""
        return self._compact_labels if self._labels is None and self._compact_labels is not None else self.labels

    def set_lazy_confidence(self, compute) -> None:
        """``confidence`` will be computed by ``compute()`` when first read (it costs a full-resolution pass)."""
        self._confidence_source = compute

    def class_table(self) -> list[dict]:
        """One row per label value, with its pixel count, for CSV export and legends."""
        counts = np.bincount(self.labels.ravel(), minlength=len(self.class_names) + 1)
        return class_rows(self.classes or [ClassQuery(n, (n,)) for n in self.class_names], counts)


def _get_labels(self) -> np.ndarray:
    if self._labels is None and getattr(self, "_compact_labels", None) is not None:
        self._labels = self._compact_labels.astype(np.int32)
    return self._labels


def _set_labels(self, value) -> None:
    self._labels, self._compact_labels = value, None


def _get_confidence(self) -> np.ndarray | None:
    if self._confidence is None and getattr(self, "_confidence_source", None) is not None:
        compute, self._confidence_source = self._confidence_source, None
        self._confidence = compute()
    return self._confidence


def _set_confidence(self, value) -> None:
    self._confidence = value


# labels kept compact are made int32 only when read: a property over the field
SegmentationResult.labels = property(_get_labels, _set_labels, doc="(H, W) int32 labels: 1..C, 0 where no class "
                                                                    "reaches the threshold.")
# the winning probability of every pixel is read only when asked for: a property over the field
SegmentationResult.confidence = property(_get_confidence, _set_confidence,
                                         doc="(H, W) float32 probability of the winning class, computed when first read.")


def class_rows(classes: list[ClassQuery], counts: np.ndarray) -> list[dict]:
    """The class table: label 0 "unassigned", then each class with its synonyms and pixel count."""
    rows = [{"label": 0, "name": "unassigned", "synonyms": "", "pixels": int(counts[0])}]
    for index, query in enumerate(classes, start=1):
        rows.append({"label": index, "name": query.name, "synonyms": ", ".join(query.synonyms),
                     "pixels": int(counts[index])})
    return rows
