"""GPU checks; skipped on machines without CUDA."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch

from images import smooth_image
from napari_clearclip import Segmenter

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cuda_fp32_matches_cpu(tiny_checkpoint, rgb_image):
    classes = ["sky", "horse, pony", "grass"]
    cpu = Segmenter("test-tiny", tiny_checkpoint, device="cpu").segment(rgb_image, classes)
    gpu = Segmenter("test-tiny", tiny_checkpoint, device="cuda", precision="fp32").segment(rgb_image, classes)
    assert np.abs(gpu.probabilities - cpu.probabilities).max() < 1e-4
    assert (gpu.labels == cpu.labels).mean() >= 0.999


def test_cuda_auto_precision_is_fp16_and_close(vitb16_checkpoint):
    image = smooth_image(448, 597)
    classes = ["sky", "horse", "grass", "tree", "person"]
    exact = Segmenter("ViT-B-16", vitb16_checkpoint, device="cuda", precision="fp32")
    half = Segmenter("ViT-B-16", vitb16_checkpoint, device="auto")
    assert half.model.precision == "fp16" and half.device.type == "cuda"
    a = exact.segment(image, classes, templates=["a photo of a {}."])
    b = half.segment(image, classes, templates=["a photo of a {}."])
    assert np.abs(a.similarity - b.similarity).max() < 0.02
    # fp16 moves near-ties only: most pixels keep their class, and every class is still found
    assert (a.labels == b.labels).mean() >= 0.98
    assert set(np.unique(b.labels)) == set(np.unique(a.labels))


def test_cuda_matches_official_reference(vitb16_checkpoint):
    from reference import OfficialReference, official_preprocess

    image = smooth_image(301, 533)
    templates = ["a photo of a {}.", "a bad photo of a {}."]
    classes = ["sky", "horse, pony", "grass"]
    net = open_clip.create_model("ViT-B-16", pretrained=None)
    net.load_state_dict(torch.load(vitb16_checkpoint, weights_only=True))
    reference = OfficialReference(net.eval(), open_clip.get_tokenizer("ViT-B-16"), classes, templates)
    _, ref_prob, ref_labels = reference.predict(official_preprocess(image, 448), image.shape[:2])
    result = Segmenter("ViT-B-16", vitb16_checkpoint, device="cuda", precision="fp32").segment(image, classes,
                                                                                              templates=templates)
    assert np.abs(result.probabilities - ref_prob.numpy()).max() < 1e-4
    assert (result.labels == ref_labels.numpy()).mean() >= 0.999
