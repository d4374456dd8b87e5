"""Each method's time and peak memory against ClearCLIP, on the same image, model and CPU.

    python benchmarks/benchmark_methods.py [--model ViT-B-16-quickgelu] [--size 448 597] [--device cuda]

A randomly initialised model (no download), fp32, 5 classes with one template, ``maps=False``,
no edge snapping; CLIP-DIY in its official layout (256 x 256, crops of 256, 128 and 64), alone and
with FOUND's foreground map (random DINO ViT-S/8 weights; the image reduced to 512 on its long side,
448 x 597 becomes 384 x 512). Each case runs in a fresh process; memory is the peak resident memory above
what the process held before the run (sampled every 10 ms), after a first run that loaded the
text embeddings, so the figure is the image path's. On a GPU (``--device cuda``) each case first runs
once on another image (kernel selection, allocator warm-up), its time is the median of 7 runs from scratch
(``--repeats``; one run takes milliseconds there) and memory is PyTorch's peak GPU allocation.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile

SCRIPT = r'''
import os, sys, tempfile, threading, time
os.environ["NAPARI_CLEARCLIP_CACHE_DIR"] = sys.argv[1]
import numpy as np, psutil, torch
from napari_clearclip import Segmenter
model, method, height, width, windows = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
device = sys.argv[7]
gpu = device.startswith("cuda")
checkpoint = os.path.join(sys.argv[1], model + ".pt")
rng = np.random.default_rng(0)
image = (rng.random((height // 16 + 1, width // 16 + 1, 3)) * 255).astype(np.uint8)
image = np.kron(image, np.ones((16, 16, 1), np.uint8))[:height, :width]
segmenter = Segmenter(model, checkpoint, method=method, device=device, precision="fp32",
                      feature_store=False)
options = {"templates": ["a photo of a {}."]}
if windows == "clearclip":
    options.update(short_side=448, crop=448, stride=224)
elif windows == "whole":
    options.update(short_side=336, crop=4096, stride=4096)
extra = {}
if windows == "found":
    extra = {"foreground": "found", "found_weights": (os.path.join(sys.argv[1], "dino.pth"),
                                                      os.path.join(sys.argv[1], "decoder.pt"))}
classes = ["sky", "horse", "grass", "road", "background"]
segmenter.encode_classes(classes, options["templates"])
if gpu:
    segmenter.segment(np.ascontiguousarray(image[::-1]), classes, maps=False, **options, **extra)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
process = psutil.Process()
base = process.memory_info().rss
peak = [base]
done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], process.memory_info().rss)
        time.sleep(0.01)
threading.Thread(target=sample, daemon=True).start()
times = []
for _ in range(int(sys.argv[8])):  # each run from scratch: no features, labels or foreground map kept
    segmenter._features.clear()
    segmenter._label_states.clear()
    segmenter._saliency.clear()
    start = time.perf_counter()
    segmenter.segment(image, classes, maps=False, **options, **extra)
    if gpu:
        torch.cuda.synchronize()
    times.append(time.perf_counter() - start)
seconds = sorted(times)[len(times) // 2]
done.set()
if gpu:
    peak[0], base = torch.cuda.max_memory_allocated(), 0
print(seconds, (peak[0] - base) / 2**20, segmenter.resolve_options(**options))
'''


def run(folder: str, model: str, method: str, size, windows: str, device: str = "cpu",
        repeats: int = 1) -> tuple[float, float, str]:
    done = subprocess.run([sys.executable, "-c", SCRIPT, folder, model, method, str(size[0]), str(size[1]), windows,
                           device, str(repeats)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    seconds, memory, options = done.stdout.strip().split(" ", 2)
    return float(seconds), float(memory), options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16-quickgelu")
    parser.add_argument("--size", type=int, nargs=2, default=[448, 597])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=None, help="runs per case, the median kept (default 1 on the "
                        "CPU, 7 on a GPU, where one run takes milliseconds)")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.device == "cpu" else 7)
    import open_clip
    import torch

    folder = tempfile.mkdtemp()
    torch.manual_seed(0)
    torch.save(open_clip.create_model(args.model, pretrained=None).state_dict(), f"{folder}/{args.model}.pt")
    import timm

    torch.save(timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=0).state_dict(),
               f"{folder}/dino.pth")
    torch.save({"decoder": torch.nn.Conv2d(384, 1, 1).state_dict()}, f"{folder}/decoder.pt")
    baseline, base_memory, _ = run(folder, args.model, "clearclip", args.size, "clearclip", args.device, repeats)
    where = "CPU" if args.device == "cpu" else f"{args.device} (memory: peak GPU allocation)"
    print(f"{args.model}, random weights, fp32, {where}; image {args.size[0]} x {args.size[1]}, 5 classes; "
          f"median of {repeats} run(s) per case\n")
    print("| method | windows | time | x ClearCLIP | peak working memory |")
    print("|---|---|---|---|---|")
    print(f"| clearclip | official (448, 448, 224) | {baseline:.2f} s | 1.00 | {base_memory:.0f} MiB |")
    cases = [("maskclip", "clearclip"), ("sclip", "clearclip"), ("naclip", "clearclip"), ("vanilla", "clearclip"),
             ("resclip", "clearclip"), ("resclip", "own"), ("clearclip", "whole"), ("resclip", "whole"),
             ("clipdiy", "own"), ("clipdiy", "found")]
    names = {"clearclip": "ClearCLIP's (448, 448, 224)", "own": "its own", "whole": "whole image at short side 336",
             "found": "its own, with FOUND"}
    for method, windows in cases:
        seconds, memory, _ = run(folder, args.model, method, args.size, windows, args.device, repeats)
        print(f"| {method} | {names[windows]} | {seconds:.2f} s | {seconds / baseline:.2f} | {memory:.0f} MiB |",
              flush=True)


if __name__ == "__main__":
    main()
