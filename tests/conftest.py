"""Test fixtures: every cache in a temporary directory, no network, small random models."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def pytest_configure(config):
    import tempfile

    base = tempfile.mkdtemp(prefix="clearclip-tests-")
    config._clearclip_base = base  # removed when the session ends (pytest_unconfigure)
    os.environ["NAPARI_CLEARCLIP_CACHE_DIR"] = os.path.join(base, "cache")
    os.environ["NAPARI_CLEARCLIP_CONFIG_DIR"] = os.path.join(base, "config")
    os.environ["HF_HOME"] = os.path.join(base, "hf")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["NAPARI_CLEARCLIP_OFFLINE"] = "1"
    os.environ["XDG_CACHE_HOME"] = os.path.join(base, "xdg-cache")
    os.environ["XDG_CONFIG_HOME"] = os.path.join(base, "xdg-config")
    os.environ["NUMBA_CACHE_DIR"] = os.path.join(base, "numba")  # compiled loops
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    import open_clip

    path = os.path.join(base, "test-tiny.json")
    with open(path, "w") as handle:
        json.dump(TINY_CONFIG, handle)
    open_clip.add_model_config(path)


def pytest_unconfigure(config):
    """The session's caches and settings go with it: a run leaves nothing in the temporary folder."""
    import shutil

    base = getattr(config, "_clearclip_base", None)
    if base:
        shutil.rmtree(base, ignore_errors=True)


def display_problem() -> str | None:
    """Why the widget tests cannot run here (no Qt binding, no display), or None if they can."""
    import sys

    try:
        import qtpy  # noqa: F401
        from qtpy import QtWidgets  # noqa: F401
    except Exception as exc:  # qtpy raises its own error when no binding is installed
        return f"no Qt binding is installed ({exc}); install the testing extra"
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "no display: install Xvfb (and Mesa) so that pytest-xvfb can start a virtual one"
    return None


def pytest_collection_modifyitems(config, items):
    problem = display_problem()
    if problem is None:
        return
    skip = pytest.mark.skip(reason=f"widget test skipped: {problem}")
    for item in items:
        if "gui" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_cache_dir(tmp_path, monkeypatch):
    """Each test starts with its own empty disk cache and no saved widget settings."""
    monkeypatch.setenv("NAPARI_CLEARCLIP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("NAPARI_CLEARCLIP_CONFIG_DIR", str(tmp_path / "config"))


def _random_checkpoint(name: str, path, seed: int) -> str:
    import logging

    import open_clip

    torch.manual_seed(seed)
    logging.disable(logging.WARNING)
    try:
        model = open_clip.create_model(name, pretrained=None)
    finally:
        logging.disable(logging.NOTSET)
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    return _random_checkpoint("test-tiny", tmp_path_factory.mktemp("ckpt") / "tiny.pt", seed=0)


@pytest.fixture(scope="session")
def vitb16_checkpoint(tmp_path_factory) -> str:
    return _random_checkpoint("ViT-B-16", tmp_path_factory.mktemp("ckpt") / "vit-b-16.pt", seed=0)


@pytest.fixture
def tiny_segmenter(tiny_checkpoint):
    from napari_clearclip import Segmenter

    return Segmenter("test-tiny", tiny_checkpoint, device="cpu")


@pytest.fixture
def rgb_image() -> np.ndarray:
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 255, (6, 9, 3)).astype(np.float32)
    from skimage.transform import resize

    smooth = resize(coarse, (180, 260, 3), order=1)
    return np.clip(smooth + rng.normal(0, 10, smooth.shape), 0, 255).astype(np.uint8)



def small_model_options(name: str) -> dict:
    """Register one of tests/models (small models of other architectures and recipes than the demo's, trained for
    tests and benchmarks only) and return the Segmenter arguments that load it."""
    from pathlib import Path

    import open_clip

    from napari_clearclip.choices import MODEL_OPTIONS

    folder = Path(__file__).parent / "models"
    open_clip.add_model_config(str(folder / f"{name}.json"))
    MODEL_OPTIONS.setdefault(name, MODEL_OPTIONS["synthetic-tiny"])
    return {"model": name, "pretrained": str(folder / f"{name}.pt"), "device": "cpu"}


@pytest.fixture(scope="session")
def small_models():
    """Name -> Segmenter arguments of a model of tests/models."""
    return small_model_options


@pytest.fixture(scope="session")
def second_model_options():
    """tests/models/synthetic-tiny-b: 6 layers of width 96 with QuickGELU, trained with another recipe."""
    return small_model_options("synthetic-tiny-b")


@pytest.fixture
def served():
    """``served(folder, listing=True)``: the address of ``folder`` served over HTTP on 127.0.0.1 (a remote store, as
    napari-ome-zarr reads one), until the test ends; with ``listing=False`` no folder's contents are listed.
    ``served.requested``: the paths asked for."""
    import functools
    import http.server
    import threading

    requested = []

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            requested.append(self.path)

    class Unlisted(Quiet):   # as most web servers and object stores: no folder's contents
        def list_directory(self, path):
            self.send_error(404)

    class Server(http.server.ThreadingHTTPServer):
        request_queue_size = 64   # (fsspec asks for many chunks at once: a short queue drops them for a second)

    servers = []

    def serve(folder, listing: bool = True) -> str:
        handler = Quiet if listing else Unlisted
        server = Server(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    serve.requested = requested   # the paths asked for, in order
    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()
