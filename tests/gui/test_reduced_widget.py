"""With Resize on, an image too large to hold is segmented at a pyramid level (or a reduced copy) that holds what the
model sees; its labels sit on the image at that scale, and strokes on them teach as on any result."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gui_helpers import run_and_wait


def mean_pooled(image: np.ndarray, factor: int) -> np.ndarray:
    """Means of factor x factor blocks of an RGB uint8 image (partial blocks over the pixels they have)."""
    height, width = image.shape[:2]
    padded = np.pad(image.astype(float), ((0, -height % factor), (0, -width % factor), (0, 0)),
                    constant_values=np.nan)
    blocks = padded.reshape(padded.shape[0] // factor, factor, padded.shape[1] // factor, factor, 3)
    return np.rint(np.nanmean(blocks, axis=(1, 3))).astype(np.uint8)


class CountingArray:
    """An RGB array that counts the pixels read from it."""

    def __init__(self, array):
        self.array, self.shape, self.dtype, self.ndim, self.pixels = array, array.shape, array.dtype, array.ndim, 0

    def __getitem__(self, index):
        part = self.array[index]
        self.pixels += part.size // 3
        return part


@pytest.fixture
def large_from(monkeypatch, widget):
    """Images count as too large to hold from ``pixels`` on, and are segmented at most ``side`` pixels a side (the
    widget's "Large images at")."""
    import napari_clearclip.gui.widget as widget_module

    def limit(pixels, side):
        monkeypatch.setattr(widget_module, "TILED_PIXELS", pixels)
        widget.large_side.value = side
    return limit


def test_a_pyramid_too_large_to_hold_is_segmented_at_its_finest_level_that_fits_and_its_labels_teach(
        qtbot, widget, large_from):
    import dask.array as da
    from images import smooth_image

    large_from(200 * 200, 200)
    viewer = widget._viewer
    image = smooth_image(400, 360, seed=4)
    levels = [image, mean_pooled(image, 2), mean_pooled(image, 4)]
    widget.classes.value = "sky\ngrass"
    widget.image.value = viewer.add_image(levels[1], name="level")   # the level, in memory: an ordinary run
    run_and_wait(qtbot, widget)
    expected = viewer.layers["level classes"].data.copy()
    widget.image.value = viewer.add_image([da.from_array(level, chunks=(100, 100, 3)) for level in levels],
                                          multiscale=True, rgb=True, name="slide", translate=(4, -6),
                                          rotate=25, shear=[0.1])
    run_and_wait(qtbot, widget)
    status = widget.status.value
    assert "segmented at pyramid level 1 (200 x 180, 1/2 of full size)" in status, status
    assert "turn Resize off" in status and "raise Large images at (Advanced options)" in status
    layer = viewer.layers["slide classes"]
    np.testing.assert_array_equal(layer.data, expected)
    np.testing.assert_allclose(layer.scale, (2, 2))
    _centred_on_what_they_cover(layer, widget.image.value, 2)
    # a stroke on the labels teaches the next run on the same layer, which keeps it
    painted = layer.data.copy()
    painted[20:40, 20:60] = 2
    layer.data = painted
    layers = len(viewer.layers)
    run_and_wait(qtbot, widget)
    assert widget.status.value.startswith("Done"), widget.status.value
    assert len(viewer.layers) == layers                 # the same layer, updated in place
    assert (layer.data[20:40, 20:60] == 2).all()
    # a probability map sits where its labels do
    widget.probability_output.value = "winning class"
    run_and_wait(qtbot, widget)
    probability = viewer.layers["slide probability"]
    assert probability.data.shape == (200, 180)
    np.testing.assert_allclose(probability.scale, (2, 2))
    _centred_on_what_they_cover(probability, widget.image.value, 2)
    widget.probability_output.value = "none"
    # objects of the full-size image do not fit the level: said with why and what to do
    widget.objects.value = viewer.add_labels(np.zeros((400, 360), np.int32), name="cells")
    assert widget.run() is None
    status = widget.status.value
    assert "'cells' is (400, 360), but the labels of 'slide' are (200, 180)" in status, status
    assert "segmented at pyramid level 1" in status and "turn Resize off" in status


def test_large_images_at_sets_the_level_a_pyramid_is_segmented_at_and_each_level_gets_its_own_layer(
        qtbot, widget, large_from):
    import dask.array as da
    from images import smooth_image

    large_from(200 * 200, 200)
    viewer = widget._viewer
    image = smooth_image(400, 360, seed=5)
    levels = [image, mean_pooled(image, 2), mean_pooled(image, 4)]
    widget.classes.value = "sky\ngrass"
    expected = {}
    for number, level in enumerate(levels):
        widget.image.value = viewer.add_image(level, name=f"level {number}")
        run_and_wait(qtbot, widget)
        expected[number] = viewer.layers[f"level {number} classes"].data.copy()
    widget.image.value = viewer.add_image([da.from_array(level, chunks=(100, 100, 3)) for level in levels],
                                          multiscale=True, rgb=True, name="slide")
    widget.show_advanced.value = True
    shown = []
    for side, number, scale in ((200, 1, 2), (128, 2, 4), (400, 0, 1)):
        widget.large_side.value = side
        run_and_wait(qtbot, widget)
        status = widget.status.value
        assert ("too large" in status or "pyramid level" in status) == (number > 0), (side, status)
        layer = viewer.layers[-1]
        np.testing.assert_array_equal(layer.data, expected[number])
        np.testing.assert_allclose(layer.scale, (scale, scale))
        shown.append(layer)
    assert len({id(layer) for layer in shown}) == 3           # another level: a new layer, the others kept
    np.testing.assert_array_equal(shown[0].data, expected[1])
    # the setting applies to runs that resize, and is kept for the next session
    widget.resize.value = False
    assert not widget.large_side.enabled and not widget.short_side.enabled
    widget.resize.value = True
    assert widget.large_side.enabled
    assert widget.settings()["large_side"] == 400


def test_save_at_full_size_writes_the_edited_labels_of_a_reduced_image_at_its_full_size(qtbot, widget, large_from,
                                                                                        tmp_path, monkeypatch):
    import dask.array as da
    import zarr
    from images import smooth_image

    large_from(200 * 200, 150)
    viewer = widget._viewer
    image = smooth_image(420, 390, seed=7)
    widget.classes.value = "sky\ngrass"
    assert not widget.save_full_size_button.visible
    source = CountingArray(image)
    widget.image.value = viewer.add_image(da.from_array(source, chunks=(100, 100, 3)), rgb=True, name="slide")
    run_and_wait(qtbot, widget)
    layer = viewer.layers["slide classes"]
    assert layer.data.shape == (140, 130)                       # block means of 3 x 3, the last ones partial
    assert widget.save_full_size_button.visible
    painted = layer.data.copy()
    painted[10:30, 10:50] = 2                                   # an edit goes to full size too
    layer.data = painted
    read = source.pixels
    worker = widget.save_at_full_size(tmp_path / "slide_labels")
    qtbot.waitUntil(lambda: "Saved" in widget.status.value or "Could not" in widget.status.value, timeout=30_000)
    assert "at full size (420 x 390)" in widget.status.value, widget.status.value
    assert worker is not None and source.pixels == read           # nothing of the image is read for it
    saved = zarr.open_group(str(tmp_path / "slide_labels.zarr"), mode="r")["labels"][:]
    expected = np.repeat(np.repeat(painted, 3, axis=0), 3, axis=1)[:420, :390]   # the label over each pixel
    np.testing.assert_array_equal(saved, expected)
    assert widget.save_at_full_size(tmp_path / "slide_labels.zarr") is None      # never over a store
    assert "exists" in widget.status.value
    assert widget.save_at_full_size(tmp_path / ("x" * 250)) is None              # its .partial: too long a name
    assert "File name too long. Choose another name." in widget.status.value
    # a write that fails (a full disk) says so and leaves no partial store
    import napari_clearclip.reduced as reduced

    def failing(labels, shape, factors=None, out=None, rows_at_once=2048):
        Path(str(out) + ".partial").mkdir()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(reduced, "full_size_labels", failing)
    assert widget.save_at_full_size(tmp_path / "full_disk.zarr") is not None
    qtbot.waitUntil(lambda: "Could not save" in widget.status.value, timeout=30_000)
    assert "No space left on device" in widget.status.value
    assert sorted(p.name for p in tmp_path.iterdir() if "zarr" in p.name) == ["slide_labels.zarr"]
    widget.image.value = viewer.add_image(image[:100, :100], name="small")     # another image: nothing to save
    assert not widget.save_full_size_button.visible
    assert widget.save_at_full_size(tmp_path / "other.zarr") is None and not (tmp_path / "other.zarr").exists()
    widget.image.value = viewer.layers["slide"]
    assert widget.save_full_size_button.visible
    slide = viewer.layers["slide"]
    slide.name = "old slide"                      # renamed, the result is still its; another image of the old name
    widget.image.value = viewer.add_image(image[:100, :100], name="slide")      # has none
    assert not widget.save_full_size_button.visible
    widget.image.value = slide
    assert widget.save_full_size_button.visible
    viewer.layers.remove("slide classes")                                      # the result removed: nothing to save
    assert not widget.save_full_size_button.visible


def test_a_lazy_image_too_large_to_hold_is_segmented_from_a_copy_reduced_in_the_worker_and_kept(
        qtbot, widget, large_from):
    import dask.array as da
    from images import smooth_image

    large_from(100 * 100, 128)
    viewer = widget._viewer
    image = smooth_image(300, 260, seed=6)
    widget.classes.value = "sky\ngrass"
    widget.image.value = viewer.add_image(mean_pooled(image, 3), name="reduced")
    run_and_wait(qtbot, widget)
    expected = viewer.layers["reduced classes"].data.copy()
    source = CountingArray(image)
    widget.image.value = viewer.add_image(da.from_array(source, chunks=(100, 100, 3)), rgb=True, name="slide")
    layers = len(viewer.layers)
    worker = widget.run()                              # cancelled while the copy is read: nothing added
    worker.yielded.connect(lambda step: widget.cancel() if getattr(step, "stage", "") == "reading" else None)
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)
    assert widget.status.value.startswith("Cancelled"), widget.status.value
    assert len(viewer.layers) == layers
    run_and_wait(qtbot, widget)
    status = widget.status.value
    assert "segmented at a copy reduced by block means (100 x 87, 1/3 of full size)" in status, status
    layer = viewer.layers["slide classes"]
    np.testing.assert_array_equal(layer.data, expected)
    np.testing.assert_allclose(layer.scale, (3, 3))
    np.testing.assert_allclose(layer.translate, (1, 1))
    read = source.pixels
    widget.classes.value = "sky\ngrass\nwater"
    run_and_wait(qtbot, widget)                       # another run on the same image: the copy is kept
    assert widget.status.value.startswith("Done"), widget.status.value
    assert source.pixels == read
    assert viewer.layers["slide classes"].data.shape == (100, 87)


def test_a_zarr_image_whose_store_lacks_a_chunk_is_reduced_as_shown_and_the_status_says_so(
        qtbot, widget, large_from, tmp_path):
    import zarr
    from images import smooth_image

    large_from(100 * 100, 128)
    viewer = widget._viewer
    image = smooth_image(300, 260, seed=9)
    stored = zarr.create_array(str(tmp_path / "slide.zarr"), shape=image.shape, chunks=(100, 100, 3),
                               dtype=np.uint8, fill_value=0)
    stored[:] = image
    chunk = [path for path in (tmp_path / "slide.zarr").rglob("*") if path.is_file() and path.name == "0"
             and path.parent.name == "1" and path.parent.parent.name == "1"]
    assert len(chunk) == 1
    chunk[0].unlink()                                           # the chunk of rows and columns 100..199
    shown = image.copy()
    shown[100:200, 100:200] = 0
    widget.classes.value = "sky\ngrass"
    widget.image.value = viewer.add_image(mean_pooled(shown, 3), name="reduced")
    run_and_wait(qtbot, widget)
    expected = viewer.layers["reduced classes"].data.copy()
    widget.image.value = viewer.add_image(zarr.open_array(str(tmp_path / "slide.zarr"), mode="r"), rgb=True,
                                          name="slide")
    run_and_wait(qtbot, widget)
    status = widget.status.value
    assert "1 of the 9 chunks of the image are not in its zarr store" in status, status
    np.testing.assert_array_equal(viewer.layers["slide classes"].data, expected)


def test_an_image_in_memory_and_any_image_with_resize_off_are_not_reduced(qtbot, widget, large_from, monkeypatch,
                                                                          tmp_path):
    import dask.array as da
    from images import smooth_image

    large_from(100 * 100, 128)
    monkeypatch.setenv("NAPARI_CLEARCLIP_CACHE_DIR", str(tmp_path / "cache"))
    viewer = widget._viewer
    image = smooth_image(150, 140, seed=2)
    widget.classes.value = "sky\ngrass"
    widget.image.value = viewer.add_image(image, name="in memory")
    run_and_wait(qtbot, widget)
    assert viewer.layers["in memory classes"].data.shape == (150, 140)
    assert "too large" not in widget.status.value
    widget.image.value = viewer.add_image([da.from_array(image), da.from_array(mean_pooled(image, 2))],
                                          multiscale=True, rgb=True, name="slide")
    widget.resize.value = False
    widget.crop.value, widget.stride.value = 64, 32
    run_and_wait(qtbot, widget)
    assert "tile by tile" in widget.status.value, widget.status.value
    assert viewer.layers["slide classes"].data.shape == (150, 140)


def test_the_demo_models_note_comes_for_other_images_whether_in_memory_or_a_pyramid(qtbot, widget):
    """Whether an image is a demo scene is judged from an array in memory or a pyramid's small coarsest level
    (nothing large is read on the GUI thread): the note that the demo model knows only its shapes comes for
    other images only."""
    import dask.array as da
    from images import smooth_image

    from napari_clearclip.demo.scenes import make_scene

    viewer = widget._viewer
    widget.switch_to_demo_model()
    widget.classes.value = "red\ngreen\nblue\nyellow\nbackground"
    scene = make_scene(3, size=256, objects=(3, 4)).image
    other = smooth_image(256, 256, seed=1)
    for name, image, note in (("scene", scene, False), ("photo", other, True)):
        for pyramid in (False, True):
            data = [da.from_array(image), da.from_array(mean_pooled(image, 2))] if pyramid else image
            widget.image.value = viewer.add_image(data, multiscale=pyramid, rgb=True, name=f"{name}{pyramid}")
            run_and_wait(qtbot, widget)
            assert ("knows only coloured shapes" in widget.status.value) == note, (name, pyramid,
                                                                                   widget.status.value)


def _centred_on_what_they_cover(result, image, factor: int) -> None:
    """Each label pixel is drawn centred on the full-size pixels it covers, the image turned and sheared."""
    for i, j in ((0, 0), (3, 5), (99, 89)):
        covered = [image.data_to_world((i * factor + a, j * factor + b)) for a in range(factor) for b in range(factor)]
        np.testing.assert_allclose(result.data_to_world((i, j)), np.mean(covered, axis=0), atol=1e-9)
