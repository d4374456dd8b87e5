"""Labels written by clearclip-segment open in napari as Labels layers with their classes, on their image."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from skimage.io import imsave

from napari_clearclip.batch.cli import main

CLASSES = ["red", "green", "blue", "yellow", "background"]


@pytest.fixture
def viewer():
    napari = pytest.importorskip("napari")
    import npe2

    npe2.PluginManager.instance().discover()   # the installed plugins' manifests, as napari reads them
    return napari.components.ViewerModel()


def _opened(viewer, path):
    layers = viewer.open(str(path), plugin="napari-clearclip")
    assert len(layers) == 1
    return layers[0]


def test_labels_written_by_the_command_open_with_their_classes_colours_and_place(tmp_path, capsys, monkeypatch,
                                                                                     viewer):
    import napari_clearclip.reduced as reduced
    from napari_clearclip.demo.scenes import make_scene

    monkeypatch.setattr(reduced, "LARGE_PIXELS", 200 * 200)          # "too large to hold" from 200 x 200 on
    image = make_scene(23, size=320, objects=(4, 6)).image
    folder = tmp_path / "in"
    folder.mkdir()
    imsave(folder / "photo.png", image[:96, :128], check_contrast=False)
    tifffile.imwrite(folder / "slide.tif", image, tile=(64, 64), photometric="rgb")
    out = tmp_path / "out"
    common = ["--classes", "; ".join(CLASSES), "--model", "synthetic-tiny", "--device", "cpu", "--no-snap"]
    assert main([str(folder), "--out", str(out), "--large-side", "160", *common]) == 0
    assert main([str(folder / "photo.png"), "--out", str(tmp_path / "zarr"), "--format", "zarr", *common]) == 0
    capsys.readouterr()

    photo = _opened(viewer, out / "photo_labels.tif")
    assert photo.__class__.__name__ == "Labels" and photo.name == "photo_labels"
    np.testing.assert_array_equal(photo.data, tifffile.imread(out / "photo_labels.tif"))
    assert list(photo.features["class"]) == ["unassigned", *CLASSES]
    assert photo.get_color(1)[0] > 0.8 and photo.get_color(1)[1] < 0.3     # red is red
    assert photo.get_color(CLASSES.index("background") + 1) is None or \
        photo.get_color(CLASSES.index("background") + 1)[3] == 0            # background is transparent
    np.testing.assert_allclose(photo.data_to_world((10, 20)), (10, 20))    # on the image's pixels

    # a slide segmented at half its size: each label pixel covers 2 x 2 image pixels, centred on them
    slide = _opened(viewer, out / "slide_labels.tif")
    assert slide.data.shape == (160, 160)
    np.testing.assert_allclose(slide.data_to_world((10, 20)), (20.5, 40.5))
    np.testing.assert_allclose(slide.data_to_world((159, 0)), (318.5, 0.5))

    stored = _opened(viewer, tmp_path / "zarr" / "photo_labels.zarr")
    assert isinstance(stored.data, np.ndarray)                             # small: an editable copy
    assert list(stored.features["class"]) == ["unassigned", *CLASSES]
    import zarr

    np.testing.assert_array_equal(stored.data, zarr.open_group(str(tmp_path / "zarr" / "photo_labels.zarr"),
                                                               mode="r")["labels"][...])


def test_a_large_labels_store_is_painted_without_being_written_and_other_files_are_left_to_napari(
        tmp_path, capsys, monkeypatch, viewer):
    import napari_clearclip.batch.labels_reading as labels_reading
    from napari_clearclip.demo.scenes import make_scene
    from napari_clearclip.editable_copy import EditableCopy
    from napari_clearclip.gui.reader import OPENED_KEY, get_reader

    image = make_scene(5, size=96, objects=(2, 3)).image
    imsave(tmp_path / "photo.png", image, check_contrast=False)
    common = ["--classes", "; ".join(CLASSES), "--model", "synthetic-tiny", "--device", "cpu", "--no-snap"]
    assert main([str(tmp_path / "photo.png"), "--out", str(tmp_path / "zarr"), "--format", "zarr", *common]) == 0
    capsys.readouterr()
    store = tmp_path / "zarr" / "photo_labels.zarr"
    monkeypatch.setattr(labels_reading, "IN_MEMORY_PIXELS", 1000)
    written = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    layer = _opened(viewer, store)
    assert isinstance(layer.data, EditableCopy) and layer.data.shape == (96, 96)
    before = np.asarray(layer.data[...]).copy()
    layer.brush_size = 5
    layer.paint((40, 50), 3)                                             # napari's brush
    layer.data[0:4, 0:4] = 2                                             # a script
    expected = before.copy()
    expected[0:4, 0:4] = 2
    painted = np.asarray(layer.data[...])
    assert painted[40, 50] == 3 and np.count_nonzero(painted != expected) <= 25
    np.testing.assert_array_equal(painted[painted != expected], 3)
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == written   # the user's store untouched
    edits = layer.metadata[OPENED_KEY]["edits"]
    assert edits.startswith(str(Path(os.environ["NAPARI_CLEARCLIP_CACHE_DIR"])))    # strokes in a working copy
    layer.undo()                                                          # napari's undo reads it back
    np.testing.assert_array_equal(np.asarray(layer.data[...]), expected)

    # napari closed without saving: opened again, the strokes are back, and the user is told where they are kept
    import gc

    import napari.utils.notifications as notifications

    told = []
    monkeypatch.setattr(notifications, "show_info", told.append)
    viewer.layers.clear()
    del layer
    gc.collect()
    layer = _opened(viewer, store)
    assert layer.data.edited and layer.metadata[OPENED_KEY]["edits"] == edits
    np.testing.assert_array_equal(np.asarray(layer.data[...]), expected)
    assert len(told) == 1 and "photo_labels.zarr: the corrections painted on it until" in told[0]
    assert f"kept in {edits} until saved with Save labels" in told[0]

    # corrected and saved over by another program (napari's own writer keeps no record): the class table beside
    tifffile.imwrite(tmp_path / "zarr" / "photo_labels.tif", np.full((96, 96), 2, np.uint16))
    resaved = _opened(viewer, tmp_path / "zarr" / "photo_labels.tif")
    assert list(resaved.features["class"]) == ["unassigned", *CLASSES] and np.all(resaved.data == 2)

    # labels of another program (no record, no table), and other files: napari's own readers open them
    tifffile.imwrite(tmp_path / "other_labels.tif", np.ones((8, 8), np.uint16))
    assert get_reader(str(tmp_path / "other_labels.tif")) is None
    assert get_reader(str(tmp_path / "photo.png")) is None
    assert get_reader(str(tmp_path / "missing_labels.tif")) is None
    from napari_clearclip.batch.labels_reading import read_labels_output
    from napari_clearclip.errors import InvalidImageError

    with pytest.raises(InvalidImageError, match="not labels written by clearclip-segment"):
        read_labels_output(tmp_path / "other_labels.tif")


def test_painted_pixels_kept_in_a_record_come_back_exactly():
    from napari_clearclip.batch.labels_reading import decode_edits, encode_edits

    rng = np.random.default_rng(0)
    for shape in [(1, 1), (7, 13), (192, 192), (3, 33, 65), (2, 1, 9)]:
        for share in (0.0, 0.01, 0.5, 1.0):
            mask = rng.random(shape) < share
            record = {"edited": encode_edits(mask)}
            np.testing.assert_array_equal(decode_edits(record, shape), mask)
    record = {"edited": encode_edits(np.ones((4, 4), bool))}
    assert decode_edits(record, (4, 5)) is None                       # labels of another shape
    assert decode_edits({"edited": {"shape": [4, 4], "bits": "not base64 zlib"}}, (4, 4)) is None
    assert decode_edits({}, (4, 4)) is None


def test_napari_file_menu_saves_a_result_with_its_classes_and_other_labels_as_napari_does(tmp_path, capsys,
                                                                                          monkeypatch, viewer):
    """File > Save Selected Layers on labels the command wrote and the user corrected: the command line's format
    (classes, image and painted pixels in the record, class table beside), which opens again with its classes;
    labels without classes are written as napari writes them; a result too large for one TIFF is refused."""
    import zarr

    import napari_clearclip.batch.labels_reading as labels_reading
    from napari_clearclip.batch.labels_reading import decode_edits, read_record
    from napari_clearclip.errors import OutputError
    from napari_clearclip.gui.layers import TILED_KEY

    folder = tmp_path / "in"
    folder.mkdir()
    image = np.zeros((96, 128, 3), np.uint8)
    image[20:60, 30:90] = (220, 30, 30)
    imsave(folder / "photo.png", image, check_contrast=False)
    assert main([str(folder), "--out", str(tmp_path / "out"), "--classes", "; ".join(CLASSES),
                 "--model", "synthetic-tiny", "--device", "cpu"]) == 0
    capsys.readouterr()
    opened = _opened(viewer, tmp_path / "out" / "photo_labels.tif")
    opened.data[0:10, 0:12] = 2                                      # a correction by hand
    corrected = np.array(opened.data)
    painted = corrected != tifffile.imread(tmp_path / "out" / "photo_labels.tif")
    assert painted.any()
    viewer.layers.selection = {opened}
    written = viewer.layers.save(str(tmp_path / "fixed.tif"), selected=True)
    assert [p.rsplit("/", 1)[-1] for p in written] == ["fixed_labels.tif", "fixed_classes.csv"]
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "fixed_labels.tif"), corrected)
    record = read_record(tmp_path / "fixed_labels.tif")
    assert record["classes"] == CLASSES and record["source"] == str((folder / "photo.png").resolve())
    np.testing.assert_array_equal(decode_edits(record, corrected.shape), painted)
    again = _opened(viewer, tmp_path / "fixed_labels.tif")
    assert list(again.features["class"]) == ["unassigned", *CLASSES]
    viewer.layers.selection = {opened}
    opened.data[:] = 1
    with pytest.raises(OutputError, match="exists"):                 # the dialog asked about fixed.tif only
        viewer.layers.save(str(tmp_path / "fixed.tif"), selected=True)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "fixed_labels.tif"), corrected)
    viewer.layers.save(str(tmp_path / "fixed_labels.tif"), selected=True)   # the name it asked about: replaced
    assert (tifffile.imread(tmp_path / "fixed_labels.tif") == 1).all()

    # labels of no ClearCLIP run (one with another plugin's "class" column too): napari's own format
    plain = viewer.add_labels(corrected.astype(np.uint8), name="plain")
    theirs = viewer.add_labels(corrected.astype(np.uint8), name="theirs",
                               features={"index": [0, 1], "class": ["none", "mitosis"]})
    for layer in (plain, theirs):
        viewer.layers.selection = {layer}
        name = f"{layer.name}.tif"
        assert [p.rsplit("/", 1)[-1] for p in viewer.layers.save(str(tmp_path / name), selected=True)] == [name]
        assert not (tmp_path / f"{layer.name}_classes.csv").exists()
        assert not (tmp_path / f"{layer.name}_labels.tif").exists()
        saved = tifffile.imread(tmp_path / name)
        assert saved.dtype == np.uint32 and read_record(tmp_path / name) is None
        np.testing.assert_array_equal(saved, corrected)

    monkeypatch.setattr(labels_reading, "IN_MEMORY_PIXELS", 64 * 64)    # "too large to hold" from 64 x 64 on
    store = zarr.create_array(str(tmp_path / "slide_labels.zarr"), shape=(96, 128), chunks=(32, 32), dtype=np.uint8)
    large = viewer.add_labels(store, name="slide classes", features=dict(again.features),   # as the widget adds it
                              metadata={TILED_KEY: {"store": str(tmp_path / "slide_labels.zarr"), "names": CLASSES}})
    viewer.layers.selection = {large}
    with pytest.raises(OutputError, match="too large to save as one TIFF: Save labels... in the ClearCLIP dock"):
        viewer.layers.save(str(tmp_path / "slide.tif"), selected=True)
    assert not list(tmp_path.glob("slide*.tif")) and not list(tmp_path.glob(".slide*"))


def test_a_labels_store_saved_band_by_band_is_whole_or_absent(tmp_path):
    """Labels too large to hold saved as <name>_labels.zarr: equal to the array, with their classes; a save cut short
    (a band that cannot be read) leaves neither a store nor a class table, and an existing store is refused."""
    import zarr

    from napari_clearclip.batch.files import write_labels_store_steps
    from napari_clearclip.batch.labels_reading import read_labels_output
    from napari_clearclip.errors import OutputError
    from napari_clearclip.progress import run_to_end

    rng = np.random.default_rng(3)
    labels = zarr.create_array(str(tmp_path / "cache.zarr"), shape=(70, 90), chunks=(16, 32), dtype=np.uint8)
    labels[:] = rng.integers(0, 4, (70, 90))
    steps = write_labels_store_steps(tmp_path / "slide.zarr", labels, ["cell", "nucleus", "background"],
                                     band_rows=16)
    assert run_to_end(steps) == [tmp_path / "slide_labels.zarr", tmp_path / "slide_classes.csv"]
    read = read_labels_output(tmp_path / "slide_labels.zarr")
    np.testing.assert_array_equal(read.data, labels[:])
    assert read.names == ["cell", "nucleus", "background"]
    with pytest.raises(OutputError, match="exists"):
        run_to_end(write_labels_store_steps(tmp_path / "slide_labels.zarr", labels, ["cell"]))

    class FailsAtThirdBand:
        shape, dtype, chunks = labels.shape, labels.dtype, labels.chunks

        def __getitem__(self, key):
            if key.start >= 32:
                raise OSError("the disk went away")
            return labels[key]

    with pytest.raises(OSError, match="went away"):
        run_to_end(write_labels_store_steps(tmp_path / "other", FailsAtThirdBand(), ["cell"], band_rows=16))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.zarr", "slide_classes.csv", "slide_labels.zarr"]


def test_a_large_store_of_a_stack_opens_read_only(tmp_path, monkeypatch, viewer):
    """Only 2-D labels too large to hold are painted in a working copy; a stack's store opens as it is, read-only."""
    import json

    import zarr

    import napari_clearclip.batch.labels_reading as labels_reading
    from napari_clearclip.batch.provenance import RECORD_KEY

    monkeypatch.setattr(labels_reading, "IN_MEMORY_PIXELS", 100)
    group = zarr.open_group(str(tmp_path / "stack_labels.zarr"), mode="w")
    group.attrs[RECORD_KEY] = json.dumps({"source": str(tmp_path / "stack.tif"), "classes": CLASSES})
    group.create_array("labels", shape=(3, 20, 30), chunks=(1, 10, 10), dtype=np.uint16, fill_value=2)
    layer = _opened(viewer, tmp_path / "stack_labels.zarr")
    assert isinstance(layer.data, zarr.Array) and layer.data.shape == (3, 20, 30)
    assert list(layer.features["class"]) == ["unassigned", *CLASSES] and np.all(layer.data[...] == 2)


def test_pixels_painted_on_a_large_store_are_saved_with_it_and_stay_the_users_when_opened_again(tmp_path, monkeypatch,
                                                                                                viewer):
    """Labels too large to hold, painted in a working copy and saved: the saved store keeps which pixels were painted
    (an ``edited`` array), so opened another day those strokes still teach with their class, an erased one teaches
    nothing, and the next save keeps them with the new ones; in memory and in a TIFF saved from the File menu too."""
    import zarr

    import napari_clearclip.batch.labels_reading as labels_reading
    from napari_clearclip.batch.files import write_labels_store_steps
    from napari_clearclip.batch.labels_reading import decode_edits, read_labels_output, read_record
    from napari_clearclip.editable_copy import EditableCopy
    from napari_clearclip.gui.reader import OPENED_KEY
    from napari_clearclip.progress import run_to_end
    from napari_clearclip.tiled_edits import EditedStrokes, PaintedPixels

    names = ["cell", "nucleus", "background"]
    rng = np.random.default_rng(5)
    written = rng.integers(1, 4, (70, 90)).astype(np.uint8)
    run_to_end(write_labels_store_steps(tmp_path / "slide", written, names, band_rows=16))
    assert "edited" not in zarr.open_group(str(tmp_path / "slide_labels.zarr"), mode="r")   # nobody painted
    monkeypatch.setattr(labels_reading, "IN_MEMORY_PIXELS", 100)      # "too large to hold"
    first = _opened(viewer, tmp_path / "slide_labels.zarr")
    assert isinstance(first.data, EditableCopy) and first.data.painted_before is None
    first.data[10:20, 10:30] = 2                                      # a nucleus stroke
    stroke = np.zeros(written.shape, bool)
    stroke[10:20, 10:30] = True
    painted = stroke & (written != 2)
    run_to_end(write_labels_store_steps(tmp_path / "fixed", first.data, names, band_rows=16,
                                        painted=PaintedPixels.of(first.data)))
    saved = zarr.open_group(str(tmp_path / "fixed_labels.zarr"), mode="r")
    np.testing.assert_array_equal(saved["edited"][...], painted)

    viewer.layers.clear()                                             # another day
    again = _opened(viewer, tmp_path / "fixed_labels.zarr")
    assert isinstance(again.data, EditableCopy) and again.data.painted_before is not None
    hints = EditedStrokes(again.data, names, ["background", "nucleus"])[...]   # the next run's classes
    np.testing.assert_array_equal(hints, np.where(painted, 2, 0))     # nucleus is that run's second class
    again.data[10:12, 10:30] = 0                                      # part of the stroke erased
    again.data[40:45, 50:60] = 3                                      # a background stroke
    hints = EditedStrokes(again.data, names, names)[...]
    expected = np.where(painted, 2, 0)
    expected[10:12, 10:30] = 0
    now = np.asarray(again.data[...])
    expected[(now != written) & ~painted] = now[(now != written) & ~painted]
    assert np.all(expected[40:45, 50:60][written[40:45, 50:60] != 3] == 3)
    np.testing.assert_array_equal(hints, expected)
    run_to_end(write_labels_store_steps(tmp_path / "twice", again.data, names, band_rows=16,
                                        painted=PaintedPixels.of(again.data)))
    both = painted | (now != np.asarray(again.data.source[...]))      # the first strokes, erased ones included
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "twice_labels.zarr"), mode="r")["edited"][...], both)

    monkeypatch.setattr(labels_reading, "IN_MEMORY_PIXELS", 8192 * 8192)   # the same labels, held in memory
    read = read_labels_output(tmp_path / "twice_labels.zarr")
    assert isinstance(read.edited, np.ndarray)
    np.testing.assert_array_equal(read.edited, both)
    viewer.layers.clear()
    held = _opened(viewer, tmp_path / "twice_labels.zarr")
    np.testing.assert_array_equal(held.metadata[OPENED_KEY]["edited"], both)
    held.data[60:62, 0:5] = 1
    viewer.layers.selection = {held}
    viewer.layers.save(str(tmp_path / "day3_labels.tif"), selected=True)
    record = read_record(tmp_path / "day3_labels.tif")
    painted_now = both | (held.data != held.metadata[OPENED_KEY]["baseline"])
    np.testing.assert_array_equal(decode_edits(record, written.shape), painted_now)

    group = zarr.open_group(str(tmp_path / "twice_labels.zarr"), mode="r+")   # an "edited" of another shape
    del group["edited"]
    group.create_array("edited", shape=(7, 9), dtype=bool, fill_value=True)
    assert read_labels_output(tmp_path / "twice_labels.zarr").edited is None


def test_which_image_of_a_file_a_record_is_of(tmp_path):
    """Whether labels or a result recorded with an image's file are of one image layer of it ("yes"), of another
    image of the file ("no"), or could be either ("unknown": nobody's result): by where the image lies in its zarr
    store or TIFF, by a digest of its pixels where it is held in memory, and, where neither tells, by whether the
    viewer shows other images of the file of its size (``siblings``)."""
    from types import SimpleNamespace

    import dask.array as da
    import zarr

    from napari_clearclip.gui.reader import record_verdict
    from napari_clearclip.tiled_edits import pixels_sample

    def layer(data, path=None, reader="scenes-reader"):
        return SimpleNamespace(data=data, multiscale=False, source=SimpleNamespace(path=path, reader_plugin=reader))

    pair = zarr.open_group(str(tmp_path / "pair.zarr"), mode="w")
    for name in ("0", "1"):
        pair.create_array(name, shape=(16, 16), chunks=(8, 8), dtype=np.uint8)[:] = int(name)
    alone = zarr.open_group(str(tmp_path / "alone.zarr"), mode="w")
    alone.create_array("0", shape=(16, 16), chunks=(8, 8), dtype=np.uint8)
    alone.create_array("1", shape=(8, 8), chunks=(8, 8), dtype=np.uint8)
    path = tmp_path / "positions.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tiff:
        for value in (0, 1):
            tiff.write(np.full((16, 16), value, np.uint8))
    rng = np.random.default_rng(1)
    a1, a2 = (rng.integers(0, 255, (16, 16), dtype=np.uint8) for _ in range(2))
    scene = str(tmp_path / "plate.czi")
    second_store = layer(da.from_zarr(str(tmp_path / "pair.zarr"), component="1"))
    whole_tiff = layer(tifffile.imread(path), str(path), reader="napari")
    cases = [
        ({"array": "0"}, second_store, {}, "no"),
        ({"array": "1"}, second_store, {}, "yes"),
        ({}, second_store, {}, "unknown"),                              # saved by earlier versions: either image
        ({}, layer(da.from_zarr(str(tmp_path / "alone.zarr"), component="0")), {}, "yes"),   # (and a smaller one)
        ({"array": "series 1"}, whole_tiff, {}, "no"),                  # napari's reader: the first series
        ({"array": "series 0"}, whole_tiff, {}, "yes"),
        ({}, whole_tiff, {}, "yes"),                                    # earlier versions: the first series too
        ({}, layer(tifffile.imread(path), str(path), reader="another-reader"), {}, "yes"),   # (unknown series)
        ({"image_sample": pixels_sample(a1)}, layer(a1, scene), {}, "yes"),
        ({"image_sample": pixels_sample(a1)}, layer(a2, scene), {}, "no"),
        ({"image_sample": pixels_sample(a1)}, layer(a2, scene), {"pixels": False}, "yes"),   # the file rewritten
        ({"image_sample": pixels_sample(a1)}, layer(a2, scene), {"pixels": False, "siblings": True}, "unknown"),
        ({"image_sample": pixels_sample(a1)}, layer(a1, scene), {"siblings": True}, "yes"),
        ({}, layer(a1, scene), {"siblings": True}, "unknown"),          # earlier versions, other scenes open
        ({}, layer(a1, scene), {}, "yes"),                              # ... and closed
        ({"image_sample": pixels_sample(a1)}, layer(da.from_array(a1), scene), {"siblings": True}, "unknown"),
        ({"image_sample": pixels_sample(a1)}, layer(da.from_array(a2), scene), {}, "yes"),   # lazy, alone: as before
    ]
    verdicts = [record_verdict(record, image, **options) for record, image, options, _ in cases]
    assert verdicts == [expected for *_, expected in cases]
