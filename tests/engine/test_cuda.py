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


@pytest.mark.parametrize("method", ["clearclip", "maskclip", "sclip", "naclip", "vanilla", "resclip", "clipdiy"])
def test_cuda_every_method_matches_cpu(tiny_checkpoint, rgb_image, method):
    classes = ["sky", "horse, pony", "grass", "background"]
    options = dict(crop=64, stride=32) if method != "clipdiy" else {}
    cpu = Segmenter("test-tiny", tiny_checkpoint, device="cpu", method=method).segment(rgb_image, classes, **options)
    gpu = Segmenter("test-tiny", tiny_checkpoint, device="cuda", precision="fp32", method=method).segment(
        rgb_image, classes, **options)
    assert np.abs(gpu.probabilities - cpu.probabilities).max() < 1e-4
    assert (gpu.labels == cpu.labels).mean() >= 0.999


def test_cuda_strokes_and_snapping_match_cpu(tiny_checkpoint):
    image = smooth_image(200, 260, seed=3)
    classes = ["sky", "horse", "grass"]
    strokes = np.zeros(image.shape[:2], np.int32)
    strokes[40:46, 30:90] = 2
    strokes[150:154, 100:200] = 3
    options = dict(crop=64, stride=32, strokes=strokes, refine="pamr")
    cpu = Segmenter("test-tiny", tiny_checkpoint, device="cpu").segment(image, classes, **options)
    gpu = Segmenter("test-tiny", tiny_checkpoint, device="cuda", precision="fp32").segment(image, classes, **options)
    assert np.abs(gpu.probabilities - cpu.probabilities).max() < 1e-4
    assert (gpu.labels == cpu.labels).mean() >= 0.999
    # labels alone take the tiled path (computed on the host): equal to the labels of the maps
    labels_only = Segmenter("test-tiny", tiny_checkpoint, device="cuda", precision="fp32").segment(
        image, classes, maps=False, **options)
    assert (labels_only.labels == gpu.labels).mean() >= 0.999


def test_cuda_tiled_equals_whole_image(tiny_checkpoint):
    image = smooth_image(300, 410, seed=4)
    classes = ["sky", "horse", "grass"]
    seg = Segmenter("test-tiny", tiny_checkpoint, device="cuda", precision="fp32")
    options = dict(crop=64, stride=32, refine="pamr", pamr_iterations=3)
    whole = seg.segment(image, classes, short_side=None, maps=False, **options).labels
    tiled = seg.segment_tiled(image, classes, tile=96, **options)
    assert np.array_equal(tiled, whole)


def test_cuda_found_matches_cpu(tmp_path):
    import timm

    from napari_clearclip.found import found_foreground, load_found

    torch.manual_seed(0)
    encoder = timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=0).eval()
    torch.save(encoder.state_dict(), tmp_path / "dino.pth")
    torch.save({"decoder": torch.nn.Conv2d(384, 1, (1, 1)).state_dict()}, tmp_path / "decoder.pt")
    files = (tmp_path / "dino.pth", tmp_path / "decoder.pt")
    image = smooth_image(150, 200, seed=6)
    cpu = found_foreground(load_found(files), image)
    gpu = found_foreground(load_found(files, device="cuda"), image, device="cuda")
    assert np.abs(gpu - cpu).max() < 1e-4


def test_cuda_runs_that_snap_never_wait_for_the_host_loops_to_compile(tiny_checkpoint, monkeypatch):
    """The host's compiled loops are made in the background (11 s on a cold cache) on a GPU too: snapping on the GPU
    never asks for them, and labels alone (snapped on the host) take the element-wise path until they are ready."""
    import threading

    from napari_clearclip import compiled_snapping

    compiling, release = [], threading.Event()

    def slow_ready():
        compiling.append(threading.current_thread().name)
        release.wait(60)
        return False
    monkeypatch.setattr(compiled_snapping, "_compiled", None)
    monkeypatch.setattr(compiled_snapping, "_warming", None)
    monkeypatch.setattr(compiled_snapping, "_ready", slow_ready)
    segmenter = Segmenter("test-tiny", tiny_checkpoint, device="cuda", precision="fp32")
    image = smooth_image(200, 260, seed=3)
    results = [segmenter.segment(image, ["sky", "horse", "grass"], crop=64, stride=32, refine="pamr", maps=maps)
               for maps in (True, False)]
    release.set()
    compiled_snapping._warming.join(30)
    assert compiling == ["clearclip-compile"]
    assert (results[0].labels == results[1].labels).mean() >= 0.999
