"""Train the bundled ``synthetic-tiny`` CLIP on synthetic scenes (CPU, reproducible).

    python scripts/train_synthetic.py --out src/napari_clearclip/data/synthetic-tiny.pt

Contrastive image-caption training from scratch on seeded 64 px tiles of coloured shapes
on textured grey (see ``napari_clearclip.synthetic.training_tile``). Captions name every
object and, often, the background; empty tiles are captioned with background words alone.
Pairs whose tiles hold the same set of colours count as positives of each other, so that
captions differing only in wording (or in a prompt template) do not fight in a batch.

Two terms make the loss. The first is CLIP's, on the usual image embedding (the class
token after the last block). The second, with weight ``--dense-weight``, is a
patch-aligned one on the last block's value-path patch embeddings (MaskCLIP's dense
features): an image matches a caption through its best-matching patches (a soft max
over patches), and a caption counts as a positive for every image that holds all it
names, so "background" is a positive for every image. Without this term, a model this
small may carry a colour to the class token through the residual stream alone, and its
dense features cannot see that colour at all (the previous demo model was blind to blue
that way); pooling the patches with a plain mean instead teaches every patch the whole
scene. ClearCLIP's own change, the q-q attention with no residual and no feed-forward,
is never trained: it stays an inference-time change, as in the paper.

Every ``--validate-every`` steps the model is scored with ClearCLIP on validation scenes
(seeds from 20,000, distinct from the held-out test scenes from 10,000) and the best
snapshot is what ``--out`` holds at the end.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

import napari_clearclip  # noqa: F401  (registers the synthetic-tiny config)
from napari_clearclip.methods import maskclip, standard_block
from napari_clearclip.models import OPENAI_MEAN_255, OPENAI_STD_255
from napari_clearclip.prompts import IMAGENET_TEMPLATES
from napari_clearclip.synthetic import training_tile

VALIDATION_SEED = 20_000


def make_batch(rng: np.random.Generator, batch: int, size: int, template_fraction: float = 0.5):
    images, captions, contents = [], [], []
    for _ in range(batch):
        tile = training_tile(rng, size=size)
        caption = tile.caption
        if rng.random() < template_fraction:  # the words also have to work inside the templates used at inference
            caption = str(rng.choice(IMAGENET_TEMPLATES)).replace("{}", caption)
        image = tile.image
        if rng.random() < 0.5:
            image = image[:, ::-1]
        images.append(np.ascontiguousarray(image))
        captions.append(caption)
        contents.append(" ".join(sorted({colour for colour, _ in tile.objects})) or "empty")
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


def patch_aligned_loss(patches, text_features, logit_scale, contents, temperature: float = 0.05):
    """Contrastive loss where image i scores caption j by a soft max over its patches' similarities,
    and caption j is a positive of image i when image i holds everything caption j names."""
    sims = torch.einsum("bpe,te->btp", patches, text_features)
    logits = logit_scale * (torch.softmax(sims / temperature, dim=-1) * sims).sum(-1)
    sets = [set(c.split()) - {"empty"} for c in contents]
    holds = torch.tensor([[b <= a for b in sets] for a in sets], dtype=torch.float32)
    image_to_text = torch.sum(-holds / holds.sum(1, keepdim=True) * F.log_softmax(logits, 1), 1).mean()
    text_to_image = torch.sum(-holds.T / holds.T.sum(1, keepdim=True) * F.log_softmax(logits.T, 1), 1).mean()
    return 0.5 * (image_to_text + text_to_image)


def image_embeddings(visual, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(class-token embedding (B, E), value-path patch embeddings (B, P, E)), L2-normalised."""
    x = visual.conv1(pixels)
    rows, cols = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
    x = visual.ln_pre(x + visual.positional_embedding.to(x.dtype))
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        x = standard_block(block, x)
    global_token = visual.ln_post(standard_block(blocks[-1], x)[:, 0]) @ visual.proj
    patches = F.normalize((visual.ln_post(maskclip(blocks[-1], x, (rows, cols))) @ visual.proj).float(), dim=-1)
    return F.normalize(global_token.float(), dim=-1), patches


def half_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().half() if v.is_floating_point() else v for k, v in model.state_dict().items()}


def validate(path: str, scenes: int) -> dict[str, float]:
    """ClearCLIP IoU per colour (and mean) on validation scenes, classes = 4 colours + background."""
    from napari_clearclip import Segmenter
    from napari_clearclip.synthetic import colour_iou, held_out_scenes

    segmenter = Segmenter("synthetic-tiny", pretrained=path, device="cpu")
    return colour_iou(segmenter, held_out_scenes(scenes, seed=VALIDATION_SEED))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                        help="bf16 autocast for the matrix products (faster on CPUs with bf16 support)")
    parser.add_argument("--dense-weight", type=float, default=1.0,
                        help="weight of the loss on pooled value-path patch embeddings (0: plain CLIP training)")
    parser.add_argument("--validate-every", type=int, default=200)
    parser.add_argument("--validation-scenes", type=int, default=16)
    parser.add_argument("--out", default="src/napari_clearclip/data/synthetic-tiny.pt")
    args = parser.parse_args()

    os.environ.setdefault("NAPARI_CLEARCLIP_CACHE_DIR", tempfile.mkdtemp())
    snapshot_dir = tempfile.mkdtemp()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    model = open_clip.create_model("synthetic-tiny", pretrained=None)
    tokenizer = open_clip.get_tokenizer("synthetic-tiny")
    size = model.visual.image_size[0]
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    start = time.time()
    best: tuple[float, int] | None = None
    for step in range(1, args.steps + 1):
        model.train()
        pixels, captions, contents = make_batch(rng, args.batch, size)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            image_features, dense_features = image_embeddings(model.visual, pixels)
            text_features = F.normalize(model.encode_text(tokenizer(captions)).float(), dim=-1)
        scale = model.logit_scale.exp().clamp(max=100)
        loss = soft_clip_loss(image_features, text_features, scale, contents)
        if args.dense_weight:
            loss = loss + args.dense_weight * patch_aligned_loss(dense_features, text_features, scale, contents)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 50 == 0 or step == 1:
            print(f"step {step}/{args.steps} loss {loss.item():.3f} scale {model.logit_scale.exp().item():.1f} "
                  f"{time.time() - start:.0f}s", flush=True)
        if step % args.validate_every == 0 or step == args.steps:
            path = os.path.join(snapshot_dir, f"step{step:05d}.pt")
            torch.save(half_state(model), path)
            scores = validate(path, args.validation_scenes)
            # the weakest colour counts as much as the mean: a model blind to one colour is no demo
            merit = scores["mean"] + min(v for k, v in scores.items() if k != "mean")
            print(f"  validation step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()), flush=True)
            if best is None or merit > best[0]:
                best = (merit, step)
                tmp = args.out + ".partial"
                torch.save(half_state(model), tmp)
                os.replace(tmp, args.out)
    print(f"trained {args.steps} steps in {time.time() - start:.0f}s; saved step {best[1]} to {args.out}")


if __name__ == "__main__":
    main()
