"""Seeded synthetic scenes: coloured shapes on textured grey, with captions and per-colour masks.

They train the bundled ``synthetic-tiny`` demo model and test real segmentation
quality offline, where no pretrained CLIP weights can be downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.draw import disk, polygon
from skimage.transform import resize

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 170, 55),
    "blue": (40, 70, 215),
    "yellow": (230, 205, 35),
}
SHAPES = ("circle", "square", "triangle")
#: The class list the demo model and the "synthetic shapes" sample are made for (one class per line).
DEMO_CLASSES = "red\ngreen\nblue\nyellow\nbackground"
DEMO_SAMPLE_NAME = "synthetic shapes"
BACKGROUND_WORDS = (
    "grey background", "gray background", "textured grey background", "plain grey background",
    "dark grey background", "light grey background", "noisy background", "background",
)


@dataclass
class Scene:
    """An RGB uint8 image, a boolean mask per colour, and a caption naming what is drawn."""

    image: np.ndarray
    masks: dict[str, np.ndarray]
    objects: list[tuple[str, str]]
    caption: str

    def label_image(self, colours: tuple[str, ...] = tuple(COLOURS)) -> np.ndarray:
        """Ground truth labels: 1..len(colours) in the given order, 0 for background."""
        labels = np.zeros(self.image.shape[:2], dtype=np.int32)
        for index, colour in enumerate(colours, start=1):
            labels[self.masks[colour]] = index
        return labels

    def instances(self) -> tuple[np.ndarray, dict[int, str]]:
        """Every shape as an object with an id of its own (as an instance tool would give), and each id's colour."""
        from skimage.measure import label as connected

        objects = np.zeros(self.image.shape[:2], np.int32)
        truth = {}
        for colour, mask in self.masks.items():
            parts = connected(mask)
            for part in range(1, parts.max() + 1):
                new_id = int(objects.max()) + 1
                objects[parts == part] = new_id
                truth[new_id] = colour
        return objects, truth


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    level = rng.uniform(65, 195)
    coarse = resize(rng.normal(0, 1, (max(2, size // 16),) * 2), (size, size), order=1)
    texture = level + rng.uniform(5, 25) * coarse + rng.normal(0, rng.uniform(2, 9), (size, size))
    grey = np.repeat(texture[..., None], 3, axis=2) + rng.normal(0, 2, (size, size, 3))
    return grey


def _shape_pixels(rng: np.random.Generator, shape: str, size: int, extent: float):
    half = extent / 2
    cy, cx = rng.uniform(half, size - half, 2)
    if shape == "circle":
        return disk((cy, cx), half, shape=(size, size))
    if shape == "square":
        angle = rng.uniform(0, np.pi / 2)
        corners = np.arange(4) * np.pi / 2 + angle
        radius = half * np.sqrt(2) * 0.8
    else:
        angle = rng.uniform(0, 2 * np.pi)
        corners = np.arange(3) * 2 * np.pi / 3 + angle
        radius = half * 1.1
    ys = np.clip(cy + radius * np.sin(corners), 0, size - 1)
    xs = np.clip(cx + radius * np.cos(corners), 0, size - 1)
    return polygon(ys, xs, shape=(size, size))


def _caption(rng: np.random.Generator, objects: list[tuple[str, str | None]]) -> str:
    """A caption naming the objects (shape None: only the colour is known) and often the background."""
    if not objects:
        return str(rng.choice(["an empty ", "a ", "a photo of a ", "just a "])) + str(rng.choice(BACKGROUND_WORDS))
    style = int(rng.integers(0, 4))
    if style >= 2 and any(s is None for _, s in objects):
        style = 1
    if style == 0:  # colours only
        words = list(dict.fromkeys(c for c, _ in objects))
    elif style == 1:  # coloured objects without shape
        words = list(dict.fromkeys(f"a {c} object" for c, _ in objects))
    else:
        words = list(dict.fromkeys(f"a {c} {s}" for c, s in objects))
    text = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    if rng.random() < 0.5:
        text += " on a " + str(rng.choice(BACKGROUND_WORDS))
    return text


def make_scene(
    seed: int | np.random.Generator,
    size: int = 64,
    objects: tuple[int, int] = (1, 4),
    extent: tuple[float, float] = (0.18, 0.42),
) -> Scene:
    """One scene of ``size`` x ``size`` with ``objects`` (min, max) shapes of ``extent`` x size."""
    rng = np.random.default_rng(seed)
    image = _background(rng, size)
    masks = {c: np.zeros((size, size), dtype=bool) for c in COLOURS}
    drawn: list[tuple[str, str]] = []
    for _ in range(int(rng.integers(objects[0], objects[1] + 1))):
        colour = str(rng.choice(list(COLOURS)))
        shape = str(rng.choice(SHAPES))
        rr, cc = _shape_pixels(rng, shape, size, rng.uniform(*extent) * size)
        tint = np.array(COLOURS[colour]) + rng.normal(0, 12, 3)
        image[rr, cc] = tint + rng.normal(0, 4, (len(rr), 3))
        for mask in masks.values():
            mask[rr, cc] = False
        masks[colour][rr, cc] = True
        drawn.append((colour, shape))
    visible = [(c, s) for c, s in drawn if masks[c].any()]
    return Scene(np.clip(image, 0, 255).astype(np.uint8), masks, visible, _caption(rng, visible))


BACKGROUND_CAPTIONS = (
    "background", "a grey background", "a gray background", "an empty grey background", "plain grey background",
    "a textured grey background", "grey noise", "nothing but background", "an empty background",
)


def training_tile(rng: np.random.Generator, size: int = 64, empty_fraction: float = 0.15,
                  zoom_fraction: float = 0.5, min_share: float = 0.05) -> Scene:
    """One training sample: a ``size`` tile with 0 to 3 shapes, captioned with every object and the background.

    Half the tiles are windows cut from larger scenes, where shapes may be cut by the
    border or fill the tile: at inference, a window sees objects at every scale. Empty
    tiles are captioned with background words alone, so that "background" is something
    the text tower can point at, and the patches of grey that dense inference looks at
    have a class of their own.
    """
    if rng.random() < zoom_fraction:
        scene = make_scene(rng, size=int(rng.integers(size + size // 2, 3 * size + 1)), objects=(1, 4))
        top, left = rng.integers(0, scene.image.shape[0] - size + 1, 2)
        window = (slice(top, top + size), slice(left, left + size))
        masks = {c: m[window].copy() for c, m in scene.masks.items()}
        shapes = dict((c, s) for c, s in scene.objects)
        visible = [(c, shapes.get(c)) for c in COLOURS if masks[c].mean() >= min_share]
        image = scene.image[window].copy()
        if not visible:
            return Scene(image, masks, [], str(rng.choice(BACKGROUND_CAPTIONS)))
        words = [c if rng.random() < 0.5 else f"a {c} object" for c, _ in visible]
        words = [words[i] for i in rng.permutation(len(words))]
        text = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
        if rng.random() < 0.5:
            text += " on a " + str(rng.choice(BACKGROUND_WORDS))
        return Scene(image, masks, visible, text)
    if rng.random() < empty_fraction:
        scene = make_scene(rng, size=size, objects=(0, 0))
        return Scene(scene.image, scene.masks, [], str(rng.choice(BACKGROUND_CAPTIONS)))
    scene = make_scene(rng, size=size, objects=(1, 3), extent=(0.24, 0.6))
    words = [f"a {colour} {shape}" for colour, shape in scene.objects]
    style = rng.random()
    if style < 0.25:
        words = [colour for colour, _ in scene.objects]
    elif style < 0.4:
        words = [f"a {colour} object" for colour, _ in scene.objects]
    words = list(dict.fromkeys(words))
    if len(words) > 1 and rng.random() < 0.5:
        words = [words[i] for i in rng.permutation(len(words))]
    text = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    if rng.random() < 0.5:
        text += " on a " + str(rng.choice(BACKGROUND_WORDS))
    return Scene(scene.image, scene.masks, scene.objects, text)


def sample_scene(size: int = 256, seed: int = 10) -> np.ndarray:
    """A demo image for napari's sample data."""
    return make_scene(seed, size=size, objects=(3, 4)).image


def look_alike_squares() -> tuple[np.ndarray, np.ndarray]:
    """Grey with two blue squares far apart and a red one, and its truth (1: the blue squares, 2: red, 3: grey).

    A stroke of a word the text does not place on blue (e.g. "debris") on one blue square should
    turn the other one too and leave the red square and the grey as the text labels them.
    """
    rng = np.random.default_rng(7)
    image = np.clip(rng.normal(128, 8, (192, 192, 3)), 0, 255)
    image[24:72, 24:72] = (40, 70, 215)
    image[120:168, 120:168] = (40, 70, 215)
    image[120:168, 24:72] = (215, 35, 35)
    truth = np.full((192, 192), 3, np.int32)
    truth[24:72, 24:72] = truth[120:168, 120:168] = 1
    truth[120:168, 24:72] = 2
    return image.astype(np.uint8), truth


def held_out_scenes(count: int = 24, seed: int = 10_000, sizes: tuple[int, ...] = (128, 192, 256, 384, 512)) -> list[Scene]:
    """Held-out scenes (seeds far from those used in training), at several sizes."""
    return [make_scene(seed + i, size=sizes[i % len(sizes)], objects=(1, 4)) for i in range(count)]


def colour_iou(segmenter, scenes: list[Scene], background: str | None = "background", **options) -> dict[str, float]:
    """Dataset IoU per colour (intersections and unions summed over scenes), as mmseg computes mIoU.

    The classes are the four colour names plus ``background`` (whose pixels count
    as unlabelled); with ``background=None`` only the colours are queried.
    """
    colours = tuple(COLOURS)
    classes = list(colours) + ([background] if background else [])
    intersection = dict.fromkeys(colours, 0)
    union = dict.fromkeys(colours, 0)
    for scene in scenes:
        predicted = segmenter.segment(scene.image, classes, **options).labels
        predicted[predicted > len(colours)] = 0
        truth = scene.label_image(colours)
        for index, colour in enumerate(colours, start=1):
            p, t = predicted == index, truth == index
            intersection[colour] += int(np.count_nonzero(p & t))
            union[colour] += int(np.count_nonzero(p | t))
    scores = {c: intersection[c] / union[c] if union[c] else float("nan") for c in colours}
    scores["mean"] = float(np.nanmean([scores[c] for c in colours]))
    return scores


def looks_like_demo_scene(image: np.ndarray) -> bool:
    """Whether an image is what the demo model knows: coloured shapes on a grey background.

    Most pixels are a mid grey (low saturation), and most of the others strongly coloured;
    photos and microscopy fail one test or the other. Used to say, or not, that the demo's
    labels mean nothing on this image.
    """
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] < 3 or array.size == 0:
        return False
    rgb = array[..., :3].astype(np.float32)
    if array.dtype != np.uint8:
        low, high = float(rgb.min()), float(rgb.max())
        rgb = (rgb - low) * (255.0 / (high - low)) if high > low else np.zeros_like(rgb)
    saturation = rgb.max(-1) - rgb.min(-1)
    brightness = rgb.mean(-1)
    grey = (saturation < 40) & (brightness > 50) & (brightness < 210)
    coloured = saturation > 90
    return bool(grey.mean() >= 0.4 and (grey | coloured).mean() >= 0.9)
