"""Engine behaviour on a tiny random model: shapes, inputs, caches, cancellation, precision."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import napari_clearclip.segmenter as segmenter_module
from napari_clearclip import Segmenter
from napari_clearclip.prompts import encode_text_truncated
from napari_clearclip.windows import WindowGrid


def test_result_shapes_and_label_values(tiny_segmenter, rgb_image):
    result = tiny_segmenter.segment(rgb_image, ["sky", "horse, pony", "grass"])
    height, width = rgb_image.shape[:2]
    assert result.labels.shape == (height, width)
    assert result.probabilities.shape == (3, height, width)
    assert result.similarity.shape == (3, height, width)
    assert result.probabilities.dtype == np.float32 and result.similarity.dtype == np.float32
    assert result.class_names == ["sky", "horse", "grass"]
    assert set(np.unique(result.labels)) <= {1, 2, 3}
    # labels are the argmax of the class probabilities, numbered from 1
    np.testing.assert_array_equal(result.labels, result.probabilities.argmax(0) + 1)
    assert np.all(result.probabilities.sum(0) <= 1 + 1e-5)
    assert np.all((result.similarity >= -1) & (result.similarity <= 1))


def test_probability_threshold_sends_unsure_pixels_to_zero(tiny_segmenter, rgb_image):
    free = tiny_segmenter.segment(rgb_image, ["sky", "grass", "road"])
    threshold = float(np.median(free.probabilities.max(0)))
    result = tiny_segmenter.segment(rgb_image, ["sky", "grass", "road"], prob_threshold=threshold)
    best = result.probabilities.max(0)
    assert np.all(result.labels[best < threshold] == 0)
    assert np.all(result.labels[best >= threshold] == free.labels[best >= threshold])
    assert 0 < (result.labels == 0).mean() < 1
    table = result.class_table()
    assert table[0]["name"] == "unassigned" and sum(row["pixels"] for row in table) == result.labels.size


def test_grey_rgba_and_float_inputs(tiny_segmenter, rgb_image):
    grey = rgb_image[..., 0]
    as_rgb = np.repeat(grey[..., None], 3, axis=2)
    classes = ["cell", "nucleus"]
    reference = tiny_segmenter.segment(as_rgb, classes).probabilities
    np.testing.assert_allclose(tiny_segmenter.segment(grey, classes).probabilities, reference, atol=1e-6)
    rgba = np.concatenate([rgb_image, np.full(rgb_image.shape[:2] + (1,), 7, np.uint8)], axis=2)
    np.testing.assert_allclose(tiny_segmenter.segment(rgba, classes).probabilities,
                               tiny_segmenter.segment(rgb_image, classes).probabilities, atol=1e-6)
    # float and uint16 images scaled by contrast limits land on the same intensities as uint8
    as_float = rgb_image.astype(np.float32) / 255.0
    as_u16 = rgb_image.astype(np.uint16) * 257
    expected = tiny_segmenter.segment(rgb_image, classes, short_side=None).probabilities
    np.testing.assert_allclose(tiny_segmenter.segment(as_float, classes, short_side=None, contrast_limits=(0, 1)).probabilities,
                               expected, atol=1e-5)
    np.testing.assert_allclose(tiny_segmenter.segment(as_u16, classes, short_side=None, contrast_limits=(0, 65535)).probabilities,
                               expected, atol=1e-5)
    # without limits a float image is scaled by its own range
    stretched = (rgb_image.astype(np.float64) - rgb_image.min()) / (rgb_image.max() - rgb_image.min()) * 1000 - 3
    np.testing.assert_allclose(tiny_segmenter.segment(stretched, classes, short_side=None).probabilities,
                               tiny_segmenter.segment(rgb_image, classes, short_side=None,
                                                      contrast_limits=(rgb_image.min(), rgb_image.max())).probabilities,
                               atol=1e-5)


def whole_image_resized(array, size, contrast_limits=None):
    """The plain way: the whole image to float 0..255 (its own range without limits), then one resize."""
    colour = (array[..., :3] if array.ndim == 3 else np.repeat(array[..., None], 3, axis=2)).astype(np.float64)
    if array.dtype == np.uint8 and contrast_limits in (None, (0.0, 255.0)):
        planar = torch.from_numpy(colour.astype(np.float32)).permute(2, 0, 1).contiguous()
        return F.interpolate(planar[None], size=size, mode="bilinear", align_corners=False)[0].round().clamp(0, 255)
    low, high = contrast_limits if contrast_limits is not None else (colour.min(), colour.max())
    if high <= low:  # a constant image without limits: all dark
        scaled = np.zeros(colour.shape, np.float32)
    else:
        scaled = np.clip((colour.astype(np.float32) - np.float32(low)) * np.float32(255.0 / (high - low)), 0, 255)
    planar = torch.from_numpy(scaled).permute(2, 0, 1).contiguous()
    return F.interpolate(planar[None], size=size, mode="bilinear", align_corners=False)[0]


def test_a_large_image_is_resized_bit_for_bit_as_the_whole_float_image_would_be():
    """Only the rows the resize reads are converted to float; the working-size image is the very same."""
    from napari_clearclip.image import prepare, resized_size, rows_read_by_resize

    rng = np.random.default_rng(7)
    sparse = 0
    for case in range(50):
        height, width = (int(v) for v in rng.integers(40, 1200, 2))
        kind = case % 5
        if kind == 4:  # constant: no range of its own
            array = np.full((height, width), 700, dtype=np.uint16 if case % 2 else np.float32)
        elif kind == 0:
            array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        elif kind == 1:
            array = rng.integers(0, 4096, (height, width), dtype=np.uint16)
        elif kind == 2:
            array = rng.normal(size=(height, width, 4)).astype(np.float32)
        else:
            array = rng.integers(0, 256, (height, width), dtype=np.uint8)
        limits = None if case % 3 or kind == 4 else (float(array.min()) + 1.0, float(array.max()) - 1.0)
        short_side = int(rng.choice([32, 64, 160, 448]))
        size = resized_size(height, width, short_side)
        if size == (height, width):
            continue
        sparse += rows_read_by_resize(height, size[0]) is not None
        got = prepare(array, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), short_side, limits)
        assert torch.equal(got, whole_image_resized(array, size, limits)), (array.shape, array.dtype, short_side)
    assert sparse >= 10  # most cases shrank enough to read only some rows


def test_the_rows_a_resize_reads_are_every_row_it_reads():
    from napari_clearclip.image import rows_read_by_resize

    rng = np.random.default_rng(3)
    for _ in range(60):
        height, out_height = int(rng.integers(8, 3000)), int(rng.integers(1, 400))
        rows = rows_read_by_resize(height, out_height)
        if rows is None:
            assert out_height * 2 > height / 2  # only when most rows are read
            continue
        image = torch.full((1, 2, height, 5), float("nan"))
        image[:, :, torch.from_numpy(rows)] = torch.rand((1, 2, len(rows), 5))
        assert not torch.isnan(F.interpolate(image, size=(out_height, 3), mode="bilinear", align_corners=False)).any()


def test_a_run_can_name_its_method_without_changing_the_segmenters(tiny_checkpoint, rgb_image):
    """segment(..., method=...) runs that method for that call alone, as a segmenter set to it would."""
    from napari_clearclip.errors import InvalidOptionError

    classes = ["cell", "nucleus", "background"]
    segmenter = Segmenter("test-tiny", tiny_checkpoint, device="cpu")
    naclip = Segmenter("test-tiny", tiny_checkpoint, device="cpu", method="naclip")
    expected = naclip.segment(rgb_image, classes).probabilities
    np.testing.assert_allclose(segmenter.segment(rgb_image, classes, method="NACLIP").probabilities, expected,
                               atol=1e-6)
    assert segmenter.method == "clearclip"
    assert not np.allclose(segmenter.segment(rgb_image, classes).probabilities, expected, atol=1e-4)
    strokes = np.zeros(rgb_image.shape[:2], np.int32)
    strokes[10:20, 10:40] = 1
    assert segmenter.make_lesson(classes, [(rgb_image, strokes)], method="naclip").method == "naclip"
    assert segmenter.make_lesson(classes, [(rgb_image, strokes)]).method == "clearclip"
    with pytest.raises(InvalidOptionError, match="Unknown method 'sam'"):
        segmenter.segment(rgb_image, classes, method="sam")


def test_cached_image_features_rescored_without_encoding(tiny_checkpoint, rgb_image, monkeypatch):
    segmenter = Segmenter("test-tiny", tiny_checkpoint, device="cpu")
    first = segmenter.segment(rgb_image, ["sky", "grass", "road"])
    fresh = Segmenter("test-tiny", tiny_checkpoint, device="cpu", disk_cache=False).segment(rgb_image, ["road", "sky"])
    calls = {"image": 0, "prompts": 0}
    original_encode = segmenter_module.encode_dense
    original_prompts = segmenter.text.encode_prompts

    def count_image(*args, **kwargs):
        calls["image"] += 1
        return original_encode(*args, **kwargs)

    def count_prompts(prompts):
        calls["prompts"] += len(prompts)
        return original_prompts(prompts)

    monkeypatch.setattr(segmenter_module, "encode_dense", count_image)
    monkeypatch.setattr(segmenter.text, "encode_prompts", count_prompts)
    again = segmenter.segment(rgb_image, ["road", "sky"])
    assert calls == {"image": 0, "prompts": 0}
    np.testing.assert_allclose(again.probabilities, fresh.probabilities, atol=1e-6)
    segmenter.segment(rgb_image, ["road", "sky", "water"])
    assert calls == {"image": 0, "prompts": 80}  # only the new class, 80 templates
    # a different image, method or window setting is encoded anew
    segmenter.segment(rgb_image[::-1].copy(), ["sky"])
    assert calls["image"] == 1
    segmenter.method = "maskclip"
    segmenter.segment(rgb_image, ["sky"])
    assert calls["image"] == 2
    assert first.class_names == ["sky", "grass", "road"]


def test_text_embeddings_cached_on_disk_by_checkpoint_content(tiny_checkpoint, tmp_path, monkeypatch):
    first = Segmenter("test-tiny", tiny_checkpoint, device="cpu")
    expected = first.encode_classes(["cat", "dog"])
    assert len(list((tmp_path / "cache" / "text-embeddings").glob("*.npy"))) == 2
    copy = tmp_path / "renamed.pt"
    shutil.copy(tiny_checkpoint, copy)
    second = Segmenter("test-tiny", str(copy), device="cpu")
    monkeypatch.setattr(second.text, "encode_prompts", lambda prompts: pytest.fail("should come from the disk cache"))
    torch.testing.assert_close(second.encode_classes(["dog", "cat"]), expected.flip(0))


def test_truncated_text_context_equals_full_context(tiny_segmenter):
    model = tiny_segmenter.model
    tokens = model.tokenizer(["a photo of a cat.", "a very blurry low resolution photo of a small grey tabby cat."])
    with torch.no_grad():
        full = model.clip.encode_text(tokens)
        short = encode_text_truncated(model.clip, tokens)
    torch.testing.assert_close(short, full, atol=1e-5, rtol=1e-5)


def test_window_grid_follows_official_geometry():
    grid = WindowGrid(448, 597, 448, 224, (16, 16))
    assert grid.windows == [(0, 448, 0, 448), (0, 448, 149, 597)]
    assert grid.padding == (0, 0, 0, 0)
    grid = WindowGrid(300, 500, 448, 224, (16, 16))
    assert grid.window_size == (300, 448) and grid.padding == (0, 0, 2, 2) and grid.patch_grid == (19, 28)
    rows, cols = grid.coverage()
    assert rows.min() == 1 and cols.max() == 2 and cols[0] == 1
    grid = WindowGrid(100, 90, 448, 224, (16, 16))
    assert grid.windows == [(0, 100, 0, 90)] and grid.padding == (3, 3, 6, 6)


def test_cancelled_run_caches_nothing_and_next_run_completes(tiny_segmenter, rgb_image):
    steps = tiny_segmenter.segment_steps(rgb_image, ["sky", "grass"], short_side=None, crop=64, stride=32)
    stages = []
    for progress in steps:
        stages.append(progress.stage)
        if progress.stage == "windows" and progress.done > 0:
            break
    steps.close()
    assert len(tiny_segmenter._features) == 0
    result = tiny_segmenter.segment(rgb_image, ["sky", "grass"], short_side=None, crop=64, stride=32)
    assert result.labels.shape == rgb_image.shape[:2]
    assert "text" in stages


def test_progress_counts_windows(tiny_segmenter, rgb_image):
    steps = list(tiny_segmenter.segment_steps(rgb_image, ["a"], short_side=None, crop=64, stride=32))
    windows = [p for p in steps if p.stage == "windows"]
    assert windows[0].done == 0 and windows[-1].done == windows[-1].total
    assert windows[-1].total == len(WindowGrid(180, 260, 64, 32, (16, 16)).windows)


def test_out_of_memory_retries_with_smaller_batches(tiny_checkpoint, rgb_image, monkeypatch):
    # no feature store: the image must be encoded here, not read from what the reference run stored
    segmenter = Segmenter("test-tiny", tiny_checkpoint, device="cpu", window_batch_size=8, feature_store=False)
    expected = Segmenter("test-tiny", tiny_checkpoint, device="cpu", feature_store=False).segment(
        rgb_image, ["a", "b"], short_side=None, crop=64, stride=32)
    original = segmenter_module.encode_dense

    def limited(visual, pixels, *args, **kwargs):
        if len(pixels) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(visual, pixels, *args, **kwargs)

    monkeypatch.setattr(segmenter_module, "encode_dense", limited)
    result = segmenter.segment(rgb_image, ["a", "b"], short_side=None, crop=64, stride=32)
    assert segmenter.window_batch_size == 2
    np.testing.assert_allclose(result.probabilities, expected.probabilities, atol=1e-5)


def test_bf16_close_to_fp32(tiny_checkpoint, rgb_image):
    exact = Segmenter("test-tiny", tiny_checkpoint, device="cpu", precision="fp32").segment(rgb_image, ["a", "b", "c"])
    fast = Segmenter("test-tiny", tiny_checkpoint, device="cpu", precision="bf16").segment(rgb_image, ["a", "b", "c"])
    assert np.abs(fast.similarity - exact.similarity).max() < 0.05
    assert (fast.labels == exact.labels).mean() > 0.8


def test_engine_imports_no_gui():
    import subprocess
    import sys

    code = ("import sys, napari_clearclip, napari_clearclip.batch.cli, napari_clearclip.batch, napari_clearclip.planes, "
            "napari_clearclip.editing, napari_clearclip.annotate, napari_clearclip.colours; "
            "print([m for m in ('qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'napari', 'magicgui') if m in sys.modules])")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"


def test_cli_runs_where_no_qt_binding_can_be_imported(tmp_path, rgb_image):
    """The engine and the CLI need no Qt: with every binding blocked, a batch still runs."""
    import subprocess
    import sys

    from skimage.io import imsave

    imsave(tmp_path / "a.png", rgb_image)
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'qtpy'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}
    code = ("from napari_clearclip.batch.cli import main; import sys; "
            f"sys.exit(main([{str(tmp_path / 'a.png')!r}, '--classes', 'red; blue', '--out', {str(tmp_path / 'out')!r}, "
            "'--model', 'synthetic-tiny', '--device', 'cpu']))")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert (tmp_path / "out" / "a_labels.tif").exists()
