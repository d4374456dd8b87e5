"""Peak memory and time of a napari run with Resize on (napari-clearclip's default) on an image too large to hold.

    python benchmarks/benchmark_resize_large.py [--sizes 8192 20000] [--whole-up-to 8192] [--large-sides 3000]

For each size, writes a size x size RGB zarr store (synthetic shapes) with a pyramid of block means beside it
(halving down to under 2048 px a side) in a temporary folder. Then, each in a fresh process that runs what the
widget's worker runs (demo model, 5 classes, Resize on, snapping on) and samples its resident memory every 50 ms:

- "pyramid": the layer is the pyramid: the run takes its finest level of at most 3000 x 3000 pixels (each side
  of ``--large-sides``: the widget's "Large images at");
- "lazy": the layer is the full-resolution zarr array alone: the run makes a copy reduced by block means;
- "whole" (sizes up to ``--whole-up-to``): the full-resolution array read whole and segmented at full size,
  as every run did before.

Prints time and peak resident memory of the whole process (Python, torch, the model and everything).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))   # beside benchmark_large_zarr

CHILD = r"""
import sys, time
import numpy as np
import zarr
from napari_clearclip.gui.job import ModelHolder, layer_request, segmentation_job
from napari_clearclip.models import ModelSpec
from napari_clearclip.options import SegmentOptions
from napari_clearclip.planes import ImageLayout
from napari_clearclip.prompts import parse_classes
from napari_clearclip.reduced import limits_for_side, reduced_for_resize

store, mode, side = sys.argv[1], sys.argv[2], int(sys.argv[3])
group = zarr.open_group(store, mode="r")
levels = [group[str(i)] for i in range(len(group))]
start = time.perf_counter()
if mode == "whole":
    data, reduction = np.asarray(levels[0]), None
else:
    larger_than, level_pixels = limits_for_side(side)
    data, reduction = reduced_for_resize(levels if mode == "pyramid" else levels[:1], larger_than, rgb=True,
                                         level_pixels=level_pixels)
layout = ImageLayout(tuple(data.shape), rgb=True)
classes = parse_classes("red\ngreen\nblue\nyellow\nbackground")
request = layer_request(data, layout, layout.planes(), classes, SegmentOptions(refine="pamr"), "slide", "none",
                        None, False, {})
steps = segmentation_job(ModelHolder(), ModelSpec("synthetic-tiny", None, "clearclip", "cpu", "fp32"), request,
                         {"name": "slide classes"})
while True:
    try:
        next(steps)
    except StopIteration as stop:
        result, layer = stop.value
        break
print(f"{time.perf_counter() - start:.1f} {layer.data.shape[0]}x{layer.data.shape[1]} "
      f"{'full size' if reduction is None else reduction.describe()}", flush=True)
"""


def write_pyramid(path: Path, size: int, chunk: int = 1024) -> None:
    """Level 0 from the shapes of ``benchmark_large_zarr``, then block means of 2 x 2 down to under 2048 a side."""
    import zarr

    from benchmark_large_zarr import write_store

    from napari_clearclip.reduced import BlockMeans

    group = zarr.open_group(str(path), mode="w")
    write_store(path / "0", size, chunk)
    level, number = group["0"], 0
    while max(level.shape[:2]) >= 2048:
        reduced = BlockMeans(level, 2, rgb=True)
        number += 1
        target = group.create_array(str(number), shape=reduced.shape, chunks=(chunk, chunk, 3), dtype=np.uint8)
        target[:] = reduced[()]
        level = target


def run(store: Path, mode: str, cache: Path, side: int) -> tuple[str, float, float]:
    from benchmark_large_zarr import peak_resident

    env = {**os.environ, "NAPARI_CLEARCLIP_CACHE_DIR": str(cache)}
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", CHILD, str(store), mode, str(side)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    peak, (output, _) = peak_resident(process, process.communicate)
    return (output.strip() or f"failed (exit {process.returncode})"), time.perf_counter() - start, peak / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 20000])
    parser.add_argument("--whole-up-to", type=int, default=8192)
    parser.add_argument("--large-sides", type=int, nargs="+", default=[3000],
                        help="the widget's Large images at: the side of the largest level segmented (default 3000)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    print("| size | layer | large images at | run (s, in the worker) | process (s) | peak resident (GiB) | labels |")
    print("|---|---|---|---|---|---|---|")
    try:
        for size in args.sizes:
            store = folder / f"slide-{size}.zarr"
            write_pyramid(store, size)
            modes = [(mode, side) for side in args.large_sides for mode in ("pyramid", "lazy")]
            modes += [("whole", size)] if size <= args.whole_up_to else []
            for mode, side in modes:
                output, seconds, peak = run(store, mode, folder / "cache", side)
                parts = output.split(" ", 2)
                seconds_in_run = parts[0] if len(parts) == 3 else "-"
                labels = " ".join(parts[1:]) if len(parts) == 3 else output
                side_text = side if mode != "whole" else "-"
                print(f"| {size} x {size} | {mode} | {side_text} | {seconds_in_run} | {seconds:.1f} | {peak:.2f} | "
                      f"{labels} |", flush=True)
            shutil.rmtree(store, ignore_errors=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
