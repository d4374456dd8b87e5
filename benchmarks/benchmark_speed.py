"""Speed of napari-clearclip against the official ClearCLIP loop, on the same random ViT-B/16 weights.

    python benchmarks/benchmark_speed.py            # CPU, fp32 and bf16
    python benchmarks/benchmark_speed.py --device cuda
    python benchmarks/benchmark_speed.py --model ViT-L-14   # another open_clip ViT, randomly initialised

Everything is measured in one run, so the ratios compare like with like even on a
noisy machine. The reference is tests/reference.py: window by window, full
77-token text context. Caches live in a temporary folder, so "first" is cold.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
CLASSES = ["sky", "horse", "grass", "tree", "person"]


def timed(fn, repeat=1):
    best, value = float("inf"), None
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        value = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, value


def test_image(height=448, width=597, seed=0):
    from skimage.transform import resize

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 255, (6, 8, 3)).astype(np.float32)
    return np.clip(resize(coarse, (height, width, 3), order=1) + rng.normal(0, 8, (height, width, 3)), 0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=2, help="repeats of the short timings (best is kept)")
    parser.add_argument("--model", default="ViT-B-16", help="open_clip ViT, randomly initialised (default ViT-B-16)")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="clearclip-bench-")
    os.environ["NAPARI_CLEARCLIP_CACHE_DIR"] = os.path.join(workdir, "cache")

    import open_clip

    from napari_clearclip import Segmenter
    from napari_clearclip.prompts import IMAGENET_TEMPLATES
    from reference import OfficialReference, official_preprocess

    device = torch.device(args.device)
    logging.disable(logging.WARNING)
    torch.manual_seed(0)
    net = open_clip.create_model(args.model, pretrained=None).eval()
    logging.disable(logging.NOTSET)
    checkpoint = os.path.join(workdir, f"{args.model.lower()}-random.pt")
    torch.save(net.state_dict(), checkpoint)
    tokenizer = open_clip.get_tokenizer(args.model)
    image = test_image()
    print(f"{args.model} (random weights), torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}; "
          f"image {image.shape}, "
          f"{len(CLASSES)} classes x {len(IMAGENET_TEMPLATES)} templates")

    rows = []

    def report(name, seconds, baseline=None, note=""):
        ratio = f"{baseline / seconds:6.2f}x faster" if baseline else ""
        rows.append((name, seconds))
        print(f"{name:<52s} {seconds * 1000:9.1f} ms  {ratio} {note}", flush=True)

    # reference (fp32 on the same device): text at 77 tokens, then the window-by-window image loop
    net.to(device)
    ref_text, reference = timed(lambda: OfficialReference(net, tokenizer, CLASSES, IMAGENET_TEMPLATES))
    pixels = official_preprocess(image, 448).to(device)
    ref_image, (_, ref_prob, ref_labels) = timed(lambda: reference.predict(pixels, image.shape[:2]), args.repeat)
    ref_prob, ref_labels = ref_prob.cpu(), ref_labels.cpu()

    def reference_numpy():
        """What napari-clearclip is timed on: a numpy image in, numpy maps and labels out."""
        _, prob, labels = reference.predict(official_preprocess(image, 448).to(device), image.shape[:2])
        return prob.cpu().numpy(), labels.cpu().numpy()

    ref_image_numpy, _ = timed(reference_numpy, args.repeat)
    ref_first = ref_text + ref_image_numpy
    report("reference: text (5 classes, 77 tokens)", ref_text)
    report("reference: image path (official loop), pixels ready on the device", ref_image)
    report("reference: image path, numpy image in, maps out", ref_image_numpy)
    report("reference: first result", ref_first)
    net.cpu()

    seg = Segmenter(args.model, checkpoint, device=args.device, precision="fp32", feature_store=False)
    first, result = timed(lambda: seg.segment(image, CLASSES))
    report(f"napari-clearclip {seg.model.precision}: first result, 5 new classes", first, ref_first)
    print(f"{'':52s} max |p - p_ref| = {np.abs(result.probabilities - ref_prob.numpy()).max():.2e}, "
          f"argmax agreement {(result.labels == ref_labels.numpy()).mean() * 100:.3f}%")
    again, _ = timed(lambda: seg.segment(image, ["grass", "sky", "person"]), args.repeat)
    report("cached image, other selection of known classes", again, note=f"= {again / first * 100:.1f}% of first")
    new_class, _ = timed(lambda: seg.segment(image, CLASSES + ["water"]))
    report("cached image, one new class", new_class, note=f"= {new_class / first * 100:.1f}% of first")

    def image_path(segmenter):
        segmenter._features.clear()
        return segmenter.segment(image, CLASSES)

    fp32_image, fp32_result = timed(lambda: image_path(seg), args.repeat)
    report(f"image path alone, {seg.model.precision}", fp32_image, ref_image_numpy)
    if device.type == "cpu":
        fast = Segmenter(args.model, checkpoint, device="cpu", precision="bf16", feature_store=False)
        fast.segment(image, CLASSES)  # warm-up and text
        bf16_image, bf16_result = timed(lambda: image_path(fast), args.repeat)
        agreement = (bf16_result.labels == fp32_result.labels).mean() * 100
        report("image path alone, bf16 autocast", bf16_image, ref_image_numpy,
               note=f"({fp32_image / bf16_image:.2f}x this fp32), argmax agreement with fp32 {agreement:.2f}%")
    else:
        half = Segmenter(args.model, checkpoint, device=args.device, precision="fp16", feature_store=False)
        half.segment(image, CLASSES)
        fp16_image, fp16_result = timed(lambda: image_path(half), args.repeat)
        agreement = (fp16_result.labels == fp32_result.labels).mean() * 100
        report("image path alone, fp16", fp16_image, ref_image_numpy, note=f"argmax agreement with fp32 {agreement:.2f}%")
        count = 32
        images = [test_image(seed=s) for s in range(count)]
        for segmenter in (seg, half):
            def throughput(segmenter=segmenter):
                segmenter._features.clear()
                for img in images:
                    segmenter.segment(img, CLASSES)

            seconds, _ = timed(throughput)
            print(f"{'CUDA ' + segmenter.model.precision + ' throughput':<52s} {count / seconds:9.1f} images/s "
                  f"(448x597, 2 windows each, new image every call)")


if __name__ == "__main__":
    main()
