"""How a run's previews reach the layer: the first at once, the others batched at most every interval."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from napari_clearclip.editing import LabelsPreview
from napari_clearclip.gui import previews as previews_module
from napari_clearclip.gui.previews import RunPreviews


@dataclass
class _Layer:
    data: np.ndarray
    refreshed: int = 0

    def refresh(self):
        self.refreshed += 1


@dataclass
class _Target:
    layer: _Layer
    baseline: np.ndarray = field(default=None)


def _preview(found: np.ndarray, rows: slice, value: int) -> LabelsPreview:
    labels = np.full(found[rows].shape, value, found.dtype)
    return LabelsPreview((), (rows, slice(None)), labels, found[rows].copy(), np.ones(labels.shape, bool))


def test_the_first_preview_is_written_at_once_and_the_others_together_after_the_interval(qtbot, monkeypatch):
    monkeypatch.setattr(previews_module, "PREVIEW_INTERVAL_MS", 200)
    found = np.zeros((40, 10), np.uint8)
    target = _Target(_Layer(found.copy()), found.copy())
    previews = RunPreviews(target, {(): found})
    previews.add(_preview(found, slice(0, 10), 1))
    assert (target.layer.data[0:10] == 1).all()            # the first: at once
    previews.add(_preview(found, slice(10, 20), 2))
    previews.add(_preview(found, slice(20, 30), 3))
    assert (target.layer.data[10:30] == 0).all()           # right after it: held back
    qtbot.waitUntil(lambda: (target.layer.data[10:30] > 0).all(), timeout=2000)
    assert (target.layer.data[10:20] == 2).all() and (target.layer.data[20:30] == 3).all()
    qtbot.waitUntil(lambda: target.layer.refreshed > 0, timeout=2000)
    np.testing.assert_array_equal(target.baseline, target.layer.data)   # recorded as the model's answer


def test_a_preview_after_a_quiet_interval_is_written_at_once_and_one_soon_after_it_waits(qtbot, monkeypatch):
    monkeypatch.setattr(previews_module, "PREVIEW_INTERVAL_MS", 150)
    found = np.zeros((40, 10), np.uint8)
    target = _Target(_Layer(found.copy()), found.copy())
    previews = RunPreviews(target, {(): found})
    previews.add(_preview(found, slice(0, 10), 1))
    qtbot.wait(250)                                         # longer than the interval: nothing written since
    previews.add(_preview(found, slice(10, 20), 2))
    assert (target.layer.data[10:20] == 2).all()           # at once, not an interval later
    previews.add(_preview(found, slice(20, 30), 3))
    assert (target.layer.data[20:30] == 0).all()           # right after a write: held back
    qtbot.waitUntil(lambda: (target.layer.data[20:30] == 3).all(), timeout=2000)
