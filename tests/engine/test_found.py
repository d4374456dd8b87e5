"""FOUND's foreground maps: equal to its official code on random DINO weights, weights from local files in DINO's
formats, a clear error offline, and the map fused into CLIP-DIY."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from images import smooth_image

from napari_clearclip import Segmenter
from napari_clearclip.errors import CheckpointNotFoundError, ModelLoadError, WeightsUnavailableError
from napari_clearclip.found import found_foreground, load_found

from reference import official_found


@pytest.fixture(scope="module")
def found_files(tmp_path_factory):
    import timm

    torch.manual_seed(0)
    encoder = timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=0).eval()
    decoder = torch.nn.Conv2d(384, 1, (1, 1))
    folder = tmp_path_factory.mktemp("found")
    # DINO's training checkpoints keep the backbone under teacher/backbone.; the released one is plain
    torch.save({"teacher": {f"backbone.{k}": v for k, v in encoder.state_dict().items()}}, folder / "dino_full.pth")
    torch.save(encoder.state_dict(), folder / "dino.pth")
    torch.save({"decoder": decoder.state_dict()}, folder / "decoder_weights.pt")
    return folder, encoder, decoder.eval()


@pytest.mark.parametrize("size", [(100, 130), (64, 64), (224, 224)])
def test_found_matches_its_official_code(found_files, size):
    folder, encoder, decoder = found_files
    model = load_found((folder / "dino.pth", folder / "decoder_weights.pt"))
    image = smooth_image(*size, seed=5)
    ours = found_foreground(model, image)
    expected = official_found(encoder, decoder, image)
    assert ours.shape == expected.shape == size
    assert np.abs(ours - expected).max() < 1e-5
    assert ours.std() > 1e-4  # a map, not a constant


def test_found_loads_dino_training_checkpoints_and_reduces_large_images(found_files):
    folder, encoder, decoder = found_files
    model = load_found((folder / "dino_full.pth", folder / "decoder_weights.pt"))
    image = smooth_image(700, 350, seed=6)
    saliency = found_foreground(model, image, max_side=128)
    assert saliency.shape == (128, 64)
    assert ((saliency >= 0) & (saliency <= 1)).all()


def test_found_weights_errors(found_files, tmp_path, monkeypatch):
    folder, _, _ = found_files
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        load_found((tmp_path / "missing.pth", folder / "decoder_weights.pt"))
    with pytest.raises(ModelLoadError, match="ViT-S/8"):
        torch.save({"pos_embed": torch.zeros(1, 5, 384)}, tmp_path / "other.pth")
        load_found((tmp_path / "other.pth", folder / "decoder_weights.pt"))
    with pytest.raises(ModelLoadError, match="1 x 1 convolution"):
        load_found((folder / "dino.pth", folder / "dino.pth"))
    with pytest.raises(ModelLoadError, match="two files"):
        load_found(str(folder / "dino.pth"))
    monkeypatch.setenv("NAPARI_CLEARCLIP_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match="found_weights"):
        load_found(None)
    assert time.monotonic() - start < 5


def test_clipdiy_with_found(found_files, tiny_checkpoint):
    folder, encoder, decoder = found_files
    weights = (folder / "dino.pth", folder / "decoder_weights.pt")
    seg = Segmenter("test-tiny", tiny_checkpoint, method="clipdiy", device="cpu", feature_store=False)
    image = smooth_image(96, 120, seed=7)
    classes = ["background", "cat", "dog"]
    first = list(seg.segment_steps(image, classes, foreground="found", found_weights=weights))
    assert "foreground" in {p.stage for p in first}
    result = seg.segment(image, classes, foreground="found", found_weights=weights)
    saliency = official_found(encoder, decoder, image)
    expected = seg.segment(image, classes, foreground=saliency)
    np.testing.assert_allclose(result.probabilities, expected.probabilities, atol=1e-5)
    stages = {p.stage for p in seg.segment_steps(image, classes, foreground="found", found_weights=weights)}
    assert "foreground" not in stages  # the image's map is kept: a re-run does not compute it again
