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
    computed = []

    def compute(area):
        top, bottom, left, right = area
        computed.append((bottom - top) * (right - left))
        return pamr_affinities(guide[:, top:bottom, left:right], dilations)

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


@pytest.mark.parametrize("seed", range(3))
def test_an_image_kept_whole_gives_views_of_the_whole_images_weights(seed):
    """Weights that fit are kept in one image-sized tensor: each region is a view of it, exact up to its sides
    (computed with the image's pixels around), every tile computed once, whether written in place or copied in."""
    from napari_clearclip.refine import padded_affinities, repeat_sides

    rng = np.random.default_rng(seed)
    size = (int(rng.integers(60, 200)), int(rng.integers(60, 200)))
    guide = torch.from_numpy(rng.normal(size=(3, *size)).astype(np.float32))
    dilations = (1, int(rng.integers(2, 9)))
    pad = max(dilations)
    whole = pamr_affinities(guide, dilations)
    computed = []

    def compute(area):
        top, bottom, left, right = area
        computed.append((bottom - top) * (right - left))
        return pamr_affinities(guide[:, top:bottom, left:right], dilations)

    def compute_into(rectangle, out):
        top, bottom, left, right = rectangle
        computed.append((bottom - top) * (right - left))
        inside = (max(0, top - pad), min(size[0], bottom + pad), max(0, left - pad), min(size[1], right + pad))
        padded = torch.empty((3, bottom - top + 2 * pad, right - left + 2 * pad))
        y, x = pad - (top - inside[0]), pad - (left - inside[2])
        h, w = inside[1] - inside[0], inside[3] - inside[2]
        padded[:, y : y + h, x : x + w] = guide[:, inside[0] : inside[1], inside[2] : inside[3]]
        repeat_sides(padded, y, padded.shape[1] - y - h, x, padded.shape[2] - x - w)
        padded_affinities(padded, dilations, out)

    tile = int(rng.choice([8, 16, 24]))
    for into in (compute_into, None):
        kept = AffinityTiles(16 * 4 * size[0] * size[1])
        kept.start(("guide", seed), size, tile, pad, 8 * len(dilations))
        assert kept.whole_image
        computed.clear()
        for _ in range(25):
            top, bottom, left, right = area = random_area(rng, size)
            weights = kept.region(area, compute, compute_into=into)
            assert weights.data_ptr() == kept._whole[:, top:bottom, left:right].data_ptr()   # a view: no copy
            assert torch.equal(weights, whole[:, top:bottom, left:right])
        assert kept.nbytes == 4 * whole.shape[0] * sum(
            (min(size[0], (ty + 1) * tile) - ty * tile) * (min(size[1], (tx + 1) * tile) - tx * tile)
            for ty, tx in zip(*np.nonzero(kept._done)))
        if into is not None:  # written in place: no pixel computed twice
            assert sum(computed) == kept.nbytes // (4 * whole.shape[0])
        computed.clear()
        assert torch.equal(kept.region(area, compute, compute_into=into), whole[:, top:bottom, left:right])
        assert computed == []  # asked again: nothing computed
    short = AffinityTiles(16 * 4 * size[0] * size[1] - 1)   # a byte short of the whole: kept tile by tile
    short.start(("guide",), size, tile, pad, 16)
    assert not short.whole_image


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

    original = refine.padded_affinities

    def counting(padded, dilations, out, *args, rows=None):   # every way weights are computed ends here
        first, last = (0, out.shape[-2]) if rows is None else rows
        computed.append((last - first) * out.shape[-1])
        return original(padded, dilations, out, *args, rows=rows)
    monkeypatch.setattr(refine, "padded_affinities", counting)

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


@pytest.mark.parametrize("whole_image", [True, False])
def test_weights_of_a_guide_replaced_while_they_are_computed_are_not_kept_for_the_new_one(whole_image):
    """Two runs on one image from two threads: when one starts on another guide while the other is computing,
    the weights being computed belong to the old guide and must not be lent to the new one."""
    rng = np.random.default_rng(3)
    size, dilations, tile = (96, 80), (1, 3), 16
    old_guide, new_guide = (torch.from_numpy(rng.normal(size=(3, *size)).astype(np.float32)) for _ in range(2))
    budget = 16 * 4 * size[0] * size[1] if whole_image else 1 << 30
    kept = AffinityTiles(budget)
    kept.start(("old",), size, tile, max(dilations), 16 if whole_image else 0)
    switched = []

    def compute(area, guide=old_guide):
        top, bottom, left, right = area
        if not switched:  # the other thread's run starts while this one computes
            switched.append(True)
            kept.start(("new",), size, tile, max(dilations), 16 if whole_image else 0)
        return pamr_affinities(guide[:, top:bottom, left:right], dilations)

    kept.region((0, 96, 0, 80), compute)
    assert len(kept) == 0 and kept.nbytes == 0
    new_whole = pamr_affinities(new_guide, dilations)
    weights = kept.region((0, 96, 0, 80), lambda area: compute(area, new_guide))
    assert torch.equal(weights, new_whole)


def _counting_weights(monkeypatch) -> list:
    from napari_clearclip import refine

    computed = []
    original = refine.padded_affinities

    def counting(padded, dilations, out, *args, rows=None):   # every way weights are computed ends here
        first, last = (0, out.shape[-2]) if rows is None else rows
        computed.append((last - first) * out.shape[-1])
        return original(padded, dilations, out, *args, rows=rows)
    monkeypatch.setattr(refine, "padded_affinities", counting)
    return computed


@pytest.mark.parametrize("seed", range(3))
def test_readying_a_rerun_computes_the_weights_it_needs_and_its_labels_stay_those_from_scratch(monkeypatch, seed):
    """While nothing runs, the weights of the parts the first run did not need are computed (stopped after any
    number of bands, or run to the end); re-runs after strokes then compute none (or only those left), and their
    labels are those of a computation from scratch, and of a segmenter that readied nothing."""
    rng = np.random.default_rng(seed)
    # large shapes, few boundaries: a first run needs the weights of some parts only
    image = np.kron(make_scene(seed, size=96, objects=(3, 3)).image, np.ones((8, 8, 1), np.uint8))
    classes = ["red", "green", "blue", "yellow", "background"]
    options = dict(maps=False, refine="pamr", pamr_iterations=3, pamr_dilations=(1, 4))
    computed = _counting_weights(monkeypatch)
    readied, plain = (Segmenter("synthetic-tiny", device="cpu", disk_cache=False, feature_store=False)
                      for _ in range(2))
    plain.segment(image, classes, **options)
    computed.clear()
    first = readied.segment(image, classes, **options)
    first_pixels = sum(computed)
    computed.clear()
    steps = readied.prepare_rerun_steps()
    bands = [step for step in steps] if seed == 0 else [next(steps) for _ in range(int(rng.integers(1, 3)))]
    assert bands and all(step.stage == "weights" for step in bands)
    steps.close()   # stopped: what it computed stays
    readied_pixels = sum(computed)
    assert readied_pixels > 0
    strokes = np.zeros(image.shape[:2], np.int32)
    for _ in range(2):
        y, x = (int(v) for v in rng.integers(20, 748, 2))
        strokes[y - 6 : y + 6, x - 6 : x + 6] = int(first.labels[y, x]) % 5 + 1   # another class than the one there
        computed.clear()
        fast = readied.segment(image, classes, strokes=strokes, **options)
        if seed == 0:   # readied to the end: nothing left to compute
            assert computed == []
        np.testing.assert_array_equal(fast.labels, plain.segment(image, classes, strokes=strokes, **options).labels)
    # every weight is the image's: the total computed is the image's pixels once, wherever it was computed
    if seed == 0:
        assert first_pixels + readied_pixels == image.shape[0] * image.shape[1]
        assert run_to_end(readied.prepare_rerun_steps()) == 0   # nothing left
    monkeypatch.setattr(tiled_labels, "SKIPPING", False)
    full = Segmenter.segment(readied, image, classes, strokes=strokes, **options)
    np.testing.assert_array_equal(fast.labels, full.labels)


def test_readying_does_nothing_after_a_run_without_snapping_or_for_weights_of_another_guide():
    image = make_scene(5, size=256, objects=(2, 2)).image
    classes = ["red", "green", "blue", "yellow", "background"]
    segmenter = Segmenter("synthetic-tiny", device="cpu", disk_cache=False, feature_store=False)
    assert run_to_end(segmenter.prepare_rerun_steps()) == 0           # nothing segmented yet
    segmenter.segment(image, classes, maps=False, refine="pamr")
    segmenter.segment(image, classes, maps=False, refine=None)         # the newest run did not snap
    assert list(segmenter.prepare_rerun_steps()) == []
    kept = AffinityTiles()
    kept.start(("another guide",), (256, 256), 64, 4, 16)
    guide = torch.zeros((3, 32, 32))
    assert run_to_end(tiled_labels.weights_steps(kept, guide, (256, 256), (1, 4))) == 0
    assert kept.identity == ("another guide",) and kept.missing_tile_rows() == [0, 1, 2, 3]   # left as it was
