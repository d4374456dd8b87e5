"""The napari dock widget, driven through its scripting contract (needs a display: run under Xvfb)."""

from __future__ import annotations

import time

import dask.array as da
import numpy as np
import pytest

pytest.importorskip("qtpy.QtWidgets", reason="the widget tests need a Qt binding (the testing extra)")
from napari.layers import Image, Labels  # noqa: E402

from napari_clearclip import Segmenter  # noqa: E402
from napari_clearclip.gui import ClearClipWidget  # noqa: E402
from napari_clearclip.gui.fields import model_choices  # noqa: E402
from gui_helpers import TIMEOUT, run_and_wait  # noqa: E402
from napari_clearclip.colours import class_colours  # noqa: E402

pytestmark = pytest.mark.gui


@pytest.fixture
def widget(widget):
    widget.snap.value = False          # the official pipeline, to compare with the engine's defaults
    return widget


def test_run_adds_labels_layer_matching_engine(qtbot, widget, rgb_image, tiny_checkpoint):
    viewer = widget._viewer
    layer = viewer.add_image(rgb_image, name="photo", scale=(0.5, 0.5), translate=(10, 20))
    widget.image.value = layer
    widget.classes.value = "sky\nhorse, pony\ngrass"
    results = []
    worker = widget.run()
    worker.returned.connect(results.append)
    with qtbot.waitSignal(worker.finished, timeout=TIMEOUT):
        pass
    labels = viewer.layers["photo classes"]
    assert isinstance(labels, Labels)
    assert labels.data.shape == rgb_image.shape[:2]
    np.testing.assert_allclose(labels.scale, (0.5, 0.5))
    np.testing.assert_allclose(labels.translate, (10, 20))
    expected = Segmenter("test-tiny", tiny_checkpoint, device="cpu").segment(rgb_image, ["sky", "horse, pony", "grass"],
                                                                              contrast_limits=(0, 255))
    np.testing.assert_array_equal(labels.data, expected.labels)
    assert list(labels.features["class"]) == ["unassigned", "sky", "horse", "grass"]
    assert list(labels.features["index"]) == [0, 1, 2, 3]
    colours = labels.colormap.color_dict
    assert colours[0][3] == 0
    from napari.utils.colormaps.standardize_color import transform_color

    expected_colours = class_colours(["sky", "horse", "grass"])
    np.testing.assert_allclose(colours[2], transform_color(expected_colours[2])[0])
    assert "horse" in widget.legend.value and expected_colours[3] in widget.legend.value
    assert widget.status.value.startswith("Done")
    assert len(results) == 1
    widget.snap.value = True            # "Snap to edges" is the engine's PAMR refinement
    run_and_wait(qtbot, widget)
    snapped = Segmenter("test-tiny", tiny_checkpoint, device="cpu").segment(
        rgb_image, ["sky", "horse, pony", "grass"], contrast_limits=(0, 255), refine="pamr")
    np.testing.assert_array_equal(labels.data, snapped.labels)


def test_rerun_keeps_edits_and_reuses_image_features(qtbot, widget, rgb_image, monkeypatch):
    viewer = widget._viewer
    widget.image.value = viewer.add_image(rgb_image, name="photo")
    widget.classes.value = "sky\ngrass"
    run_and_wait(qtbot, widget)
    labels = viewer.layers["photo classes"]
    painted = labels.data.copy()
    painted[:20, :20] = 3 - painted[:20, :20]   # the user swaps sky (1) and grass (2) in a corner
    labels.data = painted
    swapped = painted[:20, :20].copy()
    import napari_clearclip.segmenter as engine

    monkeypatch.setattr(engine, "encode_dense", lambda *a, **k: pytest.fail("image features should be cached"))
    widget.classes.value = "grass\nsky\nroad"
    run_and_wait(qtbot, widget)
    assert viewer.layers["photo classes"].unique_id == labels.unique_id
    np.testing.assert_array_equal(labels.data[:20, :20], 3 - swapped)  # same classes, under their new numbers
    assert list(labels.features["class"]) == ["unassigned", "grass", "sky", "road"]
    assert "kept 400 edited pixels" in widget.status.value, widget.status.value
    # with "keep my edits" off, an edited layer is not overwritten: the result goes to a new layer
    widget.keep_edits.value = False
    run_and_wait(qtbot, widget)
    np.testing.assert_array_equal(labels.data[:20, :20], 3 - swapped)
    assert len([layer for layer in viewer.layers if isinstance(layer, Labels)]) == 2


def test_cancel_adds_nothing(qtbot, widget):
    viewer = widget._viewer
    big = (np.random.default_rng(0).random((700, 700, 3)) * 255).astype(np.uint8)
    widget.image.value = viewer.add_image(big, name="big")
    widget.classes.value = "a\nb"
    widget.resize.value = False
    widget.crop.value, widget.stride.value = 64, 16
    seen = []
    worker = widget.run()
    worker.yielded.connect(lambda step: seen.append(step) or (len(seen) == 3 and widget.cancel()))
    with qtbot.waitSignal(worker.finished, timeout=TIMEOUT):
        pass
    assert "big classes" not in viewer.layers
    assert widget.status.value.startswith("Cancelled")
    assert widget.run_button.enabled and not widget.cancel_button.enabled
    windows = [s for s in seen if s.stage == "windows"]
    assert windows and windows[-1].done < windows[-1].total



def test_cancel_pressed_as_the_result_arrives_leaves_the_result_and_its_status(qtbot, widget, rgb_image):
    widget.image.value = widget._viewer.add_image(rgb_image, name="photo")
    widget.classes.value = "sky\ngrass"
    worker = widget.run()
    worker.returned.connect(lambda _: widget.cancel())      # after the widget's own handler: the result is in
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT)
    assert "photo classes" in widget._viewer.layers
    assert widget.status.value.startswith("Done"), widget.status.value

def test_viewer_stays_responsive_during_a_run(qtbot, widget):
    from qtpy.QtCore import QTimer

    viewer = widget._viewer
    image = (np.random.default_rng(1).random((700, 700, 3)) * 255).astype(np.uint8)
    widget.image.value = viewer.add_image(image, name="busy")
    widget.classes.value = "a\nb\nc"
    widget.resize.value = False
    widget.crop.value, widget.stride.value = 64, 4
    ticks, yields = [], []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    start = time.perf_counter()
    worker = widget.run()
    worker.yielded.connect(lambda _: yields.append(time.perf_counter()))
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT)
    timer.stop()
    running = [t for t in ticks if t <= yields[-1]]  # while the worker computes, before results are shown
    gaps = np.diff(running)
    assert yields[-1] - start > 1.0, "the run should last long enough to measure"
    assert gaps.max() < 0.2, f"event loop blocked for {gaps.max() * 1000:.0f} ms"
    assert "busy classes" in viewer.layers



def test_a_run_shows_its_progress_in_the_dock_a_few_times_a_second_and_opens_no_napari_indicator(qtbot, widget,
                                                                                                  monkeypatch):
    """napari's progress bars animate an indicator in its status bar while open, and every repaint of the dock
    recomposes napari's whole window through its OpenGL canvas: on software OpenGL, runs were 25-35% slower beside
    that indicator. The dock's own bar shows progress, updated at most every PROGRESS_INTERVAL_MS."""
    import napari.utils

    from napari_clearclip.gui.widget import PROGRESS_INTERVAL_MS

    opened = []
    real_init = napari.utils.progress.__init__

    def counting_init(self, *args, **kwargs):
        opened.append(kwargs)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(napari.utils.progress, "__init__", counting_init)
    image = (np.random.default_rng(1).random((700, 700, 3)) * 255).astype(np.uint8)
    widget.image.value = widget._viewer.add_image(image, name="busy")
    widget.classes.value = "a\nb\nc"
    widget.resize.value = False
    widget.crop.value, widget.stride.value = 64, 4
    shown, yields, visible_while_running = [], [], []
    widget.progress_bar.changed.connect(lambda value: shown.append((time.perf_counter(), value, widget.status.value)))
    assert not widget.progress_bar.visible
    start = time.perf_counter()
    worker = widget.run()
    worker.yielded.connect(lambda _: (yields.append(time.perf_counter()),
                                      visible_while_running.append(widget.progress_bar.visible)))
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT)
    assert "busy classes" in widget._viewer.layers
    assert opened == [], "a napari progress bar was opened"
    assert visible_while_running and all(visible_while_running)
    assert not widget.progress_bar.visible                                   # hidden once the run is over
    progress = [(value, text) for when, value, text in shown if when <= yields[-1]]
    duration = yields[-1] - start
    assert duration > 1.0 and len(yields) > 3 * duration * 1000 / PROGRESS_INTERVAL_MS, "too few steps to measure"
    assert 2 <= len(progress) <= duration * 1000 / PROGRESS_INTERVAL_MS + 2, (len(progress), len(yields), duration)
    values = [value for value, _ in progress]
    assert values == sorted(values) and values[-1] > values[0]              # it moves forward
    assert all("/" in text for _, text in progress)                         # with the stage's count in the status


def test_stacks_current_slice_then_all_slices(qtbot, widget, rgb_image):
    viewer = widget._viewer
    grey = rgb_image[..., 0]
    volume = da.from_array(np.stack([grey, grey[::-1], grey[:, ::-1], grey]), chunks=(1, 180, 260))
    layer = viewer.add_image(volume, name="stack")
    widget.image.value = layer
    widget.classes.value = "a\nb"
    assert not widget.scope.native.isHidden()
    viewer.dims.set_current_step(0, 2)
    widget.scope.value = "current slice"
    run_and_wait(qtbot, widget)
    labels = viewer.layers["stack classes"]
    assert labels.data.shape == volume.shape
    assert np.all(labels.data[[0, 1, 3]] == 0) and np.all(labels.data[2] > 0)
    widget.scope.value = "all slices"
    run_and_wait(qtbot, widget)
    assert np.all(labels.data > 0)


def test_multichannel_channel_choice_and_probabilities(qtbot, widget, rgb_image):
    viewer = widget._viewer
    channels = np.moveaxis(rgb_image, -1, 0).astype(np.uint16) * 100  # (3, H, W), not RGB
    layer = viewer.add_image(channels, name="cells")
    widget.image.value = layer
    widget.channel_axis.value = 0
    widget.channel.value = 1
    widget.classes.value = "a\nb"
    widget.probability_output.value = "all classes"
    run_and_wait(qtbot, widget)
    labels = viewer.layers["cells classes"]
    assert labels.data.shape == rgb_image.shape[:2]
    assert isinstance(viewer.layers["cells P(a)"], Image)
    total = viewer.layers["cells P(a)"].data + viewer.layers["cells P(b)"].data
    np.testing.assert_allclose(total, 1, atol=1e-5)


def _sit_alike(labels, image, points, channel_axis=None):
    """Label pixels are drawn in the world where the image's pixels under them are."""
    for point in points:
        full = list(point) if channel_axis is None else [*point[:channel_axis], 0, *point[channel_axis:]]
        world = np.delete(np.asarray(image.data_to_world(full), float), [] if channel_axis is None else channel_axis)
        np.testing.assert_allclose(labels.data_to_world(point), world, atol=1e-9)


def test_results_sit_where_a_turned_sheared_image_is_in_its_units(qtbot, widget, rgb_image):
    """Labels and probability maps take the image's rotation, shear, affine, units and axis names, not only its
    scale and translation: a rotated image had its labels drawn unrotated beside it, and labels in pixels left
    napari's scale bar without the image's units."""
    viewer = widget._viewer
    placement = {"scale": (0.5, 0.25), "translate": (10, 20), "rotate": 30, "shear": [0.2],
                 "affine": np.array([[1.0, 0.1, 3.0], [0.0, 1.2, -4.0], [0.0, 0.0, 1.0]]),
                 "units": ("um", "um"), "axis_labels": ("row", "column")}
    layer = viewer.add_image(rgb_image, name="photo", **placement)
    widget.image.value = layer
    widget.classes.value = "sky\ngrass"
    widget.probability_output.value = "winning class"
    run_and_wait(qtbot, widget)
    points = [(0, 0), (5, 7), (rgb_image.shape[0] - 1, rgb_image.shape[1] - 1)]
    for result in (viewer.layers["photo classes"], viewer.layers["photo probability"]):
        _sit_alike(result, layer, points)
        assert tuple(result.units) == tuple(layer.units) and tuple(result.axis_labels) == ("row", "column")
    # a multichannel image: the channel axis left out of every part of the placement
    channels = np.moveaxis(rgb_image, -1, 0).astype(np.uint16) * 100
    turn = np.eye(3)
    turn[1:, 1:] = [[np.cos(0.4), -np.sin(0.4)], [np.sin(0.4), np.cos(0.4)]]
    stack = viewer.add_image(channels, name="cells", scale=(1, 2, 3), translate=(7, 1, 2), rotate=turn,
                             shear=[0, 0, 0.3], units=("s", "mm", "mm"), axis_labels=("c", "y", "x"))
    widget.image.value = stack
    widget.channel_axis.value = 0
    widget.probability_output.value = "none"
    run_and_wait(qtbot, widget)
    labels = viewer.layers["cells classes"]
    assert labels.data.shape == rgb_image.shape[:2]
    _sit_alike(labels, stack, points, channel_axis=0)
    assert [str(unit) for unit in labels.units] == ["millimeter", "millimeter"]
    assert tuple(labels.axis_labels) == ("y", "x")


def test_input_errors_show_in_status_and_add_nothing(qtbot, widget, rgb_image):
    viewer = widget._viewer
    widget.image.value = viewer.add_image(rgb_image, name="photo")
    widget.classes.value = "cat\ncat"
    assert widget.run() is None
    assert "appears twice" in widget.status.value
    widget.classes.value = "cat"
    checkpoint = widget.pretrained.value
    widget.pretrained.value = "/no/such/checkpoint.pt"
    run_and_wait(qtbot, widget)
    assert "Checkpoint file not found" in widget.status.value
    assert "photo classes" not in viewer.layers
    widget.pretrained.value = checkpoint
    widget.show_advanced.value = True
    widget.stride.value = widget.crop.value + 1           # each field in range, the pair not
    worker = widget.run()
    if worker is not None:
        qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)
    said = widget.status.value
    assert f"Stride {widget.crop.value + 1} must be a whole number between 1 and the window size {widget.crop.value}" \
        in said and "stride=" not in said, said
    assert "photo classes" not in viewer.layers


def test_settings_persist_between_sessions(qtbot, widget, rgb_image, make_napari_viewer):
    viewer = widget._viewer
    widget.image.value = viewer.add_image(rgb_image, name="photo")
    widget.classes.value = "mitochondria\nmembrane, wall"
    widget.prob_threshold.value = 0.25
    run_and_wait(qtbot, widget)
    second = ClearClipWidget(make_napari_viewer())
    assert second.classes.value == "mitochondria\nmembrane, wall"
    assert second.model.value == "test-tiny" and second.device.value == "cpu"
    assert second.prob_threshold.value == pytest.approx(0.25)


def test_model_list_offers_the_offline_demo(widget):
    choices = dict((value, label) for label, value in model_choices())
    assert choices["synthetic-tiny"] == "synthetic-tiny (offline demo)"
    assert "ViT-B-16" in choices and "RN50" not in choices
    widget.model.value = "synthetic-tiny"
    assert widget.pretrained.value == "bundled"
    assert (widget.crop.value, widget.stride.value) == (64, 32)


def test_sample_data_loads_without_download(make_napari_viewer):
    viewer = make_napari_viewer()
    for key in ("astronaut", "coffee", "chelsea", "immunohistochemistry", "retina", "synthetic_shapes"):
        viewer.open_sample("napari-clearclip", key)
    assert len(viewer.layers) == 6
    assert all(layer.rgb for layer in viewer.layers)


def test_plugin_opens_in_a_running_napari(tmp_path):
    """napari starts first (OpenGL up), then the plugin imports torch: this must not crash."""
    import subprocess
    import sys

    script = tmp_path / "open_widget.py"
    script.write_text(
        "import napari\n"
        "viewer = napari.Viewer(show=False)\n"
        "_, widget = viewer.window.add_plugin_dock_widget('napari-clearclip', 'ClearCLIP segmentation')\n"
        "print('opened', type(widget).__name__)\n"
        "viewer.close()\n"
    )
    completed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "opened ClearClipWidget" in completed.stdout


def test_opening_the_widget_keeps_what_napari_and_the_plugin_loaded_out_of_full_collections(widget):
    """A full garbage collection walks every tracked object while holding the interpreter lock: 0.4-0.7 s in a
    napari session, a GUI stall when the worker triggers one. What is loaded when the widget opens is frozen."""
    import gc

    assert gc.get_freeze_count() > 100_000          # napari, the viewer, PyTorch and the plugin's modules
    assert len(gc.get_objects()) < gc.get_freeze_count()   # later full collections walk far fewer objects


@pytest.mark.parametrize("device", ["auto", "cpu"])
def test_the_dock_reads_the_snapping_loops_while_the_user_sets_up_a_run(qtbot, make_napari_viewer, monkeypatch,
                                                                        device):
    """Edge snapping's compiled loops are read from numba's cache soon after the dock opens, in the background, so
    that the first run does not share the cores with reading them, whatever the device ('auto' is a GPU where there
    is one: labels are snapped on the host there too). A dock closed before then starts nothing."""
    import napari_clearclip.gui.widget as widget_module
    from napari_clearclip import compiled_snapping

    calls = []
    monkeypatch.setattr(compiled_snapping, "prepare", lambda: calls.append(time.perf_counter()))
    monkeypatch.setattr(widget_module, "PREPARE_LOOPS_AFTER_MS", 200)
    viewer = make_napari_viewer(show=True)
    _, dock = viewer.window.add_plugin_dock_widget("napari-clearclip", "ClearCLIP segmentation")
    dock.device.value = device
    opened = time.perf_counter()
    qtbot.wait(600)
    assert len(calls) == 1 and calls[0] - opened >= 0.1
    closed_early = ClearClipWidget(viewer)
    assert closed_early is not dock
    closed_early.close_down()
    qtbot.wait(400)
    assert len(calls) == 1
