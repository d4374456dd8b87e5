"""CLIP-DIY (Wysoczanska et al., WACV 2024): crops at three sizes classified by CLIP's global embedding,
fused with a foreground map.

Unlike the other methods, CLIP-DIY changes nothing inside CLIP: it classifies whole crops. Officially:

1. The image goes to 256 x 256 (the aspect ratio is not kept), bilinear on its uint8 values as
   OpenCV's ``INTER_LINEAR`` computes it (:func:`resize_like_opencv`, bit for bit).
2. Crops of 256, 128 and 64 pixels at steps of half their size (1 + 9 + 49 crops), each resized to
   the model's input size (224) with Pillow's bicubic (antialiased when shrinking) and normalised.
3. Each crop's global CLIP embedding (class token, ``ln_post``, projection), normalised, scores the
   classes by cosine with one prompt each ("a photo of a {}"). Each size's grid of crop scores is
   resized bilinearly to 256 x 256 and the three are averaged.
4. With a foreground map s: the background class's scores times (1 - s), every other class's times s;
   softmax without temperature (logit scale 1); argmax; the labels go back to the image size with
   nearest-neighbour resizing.

``keep_aspect=True`` keeps the image's proportions instead: its short side becomes ``short_side`` (256
by default), crop sizes are that side, its half and its quarter, and along the long side as many
crops as it takes to cover it (the last shifted back inside the image).

Each crop is treated here as a one-patch window, so that the feature cache, strokes and lessons work as
for the dense methods: a crop under strokes becomes an exemplar of its most painted class.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidOptionError

#: The official working size (the image is squashed to this square) and short side when keeping the aspect.
OFFICIAL_SIZE = 256
#: Crop sizes as fractions of the working side: 256, 128 and 64 pixels officially.
CROP_DIVISORS = (1, 2, 4)
#: The official prompt: one per class, no ensemble.
CLIPDIY_TEMPLATES = ("a photo of a {}",)
#: Class names (or synonyms) that mark the class a foreground map's complement scores.
BACKGROUND_NAMES = frozenset({"background", "backgrounds", "bg", "backdrop"})

_COEF_BITS = 11          # OpenCV's fixed-point weights for 8-bit linear resizing
_COEF_ONE = 1 << _COEF_BITS


def _opencv_taps(source: int, target: int, clamp_weights: bool):
    """Source indices and fixed-point weights of OpenCV's linear resize along one axis.

    Along the width, OpenCV also zeroes the weight of positions clamped at the edges; along the
    height it only clamps the rows it reads, so near the edges a row is blended with itself
    with two weights that are rounded apart.
    """
    scale = source / target
    position = ((np.arange(target, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    start = np.floor(position).astype(np.int64)
    fraction = (position - start.astype(np.float32)).astype(np.float32)
    if clamp_weights:
        low = start < 0
        fraction[low], start[low] = 0, 0
        high = start >= source - 1
        fraction[high], start[high] = 0, source - 1
    first = np.rint((np.float32(1) - fraction) * np.float32(_COEF_ONE)).astype(np.int64)
    second = np.rint(fraction * np.float32(_COEF_ONE)).astype(np.int64)
    return np.clip(start, 0, source - 1), np.clip(start + 1, 0, source - 1), first, second


def resize_like_opencv(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)`` of a uint8 image, bit for bit.

    OpenCV resizes 8-bit images in fixed point (11-bit weights, with its vectorised rounding), and
    an exact halving as a 2 x 2 average; the official CLIP-DIY pipeline resizes its input this way.
    """
    source_h, source_w = image.shape[:2]
    if (source_h, source_w) == (height, width):
        return image.copy()
    pixels = image.astype(np.int64)
    if (source_h, source_w) == (2 * height, 2 * width):
        return ((pixels[0::2, 0::2] + pixels[1::2, 0::2] + pixels[0::2, 1::2] + pixels[1::2, 1::2] + 2) >> 2
                ).astype(np.uint8)
    rows, rows_next, row_first, row_second = _opencv_taps(source_h, height, clamp_weights=False)
    cols, cols_next, col_first, col_second = _opencv_taps(source_w, width, clamp_weights=True)
    across = (1, -1) + (1,) * (pixels.ndim - 2)
    down = (-1,) + (1,) * (pixels.ndim - 1)
    horizontal = pixels[:, cols] * col_first.reshape(across) + pixels[:, cols_next] * col_second.reshape(across)
    blended = ((((horizontal[rows] >> 4) * row_first.reshape(down)) >> 16)
               + (((horizontal[rows_next] >> 4) * row_second.reshape(down)) >> 16))
    return np.clip((blended + 2) >> 2, 0, 255).astype(np.uint8)


def working_size(height: int, width: int, short_side: int | None, keep_aspect: bool) -> tuple[int, int]:
    """The size CLIP-DIY works at: a short_side square (official), or the image with that short side."""
    side = min(height, width) if short_side is None else int(short_side)  # None: the image's own scale
    if not keep_aspect:
        return side, side
    scale = side / min(height, width)
    return max(side, int(height * scale + 0.5)), max(side, int(width * scale + 0.5))


def working_image(array: np.ndarray, short_side: int | None, keep_aspect: bool, contrast_limits=None) -> np.ndarray:
    """The image as uint8 RGB (h, w, 3) at the working size; other dtypes are scaled to 0..255 first."""
    from .image import to_rgb_255

    rgb, whole = to_rgb_255(array, contrast_limits)
    if not whole:
        rgb = rgb.round()
    image = np.ascontiguousarray(rgb.clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())
    height, width = working_size(image.shape[0], image.shape[1], short_side, keep_aspect)
    return resize_like_opencv(image, height, width)


def _crop_starts(length: int, size: int) -> list[int]:
    """Crop starts at steps of half the size; where the steps do not end at the edge, one more crop ends there."""
    step = max(1, size // 2)
    starts = list(range(0, length - size + 1, step))
    if starts[-1] + size < length:
        starts.append(length - size)
    return starts


@dataclass(frozen=True)
class CropPyramid:
    """Where CLIP-DIY's crops lie on the working image, and how their scores become score maps.

    Each crop is a window with a single patch: a scale's crops form a grid of scores that is
    resized bilinearly to the working size, and the scales are averaged.
    """

    height: int
    width: int
    sizes: tuple[int, ...]
    input_size: tuple[int, int]

    kind = "crops"

    @classmethod
    def for_image(cls, height: int, width: int, input_size: tuple[int, int]) -> "CropPyramid":
        side = min(height, width)
        return cls(height, width, tuple(max(1, side // d) for d in CROP_DIVISORS), tuple(input_size))

    @cached_property
    def scale_grids(self) -> list[tuple[list[int], list[int]]]:
        return [(_crop_starts(self.height, s), _crop_starts(self.width, s)) for s in self.sizes]

    @cached_property
    def windows(self) -> list[tuple[int, int, int, int]]:
        """(y1, y2, x1, x2) of every crop, the largest size first, row by row."""
        return [(y, y + s, x, x + s) for s, (ys, xs) in zip(self.sizes, self.scale_grids) for y in ys for x in xs]

    @cached_property
    def _index(self) -> dict[tuple[int, int, int, int], int]:
        return {box: number for number, box in enumerate(self.windows)}

    @property
    def patch_grid(self) -> tuple[int, int]:
        return 1, 1

    @property
    def padded_size(self) -> tuple[int, int]:
        return self.input_size

    def new_scores(self, n_queries: int, device) -> torch.Tensor:
        return torch.zeros((n_queries, len(self.windows)), device=device)

    def add_scores(self, scores: torch.Tensor, batch, logits: torch.Tensor) -> None:
        """Put each crop's (1, Q) scores in its place."""
        index = torch.tensor([self._index[tuple(box)] for box in batch], device=scores.device)
        scores[:, index] = logits.reshape(len(batch), -1).T.to(scores.dtype)

    def finish_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """(Q, h, w): each scale's grid of crop scores resized bilinearly to the working size, then averaged."""
        maps, start = [], 0
        for ys, xs in self.scale_grids:
            count = len(ys) * len(xs)
            grid = scores[:, start : start + count].reshape(1, -1, len(ys), len(xs))
            maps.append(F.interpolate(grid, size=(self.height, self.width), mode="bilinear", align_corners=False)[0])
            start += count
        return torch.stack(maps).mean(0)

    def cell_counts(self, strokes: torch.Tensor, box, n_classes: int) -> torch.Tensor:
        """(C, 1): how many pixels of each class are painted under a crop."""
        y1, y2, x1, x2 = box
        window = strokes[y1:y2, x1:x2]
        return torch.stack([(window == k).sum() for k in range(1, n_classes + 1)]).reshape(n_classes, 1)

    def cell_largest(self, values: torch.Tensor, box) -> torch.Tensor:
        """(1,): the largest of ``values`` (non-negative) under a crop."""
        y1, y2, x1, x2 = box
        return values[y1:y2, x1:x2].amax().reshape(1)

    def crop_batch(self, source: "CropSource", batch) -> torch.Tensor:
        return source.crops(batch)

    def coverage(self):
        raise NotImplementedError("CLIP-DIY's scores are averaged per scale (finish_scores)")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "height": self.height, "width": self.width, "sizes": list(self.sizes),
                "input_size": list(self.input_size)}


class CropSource:
    """The working image, from which crops are cut and resized as CLIP's image processor does."""

    def __init__(self, image: np.ndarray, mean, std, input_size: tuple[int, int]):
        self.image, self.input_size = image, tuple(input_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def crops(self, boxes) -> torch.Tensor:
        """(B, 3, h, w) normalised crops: Pillow bicubic to the model's input size on uint8, then / 255."""
        from PIL import Image

        height, width = self.input_size
        out = []
        for y1, y2, x1, x2 in boxes:
            crop = Image.fromarray(np.ascontiguousarray(self.image[y1:y2, x1:x2]))
            resized = np.asarray(crop.resize((width, height), Image.BICUBIC))
            values = torch.from_numpy((resized.astype(np.float64) / 255.0).astype(np.float32)).permute(2, 0, 1)
            out.append((values - self.mean) / self.std)
        return torch.stack(out)


def input_size(visual: nn.Module) -> tuple[int, int]:
    size = getattr(visual, "image_size", 224)
    return (size, size) if isinstance(size, int) else tuple(size)


def normalisation(visual: nn.Module) -> tuple[tuple, tuple]:
    """The model's own mean and std on 0..1 values, as its image processor applies them."""
    import open_clip

    cfg = getattr(visual, "preprocess_cfg", {}) or {}
    return tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)), tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD))


class GlobalCrops:
    """CLIP-DIY as a method: each window is a crop, encoded whole into one global embedding."""

    needs_text = False

    def __init__(self, name: str):
        self.name = name

    def layout(self, array: np.ndarray, opts, visual: nn.Module):
        """(crop source, crop pyramid) of an image for these options."""
        image = working_image(array, opts.short_side, opts.keep_aspect, opts.contrast_limits)
        size = input_size(visual)
        mean, std = normalisation(visual)
        return CropSource(image, mean, std, size), CropPyramid.for_image(image.shape[0], image.shape[1], size)

    def encode_windows(self, visual: nn.Module, pixels: torch.Tensor, positions=None) -> torch.Tensor:
        """(B, 1, E) normalised global embeddings (class token, ln_post, projection) of the crops."""
        embedding = visual(pixels.to(visual.conv1.weight.dtype))
        if isinstance(embedding, (tuple, list)):
            embedding = embedding[0]
        return F.normalize(embedding.float(), dim=-1)[:, None]

    def __call__(self, block, x, grid):  # never a last-block function
        raise RuntimeError(f"{self.name} encodes whole crops (encode_windows)")


# -- foreground maps ---------------------------------------------------------------------------------


def check_foreground(foreground, shape: tuple[int, int]) -> np.ndarray | str | None:
    """None, ``"found"``, or an (H, W) float32 map in 0..1: masks and labels (integers, booleans) count
    as 1 wherever they are not 0."""
    if foreground is None:
        return None
    if isinstance(foreground, str):
        if foreground.lower() == "found":
            return "found"
        raise InvalidOptionError(f"foreground={foreground!r} is not known: pass an array (a probability map or a mask) "
                                 "or 'found'.")
    try:
        array = np.asarray(foreground)
    except (TypeError, ValueError):
        raise InvalidOptionError("foreground must be an array of the image's height and width.") from None
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.shape != tuple(shape):
        raise InvalidOptionError(f"A foreground map of shape {array.shape} does not match the image's {tuple(shape)}: "
                                 "give one value per pixel (a probability map or a mask of the same size).")
    if array.dtype == bool or array.dtype.kind in "ui":
        return (array != 0).astype(np.float32)
    if array.dtype.kind != "f":
        raise InvalidOptionError(f"A foreground map of dtype {array.dtype} is not supported: use probabilities (float, "
                                 "0 to 1) or a mask (integers or booleans).")
    values = array.astype(np.float32)
    if not np.isfinite(values).all() or (values.size and (values.min() < 0 or values.max() > 1)):
        raise InvalidOptionError("A foreground map of probabilities must hold values from 0 to 1 "
                                 f"(this one spans {np.nanmin(array):g} to {np.nanmax(array):g}): scale it, or "
                                 "threshold it into a mask.")
    return values


def scaled_foreground(values, contrast_limits=None) -> np.ndarray:
    """A foreground map from a displayed image: its values scaled by the contrast limits it is shown with
    (so 0/255 masks and 8-bit probability images mean 0..1), clipped; labels (no limits) stay as they are."""
    array = np.asarray(values)
    if contrast_limits is None:
        return array
    low, high = (float(v) for v in contrast_limits)
    if array.dtype.kind == "f" and array.size and 0 <= float(array.min()) and float(array.max()) <= 1:
        return array.astype(np.float32)  # probabilities already
    span = high - low if high > low else 1.0
    return np.clip((array.astype(np.float32) - np.float32(low)) / np.float32(span), 0, 1)


def background_index(classes, background_class: str | None) -> int:
    """The 0-based index of the class a foreground map's complement scores: the one named, else the one called
    background (or a synonym of it)."""
    if background_class is not None:
        wanted = str(background_class).strip().lower()
        for index, query in enumerate(classes):
            if query.name.lower() == wanted or wanted in (s.lower() for s in query.synonyms):
                return index
        raise InvalidOptionError(f"background_class={background_class!r} is none of the classes "
                                 f"({', '.join(q.name for q in classes)}).")
    for index, query in enumerate(classes):
        if any(s.strip().lower() in BACKGROUND_NAMES for s in (query.name, *query.synonyms)):
            return index
    raise InvalidOptionError("A foreground map needs a background class: add a class called 'background', or name "
                             "the class the map's complement scores (background_class=...).")


def fuse_foreground(scores: torch.Tensor, foreground: torch.Tensor, background_queries: torch.Tensor) -> torch.Tensor:
    """Scores (Q, h, w) weighted by a foreground map (any size, resized bilinearly to h x w): the background
    queries by (1 - s), every other query by s."""
    size = tuple(scores.shape[1:])
    s = foreground.float().to(scores.device)
    if tuple(s.shape) != size:
        s = F.interpolate(s[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    weights = torch.where(background_queries.to(scores.device)[:, None, None], 1 - s, s)
    return scores * weights
