"""CLIP-DIY: equal to its official pipeline (tests/reference.py) on random ViT-B/32 weights, OpenCV's resizing bit for
bit, foreground maps from any array, and strokes, lessons and the feature store as for the other methods."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from images import smooth_image

from napari_clearclip import Segmenter
from napari_clearclip.clipdiy import CropPyramid, resize_like_opencv, working_size
from napari_clearclip.errors import InvalidOptionError
from napari_clearclip.scoring import nearest_index

from reference import OfficialClipDiy


def test_resizing_equals_opencv_bit_for_bit():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    cases = [(512, 512, 256, 256), (256, 256, 256, 256), (64, 64, 256, 256), (375, 500, 256, 256)]
    cases += [(*rng.integers(16, 700, 2), *rng.integers(16, 400, 2)) for _ in range(60)]
    for number, (height, width, out_h, out_w) in enumerate(cases):
        shape = (int(height), int(width), 3) if number % 2 == 0 else (int(height), int(width))
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        expected = cv2.resize(image, (int(out_w), int(out_h)), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_array_equal(resize_like_opencv(image, int(out_h), int(out_w)), expected,
                                      err_msg=f"{shape} -> {(out_h, out_w)}")


def test_nearest_labels_index_like_opencv():
    cv2 = pytest.importorskip("cv2")
    labels = np.arange(256 * 256, dtype=np.float32).reshape(256, 256)
    for height, width in [(375, 500), (100, 77), (256, 256), (1000, 333)]:
        expected = cv2.resize(labels, (width, height), interpolation=cv2.INTER_NEAREST)
        np.testing.assert_array_equal(labels[nearest_index(256, height)][:, nearest_index(256, width)], expected)


def test_official_crops_and_native_crops_cover_the_image():
    official = CropPyramid.for_image(256, 256, (224, 224))
    assert official.sizes == (256, 128, 64)
    assert [len(ys) * len(xs) for ys, xs in official.scale_grids] == [1, 9, 49]
    height, width = working_size(300, 700, 256, keep_aspect=True)
    assert (height, width) == (256, 597)
    native = CropPyramid.for_image(height, width, (224, 224))
    covered = np.zeros((height, width), bool)
    for y1, y2, x1, x2 in native.windows:
        assert y2 - y1 == x2 - x1 and 0 <= y1 and y2 <= height and 0 <= x1 and x2 <= width
        covered[y1:y2, x1:x2] = True
    assert covered.all()


@pytest.fixture(scope="module")
def vitb32(tmp_path_factory):
    """ViT-B/32 randomly initialised (the architecture of CLIP-DIY's official model)."""
    torch.manual_seed(3)
    net = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    path = tmp_path_factory.mktemp("ckpt") / "vit-b-32.pt"
    torch.save(net.state_dict(), path)
    segmenter = Segmenter("ViT-B-32", str(path), method="clipdiy", device="cpu", precision="fp32", disk_cache=False,
                          feature_store=False)
    reference = OfficialClipDiy(net, open_clip.get_tokenizer("ViT-B-32"), open_clip.OPENAI_DATASET_MEAN,
                                open_clip.OPENAI_DATASET_STD, 224)
    return segmenter, reference


@pytest.mark.parametrize("with_saliency", [False, True])
def test_clipdiy_matches_its_official_pipeline(vitb32, with_saliency):
    pytest.importorskip("cv2")
    segmenter, reference = vitb32
    image = smooth_image(375, 500, seed=4)
    names = ["background", "cat", "dog", "grass"]
    saliency = None
    if with_saliency:
        yy, xx = np.mgrid[0:375, 0:500]
        saliency = (1 / (1 + np.exp(-((yy - 180) ** 2 + (xx - 260) ** 2 - 120**2) / -3000.0))).astype(np.float32)
    probabilities, labels = reference.predict(image, names, saliency)
    result = segmenter.segment(image, names, foreground=saliency)
    rows, cols = nearest_index(256, 375), nearest_index(256, 500)
    expected = probabilities.numpy()[:, rows][:, :, cols]
    assert result.probabilities.shape == (4, 375, 500)
    assert np.abs(result.probabilities - expected).max() < 1e-4
    assert (result.labels - 1 == labels).mean() >= 0.999
    if with_saliency:  # the fusion matters: background where the map says so
        assert len(np.unique(result.labels)) > 1
        assert (result.labels[saliency < 0.01] == 1).mean() > 0.99


def test_foreground_needs_a_background_class_and_a_matching_map(tiny_checkpoint):
    seg = Segmenter("test-tiny", tiny_checkpoint, method="clipdiy", device="cpu", feature_store=False)
    image = smooth_image(64, 80)
    mask = np.zeros((64, 80), np.uint16)
    mask[10:40, 20:60] = 7                                    # e.g. one cellpose object
    with pytest.raises(InvalidOptionError, match="background class"):
        seg.segment(image, ["cat", "dog"], foreground=mask)
    with pytest.raises(InvalidOptionError, match="does not match"):
        seg.segment(image, ["background", "dog"], foreground=mask[:, :70])
    with pytest.raises(InvalidOptionError, match="0 to 1"):
        seg.segment(image, ["background", "dog"], foreground=mask.astype(np.float32))
    with pytest.raises(InvalidOptionError, match="none of the classes"):
        seg.segment(image, ["cat", "dog"], foreground=mask, background_class="sky")
    # a mask: outside it the other classes score 0 and the background keeps its score; inside, the reverse
    classes = ["cat", "dog", "floor"]
    plain = seg.segment(image, classes)
    fused = seg.segment(image, classes, foreground=mask, background_class="floor")
    outside, inside = np.zeros_like(mask, bool), np.zeros_like(mask, bool)
    outside[:, :10], inside[15:35, 28:52] = True, True           # away from the map's edges
    np.testing.assert_allclose(fused.similarity[2][outside], plain.similarity[2][outside], atol=1e-6)
    assert np.abs(fused.similarity[:2][:, outside]).max() < 1e-6
    np.testing.assert_allclose(fused.similarity[:2][:, inside], plain.similarity[:2][:, inside], atol=1e-6)
    assert np.abs(fused.similarity[2][inside]).max() < 1e-6
    named = seg.segment(image, ["cat", "Background", "dog, puppy"], foreground=mask > 0)
    assert np.abs(named.similarity[[0, 2]][:, outside]).max() < 1e-6


def test_the_fusion_applies_to_every_method(tiny_checkpoint):
    seg = Segmenter("test-tiny", tiny_checkpoint, device="cpu", feature_store=False)
    image = smooth_image(64, 80, seed=1)
    mask = np.zeros((64, 80), bool)
    mask[:, :40] = True
    plain = seg.segment(image, ["background", "cat", "dog"], short_side=64, crop=64, stride=32)
    fused = seg.segment(image, ["background", "cat", "dog"], short_side=64, crop=64, stride=32, foreground=mask)
    assert not np.array_equal(plain.labels, fused.labels)
    assert set(np.unique(fused.labels[:, 45:])) <= {1}


def test_keep_aspect_only_for_clipdiy_and_its_prompt(tiny_checkpoint):
    seg = Segmenter("test-tiny", tiny_checkpoint, device="cpu", feature_store=False)
    with pytest.raises(InvalidOptionError, match="keep_aspect"):
        seg.check_options(keep_aspect=True)
    options = seg.resolve_options(method="clipdiy", keep_aspect=True)
    assert options.templates == ("a photo of a {}",) and options.logit_scale == 1.0 and options.short_side == 256
    seg.method = "clipdiy"
    image = smooth_image(90, 200, seed=2)
    squashed = seg.segment(image, ["cat", "dog", "grass"])
    native = seg.segment(image, ["cat", "dog", "grass"], keep_aspect=True)
    assert squashed.labels.shape == native.labels.shape == (90, 200)
    assert not np.array_equal(squashed.probabilities, native.probabilities)
    # edge snapping works on CLIP-DIY's scores too (resized bilinearly, then PAMR), labels only or with maps
    snapped = seg.segment(image, ["cat", "dog", "grass"], refine="pamr", pamr_iterations=3, pamr_dilations=(2, 4))
    fast = seg.segment(image, ["cat", "dog", "grass"], refine="pamr", pamr_iterations=3, pamr_dilations=(2, 4),
                       maps=False)
    np.testing.assert_array_equal(snapped.labels, fast.labels)
    assert not np.allclose(snapped.probabilities, squashed.probabilities)


def test_strokes_lessons_and_stored_features_work_with_clipdiy(tmp_path):
    from napari_clearclip.demo.scenes import sample_scene

    image = sample_scene(256)
    classes = ["background", "red", "green", "blue"]
    seg = Segmenter("synthetic-tiny", method="clipdiy", device="cpu", feature_store=tmp_path / "store")
    plain = seg.segment(image, classes)
    strokes = np.zeros(image.shape[:2], np.int32)
    strokes[20:200:3, 30:60] = 4                              # "blue" painted over a band of crops
    taught = seg.segment(image, classes, strokes=strokes)
    unpainted = strokes == 0
    assert (taught.labels[unpainted] == 4).mean() > (plain.labels[unpainted] == 4).mean()
    # the same strokes collected as exemplars teach the image they were painted on as its strokes do
    carried = seg.segment(image, classes, exemplars=seg.collect_exemplars(image, strokes, classes)).labels
    carried[~unpainted] = strokes[~unpainted]
    np.testing.assert_array_equal(carried, taught.labels)
    # a lesson of those strokes teaches another image as the same strokes carried there do (compared in the
    # whitening of the image they were painted on, regularised as for any other image's strokes)
    lesson = seg.make_lesson(classes, [(image, strokes)])
    assert (seg.segment(image, classes, lesson=lesson).labels[unpainted] == 4).mean() > \
        (plain.labels[unpainted] == 4).mean()
    other = np.ascontiguousarray(image[:, ::-1])
    without = seg.segment(other, classes)
    with_lesson = seg.segment(other, classes, lesson=lesson)
    np.testing.assert_array_equal(
        with_lesson.labels, seg.segment(other, classes, exemplars=seg.collect_exemplars(image, strokes, classes)).labels)
    assert not np.allclose(with_lesson.probabilities, without.probabilities)
    # a new session reads the crops' features from the store and gives the same result
    assert seg.cache_features(other)
    fresh = Segmenter("synthetic-tiny", method="clipdiy", device="cpu", feature_store=tmp_path / "store")
    fresh._encode_crops = None                                # would fail if it encoded anything
    np.testing.assert_array_equal(fresh.segment(other, classes).labels, without.labels)
