"""What a user can choose, in one torch-free place: methods (a line each), devices, precisions, checkpoint
files, the bundled demo model and each model's window defaults.

The engine, the widget and the command line read these names from here, so that they never
drift apart and ``clearclip-segment --help`` needs no model library.
"""

from __future__ import annotations

#: The dense methods, each with the line the widget's tooltip and the docs show.
METHOD_DESCRIPTIONS = {
    "clearclip": "ClearCLIP (default): q-q attention in the last block, no residual, no feed-forward",
    "maskclip": "MaskCLIP: the last block reduced to its value projection",
    "sclip": "SCLIP: q-q plus k-k attention, residual and feed-forward kept",
    "naclip": "NACLIP: k-k attention with a Gaussian neighbourhood bias, no residual, no feed-forward",
    "vanilla": "Plain CLIP: the unchanged last block (a baseline; blotchy on purpose)",
    "resclip": "ResCLIP: NACLIP's block with attention from middle layers and a first segmentation fed back "
               "(about 3x slower; its features depend on the classes)",
    "clipdiy": "CLIP-DIY: whole crops at three sizes classified by CLIP, fused with a foreground map when given "
               "(coarse; needs no change inside CLIP)",
}
METHOD_NAMES = tuple(METHOD_DESCRIPTIONS)
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
#: The bundled offline demo model (coloured shapes only) and the classes it knows.
DEMO_MODEL = "synthetic-tiny"
#: Official ClearCLIP window settings, and those of models trained at another scale.
OFFICIAL_OPTIONS = {"short_side": 448, "crop": 448, "stride": 224}
MODEL_OPTIONS = {DEMO_MODEL: {"short_side": 256, "crop": 64, "stride": 32}}
#: Official settings of methods whose own code uses others than ClearCLIP's (a model's own still win).
METHOD_OPTIONS = {"resclip": {"short_side": 336, "crop": 224, "stride": 112, "logit_scale": 40.0},
                  "clipdiy": {"short_side": 256, "logit_scale": 1.0}}
#: The models the widget lists first.
COMMON_MODELS = ("ViT-B-16", "ViT-B-32", "ViT-L-14", "ViT-L-14-336", "ViT-B-16-quickgelu")


def default_options(model: str, method: str | None = None) -> dict:
    """Window settings (and logit scale) for ``model`` and ``method``: ClearCLIP's official ones, the method's
    own official ones, or the model's if it was trained at another scale."""
    return {**OFFICIAL_OPTIONS, "logit_scale": 50.0, **METHOD_OPTIONS.get(method or "", {}), **MODEL_OPTIONS.get(model, {})}
