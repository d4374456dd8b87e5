"""Edge-snapping weights kept between runs are the very weights a computation from scratch gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_clearclip import Segmenter, tiled_labels
from napari_clearclip.affinity_tiles import AffinityTiles
from napari_clearclip.demo.scenes import make_scene
from napari_clearclip.progress import run_to_end
from napari_clearclip.refine import pamr_affinities
from napari_clearclip.tiled_labels import label_steps


def random_area(rng, size):
    top, left = int(rng.integers(0, size[0] - 1)), int(rng.integers(0, size[1] - 1))
    return (top, int(rng.integers(top + 1, min(size[0], top + 90) + 1)),
            left, int(rng.integers(left + 1, min(size[1], left + 90) + 1)))


@pytest.mark.parametrize("seed", range(4))
def test_weights_assembled_from_kept_tiles_equal_those_of_the_whole_image_bit_for_bit(seed):
    rng = np.random.default_rng(seed)
    size = (int(rng.integers(60, 200)), int(rng.integers(60, 200)))
    guide = torch.from_numpy(rng.normal(size=(3, *size)).astype(np.float32))
    dilations = (1, int(rng.integers(2, 9)))
    whole = pamr_affinities(guide, dilations)
    computed, banded = [], []

    def compute(area, rows=None):
        top, bottom, left, right = area
        first, last = (0, bottom - top) if rows is None else rows
        computed.append((last - first) * (right - left))
        weights = pamr_affinities(guide[:, top:bottom, left:right], dilations)
        if rows is not None:   # rows not asked for hold anything: here NaN, which the test would see
            banded.append(rows)
            weights[:, :first] = float("nan")
            weights[:, last:] = float("nan")
        return weights

    tile = int(rng.choice([8, 16, 24]))
    kept = AffinityTiles(int(rng.choice([1 << 30, 40 * tile * tile * 64])))  # sometimes room for a few tiles only
    kept.start(("guide", seed), size, tile, max(dilations))
    reach = max(dilations)
    held = set()
    for _ in range(25):
        top, bottom, left, right = area = random_area(rng, size)
        weights = kept.region(area, compute)
        assert weights.shape == (whole.shape[0], bottom - top, right - left)
        # exact except within reach of a side inside the image (as when computed over the area alone)
        y0, x0 = (0 if top == 0 else reach), (0 if left == 0 else reach)
        y1 = max(y0, bottom - top - (0 if bottom == size[0] else reach))
        x1 = max(x0, right - left - (0 if right == size[1] else reach))
        assert torch.equal(weights[:, y0:y1, x0:x1], whole[:, top + y0 : top + y1, left + x0 : left + x1])
        assert kept.nbytes <= kept.max_bytes
        assert held <= set(kept._tiles)  # once full, nothing is dropped for what later runs compute
        held = set(kept._tiles)
    if kept.max_bytes == 1 << 30:
        computed.clear()
        assert torch.equal(kept.region(area, compute)[:, y0:y1, x0:x1],
                           whole[:, top + y0 : top + y1, left + x0 : left + x1])
        assert computed == []  # asked again: nothing computed


def test_a_region_sharing_rows_with_the_one_before_computes_only_its_own_rows():
    """As a first run's regions follow each other down the image: the rows kept by the region before are not computed
    again, nor is what is computed copied; the weights are those of the whole image, and all the new tiles kept."""
    rng = np.random.default_rng(5)
    size, tile, dilations = (160, 120), 16, (1, 4)
    guide = torch.from_numpy(rng.normal(size=(3, *size)).astype(np.float32))
    whole = pamr_affinities(guide, dilations)
    asked = []

    def compute(area, rows=None):
        asked.append((area, rows))
        top, bottom, left, right = area
        weights = pamr_affinities(guide[:, top:bottom, left:right], dilations, rows=rows)
        if rows is not None:
            weights[:, : rows[0]] = float("nan")
            weights[:, rows[1] :] = float("nan")
        return weights

    kept = AffinityTiles(1 << 30)
    kept.start(("guide",), size, tile, max(dilations))
    kept.region((0, 80, 0, 120), compute)                       # keeps tile rows 0-3 (row 76 on is near its side)
    weights = kept.region((40, 160, 0, 120), compute)
    assert asked[-1] == ((36, 160, 0, 120), (28, 124))           # rows 64-160 (tile rows 4-9) of the area and context
    assert torch.equal(weights[:, 4:], whole[:, 44:])           # exact but within reach of the side inside the image
    assert {(ty, tx) for ty in range(10) for tx in range(8)} <= set(kept._tiles)
    asked.clear()
    assert torch.equal(kept.region((40, 160, 0, 120), compute)[:, 4:], whole[:, 44:]) and asked == []


def test_weights_of_another_guide_are_dropped_not_reused():
    rng = np.random.default_rng(1)
    scores = torch.from_numpy(rng.normal(size=(3, 24, 24)).astype(np.float32)) * 0.1
    size, spans, names, snap = (192, 192), [(0, 1), (1, 2), (2, 3)], [("a",), ("b",), ("c",)], (3, (1, 4))
    kept = AffinityTiles()
    for _ in range(2):
        guide = torch.from_numpy(rng.normal(size=(3, 24, 24)).astype(np.float32))
        fast = run_to_end(label_steps(scores, guide, size, spans, names, snap, tile=16, affinities=kept))
        full = run_to_end(label_steps(scores, guide, size, spans, names, snap, dense=True, tile=16))
        np.testing.assert_array_equal(fast.labels, full.labels)
        assert len(kept) > 0


def test_a_rerun_after_a_stroke_computes_weights_only_where_no_run_did(monkeypatch):
    """The weights depend on the image alone: a stroke's re-run assembles them from the first run's."""
    image = make_scene(3, size=384, objects=(3, 3)).image
    classes = ["red", "green", "blue", "yellow", "background"]
    computed = []
    from napari_clearclip import refine

    original = refine.pamr_affinities

    def counting(guide, dilations, *args, rows=None):
        first, last = (0, guide.shape[-2]) if rows is None else rows
        computed.append((last - first) * guide.shape[-1])
        return original(guide, dilations, *args, rows=rows)
    monkeypatch.setattr(refine, "pamr_affinities", counting)

    segmenter = Segmenter("synthetic-tiny", device="cpu", disk_cache=False, feature_store=False)
    options = dict(maps=False, refine="pamr")
    first = segmenter.segment(image, classes, **options)
    first_pixels = sum(computed)
    assert first_pixels > 0
    strokes = np.zeros(image.shape[:2], np.int32)
    strokes[150:156, 100:160] = int(first.labels[153, 130]) % 5 + 1   # another class than the one there
    computed.clear()
    taught = segmenter.segment(image, classes, strokes=strokes, **options)
    assert sum(computed) < first_pixels / 2
    computed.clear()
    segmenter.segment(image, classes + ["purple"], strokes=strokes, **options)  # a class typed
    assert sum(computed) < first_pixels / 2

    monkeypatch.setattr(tiled_labels, "SKIPPING", False)
    full = Segmenter.segment(segmenter, image, classes, strokes=strokes, **options)
    np.testing.assert_array_equal(taught.labels, full.labels)


def test_no_weights_are_kept_when_asked_for_none():
    image = make_scene(4, size=256, objects=(2, 2)).image
    segmenter = Segmenter("synthetic-tiny", device="cpu", disk_cache=False, feature_store=False,
                          affinity_cache_bytes=0)
    segmenter.segment(image, ["red", "green", "blue", "yellow", "background"], maps=False, refine="pamr")
    assert len(segmenter._affinities) == 0
