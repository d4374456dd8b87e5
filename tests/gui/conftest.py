"""The widget as napari docks it, on the small random model, with the tools' defaults."""

from __future__ import annotations

import gc

import pytest


@pytest.fixture
def widget(make_napari_viewer, tiny_checkpoint):
    pytest.importorskip("qtpy.QtWidgets", reason="the widget tests need a Qt binding (the testing extra)")
    viewer = make_napari_viewer(show=True)
    # A napari session starts with what it loads; this process also holds what earlier tests left, which
    # the widget's own freeze (once per process) did not see: freeze it too, so that full collections
    # during a run walk what a fresh session would (the responsiveness tests measure those stalls).
    gc.collect()
    gc.freeze()
    _, widget = viewer.window.add_plugin_dock_widget("napari-clearclip", "ClearCLIP segmentation")
    widget.model.value = "test-tiny"
    widget.pretrained.value = tiny_checkpoint
    widget.device.value = "cpu"
    widget.snap.value, widget.learn.value, widget.live.value = True, True, False   # the defaults, whatever was saved
    return widget
