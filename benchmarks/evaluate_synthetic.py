"""Score every dense method with the bundled synthetic-tiny model on held-out synthetic scenes.

    python benchmarks/evaluate_synthetic.py [--scenes 24]

Prints a Markdown table of the IoU per colour and their mean (classes: red, green,
blue, yellow and background; background pixels count as unlabelled). CLIP-DIY is also scored with a
foreground map a user would make by thresholding: pixels whose colour saturation exceeds 60.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np

from napari_clearclip import METHODS, Segmenter
from napari_clearclip.demo.scenes import COLOURS, colour_iou, held_out_scenes


class WithForeground:
    """A segmenter that fuses each image with a thresholded foreground map (strongly coloured pixels)."""

    def __init__(self, segmenter):
        self.segmenter = segmenter

    def segment(self, image, classes, **options):
        rgb = image[..., :3].astype(np.int16)
        mask = (rgb.max(-1) - rgb.min(-1)) > 60
        return self.segmenter.segment(image, classes, foreground=mask, **options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=24)
    args = parser.parse_args()
    os.environ.setdefault("NAPARI_CLEARCLIP_CACHE_DIR", tempfile.mkdtemp())
    segmenter = Segmenter("synthetic-tiny", device="cpu")
    scenes = held_out_scenes(args.scenes)
    print(f"| method | {' | '.join(COLOURS)} | mean IoU |")
    print("|---|" + "---|" * (len(COLOURS) + 1))
    for method in METHODS:
        segmenter.method = method
        scores = colour_iou(segmenter, scenes)
        print(f"| {method} | " + " | ".join(f"{scores[c]:.3f}" for c in COLOURS) + f" | **{scores['mean']:.3f}** |",
              flush=True)
    segmenter.method = "clipdiy"
    scores = colour_iou(WithForeground(segmenter), scenes)
    print("| clipdiy, thresholded foreground map | " + " | ".join(f"{scores[c]:.3f}" for c in COLOURS)
          + f" | **{scores['mean']:.3f}** |", flush=True)


if __name__ == "__main__":
    main()
