"""Synthetic scenes and the bundled demo model: real segmentation quality, offline."""

from __future__ import annotations

import numpy as np
import pytest

from napari_clearclip import Segmenter
from napari_clearclip.models import BUNDLED_WEIGHTS
from napari_clearclip.demo.scenes import COLOURS, DEMO_CLASSES, colour_iou, held_out_scenes, make_scene, sample_scene


def test_scenes_are_seeded_and_consistent():
    a, b = make_scene(5, size=128), make_scene(5, size=128)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.caption == b.caption
    assert not np.array_equal(a.image, make_scene(6, size=128).image)
    for seed in range(20):
        scene = make_scene(seed, size=96)
        assert scene.image.dtype == np.uint8 and scene.image.shape == (96, 96, 3)
        stacked = np.stack(list(scene.masks.values()))
        assert stacked.sum(0).max() <= 1                       # one colour per pixel
        assert 1 <= len(scene.objects) <= 4
        for colour in {c for c, _ in scene.objects}:
            assert scene.masks[colour].any() and colour in scene.caption
        truth = scene.label_image()
        assert set(np.unique(truth)) <= set(range(len(COLOURS) + 1))


def test_bundled_model_loads_offline_and_is_small():
    assert BUNDLED_WEIGHTS["synthetic-tiny"].stat().st_size <= 10 * 1024 * 1024
    segmenter = Segmenter("synthetic-tiny", device="cpu")
    assert segmenter.model.weights_id.startswith("bundled:")
    result = segmenter.segment(make_scene(1, size=128).image, ["red", "green", "blue", "yellow", "background"])
    assert result.labels.shape == (128, 128)


@pytest.fixture(scope="module")
def segmenter():
    return Segmenter("synthetic-tiny", device="cpu")


@pytest.fixture(scope="module")
def scores(segmenter):
    scenes = held_out_scenes(24)
    results = {}
    for method in ("clearclip", "vanilla"):
        segmenter.method = method
        results[method] = colour_iou(segmenter, scenes)
    segmenter.method = "clearclip"
    return results


def test_clearclip_segments_unseen_scenes_in_every_colour(scores):
    """Held-out scenes, classes red, green, blue, yellow, background: mean IoU over the colours >= 0.7, each >= 0.5."""
    clearclip = scores["clearclip"]
    assert clearclip["mean"] >= 0.7, clearclip
    assert min(clearclip[c] for c in COLOURS) >= 0.5, clearclip


def test_the_sample_scene_background_is_labelled_background(segmenter):
    """What a new user sees: the suggested classes on the "synthetic shapes" sample."""
    scene = make_scene(10, size=256, objects=(3, 4))
    np.testing.assert_array_equal(scene.image, sample_scene(256))
    classes = DEMO_CLASSES.split("\n")
    labels = segmenter.segment(scene.image, classes, contrast_limits=(0, 255)).labels
    background = scene.label_image() == 0
    assert np.mean(labels[background] == classes.index("background") + 1) >= 0.8


def test_clearclip_labels_objects_with_their_colour(segmenter):
    """The right colour on at least 85% of the object pixels of every colour."""
    hits, totals = np.zeros(len(COLOURS) + 1), np.zeros(len(COLOURS) + 1)
    for scene in held_out_scenes(24):
        predicted = segmenter.segment(scene.image, list(COLOURS) + ["background"]).labels
        predicted[predicted > len(COLOURS)] = 0
        truth = scene.label_image()
        for index in range(len(COLOURS) + 1):
            hits[index] += np.count_nonzero((truth == index) & (predicted == index))
            totals[index] += np.count_nonzero(truth == index)
    accuracy = dict(zip(["background", *COLOURS], hits / totals))
    assert min(accuracy[c] for c in COLOURS) >= 0.85, accuracy


def test_clearclip_beats_plain_clip_by_a_clear_margin(scores):
    assert scores["clearclip"]["mean"] - scores["vanilla"]["mean"] >= 0.15, scores
