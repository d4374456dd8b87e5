"""Re-opening an image in a new session: the first run there against the very first run, with the feature store.

    python benchmarks/benchmark_feature_store.py [--sizes 1024 4096] [--model synthetic-tiny | ViT-B-16] [--repeats 3]

Each run is a fresh process (a new napari session, as far as the engine knows) sharing one
feature store folder: the first encodes the image and stores its features; the next ones open
the same image with the same classes, then each with a class no session has typed before (whose
text must be encoded). Runs of each kind are repeated, the first run too (each in a folder of its
own, with nothing stored): on a busy machine one run can take twice as long as the next, and a
ratio against one slow first run would flatter every later one.
With and without edge snapping, ``maps=False``. The last column times the text of one more class no
session typed, alone, in a fresh process that has encoded another class first: no session with a class added can
take less than that, whatever it keeps on disk.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile

SCRIPT = r'''
import os, sys, time
os.environ["NAPARI_CLEARCLIP_CACHE_DIR"] = sys.argv[1]
import numpy as np
from napari_clearclip import Segmenter
from napari_clearclip.demo.scenes import make_scene
size, model, snap, classes = int(sys.argv[2]), sys.argv[3], sys.argv[4] == "snap", sys.argv[5].split(";")
image = np.kron(make_scene(7, size=size // 8, objects=(3, 3)).image, np.ones((8, 8, 1), np.uint8))
if model == "synthetic-tiny":
    segmenter = Segmenter(model, device="cpu")
else:  # randomly initialised weights, saved once for every run (no download)
    import open_clip, torch
    checkpoint = os.path.join(sys.argv[6], model + ".pt")
    if not os.path.exists(checkpoint):
        torch.manual_seed(0)
        torch.save(open_clip.create_model(model, pretrained=None).state_dict(), checkpoint)
    segmenter = Segmenter(model, checkpoint, device="cpu", precision="fp32")
if len(sys.argv) > 7:  # the text of one class no session typed, alone (after another one, so nothing else loads)
    segmenter.encode_classes(sys.argv[7])
    start = time.perf_counter()
    segmenter.encode_classes(classes[-1])
    print(time.perf_counter() - start)
    raise SystemExit
start = time.perf_counter()
segmenter.segment(image, classes, maps=False, refine="pamr" if snap else None)
print(time.perf_counter() - start)
'''


def run(cache: str, size: int, model: str, snap: str, classes: str, weights: str, warm_up: str = "") -> float:
    """Seconds of one run in a fresh process; with ``warm_up`` (a class name), of the last class's text alone."""
    done = subprocess.run([sys.executable, "-c", SCRIPT, cache, str(size), model, snap, classes, weights]
                          + ([warm_up] if warm_up else []), capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-1500:])
    return float(done.stdout.split()[-1])


#: A class added in each repeated session: a name no earlier session encoded.
ADDED = ["purple", "orange", "pink", "brown", "cyan", "white", "black", "grey"]
CLASSES = "red;green;blue;yellow;background"
#: Classes whose text alone is timed (after a warm-up class): the floor of a new session with a class added.
TEXT_ONLY = [("violet", "teal"), ("olive", "navy"), ("maroon", "lime"), ("beige", "coral"), ("gold", "silver"),
             ("indigo", "khaki"), ("ivory", "salmon"), ("plum", "tan")]


def spread(seconds: list[float]) -> str:
    """The median, with the range when there are several runs."""
    middle = statistics.median(seconds)
    places = 3 if middle < 1 else 2   # a new session takes a few hundredths: the third place tells them apart
    return f"{middle:.{places}f} s" + (f" ({min(seconds):.{places}f}-{max(seconds):.{places}f})" if len(seconds) > 1
                                       else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--model", default="synthetic-tiny")
    parser.add_argument("--repeats", type=int, default=3, choices=range(1, len(ADDED) + 1), metavar="1-8",
                        help="first runs, and new sessions of each kind; their median (and range) is printed "
                             "(default 3)")
    args = parser.parse_args()
    print(f"model {args.model}; each kind of run: median (range) of {args.repeats}")
    print("| image | snapping | first run, first session | new session, same classes | new session, a class added "
          "| ratios of the medians | target | a class's text alone (floor of a class added) |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        table(args, folder)


def table(args, folder: str) -> None:
    for size in args.sizes:
        for snap in ("no-snap", "snap"):
            firsts = []
            for _ in range(args.repeats):  # text embeddings and the feature store: nothing yet
                cache = tempfile.mkdtemp(dir=folder)
                firsts.append(run(cache, size, args.model, snap, CLASSES, folder))
            first = statistics.median(firsts)  # the last folder is shared by the new sessions
            same = [run(cache, size, args.model, snap, CLASSES, folder) for _ in range(args.repeats)]
            later = [run(cache, size, args.model, snap, f"{CLASSES};{ADDED[number]}", folder)
                     for number in range(args.repeats)]
            text = [run(cache, size, args.model, snap, f"{CLASSES};{TEXT_ONLY[number][1]}", folder,
                        warm_up=TEXT_ONLY[number][0]) for number in range(args.repeats)]
            print(f"| {size} x {size} | {'on' if snap == 'snap' else 'off'} | {spread(firsts)} | {spread(same)} | "
                  f"{spread(later)} | {statistics.median(same) / first:.1%}, {statistics.median(later) / first:.1%} "
                  f"| <= 5% | {spread(text)}, {statistics.median(text) / first:.1%} |", flush=True)


if __name__ == "__main__":
    main()
