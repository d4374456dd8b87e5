"""Peak memory of edge snapping on a large image, against the same run without snapping.

    python benchmarks/benchmark_snap_memory.py [--size 6000] [--classes 30]

Demo model, its own window settings, ``maps=False``; each case runs in a fresh process and
reports its peak resident memory (sampled every 20 ms) and time.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

SCRIPT = r'''
import os, sys, tempfile, threading, time
import numpy as np, psutil
os.environ["NAPARI_CLEARCLIP_CACHE_DIR"] = tempfile.mkdtemp()
from napari_clearclip import Segmenter
from napari_clearclip.demo.scenes import make_scene
size, count, refine = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
segmenter = Segmenter("synthetic-tiny", device="cpu")
tile = make_scene(3, size=500, objects=(4, 4)).image
reps = -(-size // 500)
image = np.tile(tile, (reps, reps, 1))[:size, :size].copy()
classes = ["red", "green", "blue", "yellow", "background"] + [f"thing {i}" for i in range(count - 5)]
process = psutil.Process()
baseline = process.memory_info().rss
peak = [baseline]
done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], process.memory_info().rss)
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
start = time.perf_counter()
result = segmenter.segment(image, classes, maps=False, refine=None if refine == "none" else "pamr",
                           templates=["a photo of a {}."])
seconds = time.perf_counter() - start
done.set()
print(f"{peak[0] / 2**30:.2f} {baseline / 2**30:.2f} {seconds:.1f} {int(result.labels.sum()) % 1000003}")
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=6000)
    parser.add_argument("--classes", type=int, default=30)
    args = parser.parse_args()
    print(f"{args.size} x {args.size} RGB, {args.classes} classes, demo model, maps=False")
    for refine in ("none", "pamr"):
        done = subprocess.run([sys.executable, "-c", SCRIPT, str(args.size), str(args.classes), refine],
                              capture_output=True, text=True)
        if done.returncode:
            print(refine, "failed:", done.stderr[-1500:])
            continue
        peak, baseline, seconds, checksum = done.stdout.split()[-4:]
        print(f"refine={refine:<5} peak resident {peak} GiB (process before the run {baseline} GiB), {seconds} s, "
              f"labels checksum {checksum}")


if __name__ == "__main__":
    main()
