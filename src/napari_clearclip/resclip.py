"""ResCLIP (Deng et al., CVPR 2025): residual attention from middle layers, and feedback from a first segmentation.

Unlike the other methods, ResCLIP's image features depend on the class names: each window is
segmented once, and that segmentation shapes the attention of the second, final pass. Per window:

1. The blocks before the last run unchanged; the attention maps (softmax of q k^T per head, CLS
   included) of the blocks at :attr:`ResclipSettings.rcs_layers` are averaged: ``A_rcs``.
2. RCS: the last block without residual and feed-forward, with k-k attention and NACLIP's
   Gaussian neighbourhood bias G: ``A = softmax(k k^T / sqrt(d) + G)``, mixed with the middle
   layers' attention ``A <- tau_r ((1 - lam_r) A + lam_r A_rcs)``; its patch features score the
   classes (cosine), resized to the window.
3. SFR: those scores are snapped to the window's edges (PAMR, 10 iterations, dilations 8 and 16),
   turned into probabilities (softmax at logit scale 40), and each pixel gets its best query, or
   query 0 where the best probability is below ``temp_threshold``; each patch takes its most
   frequent label. Two patches "agree" when their labels are equal; the agreement of patches
   whose straight path leaves their label decays with distance; each row is smoothed along the
   raster order with a 1-D Gaussian, rectified and normalised, and the matrix is scaled to a
   maximum of 1 (and stored in float16, as the official code does).
4. The last block again from the same tokens: ``A = softmax(tau_s ((1 - lam_s) k k^T / sqrt(d)
   + lam_s M) + G)``, the RCS mix of step 2, and the patch features of that attention are the
   window's features.

The official code keeps every layer's attention maps and tests paths with a tensor of
(patches^2 x grid side) coordinates (32 GB for a 1024-pixel window); here only the average of
the layers used is kept, the last block runs head by head, and paths are tested one step at a
time, with the same results (``tests/reference.py`` holds the official computation restated).
The official code's quirks are kept, for equal results; docs/engine.md lists them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidOptionError


@dataclass(frozen=True)
class ResclipSettings:
    """ResCLIP's own settings (the official demo's by default)."""

    rcs: tuple[float, float] = (2.0, 0.6)        # (tau, lambda) of the residual cross-correlation mix
    sfr: tuple[float, float] = (2.1, 0.6)        # (tau, lambda) of the semantic feedback mix
    temp_threshold: float = 0.10                  # below this best probability, a pixel's first label is query 0
    logit_scale: float = 40.0                     # of the first segmentation's softmax
    rcs_layers: tuple[int, ...] = (5, 6, 7, 8)    # 0-based blocks whose attention is averaged
    gaussian_std: float = 5.0
    sfr_pamr: tuple[int, tuple[int, ...]] = (10, (8, 16))
    delete_same_entity: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


#: The official settings by name: the demo's, and those of each benchmark's config. Each gives the
#: ResCLIP settings and the window settings and final options the official evaluation used with them.
PRESETS: dict[str, tuple[ResclipSettings, dict]] = {
    "demo": (ResclipSettings(), {"short_side": 336, "crop": 224, "stride": 112, "refine": "pamr"}),
    "voc21": (ResclipSettings(rcs=(2.0, 0.3), sfr=(2.2, 0.7), temp_threshold=0.50),
              {"short_side": 336, "crop": "whole", "prob_threshold": 0.1}),
    "voc20": (ResclipSettings(rcs=(2.0, 0.6), sfr=(2.1, 0.6), temp_threshold=0.10),
              {"short_side": 336, "crop": "whole"}),
    "context60": (ResclipSettings(rcs=(2.0, 0.3), sfr=(1.8, 0.7), temp_threshold=0.30),
                  {"short_side": 336, "crop": 224, "stride": 112, "prob_threshold": 0.1}),
    "context59": (ResclipSettings(rcs=(2.0, 0.4), sfr=(1.8, 0.7), temp_threshold=0.25),
                  {"short_side": 336, "crop": 224, "stride": 112}),
    "coco_object": (ResclipSettings(rcs=(2.0, 0.4), sfr=(1.8, 0.7), temp_threshold=0.11),
                    {"short_side": 336, "crop": 224, "stride": 112, "prob_threshold": 0.1}),
    "coco_stuff": (ResclipSettings(rcs=(2.0, 0.4), sfr=(1.8, 0.7), temp_threshold=0.11),
                   {"short_side": 336, "crop": 224, "stride": 112}),
    "cityscapes": (ResclipSettings(rcs=(2.0, 0.2), sfr=(2.1, 0.6), temp_threshold=0.10),
                   {"short_side": 560, "crop": 224, "stride": 112}),
    "ade20k": (ResclipSettings(rcs=(2.0, 0.3), sfr=(2.1, 0.7), temp_threshold=0.25),
               {"short_side": 336, "crop": 224, "stride": 112}),
}


def resclip_settings(preset: str | None) -> ResclipSettings:
    """The ResCLIP settings of an official preset (None: the demo's)."""
    name = "demo" if preset is None else str(preset).lower()
    if name not in PRESETS:
        raise InvalidOptionError(f"Unknown ResCLIP preset {preset!r}: use one of {', '.join(PRESETS)}.")
    return PRESETS[name][0]


def rcs_layers_for(depth: int, settings: ResclipSettings) -> tuple[int, ...]:
    """The blocks whose attention is averaged: the official indices on models with at least 10 blocks
    before the last (ViT-B, ViT-L); on shallower models, the blocks at the same relative depth."""
    before_last = depth - 1
    if before_last > max(settings.rcs_layers):
        return settings.rcs_layers
    return tuple(sorted({min(before_last - 1, round(i * before_last / 11)) for i in settings.rcs_layers}))


# -- the attention pieces ------------------------------------------------------------------------------

def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    batch, tokens, width = t.shape
    return t.view(batch, tokens, heads, width // heads).transpose(1, 2)


def _attention_block(block: nn.Module, x: torch.Tensor, average: torch.Tensor | None, weight: float) -> torch.Tensor:
    """A standard block whose attention maps (softmax(q k^T / sqrt(d)), per head) are added into ``average``."""
    attn = block.attn
    heads = attn.num_heads
    q, k, v = (_heads(t, heads) for t in F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1))
    scale = q.shape[-1] ** -0.5
    outputs = []
    for head in range(heads):  # one head's map at a time: bounded memory at any window size
        maps = torch.softmax(torch.matmul(q[:, head] * scale, k[:, head].transpose(1, 2)), dim=-1)
        average[:, head].add_(maps, alpha=weight)
        outputs.append(torch.matmul(maps, v[:, head]))
        del maps
    out = torch.stack(outputs, dim=1).transpose(1, 2).reshape(x.shape)
    x = x + block.ls_1(attn.out_proj(out))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _last_block(block: nn.Module, x: torch.Tensor, bias: torch.Tensor, rcs_part: torch.Tensor,
                settings: ResclipSettings, feedback_part: torch.Tensor | None = None) -> torch.Tensor:
    """The last block without residual and feed-forward, with ResCLIP's attention; head by head.

    ``rcs_part`` is lam_r x A_rcs and ``feedback_part`` lam_s x M (both scaled once per window), so
    each head computes tau_s ((1 - lam_s) L + lam_s M) and tau_r ((1 - lam_r) A + lam_r A_rcs) in
    place, in the official order of operations, without a copy of its maps per term.
    """
    attn = block.attn
    heads = attn.num_heads
    _, k, v = (_heads(t, heads) for t in F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1))
    scale = k.shape[-1] ** -0.5
    tau_r, lam_r = settings.rcs
    outputs = []
    for head in range(heads):
        logits = torch.matmul(k[:, head], k[:, head].transpose(1, 2)).mul_(scale)
        if feedback_part is not None:
            tau_s, lam_s = settings.sfr
            logits.mul_(1 - lam_s).add_(feedback_part).mul_(tau_s)
        logits.add_(bias)
        maps = torch.softmax(logits, dim=-1)
        del logits
        maps.mul_(1 - lam_r).add_(rcs_part[:, head]).mul_(tau_r)
        outputs.append(torch.matmul(maps, v[:, head]))
        del maps
    out = torch.stack(outputs, dim=1).transpose(1, 2).reshape(x.shape)
    return block.ls_1(attn.out_proj(out))


def _features(visual: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """L2-normalised projected patch features of the last block's output tokens."""
    out = visual.ln_post(tokens[:, 1:])
    if visual.proj is not None:
        out = out @ visual.proj
    return F.normalize(out.float(), dim=-1)


# -- semantic feedback --------------------------------------------------------------------------------

def first_labels(features: torch.Tensor, text: torch.Tensor, pixels: torch.Tensor, grid: tuple[int, int],
                 patch: tuple[int, int], settings: ResclipSettings) -> torch.Tensor:
    """(B, rows, cols) each patch's most frequent first label (a query index) from the RCS pass."""
    from .refine import pamr

    batch = features.shape[0]
    rows, cols = grid
    logits = (features @ text.T.float()).transpose(1, 2).reshape(batch, -1, rows, cols)
    logits = F.interpolate(logits, size=pixels.shape[-2:], mode="bilinear", align_corners=False)
    iterations, dilations = settings.sfr_pamr
    labels = []
    for window_logits, window_pixels in zip(logits, pixels.float()):
        snapped = pamr(window_logits, window_pixels, iterations, dilations) if iterations else window_logits
        probabilities = torch.softmax(snapped * settings.logit_scale, dim=0)
        best = probabilities.max(0).values
        index = probabilities.argmax(0)
        index[best < settings.temp_threshold] = 0     # below the threshold: query 0 (official, a quirk)
        tiles = index.unfold(0, patch[0], patch[0]).unfold(1, patch[1], patch[1]).reshape(rows, cols, -1)
        labels.append(torch.mode(tiles, dim=-1).values)
    return torch.stack(labels)


def _paths_leave_label(labels: torch.Tensor):
    """(N, N) True where the official straight-path test from patch i towards patch j meets another label.

    The path samples t_s = s / D (D the largest Chebyshev distance in the grid) for s = 0..d(i, j),
    i.e. only the first d/D of the segment (the official code's quirk), at coordinates rounded half
    to even. A coordinate depends only on the two patches' rows (or columns) and s, so each step
    is a lookup in a small table, and pairs are tested a block of rows at a time instead of as one
    (N^2 x (D + 1) x 2) tensor. Returns (leaves, distances, D).
    """
    rows, cols = labels.shape
    count = rows * cols
    device = labels.device
    row_of = torch.arange(count, device=device) // cols
    col_of = torch.arange(count, device=device) % cols
    steps = torch.maximum((row_of[:, None] - row_of[None, :]).abs(),
                          (col_of[:, None] - col_of[None, :]).abs()).to(torch.int32)        # (N, N) Chebyshev
    largest = int(steps.max())
    t = torch.linspace(0, 1, steps=largest + 1, device=device)
    flat = labels.reshape(-1)
    leaves = torch.zeros((count, count), dtype=torch.bool, device=device)

    def table(side: int, s: int) -> torch.Tensor:  # (side, side): the rounded coordinate at step s, from a to b
        a = torch.arange(side, device=device, dtype=torch.float32)
        return (a[:, None] * (1 - t[s]) + a[None, :] * t[s]).round().to(torch.int64)

    chunk = max(1, (1 << 21) // count)
    for s in range(1, largest + 1):  # step 0 is the start itself
        row_table, col_table = table(rows, s), table(cols, s)
        for top in range(0, count, chunk):
            i = slice(top, top + chunk)
            at = row_table[row_of[i, None], row_of[None, :]] * cols + col_table[col_of[i, None], col_of[None, :]]
            leaves[i] |= (flat[at] != flat[i, None]) & (steps[i] >= s)
            del at
    return leaves, steps, largest


def feedback_matrix(labels: torch.Tensor, std: float, delete_same_entity: bool = True) -> torch.Tensor:
    """(N + 1, N + 1) float16 semantic feedback attention of one window from its patch labels (rows, cols)."""
    rows, cols = labels.shape
    count = rows * cols
    flat = labels.reshape(-1)
    agree = (flat[:, None] == flat[None, :]).float()
    agree.fill_diagonal_(1)
    if delete_same_entity and count > 1:
        leaves, steps, largest = _paths_leave_label(labels)
        agree = torch.where(leaves, agree * torch.exp(-steps / largest), agree)
        del leaves, steps
    size = min(count, int(6 * std + 1))
    size = size if size % 2 == 1 else size + 1
    offsets = torch.arange(size, device=labels.device) - size // 2
    kernel = torch.exp(-(offsets ** 2) / (2 * std ** 2))
    kernel = kernel / kernel.sum()
    blurred = torch.empty_like(agree)
    for top in range(0, count, 512):  # PyTorch's own convolution, a block of rows at a time (it unrolls its input)
        rows_in = agree[top : top + 512].unsqueeze(1)
        blurred[top : top + 512] = F.conv1d(rows_in, kernel.view(1, 1, -1), padding=size // 2).squeeze(1)
    del agree
    blurred = F.relu(blurred)
    blurred = blurred / (blurred.sum(dim=1, keepdim=True) + 1e-8)
    matrix = torch.zeros((count + 1, count + 1), device=labels.device)
    matrix[1:, 1:] = blurred
    return (matrix / matrix.max()).to(torch.float16)


# -- the whole window -----------------------------------------------------------------------------------

def encode_resclip(visual: nn.Module, pixels: torch.Tensor, text: torch.Tensor, settings: ResclipSettings,
                   positions: torch.Tensor | None = None) -> torch.Tensor:
    """L2-normalised ResCLIP patch features (B, rows*cols, E) of normalised window pixels (B, 3, H, W)."""
    from .methods import interpolated_positions, neighbourhood_bias, standard_block

    x = visual.conv1(pixels.to(visual.conv1.weight.dtype))
    rows, cols = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
    if positions is None:
        positions = interpolated_positions(visual, rows, cols)
    x = visual.ln_pre(x + positions.to(x.dtype))
    blocks = visual.transformer.resblocks
    layers = rcs_layers_for(len(blocks), settings)
    heads = blocks[-1].attn.num_heads
    tokens = x.shape[1]
    rcs = torch.zeros((x.shape[0], heads, tokens, tokens), dtype=torch.float32, device=x.device)
    for number, block in enumerate(blocks[:-1]):
        if number in layers:
            x = _attention_block(block, x, rcs, 1.0)
        else:
            x = standard_block(block, x)
    rcs /= len(layers)
    rcs = rcs.to(x.dtype).mul_(settings.rcs[1])  # lam_r x A_rcs, as both passes use it
    bias = neighbourhood_bias(rows, cols, x.device, settings.gaussian_std).to(x.dtype)
    first = _features(visual, _last_block(blocks[-1], x, bias, rcs, settings))
    patch = tuple(visual.patch_size)
    labels = first_labels(first, text.to(first.device), pixels, (rows, cols), patch, settings)
    del first
    outputs = []
    for window in range(x.shape[0]):  # each window's own feedback
        feedback = feedback_matrix(labels[window], settings.gaussian_std, settings.delete_same_entity)
        feedback_part = settings.sfr[1] * feedback.to(torch.float32 if x.dtype == torch.float32 else x.dtype)
        del feedback
        tokens_out = _last_block(blocks[-1], x[window : window + 1], bias, rcs[window : window + 1], settings,
                                 feedback_part)
        outputs.append(_features(visual, tokens_out))
        del feedback_part
    return torch.cat(outputs)


def with_settings(settings: ResclipSettings, **changes) -> ResclipSettings:
    return replace(settings, **changes)
