"""Class colours that follow the class name, not its position in the list.

A class keeps its colour when the list is reordered or another class is added; a
class named after a colour ("red", "green", "blue cells") is drawn in that colour.
"""

from __future__ import annotations

import hashlib
import re

# Distinct, colour-blind-friendly colours (Okabe-Ito, then Tableau) for classes without a colour word.
PALETTE = (
    "#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7",
    "#8C564B", "#17BECF", "#BCBD22", "#7F7F7F", "#9467BD", "#1F77B4", "#FF7F0E",
)
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


def _hashed(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.lower().encode("utf-8"), digest_size=4).digest(), "big")


def class_colours(names: list[str]) -> dict[int, str]:
    """Label value (1-based, in ``names`` order) -> colour, each decided by the names alone.

    Colour words win; other names get a palette colour chosen from a hash of the name,
    moving to the next free one on a clash. Clashes are settled in alphabetical order,
    so the same set of names gets the same colours in any order.
    """
    taken: set[str] = set()
    chosen: dict[str, str] = {}
    for name in names:
        colour = colour_word(name)
        if colour is not None and colour not in taken:
            chosen[name] = colour
            taken.add(colour)
    for name in sorted(n for n in names if n not in chosen):
        start = _hashed(name) % len(PALETTE)
        for step in range(len(PALETTE)):
            colour = PALETTE[(start + step) % len(PALETTE)]
            if colour not in taken:
                break
        else:
            colour = PALETTE[start]  # more classes than colours: repeats are unavoidable
        chosen[name] = colour
        taken.add(colour)
    return {index: chosen[name] for index, name in enumerate(names, start=1)}


def colormap_dict(names: list[str]) -> dict:
    """A napari DirectLabelColormap ``color_dict``: 0 transparent, classes by name, any other label visible grey."""
    return {None: UNKNOWN_LABEL, 0: "transparent", **class_colours(names)}
