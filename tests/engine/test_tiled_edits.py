"""What a user painted on labels written tile by tile: read against the baseline the store keeps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from napari_clearclip.lazy_tiles import painted_parts
from napari_clearclip.tiled_edits import EditedStrokes, has_baseline, keep_baseline, painted_count


def _store(path, labels):
    group = zarr.open_group(str(path), mode="w")
    group.create_array("labels", data=labels, chunks=(32, 32))
    return group


def test_edits_are_the_pixels_changed_since_the_baseline_in_the_new_runs_classes(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(1, 4, (90, 70)).astype(np.uint8)          # classes a, b, c
    group = _store(tmp_path / "run.zarr", labels)
    assert not has_baseline(tmp_path / "run.zarr")
    keep_baseline(tmp_path / "run.zarr")
    assert has_baseline(tmp_path / "run.zarr") and not has_baseline(tmp_path / "other.zarr")
    np.testing.assert_array_equal(group["baseline"][:], labels)
    painted = labels.copy()
    painted[5:9, 10:30] = 2                                        # b
    painted[40:44, 0:20] = 3                                       # c: no longer asked for
    painted[60:62, 30:50] = 0                                      # the eraser
    painted[80:82, 5:15] = 9                                       # a label the user invented
    group["labels"][:] = painted
    edits = EditedStrokes(tmp_path / "run.zarr", ["a", "b", "c"], ["b", "a", "d"])
    changed = painted != labels
    expected = np.zeros(labels.shape, np.uint8)
    expected[changed & (painted == 2)] = 1                         # b is class 1 now
    np.testing.assert_array_equal(edits[:, :], expected)
    np.testing.assert_array_equal(edits[10:50, 5:60], expected[10:50, 5:60])
    np.testing.assert_array_equal(edits[0:64], expected[:64])      # bands of rows, as they are read
    assert edits.shape == labels.shape and edits.dtype == np.uint8


def test_strokes_that_taught_a_run_keep_teaching_the_next_unless_painted_over(tmp_path):
    labels = np.full((120, 100), 1, np.uint8)
    group = _store(tmp_path / "run.zarr", labels)
    strokes = np.zeros(labels.shape, np.int32)
    strokes[10:14, 10:40], strokes[90:94, 60:90] = 2, 3
    parts = painted_parts(strokes, strokes.shape, 3, crop=16)
    keep_baseline(tmp_path / "run.zarr", parts)
    assert painted_count(parts) == int((strokes > 0).sum()) and painted_count(None) == 0
    np.testing.assert_array_equal(group["strokes"][:], strokes)
    painted = labels.copy()
    painted[12, 10:20] = 3                                         # over an earlier stroke: the new class wins
    painted[50:52, 50:60] = 2
    group["labels"][:] = painted
    edits = EditedStrokes(tmp_path / "run.zarr", ["a", "b", "c"], ["a", "b", "c"])[:, :]
    expected = strokes.copy()
    expected[12, 10:20] = 3
    expected[50:52, 50:60] = 2
    np.testing.assert_array_equal(edits, expected)


def test_pixels_painted_differently_are_counted_whether_painted_erased_or_given_another_class(monkeypatch):
    import napari_clearclip.lazy_tiles as lazy_tiles
    from napari_clearclip.tiled_edits import changed_pixels

    monkeypatch.setattr(lazy_tiles, "PAINT_CELL", 8)                  # clusters apart in a small image

    strokes = np.zeros((200, 300), np.int32)
    strokes[5:9, 5:40], strokes[180:184, 250:290] = 1, 2               # two clusters far apart
    later = strokes.copy()
    later[5, 5:15] = 0                                                 # erased
    later[180, 250:255] = 3                                            # another class
    later[100:102, 100:110] = 1                                        # painted anew
    before, after = (lazy_tiles.painted_parts(s, s.shape, 3, crop=16) for s in (strokes, later))
    assert len(before.parts) == 2 and len(after.parts) == 3
    assert changed_pixels(before, after) == 10 + 5 + 20
    assert changed_pixels(before, before) == 0 and changed_pixels(None, None) == 0
    assert changed_pixels(None, after) == int((later > 0).sum()) and changed_pixels(before, None) == 300


def test_a_baseline_is_known_from_the_metadata_files_and_in_zarr_s_second_format_too(tmp_path):
    for fmt in (3, 2):
        group = zarr.open_group(str(tmp_path / f"v{fmt}.zarr"), mode="w", zarr_format=fmt)
        group.create_array("labels", data=np.ones((10, 12), np.uint8), chunks=(5, 5))
        assert not has_baseline(tmp_path / f"v{fmt}.zarr")
        group.create_array("baseline", data=np.ones((10, 12), np.uint8), chunks=(5, 5))
        assert has_baseline(tmp_path / f"v{fmt}.zarr")
    group = zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    group.create_array("labels", data=np.ones((10, 12), np.uint8))
    group.create_array("baseline", data=np.ones((12, 10), np.uint8))
    assert not has_baseline(tmp_path / "other.zarr")                     # of another shape
    (tmp_path / "v3.zarr" / "baseline" / "zarr.json").write_text("{damaged")
    assert not has_baseline(tmp_path / "v3.zarr")
    assert not has_baseline(tmp_path / "nothing.zarr")


def test_a_result_knows_when_its_images_file_was_written_again_since(tmp_path):
    """Strokes on a result marked what its image showed then: once the image's file is written again (a file, or a
    chunk of a zarr store), the result says so; untouched, or a copy elsewhere of the same name and size, it does
    not; a record of an earlier version (no file time) tells nothing."""
    import os
    import shutil

    from napari_clearclip.tiled_edits import RESULT_RECORD_KEY, image_changed_since, keep_result_record

    image = tmp_path / "slide.tif"
    image.write_bytes(bytes(range(256)) * 64)
    slide = zarr.open_group(str(tmp_path / "slide.zarr"), mode="w")
    slide.create_array("0", data=np.arange(64 * 64, dtype=np.uint16).reshape(64, 64), chunks=(32, 32))
    results = {}
    for name, source in (("of-file.zarr", image), ("of-store.zarr", tmp_path / "slide.zarr")):
        _store(tmp_path / name, np.ones((8, 8), np.uint8))
        keep_result_record(tmp_path / name, str(source), ["a", "b"])
        results[source] = tmp_path / name
    assert not image_changed_since(results[image], str(image))
    assert not image_changed_since(results[tmp_path / "slide.zarr"], str(tmp_path / "slide.zarr"))
    assert not image_changed_since(results[image], None)

    copy = tmp_path / "elsewhere" / "slide.tif"                     # a copy: known by name and size, as before
    copy.parent.mkdir()
    shutil.copyfile(image, copy)
    assert not image_changed_since(results[image], str(copy))

    stat = image.stat()
    image.write_bytes(bytes(reversed(range(256))) * 64)             # written again: the same size, other pixels
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert image_changed_since(results[image], str(image))
    slide["0"][:32, :32] = 7                                        # one chunk of the store written again
    chunk = next(path for path in (tmp_path / "slide.zarr" / "0" / "c").rglob("*") if path.is_file())
    os.utime(chunk, ns=(chunk.stat().st_atime_ns, chunk.stat().st_mtime_ns + 1_000_000))
    assert image_changed_since(results[tmp_path / "slide.zarr"], str(tmp_path / "slide.zarr"))

    group = zarr.open_group(str(results[image]), mode="r+")        # a record of an earlier version: no file time
    record = dict(group.attrs[RESULT_RECORD_KEY])
    record.pop("mtime_ns")
    group.attrs[RESULT_RECORD_KEY] = record
    assert not image_changed_since(results[image], str(image))
    image.unlink()                                                 # gone: not the image the strokes were painted on
    keep_result_record(results[image], str(tmp_path / "slide.zarr"), ["a", "b"])
    shutil.rmtree(tmp_path / "slide.zarr")
    assert image_changed_since(results[image], str(tmp_path / "slide.zarr"))


def test_a_file_of_the_same_name_and_size_elsewhere_is_a_copy_only_if_it_holds_the_same(tmp_path):
    """Images of one shape in different folders often share their name and size: a result's record tells its image's
    copy (moved, or copied from another machine) from another image by a digest of blocks spread over the file."""
    import shutil

    from napari_clearclip.hashing import SAMPLED_BLOCKS, SAMPLED_BYTES
    from napari_clearclip.tiled_edits import RESULT_RECORD_KEY, another_file, keep_result_record, result_record

    rng = np.random.default_rng(1)
    for size in (5000, SAMPLED_BLOCKS * SAMPLED_BYTES * 3 + 17):     # read whole, and read in blocks
        first, second = tmp_path / f"one-{size}" / "image.tif", tmp_path / f"two-{size}" / "image.tif"
        copied = tmp_path / f"moved-{size}" / "image.tif"
        for path in (first, second, copied):
            path.parent.mkdir()
        content = rng.integers(0, 256, size, dtype=np.uint8)
        first.write_bytes(content.tobytes())
        other = content.copy()         # another image: one byte differs, in the middle block read
        middle = (size - SAMPLED_BYTES) * (SAMPLED_BLOCKS // 2) // (SAMPLED_BLOCKS - 1) + 5 \
            if size > SAMPLED_BLOCKS * SAMPLED_BYTES else size // 2
        other[middle] ^= 0x0F
        second.write_bytes(other.tobytes())
        shutil.copyfile(first, copied)
        store = tmp_path / f"result-{size}.zarr"
        _store(store, np.ones((8, 8), np.uint8))
        keep_result_record(store, str(first), ["a", "b"])
        record = result_record(store)
        assert record["size"] == size and record["source"] == str(first.resolve())
        assert not another_file(record, first)                      # the file itself
        assert not another_file(record, copied)                     # its copy elsewhere
        assert another_file(record, second)                         # another image of that name and size
        assert another_file(record, tmp_path / "nowhere" / "image.tif")
        group = zarr.open_group(str(store), mode="r+")             # a record of an earlier version: not known
        group.attrs[RESULT_RECORD_KEY] = {k: v for k, v in record.items() if k != "sample"}
        assert not another_file(result_record(store), second)


def test_an_image_of_no_file_is_known_by_its_pixels_shape_and_type_and_the_record_keeps_them(tmp_path):
    """An image of no file held in memory is found again by its pixels: a copy matches, one pixel changed does not,
    nor the same bytes in another shape or type; an array not held in one piece is not recognised (None). The
    record of a result of it keeps that digest, and a file's record its file's identity instead."""
    import hashlib

    import dask.array as da

    from napari_clearclip.tiled_edits import keep_result_record, pixels_identity, result_record

    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (600, 700, 3), dtype=np.uint8)   # (over 4 MiB: hashed in chunks)
    digest = pixels_identity(image)["pixels"]
    assert pixels_identity(image.copy())["pixels"] == digest
    changed = image.copy()
    changed[599, 699, 2] ^= 1
    assert pixels_identity(changed)["pixels"] != digest
    assert pixels_identity(image.reshape(700, 600, 3))["pixels"] != digest
    assert pixels_identity(image.view(np.int8))["pixels"] != digest
    small = image[:10, :10].copy()   # (hashed whole): an independent reference
    expected = hashlib.blake2b(hashlib.sha256(small.tobytes()).digest()[:20], digest_size=20)
    expected.update(repr(((10, 10, 3), "|u1")).encode())
    assert pixels_identity(small)["pixels"] == expected.hexdigest()
    assert pixels_identity(image[:, ::2]) is None and pixels_identity(da.from_array(image)) is None

    for name, source, identity in (("made.zarr", None, {"pixels": digest}), ("file.zarr", str(tmp_path / "a.tif"),
                                                                             None)):
        zarr.open_group(str(tmp_path / name), mode="w")
        (tmp_path / "a.tif").write_bytes(b"abc")
        keep_result_record(tmp_path / name, source, ["cell"], identity)
        record = result_record(tmp_path / name)
        assert record["names"] == ["cell"] and record["source"] == (source and str(Path(source).resolve()))
        assert record.get("pixels") == (digest if source is None else None)


def test_a_results_labels_shape_is_read_from_its_metadata_or_its_store_and_none_without_labels(tmp_path):
    """The shape a run compares with its image's is that of the store's labels array: read from zarr's metadata file
    in the third format, from the opened store in the second; none for a store without labels or a damaged file."""
    from napari_clearclip.tiled_edits import labels_shape

    for version in (3, 2):
        group = zarr.open_group(str(tmp_path / f"v{version}.zarr"), mode="w", zarr_format=version)
        group.create_array("labels", shape=(300, 200), chunks=(64, 64), dtype="u1")
        assert labels_shape(tmp_path / f"v{version}.zarr") == (300, 200)
    zarr.open_group(str(tmp_path / "empty.zarr"), mode="w").create_array("baseline", shape=(3, 3), dtype="u1")
    assert labels_shape(tmp_path / "empty.zarr") is None and labels_shape(tmp_path / "absent.zarr") is None
    (tmp_path / "v3.zarr" / "labels" / "zarr.json").write_text("{not json")
    assert labels_shape(tmp_path / "v3.zarr") is None


def test_a_sample_of_an_image_s_pixels_tells_scenes_of_one_file_apart_and_reads_a_grid_only(tmp_path):
    """The digest of an image's values on a grid: the same for a copy and for any change off the grid, another for a
    change on it, for another scene of the same size, shape or type; at most 65,536 values, spread over every axis
    (short axes whole), which an independent reference of the grid confirms; None for a lazy or memory-mapped
    array."""
    import hashlib

    import dask.array as da

    from napari_clearclip.tiled_edits import SAMPLED_VALUES, pixels_sample

    rng = np.random.default_rng(5)
    scene = rng.integers(0, 255, (1000, 1500, 3), dtype=np.uint8)
    other = rng.integers(0, 255, (1000, 1500, 3), dtype=np.uint8)
    digest = pixels_sample(scene)
    assert pixels_sample(scene.copy()) == digest and pixels_sample(other) != digest
    # the grid of a 1000 x 1500 RGB image: 3 channels, then 147 and 148 points (steps of 7 and 11)
    grid = scene[::7, ::11]
    assert grid.size <= SAMPLED_VALUES and grid.shape == (143, 137, 3)
    expected = hashlib.blake2b(np.ascontiguousarray(grid).tobytes(), digest_size=16)
    expected.update(repr(((1000, 1500, 3), "|u1")).encode())
    assert digest == expected.hexdigest()
    off, on = scene.copy(), scene.copy()
    off[1, 1, 0] ^= 1
    on[7, 11, 2] ^= 1
    assert pixels_sample(off) == digest and pixels_sample(on) != digest
    assert pixels_sample(scene.reshape(1500, 1000, 3)) != digest and pixels_sample(scene.view(np.int8)) != digest
    assert pixels_sample(scene[np.newaxis, np.newaxis]) == digest   # (as another reader gives it: (1, 1, y, x, c))
    line = rng.integers(0, 9, 70000, dtype=np.uint16)   # one axis: every second value (35,000)
    skipped, read = line.copy(), line.copy()
    skipped[1] += 1
    read[2] += 1
    assert pixels_sample(skipped) == pixels_sample(line) != pixels_sample(read)
    small = rng.integers(0, 9, (3, 2), dtype=np.uint16)   # small images whole
    changed = small.copy()
    changed[2, 1] += 1
    assert pixels_sample(changed) != pixels_sample(small)
    assert pixels_sample(da.from_array(scene)) is None and pixels_sample(np.float32(3)) is None
    np.save(tmp_path / "scene.npy", scene)
    assert pixels_sample(np.load(tmp_path / "scene.npy", mmap_mode="r")) is None   # (not read a page a value)
