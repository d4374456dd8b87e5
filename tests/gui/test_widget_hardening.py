"""The widget at the edges of normal use: long messages, offline weights, colours, layers coming and going,
closing during a run, and a GUI thread that never stalls, also while results are written (needs a display)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("qtpy.QtWidgets", reason="the widget tests need a Qt binding (the testing extra)")
from napari.layers import Labels  # noqa: E402
from napari.utils.colormaps.standardize_color import transform_color  # noqa: E402

from napari_clearclip.choices import DEMO_MODEL  # noqa: E402
from napari_clearclip.gui.fields import model_choices  # noqa: E402
from gui_helpers import TIMEOUT, TickRecorder, blue_squares, counted_runs, debris_result, run_and_wait  # noqa: E402
from napari_clearclip.colours import NAMED  # noqa: E402
from napari_clearclip.demo.scenes import DEMO_CLASSES  # noqa: E402

pytestmark = pytest.mark.gui


class StepTimes(list):
    """Seconds of each step, with the step's name beside it (``names``) for the failure message."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def clear(self) -> None:
        super().clear()
        self.names.clear()

    def __str__(self) -> str:
        return ", ".join(f"{name} {seconds * 1000:.0f} ms" for name, seconds in zip(self.names, self))


def time_gui_steps(widget) -> "StepTimes":
    """Durations of every step the widget itself runs on the GUI thread (starting, progress, writing the result).

    napari's one-time setup for the first Labels layer of a process (vispy overlays, imports:
    0.3 to 0.6 s here) is paid first with a small layer, as any earlier Labels layer would.
    """
    warm = widget._viewer.add_labels(np.zeros((8, 8), np.uint8), name="warm-up")
    widget._viewer.layers.remove(warm)
    durations = StepTimes()

    def timed(function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                durations.append(time.perf_counter() - start)
                durations.names.append(function.__name__)
        return wrapper

    for name in ("run", "_on_yielded", "_on_returned", "_on_finished"):
        widget.__dict__[name] = timed(getattr(widget, name))
    return durations


def napari_insertion_seconds(viewer, shape: tuple) -> float:
    """napari's own cost, on this machine at this moment, of adding a ready-made hidden Labels layer of ``shape``
    (as the widget adds a new result): the floor of the widget's step that writes a new result."""
    from napari.utils.colormaps import DirectLabelColormap

    labels = np.ones(shape, np.uint8)
    layer = Labels(labels, visible=False, colormap=DirectLabelColormap(
        color_dict={None: "transparent", 0: "transparent", 1: "red", 2: "green", 3: "blue"}))
    start = time.perf_counter()
    viewer.add_layer(layer)
    took = time.perf_counter() - start
    viewer.layers.remove(layer)
    return took


def gui_step_limit(viewer, shape: tuple) -> float:
    """The 0.3 s bar for every GUI-thread step; on a machine slowed down so much that napari's own adding of the
    result layer alone takes more (the quickest of three, measured right after the widget's run, so that no
    one-time cost counts), the widget may add no more than 50 ms to it."""
    return max(0.3, min(napari_insertion_seconds(viewer, shape) for _ in range(3)) + 0.05)


def test_a_long_message_wraps_and_never_widens_the_window(qtbot, widget):
    window = widget.native.window()
    qtbot.wait(200)
    width, height, dock_width = window.width(), window.height(), widget.native.width()
    dock_height = widget.native.height()
    widget._set_status("The weights could not be loaded because " + "a very long reason " * 200 + "x" * 400)
    widget.legend.value = "<br>".join(f"{i}: " + "long class name " * 30 for i in range(20))
    qtbot.wait(300)
    assert (window.width(), window.height()) == (width, height)
    assert widget.native.width() <= dock_width and widget.native.height() <= dock_height
    label = widget.status.native
    assert label.height() >= label.heightForWidth(label.width())       # the whole message, no line cut
    assert widget.scroll_area.verticalScrollBar().maximum() > 0          # the dock scrolls to show it
    widget._set_status("Ready")
    widget.legend.value = ""
    qtbot.wait(100)
    assert (window.width(), window.height()) == (width, height)
    assert widget.status.native.wordWrap() and widget.legend.native.wordWrap()


def test_offline_weights_point_to_the_checkpoint_field_and_the_demo_model(qtbot, widget, rgb_image):
    viewer = widget._viewer
    widget.image.value = viewer.add_image(rgb_image, name="photo")
    widget.model.value = "ViT-B-16"
    widget.pretrained.value = "openai"
    widget.classes.value = "cell, nucleus\nbackground"
    run_and_wait(qtbot, widget)
    status = widget.status.value
    assert "Choose file" in status and "ViT-B-16-quickgelu" in status and "offline demo model" in status
    assert "Segmenter(" not in status                       # GUI words, not Python
    assert widget.use_demo.visible
    assert "photo classes" not in viewer.layers
    widget.use_demo.clicked.emit()
    assert widget.model.value == DEMO_MODEL and widget.pretrained.value == "bundled"
    assert widget.classes.value == DEMO_CLASSES and not widget.use_demo.visible
    run_and_wait(qtbot, widget)
    assert "photo classes" in viewer.layers
    assert "only coloured shapes" in widget.status.value     # the demo model says it is no photo model


def test_colours_follow_class_names_and_extra_labels_stay_visible(qtbot, widget, rgb_image):
    viewer = widget._viewer
    widget.image.value = viewer.add_image(rgb_image, name="photo")
    widget.classes.value = "green\nsky\nsoil"
    run_and_wait(qtbot, widget)
    labels = viewer.layers["photo classes"]
    first = {name: labels.colormap.map(i) for i, name in enumerate(["green", "sky", "soil"], start=1)}
    np.testing.assert_allclose(first["green"], transform_color(NAMED["green"])[0])
    widget.classes.value = "soil\ngreen\nsky"
    run_and_wait(qtbot, widget)
    for i, name in enumerate(["soil", "green", "sky"], start=1):
        np.testing.assert_allclose(labels.colormap.map(i), first[name])
    assert labels.colormap.map(9)[3] > 0                  # a label painted beyond the classes is visible
    assert 'color:#3CB44B' in widget.legend.value.replace(" ", "")


def test_image_field_follows_new_images_and_the_legend_follows_the_image(qtbot, widget, rgb_image):
    viewer = widget._viewer
    first = viewer.add_image(rgb_image, name="first")
    assert widget.image.value is not None and widget.image.value.name == "first"
    widget.classes.value = "a\nb"
    run_and_wait(qtbot, widget)
    assert "a" in widget.legend.value and "%" in widget.legend.value
    viewer.add_image(rgb_image[::-1].copy(), name="second")
    assert widget.image.value.name == "second"
    assert widget.legend.value == ""
    widget.image.value = first
    widget.classes.value = "a\na"
    assert widget.run() is None and widget.legend.value == ""


def test_legend_shares_count_kept_edits(qtbot, widget, rgb_image):
    viewer = widget._viewer
    widget.image.value = viewer.add_image(rgb_image, name="photo")
    widget.classes.value = "a\nb"
    run_and_wait(qtbot, widget)
    labels = viewer.layers["photo classes"]
    painted = labels.data.copy()
    painted[:] = 2
    labels.data = painted                                  # the user paints everything as "b"
    run_and_wait(qtbot, widget)
    assert widget.status.value.startswith("Done"), widget.status.value
    assert "(100%)" in widget.legend.value.split("<br>")[1]


@pytest.mark.parametrize("dtype", [np.int32, np.uint16, np.int64])
def test_a_result_given_labels_of_another_type_is_updated_and_keeps_the_users_pixels(qtbot, widget, rgb_image, dtype):
    """A result layer whose data the user replaced with an array of another integer type (their own corrections,
    say) is updated in place on the next run: the run's previews wrote into it and then failed in napari's event
    loop, and counted what they wrote as the user's edits."""
    viewer = widget._viewer
    widget.image.value = viewer.add_image(rgb_image, name="photo")
    widget.classes.value = "sky\ngrass\nbackground"
    run_and_wait(qtbot, widget)
    labels = viewer.layers["photo classes"]
    first = labels.data.copy()
    mine = first.astype(dtype)
    mine[:10, :10] = np.where(first[:10, :10] == 1, 2, 1)      # 100 pixels of the user's, each changed
    labels.data = mine
    layers = len(viewer.layers)
    run_and_wait(qtbot, widget)
    assert widget.status.value.startswith("Done: photo classes (1 slice); kept 100 edited pixels"), widget.status.value
    assert len(viewer.layers) == layers and labels.data.dtype == dtype      # the same layer, updated in place
    np.testing.assert_array_equal(labels.data[:10, :10], mine[:10, :10])


def test_a_result_stays_its_images_when_either_is_renamed_and_never_becomes_another_images(qtbot, widget, rgb_image):
    """Runs update the result of the image they segment: found by the image layer, not by the result's name, so
    a result the user renamed is still updated (Live on a renamed result added a second layer and left the
    strokes on the first untaught), and an image given the old name of another gets its own result instead of
    overwriting the other's. An image opened again under its name gets its result back."""
    viewer = widget._viewer
    photo = viewer.add_image(rgb_image, name="photo")
    widget.image.value = photo
    widget.classes.value = "sky\ngrass\nbackground"
    run_and_wait(qtbot, widget)
    result = viewer.layers["photo classes"]
    painted = result.data.copy()
    painted[:6, :6] = np.where(painted[:6, :6] == 1, 2, 1)
    result.data = painted
    result.name = "my corrections"
    layers = len(viewer.layers)
    run_and_wait(qtbot, widget)
    assert widget.status.value.startswith("Done: my corrections (1 slice); kept 36 edited pixels"), widget.status.value
    assert len(viewer.layers) == layers
    np.testing.assert_array_equal(result.data[:6, :6], painted[:6, :6])
    photo.name = "old photo"
    run_and_wait(qtbot, widget)
    assert widget.status.value.startswith("Done: my corrections"), widget.status.value
    assert len(viewer.layers) == layers
    # another image under the first one's old name: a result of its own, the first one's left as it was
    result.name = "photo classes"
    before = result.data.copy()
    other = viewer.add_image(np.ascontiguousarray(rgb_image[::-1]), name="photo")
    widget.image.value = other
    run_and_wait(qtbot, widget)
    assert len(viewer.layers) == layers + 2, [layer.name for layer in viewer.layers]
    np.testing.assert_array_equal(viewer.layers["photo classes"].data, before)
    # the first image removed and opened again under its name: its result is updated, its edits kept
    viewer.layers.remove(other)
    viewer.layers.remove(viewer.layers[-1])           # the other image's result
    viewer.layers.remove(photo)
    widget.image.value = viewer.add_image(rgb_image, name="photo")
    run_and_wait(qtbot, widget)
    assert widget.status.value.startswith("Done: photo classes (1 slice); kept 36 edited pixels"), widget.status.value
    assert [layer.name for layer in viewer.layers] == ["photo classes", "photo"]


def test_probability_maps_never_replace_a_layer_of_the_users_that_has_their_name(qtbot, widget, rgb_image):
    """A run's probability map goes into the layer it wrote for that image before, never into a layer of the user's
    (or of another image) that happens to be named "<image> probability": that layer's data was replaced."""
    viewer = widget._viewer
    photo = viewer.add_image(rgb_image, name="photo")
    mine = np.random.default_rng(3).random(rgb_image.shape[:2]).astype(np.float32)
    viewer.add_image(mine.copy(), name="photo probability")
    widget.image.value = photo
    widget.classes.value = "sky\ngrass"
    widget.probability_output.value = "winning class"
    run_and_wait(qtbot, widget)
    np.testing.assert_array_equal(viewer.layers["photo probability"].data, mine)
    written = [layer for layer in viewer.layers if layer.name.startswith("photo probability ")]
    assert len(written) == 1 and written[0].data.shape == mine.shape and written[0].data.max() <= 1, written
    layers = len(viewer.layers)
    widget.classes.value = "sky\ngrass\nbackground"
    run_and_wait(qtbot, widget)
    assert len(viewer.layers) == layers                # the map it wrote is updated, not added again
    np.testing.assert_array_equal(viewer.layers["photo probability"].data, mine)
    assert not np.array_equal(written[0].data, mine)


def test_fields_explain_themselves(widget):
    for name in ("image", "model", "pretrained", "choose_weights", "method", "device", "probability_output",
                 "new_layer", "crop", "stride", "logit_scale", "precision", "feature_store", "choose_feature_store"):
        assert getattr(widget, name).tooltip, name
    assert "NACLIP" in widget.method.tooltip and "MaskCLIP" in widget.method.tooltip
    from qtpy.QtWidgets import QLabel

    texts = [label.text() for label in widget.native.findChildren(QLabel)]
    assert "advanced" not in texts


def test_model_list_has_only_models_that_load():
    values = [value for _, value in model_choices()]
    assert values[:5] == ["ViT-B-16", "ViT-B-32", "ViT-L-14", "ViT-L-14-336", "ViT-B-16-quickgelu"]
    assert values[5] == DEMO_MODEL
    assert not {"coca_base", "RN50", "ViT-B-16-SigLIP", "convnext_base", "EVA02-B-16"} & set(values)


def test_deleted_results_are_forgotten(qtbot, widget, rgb_image):
    viewer = widget._viewer
    widget.image.value = viewer.add_image(rgb_image, name="photo")
    widget.classes.value = "a\nb"
    for _ in range(3):
        run_and_wait(qtbot, widget)
        viewer.layers.remove("photo classes")
        assert len(widget.results) == 0


def test_closing_the_widget_during_a_run_stops_it_quietly(qtbot, widget):
    viewer = widget._viewer
    big = (np.random.default_rng(0).random((600, 600, 3)) * 255).astype(np.uint8)
    widget.image.value = viewer.add_image(big, name="big")
    widget.classes.value = "a\nb"
    widget.resize.value = False
    widget.crop.value, widget.stride.value = 64, 8
    worker = widget.run()
    qtbot.waitUntil(lambda: worker.is_running, timeout=TIMEOUT)
    widget.close_down()
    with qtbot.waitSignal(worker.finished, timeout=TIMEOUT, raising=False):
        pass
    qtbot.waitUntil(lambda: not worker.is_running, timeout=TIMEOUT)
    qtbot.wait(100)
    assert "big classes" not in viewer.layers
    assert viewer.layers.events.inserted.callbacks == () or all(
        getattr(cb, "__self__", None) is not widget for cb in viewer.layers.events.inserted.callbacks)


def test_gui_thread_never_stalls_while_a_4096_result_is_written(qtbot, widget):
    viewer = widget._viewer
    rng = np.random.default_rng(3)
    image = np.kron(rng.integers(0, 255, (16, 16, 3)), np.ones((256, 256, 1))).astype(np.uint8)   # 4096 x 4096
    widget.image.value = viewer.add_image(image, name="huge")
    widget.classes.value = "a\nb\nc"
    widget.short_side.value = 224
    widget.snap.value = False           # edge snapping at 4096 x 4096 only lengthens the worker's part
    qtbot.wait(300)
    napari_insertion_seconds(viewer, (4096, 4096))  # napari: one-time costs of a first large layer
    steps = time_gui_steps(widget)
    for number in range(2):                                # a new layer, then an in-place update
        for attempt in range(2):  # a step over the bar is timed once more: a busy machine can stall any one step
            if number == 0 and attempt == 1:
                viewer.layers.remove("huge classes")       # a new layer again
            steps.clear()
            with TickRecorder() as recorder:
                run_and_wait(qtbot, widget)
                qtbot.wait(200)
            limit = gui_step_limit(viewer, (4096, 4096))
            assert widget.status.value.startswith("Done"), widget.status.value
            if max(steps) < limit and recorder.longest_gap < 0.6:
                break
        # the widget's own GUI-thread steps, writing the result included, stay under 0.3 s; the event
        # loop as a whole also waits for napari's first draw of the new layer (vispy, Mesa llvmpipe here)
        assert max(steps) < limit, (f"a GUI-thread step of the widget took {max(steps) * 1000:.0f} ms, over "
                                    f"{limit * 1000:.0f} ms twice ({steps})")
        assert recorder.longest_gap < 0.6, f"GUI thread blocked for {recorder.longest_gap * 1000:.0f} ms twice"
    labels = viewer.layers["huge classes"]
    assert labels.data.shape == (4096, 4096) and labels.data.max() >= 1


def test_gui_thread_never_stalls_for_a_stack_on_all_slices(qtbot, widget):
    viewer = widget._viewer
    rng = np.random.default_rng(4)
    stack = np.kron(rng.integers(0, 255, (24, 8, 8)), np.ones((1, 64, 64))).astype(np.uint8)      # 24 x 512 x 512
    widget.image.value = viewer.add_image(stack, name="stack")
    widget.classes.value = "a\nb"
    widget.scope.value = "all slices"
    widget.short_side.value = 224
    widget.snap.value = False
    qtbot.wait(300)
    napari_insertion_seconds(viewer, (24, 512, 512))  # napari: one-time costs of a first large layer
    steps = time_gui_steps(widget)
    for number in range(2):                                # a new layer, then an in-place update
        for attempt in range(2):  # a step over the bar is timed once more: a busy machine can stall any one step
            if number == 0 and attempt == 1:
                viewer.layers.remove("stack classes")      # a new layer again
            steps.clear()
            with TickRecorder() as recorder:
                run_and_wait(qtbot, widget)
                qtbot.wait(200)
            limit = gui_step_limit(viewer, (24, 512, 512))
            if max(steps) < limit and recorder.longest_gap < 0.5:
                break
        # 0.3 s, the bar for every GUI-thread step: most of the first result's step is napari inserting a 3-D
        # Labels layer (vispy visuals, overlays, layer controls), 0.16-0.28 s on a slow 2-core CPU
        assert max(steps) < limit, (f"a GUI-thread step of the widget took {max(steps) * 1000:.0f} ms, over "
                                    f"{limit * 1000:.0f} ms twice ({steps})")
        assert recorder.longest_gap < 0.5, f"GUI thread blocked for {recorder.longest_gap * 1000:.0f} ms twice"
    assert isinstance(viewer.layers["stack classes"], Labels)
    assert np.all(viewer.layers["stack classes"].data > 0)


def test_live_mode_reruns_after_a_stroke_and_never_overwrites_it(qtbot, widget, rgb_image):
    viewer = widget._viewer
    widget.image.value = viewer.add_image(rgb_image, name="photo")
    widget.classes.value = "a\nb"
    run_and_wait(qtbot, widget)
    labels = viewer.layers["photo classes"]
    runs = counted_runs(widget)
    widget.live.value = True
    recorders = []
    for attempt in range(2):  # a stroke over the bar is timed once more (the other class): a busy machine can stall
        value = 1 if labels.data[90, 130] == 2 else 2  # any one step
        with TickRecorder() as recorder:
            labels.brush_size = 5
            labels.paint((90, 130), value)              # one stroke on the result
            qtbot.waitUntil(lambda attempt=attempt: len(runs) == attempt + 1, timeout=5000)
            qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT)
            qtbot.wait(500)
        recorders.append(recorder)
        assert len(runs) == attempt + 1                 # one stroke, one re-run
        assert labels.data[90, 130] == value            # the stroke is kept (and taught the model)
        assert widget.status.value.startswith("Done")
        if recorder.longest_gap < 0.3:
            break
    assert min(recorder.longest_gap for recorder in recorders) < 0.3, "; ".join(
        recorder.describe() for recorder in recorders)
    widget.classes.value = "a\nb\nc"                    # typing: debounced into one more run
    widget.classes.value = "a\nb\nc\nd"
    qtbot.waitUntil(lambda: len(runs) == len(recorders) + 1, timeout=5000)
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT)
    qtbot.wait(500)
    assert len(runs) == len(recorders) + 1
    assert widget.status.value.startswith("Done"), widget.status.value
    assert list(labels.features["class"])[:5] == ["unassigned", "a", "b", "c", "d"]


def test_live_mode_runs_when_a_stroke_ends_without_waiting_for_the_typing_delay(qtbot, widget, rgb_image):
    """napari reports a stroke once, when the mouse is released: the re-run starts then; only typing (one report
    per keystroke) waits for a pause."""
    viewer = widget._viewer
    widget.image.value = viewer.add_image(rgb_image, name="photo")
    widget.classes.value = "a\nb"
    run_and_wait(qtbot, widget)
    labels = viewer.layers["photo classes"]
    runs = counted_runs(widget)
    widget.live.value = True
    widget.live_mode._timer.setInterval(60_000)         # typing would wait a minute
    labels.brush_size = 5
    labels.paint((90, 130), 1 if labels.data[90, 130] == 2 else 2)
    qtbot.waitUntil(lambda: len(runs) == 1, timeout=5000)
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT)
    labels.undo()                                        # an undo is one action too
    qtbot.waitUntil(lambda: len(runs) == 2, timeout=5000)
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT)
    widget.classes.value = "a\nb\nc"                    # typing waits for its pause
    qtbot.wait(1000)
    assert len(runs) == 2


def test_demo_model_on_its_sample_labels_the_background_background(qtbot, widget):
    from napari_clearclip.demo.scenes import make_scene

    viewer = widget._viewer
    viewer.open_sample("napari-clearclip", "synthetic_shapes")
    assert widget.image.value.name == "synthetic shapes"
    widget.classes.value = "cell, nucleus\nbackground"           # the default a new user starts from
    widget.switch_to_demo_model()
    assert widget.classes.value == DEMO_CLASSES                   # the sample's suggested classes
    run_and_wait(qtbot, widget)
    labels = viewer.layers["synthetic shapes classes"].data
    background = make_scene(10, size=256, objects=(3, 4)).label_image() == 0
    assert np.mean(labels[background] == 5) >= 0.8
    assert "only coloured shapes" not in widget.status.value     # no warning on the demo's own sample


def test_a_stroke_in_the_widget_teaches_similar_regions(qtbot, widget):
    """The demo model does not know "debris": one stroke on one blue square, and the other follows (learn on, not off)."""
    from skimage.draw import disk

    viewer = widget._viewer
    widget.switch_to_demo_model()
    widget.image.value = viewer.add_image(blue_squares(red=True), name="shapes")
    widget.classes.value = "debris\nred\nbackground"
    other = (slice(128, 160), slice(128, 160))                 # the square nobody paints
    results = {}
    for learn in (False, True):
        widget.learn.value = learn
        run_and_wait(qtbot, widget)
        labels = viewer.layers["shapes classes"]
        assert np.mean(labels.data[other] == 1) < 0.5          # the text alone does not find it
        rr, cc = disk((48, 48), 4)
        painted = labels.data.copy()
        painted[rr, cc] = 1                                    # one small debris stroke on the first square
        labels.data = painted
        run_and_wait(qtbot, widget)
        results[learn] = labels.data.copy()
        assert np.all(labels.data[rr, cc] == 1)                # the stroke is kept either way
        viewer.layers.remove(labels)
    assert np.mean(results[False][other] == 1) < 0.5           # kept, but taught nothing
    assert np.mean(results[True][other] == 1) > 0.9            # taught: the other square is debris too


def test_an_undone_stroke_teaches_nothing_and_is_no_longer_kept(qtbot, widget):
    from skimage.draw import disk

    labels = debris_result(qtbot, widget)
    zero_shot = labels.data.copy()
    other = (slice(128, 160), slice(128, 160))
    labels.brush_size = 9
    labels.paint((48, 48), 1)                                   # a debris stroke with napari's brush
    run_and_wait(qtbot, widget)
    assert np.mean(labels.data[other] == 1) > 0.9               # it taught the other square
    labels.undo()                                               # the user takes the stroke back
    rr, cc = disk((48, 48), 4)
    np.testing.assert_array_equal(labels.data[rr, cc], zero_shot[rr, cc])
    run_and_wait(qtbot, widget)
    np.testing.assert_array_equal(labels.data, zero_shot)      # as if the stroke had never been made


def test_a_stroke_undone_while_a_run_computes_is_taken_back_too(qtbot, widget):
    labels = debris_result(qtbot, widget)
    zero_shot = labels.data.copy()
    labels.brush_size = 9
    labels.paint((48, 48), 1)
    run_and_wait(qtbot, widget)                                 # taught by the stroke
    painted = labels.data != zero_shot
    worker = widget.run()                                       # starts from the layer as it is now...
    labels.undo()                                               # ...and the stroke is undone before it ends
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT)
    assert worker is not None
    output = widget.results.of(labels)
    assert not output.edited[painted].any()                     # the run's result did not bring the stroke back
    run_and_wait(qtbot, widget)
    np.testing.assert_array_equal(labels.data, zero_shot)


def test_a_redone_stroke_is_kept_and_teaches_again(qtbot, widget):
    from skimage.draw import disk

    labels = debris_result(qtbot, widget)
    other = (slice(128, 160), slice(128, 160))
    assert np.mean(labels.data[other] == 1) < 0.5
    labels.brush_size = 9
    labels.paint((48, 48), 1)                                   # a debris stroke
    run_and_wait(qtbot, widget)
    taught = labels.data.copy()
    labels.undo()                                               # taken back...
    labels.redo()                                               # ...and brought back
    rr, cc = disk((48, 48), 4)
    assert np.all(labels.data[rr, cc] == 1)
    run_and_wait(qtbot, widget)
    assert np.all(labels.data[rr, cc] == 1)                     # still the user's stroke
    assert np.mean(labels.data[other] == 1) > 0.9               # and still teaching
    np.testing.assert_array_equal(labels.data, taught)


def test_a_stroke_redone_while_a_run_computes_stays_the_users(qtbot, widget):
    labels = debris_result(qtbot, widget)
    labels.brush_size = 9
    labels.paint((48, 48), 1)
    run_and_wait(qtbot, widget)
    taught = labels.data.copy()
    labels.undo()
    worker = widget.run()                                       # starts without the stroke...
    labels.redo()                                               # ...which comes back before it ends
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT)
    assert worker is not None
    run_and_wait(qtbot, widget)
    np.testing.assert_array_equal(labels.data, taught)          # kept, and teaching as before


def test_a_class_name_cut_at_the_token_limit_is_said_in_the_status(qtbot, widget):
    viewer = widget._viewer
    widget.image.value = viewer.add_image(np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8),
                                          name="noise")
    long_name = " ".join(["very"] * 80) + " long cell"
    widget.classes.value = f"{long_name}\nbackground"
    run_and_wait(qtbot, widget)
    assert "longer than the model reads (77 tokens" in widget.status.value
    assert "'very very very" in widget.status.value


def test_the_dock_fits_a_laptop_screen_with_every_section_open(qtbot, widget):
    window = widget.native.window()
    window.resize(1366, 768)
    qtbot.wait(200)
    assert widget.native.minimumSizeHint().height() < 400          # the form scrolls instead of setting a height
    widget.show_advanced.value = True
    widget._set_status("x " * 2000)
    widget.legend.value = "<br>".join(f"{i}: class" for i in range(40))
    qtbot.wait(200)
    assert window.height() <= 768 and window.width() <= 1366
    assert widget.scroll_area.verticalScrollBar().maximum() > 0      # everything is there, further down
    widget.show_advanced.value = False
    qtbot.wait(100)
    assert window.height() <= 768


def test_on_a_laptop_screen_run_and_the_status_show_without_scrolling_and_nothing_is_captioned_twice(qtbot, widget):
    from qtpy.QtWidgets import QLabel

    window = widget.native.window()
    window.resize(1366, 768)
    qtbot.wait(200)
    area = widget.scroll_area
    area.verticalScrollBar().setValue(0)
    qtbot.wait(50)

    def shown(item) -> bool:   # wholly inside the dock's visible part
        top = item.native.mapTo(area.viewport(), item.native.rect().topLeft()).y()
        return item.native.isVisible() and 0 <= top and top + item.native.height() <= area.viewport().height()
    assert shown(widget.run_button) and shown(widget.cancel_button)
    # the class box is a few lines high: the dock's spare height does not go into its row
    assert widget.classes.native.height() < 8 * widget.classes.native.fontMetrics().lineSpacing()
    texts = [label.text() for label in widget.native.findChildren(QLabel)]
    assert texts.count("Status") == 1 and texts.count("Legend") == 1
    assert not any("box" in text.lower() for text in texts)        # no row captioned with a name of the code
    # scrolled to the end, the legend's last line is at the bottom: no blank space left below it
    widget.legend.value = "<br>".join(f"{i}: class" for i in range(12))
    qtbot.wait(200)
    area.verticalScrollBar().setValue(area.verticalScrollBar().maximum())
    qtbot.wait(50)
    legend = widget.legend.native
    bottom = legend.mapTo(area.viewport(), legend.rect().bottomLeft()).y()
    assert area.viewport().height() - 40 <= bottom <= area.viewport().height()


def test_rows_that_do_not_apply_stay_hidden_until_an_image_needs_them(qtbot, widget):
    assert widget.image.value is None
    for name in ("channel_axis", "channel", "scope"):
        assert getattr(widget, name).native.isHidden(), name
    viewer = widget._viewer
    widget.image.value = viewer.add_image(np.zeros((3, 5, 64, 64), np.uint8), name="stack")
    assert not widget.channel_axis.native.isHidden() and not widget.scope.native.isHidden()


def test_closing_down_twice_and_after_qt_deleted_its_timer_raises_nothing(widget):
    class DeletedTimer:
        def stop(self):
            raise RuntimeError("wrapped C/C++ object of type QTimer has been deleted")

        start = stop

    widget.live_mode._timer = DeletedTimer()             # as at interpreter exit, when Qt went first
    widget.close_down()
    widget.close_down()
    widget.live_mode.trigger()                           # late signals find it closed, quietly


def test_one_weights_field_with_a_file_chooser(qtbot, widget, tiny_checkpoint, monkeypatch):
    from qtpy.QtWidgets import QFileDialog

    assert not hasattr(widget, "checkpoint")
    widget.pretrained.value = ""
    monkeypatch.setattr(QFileDialog, "getOpenFileName", staticmethod(lambda *a, **k: (tiny_checkpoint, "")))
    widget.choose_weights.clicked.emit()
    assert widget.pretrained.value == tiny_checkpoint


def test_a_cancelled_run_keeps_the_loaded_model(qtbot, widget, rgb_image):
    import napari_clearclip.gui.job as job

    loads = []
    real = job.Segmenter
    widget.image.value = widget._viewer.add_image(rgb_image, name="photo")
    widget.classes.value = "a\nb"
    job.Segmenter = lambda *a, **k: loads.append(a) or real(*a, **k)
    try:
        worker = widget.run()
        worker.yielded.connect(lambda step: step.stage == "windows" and widget.cancel())
        qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT)
        assert widget.status.value.startswith("Cancelled")
        run_and_wait(qtbot, widget)
        assert widget.status.value.startswith("Done")
        assert len(loads) == 1                            # loaded once, for both runs
    finally:
        job.Segmenter = real


def test_no_classes_is_said_in_the_widgets_terms(qtbot, widget, rgb_image):
    widget.image.value = widget._viewer.add_image(rgb_image, name="photo")
    widget.classes.value = "  \n "
    assert widget.run() is None
    assert "type at least one class in Classes, one per line" in widget.status.value
    assert "['cell'" not in widget.status.value


def test_background_classes_are_transparent_and_the_user_can_mark_one(qtbot, widget, rgb_image):
    viewer = widget._viewer
    widget.image.value = viewer.add_image(rgb_image, name="photo")
    widget.classes.value = "cell\njunk\nbackground"
    assert set(widget.background.choices) == {None, "cell", "junk", "background"}
    run_and_wait(qtbot, widget)
    colours = viewer.layers["photo classes"].colormap.color_dict
    assert colours[3][3] == 0 and colours[1][3] > 0 and colours[2][3] > 0     # "background", by its name
    widget.background.value = "junk"                                         # marked by the user
    run_and_wait(qtbot, widget)
    colours = viewer.layers["photo classes"].colormap.color_dict
    assert colours[2][3] == 0 and colours[1][3] > 0
    assert "&#9633;" in widget.legend.value.split("<br>")[1]                 # an outline in the legend
    widget.classes.value = "cell\nbackground"
    assert widget.background.value is None                                   # the marked class is gone


FIRST_RESULT = r"""
import sys, threading, time
from collections import Counter
import numpy as np
import napari
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QApplication
from napari_clearclip.demo.scenes import sample_scene

main, samples, stop = threading.main_thread().ident, [], threading.Event()
def sample():  # what the GUI thread is doing, every 20 ms: to say where a freeze was
    while not stop.is_set():
        frame, where = sys._current_frames().get(main), []
        while frame is not None and len(where) < 3:
            where.append(f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_code.co_name}")
            frame = frame.f_back
        samples.append((time.perf_counter(), " < ".join(where)))
        time.sleep(0.02)
viewer = napari.Viewer(show=True)
_, widget = viewer.window.add_plugin_dock_widget("napari-clearclip", "ClearCLIP segmentation")
widget.switch_to_demo_model()
widget.image.value = viewer.add_image(np.tile(sample_scene(256), (4, 4, 1)), name="scene")
widget.snap.value = False
ticks = []
timer = QTimer(); timer.setInterval(10); timer.timeout.connect(lambda: ticks.append(time.perf_counter())); timer.start()
threading.Thread(target=sample, daemon=True).start()
app = QApplication.instance()
widget.run(); widget.wait(600)
end = time.perf_counter() + 1.0
while time.perf_counter() < end:
    app.processEvents(); time.sleep(0.002)
stop.set()
gaps = np.diff(ticks)
longest = int(gaps.argmax())
during = Counter(w for t, w in samples if ticks[longest] < t < ticks[longest + 1])
print("GUI thread during the longest gap:", dict(during.most_common(3)) or "no sample (the GIL was held)")
print(widget.status.value.split(":")[0], float(gaps.max()))
viewer.close()
"""


#: napari's own cost of inserting a first Labels layer of that size in a fresh process, built off the GUI thread as the
#: widget builds its layers (its colormap mapping compiled there too): the yardstick the widget's stall is held to
NAPARI_INSERT = r"""
import threading, time
import numpy as np
import napari
from napari.layers import Labels
from napari.utils.colormaps import DirectLabelColormap
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QApplication
from napari_clearclip.colours import colormap_dict
from napari_clearclip.demo.scenes import sample_scene
from napari_clearclip.gui.job import prepare_first_draw
from napari_clearclip.gui.layers import labels_features

viewer = napari.Viewer(show=True)
image = np.tile(sample_scene(256), (4, 4, 1))
viewer.add_image(image, name="scene")
app = QApplication.instance()
names = ["cell", "nucleus", "background"]
labels = np.random.default_rng(0).integers(0, 4, image.shape[:2]).astype(np.uint8)
colours = colormap_dict(names)
made = {}

def build():
    prepare_first_draw(labels, colours)
    made["layer"] = Labels(labels, features=labels_features(names), colormap=DirectLabelColormap(color_dict=colours),
                           visible=False, name="scene classes")
thread = threading.Thread(target=build)
thread.start()
while thread.is_alive():
    app.processEvents(); time.sleep(0.002)
ticks = []
timer = QTimer(); timer.setInterval(10); timer.timeout.connect(lambda: ticks.append(time.perf_counter())); timer.start()
end = time.perf_counter() + 0.3
while time.perf_counter() < end:
    app.processEvents(); time.sleep(0.002)
layer = made["layer"]
viewer.add_layer(layer)
QTimer.singleShot(0, lambda: setattr(layer, "visible", True))
end = time.perf_counter() + 1.0
while time.perf_counter() < end:
    app.processEvents(); time.sleep(0.002)
print(float(np.diff(ticks).max()))
viewer.close()
"""


def test_the_first_result_of_a_fresh_process_does_not_freeze_napari(tmp_path):
    """Counted in a new process, so napari's one-time costs are in: the colormap mapping numba compiles on the
    first draw now compiles in the worker (here 1.5 s on the GUI thread before). napari's own first insertion of a
    Labels layer remains (0.3-0.45 s on one machine, near 1 s on a slower one): it is measured in a fresh process of
    its own, a layer of that size built off the GUI thread as the widget builds its own, and the widget's longest
    stall may exceed it by the 0.3 s the widget's own steps are held to, no more.

    A stall of the machine (other processes, the kernel reclaiming memory) can hold one tick of any process;
    a freeze of ours recurs in every fresh process. So a second pair of fresh processes is asked for only when the
    first went over, and it must stay under the bound; where each spent its longest gap is reported."""
    import os
    import subprocess
    import sys

    def fresh(script: str, attempt: int, name: str) -> str:
        env = {**os.environ, "NAPARI_CLEARCLIP_CACHE_DIR": str(tmp_path / f"cache-{name}{attempt}"),
               "NAPARI_CLEARCLIP_CONFIG_DIR": str(tmp_path / f"config-{name}{attempt}")}
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    gaps, bounds, reports = [], [], []
    for attempt in range(2):
        bounds.append(float(fresh(NAPARI_INSERT, attempt, "napari").split()[-1]) + 0.3)
        output = fresh(FIRST_RESULT, attempt, "widget")
        status, gap = output.split()[-2:]
        assert status == "Done"
        gaps.append(float(gap))
        reports.append(output.strip().splitlines()[-2])
        if gaps[-1] < bounds[-1]:
            break
    assert gaps[-1] < bounds[-1], (gaps, bounds, reports)


def test_objects_from_another_tool_get_a_class_each_in_their_features(qtbot, widget):
    from skimage.measure import label as connected

    from napari_clearclip import Segmenter
    from napari_clearclip.demo.scenes import held_out_scenes

    scene = held_out_scenes(1, sizes=(192,))[0]
    objects = connected(np.any(np.stack(list(scene.masks.values())), axis=0)).astype(np.int32)
    viewer = widget._viewer
    widget.switch_to_demo_model()
    widget.snap.value = False
    widget.image.value = viewer.add_image(scene.image, name="scene")
    cells = viewer.add_labels(objects, name="cellpose masks")
    assert cells in widget.objects.choices
    widget.objects.value = cells
    run_and_wait(qtbot, widget)
    expected = Segmenter("synthetic-tiny", device="cpu").segment(scene.image, DEMO_CLASSES.split("\n"),
                                                                  objects=objects, contrast_limits=(0, 255),
                                                                  maps=False)
    np.testing.assert_array_equal(viewer.layers["scene classes"].data, expected.labels)
    features = cells.features
    assert list(features["index"]) == list(expected.objects["id"])
    assert list(features["class"]) == list(expected.objects["class"])
    assert viewer.layers["scene classes"] not in widget.objects.choices      # results are no objects layers
    widget.objects.value = viewer.add_labels(np.zeros((5, 5), np.int32), name="other")
    assert widget.run() is None and "pick the objects of this image" in widget.status.value


@pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64",
                    reason="PyTorch and numba share GNU OpenMP on Linux; TBB is installed there")
def test_napari_colormaps_leave_no_openmp_pool_on_the_gui_thread_beside_pytorchs():
    """napari maps int32 labels with a parallel numba loop on its GUI thread. With numba's OpenMP layer that
    loop leaves a pool in the OpenMP runtime PyTorch also uses, and PyTorch in the worker threads slows by
    10-30% (benchmarks/benchmark_worker_threads.py): the TBB the plugin installs must be the layer chosen."""
    pytest.importorskip("numba", reason="napari's colormaps run without numba")
    script = ("import numpy as np, numba, torch\n"
              "from napari.utils.colormaps import DirectLabelColormap\n"
              "torch.ones(4).sum()\n"
              "DirectLabelColormap(color_dict={None: 'transparent', 1: 'red'}).map(np.arange(10, dtype=np.int32) % 2)\n"
              "print(numba.threading_layer())\n")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "tbb"


def _change_image_at_first_progress(worker, viewer, layer, how: str) -> None:
    """Remove ``layer``, or give it new data, as soon as the run reports progress (before its result arrives)."""
    done = []

    def change(_step):
        if done:
            return
        done.append(True)
        if how == "removed":
            viewer.layers.remove(layer)
        else:
            layer.data = np.zeros((90, 70, 3), np.uint8)
    worker.yielded.connect(change)


@pytest.mark.parametrize("how", ["removed", "replaced"])
def test_labels_of_an_image_removed_or_given_new_data_during_a_run_are_not_used(qtbot, widget, rgb_image, how):
    """Labels of data no longer on screen would lie on another image (or on none): neither a new layer nor an update
    of the earlier result is made, and the status says why."""
    viewer = widget._viewer
    photo = viewer.add_image(rgb_image, name="photo")
    widget.image.value = photo
    widget.classes.value = "a\nb"
    worker = widget.run()
    _change_image_at_first_progress(worker, viewer, photo, how)
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT)
    assert "photo classes" not in viewer.layers
    expected = "removed from the viewer" if how == "removed" else "given new data"
    assert f"'photo' was {expected} while it was segmented" in widget.status.value, widget.status.value

    # a re-run of an earlier result, with the classes swapped (its labels would change everywhere)
    viewer.layers.clear()
    photo = viewer.add_image(rgb_image, name="photo")
    widget.image.value = photo
    run_and_wait(qtbot, widget)
    result = viewer.layers["photo classes"]
    before = np.array(result.data, copy=True)
    widget.classes.value = "b\na"
    worker = widget.run()
    _change_image_at_first_progress(worker, viewer, photo, how)
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT)
    assert np.array_equal(result.data, before)
    assert f"'photo' was {expected}" in widget.status.value, widget.status.value
    assert [layer.name for layer in viewer.layers] == (["photo classes"] if how == "removed" else
                                                       ["photo", "photo classes"])


def test_a_tiled_run_whose_image_is_removed_adds_no_layer_and_leaves_no_store(qtbot, widget, monkeypatch, tmp_path):
    import napari_clearclip.gui.widget as widget_module

    monkeypatch.setattr(widget_module, "TILED_PIXELS", 200 * 200)
    monkeypatch.setenv("NAPARI_CLEARCLIP_CACHE_DIR", str(tmp_path / "cache"))
    viewer = widget._viewer
    slide = viewer.add_image((np.random.default_rng(3).random((260, 240, 3)) * 255).astype(np.uint8), name="slide")
    widget.image.value = slide
    widget.classes.value = "sky\ngrass"
    widget.resize.value = False
    widget.crop.value, widget.stride.value = 64, 32
    worker = widget.run()
    _change_image_at_first_progress(worker, viewer, slide, "removed")
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT)
    assert len(viewer.layers) == 0
    assert "'slide' was removed from the viewer" in widget.status.value, widget.status.value
    assert not list((tmp_path / "cache" / "labels").iterdir())


def test_a_tiled_result_of_an_image_with_a_long_name_gets_a_store_it_can_write():
    """The store of a tile-by-tile result is named after the image layer; a layer named after a long file name gave a
    name the file system refuses (checking whether it existed failed the run)."""
    from napari_clearclip.gui.job import tiled_store_path

    for name in ("slide " * 60, "é" * 200, "", "***"):
        path = tiled_store_path(name)
        assert len(os.fsencode(path.name + ".partial")) <= 255
        path.mkdir()  # the name can be written
        assert tiled_store_path(name) != path  # a second run of the same image gets another store
        path.rmdir()


def test_a_feature_store_folder_a_cluster_filled_is_chosen_in_the_widget_and_read(qtbot, widget, tmp_path, capsys,
                                                                                   monkeypatch):
    """A laptop annotates what a cluster encoded: the folder is a field of the widget (it was only an environment
    variable set before napari starts); its features are read, not computed again; a missing folder is said."""
    from skimage.io import imsave

    from napari_clearclip.batch.cli import main
    from napari_clearclip.demo.scenes import make_scene
    from napari_clearclip.gui.fields import saved_values
    from napari_clearclip.segmenter import Segmenter

    image = make_scene(3, size=256).image
    imsave(tmp_path / "scene.png", image, check_contrast=False)
    shared = tmp_path / "shared"
    assert main(["--features-only", "--feature-store", str(shared), str(tmp_path / "scene.png"),
                 "--model", "synthetic-tiny", "--device", "cpu"]) == 0
    capsys.readouterr()
    viewer = widget._viewer
    widget.switch_to_demo_model()
    widget.classes.value = "red\ngreen\nblue\nyellow\nbackground"
    widget.image.value = viewer.add_image(image, name="scene")
    widget.feature_store.value = str(tmp_path / "sahred")                  # a typo
    assert widget.run() is None
    assert "feature store folder" in widget.status.value and "does not exist" in widget.status.value
    assert not (tmp_path / "sahred").exists()

    def refuse(*_):
        raise AssertionError("the image was encoded again")

    monkeypatch.setattr(Segmenter, "_encode_crops", refuse)
    widget.feature_store.value = str(shared)
    run_and_wait(qtbot, widget)
    assert widget.status.value.startswith("Done"), widget.status.value
    assert len(np.unique(viewer.layers["scene classes"].data)) > 1
    assert saved_values(widget)["feature_store"] == str(shared)           # kept for the next session


@pytest.mark.parametrize("tiled", [False, True])
def test_a_runtime_error_in_a_run_is_said_and_the_dock_is_ready_for_the_next(qtbot, widget, monkeypatch, tiled):
    """A RuntimeError in a run (a damaged zarr chunk, one of PyTorch's errors): napari's workers end silently on one,
    so the dock waited for ever; it is said, no layer is added, and the next run goes."""
    import napari_clearclip.gui.job as job_module
    import napari_clearclip.gui.widget as widget_module
    import napari_clearclip.tiled_edits as tiled_edits
    from images import smooth_image

    def damaged(*args, **kwargs):
        raise RuntimeError("Zstd decompression error: invalid input data")

    def failing_segment_layer(*args, **kwargs):
        yield from ()
        damaged()

    keep_baseline, segment_layer = tiled_edits.keep_baseline, job_module.segment_layer
    if tiled:
        monkeypatch.setattr(widget_module, "TILED_PIXELS", 200 * 200)
        monkeypatch.setattr(tiled_edits, "keep_baseline", damaged)
        widget.resize.value = False
        widget.crop.value, widget.stride.value = 64, 32
    else:
        monkeypatch.setattr(job_module, "segment_layer", failing_segment_layer)
    viewer = widget._viewer
    widget.image.value = viewer.add_image(smooth_image(260, 240, seed=6), name="slide", rgb=True)
    widget.classes.value = "sky\ngrass"
    layers = len(viewer.layers)
    run_and_wait(qtbot, widget)
    assert "Unexpected error (RuntimeError: Zstd decompression error: invalid input data)" in widget.status.value, \
        widget.status.value
    assert len(viewer.layers) == layers and widget.run_button.enabled
    monkeypatch.setattr(tiled_edits, "keep_baseline", keep_baseline)   # mended
    monkeypatch.setattr(job_module, "segment_layer", segment_layer)
    run_and_wait(qtbot, widget)
    assert widget.status.value.startswith("Done"), widget.status.value
    assert len(viewer.layers) == layers + 1
