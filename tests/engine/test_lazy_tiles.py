"""Images too large to hold: tile by tile at native resolution, the labels equal a whole-image run exactly."""

from __future__ import annotations

import numpy as np
import pytest
from images import smooth_image

from napari_clearclip import Segmenter
from napari_clearclip.errors import InvalidImageError, InvalidOptionError, OutputError
from napari_clearclip.lazy_tiles import tile_plan


@pytest.fixture(scope="module")
def segmenter(tiny_checkpoint):
    return Segmenter("test-tiny", tiny_checkpoint, device="cpu", feature_store=False)


def test_tiles_cover_the_image_once_and_regions_start_on_the_window_grid():
    for height, width, tile, halo, stride in [(300, 260, 64, 80, 32), (97, 500, 40, 33, 16), (64, 64, 64, 10, 8)]:
        covered = np.zeros((height, width), int)
        for (ty0, ty1, tx0, tx1), (ry0, ry1, rx0, rx1) in tile_plan(height, width, tile, halo, stride):
            covered[ty0:ty1, tx0:tx1] += 1
            assert ry0 % stride == 0 and rx0 % stride == 0
            assert ry0 <= max(0, ty0 - halo) and rx0 <= max(0, tx0 - halo)
            assert ry1 >= min(height, ty1 + halo) and rx1 >= min(width, tx1 + halo)
        assert (covered == 1).all()


@pytest.mark.parametrize("case", range(6))
def test_tiled_labels_equal_the_whole_image_run(segmenter, case):
    """Random sizes, windows, tiles, snapping on and off, uint8 and float images: identical labels."""
    rng = np.random.default_rng(case)
    height, width = (int(v) for v in rng.integers(90, 260, 2))
    image = smooth_image(height, width, seed=case)
    if case % 3 == 2:
        image = image.astype(np.float32) * 3.7 - 20           # another range: scaled by the image's own
    crop = int(rng.choice([32, 48, 64]))
    options = dict(short_side=None, crop=crop, stride=crop // 2, templates=["a {}."])
    if case % 2:
        options.update(refine="pamr", pamr_iterations=int(rng.integers(1, 4)), pamr_dilations=(2, int(rng.integers(3, 7))))
    classes = ["sky", "horse, pony", "grass"]
    whole = segmenter.segment(image, classes, maps=False, **options).labels
    tiled = segmenter.segment_tiled(image, classes, tile=int(rng.integers(24, 80)), **options)
    assert tiled.dtype == np.uint8
    np.testing.assert_array_equal(tiled, whole)
    assert len(np.unique(whole)) > 1


def test_dask_and_zarr_inputs_and_a_zarr_store_that_resumes(segmenter, tmp_path):
    da = pytest.importorskip("dask.array")
    import zarr

    image = smooth_image(200, 170, seed=9)
    classes = ["sky", "grass"]
    options = dict(crop=32, stride=16, templates=["a {}."])
    whole = segmenter.segment(image, classes, maps=False, short_side=None, **options).labels
    lazy = da.from_array(image, chunks=(50, 50, 3))
    np.testing.assert_array_equal(segmenter.segment_tiled(lazy, classes, tile=64, **options), whole)
    stored = zarr.create_array(str(tmp_path / "image.zarr"), shape=image.shape, chunks=(64, 64, 3), dtype=np.uint8)
    stored[:] = image
    out = tmp_path / "labels.zarr"
    steps = segmenter.segment_tiled_steps(stored, classes, tile=64, out=out, **options)
    for progress in steps:                                       # stop after two tiles, as a cancel does
        if progress.stage == "tiles" and progress.done == 2:
            steps.close()
            break
    assert not out.exists() and (tmp_path / "labels.zarr.partial").is_dir()
    labels = segmenter.segment_tiled(stored, classes, tile=64, out=out, **options)   # resumes
    np.testing.assert_array_equal(labels[:], whole)
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["labels"][:], whole)
    assert not (tmp_path / "labels.zarr.partial").exists()
    with pytest.raises(OutputError, match="never overwritten"):
        segmenter.segment_tiled(stored, classes, tile=64, out=out, **options)


def test_a_zarr_image_whose_store_lacks_a_chunk_is_refused_unless_absent_chunks_read_as_the_fill_value(segmenter,
                                                                                                     tmp_path):
    """zarr reads a chunk missing from its store as the fill value without a word: a copy that lost a chunk would be
    segmented as if that part of the image were black, with no error. Refused, naming the store, nothing written;
    ``absent_chunks="fill"`` reads it so (for stores that leave out chunks of the fill value alone)."""
    import zarr

    image = smooth_image(200, 170, seed=4)
    classes, options = ["sky", "grass"], dict(crop=32, stride=16, templates=["a {}."])
    stored = zarr.create_array(str(tmp_path / "image.zarr"), shape=image.shape, chunks=(64, 64, 3), dtype=np.uint8)
    stored[:] = image
    assert segmenter.segment_tiled(stored, classes, tile=64, **options).shape == (200, 170)   # whole: taken
    chunk = tmp_path / "image.zarr" / "c" / "1" / "1" / "0"                  # rows 64-127, columns 64-127
    assert chunk.is_file()
    chunk.unlink()
    reopened = zarr.open_array(str(tmp_path / "image.zarr"), mode="r")
    out = tmp_path / "labels.zarr"
    with pytest.raises(InvalidImageError, match=r"lacks 1 of its 12 chunks.*fill value \(0\).*absent_chunks='fill'"):
        segmenter.segment_tiled(reopened, classes, tile=64, out=out, **options)
    assert not out.exists() and not (tmp_path / "labels.zarr.partial").exists()
    with pytest.raises(InvalidOptionError, match="absent_chunks='zero'"):
        segmenter.segment_tiled(reopened, classes, tile=64, absent_chunks="zero", **options)
    holed = image.copy()
    holed[64:128, 64:128] = 0
    expected = segmenter.segment(holed, classes, maps=False, short_side=None, **options).labels
    filled = segmenter.segment_tiled(reopened, classes, tile=64, absent_chunks="fill", **options)
    np.testing.assert_array_equal(filled, expected)


def test_a_read_only_output_and_an_image_of_another_dtype_are_refused_naming_the_store_before_any_tile(
        segmenter, tmp_path, monkeypatch):
    import zarr

    image = smooth_image(100, 90, seed=2)
    zarr.create_array(str(tmp_path / "labels.zarr"), shape=(100, 90), chunks=(64, 64), dtype=np.uint8)
    read_only = zarr.open_array(str(tmp_path / "labels.zarr"), mode="r")
    started = []
    monkeypatch.setattr(Segmenter, "segment_steps", lambda *a, **k: started.append(1))   # no tile may start
    for out, where in ((read_only, "zarr array at file://"), (np.broadcast_to(np.uint8(0), (100, 90)), "into out")):
        with pytest.raises(OutputError, match=f"{where}.*read-only.*mode='r\\+'"):
            segmenter.segment_tiled(image, ["sky", "grass"], crop=32, stride=16, tile=64, out=out)
    odd = zarr.create_array(str(tmp_path / "odd.zarr"), shape=(100, 90, 3), chunks=(64, 64, 3), dtype=np.complex64)
    with pytest.raises(InvalidImageError, match=r"zarr array at file://.*odd\.zarr holds complex64"):
        segmenter.segment_tiled(odd, ["sky", "grass"], crop=32, stride=16, tile=64)
    assert not started
    assert (zarr.open_array(str(tmp_path / "labels.zarr"), mode="r")[:] == 0).all()


def test_what_cannot_be_tiled_is_refused(segmenter, tiny_checkpoint):
    image = smooth_image(80, 80)
    with pytest.raises(InvalidOptionError, match="native resolution"):
        segmenter.segment_tiled(image, ["a", "b"], short_side=64)
    diy = Segmenter("test-tiny", tiny_checkpoint, method="clipdiy", device="cpu", feature_store=False)
    with pytest.raises(InvalidOptionError, match="tile by tile"):
        diy.segment_tiled(image, ["a", "b"])
    with pytest.raises(InvalidOptionError, match="tile="):
        segmenter.segment_tiled(image, ["a", "b"], tile=4)


def test_what_segment_takes_and_a_tiled_run_cannot_is_refused_with_why(segmenter):
    """A foreground map or probability maps need the whole image: refused by name (not as an unknown option);
    segment()'s keywords at their harmless values are taken."""
    image = smooth_image(80, 80)
    painted = np.zeros((80, 80), np.int32)
    painted[10:20, 10:20] = 1
    refused = {"foreground": (np.ones((80, 80), np.float32), "foreground"), "maps": (True, "labels only")}
    for name, (value, why) in refused.items():
        with pytest.raises(InvalidOptionError, match=f"cannot take {name}=:.*{why}.*segment\\(\\)") as raised:
            segmenter.segment_tiled(image, ["a", "b"], crop=32, stride=16, **{name: value})
        assert "Unknown option" not in str(raised.value)
    labels = segmenter.segment_tiled(image, ["a", "b"], crop=32, stride=16, maps=False, lesson=None, objects=None,
                                     strokes=None)
    np.testing.assert_array_equal(labels, segmenter.segment_tiled(image, ["a", "b"], crop=32, stride=16))
    # a lesson of other window settings: its own error, before any pixel is read
    lesson = segmenter.make_lesson(["a", "b"], [(image, painted)], crop=32, stride=16)      # resized: short side 448
    with pytest.raises(ValueError, match="other window settings"):
        segmenter.segment_tiled(image, ["a", "b"], crop=32, stride=16, lesson=lesson)
    with pytest.raises(InvalidOptionError, match="is not a set of exemplars"):
        segmenter.segment_tiled(image, ["a", "b"], crop=32, stride=16, exemplars=painted)
    with pytest.raises(InvalidOptionError, match="exemplars are for 2 classes, not 3"):
        segmenter.segment_tiled(image, ["a", "b", "c"], crop=32, stride=16, exemplars=segmenter.collect_exemplars(
            image, painted, ["a", "b"], crop=32, stride=16, short_side=None))


def _driven(steps):
    """(what a progress generator returns, the progress it yielded)."""
    progress = []
    while True:
        try:
            progress.append(next(steps))
        except StopIteration as stop:
            return stop.value, progress


def _two_scenes_case(rng, case: int, first_seed: int) -> tuple[dict, np.ndarray]:
    """Native-resolution options (random windows; snapping on odd cases) and an image of two demo scenes side by
    side, the second cut at a random width."""
    from napari_clearclip.demo.scenes import make_scene

    crop = int(rng.choice([48, 64]))
    options = dict(short_side=None, crop=crop, stride=crop // 2)
    if case % 2:
        options.update(refine="pamr", pamr_iterations=2, pamr_dilations=(2, 4))
    image = np.concatenate([make_scene(first_seed + case, size=160, objects=(4, 6)).image,
                            make_scene(first_seed + 5 + case, size=160, objects=(4, 6)).image[
                                :, :int(rng.integers(60, 160))]], 1)
    return options, image


def _lesson_of(segmenter, classes, options, seeds=(21, 22)):
    """A lesson from strokes across the shapes of two demo scenes, at the run's window settings."""
    from napari_clearclip.demo.scenes import make_scene

    painted = []
    for seed in seeds:
        scene = make_scene(seed, size=160, objects=(3, 5))
        strokes = np.zeros(scene.image.shape[:2], np.int32)
        for number, name in enumerate(classes, start=1):
            mask = scene.masks.get(name)
            if mask is not None and mask.any():
                ys, xs = np.nonzero(mask)
                strokes[ys[::7][:60], xs[::7][:60]] = number
        painted.append((scene.image, strokes))
    return segmenter.make_lesson(classes, painted, **options)


@pytest.mark.parametrize("case", range(4))
def test_a_lesson_teaches_a_tiled_run_as_it_teaches_the_whole_image(segmenter, case, monkeypatch):
    """Each region is taught with the statistics of the whole image, gathered in a pass of their own: the labels
    equal a whole-image run with the lesson (snapping on and off, RGB and grey, a float image), which the lesson
    changes; taught with each region's own statistics, they would not."""
    import napari_clearclip.lazy_tiles as lazy_tiles
    from napari_clearclip.demo.scenes import make_scene

    rng = np.random.default_rng(40 + case)
    classes = ["red", "green", "blue", "yellow", "background"]
    crop = int(rng.choice([48, 64]))
    options = dict(short_side=None, crop=crop, stride=crop // 2)
    if case % 2:
        options.update(refine="pamr", pamr_iterations=2, pamr_dilations=(2, 4))
    lesson = _lesson_of(segmenter, classes, options)
    image = np.concatenate([make_scene(30 + case, size=160, objects=(4, 6)).image,
                            make_scene(35 + case, size=160, objects=(4, 6)).image[:, :int(rng.integers(60, 160))]], 1)
    if case == 2:
        image = image.mean(-1).astype(np.uint8)                          # grey
    if case == 3:
        image = image.astype(np.float32) * 0.01 - 0.4                    # scaled by the image's range
    tile = int(rng.integers(40, 90))
    whole = segmenter.segment(image, classes, maps=False, lesson=lesson, **options).labels
    untaught = segmenter.segment(image, classes, maps=False, **options).labels
    tiled, progress = _driven(segmenter.segment_tiled_steps(image, classes, tile=tile, lesson=lesson, **options))
    np.testing.assert_array_equal(tiled, whole)
    assert (whole != untaught).mean() > 0.01
    fractions = [step.fraction for step in progress]
    assert progress[0].stage == "statistics" and "for the lesson" in progress[0].message
    assert fractions == sorted(fractions) and fractions[-1] == 1.0   # one bar: the statistics, then the tiles
    # taught with each region's own statistics instead, the tiles differ from the whole image's
    def own_statistics(*args):
        yield from ()
    monkeypatch.setattr(lazy_tiles, "image_statistics_steps", own_statistics)
    if case == 0:
        assert not np.array_equal(segmenter.segment_tiled(image, classes, tile=tile, lesson=lesson, **options), whole)


def test_a_tiled_run_with_a_lesson_resumes_in_its_own_store_and_not_in_another_runs(segmenter, tmp_path):
    classes = ["red", "green", "blue", "yellow", "background"]
    options = dict(short_side=None, crop=64, stride=32)
    lesson = _lesson_of(segmenter, classes, options)
    from napari_clearclip.demo.scenes import make_scene

    image = make_scene(50, size=200, objects=(4, 6)).image
    whole = segmenter.segment(image, classes, maps=False, lesson=lesson, **options).labels
    steps = segmenter.segment_tiled_steps(image, classes, tile=64, lesson=lesson, out=tmp_path / "labels.zarr",
                                          **options)
    for step in steps:                                               # stopped after the second tile
        if step.stage == "tiles" and step.detail == "tiles: 2/16":
            break
    steps.close()
    assert (tmp_path / "labels.zarr.partial").is_dir() and not (tmp_path / "labels.zarr").exists()
    resumed = segmenter.segment_tiled(image, classes, tile=64, lesson=lesson, out=tmp_path / "labels.zarr", **options)
    np.testing.assert_array_equal(resumed[:], whole)
    # the tiles a run without the lesson finished are not taken by a run with it
    plain = segmenter.segment_tiled(image, classes, tile=64, **options)
    assert not np.array_equal(plain, whole)
    steps = segmenter.segment_tiled_steps(image, classes, tile=64, out=tmp_path / "other.zarr", **options)
    for step in steps:
        if step.stage == "tiles" and step.detail == "tiles: 8/16":
            break
    steps.close()
    taught = segmenter.segment_tiled(image, classes, tile=64, lesson=lesson, out=tmp_path / "other.zarr", **options)
    np.testing.assert_array_equal(taught[:], whole)


def _random_strokes(rng, shape, classes: int, count: int) -> np.ndarray:
    strokes = np.zeros(shape, np.int32)
    for _ in range(count):
        y, x = int(rng.integers(0, shape[0] - 6)), int(rng.integers(0, shape[1] - 25))
        strokes[y : y + int(rng.integers(2, 6)), x : x + int(rng.integers(4, 25))] = int(rng.integers(1, classes + 1))
    return strokes


@pytest.mark.parametrize("case", range(5))
def test_strokes_on_an_image_segmented_tile_by_tile_teach_it_as_they_teach_the_whole_image(segmenter, case):
    """Exemplars gathered under the strokes in the pass over the whole image, the painted pixels kept: the labels
    equal segment(..., strokes=) on the whole image (snapping on and off, grey, a float image, strokes as a dask
    array, with a lesson and with objects), which the strokes change."""
    da = pytest.importorskip("dask.array")

    rng = np.random.default_rng(90 + case)
    classes = ["red", "green", "blue", "yellow", "background"]
    options, image = _two_scenes_case(rng, case, 100)
    if case == 2:
        image = image.mean(-1).astype(np.uint8)
    if case == 3:
        image = image.astype(np.float32) * 0.01 - 0.4
    strokes = _random_strokes(rng, image.shape[:2], len(classes), int(rng.integers(2, 7)))
    extra = {"lesson": _lesson_of(segmenter, classes, options)} if case == 4 else {}
    objects = _crossing_objects(*image.shape[:2], seed=case) if case == 3 else None
    whole = segmenter.segment(image, classes, maps=False, strokes=strokes, objects=objects, **options, **extra)
    untaught = segmenter.segment(image, classes, maps=False, objects=objects, **options, **extra)
    lazy_strokes = da.from_array(strokes, chunks=(50, 70)) if case % 2 else strokes
    tiled = segmenter.segment_tiled(image, classes, tile=int(rng.integers(40, 90)), strokes=lazy_strokes,
                                    objects=objects, **options, **extra)
    if objects is not None:
        tiled, table = tiled
        np.testing.assert_array_equal(table["class"], whole.objects["class"])
    np.testing.assert_array_equal(tiled, whole.labels)
    assert (whole.labels != untaught.labels).mean() > 0.005


def test_strokes_far_apart_are_held_in_parts_numbered_as_on_the_whole_image(segmenter, monkeypatch):
    """Strokes in clusters far apart (corners of a slide) are read as parts around each cluster, not as the box of
    them all; their pieces are numbered as skimage numbers them on the whole image, and the labels still equal the
    whole image's."""
    from skimage.measure import label

    import napari_clearclip.lazy_tiles as lazy_tiles
    from napari_clearclip.demo.scenes import make_scene

    monkeypatch.setattr(lazy_tiles, "PAINT_CELL", 8)
    rng = np.random.default_rng(7)
    image = np.concatenate([make_scene(130 + i, size=160, objects=(4, 6)).image for i in range(3)], 1)[:, :440]
    for case in range(3):
        strokes = np.zeros(image.shape[:2], np.int32)
        for y, x in ((5, 5), (120, 400), (140, 20), (10, 380), (80, 200)):      # five clusters, some joined
            for _ in range(3):
                dy, dx = int(rng.integers(0, 12)), int(rng.integers(0, 25))
                strokes[y + dy : y + dy + 3, x + dx : x + dx + int(rng.integers(2, 15))] = int(rng.integers(1, 6))
        parts = lazy_tiles.painted_parts(strokes, strokes.shape, 5, crop=32)
        assert len(parts.parts) >= 3
        assert sum(part.size for _, part, _ in parts.parts) < 0.7 * strokes.size
        whole = label(strokes, background=0, connectivity=2)
        rebuilt, pieces = np.zeros_like(strokes), np.zeros_like(whole)
        for (y, x), part, numbered in parts.parts:
            region = (slice(y, y + part.shape[0]), slice(x, x + part.shape[1]))
            rebuilt[region] += part
            pieces[region] += numbered
        np.testing.assert_array_equal(rebuilt, strokes)                 # each painted pixel in one part
        np.testing.assert_array_equal(pieces, whole)                    # numbered as on the whole image
        options = dict(short_side=None, crop=32, stride=16, templates=["a {}."])
        if case == 1:
            options.update(refine="pamr", pamr_iterations=2, pamr_dilations=(2, 4))
        classes = ["red", "green", "blue", "yellow", "background"]
        expected = segmenter.segment(image, classes, maps=False, strokes=strokes, **options).labels
        np.testing.assert_array_equal(segmenter.segment_tiled(image, classes, tile=64, strokes=strokes, **options),
                                      expected)


def test_strokes_on_a_tiled_image_are_part_of_its_runs_record_and_bad_strokes_are_refused_first(segmenter, tmp_path):
    from napari_clearclip.demo.scenes import make_scene

    classes = ["red", "green", "blue", "yellow", "background"]
    options = dict(short_side=None, crop=48, stride=24)
    image = make_scene(120, size=192, objects=(5, 7)).image
    strokes = _random_strokes(np.random.default_rng(5), (192, 192), 5, 4)
    store = tmp_path / "labels.zarr"
    steps = segmenter.segment_tiled_steps(image, classes, tile=64, strokes=strokes, out=store, **options)
    for step in steps:                                               # stopped after the third tile of 9
        if step.stage == "tiles" and step.detail == "tiles: 3/9":
            break
    steps.close()
    other = strokes.copy()
    other[100:104, 100:120] = 2                                       # another stroke: the tiles are not taken
    expected = segmenter.segment(image, classes, maps=False, strokes=other, **options).labels
    labels, progress = _driven(segmenter.segment_tiled_steps(image, classes, tile=64, strokes=other, out=store, **options))
    np.testing.assert_array_equal(labels[...], expected)
    assert sum(step.stage == "windows" for step in progress) >= 9    # every tile computed again
    assert progress[0].stage == "statistics" and "for the strokes" in progress[0].message
    with pytest.warns(DeprecationWarning, match="strokes="):        # the old name still teaches
        np.testing.assert_array_equal(segmenter.segment_tiled(image, classes, tile=64, scribbles=other, **options),
                                      expected)
    bad = {"float32": (other.astype(np.float32), "not float32"), "shape": (other[:100], "do not match"),
           "values": (other * 3, f"hold values 0..{3 * other.max()}, but only 0 \\(no hint\\) to 5")}
    for name, (value, message) in bad.items():
        with pytest.raises(InvalidOptionError, match=message):
            segmenter.segment_tiled(image, classes, tile=64, strokes=value, out=tmp_path / f"{name}.zarr", **options)
        assert not (tmp_path / f"{name}.zarr").exists() and not (tmp_path / f"{name}.zarr.partial").exists()
    nothing = np.zeros((192, 192), np.uint8)                         # nothing painted: an ordinary run
    np.testing.assert_array_equal(segmenter.segment_tiled(image, classes, tile=64, strokes=nothing, **options),
                                  segmenter.segment_tiled(image, classes, tile=64, **options))


def _crossing_objects(height: int, width: int, seed: int, dtype=np.uint32, scale: int = 1) -> np.ndarray:
    """Objects of a random uneven grid (most of them cross tiles), with holes of id 0; ids times ``scale``."""
    rng = np.random.default_rng(seed)
    ys, xs = np.cumsum(rng.integers(5, 45, height)), np.cumsum(rng.integers(5, 45, width))
    ids = (np.searchsorted(ys, np.arange(height))[:, None] * 1000 + np.searchsorted(xs, np.arange(width))[None] + 1)
    ids[rng.random(ids.shape) < 0.05] = 0
    return (ids.astype(np.int64) * scale).astype(dtype)


@pytest.mark.parametrize("case", range(5))
def test_objects_of_a_tiled_run_get_the_classes_of_a_whole_image_run(segmenter, case):
    """Objects that cross tiles are classified from their sums over all of them: the table (ids, classes, areas;
    confidences within 1e-6) and the labels equal segment(..., objects=) on the whole image (snapping on and off,
    lazy image and objects, sparse ids above the direct-lookup range, a lesson)."""
    da = pytest.importorskip("dask.array")

    rng = np.random.default_rng(60 + case)
    classes = ["red", "green", "blue", "yellow", "background"]
    options, image = _two_scenes_case(rng, case, 70)
    dtype, scale = [(np.uint32, 1), (np.int32, 1), (np.uint16, 1), (np.int64, 10_000_019), (np.uint64, 1)][case]
    objects = _crossing_objects(*image.shape[:2], seed=case, dtype=dtype, scale=scale)
    taught = {"lesson": _lesson_of(segmenter, classes, options)} if case == 4 else {}
    whole = segmenter.segment(image, classes, maps=False, objects=objects, **options, **taught)
    tile = int(rng.integers(40, 90))
    (labels, table), progress = _driven(segmenter.segment_tiled_steps(
        da.from_array(image, chunks=(37, 41, 3)), classes, tile=tile, objects=da.from_array(objects, chunks=(30, 30)),
        **options, **taught))
    assert len(table["id"]) > 30 and len(set(table["class"])) > 1
    for column in ("id", "class", "area"):
        np.testing.assert_array_equal(table[column], whole.objects[column])
    np.testing.assert_allclose(table["confidence"], whole.objects["confidence"], atol=1e-6)
    np.testing.assert_array_equal(labels, whole.labels)
    fractions = [step.fraction for step in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert progress[-1].stage == "objects" and "giving each object its class" in progress[-1].message


def test_a_tiled_run_with_objects_resumes_from_its_tiles_sums_and_recomputes_tiles_whose_objects_changed(
        segmenter, tmp_path):
    from napari_clearclip.demo.scenes import make_scene

    classes = ["red", "green", "blue", "yellow", "background"]
    options = dict(short_side=None, crop=48, stride=24)
    image = make_scene(80, size=192, objects=(5, 7)).image
    objects = _crossing_objects(192, 192, seed=8)
    whole = segmenter.segment(image, classes, maps=False, objects=objects, **options)
    store = tmp_path / "labels.zarr"
    seen = []
    steps = segmenter.segment_tiled_steps(image, classes, tile=64, objects=objects, out=store, **options,
                                          on_complete=lambda labels, table: seen.append(table))
    for step in steps:                                               # stopped after the fifth tile of 9
        if step.stage == "tiles" and step.detail == "tiles: 5/9":
            break
    steps.close()
    assert not store.exists() and not seen
    # objects changed in a finished tile (and in one to come): that tile is computed again, with the new objects
    objects[10:30, 10:50] = 7
    objects[150:170, 150:170] = 0
    whole = segmenter.segment(image, classes, maps=False, objects=objects, **options)
    computed = []
    steps = segmenter.segment_tiled_steps(image, classes, tile=64, objects=objects, out=store, **options,
                                          on_complete=lambda labels, table: seen.append(table))
    while True:
        try:
            step = next(steps)
        except StopIteration as stop:
            labels, table = stop.value
            break
        if step.stage == "windows":
            computed.append(step.plane)
    assert sorted(set(computed)) == [0, 5, 6, 7, 8]                  # the changed tile, and those not done
    np.testing.assert_array_equal(labels[...], whole.labels)
    assert seen and list(seen[0]["id"]) == list(whole.objects["id"])
    np.testing.assert_array_equal(table["class"], whole.objects["class"])
    assert store.is_dir() and not (tmp_path / "labels.zarr.partial").exists()


def test_objects_a_tiled_run_cannot_take_are_refused_where_they_enter(segmenter, tmp_path):
    image = smooth_image(100, 90, seed=4)
    options = dict(crop=32, stride=16, tile=48)
    with pytest.raises(InvalidOptionError, match="not float32"):
        segmenter.segment_tiled(image, ["a", "b"], objects=np.zeros((100, 90), np.float32), **options)
    with pytest.raises(InvalidOptionError, match="do not match the image's \\(100, 90\\)"):
        segmenter.segment_tiled(image, ["a", "b"], objects=np.zeros((90, 100), np.int32), **options)
    negative = np.ones((100, 90), np.int32)
    negative[70, 80] = -3
    with pytest.raises(InvalidOptionError, match="negative ids \\(down to -3, in rows 48-96 and columns 48-90\\)"):
        segmenter.segment_tiled(image, ["a", "b"], objects=negative, out=tmp_path / "labels.zarr", **options)
    assert not (tmp_path / "labels.zarr").exists()
    labels, table = segmenter.segment_tiled(image, ["a", "b"], objects=np.zeros((100, 90), np.uint8), **options)
    assert not labels.any() and len(table["id"]) == 0 and list(table) == ["id", "class", "confidence", "area"]


def test_object_sums_added_part_by_part_equal_one_tally_over_the_whole():
    from napari_clearclip.objects import ObjectClasses, ObjectSums, ObjectTally

    rng = np.random.default_rng(3)
    for sparse in (False, True):
        objects = rng.integers(0, 300, (120, 130)) * (20_000_003 if sparse else 1)
        probs = rng.random((4, 120, 130))
        whole = ObjectTally(objects, 4)
        whole.add(0, probs)
        expected, lookup = whole.table(list("abcd"))
        sums = ObjectSums(4)
        for r in range(0, 120, 7):                                   # 18 x 13 parts: merged along the way
            for c in range(0, 130, 10):
                part = ObjectTally(objects[r : r + 7, c : c + 10], 4)
                part.add(0, probs[:, r : r + 7, c : c + 10])
                sums.add(*part.parts())
        table, classes = sums.classes(list("abcd"))
        for column in ("id", "class", "area"):
            np.testing.assert_array_equal(table[column], expected[column])
        np.testing.assert_allclose(table["confidence"], expected["confidence"], rtol=1e-6)
        np.testing.assert_array_equal(classes(objects), whole.labels(lookup))
        assert isinstance(classes, ObjectClasses) and (classes.direct is None) == sparse
        np.testing.assert_array_equal(classes(np.array([[10**12, 0]])), [[0, 0]])  # ids it never saw: 0


def test_ome_zarr_levels_are_read_lazily_with_channels_last(tmp_path):
    import zarr

    from napari_clearclip.errors import InvalidImageError
    from napari_clearclip.zarr_images import is_zarr_path, open_zarr_image

    image = smooth_image(70, 90, seed=3)
    axes = [{"name": n} for n in ("t", "c", "z", "y", "x")]
    group = zarr.open_group(str(tmp_path / "five.zarr"), mode="w")
    group.attrs["multiscales"] = [{"axes": axes, "datasets": [{"path": "0"}, {"path": "1"}]}]
    level = group.create_array("0", shape=(1, 3, 1, 70, 90), chunks=(1, 3, 1, 32, 32), dtype=np.uint8)
    level[0, :, 0] = np.moveaxis(image, -1, 0)
    group.create_array("1", shape=(1, 3, 1, 35, 45), dtype=np.uint8)
    view = open_zarr_image(tmp_path / "five.zarr")
    assert is_zarr_path(tmp_path / "five.zarr") and view.shape == (70, 90, 3) and view.dtype == np.uint8
    np.testing.assert_array_equal(view[10:20, 30:50], image[10:20, 30:50])
    np.testing.assert_array_equal(np.asarray(view), image)
    deep = zarr.open_group(str(tmp_path / "deep.zarr"), mode="w")
    deep.attrs["multiscales"] = [{"axes": axes, "datasets": [{"path": "0"}]}]
    deep.create_array("0", shape=(1, 3, 4, 70, 90), dtype=np.uint8)
    with pytest.raises(InvalidImageError, match="one time point or z plane"):
        open_zarr_image(tmp_path / "deep.zarr")


def test_a_zarr_array_read_from_a_folder_names_that_folder_and_others_none(tmp_path):
    """The store of a zarr array a script opened stands for its image's file: the folder of a local store (also
    through an OME-Zarr view, for an array inside a group, and read by dask as it is); none for arrays in memory,
    zarr's memory stores and dask arrays made otherwise or changed since."""
    import dask.array as da
    import zarr

    from napari_clearclip.zarr_images import ChannelsLast, local_store_root

    alone = zarr.create_array(str(tmp_path / "alone.zarr"), shape=(8, 8), chunks=(4, 4), dtype=np.uint8)
    group = zarr.open_group(str(tmp_path / "slide.zarr"), mode="w")
    group.create_array("0", shape=(1, 8, 8), chunks=(1, 4, 4), dtype=np.uint8)
    level = zarr.open_group(str(tmp_path / "slide.zarr"), mode="r")["0"]
    assert local_store_root(zarr.open_array(str(tmp_path / "alone.zarr"), mode="r")) == tmp_path / "alone.zarr"
    assert local_store_root(alone) == tmp_path / "alone.zarr"
    assert local_store_root(level) == tmp_path / "slide.zarr"
    assert local_store_root(ChannelsLast(level, ["c", "y", "x"])) == tmp_path / "slide.zarr"
    assert local_store_root(da.from_zarr(str(tmp_path / "alone.zarr"))) == tmp_path / "alone.zarr"
    assert local_store_root(da.from_zarr(str(tmp_path / "slide.zarr"), component="0")) == tmp_path / "slide.zarr"
    in_memory = zarr.create_array(zarr.storage.MemoryStore(), shape=(8, 8), dtype=np.uint8)
    read = da.from_zarr(alone)
    changed = (read[:4], read + 1, read.astype(np.float32), read.rechunk(2), da.from_zarr(alone, inline_array=True),
               da.from_zarr(in_memory), da.from_array(np.zeros((8, 8))))
    for other in (np.zeros((8, 8)), in_memory, None, *changed):
        assert local_store_root(other) is None
