"""Make docs/images/corrections_napari.png: napari before and after three corrective strokes (run under Xvfb).

    xvfb-run -a python docs/make_corrections_screenshot.py

A held-out synthetic scene, the demo model, and a class word it never learnt ("debris"
for the blue shapes). The widget runs with its defaults (learn from my edits, snap to
edges). Then, three times, a simulated annotator paints one disk (radius 3 px) inside the
largest wrongly labelled region with napari's paint brush, and the widget runs again.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("NAPARI_CLEARCLIP_CONFIG_DIR", tempfile.mkdtemp())
os.environ.setdefault("NAPARI_CLEARCLIP_CACHE_DIR", tempfile.mkdtemp())

import napari  # noqa: E402
import numpy as np  # noqa: E402
from qtpy.QtWidgets import QApplication  # noqa: E402
from scipy import ndimage  # noqa: E402
from skimage.io import imsave  # noqa: E402
from skimage.transform import rescale  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from benchmark_corrections import next_stroke, truth_of  # noqa: E402

from napari_clearclip.demo.scenes import held_out_scenes  # noqa: E402

CLASSES = "red\ngreen\ndebris\nyellow\nbackground"   # "debris" stands where "blue" would
STROKES = 3


def pick_scene():
    """The first 256 px held-out scene with at least two separate blue shapes of some size."""
    for scene in held_out_scenes(48, sizes=(256,)):
        regions, count = ndimage.label(scene.masks["blue"])
        if np.count_nonzero(np.bincount(regions.ravel())[1:] >= 400) >= 2:
            return scene
    raise RuntimeError("no scene with two blue shapes")


def wait_for(widget, app) -> None:
    while widget.busy:
        app.processEvents()
    for _ in range(20):
        app.processEvents()


def text_overlay(viewer):
    canvas = getattr(viewer, "canvas", None)   # napari >= 0.9; older versions have viewer.text_overlay
    return canvas.overlays["text"] if canvas is not None else viewer.text_overlay


def shot(viewer, title: str) -> np.ndarray:
    text_overlay(viewer).text = title
    app = QApplication.instance()
    for _ in range(10):
        app.processEvents()
    return viewer.screenshot(canvas_only=False, flash=False)


def main() -> None:
    app = QApplication.instance() or QApplication([])
    scene = pick_scene()
    truth = truth_of(scene)
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1300, 820)
    overlay = text_overlay(viewer)
    overlay.visible, overlay.font_size, overlay.color = True, 14, "white"
    image = viewer.add_image(scene.image, name="scene")
    _, widget = viewer.window.add_plugin_dock_widget("napari-clearclip", "ClearCLIP segmentation")
    widget.switch_to_demo_model()
    widget.image.value = image
    widget.classes.value = CLASSES
    widget.run()
    wait_for(widget, app)
    viewer.reset_view()
    labels = viewer.layers["scene classes"]
    accuracy = np.mean(labels.data == truth)
    before = shot(viewer, f"zero-shot: pixel accuracy {accuracy:.1%}")
    labels.brush_size = 7                      # a disk of radius 3 px
    for _ in range(STROKES):
        stroke = next_stroke(np.asarray(labels.data), truth)
        if stroke is None:
            break
        rr, cc, value = stroke
        labels.paint((int(np.mean(rr)), int(np.mean(cc))), value)
        widget.run()
        wait_for(widget, app)
    accuracy = np.mean(labels.data == truth)
    after = shot(viewer, f"after {STROKES} strokes: pixel accuracy {accuracy:.1%}")
    height = min(before.shape[0], after.shape[0])
    both = np.concatenate([before[:height], np.full((height, 12, 4), 255, np.uint8), after[:height]], axis=1)
    both = (rescale(both[..., :3], 0.6, channel_axis=2, anti_aliasing=True) * 255).astype(np.uint8)
    out = Path(__file__).parent / "images" / "corrections_napari.png"
    imsave(out, both, check_contrast=False)
    print(f"saved {out}; status: {widget.status.value}")
    viewer.close()


if __name__ == "__main__":
    main()
