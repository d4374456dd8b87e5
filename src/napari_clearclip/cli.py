"""``clearclip-segment``: segment image files from the command line.

    clearclip-segment cells/*.tif --classes "cell, nucleus; background; debris" --out results/

Writes ``<name>_labels.tif`` (0 = unassigned, 1..C in the given order) and
``<name>_classes.csv`` per input, each as soon as it is done, so an interrupted
batch keeps everything already finished. Bad inputs are reported and skipped;
the exit status is non-zero if any input failed.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .errors import ClearClipError
from .methods import METHODS
from .models import DEVICES, PRECISIONS
from .prompts import parse_classes


def read_image(path: Path) -> np.ndarray:
    """Read a 2-D grey or RGB(A) image; TIFFs through tifffile, other formats through scikit-image."""
    if not path.is_file():
        raise ClearClipError(f"No such file: {path}")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            return tifffile.imread(path)
        from skimage.io import imread

        return imread(path)
    except Exception as exc:
        raise ClearClipError(f"Could not read {path} as an image: {exc}") from None


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".partial")
    write(tmp)
    os.replace(tmp, path)


def write_outputs(result, out_dir: Path, stem: str, save_probabilities: bool = False) -> list[Path]:
    import tifffile

    labels_path = out_dir / f"{stem}_labels.tif"
    table_path = out_dir / f"{stem}_classes.csv"
    dtype = np.uint16 if len(result.class_names) < 65535 else np.uint32
    _write_atomic(labels_path, lambda p: tifffile.imwrite(p, result.labels.astype(dtype), compression="zlib"))

    def write_table(p):
        with open(p, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=["label", "name", "synonyms", "pixels"])
            writer.writeheader()
            writer.writerows(result.class_table())

    _write_atomic(table_path, write_table)
    written = [labels_path, table_path]
    if save_probabilities:
        prob_path = out_dir / f"{stem}_probabilities.tif"
        _write_atomic(prob_path, lambda p: tifffile.imwrite(p, result.probabilities, compression="zlib"))
        written.append(prob_path)
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clearclip-segment",
        description="Segment images into named classes with ClearCLIP (training-free, frozen CLIP weights).",
        epilog=__doc__.split("\n\n", 2)[-1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("images", nargs="+", type=Path, help="image files (TIFF, PNG, JPEG, ...)")
    parser.add_argument("--classes", required=True,
                        help="classes separated by ';', synonyms by ',': \"sky; horse, pony; grass\"")
    parser.add_argument("--out", type=Path, default=Path("."), help="output folder (default: current folder)")
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model name (default: ViT-B-16)")
    parser.add_argument("--pretrained", default=None,
                        help="open_clip pretrained tag (default: openai) or a local checkpoint file")
    parser.add_argument("--method", default="clearclip", choices=list(METHODS))
    parser.add_argument("--device", default="auto", choices=list(DEVICES))
    parser.add_argument("--precision", default="auto", choices=list(PRECISIONS))
    parser.add_argument("--prob-threshold", type=float, default=0.0,
                        help="pixels whose best class probability is below this get label 0 (default: 0)")
    parser.add_argument("--short-side", type=int, default=None,
                        help="resize so the short side has this many pixels (default: the model's, 448)")
    parser.add_argument("--native", action="store_true", help="segment at the native resolution, no resizing")
    parser.add_argument("--crop", type=int, default=None, help="window size (default: the model's, 448)")
    parser.add_argument("--stride", type=int, default=None, help="window stride (default: the model's, 224)")
    parser.add_argument("--logit-scale", type=float, default=50.0)
    parser.add_argument("--template", action="append", dest="templates",
                        help="prompt template with {} for the class name; repeat for several "
                             "(default: the 80 ImageNet templates)")
    parser.add_argument("--save-probabilities", action="store_true", help="also write <name>_probabilities.tif")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        classes = parse_classes(args.classes)
    except ClearClipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    from .segmenter import Segmenter

    try:
        segmenter = Segmenter(args.model, args.pretrained, method=args.method, device=args.device, precision=args.precision)
    except ClearClipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    options = {"prob_threshold": args.prob_threshold, "logit_scale": args.logit_scale, "templates": args.templates}
    if args.native:
        options["short_side"] = None
    elif args.short_side is not None:
        options["short_side"] = args.short_side
    if args.crop is not None:
        options["crop"] = args.crop
    if args.stride is not None:
        options["stride"] = args.stride

    failures = []
    stems: dict[str, int] = {}
    with tqdm(args.images, unit="image", desc="clearclip", disable=None) as bar:
        for path in bar:
            bar.set_postfix_str(path.name)
            stem = path.stem
            stems[stem] = stems.get(stem, 0) + 1
            if stems[stem] > 1:
                stem = f"{stem}_{stems[stem]}"
            try:
                result = segmenter.segment(read_image(path), [", ".join(c.synonyms) for c in classes], **options)
                write_outputs(result, args.out, stem, args.save_probabilities)
            except ClearClipError as exc:
                failures.append(path)
                tqdm.write(f"error: {path}: {exc}", file=sys.stderr)
            except KeyboardInterrupt:
                tqdm.write("interrupted: results already written are kept", file=sys.stderr)
                return 130
    done = len(args.images) - len(failures)
    print(f"{done} of {len(args.images)} images segmented into {args.out}", file=sys.stderr)
    if failures:
        print(f"failed: {', '.join(str(p) for p in failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
