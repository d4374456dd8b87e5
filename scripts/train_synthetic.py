"""Train the bundled ``synthetic-tiny`` CLIP on synthetic scenes (CPU, reproducible).

    python scripts/train_synthetic.py --out src/napari_clearclip/demo/synthetic-tiny.pt

Contrastive image-caption training from scratch on seeded 64 px tiles of coloured shapes
on textured grey (see ``napari_clearclip.demo.scenes.training_tile``). Captions name every
object and, often, the background; empty tiles are captioned with background words alone.
Pairs whose tiles hold the same set of colours count as positives of each other, so that
captions differing only in wording (or in a prompt template) do not fight in a batch.

Two terms make the loss. The first is CLIP's, on the usual image embedding (the class
token after the last block) against the tile's caption. The second, with weight
``--dense-weight``, is the same contrastive loss one level down: each quarter of a tile
(a 4 x 4 block of patches) has a caption of its own, naming the colours that cover at
least a tenth of it (or only the background), and is matched to it through the mean of
its patches' value-path embeddings (MaskCLIP's dense features of the last block). Without
this term, a model this small carries colours to the class token through the residual
stream, and its patch features either cannot see a colour at all (the previous demo model
was blind to blue) or see it everywhere near it (grey next to a blue square called blue).
ClearCLIP's own change, the q-q attention with no residual and no feed-forward, is never
trained: it stays an inference-time change, as in the paper.

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
from napari_clearclip.demo.scenes import BACKGROUND_CAPTIONS, BACKGROUND_WORDS, training_tile

VALIDATION_SEED = 20_000


QUARTER_MIN_SHARE = 0.1


def quarter_captions(rng: np.random.Generator, tile) -> tuple[list[str], list[str]]:
    """A caption and a content key for each quarter of a tile (row-major), from the colours covering it."""
    size = tile.image.shape[0]
    half = size // 2
    captions, contents = [], []
    for top in (0, half):
        for left in (0, half):
            present = [c for c, mask in tile.masks.items()
                       if mask[top:top + half, left:left + half].mean() >= QUARTER_MIN_SHARE]
            if not present:
                captions.append(str(rng.choice(BACKGROUND_CAPTIONS)))
            else:
                order = [present[i] for i in rng.permutation(len(present))]
                words = order if rng.random() < 0.5 else [f"a {c} object" for c in order]
                text = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
                if rng.random() < 0.5:
                    text += " on a " + str(rng.choice(BACKGROUND_WORDS))
                captions.append(text)
            contents.append(" ".join(sorted(present)) or "empty")
    return captions, contents


def _templated(rng, caption: str, fraction: float) -> str:
    """The words also have to work inside the prompt templates used at inference."""
    return str(rng.choice(IMAGENET_TEMPLATES)).replace("{}", caption) if rng.random() < fraction else caption


def make_batch(rng: np.random.Generator, batch: int, size: int, template_fraction: float = 0.5):
    images, captions, contents, local_captions, local_contents = [], [], [], [], []
    for _ in range(batch):
        tile = training_tile(rng, size=size)
        if rng.random() < 0.5:
            tile.image[:] = tile.image[:, ::-1]
            for mask in tile.masks.values():
                mask[:] = mask[:, ::-1]
        images.append(np.ascontiguousarray(tile.image))
        captions.append(_templated(rng, tile.caption, template_fraction))
        contents.append(" ".join(sorted({colour for colour, _ in tile.objects})) or "empty")
        quarter_text, quarter_keys = quarter_captions(rng, tile)
        local_captions.extend(_templated(rng, t, template_fraction) for t in quarter_text)
        local_contents.extend(quarter_keys)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    mean = torch.tensor(OPENAI_MEAN_255).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD_255).view(1, 3, 1, 1)
    return (pixels - mean) / std, captions, contents, local_captions, local_contents


def soft_clip_loss(image_features, text_features, logit_scale, contents):
    """CLIP's contrastive loss where pairs showing the same colours count as positives."""
    logits = logit_scale * image_features @ text_features.T
    ids = {key: index for index, key in enumerate(dict.fromkeys(contents))}
    labels = torch.tensor([ids[c] for c in contents])
    same = (labels[:, None] == labels[None, :]).float()
    targets = same / same.sum(1, keepdim=True)
    return 0.5 * (torch.sum(-targets * F.log_softmax(logits, 1), 1).mean()
                  + torch.sum(-targets * F.log_softmax(logits.T, 1), 1).mean())


def quarter_embeddings(patches: torch.Tensor) -> torch.Tensor:
    """(B * 4, E): the normalised mean patch embedding of each quarter of each tile, row-major."""
    batch, count, width = patches.shape
    side = int(count ** 0.5)
    half = side // 2
    grid = patches.view(batch, 2, half, 2, half, width)
    return F.normalize(grid.mean((2, 4)).reshape(batch * 4, width), dim=-1)


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


def validate(path: str, scenes: int, model: str = "synthetic-tiny") -> dict[str, float]:
    """ClearCLIP IoU per colour (and mean) on validation scenes, classes = 4 colours + background."""
    from napari_clearclip import Segmenter
    from napari_clearclip.choices import MODEL_OPTIONS
    from napari_clearclip.demo.scenes import colour_iou, held_out_scenes

    segmenter = Segmenter(model, pretrained=path, device="cpu")
    return colour_iou(segmenter, held_out_scenes(scenes, seed=VALIDATION_SEED), **MODEL_OPTIONS["synthetic-tiny"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
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
    parser.add_argument("--out", default="src/napari_clearclip/demo/synthetic-tiny.pt")
    parser.add_argument("--config", default=None,
                        help="an open_clip model config (JSON) to train instead of synthetic-tiny's; the model takes "
                             "the file's name (e.g. tests/models/synthetic-tiny-b.json)")
    args = parser.parse_args()
    model_name = "synthetic-tiny"
    if args.config:
        open_clip.add_model_config(args.config)
        model_name = os.path.splitext(os.path.basename(args.config))[0]

    os.environ.setdefault("NAPARI_CLEARCLIP_CACHE_DIR", tempfile.mkdtemp())
    snapshot_dir = tempfile.mkdtemp()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    model = open_clip.create_model(model_name, pretrained=None)
    tokenizer = open_clip.get_tokenizer(model_name)
    size = model.visual.image_size[0]
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    start = time.time()
    best: tuple[float, int] | None = None
    for step in range(1, args.steps + 1):
        model.train()
        pixels, captions, contents, local_captions, local_contents = make_batch(rng, args.batch, size)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            image_features, dense_features = image_embeddings(model.visual, pixels)
            text_features = F.normalize(model.encode_text(tokenizer(captions + local_captions)).float(), dim=-1)
        scale = model.logit_scale.exp().clamp(max=100)
        global_text, local_text = text_features[: len(captions)], text_features[len(captions):]
        loss = soft_clip_loss(image_features, global_text, scale, contents)
        if args.dense_weight:
            local_loss = soft_clip_loss(quarter_embeddings(dense_features), local_text, scale, local_contents)
            loss = loss + args.dense_weight * local_loss
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
            scores = validate(path, args.validation_scenes, model_name)
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
