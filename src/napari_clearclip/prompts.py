"""Class names, prompt templates and text embeddings (cached in memory and on disk)."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import warnings
from collections.abc import Set
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from .cache import cache_dir
from .errors import InvalidClassesError
from .models import LoadedModel
from .text_prefixes import PromptPrefixes, supports

#: The 80 OpenAI ImageNet prompt templates shipped by open_clip, as "{}" format strings.
IMAGENET_TEMPLATES: tuple[str, ...] = tuple(t("{}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES)
PROMPTS_PER_BATCH = 400
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassQuery:
    """One class: its display name and the synonyms that are each a text query."""

    name: str
    synonyms: tuple[str, ...]


def parse_classes(classes: str | Sequence[str]) -> list[ClassQuery]:
    """Parse a class list; each entry is "name, synonym, ..." and is named by its first synonym.

    A single string is split on newlines and semicolons. Empty, blank or duplicate
    names are errors: a duplicate would make two classes compete for the same pixels.
    """
    if isinstance(classes, np.ndarray) and classes.ndim == 1 and classes.dtype.kind in "USO":
        classes = [str(c) if classes.dtype.kind in "US" else c for c in classes.tolist()]  # an array of names
    if isinstance(classes, str):
        classes = [part for part in re.split(r"[;\n]", classes) if part.strip()]
    elif isinstance(classes, (Set, dict)):
        raise InvalidClassesError(
            f"Classes were given as a {type(classes).__name__}, which has no fixed order, so label numbers would change "
            "between runs: pass a list, e.g. ['cell', 'background']."
        )
    elif classes is not None and not isinstance(classes, Sequence):
        one_shot = isinstance(classes, Iterator)
        raise InvalidClassesError(
            f"Classes must be a list of strings (or one string with one class per line), not a {type(classes).__name__}"
            + (": wrap a generator in list(...)." if one_shot else
               f" of {getattr(classes, 'dtype', 'values')}: e.g. ['cell', 'background'].")
        )
    if classes is None or len(classes) == 0:
        raise InvalidClassesError("No classes given: name at least one class, for example ['cell', 'background'].")
    parsed: list[ClassQuery] = []
    seen: dict[str, int] = {}
    for position, entry in enumerate(classes, start=1):
        if not isinstance(entry, str):
            raise InvalidClassesError(f"Class {position} is {entry!r}; each class must be a string such as 'cell, nucleus'.")
        synonyms = tuple(" ".join(s.split()) for s in entry.split(","))
        if not entry.strip() or any(not s for s in synonyms):
            raise InvalidClassesError(
                f"Class {position} ({entry!r}) has an empty name: remove the stray comma or blank entry."
            )
        for synonym in synonyms:
            key = synonym.lower()
            if key in seen:
                where = "in the same class" if seen[key] == position else f"in classes {seen[key]} and {position}"
                raise InvalidClassesError(f"{synonym!r} appears twice ({where}); each name may be used once.")
            seen[key] = position
        parsed.append(ClassQuery(name=synonyms[0], synonyms=synonyms))
    return parsed


def check_templates(templates: Sequence[str] | None) -> tuple[str, ...]:
    """Default to the 80 ImageNet templates; user templates must each contain ``{}``."""
    if templates is None:
        return IMAGENET_TEMPLATES
    if isinstance(templates, str):
        templates = [templates]
    templates = tuple(templates)
    if not templates:
        raise InvalidClassesError("The template list is empty: pass None for the 80 ImageNet templates, "
                                  "or e.g. ['a photo of a {}.'].")
    bad = [t for t in templates if not isinstance(t, str) or "{}" not in t]
    if bad:
        raise InvalidClassesError(f"Each template needs a '{{}}' where the class name goes; these have none: {bad[:3]}.")
    return templates


class TextEncoder:
    """Text embeddings per class name: template-averaged, normalised, and cached.

    The cache key is (model, weights, precision, templates, name), so a class seen
    once with a model is never encoded again, in this process or the next.
    """

    def __init__(self, model: LoadedModel, disk_cache: bool = True):
        self.model = model
        self.disk_cache = disk_cache
        self._memory: dict[str, torch.Tensor] = {}
        self._width = int(model.clip.text_projection.shape[-1]) if _has_projection(model.clip) else None
        self._prefixes = PromptPrefixes(model.clip) if supports(model.clip) else None
        self._prefixes_read = False
        self._cut: dict[tuple[str, str], bool] = {}  # (name, template): cut at the token limit

    def check_distinct(self, names: Sequence[str], templates: tuple[str, ...]) -> None:
        """Refuse names that the text context cuts into the same prompts; warn when a name is cut at all.

        CLIP reads a fixed number of tokens: two long names that differ only past it
        would be one and the same class, silently.
        """
        context = getattr(self.model.clip, "context_length", None)
        cut = self.cut_names(names, templates)
        if not cut:
            return
        seen: dict[tuple, str] = {}
        for name in names:
            tokens = self.model.tokenizer([t.replace("{}", name) for t in templates])
            key = tuple(tokens.flatten().tolist())
            if key in seen:
                raise InvalidClassesError(
                    f"{seen[key]!r} and {name!r} become identical after the model's {context}-token limit, so they "
                    "would be the same class: shorten them so that they differ early."
                )
            seen[key] = name
        warnings.warn(f"{len(cut)} class name(s) are cut at the model's {context}-token limit, e.g. {cut[0][:60]!r}: "
                      "the words past the limit are ignored.", stacklevel=3)

    def cut_names(self, names: Sequence[str], templates: tuple[str, ...]) -> list[str]:
        """The names that the longest template's prompt cuts at the model's token limit (words past it are lost)."""
        context = getattr(self.model.clip, "context_length", None)
        if not context or len(names) < 1:
            return []
        longest = max(templates, key=len)
        cut = {n: self._cut.get((n, longest)) for n in names}
        unknown = [n for n, known in cut.items() if known is None]
        if unknown:  # tokenized once per name and template: every run checks its names (2 ms for five)
            rows = self.model.tokenizer([longest.replace("{}", n) for n in unknown])
            if len(self._cut) > 4096:
                self._cut.clear()
            for name, row in zip(unknown, rows):
                cut[name] = self._cut[(name, longest)] = rows.shape[-1] >= context and int(row[-1]) != 0
        return [n for n in names if cut[n]]

    def context_length(self) -> int | None:
        return getattr(self.model.clip, "context_length", None)

    def key(self, name: str, templates: tuple[str, ...]) -> str:
        digest = hashlib.sha256()
        for part in (self.model.cache_id, "\x1f".join(templates), name):
            digest.update(part.encode("utf-8"))
            digest.update(b"\x00")
        return digest.hexdigest()

    def _disk_path(self, key: str) -> Path:
        return cache_dir() / "text-embeddings" / f"{key}.npy"

    def lookup(self, name: str, templates: tuple[str, ...]) -> torch.Tensor | None:
        key = self.key(name, templates)
        if key in self._memory:
            return self._memory[key]
        if self.disk_cache:
            embedding = self._read_disk(self._disk_path(key))
            if embedding is not None:
                self._memory[key] = embedding
                return embedding
        return None

    def _read_disk(self, path: Path) -> torch.Tensor | None:
        """A cached embedding, or None if it is missing or not a valid one (then it is recomputed and rewritten)."""
        try:
            if not path.is_file():
                return None
            values = np.load(path, allow_pickle=False)
        except Exception:  # truncated, empty, not .npy, unreadable: a miss, never an error
            return None
        if not is_valid_embedding(values, self._width):
            log.info("Ignoring an invalid cached text embedding: %s", path)
            return None
        return torch.from_numpy(np.ascontiguousarray(values))

    def _store(self, name: str, templates: tuple[str, ...], embedding: torch.Tensor) -> None:
        key = self.key(name, templates)
        self._memory[key] = embedding
        if self.disk_cache:
            self._write_disk(self._disk_path(key), embedding.numpy())

    def _write_disk(self, path: Path, values: np.ndarray) -> None:
        """Write atomically (see :func:`files.write_atomic`).

        A cache folder that cannot be written turns the disk cache off (one warning); an entry
        that cannot be replaced (e.g. a folder stands where the file goes) is healed if it is an
        empty folder, else skipped alone, and every other entry still goes to disk.
        """
        from .files import write_atomic

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(path.parent, os.W_OK):
                raise PermissionError(f"no permission to write in {path.parent}")
        except OSError as exc:
            if self.disk_cache:
                warnings.warn(f"The text-embedding cache {path.parent} cannot be written ({exc}); "
                              "embeddings are kept in memory only.", stacklevel=4)
            self.disk_cache = False  # warn once, then stay in memory
            return
        try:
            if path.is_dir() and not path.is_symlink():
                path.rmdir()  # an empty folder in the file's place: heal the entry
            write_atomic(path, lambda p: _save_npy(p, values))
        except OSError as exc:
            log.info("Skipping the cached text embedding %s, which cannot be written: %s", path, exc)

    def encode_steps(self, names: Sequence[str], templates: tuple[str, ...]) -> Iterator[tuple[int, int]]:
        """Encode the names not cached yet, yielding (done, total) after each batch of prompts."""
        missing = list(dict.fromkeys(n for n in names if self.lookup(n, templates) is None))
        per_batch = max(1, PROMPTS_PER_BATCH // len(templates))
        total = len(missing)
        if missing and self._prefixes is not None:
            self._read_prefixes()
            known = len(self._prefixes)
            with self.model.autocast():
                self._prefixes.learn_templates(self.model.tokenizer, templates)
            if len(self._prefixes) > known and self.disk_cache:
                self._write_prefixes()
        for start in range(0, total, per_batch):
            chunk = missing[start : start + per_batch]
            prompts = [t.replace("{}", name) for name in chunk for t in templates]
            features = self.encode_prompts(prompts).view(len(chunk), len(templates), -1)
            for name, per_template in zip(chunk, features):
                mean = F.normalize(per_template, dim=-1).mean(dim=0)
                self._store(name, templates, F.normalize(mean, dim=0).cpu())
            yield min(start + per_batch, total), total

    def _prefixes_path(self) -> Path:
        key = hashlib.sha256(f"{self.model.cache_id}\x00prompt-beginnings".encode("utf-8")).hexdigest()
        return cache_dir() / "text-embeddings" / f"beginnings-{key}.npz"

    def _read_prefixes(self) -> None:
        """The template beginnings an earlier session kept for this model (see :mod:`.text_prefixes`), once;
        a missing, damaged or foreign file is a miss."""
        if self._prefixes_read or not self.disk_cache:
            return
        self._prefixes_read = True
        path = self._prefixes_path()
        try:
            if not path.is_file():
                return
            with np.load(path, allow_pickle=False) as stored:
                arrays = {name: stored[name] for name in stored.files}
        except Exception:  # truncated, not a .npz, unreadable: recomputed and rewritten
            log.info("Ignoring unreadable prompt beginnings: %s", path)
            return
        if not self._prefixes.restore(arrays):
            log.info("Ignoring prompt beginnings made for another model: %s", path)

    def _write_prefixes(self) -> None:
        from .files import write_atomic

        path = self._prefixes_path()
        arrays = self._prefixes.arrays()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, lambda p: _save_npz(p, arrays))
        except OSError as exc:
            log.info("Skipping the prompt beginnings %s, which cannot be written: %s", path, exc)

    def embeddings(self, names: Sequence[str], templates: tuple[str, ...]) -> torch.Tensor:
        """(len(names), E) float32 embeddings, encoding whatever is not cached."""
        for _ in self.encode_steps(names, templates):
            pass
        return torch.stack([self.lookup(n, templates) for n in names])

    @torch.inference_mode()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Raw text features of prompts, float32 on the CPU."""
        model = self.model
        tokens = model.tokenizer(prompts).to(model.device)
        with model.autocast():
            if self._prefixes is not None:
                features = self._prefixes.encode(tokens)
            else:
                features = encode_text_truncated(model.clip, tokens)
        return features.float().cpu()


def _save_npy(path: Path, values: np.ndarray) -> None:
    with open(path, "wb") as handle:  # a handle: np.save would add ".npy" to a temporary file's name
        np.save(handle, values)


def _save_npz(path: Path, arrays: dict) -> None:
    with open(path, "wb") as handle:  # a handle: np.savez would add ".npz" to a temporary file's name
        np.savez(handle, **arrays)


def _has_projection(clip) -> bool:
    projection = getattr(clip, "text_projection", None)
    return isinstance(projection, torch.Tensor) and projection.ndim == 2


def is_valid_embedding(values, width: int | None) -> bool:
    """A cached text embedding must be a finite float32 unit vector of the model's width."""
    return (
        isinstance(values, np.ndarray)
        and values.dtype == np.float32
        and values.ndim == 1
        and (width is None or values.shape[0] == width)
        and bool(np.all(np.isfinite(values)))
        and abs(float(np.linalg.norm(values)) - 1.0) < 1e-3
    )


def encode_text_truncated(clip: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """CLIP text features with the context cut after the longest prompt's end token.

    CLIP's text transformer is causal, so tokens after the end-of-text token cannot
    change the pooled feature: dropping them gives the same embeddings far faster.
    Models without a causal mask or end-token pooling run at the full context.
    """
    pool = getattr(clip, "text_pool_type", None)
    mask = getattr(clip, "attn_mask", None)
    if mask is None or not hasattr(clip, "token_embedding"):
        return clip.encode_text(tokens)
    if pool == "argmax":  # the end token has the highest id
        end = tokens.argmax(dim=-1)
    elif pool == "eos" and getattr(clip, "text_eos_id", None) is not None:
        end = (tokens == clip.text_eos_id).int().argmax(dim=-1)
    else:
        return clip.encode_text(tokens)
    length = int(end.max()) + 1
    cast = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(tokens[:, :length]).to(cast) + clip.positional_embedding[:length].to(cast)
    x = clip.transformer(x, attn_mask=mask[:length, :length])
    x = clip.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), end]
    projection = clip.text_projection
    if projection is not None:
        x = projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection
    return x


