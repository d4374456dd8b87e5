"""Model loading choices: QuickGELU for OpenAI weights, defaults, device and precision."""

from __future__ import annotations

import open_clip
import pytest
import torch

import napari_clearclip.models as models
from napari_clearclip import Segmenter


def test_openai_weights_get_quickgelu(monkeypatch):
    calls = []
    original = open_clip.create_model

    def fake_create(name, pretrained=None, **kwargs):
        calls.append((name, pretrained, kwargs))
        return original("test-tiny", pretrained=None, force_quick_gelu=kwargs.get("force_quick_gelu", False))

    monkeypatch.setattr(models, "_weights_cached", lambda cfg: True)
    monkeypatch.setattr(open_clip, "create_model", fake_create)
    Segmenter("ViT-B-16", "openai", device="cpu")
    assert calls[-1][:2] == ("ViT-B-16", "openai") and calls[-1][2]["force_quick_gelu"] is True
    Segmenter("ViT-B-16", "laion2b_s34b_b88k", device="cpu")
    assert calls[-1][2]["force_quick_gelu"] is False


def test_quickgelu_changes_the_activation():
    plain = open_clip.create_model("test-tiny", pretrained=None)
    quick = open_clip.create_model("test-tiny", pretrained=None, force_quick_gelu=True)
    assert type(plain.visual.transformer.resblocks[0].mlp.gelu).__name__ == "GELU"
    assert type(quick.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"


def test_defaults_and_resolution():
    assert models.default_pretrained("ViT-B-16") == "openai"
    assert models.default_pretrained("synthetic-tiny") == "bundled"
    assert models.resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert models.resolve_precision("auto", torch.device("cuda")) == "fp16"
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert models.resolve_device("auto").type == expected
    assert models.default_options("ViT-B-16") == {"short_side": 448, "crop": 448, "stride": 224, "logit_scale": 50.0}
    assert models.default_options("ViT-B-16", "resclip") == {"short_side": 336, "crop": 224, "stride": 112,
                                                             "logit_scale": 40.0}   # ResCLIP's official settings
    assert models.default_options("synthetic-tiny")["crop"] == 64
    assert models.default_options("synthetic-tiny", "resclip")["crop"] == 64      # a model's own scale wins
    assert "synthetic-tiny" in models.available_models()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_asking_for_missing_cuda_is_a_clear_error(tiny_checkpoint):
    with pytest.raises(models.ModelLoadError, match="sees no CUDA GPU") as info:
        Segmenter("test-tiny", tiny_checkpoint, device="cuda")
    # in words the widget (Device), the command line (--device) and the API (device=) all read
    assert "the device 'cpu' or 'auto'" in str(info.value) and "device=" not in str(info.value)


def test_non_vit_models_are_refused_before_building():
    for name, reason in [("RN50", "not a plain ViT"), ("coca_base", "CoCa"), ("convnext_base", "not a plain ViT")]:
        with pytest.raises(models.ModelLoadError, match=f"{name!r} cannot run ClearCLIP: .*{reason}") as info:
            Segmenter(name, device="cpu")
        assert isinstance(info.value, ValueError)


def test_model_list_holds_only_models_whose_towers_fit_clearclip():
    """Every listed model builds a plain ViT image tower and a CLIP text tower (built on the meta device: no memory)."""
    from open_clip.model import _build_vision_tower
    from torch import nn

    listed = models.segmentable_models()
    assert {"ViT-B-16", "ViT-L-14", "synthetic-tiny"} <= set(listed)
    assert not {"coca_base", "RN50", "convnext_base", "ViT-B-16-SigLIP", "roberta-ViT-B-32"} & set(listed)
    for name in listed:
        cfg = open_clip.get_model_config(name)
        with torch.device("meta"):
            visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=cfg.get("quick_gelu", False))
        assert isinstance(visual, open_clip.transformer.VisionTransformer), name
        assert visual.attn_pool is None, name
        assert all(isinstance(b.attn, nn.MultiheadAttention) for b in visual.transformer.resblocks), name


def _load_random(name, tmp_path_factory=None):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "random.pt"
    torch.save(open_clip.create_model(name, pretrained=None).state_dict(), path)
    return Segmenter(name, str(path), device="cpu")


def test_resized_positions_are_made_once_per_grid_and_follow_the_weights(tiny_checkpoint, rgb_image, monkeypatch):
    import numpy as np

    import napari_clearclip.methods as methods

    resized = []
    real = methods.interpolated_positions
    monkeypatch.setattr(methods, "interpolated_positions",
                        lambda visual, rows, cols: resized.append((rows, cols)) or real(visual, rows, cols))
    segmenter = Segmenter("test-tiny", tiny_checkpoint, device="cpu", feature_store=False)
    first = segmenter.segment(rgb_image, ["sky", "grass"], crop=64, stride=32)
    grids = list(resized)
    assert grids and all(grid != (14, 14) for grid in grids)  # the windows' grid is not the trained one
    segmenter._features.clear()
    again = segmenter.segment(rgb_image, ["sky", "grass"], crop=64, stride=32)
    assert resized == grids  # the second run resized nothing
    assert np.array_equal(again.probabilities, first.probabilities)
    visual = segmenter.model.visual
    rows, cols = grids[0]
    assert torch.equal(segmenter.model.positions(rows, cols), real(visual, rows, cols))
    with torch.no_grad():
        visual.positional_embedding.mul_(2.0)  # weights changed in place: the kept positions are stale
    assert torch.equal(segmenter.model.positions(rows, cols), real(visual, rows, cols))
    segmenter._features.clear()
    changed = segmenter.segment(rgb_image, ["sky", "grass"], crop=64, stride=32)
    assert not np.array_equal(changed.probabilities, first.probabilities)


def test_kept_positions_stay_within_their_memory(tiny_checkpoint, monkeypatch):
    import napari_clearclip.methods as methods

    model = Segmenter("test-tiny", tiny_checkpoint, device="cpu").model
    largest = model.positions(19, 9)
    budget = 3 * largest.numel() * largest.element_size()
    monkeypatch.setattr(models, "POSITIONS_KEPT_BYTES", budget)
    model._positions.clear()
    for rows in range(3, 20):  # many image sizes: never more than the budget held
        kept = model.positions(rows, 9)
        assert torch.equal(kept, methods.interpolated_positions(model.visual, rows, 9))
        assert sum(t.numel() * t.element_size() for t in model._positions.values()) <= budget
    assert model.positions(19, 9) is kept  # the latest is kept
    large = model.positions(60, 60)  # larger than the whole budget: made, not kept
    assert large.shape[0] == 60 * 60 + 1 and model.positions(60, 60) is not large
