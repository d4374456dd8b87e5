"""Live off: paint, then press Run. How long the widget takes from Run to the layer updated, with the re-run readied
while the user looked at the result (what the widget does with Learn from my edits on) and without.

    xvfb-run -a python benchmarks/benchmark_run_after_painting.py [--scenes large mosaic] [--rounds 2]

The widget with the demo model, Snap to edges on, Live off, on a 4096 x 4096 image of ``benchmark_live.py``. After the
first result, three times: the user looks at the result for 3 s, paints a 40 px dab of another class than the one
there (``Labels.paint``), and presses Run; each time is from Run until the widget is idle with the layer updated.
Each variant runs in a fresh process of its own, the two in turn, ``--rounds`` times, so that a busy spell slows both
alike. "not readied" turns the readying off (as the widget did with Live off before); the labels are the same.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

ONE_VARIANT = r'''
import os, sys, tempfile, time
os.environ["NAPARI_CLEARCLIP_CACHE_DIR"] = tempfile.mkdtemp()
os.environ["NAPARI_CLEARCLIP_CONFIG_DIR"] = tempfile.mkdtemp()
sys.path.insert(0, sys.argv[3])
import numpy as np
import napari
from qtpy.QtWidgets import QApplication
from benchmark_live import large_shapes, mosaic


def wait_until(condition, timeout=300.0):
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError("the widget did not finish")
        QApplication.processEvents()
        time.sleep(0.005)


viewer = napari.Viewer(show=True)
_, widget = viewer.window.add_plugin_dock_widget("napari-clearclip", "ClearCLIP segmentation")
widget.switch_to_demo_model()
widget.device.value = "cpu"
widget.snap.value, widget.learn.value, widget.live.value = True, True, False
if sys.argv[1] == "not-readied":
    widget.readying.start = lambda *args: None
image = large_shapes(4096) if sys.argv[2] == "large" else mosaic(4096)
widget.image.value = viewer.add_image(image, name="slide")
widget.classes.value = "red\ngreen\nblue\nyellow\nbackground"
widget.run()
wait_until(lambda: not widget.busy)
labels = viewer.layers["slide classes"]
labels.brush_size = 40
rng = np.random.default_rng(0)
seconds = []
for _ in range(3):
    looked = time.monotonic() + 3.0
    wait_until(lambda: time.monotonic() > looked)
    data = np.asarray(labels.data)
    y, x = (int(v) for v in rng.integers(200, 3896, 2))
    labels.paint((y, x), 1 + int(data[y, x]) % 5)
    start = time.perf_counter()
    widget.run()
    wait_until(lambda: not widget.busy)
    seconds.append(time.perf_counter() - start)
    assert widget.status.value.startswith("Done"), widget.status.value
print(" ".join(f"{s:.3f}" for s in seconds))
viewer.close()
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", nargs="+", default=["large", "mosaic"], choices=["large", "mosaic"])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    print("| 4096 x 4096, Live off | variant | Run after the 1st, 2nd, 3rd dab |\n|---|---|---|")
    for scene in args.scenes:
        for _ in range(args.rounds):
            for variant in ("not-readied", "readied"):
                done = subprocess.run([sys.executable, "-c", ONE_VARIANT, variant, scene, here], capture_output=True,
                                      text=True, timeout=600, cwd=tempfile.gettempdir())
                if done.returncode:
                    print(f"| {scene} | {variant} | failed: {done.stderr[-300:]!r} |", flush=True)
                    continue
                runs = done.stdout.split()[-3:]
                print(f"| {scene} | {variant.replace('-', ' ')} | {', '.join(f'{float(s):.2f} s' for s in runs)} |",
                      flush=True)


if __name__ == "__main__":
    main()
