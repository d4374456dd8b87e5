"""Memory of the widget over repeated runs: segment a 40-slice stack, delete the result, again (run under Xvfb).

    xvfb-run -a python benchmarks/benchmark_widget_memory.py [--cycles 7] [--slices 40]

Prints the process's resident memory after each cycle. A result layer that is deleted
must take its arrays with it: from the second cycle on, the figure should stay flat.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile

os.environ.setdefault("NAPARI_CLEARCLIP_CONFIG_DIR", tempfile.mkdtemp())
os.environ.setdefault("NAPARI_CLEARCLIP_CACHE_DIR", tempfile.mkdtemp())

import napari  # noqa: E402
import numpy as np  # noqa: E402
from qtpy.QtWidgets import QApplication  # noqa: E402

from napari_clearclip.demo.scenes import make_scene  # noqa: E402


def resident_mib() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:  # Linux without psutil
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=7)
    parser.add_argument("--slices", type=int, default=40)
    args = parser.parse_args()
    app = QApplication.instance() or QApplication([])
    viewer = napari.Viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-clearclip", "ClearCLIP segmentation")
    widget.switch_to_demo_model()
    stack = np.stack([make_scene(i, size=512, objects=(3, 4)).image for i in range(args.slices)])
    widget.image.value = viewer.add_image(stack, name="stack", rgb=True)
    widget.scope.value = "all slices"
    figures = []
    for cycle in range(args.cycles):
        widget.run()
        while widget.busy:
            app.processEvents()
        for _ in range(10):
            app.processEvents()
        viewer.layers.remove("stack classes")
        for _ in range(10):
            app.processEvents()
        gc.collect()
        figures.append(resident_mib())
        print(f"cycle {cycle + 1}: {figures[-1]:.0f} MiB resident", flush=True)
    print(f"from cycle 2 to {args.cycles}: {figures[-1] - figures[1]:+.0f} MiB")
    viewer.close()


if __name__ == "__main__":
    main()
