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
