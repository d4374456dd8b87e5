"""Peak memory of a native-resolution run on a large 2-D image (windows streamed in batches).

    python benchmarks/benchmark_memory.py --size 8000                      # synthetic-tiny, CPU
    python benchmarks/benchmark_memory.py --size 8000 --model ViT-B-16 --device cuda

Reports the process's peak resident memory next to the unavoidable part: the input
image and the result arrays (labels, probabilities and similarities at full size).
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import tempfile
import threading
import time

import numpy as np
import psutil
import torch

CLASSES = ["red", "green", "blue", "yellow", "background"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=8000)
    parser.add_argument("--model", default="synthetic-tiny")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="clearclip-mem-")
    os.environ["NAPARI_CLEARCLIP_CACHE_DIR"] = os.path.join(workdir, "cache")

    import open_clip

    from napari_clearclip import Segmenter
    from napari_clearclip.demo.scenes import make_scene

    pretrained = None
    if args.model != "synthetic-tiny":
        logging.disable(logging.WARNING)
        pretrained = os.path.join(workdir, "random.pt")
        torch.save(open_clip.create_model(args.model, pretrained=None).state_dict(), pretrained)
        logging.disable(logging.NOTSET)
    segmenter = Segmenter(args.model, pretrained, device=args.device)
    tile = make_scene(3, size=512, objects=(4, 4)).image
    reps = -(-args.size // 512)
    image = np.tile(tile, (reps, reps, 1))[: args.size, : args.size].copy()

    process = psutil.Process()
    baseline = process.memory_info().rss
    peak = [baseline]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = segmenter.segment(image, CLASSES, short_side=None, templates=["a photo of a {}."])
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    peak_rss = max(peak[0], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    outputs = result.labels.nbytes + result.probabilities.nbytes + result.similarity.nbytes
    gib = 1 << 30
    windows = segmenter._features
    print(f"{args.model} on {args.device}: {args.size}x{args.size} RGB at native resolution, "
          f"{len(CLASSES)} classes, {seconds:.0f} s")
    print(f"input image            {image.nbytes / gib:6.2f} GiB")
    print(f"result arrays          {outputs / gib:6.2f} GiB (labels, probabilities, similarities)")
    print(f"process before the run {baseline / gib:6.2f} GiB")
    print(f"peak resident memory   {peak_rss / gib:6.2f} GiB (increase {(peak_rss - baseline) / gib:.2f} GiB)")
    if torch.cuda.is_available() and args.device != "cpu":
        print(f"peak GPU memory        {torch.cuda.max_memory_allocated() / gib:6.2f} GiB")
    print(f"image features cached: {len(windows) > 0} (only when they fit the cache budget)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
