"""A slide given as one dask chunk (as reader plugins built on bioio or aicsimageio give a plane), segmented tile by
tile: the time and the chunk computations with each chunk kept while the tiles over it are read, against the plain
dask array (each tile computing the whole chunk again), measured in the same run.

    python benchmarks/benchmark_one_chunk_slide.py [--size 6144] [--tile 2048] [--snap] [--strokes]
    python benchmarks/benchmark_one_chunk_slide.py --reduce 3 [--size 12000]

The slide (synthetic shapes, demo model, 5 classes, native resolution) is held zlib-compressed; its one chunk
decompresses it, as a reader decodes a file. ``--strokes`` adds strokes on it (a first pass over the image gathers
their statistics). Prints both runs' times and chunk computations, their ratio and whether the labels are equal.
``--reduce FACTOR`` instead makes the copy that Resize on segments (block means), of the one-chunk slide and of the
same slide in chunks of 1024 x 1024, and prints each one's time and peak of traced memory against the slide's size.
"""

from __future__ import annotations

import argparse
import time
import zlib

import numpy as np


def slide(size: int) -> np.ndarray:
    from napari_clearclip.demo.scenes import make_scene

    tile = make_scene(5, size=1000, objects=(12, 16)).image
    rows = np.arange(size) % 1000
    return tile[rows][:, rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=6144)
    parser.add_argument("--tile", type=int, default=2048)
    parser.add_argument("--snap", action="store_true", help="edge snapping on (the widget's default)")
    parser.add_argument("--strokes", action="store_true", help="strokes on the slide: a pass for their statistics")
    parser.add_argument("--reduce", type=int, default=0, metavar="FACTOR", help="time the reduced copy instead")
    args = parser.parse_args()
    if args.reduce:
        return reduce(args.size, args.reduce)

    import dask
    import dask.array as da

    import napari_clearclip.block_reads as block_reads
    from napari_clearclip import Segmenter

    image = slide(args.size)
    packed, shape = zlib.compress(image.tobytes(), 1), image.shape
    computed = []

    def decode():
        computed.append(1)
        return np.frombuffer(zlib.decompress(packed), np.uint8).reshape(shape)

    start = time.perf_counter()
    decode()
    decoding = time.perf_counter() - start
    lazy = da.from_delayed(dask.delayed(decode)(), shape=shape, dtype=np.uint8)
    classes = ["red", "green", "blue", "yellow", "background"]
    options = dict(short_side=None, refine="pamr" if args.snap else None)
    strokes = None
    if args.strokes:
        strokes = np.zeros(shape[:2], np.int32)
        strokes[100:104, 100:300], strokes[2000:2004, 1500:1800] = 5, 1
    segmenter = Segmenter("synthetic-tiny", device="cpu", feature_store=False)
    plain = block_reads.with_kept_blocks
    results = {}
    for name, wrap in (("plain dask", lambda image, tile: image), ("chunks kept", plain)):
        block_reads.with_kept_blocks = wrap
        computed.clear()
        start = time.perf_counter()
        labels = segmenter.segment_tiled(lazy, classes, tile=args.tile, strokes=strokes, **options)
        results[name] = (time.perf_counter() - start, len(computed), np.asarray(labels))
    block_reads.with_kept_blocks = plain
    print(f"{args.size} x {args.size} RGB, one chunk (decoding it: {decoding:.2f} s), tile {args.tile}, "
          f"snapping {'on' if args.snap else 'off'}, strokes {'on' if args.strokes else 'off'}")
    print("| reading | time | chunk computations |\n|---|---|---|")
    for name, (seconds, count, _) in results.items():
        print(f"| {name} | {seconds:.1f} s | {count} |")
    (slow, _, a), (fast, _, b) = results.values()
    print(f"ratio (chunks kept / plain): {fast / slow:.3f}; labels equal: {np.array_equal(a, b)}")


def reduce(size: int, factor: int) -> None:
    """The block-means copy of a one-chunk slide against the same slide in chunks of 1024 x 1024."""
    import tracemalloc

    import dask
    import dask.array as da

    from napari_clearclip.reduced import BlockMeans

    image = slide(size)
    print(f"{size} x {size} RGB ({image.nbytes / 2**20:.0f} MiB), reduced by {factor}")
    print("| chunks | time | peak traced memory | peak / slide |\n|---|---|---|---|")
    copies = []
    for name, lazy in (("one", da.from_delayed(dask.delayed(lambda: image.copy())(), shape=image.shape,
                                              dtype=image.dtype)),
                       ("1024 x 1024", da.from_array(image, chunks=(1024, 1024, 3)))):
        tracemalloc.start()
        start = time.perf_counter()
        copies.append(np.asarray(BlockMeans(lazy, factor, rgb=True)))
        seconds, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(f"| {name} | {seconds:.1f} s | {peak / 2**30:.2f} GiB | {peak / image.nbytes:.2f} |")
    print(f"copies equal: {np.array_equal(*copies)}")


if __name__ == "__main__":
    main()
