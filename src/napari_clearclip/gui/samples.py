"""Sample images for napari: scikit-image's bundled photos (no download) and a synthetic scene."""

from __future__ import annotations

import skimage.data

from ..demo.scenes import DEMO_CLASSES, DEMO_SAMPLE_NAME, sample_scene


def _sample(name: str, title: str):
    def load():
        return [(getattr(skimage.data, name)(), {"name": name, "rgb": True, "metadata": {"source": title}}, "image")]

    load.__name__ = name
    return load


astronaut = _sample("astronaut", "Eileen Collins (scikit-image)")
coffee = _sample("coffee", "Coffee cup (scikit-image)")
chelsea = _sample("chelsea", "Chelsea the cat (scikit-image)")
immunohistochemistry = _sample("immunohistochemistry", "Immunohistochemistry (scikit-image)")
retina = _sample("retina", "Human retina (scikit-image)")


def synthetic_shapes():
    """Coloured shapes on grey, for the offline demo model (classes: red, green, blue, yellow, background)."""
    metadata = {"source": "napari-clearclip synthetic scene", "suggested_classes": DEMO_CLASSES.split("\n")}
    return [(sample_scene(256), {"name": DEMO_SAMPLE_NAME, "rgb": True, "metadata": metadata}, "image")]
