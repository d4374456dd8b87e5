"""A straightforward re-statement of the official ClearCLIP inference loop, for fidelity tests.

Written from the official code's structure, independently of the package: per-window
forward through the whole image tower with the custom last block (per-head bmm as the
official code does), full 77-token text context, one window at a time, then the
official post-processing. Slow on purpose; clarity over speed.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

OFFICIAL_MEAN = [122.771, 116.746, 104.094]
OFFICIAL_STD = [68.501, 66.632, 70.323]


def official_preprocess(image: np.ndarray, short_side: int | None, mean=OFFICIAL_MEAN, std=OFFICIAL_STD) -> torch.Tensor:
    """mmcv-style keep-ratio rescale to scale (2048, short_side) of a uint8 RGB image, then normalise."""
    img = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]
    h, w = image.shape[:2]
    if short_side is not None:
        scale = min(2048 / max(h, w), short_side / min(h, w))
        new_h, new_w = int(h * scale + 0.5), int(w * scale + 0.5)
        if (new_h, new_w) != (h, w):
            img = F.interpolate(img, size=(new_h, new_w), mode="bilinear", align_corners=False).round().clamp(0, 255)
    mean = torch.tensor(mean).view(1, 3, 1, 1)
    std = torch.tensor(std).view(1, 3, 1, 1)
    return (img - mean) / std


class OfficialReference:
    def __init__(self, net, tokenizer, class_lines, templates, model_type="ClearCLIP",
                 logit_scale=50.0, prob_thd=0.0, slide_stride=224, slide_crop=448):
        self.net = net.eval()
        self.model_type = model_type
        self.logit_scale = logit_scale
        self.prob_thd = prob_thd
        self.slide_stride = slide_stride
        self.slide_crop = slide_crop
        self.patch_size = net.visual.patch_size[0]
        query_words, query_idx = [], []
        for idx, line in enumerate(class_lines):
            for word in line.split(", "):
                query_words.append(word)
                query_idx.append(idx)
        self.query_idx = torch.tensor(query_idx)
        features = []
        with torch.no_grad():
            for qw in query_words:
                tokens = tokenizer([t.replace("{}", qw) for t in templates]).to(net.logit_scale.device)
                assert tokens.shape[1] == net.context_length  # the full context, never truncated
                feature = net.encode_text(tokens)
                feature = feature / feature.norm(dim=-1, keepdim=True)
                feature = feature.mean(dim=0)
                feature = feature / feature.norm()
                features.append(feature.unsqueeze(0))
        self.query_features = torch.cat(features, dim=0)

    # -- image tower, as the official modified CLIP forward -------------------------------------
    def interpolate_pos_encoding(self, x, w, h):
        visual = self.net.visual
        npatch = x.shape[1] - 1
        N = visual.positional_embedding.shape[0] - 1
        if npatch == N and w == h:
            return visual.positional_embedding
        class_pos_embed = visual.positional_embedding[[0]]
        patch_pos_embed = visual.positional_embedding[1:]
        dim = x.shape[-1]
        w0 = w // self.patch_size
        h0 = h // self.patch_size
        w0, h0 = w0 + 0.1, h0 + 0.1
        patch_pos_embed = F.interpolate(
            patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
            scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
            mode="bicubic",
        )
        assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(-1, dim)
        return torch.cat((class_pos_embed, patch_pos_embed), dim=0)

    def custom_attn(self, attn_layer, x, kind):
        num_heads = attn_layer.num_heads
        bsz, tokens, embed_dim = x.size()
        head_dim = embed_dim // num_heads
        scale = head_dim ** -0.5
        q, k, v = F.linear(x, attn_layer.in_proj_weight, attn_layer.in_proj_bias).chunk(3, dim=-1)
        q = q.transpose(0, 1).contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
        k = k.transpose(0, 1).contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
        v = v.transpose(0, 1).contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
        if kind == "qq":
            attn_weights = F.softmax(torch.bmm(q, q.transpose(1, 2)) * scale, dim=-1)
        elif kind == "kk+gauss":
            attn_weights = torch.bmm(k, k.transpose(1, 2)) * scale + self.gaussian_addition(tokens)
            attn_weights = F.softmax(attn_weights, dim=-1)
        elif kind == "qq+kk":
            attn_weights = F.softmax(torch.bmm(q, q.transpose(1, 2)) * scale, dim=-1) \
                + F.softmax(torch.bmm(k, k.transpose(1, 2)) * scale, dim=-1)
        elif kind == "identity":
            attn_weights = torch.eye(tokens, device=x.device).expand(bsz * num_heads, tokens, tokens)
        attn_output = torch.bmm(attn_weights, v)
        attn_output = attn_output.transpose(0, 1).contiguous().view(-1, bsz, embed_dim).transpose(0, 1)
        return attn_layer.out_proj(attn_output)

    def gaussian_addition(self, tokens):
        rows, cols = self.grid
        assert rows * cols + 1 == tokens
        out = torch.zeros(tokens, tokens)
        for p in range(rows * cols):
            for q in range(rows * cols):
                d2 = (p // cols - q // cols) ** 2 + (p % cols - q % cols) ** 2
                out[p + 1, q + 1] = math.exp(-d2 / (2 * 5.0 ** 2))
        return out.to(self.net.logit_scale.device)

    def encode_image(self, img):
        visual = self.net.visual
        B, nc, w, h = img.shape
        self.grid = (w // self.patch_size, h // self.patch_size)
        x = visual.conv1(img)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype,
                                                               device=x.device)
        x = torch.cat([cls, x], dim=1)
        if x.shape[1] != visual.positional_embedding.shape[0]:
            x = x + self.interpolate_pos_encoding(x, w, h).to(x.dtype)
        else:
            x = x + visual.positional_embedding.to(x.dtype)
        x = visual.ln_pre(x)
        for blk in visual.transformer.resblocks[:-1]:
            x = blk(x)
        blk = visual.transformer.resblocks[-1]
        if self.model_type == "ClearCLIP":
            x = self.custom_attn(blk.attn, blk.ln_1(x), "qq")
        elif self.model_type == "NACLIP":
            x = self.custom_attn(blk.attn, blk.ln_1(x), "kk+gauss")
        elif self.model_type == "MaskCLIP":
            x = self.custom_attn(blk.attn, blk.ln_1(x), "identity")
        elif self.model_type == "SCLIP":
            x = x + self.custom_attn(blk.attn, blk.ln_1(x), "qq+kk")
            x = x + blk.mlp(blk.ln_2(x))
        elif self.model_type == "vanilla":
            x = blk(x)
        return visual.ln_post(x) @ visual.proj

    # -- the official segmentor --------------------------------------------------------------
    def forward_feature(self, img):
        image_features = self.encode_image(img)
        image_features = image_features[:, 1:]
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        logits = image_features @ self.query_features.T
        w, h = img[0].shape[-2] // self.patch_size, img[0].shape[-1] // self.patch_size
        out_dim = logits.shape[-1]
        logits = logits.permute(0, 2, 1).reshape(-1, out_dim, w, h)
        return F.interpolate(logits, size=img.shape[-2:], mode="bilinear")

    def compute_padsize(self, H, W, patch_size):
        l, r, t, b = 0, 0, 0, 0
        if W % patch_size:
            lr = patch_size - (W % patch_size)
            l = lr // 2
            r = lr - l
        if H % patch_size:
            tb = patch_size - (H % patch_size)
            t = tb // 2
            b = tb - t
        return l, r, t, b

    def forward_slide(self, img, ori_shape):
        h_stride = w_stride = self.slide_stride
        h_crop = w_crop = self.slide_crop
        batch_size, _, h_img, w_img = img.shape
        out_channels = self.query_features.shape[0]
        h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
        w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
        preds = img.new_zeros((batch_size, out_channels, h_img, w_img))
        count_mat = img.new_zeros((batch_size, 1, h_img, w_img))
        for h_idx in range(h_grids):
            for w_idx in range(w_grids):
                y1 = h_idx * h_stride
                x1 = w_idx * w_stride
                y2 = min(y1 + h_crop, h_img)
                x2 = min(x1 + w_crop, w_img)
                y1 = max(y2 - h_crop, 0)
                x1 = max(x2 - w_crop, 0)
                crop_img = img[:, :, y1:y2, x1:x2]
                H, W = crop_img.shape[2:]
                pad = self.compute_padsize(H, W, self.patch_size)
                if any(pad):
                    crop_img = F.pad(crop_img, pad)
                crop_seg_logit = self.forward_feature(crop_img)
                if any(pad):
                    l, t = pad[0], pad[2]
                    crop_seg_logit = crop_seg_logit[:, :, t:t + H, l:l + W]
                preds += F.pad(crop_seg_logit, (int(x1), int(preds.shape[3] - x2), int(y1), int(preds.shape[2] - y2)))
                count_mat[:, :, y1:y2, x1:x2] += 1
        assert (count_mat == 0).sum() == 0
        preds = preds / count_mat
        return F.interpolate(preds, size=ori_shape, mode="bilinear")

    @torch.no_grad()
    def predict(self, img, ori_shape):
        """(similarity per query, probabilities per class, labels 1..C with 0 below prob_thd)."""
        seg_logits = self.forward_slide(img, ori_shape)[0]
        similarity = seg_logits
        seg_logits = seg_logits * self.logit_scale
        seg_logits = seg_logits.softmax(0)
        num_cls, num_queries = int(self.query_idx.max()) + 1, len(self.query_idx)
        if num_cls != num_queries:
            seg_logits = seg_logits.unsqueeze(0)
            cls_index = F.one_hot(self.query_idx)
            cls_index = cls_index.T.view(num_cls, num_queries, 1, 1)
            seg_logits = (seg_logits * cls_index).max(1)[0]
        seg_pred = seg_logits.argmax(0, keepdim=True)
        seg_pred[seg_logits.max(0, keepdim=True)[0] < self.prob_thd] = -1
        return similarity, seg_logits, (seg_pred[0] + 1)


class OfficialResclip(OfficialReference):
    """The official ResCLIP segmentor restated: every block's attention maps kept, the last block's custom
    attention on all heads at once, the semantic feedback with its path test over an (N^2 x (D + 1) x 2)
    coordinate tensor, windows never padded, one at a time."""

    def __init__(self, net, tokenizer, class_lines, templates, rcs=(2.0, 0.6), sfr=(2.1, 0.6), temp_thd=0.10,
                 rcs_layers=(5, 6, 7, 8), logit_scale=40.0, slide_stride=112, slide_crop=224, pamr_steps=0,
                 prob_thd=0.0):
        super().__init__(net, tokenizer, class_lines, templates, "ResCLIP", logit_scale, prob_thd, slide_stride,
                         slide_crop)
        self.rcs, self.sfr, self.temp_thd, self.rcs_layers, self.pamr_steps = rcs, sfr, temp_thd, rcs_layers, pamr_steps

    def attention(self, attn_layer, x, omega=None, attn_rcs=None, attn_sfr=None, maps=False):
        heads = attn_layer.num_heads
        bsz, tokens, dim = x.size()
        head_dim = dim // heads
        scale = head_dim ** -0.5
        q, k, v = F.linear(x, attn_layer.in_proj_weight, attn_layer.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.transpose(0, 1).contiguous().view(-1, bsz * heads, head_dim).transpose(0, 1) for t in (q, k, v))
        if omega is None:  # the blocks before the last
            weights = F.softmax(torch.bmm(q * scale, k.transpose(1, 2)), dim=-1)
        else:
            weights = torch.bmm(k, k.transpose(1, 2)) * scale
            if attn_sfr is not None:
                attn_sfr = (attn_sfr / torch.max(attn_sfr)).to(torch.float16)
                weights = self.sfr[0] * ((1 - self.sfr[1]) * weights + self.sfr[1] * attn_sfr)
            weights = F.softmax(weights + omega, dim=-1)
            weights = self.rcs[0] * ((1 - self.rcs[1]) * weights + self.rcs[1] * attn_rcs)
        out = torch.bmm(weights, v).transpose(0, 1).contiguous().view(-1, bsz, dim).transpose(0, 1)
        out = attn_layer.out_proj(out)
        return (out, weights) if maps else out

    def first_segmentation(self, x, img, omega, attn_rcs):
        from napari_clearclip.refine import pamr

        visual = self.net.visual
        blk = visual.transformer.resblocks[-1]
        out = visual.ln_post(self.attention(blk.attn, blk.ln_1(x), omega, attn_rcs)) @ visual.proj
        feats = out[:, 1:]
        feats = feats / feats.norm(dim=-1, keepdim=True)
        logits = feats @ self.query_features.T
        w, h = self.grid
        logits = logits.permute(0, 2, 1).reshape(-1, logits.shape[-1], w, h)
        logits = F.interpolate(logits, size=img.shape[-2:], mode="bilinear", align_corners=False)
        logits = pamr(logits[0], img[0], 10, (8, 16))
        probs = torch.softmax(logits * self.logit_scale, dim=0)
        pred = probs.argmax(0, keepdim=True)
        pred[probs.max(0, keepdim=True)[0] < self.temp_thd] = 0
        pred = pred[0]
        p = self.patch_size
        tiles = pred.unfold(0, p, p).unfold(1, p, p).reshape(w, h, -1)
        return torch.mode(tiles, dim=-1)[0]

    def feedback(self, labels):
        h, w = labels.shape
        total = h * w
        sfr = torch.zeros((total + 1, total + 1))
        idx = torch.arange(total)
        i, j = torch.meshgrid(idx, idx, indexing="ij")
        i_r, i_c = i // w, i % w
        j_r, j_c = j // w, j % w
        sfr[1:, 1:] = (labels[i_r, i_c] == labels[j_r, j_c]).float()
        sfr.diagonal().fill_(1)
        sfr[0, :] = 0
        sfr[:, 0] = 0
        part = sfr[1:, 1:]
        start = torch.stack((i_r, i_c), dim=-1).view(-1, 2)
        end = torch.stack((j_r, j_c), dim=-1).view(-1, 2)
        steps = torch.max(torch.abs(end - start), dim=1)[0]
        most = steps.max().item()
        t = torch.linspace(0, 1, steps=most + 1).unsqueeze(1).unsqueeze(0)
        coords = (start.unsqueeze(1) * (1 - t) + end.unsqueeze(1) * t).round().long()    # (N^2, D + 1, 2)
        inside = torch.arange(most + 1).unsqueeze(0) <= steps.unsqueeze(1)
        first = labels[start[:, 0], start[:, 1]].unsqueeze(1)
        valid = ((labels[coords[:, :, 0], coords[:, :, 1]] == first) | ~inside).all(dim=1).view(total, total)
        decay = torch.exp(-steps.view(total, total) / most)
        part = torch.where(valid, part, part * decay)
        size = min(total, int(6 * 5.0 + 1))
        size = size if size % 2 == 1 else size + 1
        x = torch.arange(size) - size // 2
        kernel = torch.exp(-(x ** 2) / (2 * 5.0 ** 2))
        kernel = kernel / kernel.sum()
        blurred = F.relu(F.conv1d(part.unsqueeze(1), kernel.view(1, 1, -1), padding=size // 2).squeeze(1))
        sfr[1:, 1:] = blurred / (blurred.sum(dim=1, keepdim=True) + 1e-8)
        return sfr.unsqueeze(0)

    def encode_image(self, img):
        visual = self.net.visual
        B, nc, w, h = img.shape
        self.grid = (w // self.patch_size, h // self.patch_size)
        x = visual.conv1(img)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        x = torch.cat([visual.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1]), x], dim=1)
        if x.shape[1] != visual.positional_embedding.shape[0]:
            x = x + self.interpolate_pos_encoding(x, w, h).to(x.dtype)
        else:
            x = x + visual.positional_embedding.to(x.dtype)
        x = visual.ln_pre(x)
        maps = []
        for blk in visual.transformer.resblocks[:-1]:
            out, weights = self.attention(blk.attn, blk.ln_1(x), maps=True)
            x = x + out
            x = x + blk.mlp(blk.ln_2(x))
            maps.append(weights)
        attn_rcs = torch.stack([maps[i] for i in self.rcs_layers]).mean(dim=0)
        omega = self.gaussian_addition(x.shape[1]).unsqueeze(0)
        labels = self.first_segmentation(x, img, omega, attn_rcs)
        attn_sfr = self.feedback(labels)
        blk = visual.transformer.resblocks[-1]
        x = self.attention(blk.attn, blk.ln_1(x), omega, attn_rcs, attn_sfr)
        return visual.ln_post(x) @ visual.proj

    def forward_slide(self, img, ori_shape):
        h_stride = w_stride = self.slide_stride
        h_crop = w_crop = self.slide_crop
        _, _, h_img, w_img = img.shape
        h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
        w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
        preds = img.new_zeros((1, self.query_features.shape[0], h_img, w_img))
        count = img.new_zeros((1, 1, h_img, w_img))
        for h_idx in range(h_grids):
            for w_idx in range(w_grids):
                y1, x1 = h_idx * h_stride, w_idx * w_stride
                y2, x2 = min(y1 + h_crop, h_img), min(x1 + w_crop, w_img)
                y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
                logits = self.forward_feature(img[:, :, y1:y2, x1:x2])      # never padded
                preds += F.pad(logits, (int(x1), int(preds.shape[3] - x2), int(y1), int(preds.shape[2] - y2)))
                count[:, :, y1:y2, x1:x2] += 1
        preds = F.interpolate(preds / count, size=ori_shape, mode="bilinear", align_corners=False)
        if self.pamr_steps:
            from napari_clearclip.refine import pamr

            guide = F.interpolate(img, size=ori_shape, mode="bilinear", align_corners=False)
            preds = pamr(preds[0], guide[0], self.pamr_steps, (8, 16))[None]
        return preds


# -- CLIP-DIY -------------------------------------------------------------------------------------------


class OfficialClipDiy:
    """CLIP-DIY's evaluation restated: albumentations' Resize (OpenCV INTER_LINEAR) to 256 x 256 on uint8, crops
    by ``Tensor.unfold`` (256, 128 and 64 at half steps), ``ToPILImage``, a CLIP image processor (Pillow bicubic to
    the input size, rescale 1/255, normalise), the projected global embedding, cosine with "a photo of a {}",
    bilinear grouping per scale, the mean of the three, saliency fusion, softmax, argmax, OpenCV nearest back."""

    def __init__(self, clip, tokenizer, mean, std, input_size: int, size: int = 256, patch_sizes=(256, 128, 64)):
        self.clip, self.tokenizer, self.size, self.patch_sizes = clip, tokenizer, size, patch_sizes
        self.mean, self.std, self.input_size = np.array(mean, np.float32), np.array(std, np.float32), input_size

    @torch.no_grad()
    def _class_embeddings(self, names):
        prompts = ["a photo of an " + n if n.startswith("aeiou") else "a photo of a " + n for n in names]
        out = torch.stack([self.clip.encode_text(self.tokenizer([p])).mean(0) for p in prompts])
        return out / out.norm(dim=-1, keepdim=True)

    def _processor(self, pil_images) -> torch.Tensor:
        from PIL import Image

        arrays = []
        for image in pil_images:
            resized = np.asarray(image.resize((self.input_size, self.input_size), resample=Image.BICUBIC))
            values = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
            arrays.append(((values - self.mean) / self.std).transpose(2, 0, 1))
        return torch.from_numpy(np.stack(arrays))

    @torch.no_grad()
    def _clip_conv(self, img, classes, patch_size):
        from torchvision.transforms import ToPILImage

        batch, _, h, w = img.shape
        patches = img.unfold(2, patch_size, patch_size // 2).unfold(3, patch_size, patch_size // 2).flatten(2, 3)
        patches = patches.permute(0, 2, 1, 3, 4).flatten(0, 1)
        pil = [ToPILImage()(p) for p in patches]
        embeds = self.clip.encode_image(self._processor(pil))
        embeds = embeds / embeds.norm(p=2, dim=-1, keepdim=True)
        sims = (classes @ embeds.t()).t()
        n = int(sims.shape[0] ** 0.5)
        grid = sims.reshape(batch, n, n, -1).permute(0, 3, 1, 2)
        return F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)

    def predict(self, image: np.ndarray, names, saliency: np.ndarray | None = None):
        """(probabilities at 256 x 256 (C, 256, 256), labels at the image size (0-based))."""
        import cv2

        resized = cv2.resize(image, (self.size, self.size), interpolation=cv2.INTER_LINEAR)
        img = torch.from_numpy(resized).permute(2, 0, 1)[None]
        classes = self._class_embeddings(names)
        masks = [self._clip_conv(img, classes, ps) for ps in self.patch_sizes]
        out = torch.mean(torch.stack(masks, dim=0) * torch.ones(3).view(-1, 1, 1, 1, 1), dim=0)
        if saliency is not None:
            s = torch.from_numpy(cv2.resize(saliency.astype(np.float32), (self.size, self.size),
                                            interpolation=cv2.INTER_LINEAR))[None, None]
            out = out * torch.cat([1 - s, s.repeat(1, len(names) - 1, 1, 1)], dim=1)
        probabilities = out.softmax(dim=1)[0]
        labels = probabilities.argmax(0).numpy().astype(np.uint8)
        labels = cv2.resize(labels, image.shape[1::-1], interpolation=cv2.INTER_NEAREST)
        return probabilities, labels


@torch.no_grad()
def official_found(encoder, decoder, image_uint8: np.ndarray) -> np.ndarray:
    """FOUND's ``forward_step(for_eval=True)`` restated on DINO's own ViT code: ToTensor, ImageNet normalisation,
    zero padding to a multiple of 8, DINO's positional interpolation, explicit softmax attention, the last block's
    qkv output (hooked) split into keys, the 1 x 1 decoder, bilinear x8, crop, sigmoid."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    img = (torch.from_numpy(image_uint8).permute(2, 0, 1)[None].float() / 255 - mean) / std
    h, w = img.shape[-2:]
    batch = F.pad(img, (0, (8 - w % 8) % 8, 0, (8 - h % 8) % 8), value=0)
    _, _, bw, bh = batch.shape                       # DINO names the height w and the width h
    x = encoder.patch_embed.proj(batch).flatten(2).transpose(1, 2)
    x = torch.cat((encoder.cls_token.expand(1, -1, -1), x), dim=1)
    npatch, n = x.shape[1] - 1, encoder.pos_embed.shape[1] - 1
    if npatch == n and bw == bh:
        pos = encoder.pos_embed
    else:
        w0, h0 = bw // 8 + 0.1, bh // 8 + 0.1
        patch_pos = F.interpolate(
            encoder.pos_embed[:, 1:].reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), -1).permute(0, 3, 1, 2),
            scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)), mode="bicubic")
        pos = torch.cat((encoder.pos_embed[:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, -1, x.shape[-1])), dim=1)
    x = x + pos

    def attention(attn, y):
        b, t, c = y.shape
        qkv = attn.qkv(y)
        q, k, v = qkv.reshape(b, t, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * (c // attn.num_heads) ** -0.5).softmax(dim=-1)
        return attn.proj((a @ v).transpose(1, 2).reshape(b, t, c)), qkv

    for blk in encoder.blocks[:-1]:
        y, _ = attention(blk.attn, blk.norm1(x))
        x = x + y
        x = x + blk.mlp(blk.norm2(x))
    _, qkv = attention(encoder.blocks[-1].attn, encoder.blocks[-1].norm1(x))
    heads = encoder.blocks[-1].attn.num_heads
    tokens = x.shape[1]
    k = qkv.reshape(1, tokens, 3, heads, -1 // heads).permute(2, 0, 3, 1, 4)[1].transpose(1, 2).float()
    feats = k[:, 1:, :, :].reshape(1, bw // 8, bh // 8, -1).permute(0, 3, 1, 2)
    preds = F.interpolate(decoder(feats), scale_factor=8, mode="bilinear", align_corners=False)[..., :h, :w]
    return torch.sigmoid(preds)[0, 0].numpy()
