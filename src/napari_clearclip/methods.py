"""Dense inference methods: each swaps only the last ViT block of a frozen CLIP.

Every method is a function ``(block, x, grid) -> patch tokens`` where ``x`` holds
the tokens entering the last block (CLS first, batch first) and the result holds
the patch tokens leaving it, before ``ln_post`` and the projection. Outputs that
are thrown away (the CLS row, the standard forward of the last block) are never
computed.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .choices import METHOD_NAMES
from .clipdiy import GlobalCrops

Method = Callable[[nn.Module, torch.Tensor, tuple[int, int]], torch.Tensor]


def _project(block: nn.Module, y: torch.Tensor, which: str) -> list[torch.Tensor]:
    """Only the requested rows of the block's fused in-projection (``"q"``, ``"k"``, ``"v"``)."""
    attn: nn.MultiheadAttention = block.attn
    width = attn.embed_dim
    index = {"q": 0, "k": 1, "v": 2}
    weights = attn.in_proj_weight
    bias = attn.in_proj_bias
    if which == "qkv":  # one fused product
        return list(F.linear(y, weights, bias).chunk(3, dim=-1))
    out = []
    for name in which:
        rows = slice(index[name] * width, (index[name] + 1) * width)
        out.append(F.linear(y, weights[rows], None if bias is None else bias[rows]))
    return out


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    batch, tokens, width = t.shape
    return t.view(batch, tokens, heads, width // heads).transpose(1, 2)


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    batch, heads, tokens, dim = t.shape
    return t.transpose(1, 2).reshape(batch, tokens, heads * dim)


def _self_self_attention(block: nn.Module, x: torch.Tensor, key: str, bias: torch.Tensor | None = None) -> torch.Tensor:
    """out_proj(softmax(a a^T / sqrt(d) + bias) v) for a = q or k, patch rows only."""
    heads = block.attn.num_heads
    a, v = (_split_heads(t, heads) for t in _project(block, block.ln_1(x), key + "v"))
    out = F.scaled_dot_product_attention(a[:, :, 1:], a, v, attn_mask=bias)
    return block.attn.out_proj(_merge_heads(out))


def standard_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A block's usual forward (batch first), with attention through scaled_dot_product_attention.

    Same maths as the block's own ``forward``, but fast in every precision: under bf16
    autocast on the CPU, nn.MultiheadAttention's batched products copy their inputs
    and run an order of magnitude slower.
    """
    heads = block.attn.num_heads
    q, k, v = (_split_heads(t, heads) for t in _project(block, block.ln_1(x), "qkv"))
    x = x + block.ls_1(block.attn.out_proj(_merge_heads(F.scaled_dot_product_attention(q, k, v))))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def vanilla(block: nn.Module, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Plain CLIP: the standard last block (q-k attention, residual, feed-forward)."""
    return standard_block(block, x)[:, 1:]


def maskclip(block: nn.Module, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """MaskCLIP: each token attends only to itself, so the block reduces to out_proj(v); no residual, no FFN."""
    (v,) = _project(block, block.ln_1(x[:, 1:]), "v")
    return block.ls_1(block.attn.out_proj(v))


def sclip(block: nn.Module, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """SCLIP: correlative self-attention softmax(q q^T) + softmax(k k^T), residual and FFN kept."""
    heads = block.attn.num_heads
    q, k, v = (_split_heads(t, heads) for t in _project(block, block.ln_1(x), "qkv"))
    out = F.scaled_dot_product_attention(q[:, :, 1:], q, v) + F.scaled_dot_product_attention(k[:, :, 1:], k, v)
    h = x[:, 1:] + block.ls_1(block.attn.out_proj(_merge_heads(out)))
    return h + block.ls_2(block.mlp(block.ln_2(h)))


def clearclip(block: nn.Module, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """ClearCLIP: self-self (q-q) attention, no residual, no FFN."""
    return block.ls_1(_self_self_attention(block, x, "q"))


def naclip(block: nn.Module, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """NACLIP: k-k attention plus a Gaussian neighbourhood bias over the patch grid; no residual, no FFN."""
    bias = neighbourhood_bias(grid[0], grid[1], x.device)[1:].to(x.dtype)
    return block.ls_1(_self_self_attention(block, x, "k", bias=bias))


@lru_cache(maxsize=16)
def neighbourhood_bias(rows: int, cols: int, device: torch.device, std: float = 5.0) -> torch.Tensor:
    """(1+N, 1+N) additive attention bias exp(-d^2 / 2 std^2) over patch-grid distance d; 0 for CLS."""
    ys, xs = torch.meshgrid(torch.arange(rows, dtype=torch.float32), torch.arange(cols, dtype=torch.float32), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()], dim=1)
    gaussian = torch.exp(-torch.cdist(coords, coords).square() / (2 * std**2))
    bias = torch.zeros(rows * cols + 1, rows * cols + 1)
    bias[1:, 1:] = gaussian
    return bias.to(device)


class TextDependent:
    """A method whose window features depend on the class names (ResCLIP): it is given the text
    embeddings (and its settings) before encoding, and encodes whole windows itself."""

    needs_text = True

    def __init__(self, name: str, settings=None, text: torch.Tensor | None = None):
        self.name, self.settings, self.text = name, settings, text

    def bound(self, text: torch.Tensor, settings) -> "TextDependent":
        return TextDependent(self.name, settings, text)

    def encode_windows(self, visual: nn.Module, pixels: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        from .resclip import encode_resclip

        if self.text is None:
            raise RuntimeError(f"{self.name} needs the class names' embeddings before it encodes a window")
        return encode_resclip(visual, pixels, self.text, self.settings, positions)

    def __call__(self, block, x, grid):  # never a last-block function
        raise RuntimeError(f"{self.name} encodes whole windows (encode_windows)")


METHODS: dict[str, Method] = {
    "clearclip": clearclip,
    "maskclip": maskclip,
    "sclip": sclip,
    "naclip": naclip,
    "vanilla": vanilla,
    "resclip": TextDependent("resclip"),
    "clipdiy": GlobalCrops("clipdiy"),
}
assert tuple(METHODS) == METHOD_NAMES, "choices.METHOD_NAMES lists the methods in this order"


def interpolated_positions(visual: nn.Module, rows: int, cols: int) -> torch.Tensor:
    """Positional embeddings for a rows x cols patch grid, as the official ClearCLIP code builds them.

    Resized whenever the grid shape differs from the pretraining grid, with a bicubic
    interpolation of scale factor ((rows + 0.1) / R, (cols + 0.1) / C). The official code
    only compares token counts, so on a non-square grid with the pretraining count (7 x 28
    on ViT-B/16) it would use the 14 x 14 embeddings unchanged, i.e. scrambled positions;
    those grids (and only those) deliberately differ from it here.
    """
    pos = visual.positional_embedding
    grid_rows, grid_cols = visual.grid_size
    if (rows, cols) == (grid_rows, grid_cols):
        return pos
    width = pos.shape[-1]
    patch_pos = pos[1:].reshape(1, grid_rows, grid_cols, width).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(
        patch_pos.float(),
        scale_factor=((rows + 0.1) / grid_rows, (cols + 0.1) / grid_cols),
        mode="bicubic",
    ).to(pos.dtype)
    assert patch_pos.shape[-2:] == (rows, cols), patch_pos.shape
    return torch.cat([pos[:1], patch_pos.permute(0, 2, 3, 1).reshape(rows * cols, width)])


def encode_dense(visual: nn.Module, pixels: torch.Tensor, method: Method, positions: torch.Tensor | None = None) -> torch.Tensor:
    """L2-normalised patch embeddings (B, rows*cols, E) of normalised pixels (B, 3, H, W).

    H and W must be multiples of the patch size. ``positions`` may be passed to
    reuse embeddings interpolated for an earlier batch of the same size.
    """
    x = visual.conv1(pixels.to(visual.conv1.weight.dtype))
    rows, cols = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1)
    if positions is None:
        positions = interpolated_positions(visual, rows, cols)
    x = visual.ln_pre(x + positions.to(x.dtype))
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        x = standard_block(block, x)
    patches = method(blocks[-1], x, (rows, cols))
    patches = visual.ln_post(patches)
    if visual.proj is not None:
        patches = patches @ visual.proj
    return F.normalize(patches.float(), dim=-1)


def get_method(name: str) -> Method:
    from .errors import InvalidOptionError

    try:
        return METHODS[name.lower()]
    except (KeyError, AttributeError):
        raise InvalidOptionError(f"Unknown method {name!r}: use one of {', '.join(METHODS)}.") from None


