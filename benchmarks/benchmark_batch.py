"""Images per second: the sequential batch against a dask LocalCluster, on the same inputs.

    python benchmarks/benchmark_batch.py [--images 32] [--workers 2] [--model synthetic-tiny] [--device cpu]

Writes 32 synthetic 512 x 512 scenes to a temporary folder, segments them in this process,
then on a LocalCluster of ``--workers`` processes (each loading the model once), checks that
the labels are identical, and prints both throughputs and their ratio. On a 2-core machine
expect parity: the point is that the cluster path adds little; more cores, machines or GPUs
are where it pays.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--model", default="synthetic-tiny")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    os.environ.setdefault("NAPARI_CLEARCLIP_CACHE_DIR", tempfile.mkdtemp())

    import distributed
    import tifffile
    from skimage.io import imsave

    from napari_clearclip.batch import segment_files
    from napari_clearclip.demo.scenes import DEMO_CLASSES, make_scene

    root = Path(tempfile.mkdtemp())
    inputs = root / "inputs"
    inputs.mkdir()
    for i in range(args.images):
        imsave(inputs / f"scene{i:03d}.png", make_scene(1000 + i, size=args.size).image, check_contrast=False)
    classes = DEMO_CLASSES.split("\n")
    common = dict(model=args.model, pretrained=args.pretrained, device=args.device, report=False)

    start = time.perf_counter()
    segment_files([inputs], classes, root / "sequential", **common)
    sequential = time.perf_counter() - start

    cluster = distributed.LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
    client = distributed.Client(cluster)
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    client.run(lambda: __import__("torch").set_num_threads(threads))
    client.run(lambda: __import__("napari_clearclip.batch.cluster", fromlist=["segmenter_for"]))  # warm imports
    start = time.perf_counter()
    segment_files([inputs], classes, root / "cluster", client=client, **common)
    parallel = time.perf_counter() - start
    client.close()
    cluster.close()

    for name in sorted(p.name for p in (root / "sequential").glob("*_labels.tif")):
        assert np.array_equal(tifffile.imread(root / "sequential" / name), tifffile.imread(root / "cluster" / name))
    print(f"{args.images} images of {args.size} x {args.size}, {args.model} on {args.device}, {os.cpu_count()} cores")
    print(f"sequential:        {args.images / sequential:6.2f} images/s ({sequential:.1f} s)")
    print(f"local:{args.workers} cluster:  {args.images / parallel:6.2f} images/s ({parallel:.1f} s, model loads "
          "and worker start included)")
    print(f"ratio cluster / sequential: {sequential / parallel:.2f}; labels identical")


if __name__ == "__main__":
    main()
