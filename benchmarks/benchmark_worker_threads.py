"""Why the plugin installs TBB on Linux: PyTorch in napari's worker threads next to napari's numba colormaps.

    python benchmarks/benchmark_worker_threads.py [--size 4096] [--repeats 6]

napari maps Labels through numba functions compiled with ``parallel=True``, on its GUI thread.
With numba's OpenMP threading layer, that leaves an OpenMP thread pool on the GUI thread, in the
same GNU OpenMP runtime PyTorch uses. A worker thread running PyTorch then has a second pool, and
GNU OpenMP, finding more of its threads than cores, makes idle threads sleep almost at once instead
of spinning: every one of the many mid-sized operations of a live re-run waits for its threads to
wake. With TBB installed, numba's default threading layer is TBB and the GUI thread holds no
OpenMP pool.

Each variant runs in its own process (numba's layer is chosen once per process), the engine on
one persistent worker thread as in napari, the GUI thread running no PyTorch: a re-run after a
small stroke, repeated from the same saved state. Printed: medians, and their ratio to the run
without any numba colormap on the GUI thread.
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

CLASSES = ["red", "green", "blue", "yellow", "background"]
VARIANTS = {
    "no numba colormap on the GUI thread": ("none", None),
    "napari's colormap on the GUI thread, numba's default layer": ("numba", None),
    "napari's colormap on the GUI thread, numba's OpenMP layer": ("numba", "omp"),
}


def measure(colormap: str, size: int, repeats: int) -> list[float]:
    """Seconds of each repeated re-run, on a worker thread, after (or without) a numba colormap on this thread."""
    os.environ.setdefault("NAPARI_CLEARCLIP_CACHE_DIR", tempfile.mkdtemp())
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from benchmark_live import large_shapes

    from napari_clearclip import Segmenter

    if colormap == "numba":
        from napari.utils.colormaps import DirectLabelColormap

        DirectLabelColormap(color_dict={None: "transparent", 1: "red", 2: "green"}).map(
            np.arange(100_000, dtype=np.int32) % 3)   # int32 labels go through numba's parallel loop
    jobs: queue.Queue = queue.Queue()
    answers: queue.Queue = queue.Queue()

    def worker():
        while (job := jobs.get()) is not None:
            answers.put(job())

    thread = threading.Thread(target=worker)
    thread.start()

    def on_worker(job):
        jobs.put(job)
        return answers.get()

    image = large_shapes(size)
    state = {}

    def first_run():
        segmenter = Segmenter("synthetic-tiny", device="cpu")
        labels = segmenter.segment(image, CLASSES, maps=False, refine="pamr").labels
        strokes = np.zeros(image.shape[:2], np.int32)
        ys, xs = np.nonzero(labels[::64, ::64] == CLASSES.index("background") + 1)
        y, x = ys[len(ys) // 3] * 64, xs[len(xs) // 3] * 64
        strokes[y : y + 10, x : x + 100] = CLASSES.index("background") + 1
        state.update(segmenter=segmenter, strokes=strokes, saved=list(segmenter._label_states._items.items()))

    def rerun():
        segmenter = state["segmenter"]
        segmenter._label_states._items.clear()           # the state before the stroke, every time
        segmenter._label_states._items.update(state["saved"])
        start = time.perf_counter()
        segmenter.segment(image, CLASSES, maps=False, refine="pamr", strokes=state["strokes"])
        return time.perf_counter() - start

    on_worker(first_run)
    times = [on_worker(rerun) for _ in range(repeats)]
    jobs.put(None)
    thread.join()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(" ".join(f"{t:.4f}" for t in measure(args.variant, args.size, args.repeats)))
        return
    medians = {}
    for name, (colormap, layer) in VARIANTS.items():
        env = dict(os.environ)
        env.pop("NUMBA_THREADING_LAYER", None)
        if layer:
            env["NUMBA_THREADING_LAYER"] = layer
        done = subprocess.run([sys.executable, __file__, "--variant", colormap, "--size", str(args.size),
                               "--repeats", str(args.repeats)], capture_output=True, text=True, env=env)
        if done.returncode:
            raise SystemExit(f"{name}: {done.stderr[-800:]}")
        medians[name] = statistics.median(float(v) for v in done.stdout.split()[-args.repeats:])
    try:
        import numba

        from napari.utils.colormaps import DirectLabelColormap

        DirectLabelColormap(color_dict={None: "transparent", 1: "red"}).map(np.arange(10, dtype=np.int32) % 2)
        default = numba.threading_layer()
    except ImportError:
        default = "none (numba is not installed)"
    print(f"re-run after a small stroke at {args.size}^2 on a worker thread; numba's default layer here: {default}")
    print("| GUI thread | median | / without |")
    print("|---|---|---|")
    base = medians["no numba colormap on the GUI thread"]
    for name, value in medians.items():
        print(f"| {name} | {value:.3f} s | {value / base:.2f} |")


if __name__ == "__main__":
    main()
