"""Test images shared by the test modules (plain functions: test modules do not import each other)."""

from __future__ import annotations

import numpy as np


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB image with a little noise: regions like a photo's, of any size."""
    from skimage.transform import resize

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 255, (5, 7, 3)).astype(np.float32)
    noisy = resize(coarse, (height, width, 3), order=1) + rng.normal(0, 8, (height, width, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)
