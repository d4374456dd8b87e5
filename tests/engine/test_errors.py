"""Bad input gets a clear, actionable error where it enters."""

from __future__ import annotations

import time

import numpy as np
import pytest

from napari_clearclip import (
    ClearClipError,
    InvalidClassesError,
    InvalidImageError,
    ModelLoadError,
    Segmenter,
    WeightsUnavailableError,
)
from napari_clearclip.prompts import parse_classes


def test_unknown_model_suggests_close_names():
    with pytest.raises(ModelLoadError, match=r"Unknown model 'ViT-B16'.*ViT-B-16"):
        Segmenter("ViT-B16")


def test_offline_without_cached_weights_fails_fast_with_advice():
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        Segmenter("ViT-B-16", "openai", device="cpu")
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert "not in the local cache" in message and "no network" in message
    assert "pretrained='/path/to/checkpoint.pt'" in message


def test_failed_download_is_reported_with_advice(monkeypatch):
    import open_clip

    import napari_clearclip.models as models

    def refuse(*args, **kwargs):
        raise OSError("connection reset by peer")

    monkeypatch.setattr(models, "network_available", lambda host="", timeout=3.0: True)
    monkeypatch.setattr(open_clip, "create_model", refuse)
    message = r"Could not download or load the ViT-B-16 'openai'.*connection reset.*local checkpoint"
    with pytest.raises(WeightsUnavailableError, match=message):
        Segmenter("ViT-B-16", "openai", device="cpu")


def test_offline_probe_answers_at_once(monkeypatch):
    from napari_clearclip.models import network_available

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    assert network_available() is False
    assert time.monotonic() - start < 1


def test_unknown_pretrained_tag_lists_known_tags():
    with pytest.raises(ModelLoadError, match=r"Unknown pretrained weights 'opneai'.*openai"):
        Segmenter("ViT-B-16", "opneai", device="cpu")


def test_checkpoint_for_another_model_is_refused(tiny_checkpoint):
    with pytest.raises(ModelLoadError, match=r"does not match model 'ViT-B-32'.*shape mismatch"):
        Segmenter("ViT-B-32", tiny_checkpoint, device="cpu")


def test_missing_and_unreadable_checkpoints(tmp_path):
    with pytest.raises(ModelLoadError, match="Checkpoint file not found"):
        Segmenter("test-tiny", str(tmp_path / "nope.pt"), device="cpu")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="Could not read checkpoint"):
        Segmenter("test-tiny", str(garbage), device="cpu")


def test_device_and_precision_errors(tiny_checkpoint):
    with pytest.raises(ModelLoadError, match="^The precision 'fp16' needs a GPU"):
        Segmenter("test-tiny", tiny_checkpoint, device="cpu", precision="fp16")
    with pytest.raises(ModelLoadError, match="Unknown precision"):
        Segmenter("test-tiny", tiny_checkpoint, device="cpu", precision="fp8")
    with pytest.raises(ClearClipError, match="Unknown method 'clearclop'"):
        Segmenter("test-tiny", tiny_checkpoint, method="clearclop", device="cpu")


@pytest.mark.parametrize(
    "classes, message",
    [
        ([], "No classes given"),
        ("", "No classes given"),
        (["cat", "  "], r"Class 2 .* empty name"),
        (["cat, ", "dog"], r"Class 1 .* empty name"),
        (["cat", "Cat"], r"'Cat' appears twice \(in classes 1 and 2\)"),
        (["cat, kitty, kitty"], "appears twice .in the same class"),
        (["cat", 3], "must be a string"),
    ],
)
def test_bad_class_lists(classes, message):
    with pytest.raises(InvalidClassesError, match=message):
        parse_classes(classes)


def test_class_text_splits_on_lines_and_semicolons():
    parsed = parse_classes("sky; horse, pony\n grass \n\n")
    assert [c.name for c in parsed] == ["sky", "horse", "grass"]
    assert parsed[1].synonyms == ("horse", "pony")


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((2, 32, 32, 3), np.uint8), r"shape \(2, 32, 32, 3\) is not supported.*one 2-D slice"),
        (np.zeros((3, 64, 64), np.uint8), "channels-first"),
        (np.zeros((64, 64, 5), np.uint8), "not supported"),
        (np.zeros((64, 64), bool), "dtype bool"),
        (np.zeros((64, 64), np.complex64), "dtype complex64"),
        (np.zeros((8, 64), np.uint8), "too small"),
        (np.array([[np.nan] * 64] * 64, np.float32), "NaN or infinite"),
    ],
)
def test_bad_images(tiny_segmenter, image, message):
    with pytest.raises(InvalidImageError, match=message):
        tiny_segmenter.segment(image, ["cat"])


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(stride=0), "stride=0"),
        (dict(crop=224, stride=300), "stride=300"),
        (dict(crop=4), "crop=4"),
        (dict(prob_threshold=1.5), "prob_threshold"),
        (dict(templates=["a photo"]), r"needs a '\{\}'"),
        (dict(contrast_limits=(5, 5)), "Contrast limits"),
    ],
)
def test_bad_options(tiny_segmenter, rgb_image, options, message):
    with pytest.raises(ClearClipError, match=message):
        tiny_segmenter.segment(rgb_image, ["cat"], **options)


@pytest.mark.parametrize("focus, message", [
    ((1, 2, 3), "must be finite numbers"),
    (("a", 1), "must be \\(row, column\\)"),
    ((float("nan"), 1), "must be finite numbers"),
    ((10, 5, 0, 4), "bottom and right must not be above"),
    (7, "must be \\(row, column\\)"),
])
def test_bad_focus_is_refused_before_any_work(tiny_segmenter, focus, message):
    from napari_clearclip.errors import InvalidOptionError

    image = np.zeros((64, 64, 3), np.uint8)
    steps = tiny_segmenter.segment_steps(image, ["cat", "dog"], refine="pamr", maps=False, focus=focus)
    with pytest.raises(InvalidOptionError, match=message):
        next(steps)
    with pytest.raises(ValueError):   # a ValueError too, for callers catching the built-in
        next(tiny_segmenter.segment_steps(image, ["cat", "dog"], focus=focus))


@pytest.mark.parametrize("setting, said", [
    ({"affinity_cache_bytes": -1}, "affinity_cache_bytes=-1 must be a whole number of bytes, 0 or more"),
    ({"feature_store_bytes": "lots"}, "feature_store_bytes='lots' must be a whole number of bytes"),
    ({"label_cache_bytes": 1.5e9}, "label_cache_bytes=1500000000.0 must be a whole number of bytes"),
    ({"feature_cache_bytes": True}, "feature_cache_bytes=True must be a whole number of bytes"),
    ({"window_batch_size": 0}, "window_batch_size=0 must be a whole number of at least 1, or None"),
    ({"disk_cache": "no"}, "disk_cache='no' must be True or False"),
])
def test_cache_and_batch_sizes_are_checked_before_the_model_loads(setting, said, monkeypatch):
    """A size that is not a whole number of bytes (or a flag that is not one) is refused where it is given, before
    any loading, instead of acting as no cache or as an unlimited one."""
    from napari_clearclip import InvalidOptionError, segmenter

    monkeypatch.setattr(segmenter, "load_model", lambda *args: pytest.fail("the model loaded"))
    with pytest.raises(InvalidOptionError, match=said.replace("(", r"\(").replace(".", r"\.")):
        Segmenter("synthetic-tiny", device="cpu", **setting)
    monkeypatch.undo()
    assert Segmenter("synthetic-tiny", device="cpu", affinity_cache_bytes=0, feature_store_bytes=None,
                     window_batch_size=None, disk_cache=False).window_batch_size is None
