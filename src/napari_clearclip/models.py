"""Loading CLIP models: open_clip names, pretrained tags, local checkpoints, bundled demo weights."""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import open_clip
import torch
from torch import nn

from .cache import file_digest
from .demo import DEMO_DIR
from .choices import CHECKPOINT_SUFFIXES, COMMON_MODELS, DEMO_MODEL, DEVICES, PRECISIONS, default_options  # noqa: F401
from .errors import CheckpointNotFoundError, ModelLoadError, WeightsUnavailableError

BUNDLED_WEIGHTS = {DEMO_MODEL: DEMO_DIR / f"{DEMO_MODEL}.pt"}
BUNDLED_TAG = "bundled"
# The official ClearCLIP configs normalise with these 0-255 values (rounded OpenAI CLIP statistics).
OPENAI_MEAN_255 = (122.771, 116.746, 104.094)
OPENAI_STD_255 = (68.501, 66.632, 70.323)

open_clip.add_model_config(DEMO_DIR / f"{DEMO_MODEL}.json")


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load, the one identity the widget, the API and every dask worker share."""

    model: str = "ViT-B-16"
    pretrained: str | None = None
    method: str = "clearclip"
    device: str = "auto"
    precision: str = "auto"


#: Memory for positional embeddings kept resized per window grid (:meth:`LoadedModel.positions`): 13 grids of
#: 448 x 448 windows on a ViT-B/16.
POSITIONS_KEPT_BYTES = 32 << 20


@dataclass
class LoadedModel:
    """A frozen CLIP model ready for dense inference, with what the pipeline needs to know of it."""

    clip: nn.Module
    tokenizer: Any
    name: str
    weights_id: str
    device: torch.device
    precision: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    _positions: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def visual(self) -> nn.Module:
        return self.clip.visual

    def positions(self, rows: int, cols: int) -> torch.Tensor:
        """The positional embeddings for a rows x cols patch grid, resized once per grid and kept.

        The weights are frozen, so the resize gives the same tensor every time; on a GPU its bicubic kernel
        is slow (3 ms a call on an H200, a seventh of a 448 x 597 image's whole run). Call it within
        :meth:`autocast`, as the encoders do. A change to the weights in place is noticed (their version).
        """
        from .methods import interpolated_positions

        embedding = self.visual.positional_embedding
        key = (rows, cols, embedding.device, embedding.dtype, embedding._version, self.precision)
        kept = self._positions.get(key)
        if kept is None:
            kept = interpolated_positions(self.visual, rows, cols)
            size = kept.numel() * kept.element_size()
            if size <= POSITIONS_KEPT_BYTES:  # a window as large as a whole slide is resized each time
                held = sum(t.numel() * t.element_size() for t in list(self._positions.values()))  # other threads
                if held + size > POSITIONS_KEPT_BYTES:  # grids of many image sizes: the latest are kept
                    self._positions.clear()
                self._positions[key] = kept
        return kept

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.clip.visual.patch_size)

    @property
    def cache_id(self) -> str:
        return f"{self.name}|{self.weights_id}|{self.precision}"

    def autocast(self):
        """Mixed precision for bf16; fp16 runs in the weights' dtype; fp32 stays exact (no TF32 convolutions)."""
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        if self.precision == "fp32" and self.device.type == "cuda":
            return torch.backends.cudnn.flags(enabled=True, allow_tf32=False)
        return contextlib.nullcontext()


def available_models() -> list[str]:
    """Every model name open_clip knows (its configs, plus the bundled demo model)."""
    return open_clip.list_models()


def unsupported_reason(model: str) -> str | None:
    """Why ``model`` cannot run ClearCLIP here (from its config, nothing built), or None if it can."""
    cfg = open_clip.get_model_config(model) or {}
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    if not cfg:
        return "it has no open_clip config"
    if "timm_model_name" in vision or isinstance(vision.get("layers"), (list, tuple)):
        return "its image tower is not a plain ViT (ResNet, ConvNeXt or a timm model)"
    if "multimodal_cfg" in cfg or vision.get("attentional_pool"):
        return "it pools image tokens with attention (CoCa), so its patch tokens are not in the text space"
    if "hf_model_name" in text or "hf_tokenizer_name" in text:
        return "its text tower or tokenizer comes from Hugging Face transformers (downloaded at run time)"
    return None


def segmentable_models() -> list[str]:
    """The models ClearCLIP can run on: open_clip ViTs with a CLIP text tower, plus the bundled demo model."""
    return [m for m in available_models() if unsupported_reason(m) is None]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn ``"auto"`` into cuda, then mps, then cpu; check an explicit device exists."""
    name = str(device).lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"The device {name!r} was asked for, but this PyTorch sees no CUDA GPU: use the device "
                             "'cpu' or 'auto'.")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelLoadError("The device 'mps' was asked for, but Apple Metal is not available here: use the device 'cpu' "
                             "or 'auto'.")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ModelLoadError(f"Unknown device {device!r}: use one of {', '.join(DEVICES)}.") from None


def device_there(device: str | torch.device = "auto") -> bool:
    """Whether ``device`` is there to run a model on (loading the model says why not)."""
    try:
        resolve_device(device)
    except ModelLoadError:
        return False
    return True


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` is fp16 on a GPU (as the official code) and exact fp32 on the CPU."""
    if precision not in PRECISIONS:
        raise ModelLoadError(f"Unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}.")
    if precision == "auto":
        return "fp16" if device.type in ("cuda", "mps") else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise ModelLoadError("The precision 'fp16' needs a GPU; on the CPU use 'bf16' (fast where the CPU supports it) "
                             "or 'fp32'.")
    return precision


def is_checkpoint_path(pretrained: str) -> bool:
    return os.path.sep in pretrained or pretrained.endswith(CHECKPOINT_SUFFIXES) or os.path.exists(pretrained)


def default_pretrained(model: str) -> str:
    """The weights used when none are named: bundled for the demo model, else OpenAI's."""
    if model in BUNDLED_WEIGHTS:
        return BUNDLED_TAG
    tags = open_clip.list_pretrained_tags_by_model(model)
    if "openai" in tags:
        return "openai"
    if tags:
        return tags[0]
    raise ModelLoadError(
        f"open_clip knows no pretrained weights for {model!r}. Pass a local checkpoint: pretrained='/path/to/weights.pt'."
    )


def load_model(
    model: str = "ViT-B-16",
    pretrained: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    precision: str = "auto",
) -> LoadedModel:
    """Build ``model`` with ``pretrained`` weights (tag, checkpoint path, or None for the default)."""
    _check_model_name(model)
    torch_device = resolve_device(device)
    precision = resolve_precision(precision, torch_device)
    pretrained = default_pretrained(model) if pretrained in (None, "") else os.fspath(pretrained)

    if pretrained == BUNDLED_TAG and model in BUNDLED_WEIGHTS:
        clip = _from_checkpoint(model, BUNDLED_WEIGHTS[model])
        weights_id = f"bundled:{file_digest(BUNDLED_WEIGHTS[model])}"
    elif is_checkpoint_path(pretrained):
        path = _check_checkpoint_path(Path(pretrained).expanduser())
        clip = _from_checkpoint(model, path)
        weights_id = f"file:{file_digest(path)}"
    else:
        clip = _from_pretrained_tag(model, pretrained)
        weights_id = f"tag:{pretrained}"

    visual = clip.visual
    if not isinstance(visual, open_clip.transformer.VisionTransformer):
        raise ModelLoadError(f"{model!r} has a {type(visual).__name__} image tower; ClearCLIP needs a ViT model "
                             "(for example ViT-B-16).")
    blocks = visual.transformer.resblocks
    if not all(isinstance(getattr(b, "attn", None), nn.MultiheadAttention) for b in blocks) or visual.attn_pool is not None:
        raise ModelLoadError(f"{model!r} uses a custom attention block or attention pooling, which ClearCLIP does "
                             "not support. Use a standard ViT model.")

    clip.eval().requires_grad_(False)
    clip.to(torch_device, dtype=torch.float16 if precision == "fp16" else torch.float32)
    mean, std = _normalisation(visual)
    return LoadedModel(
        clip=clip,
        tokenizer=open_clip.get_tokenizer(model),
        name=model,
        weights_id=weights_id,
        device=torch_device,
        precision=precision,
        mean=mean,
        std=std,
    )


def _check_model_name(model: str) -> None:
    if not isinstance(model, str):
        raise ModelLoadError(f"model={model!r} must be a model name such as 'ViT-B-16'.")
    known = available_models()
    if model not in known:
        close = difflib.get_close_matches(model, segmentable_models(), n=3)
        common = ", ".join(repr(m) for m in COMMON_MODELS)
        hint = (f" Did you mean {', '.join(repr(c) for c in close)}?" if close
                else f" Common ones: {common}, or {DEMO_MODEL!r} offline (every one: "
                     "napari_clearclip.models.segmentable_models(), or the widget's Model list).")
        raise ModelLoadError(f"Unknown model {model!r}.{hint}")
    reason = unsupported_reason(model)
    if reason:
        raise ModelLoadError(f"{model!r} cannot run ClearCLIP: {reason}. Use a ViT model such as 'ViT-B-16'.")


def _check_checkpoint_path(path: Path) -> Path:
    if path.is_dir():
        raise ModelLoadError(f"{path} is a folder, not a checkpoint file: choose the .pt/.pth/.safetensors file inside it.")
    if not path.is_file():
        raise CheckpointNotFoundError(
            f"Checkpoint file not found: {path}. Check the path, or use a pretrained tag such as 'openai'.")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"Checkpoint {path} is empty (0 bytes): the download or copy was probably interrupted.")
    return path


def _normalisation(visual: nn.Module) -> tuple[tuple, tuple]:
    cfg = getattr(visual, "preprocess_cfg", {}) or {}
    mean = tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD))
    if all(abs(a - b) < 1e-6 for a, b in zip(mean + std, open_clip.OPENAI_DATASET_MEAN + open_clip.OPENAI_DATASET_STD)):
        return OPENAI_MEAN_255, OPENAI_STD_255
    return tuple(255.0 * m for m in mean), tuple(255.0 * s for s in std)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, TorchScript archive, pickle of arbitrary objects ...
        raise ModelLoadError(
            f"Could not read checkpoint {path}: {exc}. Save it with torch.save(model.state_dict(), path)."
        ) from None
    state = _unwrap_state_dict(state)
    if state is None:
        raise ModelLoadError(f"{path} is not a state dict. Save it with torch.save(model.state_dict(), path).")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "net", "weights")


def _unwrap_state_dict(state) -> dict[str, torch.Tensor] | None:
    """The state dict itself, or the one a training checkpoint wraps (``{"model": sd, "epoch": ...}``)."""
    for _ in range(3):
        if not isinstance(state, dict):
            return None
        if state and all(isinstance(v, torch.Tensor) for v in state.values()):
            return state
        inner = next((state[k] for k in WRAPPER_KEYS if isinstance(state.get(k), dict)), None)
        if inner is None:
            return None
        state = inner
    return None


class _DropRandomInitWarning(logging.Filter):
    """Hides open_clip's "initialized randomly" warning for this thread only (our model gets weights next)."""

    def __init__(self):
        super().__init__()
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.thread == self.thread and "No pretrained weights loaded" in record.getMessage())


@contextlib.contextmanager
def _quiet_random_init():
    """Create a model without open_clip's random-init warning, leaving every other log message alone."""
    quiet = _DropRandomInitWarning()
    loggers = [logging.getLogger(), logging.getLogger("open_clip")]
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


def _from_checkpoint(model: str, path: Path) -> nn.Module:
    with _quiet_random_init():
        clip = open_clip.create_model(model, pretrained=None)
    state = _read_state_dict(Path(path))
    expected = clip.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} (model has {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong_shape:
        details = []
        if wrong_shape:
            details.append("shape mismatch: " + "; ".join(wrong_shape[:3]))
        if missing:
            details.append(f"{len(missing)} missing keys, e.g. {', '.join(missing[:3])}")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected keys, e.g. {', '.join(unexpected[:3])}")
        raise ModelLoadError(
            f"Checkpoint {path} does not match model {model!r} ({'; '.join(details)}). "
            "Choose the model the checkpoint was saved from."
        )
    clip.load_state_dict(state)
    return clip


def _weights_cached(cfg: dict) -> bool:
    """Whether open_clip can load these weights without the network."""
    if "file" in cfg:
        return True
    hub = cfg.get("hf_hub", "")
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            pass
        else:
            repo, filename = os.path.split(hub)
            names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
            if filename.endswith((".bin", ".pth")):
                names.insert(0, filename.rsplit(".", 1)[0] + ".safetensors")
            if any(isinstance(try_to_load_from_cache(repo, n), str) for n in names):
                return True
    url = cfg.get("url", "")
    return bool(url) and os.path.isfile(os.path.expanduser(os.path.join("~/.cache/clip", os.path.basename(url))))


def network_available(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """A quick reachability probe, so that offline use fails in seconds rather than after retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or os.environ.get("NAPARI_CLEARCLIP_OFFLINE"):
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _from_pretrained_tag(model: str, tag: str) -> nn.Module:
    tags = open_clip.list_pretrained_tags_by_model(model)
    if tag not in tags:
        known = f"Known tags for {model}: {', '.join(tags)}." if tags else f"open_clip has no pretrained weights for {model}."
        raise ModelLoadError(f"Unknown pretrained weights {tag!r} for {model!r}. {known} Or pass a local checkpoint path.")
    cfg = open_clip.get_pretrained_cfg(model, tag)
    host = urlparse(cfg.get("url", "")).hostname if not cfg.get("hf_hub") else "huggingface.co"
    if not _weights_cached(cfg) and not network_available(host or "huggingface.co"):
        raise WeightsUnavailableError(
            f"The {model} '{tag}' weights are not in the local cache and there is no network connection to download them. "
            f"Connect once to let open_clip download and cache them, or pass a local checkpoint file saved with "
            f"torch.save(model.state_dict(), path): {_local_checkpoint_hint(model, cfg)}.",
            model=model, tag=tag,
        )
    try:
        return open_clip.create_model(model, pretrained=tag, force_quick_gelu=bool(cfg.get("quick_gelu")))
    except Exception as exc:
        raise WeightsUnavailableError(
            f"Could not download or load the {model} '{tag}' weights: {exc}. "
            f"Check the network connection, or pass a local checkpoint: {_local_checkpoint_hint(model, cfg)}.",
            model=model, tag=tag,
        ) from None


def local_checkpoint_model(model: str, tag: str) -> str:
    """The model name that rebuilds ``tag``'s weights from a local file: the QuickGELU variant for OpenAI's."""
    cfg = open_clip.get_pretrained_cfg(model, tag) if tag in open_clip.list_pretrained_tags_by_model(model) else {}
    if cfg.get("quick_gelu") and not model.endswith("-quickgelu") and f"{model}-quickgelu" in available_models():
        return f"{model}-quickgelu"
    return model


def _local_checkpoint_hint(model: str, cfg: dict) -> str:
    name = f"{model}-quickgelu" if cfg.get("quick_gelu") and f"{model}-quickgelu" in available_models() else model
    hint = f"Segmenter(model={name!r}, pretrained='/path/to/checkpoint.pt')"
    if name != model:
        hint += f" (the {name} model builds the QuickGELU activation these weights were trained with)"
    return hint
