"""FOUND (Simeoni et al., CVPR 2023): a foreground map from DINO's keys and a 1 x 1 convolution.

CLIP-DIY fuses its crop scores with FOUND's saliency. FOUND reads the keys of the last block of a
self-supervised DINO ViT-S/8 for each patch token (heads concatenated, 384 values), maps them to one
logit with a 1 x 1 convolution (its released ``decoder_weights.pt``), resizes the logits bilinearly by
8 and takes the sigmoid. The image is normalised with ImageNet's statistics and zero-padded to a
multiple of 8; the positional embeddings are interpolated bicubically with DINO's scale ((g + 0.1) / 28).

Bounded here in two ways, unlike the official code (whose attention maps take 6 GB per block at
1024 x 1024): attention runs fused (``scaled_dot_product_attention``: no token x token matrix is kept),
the last block's attention is not computed at all (only its keys are read), and images whose long
side exceeds :data:`FOUND_MAX_SIDE` are first reduced to it (bilinear, antialiased); the map is then
resized to the working size of the method like any other foreground map.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import CheckpointNotFoundError, ModelLoadError, WeightsUnavailableError
from .progress import Progress

#: Longest side FOUND sees; larger images are reduced to it (CLIP-DIY itself works at 256 x 256).
FOUND_MAX_SIDE = 512
PATCH = 8
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Where FOUND's code downloads its weights (into torch's hub cache) when no local files are named.
DINO_URL = "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_300ep_pretrain/dino_deitsmall8_300ep_pretrain.pth"
DECODER_URL = "https://raw.githubusercontent.com/valeoai/FOUND/main/data/weights/decoder_weights.pt"


class FoundModel(torch.nn.Module):
    """DINO ViT-S/8 (timm's ``vit_small_patch8_224`` architecture) and FOUND's 1 x 1 decoder."""

    def __init__(self, encoder: torch.nn.Module, decoder: torch.nn.Conv2d):
        super().__init__()
        self.encoder, self.decoder = encoder.eval(), decoder.eval()


def _unwrap_dino(state) -> dict:
    """A DINO backbone's state dict from a plain, a training (teacher/student) or a wrapped checkpoint."""
    if isinstance(state, dict):
        for key in ("teacher", "student", "model", "state_dict"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise ModelLoadError("The DINO checkpoint holds no state dict.")
    clean = {}
    for name, value in state.items():
        for prefix in ("module.", "backbone."):
            if name.startswith(prefix):
                name = name[len(prefix):]
        if not name.startswith("head."):
            clean[name] = value
    return clean


def _read(path, what: str) -> dict:
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointNotFoundError(f"The {what} file {str(path)!r} does not exist.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"Could not read the {what} {str(path)!r}: {exc}") from None


def _download(url: str, what: str) -> dict:
    """From torch's hub cache, downloading once with a network; offline and not cached: a clear error at once."""
    from urllib.parse import urlparse

    from .models import network_available

    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if not cached.is_file() and not network_available(urlparse(url).hostname):
        raise WeightsUnavailableError(
            f"FOUND's {what} are not in torch's cache and there is no network connection to download them. "
            "Name local files: found_weights=(dino_checkpoint, decoder_checkpoint), e.g. "
            "dino_deitsmall8_300ep_pretrain.pth and FOUND's decoder_weights.pt.", model="FOUND")
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsUnavailableError(f"Could not download FOUND's {what}: {exc}. Name local files instead: "
                                      "found_weights=(dino_checkpoint, decoder_checkpoint).", model="FOUND") from None


def check_found_weights(found_weights: Sequence | None) -> tuple[str, str] | None:
    """Absolute paths of two existing files, or None when both are cached or downloadable; else a clear error."""
    if found_weights is None:
        from urllib.parse import urlparse

        from .models import network_available

        for url in (DINO_URL, DECODER_URL):
            cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
            if not cached.is_file() and not network_available(urlparse(url).hostname):
                _download(url, "weights")  # raises the offline error
        return None
    if isinstance(found_weights, (str, Path)) or len(found_weights) != 2:
        raise ModelLoadError(f"found_weights={found_weights!r} must name two files: (DINO ViT-S/8 checkpoint, "
                             "FOUND decoder checkpoint).")
    paths = tuple(Path(p).expanduser().resolve() for p in found_weights)
    for path, what in zip(paths, ("DINO checkpoint", "FOUND decoder")):
        if not path.is_file():
            raise CheckpointNotFoundError(f"The {what} file {str(path)!r} does not exist.")
    return tuple(str(p) for p in paths)


def load_found(found_weights: Sequence | None = None, device: torch.device | str = "cpu") -> FoundModel:
    """FOUND from ``(dino_checkpoint, decoder_checkpoint)`` files, or (None) from torch's hub cache / the network."""
    import timm

    if found_weights is None:
        dino, decoder_state = _download(DINO_URL, "DINO weights"), _download(DECODER_URL, "decoder weights")
    else:
        if isinstance(found_weights, (str, Path)) or len(found_weights) != 2:
            raise ModelLoadError(f"found_weights={found_weights!r} must name two files: (DINO ViT-S/8 checkpoint, "
                                 "FOUND decoder checkpoint).")
        dino, decoder_state = _read(found_weights[0], "DINO checkpoint"), _read(found_weights[1], "FOUND decoder")
    encoder = timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=0)
    try:
        encoder.load_state_dict(_unwrap_dino(dino), strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"The DINO checkpoint is not a ViT-S/8 (DINO's vit_small, patch 8): {exc}") from None
    if isinstance(decoder_state, dict) and isinstance(decoder_state.get("decoder"), dict):
        decoder_state = decoder_state["decoder"]
    decoder = torch.nn.Conv2d(encoder.embed_dim, 1, (1, 1))
    try:
        decoder.load_state_dict(decoder_state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise ModelLoadError(f"The FOUND decoder checkpoint is not a 1 x 1 convolution from {encoder.embed_dim} "
                             f"channels (FOUND's decoder_weights.pt, {{'decoder': state_dict}}): {exc}") from None
    return FoundModel(encoder, decoder).to(device)


def dino_positions(encoder: torch.nn.Module, rows: int, cols: int) -> torch.Tensor:
    """DINO's positional embeddings for a rows x cols grid: bicubic with scale ((g + 0.1) / trained side)."""
    pos = encoder.pos_embed
    trained = pos.shape[1] - 1
    if rows * cols == trained and rows == cols:
        return pos
    side = int(math.sqrt(trained))
    dim = pos.shape[-1]
    grid = pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic")
    assert grid.shape[-2:] == (rows, cols), grid.shape
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)], dim=1)


def _block(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A DINO block with fused attention: no (tokens x tokens) matrix is kept."""
    attn = block.attn
    batch, tokens, width = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(batch, tokens, 3, attn.num_heads, width // attn.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, width)
    x = x + block.ls1(attn.proj(out))
    return x + block.ls2(block.mlp(block.norm2(x)))


def found_input(array: np.ndarray, max_side: int = FOUND_MAX_SIDE) -> torch.Tensor:
    """(1, 3, h, w) ImageNet-normalised image (reduced to ``max_side``), from any image the engine takes."""
    from .image import to_rgb_255

    rgb, _ = to_rgb_255(array)
    values = rgb[None] / 255.0
    height, width = values.shape[-2:]
    if max(height, width) > max_side:
        scale = max_side / max(height, width)
        size = (max(PATCH, round(height * scale)), max(PATCH, round(width * scale)))
        values = F.interpolate(values, size=size, mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (values - mean) / std


@torch.inference_mode()
def found_foreground_steps(model: FoundModel, array: np.ndarray, device, max_side: int = FOUND_MAX_SIDE):
    """Generator: FOUND's foreground probability (h, w) of an image, yielding progress per block."""
    image = found_input(array, max_side).to(device)
    height, width = image.shape[-2:]
    padded = F.pad(image, (0, (-width) % PATCH, 0, (-height) % PATCH))
    encoder = model.encoder
    x = encoder.patch_embed.proj(padded)
    rows, cols = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([encoder.cls_token.expand(len(x), -1, -1), x], dim=1) + dino_positions(encoder, rows, cols)
    blocks = encoder.blocks
    yield Progress("foreground", 0, len(blocks))
    for number, block in enumerate(blocks[:-1], start=1):
        x = _block(block, x)
        yield Progress("foreground", number, len(blocks))
    last = blocks[-1]
    width_ = x.shape[-1]
    keys = F.linear(last.norm1(x), last.attn.qkv.weight[width_ : 2 * width_], last.attn.qkv.bias[width_ : 2 * width_])
    keys = keys[:, 1:].reshape(1, rows, cols, width_).permute(0, 3, 1, 2)
    logits = F.interpolate(model.decoder(keys), scale_factor=PATCH, mode="bilinear", align_corners=False)
    yield Progress("foreground", len(blocks), len(blocks))
    return torch.sigmoid(logits[0, 0, :height, :width]).float().cpu()


def found_foreground(model: FoundModel, array: np.ndarray, device="cpu", max_side: int = FOUND_MAX_SIDE) -> np.ndarray:
    """FOUND's foreground probability map of an image (at most ``max_side`` on its long side), as numpy."""
    from .progress import run_to_end

    return run_to_end(found_foreground_steps(model, array, device, max_side)).numpy()
