"""Live mode in napari on a 4096 x 4096 image: from the end of a stroke to the layer showing its re-run.

    xvfb-run -a python benchmarks/benchmark_live_widget.py [--strokes 6]

The widget with the demo model, Snap to edges and Live on, on the nine large shapes of
``benchmark_live.py``. Each stroke is a 40 px brush dab of another class than the one there,
painted with ``Labels.paint`` (napari reports it as a mouse release would; a dab of the class
already shown changes nothing and is not reported); the time runs until the widget is idle again with the layer updated,
and is printed against napari's own cost of showing new data in a Labels layer of that size
(set data, refresh, draw), measured in the same process, with the longest stall of the GUI
thread while it ran.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("NAPARI_CLEARCLIP_CONFIG_DIR", tempfile.mkdtemp())
os.environ.setdefault("NAPARI_CLEARCLIP_CACHE_DIR", tempfile.mkdtemp())

import napari  # noqa: E402
import numpy as np  # noqa: E402
from qtpy.QtCore import QTimer  # noqa: E402
from qtpy.QtWidgets import QApplication  # noqa: E402

from benchmark_live import _refresh_seconds, large_shapes  # noqa: E402


def wait_until(condition, timeout: float = 120.0) -> None:
    app = QApplication.instance()
    end = time.perf_counter() + timeout
    while not condition():
        if time.perf_counter() > end:
            raise SystemExit(f"timed out: {condition}")
        app.processEvents()
        time.sleep(0.02)  # a busy loop would take a core from the worker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strokes", type=int, default=6)
    args = parser.parse_args()
    refresh = _refresh_seconds(4096)
    viewer = napari.Viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-clearclip", "ClearCLIP segmentation")
    widget.switch_to_demo_model()
    widget.device.value = "cpu"
    widget.snap.value, widget.learn.value, widget.live.value = True, True, False
    widget.image.value = viewer.add_image(large_shapes(4096), name="slide")
    widget.classes.value = "red\ngreen\nblue\nyellow\nbackground"
    widget.run()
    wait_until(lambda: not widget.busy)
    labels = viewer.layers["slide classes"]
    runs = []
    real_run = type(widget).run
    widget.__dict__["run"] = lambda *a: runs.append(time.perf_counter()) or real_run(widget)
    widget.live.value = True
    labels.brush_size = 40
    rng = np.random.default_rng(0)
    ticks = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    print(f"napari: showing new data in a 4096 x 4096 uint8 Labels layer takes {refresh:.3f} s (median of 5)")
    print("| stroke | end of stroke to updated layer | napari refreshes | longest GUI stall |\n|---|---|---|---|")
    totals = []
    for number in range(args.strokes):
        data = np.asarray(labels.data)
        y, x = (int(v) for v in rng.integers(200, 3896, 2))
        here = int(data[y, x])
        value = int(rng.choice([c for c in range(1, 6) if c != here]))  # painting what is there changes nothing
        ticks.clear()
        timer.start()
        start = time.perf_counter()
        labels.paint((y, x), value)                       # a stroke ends
        wait_until(lambda n=number: len(runs) == n + 1 and not widget.busy)
        total = time.perf_counter() - start
        wait_until(lambda until=start + total + 0.1: time.perf_counter() > until)  # a few more ticks
        timer.stop()
        gap = float(np.diff(ticks).max()) if len(ticks) > 1 else float("nan")
        totals.append(total)
        print(f"| {number + 1} | {total:.2f} s | {total / refresh:.1f} | {gap * 1000:.0f} ms |", flush=True)
    print(f"median: {statistics.median(totals):.2f} s, {statistics.median(totals) / refresh:.1f} refreshes "
          "(target <= 10)")
    viewer.close()


if __name__ == "__main__":
    main()
