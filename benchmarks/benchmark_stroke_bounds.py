"""What a re-run after a stroke could skip if it knew more: the tiles it recomputes now, against the tiles that
bounds built on more knowledge would let it keep.

    python benchmarks/benchmark_stroke_bounds.py [--size 4096] [--strokes 4]

The image, classes and strokes are those of ``benchmark_live.py`` (the mosaic of 256 shapes, demo model, edge
snapping on). A re-run keeps a pixel's label where its class cannot lose to another: where its previous margin
exceeds what the stroke can have changed. The change it can know without snapping the new scores is bounded over
each tile's reach (snapping carries a value 160 pixels, so a tile's bounds span 384 x 384 pixels). For each stroke
this prints the share of tiles:

- within whose reach some class's scores changed (where the change itself would have to be snapped to be known);
- recomputed by this version, and whose labels changed (what any exact re-run must recompute);
- that a re-run would recompute if it knew each pixel's exact change (the new and old scores resized and snapped:
  as costly as the re-run itself), with one margin a pixel (to its runner-up, as this version keeps), with a
  margin to every class, and with the runner-up's class and the margin to the third class as well;
- that this version's own bounds find they must recompute (emulated from its judging, before the classes that
  rose are narrowed down per tile), and would find if each pixel also kept its runner-up's class and its margin to
  the third class (with the exact margins of the previous scores), or its margin to every class.

Every share counts a tile where any pixel of it fails. The rounding bound of the re-runs (``ROUNDING``) applies
wherever a class rose against another.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import torch

os.environ.setdefault("NAPARI_CLEARCLIP_CACHE_DIR", tempfile.mkdtemp())

from benchmark_live import CLASSES, mosaic, stroke_at, tiles_changed  # noqa: E402

from napari_clearclip import Segmenter, compiled_labels  # noqa: E402
from napari_clearclip import tiled_labels as tiles  # noqa: E402
from napari_clearclip.options import PAMR_DILATIONS, PAMR_ITERATIONS  # noqa: E402
from napari_clearclip.refine import pamr  # noqa: E402

TILE = tiles.TILE


class Recorder:
    """The scores and guide each labelling starts from, and what the re-run's judging of tiles was given."""

    def __init__(self):
        self.scores, self.judged = [], []
        self._label_steps, self._judge_tiles = tiles.label_steps, compiled_labels.judge_tiles

    def __enter__(self):
        def label_steps(scores, guide, *args, **kwargs):
            self.scores.append((scores.detach().float().cpu().clone(), guide))
            return (yield from self._label_steps(scores, guide, *args, **kwargs))

        def judge_tiles(bounds, ys, xs, labels, margins, winners, tile, dirty):
            # before the judging lowers the kept tiles' margins in place
            self.judged.append((bounds, ys.copy(), xs.copy(), labels.copy(), margins.copy(),
                                None if winners is None else winners.copy()))
            return self._judge_tiles(bounds, ys, xs, labels, margins, winners, tile, dirty)
        tiles.label_steps, compiled_labels.judge_tiles = label_steps, judge_tiles
        return self

    def __exit__(self, *exc):
        tiles.label_steps, compiled_labels.judge_tiles = self._label_steps, self._judge_tiles


def snapped(scores: torch.Tensor, guide: torch.Tensor, size: int) -> np.ndarray:
    """(Q, size, size) the scores resized and snapped over the whole image, as a run that skips nothing."""
    rows, columns = tiles.bilinear_taps(scores.shape[1], size), tiles.bilinear_taps(scores.shape[2], size)
    guide_rows, guide_columns = tiles.bilinear_taps(guide.shape[1], size), tiles.bilinear_taps(guide.shape[2], size)
    return pamr(tiles.upsample(scores, rows, columns), tiles.upsample(guide.float(), guide_rows, guide_columns),
                PAMR_ITERATIONS, PAMR_DILATIONS).numpy()


def tile_share(failing: np.ndarray) -> float:
    """The share of tiles holding a failing pixel."""
    size = failing.shape[0]
    return float(failing.reshape(size // TILE, TILE, size // TILE, TILE).any(axis=(1, 3)).mean())


def exact_change_shares(before: np.ndarray, after: np.ndarray, tolerance: float) -> dict:
    """Tiles a re-run would recompute knowing each pixel's exact change, with one margin, every margin, or the
    runner-up's class and the third margin (one class a query here)."""
    order = np.argsort(before, 0)
    winner, runner_up, third = order[-1], order[-2], order[-3]
    value = np.take_along_axis(before, winner[None], 0)[0]
    margin = value - np.take_along_axis(before, runner_up[None], 0)[0]
    third_margin = value - np.take_along_axis(before, third[None], 0)[0]
    change = after - before
    against = change - np.take_along_axis(change, winner[None], 0)   # (C, H, W): how much each class gained on it
    np.put_along_axis(against, winner[None], -np.inf, 0)
    gaps = value[None] - before
    np.put_along_axis(gaps, winner[None], np.inf, 0)

    def fails(lead, gained):   # a class that gained can have overtaken where the lead is not clear of it
        return (gained > 0) & (lead <= gained + tolerance)
    gained_runner_up = np.take_along_axis(against, runner_up[None], 0)[0]
    np.put_along_axis(against, runner_up[None], -np.inf, 0)
    gained_others = against.max(0)
    np.put_along_axis(against, runner_up[None], gained_runner_up[None], 0)
    return {"one margin": tile_share(fails(margin, against.max(0))),
            "every margin": tile_share(fails(gaps, against).any(0)),
            "runner-up and third": tile_share(fails(margin, gained_runner_up) | fails(third_margin, gained_others))}


def with_runner_up_share(judged: tuple, before: np.ndarray, scores: tuple, tolerance: float,
                         size: int) -> tuple[float, float]:
    """Tiles this version's judging finds it must recompute (before the classes that rose are narrowed down per tile,
    which lowers what it recomputes in the end), and would find if each pixel also kept its runner-up's class and
    its margin to the third class: a pixel then keeps its label where this version keeps it, or where its margin exceeds the most
    its runner-up can have gained on it and its third margin the most any other class can have (bounded over the
    tile's reach, as this version bounds them)."""
    bounds, ys, xs, labels, margins, winners = judged
    geometry = tiles._Geometry(tuple(scores[1].shape[1:]), (size, size), PAMR_ITERATIONS * max(PAMR_DILATIONS), TILE)
    change = (scores[1] - scores[0]).numpy()
    classes = change.shape[0]
    gained = np.full((classes, classes, *geometry.shape), -np.inf, np.float32)  # [w, c]: c's most over w, per tile
    for w in range(classes):
        for c in range(classes):
            if c != w:
                gained[w, c] = geometry.reduce(change[c] - change[w], "max")
    gained_others = np.full_like(gained, -np.inf)
    for w in range(classes):
        for r in range(classes):
            if r != w:
                gained_others[w, r] = np.max([gained[w, c] for c in range(classes) if c not in (w, r)], axis=0)

    def blocks(array):
        return tiles._tile_blocks(array, TILE)[ys, xs]
    label_blocks, margin_blocks = blocks(labels), blocks(margins).astype(np.float32)
    keeps = margin_blocks > tiles._per_pixel(bounds.threshold[ys, xs], label_blocks)
    if bounds.highest is not None and winners is not None:
        highest = tiles._per_pixel(bounds.highest[ys, xs], label_blocks)
        with np.errstate(invalid="ignore"):
            keeps |= np.where(np.isfinite(highest), blocks(winners) - highest, -np.inf) > 0
    total = geometry.shape[0] * geometry.shape[1]
    judged_now = float((~keeps.all(axis=(1, 2))).sum() / total)
    order = np.argsort(before, 0)
    winner, runner_up = blocks(np.ascontiguousarray(order[-1])), blocks(np.ascontiguousarray(order[-2]))
    sorted_values = np.sort(before, 0)
    third_margin = blocks(np.ascontiguousarray(sorted_values[-1] - sorted_values[-3]))
    at = (ys[:, None, None], xs[:, None, None])
    by_runner_up, by_others = gained[winner, runner_up, at[0], at[1]], gained_others[winner, runner_up, at[0], at[1]]
    keeps |= ((label_blocks == winner + 1)
              & (margin_blocks > np.maximum(by_runner_up, 0) + tolerance)
              & (third_margin > np.maximum(by_others, 0) + tolerance))
    return judged_now, float((~keeps.all(axis=(1, 2))).sum() / total)


def bounded_every_margin_share(before: np.ndarray, scores: tuple, tolerance: float, size: int) -> float:
    """Tiles a re-run would recompute if each pixel kept its exact margin to every class and the change were bounded
    as this version bounds it: the most each class gained on the pixel's class over the tile's reach."""
    old, new = scores
    geometry = tiles._Geometry(tuple(new.shape[1:]), (size, size), PAMR_ITERATIONS * max(PAMR_DILATIONS), TILE)
    change = (new - old).numpy()
    winner, value = before.argmax(0), before.max(0)
    per_pixel = np.arange(size) // TILE
    failing = np.zeros((size, size), bool)
    for w in range(change.shape[0]):
        at_winner = winner == w
        for c in range(change.shape[0]):
            if c == w or not at_winner.any():
                continue
            gained = np.maximum(geometry.reduce(change[c] - change[w], "max"), 0)[per_pixel][:, per_pixel]
            failing |= at_winner & (gained > 0) & (value - before[c] <= gained + tolerance)
    return tile_share(failing)


def changed_within_reach(old: torch.Tensor, new: torch.Tensor, size: int) -> float:
    """The share of tiles within whose reach some class's scores changed: where the change itself would have to be
    snapped to be known exactly."""
    geometry = tiles._Geometry(tuple(new.shape[1:]), (size, size), PAMR_ITERATIONS * max(PAMR_DILATIONS), TILE)
    changed = (new != old).any(0).numpy().astype(np.uint8)
    return float(geometry.reduce(changed, "max").mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--strokes", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = args.size
    image = mosaic(size)
    segmenter = Segmenter("synthetic-tiny", device="cpu", disk_cache=False, label_cache_bytes=2 << 30)
    rows = []
    with Recorder() as recorder:
        labels = segmenter.segment(image, CLASSES, maps=False, refine="pamr").labels
        rng = np.random.default_rng(size)   # the strokes of benchmark_live.py
        painted = np.zeros(image.shape[:2], np.int32)
        for number in range(args.strokes):
            recorder.judged.clear()
            where, klass = stroke_at(labels, rng, confirm=number % 2 == 0)
            painted[where] = klass
            result = segmenter.segment(image, CLASSES, maps=False, refine="pamr", strokes=painted)
            state = [entry[0] for entry in segmenter._label_states._items.values()][-1]
            (old, guide), (new, _) = recorder.scores[-2], recorder.scores[-1]
            tolerance = tiles.ROUNDING * max(1.0, float(new.abs().max()))
            before, after = snapped(old, guide, size), snapped(new, guide, size)
            exact = exact_change_shares(before, after, tolerance)
            judged = (with_runner_up_share(recorder.judged[0], before, (old, new), tolerance, size)
                      if recorder.judged else (float("nan"), float("nan")))
            judged += (bounded_every_margin_share(before, (old, new), tolerance, size),)
            rows.append((number + 1, "confirming" if number % 2 == 0 else "correcting", state.computed,
                         tiles_changed(labels, result.labels), exact, judged, changed_within_reach(old, new, size)))
            labels = result.labels
            print(f"stroke {number + 1} measured", flush=True)
    print(f"\n{size} x {size} mosaic, 5 classes, demo model, edge snapping on: shares of the {(size // TILE) ** 2} tiles")
    print("\n| stroke | a score changed within reach | recomputed now | labels changed | exact change, one margin | "
          "exact change, every margin | "
          "exact change, runner-up and third | judged by these bounds | these bounds, runner-up and third | "
          "these bounds, every margin |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for number, kind, computed, changed, exact, judged, reach in rows:
        print(f"| {number} ({kind}) | {reach:.1%} | {computed:.1%} | {changed:.1%} | {exact['one margin']:.1%} | "
              f"{exact['every margin']:.1%} | {exact['runner-up and third']:.1%} | {judged[0]:.1%} | {judged[1]:.1%} | "
              f"{judged[2]:.1%} |")


if __name__ == "__main__":
    main()
