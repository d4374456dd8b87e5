"""The package's results equal the official ClearCLIP loop's (tests/reference.py) on the same weights."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from images import smooth_image

from napari_clearclip import Segmenter
from napari_clearclip.prompts import IMAGENET_TEMPLATES

from reference import OfficialReference, official_preprocess

CLASSES = ["sky", "horse, pony", "grass", "road"]
REFERENCE_TYPES = {"clearclip": "ClearCLIP", "maskclip": "MaskCLIP", "sclip": "SCLIP", "naclip": "NACLIP", "vanilla": "vanilla"}


def compare(segmenter, reference_net, image, classes, templates, method, short_side, crop, stride, prob_threshold=0.0):
    tokenizer = open_clip.get_tokenizer(segmenter.model.name)
    reference = OfficialReference(reference_net, tokenizer, classes, templates, REFERENCE_TYPES[method],
                                  prob_thd=prob_threshold, slide_stride=stride, slide_crop=crop)
    ref_sim, ref_prob, ref_labels = reference.predict(official_preprocess(image, short_side), image.shape[:2])
    segmenter.method = method
    result = segmenter.segment(image, classes, templates=templates, short_side=short_side, crop=crop, stride=stride,
                               prob_threshold=prob_threshold)
    assert result.probabilities.shape == (len(classes), *image.shape[:2])
    prob_error = np.abs(result.probabilities - ref_prob.numpy()).max()
    agreement = (result.labels == ref_labels.numpy()).mean()
    return prob_error, agreement, result, ref_sim


@pytest.fixture(scope="module")
def vitb16(vitb16_checkpoint):
    segmenter = Segmenter("ViT-B-16", vitb16_checkpoint, device="cpu", precision="fp32")
    net = open_clip.create_model("ViT-B-16", pretrained=None)
    net.load_state_dict(torch.load(vitb16_checkpoint, weights_only=True))
    return segmenter, net.eval()


@pytest.mark.slow
def test_vitb16_clearclip_matches_official_with_resize_and_overlap(vitb16):
    """A 301x533 image: resized to 448x793, three overlapping 448 windows, resized back."""
    segmenter, net = vitb16
    image = smooth_image(301, 533)
    templates = list(IMAGENET_TEMPLATES[:6])
    error, agreement, result, _ = compare(segmenter, net, image, CLASSES, templates, "clearclip", 448, 448, 224)
    assert error < 1e-4
    assert agreement >= 0.999
    assert len(np.unique(result.labels)) > 1  # a real comparison, not a constant map


@pytest.mark.slow
def test_vitb16_clearclip_matches_official_with_padding(vitb16):
    """Native 300x500: windows of 300x448 are padded to 304x448 and overlap; 80 templates."""
    segmenter, net = vitb16
    image = smooth_image(300, 500, seed=1)
    error, agreement, _, _ = compare(segmenter, net, image, ["cat", "dog"], list(IMAGENET_TEMPLATES), "clearclip", None, 448, 224)
    assert error < 1e-4
    assert agreement >= 0.999


@pytest.mark.slow
def test_vitb16_naclip_matches_official(vitb16):
    segmenter, net = vitb16
    image = smooth_image(240, 300, seed=2)
    error, agreement, _, _ = compare(segmenter, net, image, CLASSES, ["a photo of a {}."], "naclip", 224, 224, 112)
    assert error < 1e-4
    assert agreement >= 0.999


@pytest.mark.parametrize("method", list(REFERENCE_TYPES))
def test_every_method_matches_official_on_tiny_model(tiny_checkpoint, method):
    segmenter = Segmenter("test-tiny", tiny_checkpoint, device="cpu")
    net = open_clip.create_model("test-tiny", pretrained=None)
    net.load_state_dict(torch.load(tiny_checkpoint, weights_only=True))
    image = smooth_image(200, 330, seed=3)
    error, agreement, result, ref_sim = compare(segmenter, net.eval(), image, CLASSES, ["a photo of a {}.", "a {}."],
                                               method, 240, 224, 160, prob_threshold=0.3)
    assert error < 1e-4
    assert agreement >= 0.999
    # similarity is the max over synonyms of the reference's per-query cosine similarity
    expected_sim = torch.stack([ref_sim[0], ref_sim[1:3].amax(0), ref_sim[3], ref_sim[4]]).numpy()
    assert np.abs(result.similarity - expected_sim).max() < 1e-5


# -- ResCLIP -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vitb16_quickgelu(tmp_path_factory):
    """ViT-B/16 built as OpenAI's (QuickGELU), randomly initialised: the architecture ResCLIP's code loads."""
    torch.manual_seed(0)
    net = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None).eval()
    path = tmp_path_factory.mktemp("ckpt") / "vit-b-16-quickgelu.pt"
    torch.save(net.state_dict(), path)
    segmenter = Segmenter("ViT-B-16-quickgelu", str(path), method="resclip", device="cpu", precision="fp32",
                          disk_cache=False, feature_store=False)
    return segmenter, net


def resclip_compare(segmenter, net, image, classes, templates, short_side, crop, stride, pamr_steps=0, preset=None):
    from napari_clearclip.resclip import PRESETS
    from reference import OfficialResclip

    settings = PRESETS[preset or "demo"][0]
    tokenizer = open_clip.get_tokenizer(segmenter.model.name)
    reference = OfficialResclip(net, tokenizer, classes, templates, rcs=settings.rcs, sfr=settings.sfr,
                                temp_thd=settings.temp_threshold, slide_stride=stride, slide_crop=crop,
                                pamr_steps=pamr_steps)
    first = []
    real = reference.first_segmentation
    reference.first_segmentation = lambda *a: first.append(real(*a)) or first[-1]
    with torch.no_grad():
        logits = reference.forward_slide(official_preprocess(image, short_side), image.shape[:2])[0]
    probs = torch.softmax(logits * 40.0, dim=0)
    per_class = torch.stack([probs[reference.query_idx == c].amax(0) for c in range(len(classes))])
    result = segmenter.segment(image, classes, templates=templates, short_side=short_side, crop=crop, stride=stride,
                               refine="pamr" if pamr_steps else None, preset=preset)
    error = np.abs(result.probabilities - per_class.numpy()).max()
    agreement = (result.labels == per_class.argmax(0).numpy() + 1).mean()
    return error, agreement, result, first


@pytest.mark.slow
def test_resclip_matches_its_official_code_on_one_window(vitb16_quickgelu):
    """One 224 window whose first segmentation has two labels: feedback, path test and both passes compared."""
    segmenter, net = vitb16_quickgelu
    error, agreement, result, first = resclip_compare(segmenter, net, smooth_image(224, 224, seed=0), CLASSES,
                                                      ["a photo of a {}."], 224, 224, 112)
    assert len(torch.unique(first[0])) > 1                 # the semantic feedback has something to say
    assert len(np.unique(result.labels)) > 1
    assert error < 1e-4
    assert agreement >= 0.999


@pytest.mark.slow
@pytest.mark.parametrize("preset, pamr_steps", [(None, 10), ("context60", 0)])
def test_resclip_matches_its_official_code_with_overlapping_windows(vitb16_quickgelu, preset, pamr_steps):
    """A 230x300 image at short side 224 (224 x 292): two overlapping windows; the demo's settings with the final PAMR,
    and a benchmark preset's without."""
    segmenter, net = vitb16_quickgelu
    error, agreement, _, first = resclip_compare(segmenter, net, smooth_image(230, 300, seed=2), CLASSES,
                                                 ["a photo of a {}.", "a {}."], 224, 224, 112, pamr_steps, preset)
    assert len(first) == 2
    assert error < 1e-4
    assert agreement >= 0.999


def test_resclip_keeps_memory_bounded_and_needs_the_classes(vitb16_quickgelu):
    """The official path test holds an (N^2 x (D + 1) x 2) tensor; here a step at a time, with equal results."""
    from napari_clearclip.resclip import _paths_leave_label

    from reference import OfficialResclip

    labels = torch.randint(0, 3, (9, 13))
    labels[2:6, 3:9] = 5
    reference = OfficialResclip.__new__(OfficialResclip)
    expected = reference.feedback(labels)[0]
    from napari_clearclip.resclip import feedback_matrix

    got = feedback_matrix(labels, 5.0)
    np.testing.assert_allclose(got.float().numpy(), (expected / expected.max()).to(torch.float16).float().numpy(),
                               atol=1e-3)
    leaves, _, _ = _paths_leave_label(labels)
    assert leaves.any() and not leaves.all()
    segmenter, _ = vitb16_quickgelu
    with pytest.raises(ValueError, match="depend on the class names"):
        segmenter.cache_features(smooth_image(224, 224))
    with pytest.raises(ValueError, match="Unknown ResCLIP preset"):
        segmenter.segment(smooth_image(224, 224), CLASSES, preset="voc99")
