"""Class colours that follow the class name, not its position in the list.

A class keeps its colour when the list is reordered or another class is added; a
class named after a colour ("red", "green", "blue cells") is drawn in that colour.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache

import numpy as np

#: 48 colours picked greedily to be as far apart as possible (CIEDE2000 in CIELAB, away from greys, black
#: and white): any two differ by at least 12.8, the first eight by at least 27.5.
PALETTE = (
    "#3C0FFF", "#00FF00", "#B40000", "#FF3CFF", "#FF7800", "#006900", "#FFD200", "#A51E69", "#6987FF", "#00B496",
    "#F06978", "#785A00", "#879600", "#00E1FF", "#FFC3FF", "#005A96", "#008796", "#8769A5", "#B4D296", "#FFC396",
    "#A5694B", "#3CFFC3", "#B4872D", "#00B42D", "#3CB4FF", "#B4C3FF", "#D2F00F", "#FF1E00", "#5A875A", "#B40FD2",
    "#F01E96", "#D287B4", "#D21E4B", "#B487F0", "#FFA500", "#0087C3", "#873C3C", "#785AF0", "#C3B469", "#00694B",
    "#FFA596", "#783C87", "#78783C", "#4B4BA5", "#87E1D2", "#784B2D", "#96C32D", "#E1785A",
)
#: Two class colours closer than this (CIEDE2000) count as alike: a new class looks further along the palette.
ALIKE = 20.0
#: Class names that mean "nothing in particular": drawn transparent, so they do not tint the image.
BACKGROUND_NAMES = ("background", "backdrop", "other", "others", "nothing", "none", "void", "empty", "rest",
                    "unlabelled", "unlabeled", "clutter")
NAMED = {
    "red": "#E6194B", "green": "#3CB44B", "blue": "#2F5BEA", "yellow": "#FFE119", "orange": "#F58231",
    "purple": "#911EB4", "violet": "#8F5BD7", "magenta": "#F032E6", "pink": "#FABED4", "cyan": "#42D4F4",
    "teal": "#469990", "brown": "#9A6324", "black": "#202020", "white": "#F5F5F5", "grey": "#A9A9A9",
    "gray": "#A9A9A9", "olive": "#808000", "maroon": "#800000", "navy": "#000075", "lime": "#BFEF45",
    "gold": "#FFD700", "beige": "#FFFAC8", "turquoise": "#40E0D0",
}
#: Labels without a known class (painted by hand with a new number) are drawn in this visible colour.
UNKNOWN_LABEL = "#C8C8C8"


def colour_word(name: str) -> str | None:
    """The colour a class name speaks of ("blue", "dark red cells" -> red), if any."""
    for word in re.findall(r"[a-z]+", name.lower()):
        if word in NAMED:
            return NAMED[word]
    return None


def is_background(name: str) -> bool:
    """Whether a class name means background ("background", "grey background", "other", "nothing", ...)."""
    words = name.lower().split()
    return bool(words) and (words[-1] in BACKGROUND_NAMES or name.lower().strip() in BACKGROUND_NAMES)


def _hashed(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.lower().encode("utf-8"), digest_size=4).digest(), "big")


@lru_cache(maxsize=512)
def _lab(colour: str) -> tuple[float, float, float]:
    from skimage.color import rgb2lab

    rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.float64) / 255.0
    return tuple(rgb2lab(rgb[None, None])[0, 0])


def difference(a: str, b: str) -> float:
    """How different two colours look (CIEDE2000; above about 10 is clearly different)."""
    from skimage.color import deltaE_ciede2000

    return float(deltaE_ciede2000(np.array(_lab(a)), np.array(_lab(b))))


def _far_from_all(candidates: list[str], taken: list[str]) -> list[bool]:
    """For each candidate, whether it is unlike every taken colour (one vectorised comparison)."""
    if not taken or not candidates:
        return [True] * len(candidates)
    from skimage.color import deltaE_ciede2000

    a = np.array([_lab(c) for c in candidates])[:, None, :].repeat(len(taken), 1)
    b = np.array([_lab(t) for t in taken])[None, :, :].repeat(len(candidates), 0)
    return list((deltaE_ciede2000(a, b) >= ALIKE).all(axis=1))


def class_colours(names: list[str], background: tuple[str, ...] = ()) -> dict[int, str]:
    """Label value (1-based, in ``names`` order) -> colour, each decided by the names alone.

    Background classes (by name, or listed in ``background``) are transparent. Colour words
    win; other names get a palette colour chosen from a hash of the name, moving along the
    palette past any colour alike to one already taken (then past any taken one). Clashes are
    settled in alphabetical order, so the same set of names gets the same colours in any order,
    and no colour repeats before the palette's 48 are used.
    """
    taken: list[str] = []
    chosen: dict[str, str] = {}
    for name in names:
        if name in background or is_background(name):
            chosen[name] = "transparent"
    for name in names:
        colour = colour_word(name)
        if name not in chosen and colour is not None and colour not in taken:
            chosen[name] = colour
            taken.append(colour)
    for name in sorted(n for n in names if n not in chosen):
        start = _hashed(name) % len(PALETTE)
        order = [PALETTE[(start + step) % len(PALETTE)] for step in range(len(PALETTE))]
        free = [c for c in order if c not in taken]
        distinct = [c for c, far in zip(free, _far_from_all(free, taken)) if far]
        colour = distinct[0] if distinct else free[0] if free else order[0]  # past 48 classes repeats are unavoidable
        chosen[name] = colour
        taken.append(colour)
    return {index: chosen[name] for index, name in enumerate(names, start=1)}


def colormap_dict(names: list[str], background: tuple[str, ...] = ()) -> dict:
    """A napari DirectLabelColormap ``color_dict``: 0 and background classes transparent, classes by name,
    any other label visible grey."""
    return {None: UNKNOWN_LABEL, 0: "transparent", **class_colours(names, background)}
