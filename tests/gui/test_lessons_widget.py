"""Lessons in the widget: strokes on one image teach the next, and a saved lesson teaches another session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gui_helpers import blue_squares, run_and_wait


def squares(seed: int) -> np.ndarray:
    """Two blue squares and a red one, each image its own noise."""
    return blue_squares(seed, red=True)


def teach_debris(qtbot, widget, viewer):
    """Run on image A, paint one debris stroke on a blue square, run again: A's strokes teach."""
    from skimage.draw import disk

    widget.image.value = viewer.add_image(squares(7), name="A")
    run_and_wait(qtbot, widget)
    labels = viewer.layers["A classes"]
    painted = labels.data.copy()
    rr, cc = disk((48, 48), 4)
    painted[rr, cc] = 1
    labels.data = painted
    run_and_wait(qtbot, widget)


def test_strokes_on_one_image_teach_the_next_and_a_saved_lesson_teaches_another_session(
        qtbot, widget, make_napari_viewer, tmp_path):
    viewer = widget._viewer
    widget.switch_to_demo_model()
    widget.classes.value = "debris\nred\nbackground"
    teach_debris(qtbot, widget, viewer)
    blue = (slice(128, 160), slice(128, 160))
    results = {}
    for share in (False, True):
        widget.share_lesson.value = share
        widget.image.value = viewer.add_image(squares(8), name=f"B{share}")
        run_and_wait(qtbot, widget)
        results[share] = viewer.layers[f"B{share} classes"].data.copy()
    assert np.mean(results[False][blue] == 1) < 0.5              # not shared: B knows only the text
    assert np.mean(results[True][blue] == 1) > 0.9               # shared: B's blue squares are debris too

    path = widget.save_lesson(tmp_path / "debris")          # written in the background
    qtbot.waitUntil(lambda: "Saved a lesson" in widget.status.value, timeout=30_000)
    assert path.is_file() and path.name == "debris.npz"
    from napari_clearclip import Lesson

    saved = Lesson.load(path)   # with patches of the painted image, as labelled there, to check it when joined
    assert saved.references is not None and set(saved.reference_ids.tolist()) == {0}
    assert set(saved.reference_classes.tolist()) == {0, 1, 2}  # A as labelled: debris, red and background

    # another session: a fresh widget loads the lesson, which fills the classes and teaches
    from napari_clearclip.gui import ClearClipWidget

    fresh = ClearClipWidget(make_napari_viewer(show=True))
    fresh.switch_to_demo_model()
    fresh.classes.value = "cell\nbackground"
    fresh.device.value = "cpu"
    assert fresh.load_lesson(path) is not None
    assert fresh.classes.value == "debris\nred\nbackground"
    fresh.image.value = fresh._viewer.add_image(squares(9), name="C")
    run_and_wait(qtbot, fresh)
    assert np.mean(fresh._viewer.layers["C classes"].data[blue] == 1) > 0.9
    fresh.close_down()


def test_a_renamed_image_keeps_one_lesson_and_another_image_of_its_old_name_is_taught_by_it(qtbot, widget, tmp_path):
    import re

    viewer = widget._viewer
    widget.switch_to_demo_model()
    widget.classes.value = "debris\nred\nbackground"
    teach_debris(qtbot, widget, viewer)

    def saved_exemplars(name: str) -> int:
        widget.save_lesson(tmp_path / name)
        qtbot.waitUntil(lambda: "Saved a lesson" in widget.status.value, timeout=30_000)
        count = int(re.search(r"Saved a lesson of (\d+) exemplars", widget.status.value).group(1))
        widget.status.value = ""
        return count

    taught = saved_exemplars("before")
    viewer.layers["A"].name = "A renamed"
    widget.share_lesson.value = True
    blue = (slice(128, 160), slice(128, 160))
    widget.image.value = viewer.add_image(squares(8), name="A")   # another image, under the first one's old name
    run_and_wait(qtbot, widget)
    result = viewer.layers[-1]
    assert result.name.startswith("A classes") and result is not viewer.layers["A classes"]
    assert np.mean(result.data[blue] == 1) > 0.9                    # taught by the strokes on "A renamed"
    widget.image.value = viewer.layers["A renamed"]
    run_and_wait(qtbot, widget)                                     # its strokes, read again from its result
    assert "kept" in widget.status.value
    widget.image.value = viewer.layers["A"]
    assert saved_exemplars("after") == taught                      # the renamed image's strokes, once


def test_a_lesson_for_other_classes_is_said_and_not_used(qtbot, widget, tmp_path):
    viewer = widget._viewer
    widget.switch_to_demo_model()
    widget.classes.value = "debris\nred\nbackground"
    teach_debris(qtbot, widget, viewer)
    path = widget.save_lesson(tmp_path / "debris")
    qtbot.waitUntil(lambda: "Saved a lesson" in widget.status.value, timeout=30_000)
    widget.load_lesson(path)
    widget.classes.value = "debris\nbackground"                  # not the lesson's classes
    widget.image.value = viewer.add_image(squares(8), name="B")
    widget.share_lesson.value = False
    run_and_wait(qtbot, widget)
    assert "A lesson was not used" in widget.status.value
    assert "red" in widget.status.value                          # which classes it is for
    (tmp_path / "broken.npz").write_text("nonsense")
    assert widget.load_lesson(tmp_path / "broken.npz") is None
    assert "not a napari-clearclip lesson" in widget.status.value


def test_choosing_resclip_sets_its_official_settings_and_runs(qtbot, widget, rgb_image):
    viewer = widget._viewer
    widget.image.value = viewer.add_image(rgb_image, name="photo")
    widget.classes.value = "a\nb"
    widget.method.value = "resclip"
    assert (widget.short_side.value, widget.crop.value, widget.stride.value, widget.logit_scale.value) == \
        (336, 224, 112, 40.0)                                          # the official code's
    run_and_wait(qtbot, widget)
    assert widget.status.value.startswith("Done"), widget.status.value
    assert viewer.layers["photo classes"].data.shape == rgb_image.shape[:2]
    widget.method.value = "clearclip"
    assert (widget.short_side.value, widget.crop.value, widget.logit_scale.value) == (448, 448, 50.0)


def test_clipdiy_shows_its_foreground_field_and_fuses_a_layer(qtbot, widget, rgb_image, tmp_path):
    from napari_clearclip import Segmenter

    viewer = widget._viewer
    widget.image.value = viewer.add_image(rgb_image, name="photo")
    widget.classes.value = "background\ncat\ndog"
    widget.show_advanced.value = True
    assert not widget.foreground.visible and not widget.keep_aspect.visible
    widget.method.value = "clipdiy"
    assert widget.foreground.visible and widget.keep_aspect.visible and not widget.crop.visible
    assert (widget.short_side.value, widget.logit_scale.value) == (256, 1.0)       # the official code's
    mask = np.zeros(rgb_image.shape[:2], np.uint8)
    mask[10:50, 20:70] = 255                                                        # a thresholded mask as an image
    widget.foreground.value = viewer.add_image(mask, name="mask")
    widget.image.value = viewer.layers["photo"]                                    # it followed the new layer
    assert not widget.found_weights.visible
    widget.snap.value = False
    run_and_wait(qtbot, widget)
    assert widget.status.value.startswith("Done"), widget.status.value
    labels = viewer.layers["photo classes"].data
    expected = Segmenter("test-tiny", widget.pretrained.value, method="clipdiy", device="cpu").segment(
        rgb_image, ["background", "cat", "dog"], foreground=mask > 0,
        contrast_limits=tuple(viewer.layers["photo"].contrast_limits)).labels
    np.testing.assert_array_equal(labels, expected)
    widget.foreground.value = "found"
    assert widget.found_weights.visible
    widget.found_weights.value = "/no/such/dino.pth; /no/such/decoder.pt"
    widget.new_layer.value = True
    run_and_wait(qtbot, widget)
    assert "does not exist" in widget.status.value and len(viewer.layers) == 3     # no half layer
    import timm
    import torch

    torch.save(timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=0).state_dict(),
               tmp_path / "dino.pth")
    torch.save({"decoder": torch.nn.Conv2d(384, 1, 1).state_dict()}, tmp_path / "decoder.pt")
    widget.found_weights.value = f"{tmp_path / 'dino.pth'}; {tmp_path / 'decoder.pt'}"
    run_and_wait(qtbot, widget)                                                     # FOUND's map, computed on the image
    assert widget.status.value.startswith("Done"), widget.status.value
    assert len(viewer.layers) == 4
    widget.method.value = "clearclip"
    assert not widget.foreground.visible and not widget.found_weights.visible and widget.crop.visible


def test_a_large_image_at_native_resolution_goes_tile_by_tile_into_an_editable_store(qtbot, widget, monkeypatch,
                                                                                    tmp_path):
    import dask.array as da
    import zarr

    import napari_clearclip.gui.widget as widget_module
    from images import smooth_image
    from napari_clearclip import Segmenter

    monkeypatch.setattr(widget_module, "TILED_PIXELS", 200 * 200)          # "large" from 200 x 200 on
    monkeypatch.setenv("NAPARI_CLEARCLIP_CACHE_DIR", str(tmp_path / "cache"))
    viewer = widget._viewer
    image = smooth_image(300, 260, seed=8)
    widget.image.value = viewer.add_image(da.from_array(image, chunks=(100, 100, 3)), name="slide", rgb=True)
    widget.classes.value = "sky\ngrass"
    widget.resize.value = False                                              # native resolution
    widget.crop.value, widget.stride.value = 64, 32
    run_and_wait(qtbot, widget)
    assert "tile by tile" in widget.status.value, widget.status.value
    assert "lesson" not in widget.status.value                               # none was loaded
    layer = viewer.layers["slide classes"]
    assert isinstance(layer.data, zarr.Array)
    expected = Segmenter("test-tiny", widget.pretrained.value, device="cpu").segment(
        image, ["sky", "grass"], maps=False, short_side=None, crop=64, stride=32, refine="pamr",
        contrast_limits=tuple(viewer.layers["slide"].contrast_limits)).labels
    np.testing.assert_array_equal(layer.data[:], expected)
    stores = list((tmp_path / "cache" / "labels").glob("*.zarr"))
    assert len(stores) == 1 and not list((tmp_path / "cache" / "labels").glob("*.partial"))
    layer.data[0:4, 0:4] = 2                                                 # painting writes into the store
    assert (zarr.open_group(str(stores[0]), mode="r")["labels"][0:4, 0:4] == 2).all()
    # Save labels... copies the store (from the user cache) with its classes, in the command line's format
    assert widget.save_labels_button.visible
    widget.save_labels(tmp_path / "slide")
    qtbot.waitUntil(lambda: "Saved" in widget.status.value or "Could not" in widget.status.value, timeout=30_000)
    assert "slide_labels.zarr" in widget.status.value, widget.status.value
    saved = zarr.open_group(str(tmp_path / "slide_labels.zarr"), mode="r")["labels"]
    np.testing.assert_array_equal(saved[:], layer.data[:])
    counts = np.bincount(np.asarray(layer.data[:]).ravel(), minlength=3)
    assert (tmp_path / "slide_classes.csv").read_text().splitlines()[1:] == [
        "0,unassigned,,0", f"1,sky,sky,{counts[1]}", f"2,grass,grass,{counts[2]}"]
    [opened] = viewer.open(str(tmp_path / "slide_labels.zarr"), plugin="napari-clearclip")
    assert list(opened.features["class"]) == ["unassigned", "sky", "grass"]
    viewer.layers.remove(opened)
    widget.save_labels(tmp_path / "slide_labels.zarr")                      # never replaced unasked
    assert "exists" in widget.status.value
    assert widget._run_live() is None and "press Run" in widget.status.value   # live mode does not pile up
    # a cancelled run adds no layer and leaves no store
    layers = len(viewer.layers)
    worker = widget.run()
    worker.yielded.connect(lambda step: widget.cancel()                       # once the store is open
                           if getattr(step, "stage", "") == "tiles" else None)
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)
    assert widget.status.value.startswith("Cancelled"), widget.status.value
    assert len(viewer.layers) == layers and worker is not None
    assert len(list((tmp_path / "cache" / "labels").iterdir())) == 1                # only the first run's store


def test_objects_of_a_large_image_get_a_class_each_tile_by_tile(qtbot, widget, monkeypatch, tmp_path):
    """An Objects layer (here lazy, as a slide's cellpose masks would be) on an image segmented tile by tile: each
    object gets the class a whole-image run gives it, in the objects layer's features table, and the labels layer
    gives each object's pixels its class."""
    import dask.array as da

    import napari_clearclip.gui.widget as widget_module
    from images import smooth_image
    from napari_clearclip import Segmenter

    monkeypatch.setattr(widget_module, "TILED_PIXELS", 200 * 200)
    monkeypatch.setenv("NAPARI_CLEARCLIP_CACHE_DIR", str(tmp_path / "cache"))
    viewer = widget._viewer
    image = smooth_image(300, 260, seed=8)
    rows, cols = np.arange(300) // 37, np.arange(260) // 29          # a grid of objects, crossing the tiles
    objects = (rows[:, None] * 100 + cols[None] + 1).astype(np.int32)
    objects[::23] = 0
    widget.image.value = viewer.add_image(image, name="slide", rgb=True)
    cells = viewer.add_labels(da.from_array(objects, chunks=(64, 64)), name="cells")
    widget.objects.value = cells
    widget.classes.value = "sky\ngrass"
    widget.resize.value = False
    widget.crop.value, widget.stride.value = 64, 32
    run_and_wait(qtbot, widget)
    status = widget.status.value
    assert "tile by tile" in status and f"{len(np.unique(objects)) - 1} objects of 'cells' got a class each" in status
    expected = Segmenter("test-tiny", widget.pretrained.value, device="cpu").segment(
        image, ["sky", "grass"], maps=False, short_side=None, crop=64, stride=32, refine="pamr", objects=objects,
        contrast_limits=tuple(viewer.layers["slide"].contrast_limits))
    features = cells.features
    assert list(features["index"]) == list(expected.objects["id"])
    assert list(features["class"]) == list(expected.objects["class"]) and len(set(features["class"])) == 2
    np.testing.assert_array_equal(viewer.layers["slide classes"].data[:], expected.labels)


def test_corrections_painted_on_a_tiled_result_teach_the_next_run_on_that_image(qtbot, widget, monkeypatch, tmp_path):
    """Strokes painted (through napari) on a result written tile by tile teach the next run, which adds a new layer
    equal to segment(..., strokes=) on the whole image and leaves the painted layer as it is; the strokes keep
    teaching the run after that, with what is painted since."""
    import zarr

    import napari_clearclip.gui.widget as widget_module
    from napari_clearclip import Segmenter
    from napari_clearclip.demo.scenes import make_scene

    monkeypatch.setattr(widget_module, "TILED_PIXELS", 200 * 200)
    monkeypatch.setenv("NAPARI_CLEARCLIP_CACHE_DIR", str(tmp_path / "cache"))
    viewer = widget._viewer
    image = np.concatenate([make_scene(140, size=160, objects=(4, 6)).image,
                            make_scene(141, size=160, objects=(4, 6)).image], 1)
    widget.image.value = viewer.add_image(image, name="slide", rgb=True)
    widget.classes.value = "sky\ngrass\nrock"
    widget.resize.value = False
    widget.crop.value, widget.stride.value = 64, 32
    run_and_wait(qtbot, widget)
    assert "Corrections painted on it teach the next run" in widget.status.value, widget.status.value
    first = viewer.layers["slide classes"]
    before = np.asarray(first.data[:])
    painting = np.zeros(image.shape[:2], np.int32)
    painting[20:26, 30:70], painting[120:124, 200:260] = 3, 1
    for value in (3, 1):                                    # painted as napari paints: into the store
        first.data_setitem(tuple(np.nonzero(painting == value)), value)
    painted = np.asarray(first.data[:])
    strokes = np.where(painted != before, painted, 0)       # what the painting changed: the corrections
    assert strokes.any()
    segmenter = Segmenter("test-tiny", widget.pretrained.value, device="cpu")
    run = dict(short_side=None, crop=64, stride=32, refine="pamr",
               contrast_limits=tuple(viewer.layers["slide"].contrast_limits))
    classes = ["sky", "grass", "rock"]
    expected = segmenter.segment(image, classes, maps=False, strokes=strokes, **run).labels
    assert not np.array_equal(expected, segmenter.segment(image, classes, maps=False, **run).labels)
    late = np.zeros(image.shape[:2], bool)
    late[140:143, 10:30] = True                              # painted on the first result while the run goes
    late_value = int(np.bincount(painted[late].ravel()).argmax()) % 3 + 1          # a class it is not

    def paint_late(step):
        if getattr(step, "stage", "") == "tiles" and not late_painted:
            late_painted.append(first.data_setitem(tuple(np.nonzero(late)), late_value))
    late_painted: list = []
    worker = widget.run()
    worker.yielded.connect(paint_late)
    qtbot.waitUntil(lambda: not widget.busy, timeout=120_000)
    status = widget.status.value
    assert late_painted and f"{int((strokes > 0).sum())} pixels painted on 'slide classes' taught this run" in status
    late_strokes = np.where(late & (np.asarray(first.data[:]) != painted), late_value, 0)
    assert late_strokes.any()
    assert f"{int((late_strokes > 0).sum())} pixels painted on 'slide classes' while this run went" in status, status
    strokes = np.where(late_strokes > 0, late_strokes, strokes)            # they teach the next run
    second = viewer.layers[-1]
    assert second is not first and isinstance(second.data, zarr.Array)
    np.testing.assert_array_equal(second.data[:], expected)
    np.testing.assert_array_equal(first.data[:], np.where(late, late_value, painted))   # the painted layer kept
    # the next run: the strokes before, and those painted since on the newest result, with a class added
    before = np.asarray(second.data[:])
    value = int(np.bincount(before[60:64, 100:140].ravel()).argmax()) % 3 + 1      # a class it is not
    second.data_setitem(tuple(np.nonzero(np.pad(np.ones((4, 40), bool), ((60, 96), (100, 180))))), value)
    second.data_setitem((np.arange(20, 26), np.full(6, 40)), 2)                   # over an earlier stroke
    after = np.asarray(second.data[:])
    more = np.where(after != before, after, strokes)
    assert (more != strokes).sum() > 20
    widget.classes.value = "sky\ngrass\nrock\nsea"
    run_and_wait(qtbot, widget)
    expected = segmenter.segment(image, classes + ["sea"], maps=False, strokes=more, **run).labels
    np.testing.assert_array_equal(viewer.layers[-1].data[:], expected)
    assert f"{int((more > 0).sum())} pixels painted on" in widget.status.value
    # saved with Save labels...: the pixels painted by hand (those that taught it, and a stroke since) go with it
    newest = viewer.layers[-1]
    newest.data_setitem((np.full(10, 150), np.arange(5, 15)), 4)
    since = np.asarray(newest.data[:]) != expected
    assert since.sum() == 10
    widget.save_labels(tmp_path / "slide")
    qtbot.waitUntil(lambda: "Saved" in widget.status.value or "Could not" in widget.status.value, timeout=30_000)
    saved = zarr.open_group(str(tmp_path / "slide_labels.zarr"), mode="r")
    np.testing.assert_array_equal(saved["labels"][:], newest.data[:])
    np.testing.assert_array_equal(saved["edited"][:], (more > 0) | since)


def test_a_tiled_run_that_fails_after_its_store_is_in_place_adds_no_layer_and_leaves_no_store(qtbot, widget,
                                                                                              monkeypatch, tmp_path):
    """Keeping the baseline (a disk that fills, say) comes after the labels store is renamed into place: a failure
    there removes the store, and no layer is added."""
    import napari_clearclip.gui.widget as widget_module
    import napari_clearclip.tiled_edits as tiled_edits
    from images import smooth_image

    monkeypatch.setattr(widget_module, "TILED_PIXELS", 200 * 200)
    monkeypatch.setenv("NAPARI_CLEARCLIP_CACHE_DIR", str(tmp_path / "cache"))

    def full_disk(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(tiled_edits, "keep_baseline", full_disk)
    viewer = widget._viewer
    widget.image.value = viewer.add_image(smooth_image(260, 240, seed=6), name="slide", rgb=True)
    widget.classes.value = "sky\ngrass"
    widget.resize.value = False
    widget.crop.value, widget.stride.value = 64, 32
    layers = len(viewer.layers)
    run_and_wait(qtbot, widget)
    assert "No space left on device" in widget.status.value, widget.status.value
    assert len(viewer.layers) == layers
    assert not list((tmp_path / "cache" / "labels").iterdir())                   # no store, no partial store


def test_a_lesson_saved_from_strokes_on_two_images_is_fitted_as_one_made_from_both(tmp_path):
    """Save lesson... joins the images' lessons at once and fits their class offsets in its worker."""
    from napari_clearclip import Lesson, Segmenter
    from napari_clearclip.gui.lessons import SessionLessons, fitted_and_saved

    segmenter = Segmenter("synthetic-tiny", device="cpu", disk_cache=False)
    classes = ["debris", "red", "background"]
    painted = []
    for seed, (rows, cols) in ((7, (slice(40, 48), slice(40, 48))), (8, (slice(130, 138), slice(130, 138)))):
        strokes = np.zeros((192, 192), np.int32)
        strokes[rows, cols] = 1
        strokes[100:104, 90:110] = 3
        painted.append((squares(seed), strokes))
    session = SessionLessons()
    session.record("A", segmenter.make_lesson(classes, painted[:1]))
    session.record("B", segmenter.make_lesson(classes, painted[1:]))
    lessons = session.to_save("B")                             # not joined, checked or fitted on the main thread
    assert [len(lesson) for lesson in lessons] == [len(session.taught["B"]), len(session.taught["A"])]
    lesson, path = fitted_and_saved(lessons, tmp_path / "two", segmenter)
    made = segmenter.make_lesson(classes, painted[::-1])
    expected = made.class_offsets
    np.testing.assert_allclose(Lesson.load(path).class_offsets, expected, atol=1e-5)
    np.testing.assert_allclose(lesson.class_offsets, expected, atol=1e-5)
    # with both images' painted pixels, for the offsets of runs without snapping
    assert len(Lesson.load(path).pixels) == len(made.pixels) > 0
    np.testing.assert_allclose(Lesson.load(path).unsnapped_offsets, made.unsnapped_offsets, atol=1e-5)


def test_a_lesson_teaches_an_image_segmented_tile_by_tile_as_it_teaches_the_whole_image(qtbot, widget, monkeypatch,
                                                                                       tmp_path):
    """A lesson made at native resolution teaches every tile with the whole image's statistics: the labels equal a
    run on the whole image with it. One made at another size is left out, with why, and the run goes without it."""
    import napari_clearclip.gui.widget as widget_module
    from images import smooth_image
    from napari_clearclip import Segmenter

    monkeypatch.setattr(widget_module, "TILED_PIXELS", 200 * 200)
    monkeypatch.setenv("NAPARI_CLEARCLIP_CACHE_DIR", str(tmp_path / "cache"))
    image = smooth_image(260, 240, seed=3)
    segmenter = Segmenter("test-tiny", widget.pretrained.value, device="cpu")
    strokes = np.zeros(image.shape[:2], np.int32)
    strokes[20:40, 20:60], strokes[200:220, 150:200] = 1, 2
    other = smooth_image(200, 220, seed=4)
    settings = dict(crop=64, stride=32)
    segmenter.make_lesson(["sky", "grass"], [(other, strokes[:200, :220])], short_side=None, **settings).save(
        tmp_path / "native.npz")
    segmenter.make_lesson(["sky", "grass"], [(other, strokes[:200, :220])], **settings).save(tmp_path / "resized.npz")
    viewer = widget._viewer
    widget.image.value = viewer.add_image(image, name="slide")
    widget.resize.value = False
    widget.crop.value, widget.stride.value = 64, 32
    limits = tuple(viewer.layers["slide"].contrast_limits)
    run = dict(short_side=None, refine="pamr", contrast_limits=limits, **settings)
    plain = segmenter.segment_tiled(image, ["sky", "grass"], **run)
    for name, used in (("native", True), ("resized", False)):
        assert widget.load_lesson(tmp_path / f"{name}.npz") is not None
        assert widget.classes.value == "sky\ngrass"
        run_and_wait(qtbot, widget)
        status = widget.status.value
        assert "tile by tile" in status and ("taught every tile" in status) == used, status
        assert ("A lesson was not used" in status and "other window settings" in status) == (not used), status
        labels = viewer.layers[-1].data[:]
        if used:
            from napari_clearclip import Lesson

            taught = segmenter.segment(image, ["sky", "grass"], maps=False, lesson=Lesson.load(tmp_path / "native.npz"),
                                       **run).labels
            assert not np.array_equal(taught, plain)
            np.testing.assert_array_equal(labels, taught)
        else:
            np.testing.assert_array_equal(labels, plain)


def test_a_zarr_layer_whose_store_lacks_chunks_is_segmented_as_shown_and_the_status_says_how_many(
        qtbot, widget, monkeypatch, tmp_path):
    """napari shows a chunk missing from a zarr store as the fill value; the tile-by-tile run reads it so, and says
    how many chunks were missing, since a copy may have lost them."""
    import zarr

    import napari_clearclip.gui.widget as widget_module
    from images import smooth_image
    from napari_clearclip import Segmenter

    monkeypatch.setattr(widget_module, "TILED_PIXELS", 200 * 200)
    monkeypatch.setenv("NAPARI_CLEARCLIP_CACHE_DIR", str(tmp_path / "cache"))
    image = smooth_image(256, 256, seed=5)
    stored = zarr.create_array(str(tmp_path / "slide.zarr"), shape=image.shape, chunks=(128, 128, 3), dtype=np.uint8)
    stored[:] = image
    (tmp_path / "slide.zarr" / "c" / "1" / "0" / "0").unlink()
    reopened = zarr.open_array(str(tmp_path / "slide.zarr"), mode="r")
    viewer = widget._viewer
    widget.image.value = viewer.add_image(reopened, name="slide", rgb=True)
    widget.classes.value = "sky\ngrass"
    widget.resize.value = False
    widget.crop.value, widget.stride.value = 64, 32
    run_and_wait(qtbot, widget)
    status = widget.status.value
    assert "tile by tile" in status and "1 of the 4 chunks of the image are not in its zarr store" in status, status
    expected = Segmenter("test-tiny", widget.pretrained.value, device="cpu").segment_tiled(
        reopened, ["sky", "grass"], crop=64, stride=32, refine="pamr", absent_chunks="fill",
        contrast_limits=tuple(viewer.layers["slide"].contrast_limits))
    np.testing.assert_array_equal(viewer.layers["slide classes"].data[:], expected)


def test_labels_the_command_wrote_opened_in_napari_are_corrected_and_teach_like_the_widgets_own(qtbot, widget,
                                                                                                tmp_path, capsys):
    """A folder segmented by clearclip-segment (on a cluster, say) and copied to a laptop: its labels, opened
    beside their image, are the result a run updates; a stroke on them is kept and teaches; the file stays."""
    import shutil

    import tifffile
    from skimage.io import imsave

    from napari_clearclip.batch.cli import main

    cluster = tmp_path / "cluster"
    cluster.mkdir()
    imsave(cluster / "shapes.png", squares(7), check_contrast=False)
    assert main([str(cluster / "shapes.png"), "--out", str(cluster / "out"), "--classes", "debris; red; background",
                 "--model", "synthetic-tiny", "--device", "cpu"]) == 0
    capsys.readouterr()
    laptop = tmp_path / "laptop"
    shutil.copytree(cluster, laptop)
    shutil.rmtree(cluster)                                       # only the copy is here
    written = tifffile.imread(laptop / "out" / "shapes_labels.tif")

    viewer = widget._viewer
    widget.switch_to_demo_model()
    widget.classes.value = "debris\nred\nbackground"
    [image] = viewer.open(str(laptop / "shapes.png"))
    [labels] = viewer.open(str(laptop / "out" / "shapes_labels.tif"), plugin="napari-clearclip")
    other = (slice(128, 160), slice(128, 160))                   # the blue square nobody paints
    assert np.mean(labels.data[other] == 1) < 0.5               # the text alone does not find debris
    labels.brush_size = 9
    labels.paint((48, 48), 1)                                   # a debris stroke on the first blue square
    stroke = labels.data == 1
    widget.image.value = image
    run_and_wait(qtbot, widget)
    assert [layer.name for layer in viewer.layers] == ["shapes", "shapes_labels"], widget.status.value
    assert "kept" in widget.status.value, widget.status.value
    assert np.all(labels.data[stroke] == 1)                      # the stroke is kept
    assert np.mean(labels.data[other] == 1) > 0.9               # and taught: the other square is debris too
    np.testing.assert_array_equal(tifffile.imread(laptop / "out" / "shapes_labels.tif"), written)   # file unchanged


def test_labels_of_another_image_of_the_same_name_and_size_are_not_taken_for_this_images_result(qtbot, widget,
                                                                                              tmp_path, capsys):
    """Two experiments, each with its 'slide.tif' of one shape (and so of one size): the command line's labels of the
    first, opened beside the second, are not the second's result; a run adds the second's own and leaves them as
    they are, with their stroke. Beside a copy of the first, they are its result (the copy holds the same bytes)."""
    import shutil

    import tifffile

    from napari_clearclip.batch.cli import main

    for folder, seed in (("one", 7), ("two", 3)):
        (tmp_path / folder).mkdir()
        tifffile.imwrite(tmp_path / folder / "slide.tif", squares(seed))
    assert (tmp_path / "one" / "slide.tif").stat().st_size == (tmp_path / "two" / "slide.tif").stat().st_size
    assert main([str(tmp_path / "one" / "slide.tif"), "--out", str(tmp_path / "one" / "out"), "--classes",
                 "debris; red; background", "--model", "synthetic-tiny", "--device", "cpu"]) == 0
    capsys.readouterr()
    viewer = widget._viewer
    widget.switch_to_demo_model()
    widget.classes.value = "debris\nred\nbackground"
    [image] = viewer.open(str(tmp_path / "two" / "slide.tif"))
    [labels] = viewer.open(str(tmp_path / "one" / "out" / "slide_labels.tif"), plugin="napari-clearclip")
    labels.brush_size = 9
    labels.paint((48, 48), 1)                                   # a debris stroke on the first image's labels
    theirs = np.array(labels.data)
    widget.image.value = image
    run_and_wait(qtbot, widget)
    assert [layer.name for layer in viewer.layers] == ["slide", "slide_labels", "slide classes"], widget.status.value
    np.testing.assert_array_equal(labels.data, theirs)           # not updated: another image's labels
    other = (slice(128, 160), slice(128, 160))
    assert np.mean(viewer.layers["slide classes"].data[other] == 1) < 0.5   # and their stroke taught nothing

    viewer.layers.clear()
    (tmp_path / "copy").mkdir()                                  # the first image copied: the same bytes
    shutil.copyfile(tmp_path / "one" / "slide.tif", tmp_path / "copy" / "slide.tif")
    [image] = viewer.open(str(tmp_path / "copy" / "slide.tif"))
    [labels] = viewer.open(str(tmp_path / "one" / "out" / "slide_labels.tif"), plugin="napari-clearclip")
    widget.image.value = image
    run_and_wait(qtbot, widget)
    assert [layer.name for layer in viewer.layers] == ["slide", "slide_labels"], widget.status.value


@pytest.mark.parametrize("saved_with", ["Save labels...", "File > Save Selected Layers..."])
def test_save_labels_writes_the_command_lines_format_which_opens_again_as_the_images_result(qtbot, widget, tmp_path,
                                                                                            capsys, saved_with):
    """A corrected result saved with its classes (the widget's button, or napari's File menu, where napari's own
    writer kept none), opened again in a later session beside its image: the classes, the edits and the image's
    result are back; a re-run of the command line on the folder keeps it."""
    import tifffile
    from skimage.io import imsave

    from napari_clearclip.batch.cli import main

    imsave(tmp_path / "shapes.png", squares(7), check_contrast=False)
    viewer = widget._viewer
    widget.switch_to_demo_model()
    widget.classes.value = "debris\nred\nbackground"
    [image] = viewer.open(str(tmp_path / "shapes.png"))
    widget.image.value = image
    assert not widget.save_labels_button.visible                  # nothing to save yet
    run_and_wait(qtbot, widget)
    assert widget.save_labels_button.visible
    result = viewer.layers["shapes classes"]
    before = np.array(result.data)
    result.brush_size = 9
    result.paint((48, 48), 1)                                     # a debris stroke
    corrected = np.array(result.data)
    stroke = corrected != before
    if saved_with == "Save labels...":
        worker = widget.save_labels(tmp_path / "shapes.tif")      # named as the command line names labels
        qtbot.waitUntil(lambda: "Saved" in widget.status.value, timeout=30_000)
        assert worker is not None and "shapes_labels.tif" in widget.status.value
    else:
        viewer.layers.selection = {result}
        written = viewer.layers.save(str(tmp_path / "shapes.tif"), selected=True)
        assert [Path(item).name for item in written] == ["shapes_labels.tif", "shapes_classes.csv"]
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "shapes_labels.tif"), corrected)
    assert (tmp_path / "shapes_classes.csv").read_text().splitlines()[1:] == [
        "0,unassigned,,0", f"1,debris,debris,{(corrected == 1).sum()}", f"2,red,red,{(corrected == 2).sum()}",
        f"3,background,background,{(corrected == 3).sum()}"]
    if saved_with == "Save labels...":
        widget.save_labels(tmp_path / "shapes_labels.tif")       # never replaced unasked
        assert "exists" in widget.status.value

    # a later session: the image and its saved labels opened again
    viewer.layers.clear()
    [image] = viewer.open(str(tmp_path / "shapes.png"))
    [labels] = viewer.open(str(tmp_path / "shapes_labels.tif"), plugin="napari-clearclip")
    assert list(labels.features["class"]) == ["unassigned", "debris", "red", "background"]
    widget.image.value = image
    run_and_wait(qtbot, widget)
    assert [layer.name for layer in viewer.layers] == ["shapes", "shapes_labels"], widget.status.value
    assert stroke.any() and np.all(labels.data[stroke] == 1)     # the stroke is still the user's: kept, taught
    assert np.mean(labels.data[128:160, 128:160] == 1) > 0.9
    # the command line, run on the folder, keeps it as an output and segments only the image
    assert main([str(tmp_path), "--out", str(tmp_path), "--classes", "debris; red; background",
                 "--model", "synthetic-tiny", "--device", "cpu"]) == 1   # outputs not this run's: kept, said
    assert "0 of 1 images segmented" in capsys.readouterr().err
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "shapes_labels.tif"), corrected)


def test_labels_too_large_to_hold_are_corrected_in_a_working_copy_and_saved_under_a_new_name(qtbot, widget, tmp_path,
                                                                                             monkeypatch, capsys):
    """A slide's labels the command wrote as a zarr store, opened beside the slide: painted on without the store
    being written (the strokes go to a working copy in the cache), and Save labels... writes the corrected labels
    with their classes under a new name."""
    import zarr
    from skimage.io import imsave

    import napari_clearclip.batch.labels_reading as labels_reading
    from napari_clearclip.batch.cli import main

    monkeypatch.setattr(labels_reading, "IN_MEMORY_PIXELS", 100 * 100)   # "too large to hold" from 100 x 100 on
    imsave(tmp_path / "shapes.png", squares(7), check_contrast=False)
    assert main([str(tmp_path / "shapes.png"), "--out", str(tmp_path / "out"), "--classes", "debris; red; background",
                 "--model", "synthetic-tiny", "--device", "cpu", "--format", "zarr"]) == 0
    capsys.readouterr()
    store = tmp_path / "out" / "shapes_labels.zarr"
    written = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    viewer = widget._viewer
    [image] = viewer.open(str(tmp_path / "shapes.png"))
    [labels] = viewer.open(str(store), plugin="napari-clearclip")
    widget.image.value = image
    assert widget.save_labels_button.visible                          # these labels are the image's to save
    labels.brush_size = 9
    labels.paint((48, 48), 1)                                         # a debris stroke
    corrected = np.asarray(labels.data[...])
    assert corrected[48, 48] == 1
    widget.save_labels(tmp_path / "fixed")
    qtbot.waitUntil(lambda: "Saved" in widget.status.value or "Could not" in widget.status.value, timeout=30_000)
    assert "fixed_labels.zarr" in widget.status.value, widget.status.value
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "fixed_labels.zarr"), mode="r")["labels"][:],
                                  corrected)
    assert (tmp_path / "fixed_classes.csv").read_text().splitlines()[2] == f"1,debris,debris,{(corrected == 1).sum()}"
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == written   # the command's store untouched
    from napari_clearclip.editable_copy import WORKING_KEY

    working = zarr.open_group(str(labels.data.edits_path), mode="r").attrs[WORKING_KEY]   # its strokes are saved:
    assert working["saved"] and working["saved_to"] == str(tmp_path / "fixed_labels.zarr")   # removed next time

    # segmented again tile by tile (a slide at native resolution): the stroke on the opened labels teaches the run
    import napari_clearclip.gui.widget as widget_module

    monkeypatch.setattr(widget_module, "TILED_PIXELS", 100 * 100)
    other = (slice(128, 160), slice(128, 160))                        # the blue square nobody painted
    assert np.mean(corrected[other] == 1) < 0.5
    widget.switch_to_demo_model()
    widget.classes.value = "debris\nred\nbackground"
    widget.resize.value = False
    run_and_wait(qtbot, widget)
    assert "tile by tile" in widget.status.value and "painted on 'shapes_labels'" in widget.status.value, \
        widget.status.value
    result = np.asarray(viewer.layers["shapes classes"].data[...])
    assert np.all(result[corrected != np.asarray(labels.data.source[...])] == 1)   # the stroke keeps its class
    assert np.mean(result[other] == 1) > 0.9                           # and teaches the other blue square
    np.testing.assert_array_equal(np.asarray(labels.data[...]), corrected)          # the painted layer as it was

    # another day: the corrected labels opened beside the slide; the stroke, painted before they were saved, is
    # kept in them as the user's and teaches again
    painted = corrected != np.asarray(labels.data.source[...])
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "fixed_labels.zarr"), mode="r")["edited"][...],
                                  painted)
    viewer.layers.clear()
    [image] = viewer.open(str(tmp_path / "shapes.png"))
    [fixed] = viewer.open(str(tmp_path / "fixed_labels.zarr"), plugin="napari-clearclip")
    widget.image.value = image
    run_and_wait(qtbot, widget)
    assert "painted on 'fixed_labels'" in widget.status.value, widget.status.value
    result = np.asarray(viewer.layers["shapes classes"].data[...])
    assert np.all(result[painted] == 1) and np.mean(result[other] == 1) > 0.9


def _new_napari(make_napari_viewer, classes: str):
    """A viewer and a dock opened as in a new napari (the demo model, a slide's settings)."""
    viewer = make_napari_viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-clearclip", "ClearCLIP segmentation")
    widget.device.value = "cpu"
    widget.switch_to_demo_model()
    widget.snap.value, widget.learn.value, widget.keep_edits.value, widget.live.value = True, True, True, False
    widget.classes.value = classes
    widget.resize.value = False
    return viewer, widget


def _tiled_result(qtbot, widget, image):
    """A first result of ``image`` segmented tile by tile with the demo model (the caller lowers TILED_PIXELS), and
    its store."""
    import napari_clearclip.gui.widget as widget_module

    widget.image.value = image
    widget.switch_to_demo_model()
    widget.classes.value = "debris\nred\nbackground"
    widget.resize.value = False
    run_and_wait(qtbot, widget)
    result = widget._viewer.layers[f"{image.name} classes"]
    return result, Path(result.metadata[widget_module.TILED_KEY]["store"])


def _debris_stroke(result):
    """Paint a debris stroke on a blue square of a :func:`squares` result; the other blue square (which nobody
    paints, not debris in the result) and the pixels painted."""
    other = (slice(128, 160), slice(128, 160))
    assert np.mean(np.asarray(result.data[other]) == 1) < 0.5
    before = np.array(result.data[...])   # (a copy: a result in memory is painted in place)
    result.brush_size = 9
    result.paint((48, 48), 1)
    painted = np.asarray(result.data[...]) != before
    assert painted.sum() > 20
    return other, painted


def _stroke_on_a_result(qtbot, widget, image, name: str | None = None):
    """Segment ``image`` (an image layer, or a :func:`squares` picture added as ``name``) with the demo model at full
    size and paint a :func:`_debris_stroke` on its result: (the result layer, the other blue square, the pixels
    painted)."""
    widget.switch_to_demo_model()
    widget.classes.value = "debris\nred\nbackground"
    widget.resize.value = False
    if name is not None:
        image = widget._viewer.add_image(image, name=name, rgb=True)
    widget.image.value = image
    run_and_wait(qtbot, widget)
    result = widget._viewer.layers[f"{image.name} classes"]
    return (result, *_debris_stroke(result))


def _napari_closed(qtbot, viewer):
    """Close a viewer as napari does when it quits (its layers removed first, then its window)."""
    viewer.close()
    qtbot.wait(200)


def _two_images_store(path):
    """A zarr store of two :func:`squares` images of one size, ``0`` and ``1``: in the second, red where
    :func:`_debris_stroke` paints."""
    import zarr

    root = zarr.open_group(str(path), mode="w")
    second = squares(8)
    second[24:72, 24:72] = (215, 35, 35)
    for name, picture in (("0", squares(7)), ("1", second)):
        root.create_array(name, shape=picture.shape, chunks=(96, 96, 3), dtype=np.uint8)[:] = picture


def _later_napari_elsewhere(qtbot, viewer, monkeypatch, tmp_path, make_napari_viewer):
    """Close ``viewer`` as napari quits, then open a later napari started in another folder, its dock set for
    :func:`squares` with the demo model: (viewer, widget)."""
    import napari_clearclip.tiled_edits as tiled_edits

    _napari_closed(qtbot, viewer)
    monkeypatch.setattr(tiled_edits, "SESSION", "a later napari")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    return _new_napari(make_napari_viewer, "debris\nred\nbackground")


def test_corrections_on_a_slides_result_left_when_napari_closed_teach_the_next_run_and_removed_ones_do_not(
        qtbot, widget, tmp_path, monkeypatch, make_napari_viewer):
    """A slide's result segmented tile by tile lives in a store in the cache: painted on, then napari closed without
    saving, the next run on that slide's file learns from it (the stroke keeps its class and teaches the other blue
    square) and the store goes; a result whose layer the user removed teaches nothing, and its store goes at once,
    unless another viewer shows it."""
    import threading

    from skimage.io import imsave

    import napari_clearclip.gui.widget as widget_module
    import napari_clearclip.tiled_edits as tiled_edits

    def removals_done():
        return not any(t.name == "napari-clearclip removing results" for t in threading.enumerate())

    monkeypatch.setattr(widget_module, "TILED_PIXELS", 100 * 100)
    imsave(tmp_path / "shapes.png", squares(7), check_contrast=False)
    viewer = widget._viewer
    [image] = viewer.open(str(tmp_path / "shapes.png"))
    first, store = _tiled_result(qtbot, widget, image)
    other, painted = _debris_stroke(first)

    _napari_closed(qtbot, viewer)                                     # napari closed, and opened again
    assert store.exists() and removals_done()                          # a closed napari's result is kept
    monkeypatch.setattr(tiled_edits, "SESSION", "a later napari")
    viewer, widget = _new_napari(make_napari_viewer, "debris\nred\nbackground")
    [image] = viewer.open(str(tmp_path / "shapes.png"))
    widget.image.value = image
    run_and_wait(qtbot, widget)
    assert "left when napari closed, taught this run" in widget.status.value, widget.status.value
    second = viewer.layers["shapes classes"]
    result = np.asarray(second.data[...])
    assert np.all(result[painted] == 1) and np.mean(result[other] == 1) > 0.9
    qtbot.waitUntil(lambda: not store.exists(), timeout=10_000)       # its strokes are kept in the new store
    kept = Path(second.metadata[widget_module.TILED_KEY]["store"])

    scratch = viewer.add_image(squares(3), name="scratch")           # an image of no file, its result removed
    widget.image.value = scratch
    run_and_wait(qtbot, widget)
    scratch_store = Path(viewer.layers["scratch classes"].metadata[widget_module.TILED_KEY]["store"])
    viewer.layers.remove("scratch classes")
    qtbot.waitUntil(lambda: not scratch_store.exists(), timeout=10_000)   # discarded: its store goes at once
    elsewhere = make_napari_viewer(show=True)                         # a second viewer shows that result too
    _, elsewhere_dock = elsewhere.window.add_plugin_dock_widget("napari-clearclip", "ClearCLIP segmentation")
    shown = elsewhere.add_labels(second.data, name="shown elsewhere", metadata=dict(second.metadata))
    viewer.layers.remove(second)                                      # removed here by the user
    qtbot.wait(100)
    qtbot.waitUntil(removals_done, timeout=10_000)
    assert kept.exists(), "a store another viewer shows was removed"
    widget.image.value = image
    run_and_wait(qtbot, widget)
    assert kept.exists(), "a store another viewer shows was removed"
    third = viewer.layers["shapes classes"]
    third_store = Path(third.metadata[widget_module.TILED_KEY]["store"])
    console = viewer.add_labels(third.data, name="copied in the console")   # its labels, without their record
    viewer.layers.remove(third)
    elsewhere.layers.remove(shown)                                    # removed everywhere: discarded
    qtbot.waitUntil(lambda: not kept.exists(), timeout=10_000)
    qtbot.waitUntil(removals_done, timeout=10_000)
    assert third_store.exists(), "the store of labels another layer shows was removed"
    viewer.layers.remove(console)
    widget.image.value = image
    run_and_wait(qtbot, widget)
    assert "taught this run" not in widget.status.value, widget.status.value
    assert np.mean(np.asarray(viewer.layers["shapes classes"].data[other]) == 1) < 0.5
    qtbot.waitUntil(lambda: not third_store.exists(), timeout=10_000)   # not shown, not learnt from: it goes

    # a result left by a napari that closed, whose store cannot be read any more: the run does without it, says so
    broken = Path(viewer.layers["shapes classes"].metadata[widget_module.TILED_KEY]["store"])
    chunks = [path for path in (broken / "baseline").rglob("*") if path.is_file() and path.name != "zarr.json"]
    assert chunks
    for chunk in chunks:
        chunk.write_bytes(b"not a chunk")
    _napari_closed(qtbot, viewer)
    monkeypatch.setattr(tiled_edits, "SESSION", "a third napari")
    widget = elsewhere_dock
    widget.device.value = "cpu"
    widget.switch_to_demo_model()
    widget.classes.value, widget.resize.value = "debris\nred\nbackground", False
    widget.snap.value, widget.learn.value, widget.keep_edits.value, widget.live.value = True, True, True, False
    [image] = elsewhere.open(str(tmp_path / "shapes.png"))
    widget.image.value = image
    run_and_wait(qtbot, widget)
    assert "could not be read" in widget.status.value and "shapes classes" in elsewhere.layers, widget.status.value
    qtbot.waitUntil(lambda: not broken.exists(), timeout=10_000)


def test_corrections_on_a_slides_result_do_not_teach_once_its_file_was_written_again(
        qtbot, widget, tmp_path, monkeypatch, make_napari_viewer):
    """A slide's result left when napari closed, with a stroke on it; the slide's file is then written again (other
    pixels, the same name and size): the next run on it is not taught by the stroke, which marked what the file
    showed before, and says so; the stale result goes all the same."""
    import os

    from skimage.io import imsave

    import napari_clearclip.gui.widget as widget_module
    import napari_clearclip.tiled_edits as tiled_edits

    monkeypatch.setattr(widget_module, "TILED_PIXELS", 100 * 100)
    imsave(tmp_path / "shapes.png", squares(7), check_contrast=False)
    viewer = widget._viewer
    [image] = viewer.open(str(tmp_path / "shapes.png"))
    first, store = _tiled_result(qtbot, widget, image)
    other = (slice(128, 160), slice(128, 160))                        # the blue square nobody paints
    first.brush_size = 9
    first.paint((48, 48), 1)                                          # a debris stroke on a blue square
    _napari_closed(qtbot, viewer)
    assert store.exists()

    rewritten = squares(7)                                            # the file written again: the same size,
    rewritten[24:72, 24:72] = (215, 35, 35)                           # the painted square red now
    stat = (tmp_path / "shapes.png").stat()
    imsave(tmp_path / "shapes.png", rewritten, check_contrast=False)
    os.utime(tmp_path / "shapes.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    monkeypatch.setattr(tiled_edits, "SESSION", "a later napari")
    viewer, widget = _new_napari(make_napari_viewer, "debris\nred\nbackground")
    [image] = viewer.open(str(tmp_path / "shapes.png"))
    widget.image.value = image
    run_and_wait(qtbot, widget)
    status = widget.status.value
    assert "was made before its file was written again" in status and "taught this run" not in status, status
    result = np.asarray(viewer.layers["shapes classes"].data[...])
    assert np.mean(result[other] == 1) < 0.5                          # no debris taught
    assert np.mean(result[48:50, 46:50] == 1) < 0.5                   # nor the stroke kept as the user's
    qtbot.waitUntil(lambda: not store.exists(), timeout=10_000)       # the stale result goes


def test_a_slides_result_left_when_napari_closed_neither_teaches_nor_goes_with_another_image_of_its_name_and_size(
        qtbot, widget, tmp_path, monkeypatch, make_napari_viewer):
    """Two experiments' images in two folders, both 'slide.tif', of one shape and so of one size: a stroke on the
    first one's result, left when napari closed, does not teach a run on the second, and that result stays (it holds
    the first image's corrections); the next run on the first image learns from it. A copy of the first image in a
    third folder is its copy."""
    import shutil

    import tifffile

    import napari_clearclip.gui.widget as widget_module
    import napari_clearclip.tiled_edits as tiled_edits

    monkeypatch.setattr(widget_module, "TILED_PIXELS", 100 * 100)
    for folder, seed in (("one", 7), ("two", 3)):
        (tmp_path / folder).mkdir()
        tifffile.imwrite(tmp_path / folder / "slide.tif", squares(seed))
    assert (tmp_path / "one" / "slide.tif").stat().st_size == (tmp_path / "two" / "slide.tif").stat().st_size
    viewer = widget._viewer
    [image] = viewer.open(str(tmp_path / "one" / "slide.tif"))
    first, store = _tiled_result(qtbot, widget, image)
    other = (slice(128, 160), slice(128, 160))                        # the blue square nobody paints
    first.brush_size = 9
    first.paint((48, 48), 1)                                          # a debris stroke
    _napari_closed(qtbot, viewer)
    monkeypatch.setattr(tiled_edits, "SESSION", "a later napari")
    viewer, widget = _new_napari(make_napari_viewer, "debris\nred\nbackground")
    [image] = viewer.open(str(tmp_path / "two" / "slide.tif"))
    widget.image.value = image
    run_and_wait(qtbot, widget)
    assert "taught this run" not in widget.status.value, widget.status.value
    assert np.mean(np.asarray(viewer.layers["slide classes"].data[other]) == 1) < 0.5
    qtbot.wait(300)
    assert store.exists(), "the result of another image was removed"
    viewer.layers.clear()
    (tmp_path / "three").mkdir()                                      # the first image, copied to another folder
    shutil.copyfile(tmp_path / "one" / "slide.tif", tmp_path / "three" / "slide.tif")
    [image] = viewer.open(str(tmp_path / "three" / "slide.tif"))
    widget.image.value = image
    run_and_wait(qtbot, widget)
    assert "left when napari closed, taught this run" in widget.status.value, widget.status.value
    assert np.mean(np.asarray(viewer.layers["slide classes"].data[other]) == 1) > 0.9


def test_opening_the_dock_clears_the_cache_of_results_no_run_can_use_and_keeps_those_that_teach(
        qtbot, tmp_path, make_napari_viewer):
    """Results a closed napari left unused for longer than the cache keeps them, and results discarded before
    their removal ended, go when a dock opens (in the background); a recent result left when napari closed stays,
    to teach the next run on its image."""
    import os
    import threading
    import time

    import numpy as np
    import zarr

    from napari_clearclip.labels_cache import KEEP_UNUSED_DAYS, discard_result, labels_folder
    from napari_clearclip.tiled_edits import RESULT_RECORD_KEY, keep_baseline, keep_result_record

    def result(name, days_unused):
        store = labels_folder() / name
        group = zarr.open_group(str(store), mode="w")
        group.create_array("labels", data=np.ones((8, 8), np.uint8), chunks=(4, 4))
        keep_baseline(store)
        keep_result_record(store, str(tmp_path / "slide.tif"), ["cell", "background"])
        group = zarr.open_group(str(store), mode="r+")
        group.attrs[RESULT_RECORD_KEY] = {**group.attrs[RESULT_RECORD_KEY], "session": "a closed napari"}
        when = time.time() - days_unused * 86400
        for item in [*store.rglob("*"), store]:
            os.utime(item, (when, when))
        return store

    (tmp_path / "slide.tif").write_bytes(b"")
    old, recent, discarded = (result("old-20261001-120000.zarr", KEEP_UNUSED_DAYS + 2),
                              result("recent-20261101-120000.zarr", 2), result("discarded-20261201-120000.zarr", 0))
    discard_result(discarded)
    viewer = make_napari_viewer(show=False)
    viewer.window.add_plugin_dock_widget("napari-clearclip", "ClearCLIP segmentation")
    qtbot.waitUntil(lambda: not old.exists() and not discarded.exists(), timeout=15_000)
    qtbot.waitUntil(lambda: not any(t.name == "napari-clearclip tidying the cache" for t in threading.enumerate()),
                    timeout=10_000)
    assert recent.exists() and (recent / "zarr.json").exists()


@pytest.mark.parametrize("meanwhile", ["nothing", "cache tidied"])
def test_a_result_removed_during_a_run_is_kept_for_that_run_and_goes_at_the_next(qtbot, widget, monkeypatch, meanwhile):
    """A run may read the result it learns from: removed while it goes, that result is discarded (no run learns from
    it any more) but its store stays until the run is over, and goes at the next run tile by tile; when the dock
    tidies the cache meanwhile (its first time, shortly after it opens), the tidying waits for the run, then removes
    it."""
    import threading

    import napari_clearclip.gui.widget as widget_module
    import napari_clearclip.lazy_tiles as lazy_tiles
    from napari_clearclip.tiled_edits import kept_results

    monkeypatch.setattr(widget_module, "TILED_PIXELS", 100 * 100)
    viewer = widget._viewer
    first, store = _tiled_result(qtbot, widget, viewer.add_image(squares(5), name="slide"))
    first.brush_size = 9
    first.paint((48, 48), 1)
    gate, reading = threading.Event(), threading.Event()
    painted_parts = lazy_tiles.painted_parts

    def read_when_let(*args, **kwargs):   # the run holds before it reads the strokes on the first result
        reading.set()
        assert gate.wait(60)
        return painted_parts(*args, **kwargs)

    monkeypatch.setattr(lazy_tiles, "painted_parts", read_when_let)
    widget.run()                                                      # learns from the first result...
    try:
        qtbot.waitUntil(reading.is_set, timeout=60_000)
        viewer.layers.remove(first)                                   # ...which the user removes meanwhile
        qtbot.waitUntil(lambda: store not in [path for path, _ in kept_results()], timeout=10_000)   # discarded
        if meanwhile == "cache tidied":
            monkeypatch.setattr(widget_module, "_TIDIED", set())
            widget._prepare_loops()                                   # (as its timer does, once the dock is shown)
            qtbot.wait(300)
        assert store.exists() and widget.busy
    finally:
        gate.set()
    assert widget.wait(120)
    qtbot.waitUntil(lambda: not any(t.name == "napari-clearclip removing results" for t in threading.enumerate()),
                    timeout=10_000)
    assert "slide classes" in viewer.layers and "Unexpected" not in widget.status.value, widget.status.value
    assert "could not be read" not in widget.status.value and "taught" in widget.status.value, widget.status.value
    assert store not in [path for path, _ in kept_results()]                      # discarded
    if meanwhile == "nothing":
        assert store.exists()                                                     # kept until the next run...
        run_and_wait(qtbot, widget)
    # ... or until the tidying that waited for the run goes on (at most PREPARE_LOOPS_AFTER_MS after it)
    qtbot.waitUntil(lambda: not store.exists(), timeout=10_000)


def test_a_result_removed_once_the_dock_is_closed_is_discarded_too(qtbot, widget, monkeypatch):
    """The viewer is watched from its first dock on: a result whose layer is removed after the dock was closed goes
    as it would with the dock open; closing napari afterwards removes no other result."""
    import napari_clearclip.gui.widget as widget_module

    monkeypatch.setattr(widget_module, "TILED_PIXELS", 100 * 100)
    viewer = widget._viewer
    first, store = _tiled_result(qtbot, widget, viewer.add_image(squares(5), name="slide"))
    second, kept = _tiled_result(qtbot, widget, viewer.add_image(squares(6), name="other"))
    qtbot.wait(1700)   # (the dock has seen its window)
    viewer.window.remove_dock_widget(widget.native)
    widget.close_down()                                               # the dock closed by the user
    viewer.layers.remove(first)
    qtbot.waitUntil(lambda: not store.exists(), timeout=10_000)
    _napari_closed(qtbot, viewer)
    assert kept.exists() and (kept / "zarr.json").exists()            # left for the next run on its image


def test_a_result_removed_in_a_viewer_never_shown_is_discarded_and_closing_it_keeps_the_others(
        qtbot, monkeypatch, make_napari_viewer):
    """A script's viewer (``show=False``) has a window never shown: a result layer removed there is discarded and its
    store goes at once, as in a shown napari; closing that viewer leaves its other results for the next run."""
    import napari_clearclip.gui.widget as widget_module
    from napari_clearclip.tiled_edits import kept_results

    monkeypatch.setattr(widget_module, "TILED_PIXELS", 100 * 100)
    viewer = make_napari_viewer(show=False)
    _, widget = viewer.window.add_plugin_dock_widget("napari-clearclip", "ClearCLIP segmentation")
    widget.device.value = "cpu"
    first, store = _tiled_result(qtbot, widget, viewer.add_image(squares(5), name="slide"))
    second, kept = _tiled_result(qtbot, widget, viewer.add_image(squares(6), name="other"))
    viewer.layers.remove(first)
    qtbot.waitUntil(lambda: not store.exists(), timeout=10_000)
    assert kept.exists() and kept in [path for path, _ in kept_results()]
    _napari_closed(qtbot, viewer)
    qtbot.wait(300)
    assert kept.exists() and kept in [path for path, _ in kept_results()]   # left for the next run on its image


def test_corrections_on_a_result_of_an_image_of_no_file_teach_a_later_napari_on_the_same_pixels_only(
        qtbot, widget, monkeypatch, make_napari_viewer):
    """An image of no file (made in napari's console, or by a script) is known by its pixels: painted on, then napari
    closed, its result teaches the next run on the same pixels in a later napari (the stroke keeps its class) and
    goes; a run on other pixels of the same shape neither learns from it nor removes it."""
    import napari_clearclip.gui.widget as widget_module
    import napari_clearclip.tiled_edits as tiled_edits

    monkeypatch.setattr(widget_module, "TILED_PIXELS", 100 * 100)
    viewer = widget._viewer
    first, store = _tiled_result(qtbot, widget, viewer.add_image(squares(7), name="made"))
    other, painted = _debris_stroke(first)
    _napari_closed(qtbot, viewer)
    monkeypatch.setattr(tiled_edits, "SESSION", "a later napari")

    viewer, widget = _new_napari(make_napari_viewer, "debris\nred\nbackground")
    widget.image.value = viewer.add_image(squares(8), name="another")   # the same shape, other pixels
    run_and_wait(qtbot, widget)
    assert "left when napari closed" not in widget.status.value, widget.status.value
    assert np.mean(np.asarray(viewer.layers["another classes"].data[other]) == 1) < 0.5
    qtbot.wait(300)
    assert store.exists() and store in [path for path, _ in tiled_edits.kept_results()]

    widget.image.value = viewer.add_image(np.array(squares(7)), name="made again")   # the same pixels, anew
    run_and_wait(qtbot, widget)
    assert "left when napari closed, taught this run" in widget.status.value, widget.status.value
    result = np.asarray(viewer.layers["made again classes"].data[...])
    assert np.all(result[painted] == 1) and np.mean(result[other] == 1) > 0.9
    qtbot.waitUntil(lambda: not store.exists(), timeout=10_000)       # its strokes are kept in the new store


@pytest.fixture
def remote_reader():
    """A reader plugin for zarr stores on a web server of 127.0.0.1, as napari-ome-zarr opens remote OME-Zarr: napari
    names the layer's source by the store's address; its name, to ``viewer.open(..., plugin=)``."""
    import npe2
    import zarr

    def reader(path):
        def read(address):
            return [(zarr.open_array(address, mode="r"), {"name": "slide", "rgb": True}, "image")]

        return read if str(path).startswith("http://127.0.0.1:") else None

    name = "remote-zarr-for-tests"
    manifest = npe2.PluginManifest(name=name, contributions={
        "commands": [{"id": f"{name}.read", "title": "Read a zarr store on a web server"}],
        "readers": [{"command": f"{name}.read", "filename_patterns": ["http://*"], "accepts_directories": True}]})
    manager = npe2.PluginManager.instance()
    try:
        manager.register(manifest)
    except Exception:   # noqa: BLE001 - napari's menus, listening once per viewer made before, add its command twice
        pass
    assert manager.get_manifest(name) is manifest
    manager.commands.register(f"{name}.read", reader)
    yield name
    try:
        manager.unregister(name)
    except Exception:   # noqa: BLE001 - (as above, on the way out)
        pass


def test_a_remote_store_napari_opened_is_found_by_its_address_and_saved_beside_nothing_remote(
        qtbot, widget, tmp_path, monkeypatch, make_napari_viewer, served, remote_reader):
    """A zarr store on a web server that a reader plugin opened (napari names the layer's source by its address):
    its result's record keeps the address as it is, so that corrections left when napari closed teach the next run
    on that address in a napari started in another folder; Save labels... proposes the store's name in the folder
    napari was started from (the address read as a path named folders that are nowhere)."""
    import qtpy.QtWidgets
    import zarr

    import napari_clearclip.gui.widget as widget_module
    import napari_clearclip.tiled_edits as tiled_edits

    pytest.importorskip("aiohttp")
    monkeypatch.setattr(widget_module, "TILED_PIXELS", 100 * 100)
    stored = zarr.create_array(str(tmp_path / "slide.zarr"), shape=(192, 192, 3), chunks=(96, 96, 3), dtype=np.uint8)
    stored[:] = squares(7)
    address = served(tmp_path) + "/slide.zarr"
    (tmp_path / "first").mkdir()
    monkeypatch.chdir(tmp_path / "first")
    viewer = widget._viewer
    [image] = viewer.open(address, plugin=remote_reader)
    first, store = _tiled_result(qtbot, widget, image)
    assert tiled_edits.result_record(store)["source"] == address
    proposed = []
    monkeypatch.setattr(qtpy.QtWidgets.QFileDialog, "getSaveFileName",
                        staticmethod(lambda parent, title, start, kinds: (proposed.append(start), ("", ""))[1]))
    assert widget.save_labels() is None                               # (the dialog cancelled)
    assert proposed == ["slide_labels.zarr"], proposed
    other, painted = _debris_stroke(first)
    viewer, widget = _later_napari_elsewhere(qtbot, viewer, monkeypatch, tmp_path, make_napari_viewer)
    [widget.image.value] = viewer.open(address, plugin=remote_reader)
    run_and_wait(qtbot, widget)
    assert "left when napari closed, taught this run" in widget.status.value, widget.status.value
    result = np.asarray(viewer.layers["slide classes"].data[...])
    assert np.all(result[painted] == 1) and np.mean(result[other] == 1) > 0.9
    qtbot.waitUntil(lambda: not store.exists(), timeout=10_000)


def test_corrections_on_a_remote_store_s_result_do_not_teach_once_it_was_written_again(
        qtbot, widget, tmp_path, monkeypatch, make_napari_viewer, served, remote_reader):
    """A remote store's result left when napari closed, with a stroke on it; the store is then written again at the
    same address (other pixels, the same shape: a web server tells no time of it): the next run on that address is
    not taught by the stroke, and says so; the stale result goes all the same."""
    import zarr

    import napari_clearclip.gui.widget as widget_module
    import napari_clearclip.tiled_edits as tiled_edits

    pytest.importorskip("aiohttp")
    monkeypatch.setattr(widget_module, "TILED_PIXELS", 100 * 100)
    stored = zarr.create_array(str(tmp_path / "slide.zarr"), shape=(192, 192, 3), chunks=(96, 96, 3), dtype=np.uint8)
    stored[:] = squares(7)
    address = served(tmp_path) + "/slide.zarr"
    viewer = widget._viewer
    [image] = viewer.open(address, plugin=remote_reader)
    first, store = _tiled_result(qtbot, widget, image)
    other, painted = _debris_stroke(first)
    _napari_closed(qtbot, viewer)
    assert store.exists()

    rewritten = squares(7)
    rewritten[24:72, 24:72] = (215, 35, 35)                           # the painted square red now
    stored[:] = rewritten
    monkeypatch.setattr(tiled_edits, "SESSION", "a later napari")
    viewer, widget = _new_napari(make_napari_viewer, "debris\nred\nbackground")
    [widget.image.value] = viewer.open(address, plugin=remote_reader)
    run_and_wait(qtbot, widget)
    status = widget.status.value
    assert "was made before its file was written again" in status and "taught this run" not in status, status
    result = np.asarray(viewer.layers["slide classes"].data[...])
    assert np.mean(result[other] == 1) < 0.5 and np.mean(result[painted] == 1) < 0.5   # no debris taught, nor kept
    qtbot.waitUntil(lambda: not store.exists(), timeout=10_000)       # the stale result goes


@pytest.mark.parametrize("read_by", ["zarr", "dask", "zarr over HTTP", "dask over HTTP"])
def test_a_zarr_store_given_to_napari_in_its_console_is_its_result_s_file(qtbot, widget, tmp_path, monkeypatch,
                                                                          make_napari_viewer, read_by, served):
    """A zarr array opened by a script or in napari's console (no file that napari knows of), by zarr or by
    ``dask.array.from_zarr``, is read from a store on disk or on a web server: that store is the image's file, so
    that corrections on its result, left when napari closed, teach the next run on that store, as for a store opened
    in napari; a remote store is known by its address, whichever folder napari was started from."""
    import dask.array as da
    import zarr

    remote = read_by.endswith("over HTTP")
    if remote:
        pytest.importorskip("aiohttp")
    where = (served(tmp_path) + "/slide.zarr") if remote else str(tmp_path / "slide.zarr")

    def opened():
        return zarr.open_array(where, mode="r") if read_by.startswith("zarr") else da.from_zarr(where)

    import napari_clearclip.gui.widget as widget_module
    import napari_clearclip.tiled_edits as tiled_edits

    monkeypatch.setattr(widget_module, "TILED_PIXELS", 100 * 100)
    stored = zarr.create_array(str(tmp_path / "slide.zarr"), shape=(192, 192, 3), chunks=(96, 96, 3), dtype=np.uint8)
    stored[:] = squares(7)
    viewer = widget._viewer
    image = viewer.add_image(opened(), name="slide", rgb=True)
    first, store = _tiled_result(qtbot, widget, image)
    assert tiled_edits.result_record(store)["source"] == (where if remote else str(Path(where).resolve()))
    other, painted = _debris_stroke(first)
    viewer, widget = _later_napari_elsewhere(qtbot, viewer, monkeypatch, tmp_path, make_napari_viewer)
    widget.image.value = viewer.add_image(opened(), name="again", rgb=True)
    run_and_wait(qtbot, widget)
    assert "left when napari closed, taught this run" in widget.status.value, widget.status.value
    result = np.asarray(viewer.layers["again classes"].data[...])
    assert np.all(result[painted] == 1) and np.mean(result[other] == 1) > 0.9
    qtbot.waitUntil(lambda: not store.exists(), timeout=10_000)


def test_corrections_on_one_image_of_a_store_do_not_teach_another_image_of_it(qtbot, widget, tmp_path, monkeypatch,
                                                                             make_napari_viewer):
    """Two images of one zarr store (a collection's series, as a reader plugin opens them at the store's root) share
    its location as their file: corrections on the first one's result, left when napari closed, teach a later run on
    the first image, not on the second (of the same size: once, they did), and that run leaves them in place."""
    import dask.array as da

    import napari_clearclip.gui.widget as widget_module
    import napari_clearclip.tiled_edits as tiled_edits
    from napari_clearclip.batch.labels_reading import read_labels_output

    monkeypatch.setattr(widget_module, "TILED_PIXELS", 100 * 100)
    _two_images_store(tmp_path / "scan.zarr")
    viewer = widget._viewer
    first, store = _tiled_result(qtbot, widget, viewer.add_image(da.from_zarr(str(tmp_path / "scan.zarr"),
                                                                              component="0"), name="s0", rgb=True))
    assert tiled_edits.result_record(store)["array"] == "0"
    other, painted = _debris_stroke(first)
    widget.save_labels(tmp_path / "s0")                               # saved, they say which image of the store
    qtbot.waitUntil(lambda: "Saved" in widget.status.value, timeout=30_000)
    assert read_labels_output(tmp_path / "s0_labels.zarr").record.get("array") == "0"
    _napari_closed(qtbot, viewer)
    monkeypatch.setattr(tiled_edits, "SESSION", "a later napari")

    viewer, widget = _new_napari(make_napari_viewer, "debris\nred\nbackground")
    widget.image.value = viewer.add_image(da.from_zarr(str(tmp_path / "scan.zarr"), component="1"), name="s1",
                                          rgb=True)
    run_and_wait(qtbot, widget)
    assert "taught this run" not in widget.status.value, widget.status.value
    assert np.mean(np.asarray(viewer.layers["s1 classes"].data[...])[painted] == 1) < 0.5   # no debris taught
    assert store.exists()                                             # not that image's result: kept for it
    widget.image.value = viewer.add_image(da.from_zarr(str(tmp_path / "scan.zarr"), component="0"), name="s0 again",
                                          rgb=True)
    run_and_wait(qtbot, widget)
    assert "left when napari closed, taught this run" in widget.status.value, widget.status.value
    result = np.asarray(viewer.layers["s0 again classes"].data[...])
    assert np.all(result[painted] == 1) and np.mean(result[other] == 1) > 0.9


def test_labels_the_command_wrote_for_a_collection_teach_runs_on_its_first_image_only(qtbot, widget, tmp_path,
                                                                                      monkeypatch, capsys):
    """The command segments a bioformats2raw collection's first image; its labels, opened for painting (too large to
    hold: a working copy), record where that image lies in the store, so their strokes teach a run on that image and
    not one on the collection's second image of the same size (both share the store's location)."""
    import dask.array as da
    import zarr

    import napari_clearclip.batch.labels_reading as labels_reading
    import napari_clearclip.gui.widget as widget_module
    from napari_clearclip.batch.cli import main

    monkeypatch.setattr(labels_reading, "IN_MEMORY_PIXELS", 100 * 100)
    monkeypatch.setattr(widget_module, "TILED_PIXELS", 100 * 100)
    root = zarr.open_group(str(tmp_path / "scan.zarr"), mode="w")
    root.attrs["bioformats2raw.layout"] = 3
    second = squares(8)
    second[24:72, 24:72] = (215, 35, 35)                              # where the stroke goes: red in the second
    for name, picture in (("0", squares(7)), ("1", second)):
        series = root.create_group(name)
        series.attrs["multiscales"] = [{"version": "0.4", "axes": ["y", "x", "c"], "datasets": [{"path": "0"}]}]
        series.create_array("0", shape=picture.shape, chunks=(96, 96, 3), dtype=np.uint8)[:] = picture
    assert main([str(tmp_path / "scan.zarr"), "--out", str(tmp_path / "out"), "--classes", "debris; red; background",
                 "--model", "synthetic-tiny", "--device", "cpu", "--format", "zarr"]) == 0
    capsys.readouterr()
    viewer = widget._viewer
    [labels] = viewer.open(str(tmp_path / "out" / "scan_labels.zarr"), plugin="napari-clearclip")
    labels.brush_size = 9
    labels.paint((48, 48), 1)                                         # a debris stroke on the first image's labels
    painted = np.asarray(labels.data[...]) == 1
    widget.switch_to_demo_model()
    widget.classes.value = "debris\nred\nbackground"
    widget.resize.value = False
    for component, name in (("1/0", "second"), ("0/0", "first")):
        widget.image.value = viewer.add_image(da.from_zarr(str(tmp_path / "scan.zarr"), component=component),
                                              name=name, rgb=True)
        run_and_wait(qtbot, widget)
        result = np.asarray(viewer.layers[f"{name} classes"].data[...])
        if name == "second":   # not its labels: nothing painted there teaches
            assert "taught" not in widget.status.value, widget.status.value
            assert np.mean(result[painted] == 1) < 0.5
        else:
            assert "taught" in widget.status.value, widget.status.value
            assert np.mean(result[painted] == 1) > 0.9


@pytest.mark.parametrize("saved_with", ["Save labels...", "File > Save Selected Layers..."])
def test_labels_saved_from_napari_teach_runs_on_their_own_image_of_a_store_only(qtbot, widget, tmp_path, saved_with):
    """Labels of one image of a zarr store, corrected and saved from napari, record where that image lies in the
    store: opened again, their strokes teach a run on that image and not one on another image of the store of the
    same size (both share the store's location as their file)."""
    import dask.array as da
    import tifffile

    from napari_clearclip.batch.labels_reading import read_labels_output

    _two_images_store(tmp_path / "scan.zarr")
    viewer = widget._viewer
    result, other, painted = _stroke_on_a_result(qtbot, widget, da.from_zarr(str(tmp_path / "scan.zarr"),
                                                                             component="0"), "s0")
    if saved_with == "Save labels...":
        widget.save_labels(tmp_path / "s0.tif")
        qtbot.waitUntil(lambda: "Saved" in widget.status.value, timeout=30_000)
    else:
        viewer.layers.selection = {result}
        viewer.layers.save(str(tmp_path / "s0.tif"), selected=True)
    saved = tmp_path / "s0_labels.tif"
    np.testing.assert_array_equal(tifffile.imread(saved), np.asarray(result.data))
    assert read_labels_output(saved).record.get("array") == "0"

    viewer.layers.clear()                                             # a later session: the labels opened again
    [labels] = viewer.open(str(saved), plugin="napari-clearclip")
    for component, name in (("1", "second"), ("0", "first")):
        widget.image.value = viewer.add_image(da.from_zarr(str(tmp_path / "scan.zarr"), component=component),
                                              name=name, rgb=True)
        run_and_wait(qtbot, widget)
        if name == "second":   # not its labels: nothing painted there teaches, and a layer of its own is added
            assert "taught" not in widget.status.value, widget.status.value
            assert np.mean(np.asarray(viewer.layers["second classes"].data)[painted] == 1) < 0.5
        else:                  # its labels: the stroke is kept and teaches the other blue square
            assert "first classes" not in viewer.layers
            assert np.all(np.asarray(labels.data)[painted] == 1)
            assert np.mean(np.asarray(labels.data)[other] == 1) > 0.9


@pytest.mark.parametrize("store", ["two images of one size", "one image and its smaller level"])
def test_labels_saved_by_an_earlier_version_of_a_store_of_two_images_alike_are_left_as_they_are(qtbot, widget,
                                                                                              tmp_path, store):
    """Labels saved from napari by an earlier version record a zarr store as their image, not which image of it. In
    a store of two images of their size they could label either: a run on either adds a layer of its own, leaves them
    as saved, learns nothing from them, and says why. Where the store holds one image of their size (beside a smaller
    level), they are that image's, as before: the run updates them and their stroke teaches."""
    import dask.array as da
    import zarr

    from napari_clearclip.batch.files import write_labels_file

    if store == "two images of one size":
        _two_images_store(tmp_path / "scan.zarr")
    else:
        root = zarr.open_group(str(tmp_path / "scan.zarr"), mode="w")
        root.create_array("0", shape=(192, 192, 3), chunks=(96, 96, 3), dtype=np.uint8)[:] = squares(7)
        root.create_array("1", shape=(96, 96, 3), chunks=(96, 96, 3), dtype=np.uint8)[:] = squares(7)[::2, ::2]
    viewer = widget._viewer
    result, other, painted = _stroke_on_a_result(qtbot, widget, da.from_zarr(str(tmp_path / "scan.zarr"),
                                                                             component="0"), "s0")
    saved = np.array(result.data)
    [path, _] = write_labels_file(tmp_path / "s0", saved, ["debris", "red", "background"],   # as saved before
                                  source=str(tmp_path / "scan.zarr"), edited=painted)

    viewer.layers.clear()                                             # a later session: the labels opened again
    [labels] = viewer.open(str(path), plugin="napari-clearclip")
    components = (("1", "second"), ("0", "first")) if store == "two images of one size" else (("0", "first"),)
    for component, name in components:
        widget.image.value = viewer.add_image(da.from_zarr(str(tmp_path / "scan.zarr"), component=component),
                                              name=name, rgb=True)
        run_and_wait(qtbot, widget)
        if store == "two images of one size":
            assert f"{name} classes" in viewer.layers
            np.testing.assert_array_equal(np.asarray(labels.data), saved)
            assert "taught this run" not in widget.status.value
            assert f"'{labels.name}' does not tell which image of scan.zarr it labels" in widget.status.value
        else:
            assert "first classes" not in viewer.layers, widget.status.value
            assert "does not tell" not in widget.status.value
            assert np.all(np.asarray(labels.data)[painted] == 1)
            assert np.mean(np.asarray(labels.data)[other] == 1) > 0.9


@pytest.mark.parametrize("given_as", ["dask", "pyramid"])
def test_corrections_on_a_tiff_read_lazily_teach_a_later_napari_on_that_series_only(qtbot, widget, tmp_path,
                                                                                     monkeypatch, make_napari_viewer,
                                                                                     given_as):
    """A large TIFF read lazily through tifffile as a zarr store (``tifffile.imread(path, aszarr=True)`` in napari's
    console: through dask, or a pyramid's levels as the Large images page shows) is known by its file: corrections
    on its result, left when napari closed, teach a later napari's run on it, started in another folder; the file's
    other series, of the same size, is not taught by them."""
    import dask.array as da
    import tifffile
    import zarr

    import napari_clearclip.gui.widget as widget_module
    import napari_clearclip.tiled_edits as tiled_edits

    monkeypatch.setattr(widget_module, "TILED_PIXELS", 100 * 100)
    second = squares(8)
    second[24:72, 24:72] = (215, 35, 35)                              # where the stroke goes: red in the second
    path = tmp_path / "scan.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tiff:
        for picture in (squares(7), second):
            if given_as == "pyramid":
                tiff.write(picture, tile=(64, 64), photometric="rgb", subifds=1)
                tiff.write(picture[::2, ::2].copy(), tile=(64, 64), photometric="rgb", subfiletype=1)
            else:
                tiff.write(picture, tile=(64, 64), photometric="rgb")

    def lazily(series: int):
        levels = zarr.open(tifffile.imread(path, aszarr=True, series=series), mode="r")
        if given_as == "pyramid":   # as the Large images page opens one
            return [levels[key] for key in sorted(levels, key=int)]
        return da.from_zarr(levels)

    viewer = widget._viewer
    first, store = _tiled_result(qtbot, widget, viewer.add_image(lazily(0), name="s0", rgb=True))
    assert "not in its zarr store" not in widget.status.value, widget.status.value   # a TIFF's tiles are there
    assert tiled_edits.result_record(store)["source"] == str(path.resolve())
    other, painted = _debris_stroke(first)
    viewer, widget = _later_napari_elsewhere(qtbot, viewer, monkeypatch, tmp_path, make_napari_viewer)
    widget.image.value = viewer.add_image(lazily(1), name="s1", rgb=True)
    run_and_wait(qtbot, widget)
    assert "taught this run" not in widget.status.value, widget.status.value
    assert np.mean(np.asarray(viewer.layers["s1 classes"].data[...])[painted] == 1) < 0.5   # no debris taught
    assert store.exists()                                             # not that series' result: kept for it
    widget.image.value = viewer.add_image(lazily(0), name="s0 again", rgb=True)
    run_and_wait(qtbot, widget)
    assert "left when napari closed, taught this run" in widget.status.value, widget.status.value
    result = np.asarray(viewer.layers["s0 again classes"].data[...])
    assert np.all(result[painted] == 1) and np.mean(result[other] == 1) > 0.9


def test_a_tiff_of_several_series_opened_by_napari_is_its_first_series(qtbot, widget, tmp_path):
    """napari's own reader opens a TIFF's first series whole: labels of the file's second series (read lazily,
    corrected and saved) are not taken for its result, while its own labels, saved now or by earlier versions (which
    record no series: those of its first, which the command line segments), are, and teach its run."""
    import dask.array as da
    import tifffile
    import zarr

    from napari_clearclip.batch.files import write_labels_file
    from napari_clearclip.batch.labels_reading import read_labels_output

    second = squares(8)
    second[24:72, 24:72] = (215, 35, 35)
    path = tmp_path / "scan.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tiff:
        for picture in (squares(7), second):
            tiff.write(picture, tile=(64, 64), photometric="rgb")
    viewer = widget._viewer
    series = da.from_zarr(zarr.open(tifffile.imread(path, aszarr=True, series=1), mode="r"))
    result, other, painted = _stroke_on_a_result(qtbot, widget, series, "s1")
    widget.save_labels(tmp_path / "s1.tif")
    qtbot.waitUntil(lambda: "Saved" in widget.status.value, timeout=30_000)
    assert read_labels_output(tmp_path / "s1_labels.tif").record.get("array") == "series 1"
    saved = np.array(result.data)
    write_labels_file(tmp_path / "earlier", saved, ["debris", "red", "background"], source=str(path), edited=painted)

    for labels_file, of_first in (("s1_labels.tif", False), ("earlier_labels.tif", True)):
        viewer.layers.clear()
        [labels] = viewer.open(str(tmp_path / labels_file), plugin="napari-clearclip")
        [image] = viewer.open(str(path), plugin="napari")
        assert image.source.reader_plugin == "napari"
        widget.image.value = image
        run_and_wait(qtbot, widget)
        if of_first:   # its labels: updated, the stroke kept and teaching the other blue square
            assert f"{image.name} classes" not in viewer.layers, widget.status.value
            assert np.all(np.asarray(labels.data)[painted] == 1)
            assert np.mean(np.asarray(labels.data)[other] == 1) > 0.9
        else:          # the second series' labels: left as saved, a layer of its own added, nothing taught
            np.testing.assert_array_equal(np.asarray(labels.data), saved)
            assert "taught this run" not in widget.status.value, widget.status.value
            assert np.mean(np.asarray(viewer.layers[f"{image.name} classes"].data)[painted] == 1) < 0.5
    widget.save_labels(tmp_path / "first.tif")                        # saved now, they say which series
    qtbot.waitUntil(lambda: "Saved" in widget.status.value, timeout=30_000)
    assert read_labels_output(tmp_path / "first_labels.tif").record.get("array") == "series 0"


@pytest.fixture
def scenes_reader(tmp_path):
    """A reader plugin that gives two scenes of one file (``plate.scenes``) as two image layers of one size, as
    bioio's or aicsimageio's readers give a multi-position CZI, LIF or ND2 file: "A1" (:func:`squares`) and "A2",
    red where :func:`_debris_stroke` paints. Yields a function opening them in a viewer, in memory or lazily (as
    dask arrays): [A1, A2]."""
    from npe2 import DynamicPlugin

    second = squares(8)
    second[24:72, 24:72] = (215, 35, 35)
    path = tmp_path / "plate.scenes"
    path.write_bytes(b"two scenes")

    lazily = []

    with DynamicPlugin("scenes-reader") as plugin:
        @plugin.contribute.reader(filename_patterns=["*.scenes"])
        def get_reader(path):
            import dask.array as da

            read = (lambda picture: da.from_array(picture, chunks=(96, 96, 3))) if lazily else np.copy
            return lambda path: [(read(squares(7)), {"name": "A1", "rgb": True}, "image"),
                                 (read(second), {"name": "A2", "rgb": True}, "image")]

        def open_scenes(viewer, lazy: bool = False):
            lazily[:] = [True] if lazy else []
            return viewer.open(str(path), plugin="scenes-reader")

        yield open_scenes


@pytest.mark.parametrize("kept_as", ["saved labels", "a result left when napari closed"])
def test_corrections_on_one_scene_of_a_file_do_not_teach_another_scene_of_it(qtbot, widget, tmp_path, monkeypatch,
                                                                             make_napari_viewer, scenes_reader,
                                                                             kept_as):
    """Two scenes a reader plugin gives from one file share it as their location: labels of one, saved and opened
    again, or its result segmented tile by tile and left when napari closed, are not taken for the other's (a layer
    of its own is added, the labels are left as saved, nothing painted teaches it); on their own scene they are its
    result and their stroke teaches."""
    import napari_clearclip.gui.widget as widget_module
    from napari_clearclip.batch.labels_reading import read_labels_output
    from napari_clearclip.tiled_edits import pixels_sample

    viewer = widget._viewer
    a1, _ = scenes_reader(viewer)
    assert a1.source.path is not None
    if kept_as == "saved labels":
        result, other, painted = _stroke_on_a_result(qtbot, widget, a1)
        widget.save_labels(tmp_path / "a1.tif")
        qtbot.waitUntil(lambda: "Saved" in widget.status.value, timeout=30_000)
        assert read_labels_output(tmp_path / "a1_labels.tif").record.get("image_sample") == pixels_sample(a1.data)
        saved = np.array(result.data)
        viewer.layers.clear()                                         # a later session: the labels opened again
        [labels] = viewer.open(str(tmp_path / "a1_labels.tif"), plugin="napari-clearclip")
    else:
        monkeypatch.setattr(widget_module, "TILED_PIXELS", 100 * 100)
        first, store = _tiled_result(qtbot, widget, a1)
        other, painted = _debris_stroke(first)
        widget.save_labels(tmp_path / "a1")                           # saved tile by tile, they record it too
        qtbot.waitUntil(lambda: "Saved" in widget.status.value, timeout=30_000)
        assert read_labels_output(tmp_path / "a1_labels.zarr").record.get("image_sample") == pixels_sample(a1.data)
        viewer, widget = _later_napari_elsewhere(qtbot, viewer, monkeypatch, tmp_path, make_napari_viewer)
    for scene in ("A2", "A1"):
        layers = scenes_reader(viewer)
        image = layers[0] if scene == "A1" else layers[1]
        widget.image.value = image
        run_and_wait(qtbot, widget)
        added = viewer.layers[f"{image.name} classes"] if f"{image.name} classes" in viewer.layers else None
        if scene == "A2":   # another scene: a layer of its own, nothing taught
            assert added is not None and "taught this run" not in widget.status.value, widget.status.value
            assert np.mean(np.asarray(added.data[...])[painted] == 1) < 0.5
            if kept_as == "saved labels":
                np.testing.assert_array_equal(np.asarray(labels.data), saved)
            else:
                assert store.exists()                                 # not that scene's result: kept for it
        elif kept_as == "saved labels":   # its own labels: updated, the stroke kept and teaching
            assert added is None, widget.status.value
            assert np.all(np.asarray(labels.data)[painted] == 1)
            assert np.mean(np.asarray(labels.data)[other] == 1) > 0.9
        else:
            assert "left when napari closed, taught this run" in widget.status.value, widget.status.value
            assert np.all(np.asarray(added.data[...])[painted] == 1)
            assert np.mean(np.asarray(added.data[...])[other] == 1) > 0.9


@pytest.mark.parametrize("saved_from", ["scenes read lazily", "an earlier version"])
def test_labels_that_cannot_tell_which_scene_of_a_file_they_label_are_left_as_saved_while_other_scenes_are_open(
        qtbot, widget, tmp_path, scenes_reader, saved_from):
    """Labels of a scene of a file that record no digest of its pixels (of a scene read lazily, which is not read for
    it, or saved by an earlier version) could label any scene of the file of their size: while napari shows
    other scenes of it, a run on either adds a layer of its own, leaves them as saved, learns nothing from them and
    says why; with the other scene closed they are the open scene's, as before, and their stroke teaches."""
    from napari_clearclip.batch.files import write_labels_file
    from napari_clearclip.batch.labels_reading import read_labels_output

    viewer = widget._viewer
    a1, _ = scenes_reader(viewer, lazy=saved_from == "scenes read lazily")
    result, other, painted = _stroke_on_a_result(qtbot, widget, a1)
    saved = np.array(result.data)
    if saved_from == "scenes read lazily":
        widget.save_labels(tmp_path / "a1.tif")
        qtbot.waitUntil(lambda: "Saved" in widget.status.value, timeout=30_000)
    else:   # as earlier versions saved them: the file alone
        write_labels_file(tmp_path / "a1", saved, ["debris", "red", "background"], source=a1.source.path,
                          edited=painted)
    viewer.layers.clear()
    [labels] = viewer.open(str(tmp_path / "a1_labels.tif"), plugin="napari-clearclip")
    assert read_labels_output(tmp_path / "a1_labels.tif").record.get("image_sample") is None   # (no digest)
    scenes = scenes_reader(viewer, lazy=saved_from == "scenes read lazily")
    for image in (scenes[1], scenes[0]):
        widget.image.value = image
        run_and_wait(qtbot, widget)
        assert f"{image.name} classes" in viewer.layers, widget.status.value
        assert f"'{labels.name}' does not tell which image of plate.scenes it labels" in widget.status.value
        np.testing.assert_array_equal(np.asarray(labels.data), saved)
    viewer.layers.remove(scenes[1])                                   # the other scene closed: A1's labels again
    viewer.layers.remove(f"{scenes[0].name} classes")
    widget.image.value = scenes[0]
    run_and_wait(qtbot, widget)
    assert f"{scenes[0].name} classes" not in viewer.layers and "does not tell" not in widget.status.value
    assert np.all(np.asarray(labels.data)[painted] == 1)
    assert np.mean(np.asarray(labels.data)[other] == 1) > 0.9


def test_labels_the_command_wrote_for_a_tiff_of_several_series_teach_runs_on_its_first_series_only(qtbot, widget,
                                                                                                   tmp_path, capsys):
    """The command segments a TIFF's first series; its labels record that, so, opened for painting, their strokes
    teach a run on that series read lazily in napari's console, and not one on the file's second series of the same
    size (both are known by the file)."""
    import dask.array as da
    import tifffile
    import zarr

    from napari_clearclip.batch.cli import main
    from napari_clearclip.batch.labels_reading import read_labels_output

    second = squares(8)
    second[24:72, 24:72] = (215, 35, 35)                              # where the stroke goes: red in the second
    path = tmp_path / "scan.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tiff:
        for picture in (squares(7), second):
            tiff.write(picture, tile=(64, 64), photometric="rgb")
    assert main([str(path), "--out", str(tmp_path / "out"), "--classes", "debris; red; background",
                 "--model", "synthetic-tiny", "--device", "cpu"]) == 0
    capsys.readouterr()
    [saved] = (tmp_path / "out").glob("*_labels.tif")
    assert read_labels_output(saved).record.get("array") == "series 0"
    viewer = widget._viewer
    [labels] = viewer.open(str(saved), plugin="napari-clearclip")
    other, painted = _debris_stroke(labels)
    widget.switch_to_demo_model()
    widget.classes.value = "debris\nred\nbackground"
    widget.resize.value = False
    for series, name in ((1, "second"), (0, "first")):
        lazily = da.from_zarr(zarr.open(tifffile.imread(path, aszarr=True, series=series), mode="r"))
        widget.image.value = viewer.add_image(lazily, name=name, rgb=True)
        run_and_wait(qtbot, widget)
        if name == "second":   # not its labels: a layer of its own, nothing painted there taught
            assert np.mean(np.asarray(viewer.layers["second classes"].data)[painted] == 1) < 0.5
        else:                  # its labels: the stroke is kept and teaches the other blue square
            assert "first classes" not in viewer.layers, widget.status.value
            assert np.all(np.asarray(labels.data)[painted] == 1)
            assert np.mean(np.asarray(labels.data)[other] == 1) > 0.9


def test_a_result_segmented_tile_by_tile_saved_from_the_file_menu_records_its_image(qtbot, widget, tmp_path,
                                                                                   monkeypatch):
    """A result segmented tile by tile, small enough to save as one TIFF from File > Save Selected Layers...,
    records its image (the store and where the image lies in it) and the pixels painted by hand, as Save labels...
    does: opened again, it is that image's labels."""
    import dask.array as da

    import napari_clearclip.gui.widget as widget_module
    from napari_clearclip.batch.labels_reading import read_labels_output

    monkeypatch.setattr(widget_module, "TILED_PIXELS", 100 * 100)
    _two_images_store(tmp_path / "scan.zarr")
    viewer = widget._viewer
    result, _ = _tiled_result(qtbot, widget, viewer.add_image(da.from_zarr(str(tmp_path / "scan.zarr"),
                                                                           component="1"), name="s1", rgb=True))
    _, painted = _debris_stroke(result)
    viewer.layers.selection = {result}
    viewer.layers.save(str(tmp_path / "s1.tif"), selected=True)
    saved = read_labels_output(tmp_path / "s1_labels.tif")
    np.testing.assert_array_equal(saved.data, np.asarray(result.data[...]))
    assert saved.record["source"] == str((tmp_path / "scan.zarr").resolve()) and saved.record["array"] == "1"
    assert saved.edited is not None and np.all(saved.edited[painted])
