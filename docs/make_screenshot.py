"""Make docs/images/widget.png: the widget and its result on the synthetic sample (run under Xvfb).

    xvfb-run -a python docs/make_screenshot.py
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("NAPARI_CLEARCLIP_CONFIG_DIR", tempfile.mkdtemp())

import napari  # noqa: E402
from qtpy.QtWidgets import QApplication  # noqa: E402


def main() -> None:
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1400, 860)
    viewer.open_sample("napari-clearclip", "synthetic_shapes")
    _, widget = viewer.window.add_plugin_dock_widget("napari-clearclip", "ClearCLIP segmentation")
    widget.switch_to_demo_model()          # fills in the sample's suggested classes
    worker = widget.run()
    finished = []
    worker.finished.connect(lambda: finished.append(True))
    app = QApplication.instance()
    while not finished or widget.busy:
        app.processEvents()
    viewer.reset_view()
    for _ in range(20):
        app.processEvents()
    out = Path(__file__).parent / "images" / "widget.png"
    out.parent.mkdir(exist_ok=True)
    viewer.screenshot(str(out), canvas_only=False, flash=False)
    print(f"saved {out}; status: {widget.status.value}")
    viewer.close()


if __name__ == "__main__":
    main()
