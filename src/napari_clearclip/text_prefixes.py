"""Prompts encoded from the class name on: the beginnings of the templates are encoded once.

CLIP's text transformer is causal: a token sees only the tokens before it. The tokens of a
template before the class name (the start token and "a photo of a") are the same for every
class, and so are their keys and values at every layer. They are computed once per model;
a class typed afterwards runs only its own tokens (the name, the rest of the template and
the end token) through the transformer, attending to the kept keys and values. With the 80
ImageNet templates that is under half the positions a prompt would otherwise take.

A prompt uses the longest kept beginning whose tokens it starts with, so a template that
glues the name to a word ("a photo of a{}") still gives the right features: it only shares less.
"""

from __future__ import annotations

import functools
import threading
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

#: Beginnings kept per model at most, the first ones learned (the 80 ImageNet templates have 80; each takes
#: 4 KB per token and layer with ViT-B/16: 512 of 6 tokens are 150 MB). Prompts past it start from the start token.
MAX_PREFIXES = 512


def end_positions(clip: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor | None:
    """Where each prompt's features are pooled (its end token), or None for a model that pools otherwise."""
    pool = getattr(clip, "text_pool_type", None)
    if pool == "argmax":  # the end token has the highest id
        return tokens.argmax(dim=-1)
    if pool == "eos" and getattr(clip, "text_eos_id", None) is not None:
        return (tokens == clip.text_eos_id).int().argmax(dim=-1)
    return None


def supports(clip: torch.nn.Module) -> bool:
    """Whether ``clip``'s text tower is open_clip's causal transformer of plain attention blocks, pooled at the
    end token (what :class:`PromptPrefixes` re-implements); other towers are encoded whole."""
    from open_clip.transformer import ResidualAttentionBlock

    transformer = getattr(clip, "transformer", None)
    needed = ("token_embedding", "positional_embedding", "ln_final", "attn_mask")
    if transformer is None or any(getattr(clip, name, None) is None for name in needed):
        return False
    if getattr(clip, "text_pool_type", None) not in ("argmax", "eos") or not getattr(transformer, "batch_first", True):
        return False
    for block in getattr(transformer, "resblocks", ()):
        attn = getattr(block, "attn", None)
        if (type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv")
                or not isinstance(attn, torch.nn.MultiheadAttention) or not attn.batch_first
                or not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn):
            return False
    return len(getattr(transformer, "resblocks", ())) > 0


def _block(block, x: torch.Tensor, places: torch.Tensor, shape: tuple[int, int], keys: torch.Tensor | None,
           values: torch.Tensor | None, mask: torch.Tensor):
    """One residual attention block on the tokens ``x`` (T, D) of N prompts, packed: token t is at ``places[t]``
    of the prompts laid out (N, W) = ``shape``. Tokens also attend to earlier ``keys`` / ``values``
    (N, heads, P, D / heads); ``mask`` (N, 1, W, P + W) says which keys each place sees. Returns (x, this
    block's keys and values, laid out (N, heads, W, D / heads)).

    Only attention needs the prompts apart; every other step runs on the packed tokens, without padding."""
    attn = block.attn
    (count, length), width = shape, x.shape[-1]
    heads = attn.num_heads
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    laid_out = qkv.new_zeros((count * length, 3 * width)).index_copy_(0, places, qkv)
    q, k, v = (part.reshape(count, length, heads, width // heads).transpose(1, 2)
               for part in laid_out.view(count, length, 3 * width).split(width, -1))
    all_k = k if keys is None else torch.cat([keys, k], 2)
    all_v = v if values is None else torch.cat([values, v], 2)
    out = F.scaled_dot_product_attention(q, all_k, all_v, attn_mask=mask)
    out = out.transpose(1, 2).reshape(count * length, width).index_select(0, places)
    x = x + block.ls_1(F.linear(out, attn.out_proj.weight, attn.out_proj.bias))
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x, k, v


def _packing(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """For prompts of ``lengths`` tokens: each token's prompt, its offset within it, and the longest length."""
    longest = int(lengths.max())
    offsets = torch.arange(longest, device=lengths.device).expand(len(lengths), -1)
    real = offsets < lengths[:, None]
    prompt = torch.arange(len(lengths), device=lengths.device)[:, None].expand(-1, longest)
    return prompt[real], offsets[real], longest


def _locked(method):
    """One call at a time on an instance: a Segmenter, and so its text encoder, may be shared by threads."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return locked


class PromptPrefixes:
    """The keys and values of template beginnings, per layer of one model's text transformer; encodes prompts
    with them. Use only when :func:`supports` the model."""

    def __init__(self, clip: torch.nn.Module):
        self.clip = clip
        self._index: dict[tuple[int, ...], int] = {}   # beginning tokens -> its number
        self._keys: list[torch.Tensor] = []             # per beginning: (layers, heads, length, head width)
        self._values: list[torch.Tensor] = []
        self._stacked = None                           # (lengths, keys, values) padded, rebuilt when one is added
        self._longest = 0
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._index)

    @_locked
    @torch.inference_mode()
    def learn(self, beginnings: Sequence[Sequence[int]]) -> None:
        """Encode the beginnings (token ids from the start token on) not kept yet."""
        new = [tuple(int(t) for t in b) for b in dict.fromkeys(tuple(b) for b in beginnings)
               if len(b) and tuple(b) not in self._index]
        start = [b for b in new if len(b) == 1][:1]   # the start token alone: always kept
        room = max(0, MAX_PREFIXES - len(self._index) - len(start))
        new = start + [b for b in new if len(b) > 1][:room]
        if not new:
            return
        clip = self.clip
        device = clip.token_embedding.weight.device
        lengths = torch.tensor([len(b) for b in new], device=device)
        prompt, offset, longest = _packing(lengths)
        tokens = torch.tensor([t for b in new for t in b], device=device)
        x = self._embed(tokens, offset)
        mask = torch.ones((longest, longest), dtype=torch.bool, device=device).tril()[None, None]
        places = prompt * longest + offset
        per_layer = []
        for block in clip.transformer.resblocks:
            x, k, v = _block(block, x, places, (len(new), longest), None, None, mask)
            per_layer.append((k, v))
        all_keys = torch.stack([k for k, _ in per_layer])   # (layers, beginnings, heads, longest, head width)
        all_values = torch.stack([v for _, v in per_layer])
        for row, beginning in enumerate(new):
            self._add(beginning, all_keys[:, row, :, : len(beginning)], all_values[:, row, :, : len(beginning)])

    def _add(self, beginning: tuple[int, ...], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep a beginning's keys and values, (layers, heads, length, head width) each."""
        self._index[beginning] = len(self._keys)
        self._keys.append(keys.clone())
        self._values.append(values.clone())
        self._stacked = None
        self._longest = max(self._longest, len(beginning))

    def learn_templates(self, tokenizer, templates: Sequence[str]) -> None:
        """Keep the beginning of each template (its text before "{}"), and the start token alone.

        Beginnings are encoded in a pass of their own, never along with a class: a class then gets the very
        same features whether its templates' beginnings were encoded in this session or an earlier one."""
        rows = tokenizer([t.split("{}", 1)[0] for t in templates])
        ends = end_positions(self.clip, rows)
        self.learn([row[:1].tolist() for row in rows[:1]] + [row[: int(end)].tolist() for row, end in zip(rows, ends)])

    def _embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        clip = self.clip
        cast = clip.transformer.get_cast_dtype()
        return clip.token_embedding(tokens).to(cast) + clip.positional_embedding[positions].to(cast)

    def _padded(self):
        """(lengths (P,), keys, values): per layer (P, heads, longest, head width), zero past each one's end."""
        if self._stacked is None:
            lengths = torch.tensor([k.shape[2] for k in self._keys])
            first = self._keys[0]
            shape = (first.shape[0], len(self._keys), first.shape[1], int(lengths.max()), first.shape[3])

            def pad(parts):
                padded = first.new_zeros(shape)
                for number, part in enumerate(parts):
                    padded[:, number, :, : part.shape[2]] = part
                return list(padded.unbind(0))
            self._stacked = (lengths, pad(self._keys), pad(self._values))
        return self._stacked

    def _beginning_of(self, row: list[int], end: int) -> int:
        """The number of the longest kept beginning ``row`` starts with, that leaves its end token out."""
        for length in range(min(end, self._longest), 0, -1):
            found = self._index.get(tuple(row[:length]))
            if found is not None:
                return found
        return -1

    @_locked
    @torch.inference_mode()
    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pooled, projected text features of ``tokens`` (N, context), as the model's ``encode_text`` gives."""
        clip = self.clip
        ends = end_positions(clip, tokens)
        rows = tokens.tolist()
        self.learn([row[:1] for row in rows])  # the start token alone: a beginning every prompt has
        chosen = torch.tensor([self._beginning_of(row, end) for row, end in zip(rows, ends.tolist())])
        lengths, keys, values = self._padded()
        device = tokens.device
        starts = lengths[chosen].to(device)                      # the first position each prompt computes
        own = ends - starts + 1
        prompt, offset, longest = _packing(own)
        x = self._embed(tokens[prompt, starts[prompt] + offset], starts[prompt] + offset)
        kept = keys[0].shape[2]
        # each computed token sees its prompt's kept beginning and the computed tokens up to itself
        steps = torch.arange(longest, device=device)
        sees_kept = torch.arange(kept, device=device)[None, :] < starts[:, None]          # (N, kept)
        sees_own = steps[None, :] <= steps[:, None]                                        # (W, W)
        mask = torch.cat([sees_kept[:, None, :].expand(-1, longest, -1),
                          sees_own[None].expand(len(rows), -1, -1)], -1)[:, None]
        chosen = chosen.to(device)
        places = prompt * longest + offset
        for layer, block in enumerate(clip.transformer.resblocks):
            x, _, _ = _block(block, x, places, (len(rows), longest), keys[layer].index_select(0, chosen),
                             values[layer].index_select(0, chosen), mask)
        x = clip.ln_final(x[torch.cumsum(own, 0) - 1])  # each prompt's last token: its end token
        projection = clip.text_projection
        if projection is not None:
            x = projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection
        return x

    @_locked
    def arrays(self) -> dict[str, np.ndarray]:
        """The kept beginnings as arrays, to be saved, one after another: ``lengths`` (P,) their tokens,
        ``tokens`` (T,) their ids, ``keys`` and ``values`` (layers, heads, T, head width), float32."""
        order = sorted(self._index.items(), key=lambda item: item[1])
        return {"lengths": np.array([len(b) for b, _ in order], np.int64),
                "tokens": np.array([t for b, _ in order for t in b], np.int64),
                "keys": torch.cat(self._keys, 2).float().cpu().numpy(),
                "values": torch.cat(self._values, 2).float().cpu().numpy()}

    @_locked
    def restore(self, arrays: Mapping[str, np.ndarray]) -> bool:
        """Keep the beginnings of :meth:`arrays` saved for this very model; False (nothing kept) when they do not
        fit it: another shape or type, token ids out of range, values not finite."""
        try:
            lengths, tokens, keys, values = (np.asarray(arrays[n]) for n in ("lengths", "tokens", "keys", "values"))
        except (KeyError, ValueError):
            return False
        blocks = self.clip.transformer.resblocks
        heads, width = blocks[0].attn.num_heads, blocks[0].attn.embed_dim
        vocabulary = self.clip.token_embedding.num_embeddings
        if (lengths.ndim != 1 or tokens.ndim != 1 or lengths.dtype != np.int64 or tokens.dtype != np.int64
                or keys.dtype != np.float32 or values.dtype != np.float32 or not len(lengths) or lengths.min() < 1
                or lengths.sum() != len(tokens) or tokens.min() < 0 or tokens.max() >= vocabulary
                or keys.shape != (len(blocks), heads, len(tokens), width // heads) or values.shape != keys.shape
                or not np.isfinite(keys).all() or not np.isfinite(values).all()):
            return False
        device = self.clip.token_embedding.weight.device
        cast = self.clip.transformer.get_cast_dtype()
        keys = torch.from_numpy(keys).to(device, cast)
        values = torch.from_numpy(values).to(device, cast)
        ends = np.cumsum(lengths)
        for end, length in zip(ends.tolist(), lengths.tolist()):
            beginning = tuple(tokens[end - length : end].tolist())
            if beginning not in self._index and len(self._index) < MAX_PREFIXES:
                self._add(beginning, keys[:, :, end - length : end], values[:, :, end - length : end])
        return True
