"""Live mode on a 4096 x 4096 image: a stroke re-runs, the layer updates, and the GUI thread never stalls."""

from __future__ import annotations

import time

import numpy as np

from gui_helpers import TIMEOUT, TickRecorder, counted_runs, run_and_wait


def test_a_stroke_on_a_4096_image_in_live_mode_updates_without_stalling(qtbot, widget):
    from napari_clearclip.demo.scenes import make_scene

    viewer = widget._viewer
    image = np.kron(make_scene(7, size=512, objects=(3, 3)).image, np.ones((8, 8, 1), np.uint8))
    widget.image.value = viewer.add_image(image, name="slide")
    widget.switch_to_demo_model()
    widget.classes.value = "red\ngreen\nblue\nyellow\nbackground"
    run_and_wait(qtbot, widget)
    labels = viewer.layers["slide classes"]
    before = np.asarray(labels.data).copy()
    runs = counted_runs(widget)
    widget.live.value = True
    recorders = []
    for y, x in ((2000, 2000), (1000, 3000)):  # a stroke over the bar is timed once more: a busy machine can stall
        value = 5 if before[y, x] != 5 else 1  # any one step
        with TickRecorder() as recorder:
            labels.brush_size = 40
            labels.paint((y, x), value)                 # one stroke on the result
            qtbot.waitUntil(lambda: len(runs) == len(recorders) + 1, timeout=5000)
            qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT)
            qtbot.wait(300)
        recorders.append(recorder)
        assert len(runs) == len(recorders)              # one stroke, one re-run
        assert widget.status.value.startswith("Done"), widget.status.value
        after = np.asarray(labels.data)
        assert after[y, x] == value                     # the stroke is kept
        assert after.shape == (4096, 4096)
        print(f"longest GUI-thread gap during the live re-run: {recorder.longest_gap * 1000:.0f} ms")
        if recorder.longest_gap < 0.3:
            break
    assert min(recorder.longest_gap for recorder in recorders) < 0.3, "; ".join(
        recorder.describe() for recorder in recorders)


def _live_on_large_shapes(qtbot, widget, size: int = 2048):
    """A result on a large image with Live on, and the run counter."""
    from napari_clearclip.demo.scenes import make_scene

    viewer = widget._viewer
    image = np.kron(make_scene(7, size=size // 8, objects=(3, 3)).image, np.ones((8, 8, 1), np.uint8))
    widget.image.value = viewer.add_image(image, name="slide")
    widget.switch_to_demo_model()
    widget.classes.value = "red\ngreen\nblue\nyellow\nbackground"
    run_and_wait(qtbot, widget)
    labels = viewer.layers["slide classes"]
    runs = counted_runs(widget)
    widget.live.value = True
    labels.brush_size = 40
    return labels, runs


def _recording_previews(monkeypatch, after_flush=None):
    """Record (time, pixels written so far) after each preview write; ``after_flush(previews)`` runs after each."""
    from napari_clearclip.gui import previews as previews_module

    flushes = []
    real_flush = previews_module.RunPreviews.flush

    def flush(self):
        real_flush(self)
        flushes.append((time.perf_counter(), self.written))
        if after_flush is not None:
            after_flush(self)
    monkeypatch.setattr(previews_module.RunPreviews, "flush", flush)
    return flushes


def test_a_live_rerun_shows_the_labels_around_a_stroke_before_it_ends(qtbot, widget, monkeypatch):
    """Parts of the re-run's labels reach the layer while it still computes (the stroke's surroundings first);
    the finished layer holds the stroke, and everything else is the run's answer (its new baseline)."""
    labels, runs = _live_on_large_shapes(qtbot, widget)
    flushes = _recording_previews(monkeypatch)
    returned = []
    real_on_returned = type(widget)._on_returned
    widget.__dict__["_on_returned"] = lambda value, context: (returned.append(time.perf_counter()),
                                                              real_on_returned(widget, value, context))
    before = np.asarray(labels.data).copy()
    y, x = 1000, 1000
    value = 3 if before[y, x] != 3 else 1        # blue: spreads to what looks alike
    labels.paint((y, x), value)
    qtbot.waitUntil(lambda: len(runs) == 1, timeout=5000)
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT)
    assert widget.status.value.startswith("Done"), widget.status.value
    after = np.asarray(labels.data)
    assert after[y, x] == value
    early = [written for when, written in flushes if returned and when < returned[0]]
    assert early and early[-1] > 0, (flushes, returned)   # labels written before the run returned
    result = widget.results.of(labels)
    user = (after != result.baseline)
    assert user[y, x] and user.sum() <= 40 * 40         # only the stroke differs from the run's answer


def test_a_live_rerun_cancelled_after_its_first_preview_changes_nothing(qtbot, widget, monkeypatch):
    labels, runs = _live_on_large_shapes(qtbot, widget)

    def cancel_once(previews):
        if previews.written and not cancelled:
            cancelled.append(True)
            widget.cancel()
    cancelled: list = []
    _recording_previews(monkeypatch, cancel_once)
    before = np.asarray(labels.data).copy()
    baseline_before = widget.results.of(labels).baseline.copy()
    y, x = 1000, 1000
    value = 3 if before[y, x] != 3 else 1
    labels.paint((y, x), value)
    qtbot.waitUntil(lambda: len(runs) == 1, timeout=5000)
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT)
    assert cancelled, "no preview was written"
    assert widget.status.value.startswith("Cancelled: nothing was changed"), widget.status.value
    after = np.asarray(labels.data)
    stroke = after != before
    assert stroke[y, x] and stroke.sum() <= 40 * 40     # the stroke alone
    np.testing.assert_array_equal(widget.results.of(labels).baseline, baseline_before)


def test_live_reruns_copy_the_layer_into_arrays_an_earlier_run_left_and_keep_every_stroke(qtbot, widget):
    """A live re-run copies the layer's plane (as found, as its previews leave it, and merged) into the copies an
    earlier run no longer uses; stroke after stroke, every stroke stays the user's and everything else is the run's answer."""
    widget.readying.start = lambda *args: None   # what earlier runs leave, not what is readied ahead (see below)
    labels, runs = _live_on_large_shapes(qtbot, widget)
    spares = widget._spare_planes
    from_spares = []
    real_copy_of = spares.copy_of
    spares.copy_of = lambda array: (from_spares.append(spares.nbytes > 0), real_copy_of(array))[1]
    strokes = []
    for number, (y, x) in enumerate([(600, 600), (1400, 1300), (700, 1500)]):
        value = 3 if labels.data[y, x] != 3 else 1
        labels.paint((y, x), value)
        strokes.append((y, x, value))
        qtbot.waitUntil(lambda count=number + 1: len(runs) == count, timeout=5000)
        qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT)
        assert widget.status.value.startswith("Done"), widget.status.value
    # each run copies the plane as found, as its previews leave it, and merged with the strokes: the first run
    # into new arrays, the later ones into those the run before them left
    assert len(from_spares) == 9 and not any(from_spares[:3]) and all(from_spares[3:]), from_spares
    after = np.asarray(labels.data)
    result = widget.results.of(labels)
    user = after != result.baseline
    for y, x, value in strokes:
        assert after[y, x] == value and result.edited[y, x]   # each stroke stays the user's
    assert result.edited.sum() <= 3 * 40 * 40
    assert not np.any(user & ~result.edited)         # everywhere else: the run's answer


def test_with_live_on_the_next_rerun_is_readied_while_nothing_runs_and_a_stroke_stops_it(qtbot, widget):
    """Once Live is on and nothing runs, the widget readies the next re-run in the background (the image's snapping
    weights, copies of the layer's plane); a stroke meanwhile stops it and re-runs at once, and every stroke stays
    the user's with everything else the run's answer, as without readying."""
    from napari_clearclip.progress import run_to_end

    labels, runs = _live_on_large_shapes(qtbot, widget)
    assert widget.readying.running                       # started when Live went on
    strokes = [(600, 600), (1400, 1300)]
    for number, (y, x) in enumerate(strokes):
        value = 3 if labels.data[y, x] != 3 else 1
        labels.paint((y, x), value)                      # the first while it readies
        qtbot.waitUntil(lambda count=number + 1: len(runs) == count, timeout=5000)
        assert not widget.readying.running               # the run has the machine to itself
        qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT)
        assert widget.status.value.startswith("Done"), widget.status.value
        qtbot.waitUntil(lambda: not widget.readying.running, timeout=TIMEOUT)   # readied again
        strokes[number] = (y, x, value)
    # nothing left to ready: every weight of the image computed, and (at least) three copies of the plane waiting
    assert run_to_end(widget._models.segmenter.prepare_rerun_steps()) == 0
    assert widget._spare_planes.nbytes >= 3 * labels.data.nbytes
    after = np.asarray(labels.data)
    result = widget.results.of(labels)
    for y, x, value in strokes:
        assert after[y, x] == value and result.edited[y, x]
    assert not np.any((after != result.baseline) & ~result.edited)
    widget.live.value = False
    labels.paint((300, 300), 1 if labels.data[300, 300] != 1 else 2)
    qtbot.wait(200)
    assert not widget.readying.running and len(runs) == 2   # Live off: neither re-runs nor readying


def test_with_live_off_and_learning_on_the_run_after_painting_is_readied_too(qtbot, widget):
    """Live off, Learn from my edits on: the user will paint and press Run, so once a run ends the widget readies
    that re-run in the background as with Live on; a stroke starts no run, and Run keeps the stroke. With learning
    off too, nothing is readied."""
    from napari_clearclip.demo.scenes import make_scene
    from napari_clearclip.progress import run_to_end

    viewer = widget._viewer
    image = np.kron(make_scene(7, size=256, objects=(3, 3)).image, np.ones((8, 8, 1), np.uint8))
    widget.image.value = viewer.add_image(image, name="slide")
    widget.switch_to_demo_model()
    widget.classes.value = "red\ngreen\nblue\nyellow\nbackground"
    widget.live.value, widget.learn.value = False, True
    started = []
    real_start = widget.readying.start
    widget.readying.start = lambda *args: started.append(args) or real_start(*args)
    run_and_wait(qtbot, widget)
    assert len(started) == 1                                 # readied once the run ended, Live off
    qtbot.waitUntil(lambda: not widget.readying.running, timeout=TIMEOUT)
    assert run_to_end(widget._models.segmenter.prepare_rerun_steps()) == 0   # every weight of the image ready
    labels = viewer.layers["slide classes"]
    assert widget._spare_planes.nbytes >= 3 * labels.data.nbytes
    y, x = 700, 900
    value = 3 if labels.data[y, x] != 3 else 1
    labels.brush_size = 40
    labels.paint((y, x), value)
    qtbot.wait(200)
    assert not widget.busy and len(started) == 1              # Live off: the stroke starts nothing
    run_and_wait(qtbot, widget)
    assert widget.status.value.startswith("Done"), widget.status.value
    assert labels.data[y, x] == value and widget.results.of(labels).edited[y, x]
    qtbot.waitUntil(lambda: not widget.readying.running, timeout=TIMEOUT)
    assert len(started) == 2
    widget.learn.value = False
    run_and_wait(qtbot, widget)
    assert len(started) == 2 and not widget.readying.running   # neither Live nor learning: nothing readied
    widget.learn.value = True                                  # learning on again: the re-run to come is readied
    assert len(started) == 3


EXIT_WHILE_READYING = """
import sys, time
import numpy as np
import napari
from qtpy.QtWidgets import QApplication
from napari_clearclip.demo.scenes import make_scene

viewer = napari.Viewer(show=True)
_, widget = viewer.window.add_plugin_dock_widget("napari-clearclip", "ClearCLIP segmentation")
widget.switch_to_demo_model()
widget.device.value = "cpu"
widget.snap.value, widget.learn.value, widget.live.value = True, True, False
image = np.kron(make_scene(7, size=256, objects=(3, 3)).image, np.ones((8, 8, 1), np.uint8))
widget.image.value = viewer.add_image(image, name="slide")
widget.classes.value = "red\\ngreen\\nblue\\nyellow\\nbackground"
widget.run()
deadline = time.monotonic() + 200
while (widget.busy or "slide classes" not in viewer.layers) and time.monotonic() < deadline:
    QApplication.processEvents()
    time.sleep(0.01)
widget.live.value = True          # readying starts; the script ends at once, the viewer still open
print("readying", widget.readying.running, flush=True)
sys.exit(0)
"""


def test_a_script_that_ends_while_the_widget_readies_exits_cleanly(tmp_path):
    """Python exiting while the next re-run is readied (a script that ends without closing its viewer): the job is
    stopped and ends its band before Qt's objects go; no thread starts meanwhile, and nothing is reported."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, NAPARI_CLEARCLIP_CACHE_DIR=str(tmp_path / "cache"),
               NAPARI_CLEARCLIP_CONFIG_DIR=str(tmp_path / "config"))
    done = subprocess.run([sys.executable, "-c", EXIT_WHILE_READYING], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "readying True" in done.stdout, done.stdout + done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "aborted thread" not in done.stderr, done.stderr[-2000:]
