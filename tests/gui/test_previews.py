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


def test_the_first_two_previews_are_written_at_once_and_the_others_together_after_the_interval(qtbot, monkeypatch):
    monkeypatch.setattr(previews_module, "PREVIEW_INTERVAL_MS", 200)
    found = np.zeros((40, 10), np.uint8)
    target = _Target(_Layer(found.copy()), found.copy())
    previews = RunPreviews(target, {(): found})
    previews.add(_preview(found, slice(0, 5), 1))
    assert (target.layer.data[0:5] == 1).all()             # the first: at once
    previews.add(_preview(found, slice(5, 10), 5))
    assert (target.layer.data[5:10] == 5).all()            # the second (the view, soon after): at once too
    previews.add(_preview(found, slice(10, 20), 2))
    previews.add(_preview(found, slice(20, 30), 3))
    assert (target.layer.data[10:30] == 0).all()           # right after them: held back
    qtbot.waitUntil(lambda: (target.layer.data[10:30] > 0).all(), timeout=2000)
    assert (target.layer.data[10:20] == 2).all() and (target.layer.data[20:30] == 3).all()
    qtbot.waitUntil(lambda: target.layer.refreshed > 0, timeout=2000)
    np.testing.assert_array_equal(target.baseline, target.layer.data)   # recorded as the model's answer


def test_a_first_part_written_over_several_turns_counts_once_and_the_view_after_it_comes_at_once(qtbot, monkeypatch):
    """A large first part (the tiles of one class throughout) is written a few rows per turn and shown once: the
    view's part that follows is still written at once, and only the part after that waits."""
    monkeypatch.setattr(previews_module, "PREVIEW_INTERVAL_MS", 400)
    monkeypatch.setattr(previews_module, "PIXELS_PER_TURN", 20)
    found = np.zeros((40, 10), np.uint8)
    target = _Target(_Layer(found.copy()), found.copy())
    previews = RunPreviews(target, {(): found})
    previews.add(_preview(found, slice(0, 20), 1))         # 200 pixels: ten turns
    qtbot.waitUntil(lambda: (target.layer.data[0:20] == 1).all() and target.layer.refreshed == 1, timeout=300)
    previews.add(_preview(found, slice(20, 22), 2))        # the view: at once
    assert (target.layer.data[20:22] == 2).all()
    qtbot.waitUntil(lambda: target.layer.refreshed == 2, timeout=300)
    previews.add(_preview(found, slice(22, 24), 3))        # after those two: held back
    assert (target.layer.data[22:24] == 0).all()
    qtbot.waitUntil(lambda: (target.layer.data[22:24] == 3).all(), timeout=2000)


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


def test_parts_out_of_view_are_written_but_shown_only_with_a_part_in_view_a_moved_view_or_the_end(qtbot, monkeypatch):
    monkeypatch.setattr(previews_module, "PREVIEW_INTERVAL_MS", 60)
    found = np.zeros((40, 10), np.uint8)
    target = _Target(_Layer(found.copy()), found.copy())
    view = [(0.0, 10.0, 0.0, 10.0)]                         # (top, bottom, left, right) in view
    previews = RunPreviews(target, {(): found}, view=lambda: view[0])
    previews.add(_preview(found, slice(20, 30), 1))
    assert (target.layer.data[20:30] == 1).all()           # written at once...
    qtbot.wait(150)
    assert target.layer.refreshed == 0                     # ...but not shown: out of view
    previews.add(_preview(found, slice(8, 12), 2))         # a part in view shows everything written
    qtbot.waitUntil(lambda: target.layer.refreshed == 1, timeout=2000)
    assert previews.unshown == []
    previews.add(_preview(found, slice(30, 40), 3))
    qtbot.wait(150)
    assert target.layer.refreshed == 1 and (target.layer.data[30:40] == 3).all()
    previews.view_changed()                                # moved, but not onto it: nothing to show
    qtbot.wait(150)
    assert target.layer.refreshed == 1
    view[0] = (25.0, 35.0, 0.0, 10.0)
    previews.view_changed()                                # moved onto it
    qtbot.waitUntil(lambda: target.layer.refreshed == 2, timeout=2000)
    previews.add(_preview(found, slice(12, 20), 4))
    qtbot.wait(150)
    assert target.layer.refreshed == 2
    previews.stop()                                        # the run ended: shown now
    assert target.layer.refreshed == 3
    np.testing.assert_array_equal(target.baseline, target.layer.data)


def test_a_part_in_view_right_after_parts_out_of_view_is_written_and_shown_at_once(qtbot, monkeypatch):
    """Parts out of view cost no refresh: the parts the user looks at do not wait an interval behind them, while
    a part right after the first two in view still does."""
    monkeypatch.setattr(previews_module, "PREVIEW_INTERVAL_MS", 400)
    found = np.zeros((40, 10), np.uint8)
    target = _Target(_Layer(found.copy()), found.copy())
    previews = RunPreviews(target, {(): found}, view=lambda: (0.0, 10.0, 0.0, 10.0))
    previews.add(_preview(found, slice(20, 30), 1))        # out of view: written, not shown
    previews.add(_preview(found, slice(30, 40), 2))        # out of view again: written at once too
    assert (target.layer.data[20:40] > 0).all() and target.layer.refreshed == 0
    previews.add(_preview(found, slice(0, 3), 3))          # in view: written at once...
    assert (target.layer.data[0:3] == 3).all()
    qtbot.waitUntil(lambda: target.layer.refreshed == 1, timeout=300)   # ...and shown well within the interval
    previews.add(_preview(found, slice(3, 6), 4))          # the second part in view: at once too
    assert (target.layer.data[3:6] == 4).all()
    qtbot.waitUntil(lambda: target.layer.refreshed == 2, timeout=300)
    previews.add(_preview(found, slice(6, 10), 5))         # right after those: held back
    assert (target.layer.data[6:10] == 0).all()
    qtbot.waitUntil(lambda: (target.layer.data[6:10] == 5).all(), timeout=2000)
    qtbot.waitUntil(lambda: target.layer.refreshed == 3, timeout=2000)
    np.testing.assert_array_equal(target.baseline, target.layer.data)


def test_a_run_that_shows_the_layer_itself_or_an_unknown_view_shows_nothing_twice_or_late(qtbot, monkeypatch):
    monkeypatch.setattr(previews_module, "PREVIEW_INTERVAL_MS", 60)
    found = np.zeros((40, 10), np.uint8)
    target = _Target(_Layer(found.copy()), found.copy())
    previews = RunPreviews(target, {(): found}, view=lambda: (0.0, 10.0, 0.0, 10.0))
    previews.add(_preview(found, slice(20, 30), 1))
    qtbot.wait(100)
    previews.stop(shown=True)                              # the finished run writes and shows the layer
    assert target.layer.refreshed == 0
    unknown = RunPreviews(target, {(): target.layer.data.copy()}, view=lambda: None)   # a 3-D view, say
    unknown.add(_preview(target.layer.data, slice(30, 40), 2))
    qtbot.waitUntil(lambda: target.layer.refreshed == 1, timeout=2000)


def test_the_widget_tells_a_runs_previews_when_the_view_moves_and_stops_when_closed(widget):
    viewer = widget._viewer
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    moved = []

    class _Previews:
        def view_changed(self):
            moved.append(True)

    widget._previews = _Previews()
    camera.center = (0.0, 40.0, 40.0)
    assert moved                                           # panned: the previews check what is now in view
    count = len(moved)
    camera.zoom = camera.zoom * 2
    assert len(moved) > count                              # zoomed
    widget.close_down()
    count = len(moved)
    camera.center = (0.0, 10.0, 10.0)
    assert len(moved) == count                             # a closed widget follows the view no more
