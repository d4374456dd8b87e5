"""The GUI thread's longest stall while the first result of a fresh napari process is shown.

    xvfb-run -a python benchmarks/benchmark_first_result.py [--size 2048] [--pyramid] [--wait 0] [--snap]

Runs the widget twice in one new process (demo model, no edge snapping), with napari's
one-time costs included, and prints the longest gap of a 10 ms timer on the GUI thread for
the first and the second result, once with the worker's first-draw warm-up and once
without it (each in its own fresh process). ``--pyramid`` shows the image as a pyramid of dask
arrays (full size, 1/2, 1/4): above 4096 x 4096 the run then takes a level (Resize on).
``--wait S`` leaves napari alone for S seconds before Run is pressed, as a user picking an image
and typing classes does (the dock reads edge snapping's compiled loops meanwhile); ``--snap``
snaps to edges. The first run's own time is printed too.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

SCRIPT = r'''
import sys, time
import numpy as np
import napari
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QApplication
import napari_clearclip.gui.job as job
if sys.argv[2] == "off":
    def only_imports(*args):
        import pandas, skimage.color
    job.prepare_first_draw = only_imports
from napari_clearclip.demo.scenes import sample_scene
size = int(sys.argv[1])
viewer = napari.Viewer(show=True)
_, widget = viewer.window.add_plugin_dock_widget("napari-clearclip", "ClearCLIP segmentation")
widget.switch_to_demo_model()
image = np.tile(sample_scene(256), (size // 256, size // 256, 1))
if sys.argv[3] == "pyramid":
    import dask.array as da
    image = [da.from_array(image[::f, ::f], chunks=(1024, 1024, 3)) for f in (1, 2, 4)]
widget.image.value = viewer.add_image(image, name="scene", rgb=True, multiscale=sys.argv[3] == "pyramid")
widget.classes.value = "red\ngreen\nblue\nyellow\nbackground"
widget.snap.value = sys.argv[5] == "snap"
app = QApplication.instance()
end = time.perf_counter() + float(sys.argv[4])   # the user sets up the run
while time.perf_counter() < end:
    app.processEvents(); time.sleep(0.005)
ticks = []
timer = QTimer(); timer.setInterval(10); timer.timeout.connect(lambda: ticks.append(time.perf_counter())); timer.start()
gaps = []
for run in range(2):
    ticks.clear()
    started = time.perf_counter()
    widget.run(); widget.wait(600)
    if run == 0:
        first_run = time.perf_counter() - started
    end = time.perf_counter() + 1.5
    while time.perf_counter() < end:
        app.processEvents(); time.sleep(0.002)
    gaps.append(float(np.diff(ticks).max()))
    viewer.layers.remove("scene classes")
print(" ".join(f"{g:.3f}" for g in gaps), f"{first_run:.2f}")
viewer.close()
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--pyramid", action="store_true", help="the image as a pyramid of dask arrays")
    parser.add_argument("--wait", type=float, default=0.0, help="seconds napari is left alone before Run")
    parser.add_argument("--snap", action="store_true", help="snap to edges (off by default)")
    args = parser.parse_args()
    print(f"{args.size} x {args.size}{' pyramid' if args.pyramid else ''}, demo model, snapping "
          f"{'on' if args.snap else 'off'}, Run pressed {args.wait:g} s after the image is set; longest GUI-thread "
          "gap (s) for the first and second result, and the first run's own time")
    for warm in ("on", "off"):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", SCRIPT, str(args.size), warm,
                               "pyramid" if args.pyramid else "array", str(args.wait),
                               "snap" if args.snap else "no-snap"], capture_output=True, text=True)
        first, second, run = done.stdout.split()[-3:] if done.returncode == 0 else ("?", "?", "?")
        print(f"warm-up {warm:>3}: first {first}  second {second}  first run {run} s  "
              f"({time.perf_counter() - start:.0f} s)")
        if done.returncode:
            print(done.stderr[-2000:])


if __name__ == "__main__":
    main()
