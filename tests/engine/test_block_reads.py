"""Regions of a dask image with chunks larger than a tile: each chunk computed once a pass, regions unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from napari_clearclip.block_reads import KeptBlocks, with_kept_blocks

da = pytest.importorskip("dask.array")


@pytest.fixture(scope="module")
def segmenter_tiny():
    from napari_clearclip import Segmenter

    return Segmenter("synthetic-tiny", device="cpu", feature_store=False)


def _counted(image: np.ndarray, chunks) -> tuple:
    """A dask array of ``image`` whose every chunk computation is counted (in the list returned)."""
    calls: list[tuple] = []

    def block(values, block_info=None):
        calls.append(tuple(tuple(span) for span in block_info[0]["array-location"]))
        return values

    return da.from_array(image, chunks=chunks).map_blocks(block, dtype=image.dtype), calls


@pytest.mark.parametrize("case", range(40))
def test_regions_equal_the_dask_arrays_own(case):
    """Random images (grey, RGB), chunkings and reads (regions, bands of rows, empty, past the edges, going back
    up): every read equals the dask array's."""
    rng = np.random.default_rng(case)
    height, width = (int(v) for v in rng.integers(1, 120, 2))
    shape = (height, width) if case % 2 else (height, width, 3)
    image = rng.integers(0, 255, shape, dtype=np.uint8)
    chunks = (int(rng.integers(1, height + 5)), int(rng.integers(1, width + 5))) + shape[2:]
    lazy = da.from_array(image, chunks=chunks)
    kept = KeptBlocks(lazy)
    assert kept.shape == image.shape and kept.dtype == image.dtype and len(kept) == height
    for _ in range(25):
        y0, y1 = sorted(int(v) for v in rng.integers(-3, height + 8, 2))
        x0, x1 = sorted(int(v) for v in rng.integers(-3, width + 8, 2))
        y0, x0 = max(0, y0), max(0, x0)
        key = (slice(y0, y1),) if rng.random() < 0.2 else (slice(y0, y1), slice(x0, x1))
        np.testing.assert_array_equal(kept[key], image[key])
    np.testing.assert_array_equal(np.asarray(kept), image)


def test_each_chunk_is_computed_once_for_regions_read_top_to_bottom_and_the_chunks_above_let_go():
    image = np.random.default_rng(1).integers(0, 255, (300, 260, 3), dtype=np.uint8)
    lazy, calls = _counted(image, (100, 130, 3))
    kept = KeptBlocks(lazy)
    for top in range(0, 300, 40):                 # overlapping regions, as tiles with their halo
        for left in range(0, 260, 50):
            np.testing.assert_array_equal(kept[max(0, top - 15):top + 55, max(0, left - 15):left + 65],
                                          image[max(0, top - 15):top + 55, max(0, left - 15):left + 65])
        kept_rows = {int(kept._row_edges[i + 1]) for i, _ in kept._kept}
        assert min(kept_rows) > max(0, top - 15)  # the chunks above the rows being read are let go
    assert sorted(set(calls)) == sorted(calls) and kept.computed == len(calls) == 6


def test_only_dask_images_with_chunks_larger_than_a_tile_are_read_so():
    image = np.zeros((64, 64), np.uint8)
    assert with_kept_blocks(image, 16) is image
    small = da.from_array(image, chunks=(16, 16))
    assert with_kept_blocks(small, 16) is small
    assert isinstance(with_kept_blocks(da.from_array(image, chunks=(16, 64)), 16), KeptBlocks)


@pytest.mark.parametrize("taught", [False, True])
def test_a_tiled_run_computes_a_one_chunk_image_once_and_its_labels_are_unchanged(segmenter_tiny, taught):
    """A reader plugin's slide is one chunk: a tile-by-tile run computed it once per tile (and per pass over
    it); now once for the whole run, whatever passes it makes (a float image's range, strokes' statistics).
    Objects given so are computed once too, for the pass that sums their scores and the one that writes their
    classes."""
    from napari_clearclip.demo.scenes import make_scene

    image = np.concatenate([make_scene(3, size=160).image, make_scene(4, size=160).image], 1)
    image = image.astype(np.float32) * 0.01 - 0.4 if taught else image
    classes = ["red", "green", "blue", "yellow", "background"]
    options = dict(short_side=None, crop=48, stride=24, refine="pamr", pamr_iterations=2, pamr_dilations=(2, 4))
    strokes = None
    if taught:
        strokes = np.zeros(image.shape[:2], np.int32)
        strokes[20:24, 30:50], strokes[100:103, 200:230] = 1, 3
    whole = segmenter_tiny.segment(image, classes, maps=False, strokes=strokes, **options).labels
    lazy, calls = _counted(image, image.shape)
    tiled = segmenter_tiny.segment_tiled(lazy, classes, tile=64, strokes=strokes, **options)
    np.testing.assert_array_equal(tiled, whole)
    assert len(calls) == 1, calls
    objects = (np.arange(image.shape[0])[:, None] // 37 * 100 + np.arange(image.shape[1])[None] // 41 + 1)
    objects = objects.astype(np.uint32)
    expected = segmenter_tiny.segment(image, classes, maps=False, strokes=strokes, objects=objects, **options)
    lazy_objects, object_calls = _counted(objects, objects.shape)
    tiled, table = segmenter_tiny.segment_tiled(image, classes, tile=64, strokes=strokes, objects=lazy_objects,
                                                **options)
    np.testing.assert_array_equal(tiled, expected.labels)
    np.testing.assert_array_equal(table["class"], expected.objects["class"])
    assert len(object_calls) == 1, object_calls


def test_chunks_that_span_the_height_are_kept_within_the_budget_and_reads_stay_exact():
    """Chunks no read leaves behind (strips the image's height) are let go, least recently read first, once those
    kept exceed the budget; the chunks a read needs are always kept for it."""
    image = np.random.default_rng(5).integers(0, 255, (200, 400), dtype=np.uint8)
    lazy = da.from_array(image, chunks=(200, 40))                 # ten strips of 8000 bytes
    kept = KeptBlocks(lazy, budget=3 * 8000)
    for top in range(0, 200, 50):
        for left in range(0, 400, 60):
            region = (slice(top, top + 70), slice(left, left + 90))
            np.testing.assert_array_equal(kept[region], image[region])
            assert sum(block.nbytes for block in kept._kept.values()) <= 4 * 8000   # (a read meets 3-4 strips)
    assert kept.computed > 10                                     # strips read again once let go
    everything = KeptBlocks(lazy)
    for top in range(0, 200, 50):
        for left in range(0, 400, 60):
            np.testing.assert_array_equal(everything[top:top + 70, left:left + 90], image[top:top + 70, left:left + 90])
    assert everything.computed == 10                               # within the default budget: each strip once
