"""Where a stroke's re-run spends its snapping time: the compiled snapping loop's rate against this machine's
memory, and the pixels each stroke snaps against those an exact cone of its tiles would snap.

    python benchmarks/benchmark_snapping_rates.py [--size 4096] [--strokes 4]

Edge snapping (PAMR) makes each value of an iteration the weighted sum of 16 neighbours (dilations 8 and 16): it
reads 16 float32 weights (64 bytes) a pixel and iteration, shared by the classes snapped together. A stroke's
re-run snaps one class (the difference of the class it raised and a reference) over most of its pixels, so it
reads 64 bytes for 16 multiply-adds: the weights' reads, not the arithmetic, set its pace. This prints, all
measured in this run:

- the rate two threads read an array that stays in the processor's cache (1 MiB, 32 MiB) and one that does not
  (1 GiB), the yardsticks;
- the snapping loop's rate for 1, 2 and 4 classes: one pass on one thread over weights that stay in its core's
  cache (the pace of its arithmetic), and ten iterations on every thread advancing together down a 1536 x 3072
  region as re-runs compute them (``refine._refine_padded``), with the weights' bytes read a second;
- for each stroke of ``benchmark_live.py``'s mosaic: the seconds of the re-run and of its snapping loop, the
  class-pixel-iterations snapped (in whole images' worth), and what a snapping that computed each iteration only
  within the exact reach of the recomputed tiles (every row's columns as many spans as needed, rather than one
  span from the row's first to last tile) would snap.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

os.environ.setdefault("NAPARI_CLEARCLIP_CACHE_DIR", tempfile.mkdtemp())

from benchmark_live import CLASSES, mosaic, stroke_at  # noqa: E402

from napari_clearclip import compiled_snapping, refine  # noqa: E402
from napari_clearclip import tiled_labels as tiles  # noqa: E402
from napari_clearclip.options import PAMR_DILATIONS, PAMR_ITERATIONS  # noqa: E402
from napari_clearclip.progress import run_to_end  # noqa: E402


def best_seconds(function, repeats: int, rounds: int = 3) -> float:
    """The fastest of ``rounds`` averages of ``repeats`` calls."""
    function()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            function()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def read_rates() -> dict[str, float]:
    """GiB a second that PyTorch's sum reads, by the size of the array read."""
    rates = {}
    for name, mib in (("1 MiB (in the cache)", 1), ("32 MiB (in the last-level cache, if it is that large)", 32),
                      ("1 GiB (from memory)", 1024)):
        values = torch.rand(mib << 18)
        seconds = best_seconds(values.sum, max(2, 2048 // mib))
        rates[name] = mib / 1024 / seconds
    return rates


def _offsets() -> list[tuple[int, int]]:
    return [(dy * d, dx * d) for d in PAMR_DILATIONS for dy, dx in refine.NEIGHBOURS]


def loop_rate(classes: int, height: int = 64, width: int = 512) -> float:
    """Nanoseconds a class-pixel of one pass of the snapping loop, on one thread, over weights small enough to stay
    in its core's cache: the pace its arithmetic allows (each value's multiply-adds one after the other)."""
    pad = max(PAMR_DILATIONS)
    current = torch.rand(classes, height + 2 * pad, width + 2 * pad)
    weights = torch.rand(len(_offsets()), height, width)
    rows = compiled_snapping.averaging(current, torch.empty_like(current), weights, _offsets(), pad, width, True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seconds = best_seconds(lambda: rows(0, height), max(1, 2_000_000 // (height * width * classes)))
    finally:
        torch.set_num_threads(threads)
    return seconds / (height * width * classes) * 1e9


def wave_rate(classes: int, height: int = 1536, width: int = 3072) -> float:
    """Nanoseconds a class-pixel-iteration of the iterations advancing together over a region, as re-runs snap."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(classes, height, width, generator=generator)
    weights = refine.pamr_affinities(torch.rand(3, height, width, generator=generator), tuple(PAMR_DILATIONS))
    padded = refine._replicate(scores, max(PAMR_DILATIONS))
    seconds = best_seconds(lambda: run_to_end(refine._refine_padded(padded.clone(), None, PAMR_ITERATIONS,
                                                                       tuple(PAMR_DILATIONS), weights)), 1)
    return seconds / (height * width * classes * PAMR_ITERATIONS) * 1e9


class SnappingCount:
    """Counts, while installed, the class-pixel-iterations the snapping loop computes and the seconds it takes,
    and notes each snapped region's tiles (see :meth:`exact_reach`)."""

    def __init__(self):
        self.pixels = 0
        self.seconds = 0.0
        self._regions: list = []

    def __enter__(self):
        self._shared, self._needed = compiled_snapping.shared_rows, tiles._needed_columns
        compiled_snapping.shared_rows, tiles._needed_columns = self._counted_rows, self._counted_needed
        return self

    def __exit__(self, *exc):
        compiled_snapping.shared_rows, tiles._needed_columns = self._shared, self._needed

    def _counted_rows(self, loop, first, last, values_per_row, *arguments, **keywords):
        if getattr(loop, "__name__", "") != "weighted_rows":
            return self._shared(loop, first, last, values_per_row, *arguments, **keywords)
        source, spans, (left, right) = arguments[0], arguments[-3], arguments[-2:]
        if spans.shape[0]:
            low, high = np.maximum(left, spans[first:last, 0]), np.minimum(right, spans[first:last, 1])
            self.pixels += int(np.maximum(high - low, 0).sum()) * source.shape[0]
        else:
            self.pixels += (last - first) * (right - left) * source.shape[0]
        start = time.perf_counter()
        self._shared(loop, first, last, values_per_row, *arguments, **keywords)
        self.seconds += time.perf_counter() - start

    def _counted_needed(self, region_tiles, rectangle, geometry, iterations, reach):
        self._regions.append((np.asarray(region_tiles, np.int64).reshape(-1, 2), rectangle, geometry, iterations,
                              reach))
        return self._needed(region_tiles, rectangle, geometry, iterations, reach)

    def exact_reach(self) -> int:
        """One class's pixel-iterations within the exact reach of each snapped region's tiles (counted after the
        run, so that it is not timed)."""
        from scipy import ndimage

        total = 0
        for region_tiles, (top, bottom, left, right), geometry, iterations, reach in self._regions:
            inside = np.zeros((bottom - top, right - left), bool)
            for ty, tx in region_tiles:
                y, x = int(geometry.tile_rows[ty]) - top, int(geometry.tile_cols[tx]) - left
                inside[max(0, y) : y + geometry.tile, max(0, x) : x + geometry.tile] = True
            for t in range(1, iterations + 1):   # what iteration t needs: within (iterations - t) x reach
                widen = (iterations - t) * reach
                total += int((ndimage.maximum_filter(inside, 2 * widen + 1, mode="constant") if widen
                              else inside).sum())
        return total


def strokes_counted(size: int, strokes: int) -> list[tuple[float, float, float, float]]:
    """(seconds, snapping loop's seconds, class-pixel-iterations snapped, those within the exact reach of the
    recomputed tiles, for one class), in whole images' worth, for each stroke of ``benchmark_live.py``."""
    from napari_clearclip import Segmenter

    image = mosaic(size)
    segmenter = Segmenter("synthetic-tiny", device="cpu", disk_cache=False, label_cache_bytes=2 << 30)
    labels = segmenter.segment(image, CLASSES, maps=False, refine="pamr").labels
    rng = np.random.default_rng(size)
    painted = np.zeros(image.shape[:2], np.int32)
    rows = []
    for number in range(strokes):
        where, klass = stroke_at(labels, rng, confirm=number % 2 == 0)
        painted[where] = klass
        with SnappingCount() as count:
            start = time.perf_counter()
            labels = segmenter.segment(image, CLASSES, maps=False, refine="pamr", strokes=painted).labels
            seconds = time.perf_counter() - start
        rows.append((seconds, count.seconds, count.pixels / size**2, count.exact_reach() / size**2))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--strokes", type=int, default=4)
    args = parser.parse_args()
    print(f"{torch.get_num_threads()} threads")
    rates = read_rates()
    for name, rate in rates.items():
        print(f"  reading an array of {name}: {rate:.1f} GiB/s")
    weight_bytes = 4 * len(_offsets())
    print("\nthe snapping loop, nanoseconds a class-pixel (iteration), and the weights' GiB read a second:")
    for classes in (1, 2, 4):
        cached, wave = loop_rate(classes), wave_rate(classes)
        print(f"  {classes} class{'es' if classes > 1 else ''}: one pass in the cache, one thread {cached:.2f} ns "
              f"({weight_bytes / (cached * classes) / 1.073741824:.1f} GiB/s); ten iterations over 1536 x 3072 "
              f"{wave:.2f} ns ({weight_bytes / (wave * classes) / 1.073741824:.1f} GiB/s)")
    print(f"\n{args.size} x {args.size} mosaic, strokes as in benchmark_live.py:")
    for number, (seconds, snapping, pixels, exact) in enumerate(strokes_counted(args.size, args.strokes), 1):
        print(f"  stroke {number}: {seconds:.2f} s, of which the snapping loop {snapping:.2f} s "
              f"({snapping / seconds:.0%}); {pixels:.2f} images' worth of class-pixel-iterations snapped, "
              f"{snapping / max(pixels, 1e-9) / args.size**2 * 1e9:.2f} ns each; within the exact reach of the "
              f"recomputed tiles (one class) {exact:.2f}")


if __name__ == "__main__":
    main()
