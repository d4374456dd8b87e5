"""Score every dense method with the bundled synthetic-tiny model on held-out synthetic scenes.

    python benchmarks/evaluate_synthetic.py [--scenes 24]

Prints a Markdown table of the IoU per colour and their mean (classes: red, green,
blue, yellow and background; background pixels count as unlabelled).
"""

from __future__ import annotations

import argparse
import os
import tempfile

from napari_clearclip import METHODS, Segmenter
from napari_clearclip.demo.scenes import COLOURS, colour_iou, held_out_scenes


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


if __name__ == "__main__":
    main()
