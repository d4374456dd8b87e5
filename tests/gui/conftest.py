"""The widget as napari docks it, on the small random model, with the tools' defaults."""

from __future__ import annotations

import pytest


@pytest.fixture
def widget(make_napari_viewer, tiny_checkpoint):
    pytest.importorskip("qtpy.QtWidgets", reason="the widget tests need a Qt binding (the testing extra)")
    viewer = make_napari_viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-clearclip", "ClearCLIP segmentation")
    widget.model.value = "test-tiny"
    widget.pretrained.value = tiny_checkpoint
    widget.device.value = "cpu"
    widget.snap.value, widget.learn.value, widget.live.value = True, True, False   # the defaults, whatever was saved
    return widget
