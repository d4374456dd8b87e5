"""Images too large to hold, segmented with Resize on: the pyramid level or reduced copy a run takes, and where its
labels sit on the full image."""

from __future__ import annotations

import math

import numpy as np
import pytest

from napari_clearclip.reduced import BlockMeans, Reduction, block_factor, finest_level_within, reduced_for_resize


def block_means_reference(image: np.ndarray, factor: int, rgb: bool) -> np.ndarray:
    """Means of factor x factor blocks (partial ones over the pixels they have), by padding with NaN."""
    y = image.ndim - (3 if rgb else 2)
    height, width = image.shape[y], image.shape[y + 1]
    pad = [(0, 0)] * image.ndim
    pad[y], pad[y + 1] = (0, -height % factor), (0, -width % factor)
    padded = np.pad(image.astype(np.float64), pad, constant_values=np.nan)
    shape = list(padded.shape)
    shape[y: y + 2] = [shape[y] // factor, factor, shape[y + 1] // factor, factor]
    means = np.nanmean(padded.reshape(shape), axis=(y + 1, y + 3))
    if image.dtype.kind in "ui":
        return np.rint(means).astype(image.dtype)
    return means.astype(image.dtype)


class ReadRecorder:
    """An array that records the rows of every read (to show a plane is read a band at a time)."""

    def __init__(self, array: np.ndarray, y: int):
        self.array, self.y, self.shape, self.dtype, self.reads = array, y, array.shape, array.dtype, []
        self.ndim = array.ndim

    def __getitem__(self, index):
        rows = index[self.y] if isinstance(index, tuple) and len(index) > self.y else slice(None)
        self.reads.append(len(range(*rows.indices(self.shape[self.y]))) if isinstance(rows, slice) else 1)
        return self.array[index]


@pytest.mark.parametrize("case", range(8))
def test_a_reduced_copy_is_the_mean_of_each_block_read_a_band_of_rows_at_a_time(case):
    rng = np.random.default_rng(case)
    rgb = case % 2 == 0
    stack = case in (3, 6)
    height, width = (int(v) for v in rng.integers(23, 140, 2))
    shape = ((3,) if stack else ()) + (height, width) + ((3,) if rgb else ())
    dtype = [np.uint8, np.uint16, np.float32, np.uint8][case % 4]
    if dtype == np.float32:
        image = rng.normal(10, 30, shape).astype(np.float32)
    else:
        image = rng.integers(0, np.iinfo(dtype).max, shape, endpoint=True).astype(dtype)
    factor = int(rng.integers(2, 9))
    source = ReadRecorder(image, image.ndim - (3 if rgb else 2))
    band_pixels = int(rng.integers(1, 4)) * width * factor * (3 if rgb else 1)   # a few blocks of rows a band
    reduced = BlockMeans(source, factor, rgb=rgb, band_pixels=band_pixels)
    expected = block_means_reference(image, factor, rgb)
    assert reduced.shape == expected.shape and reduced.dtype == image.dtype
    assert reduced.shape[-2 if rgb else -1] == math.ceil(width / factor)
    if stack:
        for plane in range(3):
            np.testing.assert_array_equal(reduced[plane], expected[plane])
    else:
        np.testing.assert_array_equal(reduced[()], expected)
    np.testing.assert_array_equal(np.asarray(reduced), expected)
    assert max(source.reads) <= band_pixels // (width * (3 if rgb else 1))   # never more rows at once than a band
    reads = len(source.reads)
    np.testing.assert_array_equal(np.asarray(reduced), expected)   # kept: read once
    assert len(source.reads) == reads


def test_a_reduced_copy_reads_lazy_arrays_as_they_are_and_refuses_a_bad_factor():
    import dask.array as da
    import zarr

    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (203, 151, 3), dtype=np.uint8)
    expected = block_means_reference(image, 4, True)
    stored = zarr.create_array(store={}, shape=image.shape, chunks=(64, 64, 3), dtype=np.uint8)
    stored[:] = image
    for source in (da.from_array(image, chunks=(50, 70, 3)), stored):
        np.testing.assert_array_equal(BlockMeans(source, 4, rgb=True, band_pixels=151 * 3 * 8)[()], expected)
    for factor in (0, 2.0):
        with pytest.raises(ValueError, match="factor"):
            BlockMeans(image, factor, rgb=True)


def test_a_plane_is_read_with_progress_per_band_and_a_stopped_read_keeps_nothing():
    image = np.random.default_rng(2).integers(0, 256, (100, 90, 3), dtype=np.uint8)
    expected = block_means_reference(image, 3, True)
    source = ReadRecorder(image, 0)
    reduced = BlockMeans(source, 3, rgb=True, band_pixels=90 * 3 * 3 * 4)      # 4 rows of blocks a band: 9 bands
    steps = reduced.plane_steps(())
    first = [next(steps) for _ in range(3)]
    assert [(s.stage, s.done, s.total) for s in first] == [("reading", n, 9) for n in (1, 2, 3)]
    assert "1/3" in first[0].message
    steps.close()                                                       # a run stopped while reading
    assert len(source.reads) == 3
    progress = []
    steps = reduced.plane_steps(())
    while True:
        try:
            progress.append(next(steps))
        except StopIteration as stop:
            np.testing.assert_array_equal(stop.value, expected)
            break
    assert len(progress) == 9 and len(source.reads) == 12              # read again, whole
    assert list(reduced.plane_steps(())) == [] and len(source.reads) == 12   # kept: no reading, no progress
    with pytest.raises(IndexError):
        next(reduced.plane_steps((0,)))


def test_a_chunked_source_is_read_in_bands_that_read_each_chunk_at_most_twice():
    class Chunked:
        chunks = (64, 70)

        def __init__(self, array):
            self.array, self.shape, self.dtype, self.rows = array, array.shape, array.dtype, []

        def __getitem__(self, index):
            self.rows.append(range(*index[0].indices(self.shape[0])))
            return self.array[index]

    image = np.random.default_rng(1).integers(0, 60000, (1000, 300), dtype=np.uint16)
    for factor in (3, 5, 64, 100):
        source = Chunked(image)
        reduced = BlockMeans(source, factor, band_pixels=300 * factor)   # a band of one row of blocks, but for chunks
        np.testing.assert_array_equal(reduced[()], block_means_reference(image, factor, False))
        for chunk in range(0, 1000, 64):
            assert sum(1 for rows in source.rows if rows.start < chunk + 64 and rows.stop > chunk) <= 2


def test_the_factor_is_the_smallest_that_fits():
    rng = np.random.default_rng(0)
    for _ in range(300):
        height, width = (int(v) for v in rng.integers(1, 30000, 2))
        limit = int(rng.integers(1, 20_000_000))
        factor = block_factor(height, width, limit)
        assert math.ceil(height / factor) * math.ceil(width / factor) <= limit
        assert factor == 1 or math.ceil(height / (factor - 1)) * math.ceil(width / (factor - 1)) > limit


def test_a_run_takes_the_finest_pyramid_level_that_fits_or_a_reduced_copy():
    levels = [np.zeros((2, 4000, 3000, 3), np.uint8), np.zeros((2, 2000, 1500, 3), np.uint8),
              np.zeros((2, 1000, 750, 3), np.uint8)]
    assert finest_level_within([a.shape for a in levels], 3_000_000, rgb=True) == 1
    assert finest_level_within([a.shape for a in levels], 10_000, rgb=True) is None
    data, reduction = reduced_for_resize(levels, 3_000_000, rgb=True)
    assert data is levels[1]                                       # the level itself, not a copy of it
    assert reduction == Reduction(1, (1.0, 2.0, 2.0), (2, 2000, 1500))
    data, reduction = reduced_for_resize(levels, 12_000_000, rgb=True)
    assert data is levels[0] and reduction is None                 # fits: the image as it is
    data, reduction = reduced_for_resize(levels[:1], 3_000_000, rgb=True)   # no pyramid: a copy
    assert isinstance(data, BlockMeans) and data.factor == 2 and data.shape == (2, 2000, 1500, 3)
    assert reduction.level is None and reduction.factors == (1.0, 2.0, 2.0)
    data, reduction = reduced_for_resize(levels, 10_000_000, rgb=True, level_pixels=800_000)   # large, to small
    assert data is levels[2] and reduction.factors == (1.0, 4.0, 4.0)
    data, reduction = reduced_for_resize(levels[:1], 3_000_000, rgb=True, level_pixels=800_000)
    assert data.factor == 4 and reduction.shape == (2, 1000, 750)
    data, reduction = reduced_for_resize([np.zeros((301, 299), np.uint8)], 10_000)
    assert data.shape == (76, 75) and reduction.factors == (4.0, 4.0)     # whole blocks, the last ones partial
    channels = [np.zeros((4, 900, 800), np.uint16), np.zeros((4, 450, 400), np.uint16)]
    data, reduction = reduced_for_resize(channels, 200_000, channel_axis=0)    # a channel axis: not a label axis
    assert data is channels[1] and reduction.factors == (2.0, 2.0) and reduction.shape == (450, 400)


def test_the_large_side_setting_decides_which_images_are_reduced_and_to_what():
    from napari_clearclip.errors import ClearClipError
    from napari_clearclip.reduced import LARGE_PIXELS, limits_for_side

    assert limits_for_side() == (LARGE_PIXELS, 3000 * 3000)          # the default: above 4096 x 4096, to 3000
    assert limits_for_side(2048) == (LARGE_PIXELS, 2048 * 2048)
    assert limits_for_side(8192) == (8192 * 8192, 8192 * 8192)       # up to 8192 x 8192 taken as it is
    pyramid = [np.zeros((20000, 16000, 3), np.uint8), np.zeros((10000, 8000, 3), np.uint8),
               np.zeros((5000, 4000, 3), np.uint8), np.zeros((2500, 2000, 3), np.uint8)]
    for side, level in ((3000, 3), (4500, 2), (9000, 1), (16384, 1)):
        larger_than, level_pixels = limits_for_side(side)
        _, reduction = reduced_for_resize(pyramid, larger_than, rgb=True, level_pixels=level_pixels)
        assert reduction.level == level, side
    larger_than, level_pixels = limits_for_side(5000)                  # 5000 x 4000 fits 5000 x 5000: as it is
    assert reduced_for_resize(pyramid[2:], larger_than, rgb=True, level_pixels=level_pixels)[1] is None
    assert reduced_for_resize(pyramid[1:], larger_than, rgb=True, level_pixels=level_pixels)[1].level == 1
    for bad in (127, 16385, 3000.5, "3000", True, None):
        with pytest.raises(ValueError, match="large_side=.* must be a whole number of pixels from 128 to 16384") as raised:
            limits_for_side(bad)
        assert isinstance(raised.value, ClearClipError)


def test_the_labels_of_a_reduced_image_sit_on_the_centres_of_the_pixels_they_cover():
    """Label pixel i covers full-size pixels i*f .. i*f + f - 1: its centre in the world is theirs."""
    reduction = Reduction(3, (1.0, 8.0, 8.0), (5, 2500, 2500))
    scale, translate = [2.0, 0.5, 0.25], [10.0, -3.0, 7.0]
    placed = reduction.geometry(scale, translate)
    for axis in range(3):
        f = reduction.factors[axis]
        for i in (0, 1, 17):
            covered = np.arange(i * f, (i + 1) * f) * scale[axis] + translate[axis]    # full-size pixels' centres
            assert math.isclose(i * placed["scale"][axis] + placed["translate"][axis], covered.mean())
    # a turned and sheared image (napari draws data point x at rotate @ shear @ (scale * x) + translate)
    rotate = np.array([[1.0, 0.0, 0.0], [0.0, 0.8, -0.6], [0.0, 0.6, 0.8]])
    shear = np.array([[1.0, 0.1, 0.2], [0.0, 1.0, 0.3], [0.0, 0.0, 1.0]])
    placed = reduction.geometry(scale, translate, rotate=rotate, shear=shear, units=["um"] * 3)
    assert placed["units"] == ["um"] * 3
    np.testing.assert_array_equal(placed["rotate"], rotate)
    np.testing.assert_array_equal(placed["shear"], shear)

    def world(point, where):
        return where["rotate"] @ where["shear"] @ (np.asarray(where["scale"]) * point) + where["translate"]

    image = {"scale": scale, "translate": translate, "rotate": rotate, "shear": shear}
    for label in ((0, 0, 0), (1, 17, 3)):
        covered = [world(np.array(label) * reduction.factors + (0, a, b), image) for a in range(8) for b in range(8)]
        np.testing.assert_allclose(world(np.array(label), placed), np.mean(covered, axis=0), atol=1e-9)
    assert reduction.describe() == "pyramid level 3 (2500 x 2500, 1/8 of full size)"
    odd = Reduction(None, (2.0001, 2.0001), (100, 100))
    assert odd.describe() == "a copy reduced by block means (100 x 100, 1/2 of full size)"


def test_labels_brought_to_full_size_give_each_pixel_the_label_placed_over_it(tmp_path):
    """Each full-size pixel takes the label napari shows over its centre (Reduction.geometry), for whole factors
    (block means, partial edge blocks) and a pyramid's uneven ones; written into an array or a new zarr store."""
    import zarr

    from napari_clearclip.errors import InvalidOptionError, OutputError
    from napari_clearclip.reduced import full_size_labels

    rng = np.random.default_rng(5)
    cases = [((301, 299), None, 4), ((401, 359), (201, 180), None), ((97, 64), (97, 32), None)]
    for (height, width), level, factor in cases:
        if factor is not None:   # block means: ceil(size / factor), whole factors
            small = (-(-height // factor), -(-width // factor))
            reduction = Reduction(None, (float(factor),) * 2, small)
        else:                    # a pyramid level: napari's factors, full size over the level's
            small = level
            reduction = Reduction(1, (height / small[0], width / small[1]), small)
        labels = rng.integers(0, 7, small).astype(np.uint8)
        full = full_size_labels(labels, (height, width), reduction.factors, rows_at_once=37)
        placed = reduction.geometry([1.5, 0.5], [3.0, -2.0])
        for axis, size in ((0, height), (1, width)):
            world = np.arange(size) * [1.5, 0.5][axis] + [3.0, -2.0][axis]          # full pixels' centres
            over = np.floor((world - placed["translate"][axis]) / placed["scale"][axis] + 0.5).astype(int)
            over = np.minimum(over, small[axis] - 1)
            if axis == 0:
                rows = over
            else:
                cols = over
        np.testing.assert_array_equal(full, labels[rows][:, cols])
        if factor is not None:
            np.testing.assert_array_equal(full, np.repeat(np.repeat(labels, factor, 0), factor, 1)[:height, :width])
    stored = full_size_labels(labels, (97, 64), out=tmp_path / "full.zarr")
    np.testing.assert_array_equal(stored[:], np.repeat(labels, 2, 1))
    assert zarr.open_group(str(tmp_path / "full.zarr"), mode="r")["labels"].shape == (97, 64)
    assert not list(tmp_path.glob("*.partial"))
    with pytest.raises(OutputError, match="exists"):
        full_size_labels(labels, (97, 64), out=tmp_path / "full.zarr")         # never overwritten
    into = np.zeros((97, 64), np.uint8)
    assert full_size_labels(labels, (97, 64), out=into) is into and (into == np.repeat(labels, 2, 1)).all()
    for bad in (dict(shape=(50, 64)), dict(shape=(97, 64), factors=(0.5, 2))):
        with pytest.raises(InvalidOptionError):
            full_size_labels(labels, **bad)
    with pytest.raises(InvalidOptionError, match="integer"):
        full_size_labels(labels.astype(np.float32), (97, 64))


def test_a_source_of_one_chunk_is_read_once_and_reduced_a_part_at_a_time():
    """A reader plugin's slide is one dask chunk: it is read in one band, and reduced in parts of ``band_pixels``,
    so the reduction's sums (8 bytes a value) stay those of a part, not of the whole slide (a 12000 x 12000 RGB
    slide of one chunk once took 5.4 GB to reduce, and 28 s)."""
    import tracemalloc

    import dask.array as da

    image = np.random.default_rng(4).integers(0, 256, (600, 500, 3), dtype=np.uint8)
    for factor in (2, 3, 7):
        source = ReadRecorder(image, 0)
        reduced = BlockMeans(da.from_array(source, chunks=image.shape, asarray=False), factor, rgb=True,
                             band_pixels=500 * 3 * factor * 4)
        tracemalloc.start()
        result = reduced[()]
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        np.testing.assert_array_equal(result, block_means_reference(image, factor, True))
        assert [rows for rows in source.reads if rows] == [600]   # (dask reads no rows once, for its meta)
        assert peak < 2 * image.nbytes, (factor, peak / image.nbytes)
