"""Train the bundled ``synthetic-tiny`` CLIP on synthetic scenes (CPU, reproducible).

    python scripts/train_synthetic.py --steps 1400 --out src/napari_clearclip/data/synthetic-tiny.pt

Contrastive image-caption training from scratch on seeded scenes of coloured shapes
(see ``napari_clearclip.synthetic``). Pairs whose scenes hold the same set of colours
count as positives of each other, so that captions differing only in wording (or
in a prompt template) do not fight in a batch.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

import napari_clearclip  # noqa: F401  (registers the synthetic-tiny config)
from napari_clearclip.models import OPENAI_MEAN_255, OPENAI_STD_255
from napari_clearclip.prompts import IMAGENET_TEMPLATES
from napari_clearclip.synthetic import crop_scene, make_scene


def make_batch(rng: np.random.Generator, batch: int, size: int, crop_fraction: float = 0.5):
    images, captions, contents = [], [], []
    for _ in range(batch):
        if rng.random() < crop_fraction:
            scene = crop_scene(rng, size=size)
        else:
            scene = make_scene(rng, size=size, objects=(0, 4) if rng.random() < 0.9 else (0, 0))
        caption = scene.caption
        if rng.random() < 0.6:  # teach the words inside prompt templates, as used at inference
            caption = str(rng.choice(IMAGENET_TEMPLATES)).replace("{}", caption)
        if rng.random() < 0.5:
            scene.image[:] = scene.image[:, ::-1]
        images.append(scene.image)
        captions.append(caption)
        contents.append(" ".join(sorted({colour for colour, _ in scene.objects})) or "empty")
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    mean = torch.tensor(OPENAI_MEAN_255).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD_255).view(1, 3, 1, 1)
    return (pixels - mean) / std, captions, contents


def soft_clip_loss(image_features, text_features, logit_scale, contents):
    """CLIP's contrastive loss where pairs showing the same colours count as positives."""
    logits = logit_scale * image_features @ text_features.T
    same = torch.tensor([[a == b for b in contents] for a in contents], dtype=torch.float32)
    targets = same / same.sum(1, keepdim=True)
    return 0.5 * (torch.sum(-targets * F.log_softmax(logits, 1), 1).mean()
                  + torch.sum(-targets * F.log_softmax(logits.T, 1), 1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1400)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--crops", type=float, default=0.5, help="share of samples that are windows cut from larger scenes")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                        help="bf16 autocast for the matrix products (about 1.6x faster on CPUs with AMX)")
    parser.add_argument("--out", default="src/napari_clearclip/data/synthetic-tiny.pt")
    parser.add_argument("--snapshots", default=None, help="folder for a checkpoint every 100 steps (for model selection)")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    model = open_clip.create_model("synthetic-tiny", pretrained=None)
    tokenizer = open_clip.get_tokenizer("synthetic-tiny")
    size = model.visual.image_size[0]
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    start = time.time()
    model.train()
    for step in range(1, args.steps + 1):
        pixels, captions, contents = make_batch(rng, args.batch, size, args.crops)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            image_features = F.normalize(model.encode_image(pixels).float(), dim=-1)
            text_features = F.normalize(model.encode_text(tokenizer(captions)).float(), dim=-1)
        loss = soft_clip_loss(image_features, text_features, model.logit_scale.exp().clamp(max=100), contents)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 50 == 0 or step == 1:
            print(f"step {step}/{args.steps} loss {loss.item():.3f} scale {model.logit_scale.exp().item():.1f} "
                  f"{time.time() - start:.0f}s", flush=True)
        if step % 100 == 0 or step == args.steps:
            state = {k: v.detach().half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
            if args.snapshots:
                os.makedirs(args.snapshots, exist_ok=True)
                torch.save(state, os.path.join(args.snapshots, f"step{step:05d}.pt"))
            if step % 500 == 0 or step == args.steps:
                torch.save(state, args.out)
    print(f"trained {args.steps} steps in {time.time() - start:.0f}s; saved {args.out}")


if __name__ == "__main__":
    main()
