"""Prompts encoded from the class name on, with the templates' beginnings kept: the features of whole prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_clearclip import Segmenter
from napari_clearclip import prompts, text_prefixes
from napari_clearclip.prompts import IMAGENET_TEMPLATES

LONG_NAME = "a rather long name for a class of cells seen under the microscope " * 3  # cut at the context


def reference_embedding(segmenter: Segmenter, name: str, templates=IMAGENET_TEMPLATES) -> torch.Tensor:
    """A class's embedding from open_clip's own ``encode_text`` on whole prompts at the full context."""
    model = segmenter.model
    with torch.no_grad():
        features = model.clip.encode_text(model.tokenizer([t.replace("{}", name) for t in templates]))
    return F.normalize(F.normalize(features, dim=-1).mean(0), dim=0)


@pytest.fixture
def computed_tokens(monkeypatch):
    """The tokens each pass through the text transformer computed (one entry per pass)."""
    passes: list[int] = []
    real = text_prefixes._block

    def counting(block, x, *args):
        if block is counting.first:
            passes.append(int(x.shape[0]))
        return real(block, x, *args)
    counting.first = None
    monkeypatch.setattr(text_prefixes, "_block", counting)
    return passes, counting


def whole_prompt_tokens(segmenter: Segmenter, name: str) -> int:
    """The tokens after the start token of a class's 80 prompts: what a pass computes without kept beginnings."""
    return int(segmenter.model.tokenizer([t.replace("{}", name) for t in IMAGENET_TEMPLATES]).argmax(-1).sum())


def test_classes_compute_only_their_own_tokens_and_equal_whole_prompts(vitb16_checkpoint, small_models,
                                                                       computed_tokens):
    passes, counting = computed_tokens
    for options in ({"model": "ViT-B-16", "pretrained": vitb16_checkpoint, "device": "cpu"},
                    small_models("synthetic-tiny-b")):
        segmenter = Segmenter(**options, disk_cache=False)
        assert text_prefixes.supports(segmenter.model.clip)
        counting.first = segmenter.model.clip.transformer.resblocks[0]
        passes.clear()
        names = ["purple", "orange", "cell nucleus", LONG_NAME, "x"]
        for name in names:
            got = segmenter.encode_classes([name])[0]
            torch.testing.assert_close(got, reference_embedding(segmenter, name), atol=2e-6, rtol=0)
        beginnings = {tuple(t.split("{}")[0].split()) for t in IMAGENET_TEMPLATES}
        assert len(passes) == 1 + len(names), passes  # the templates' beginnings once, in a pass of their own
        assert passes[0] < sum(len(b) + 2 for b in beginnings)
        for name, tokens in zip(names, passes[1:]):  # then each class from its name on
            if name != LONG_NAME:
                assert tokens < 0.55 * whole_prompt_tokens(segmenter, name), (name, passes)


def test_beginnings_saved_for_the_next_session_and_a_damaged_or_foreign_file_is_a_miss(tiny_checkpoint, tmp_path,
                                                                                       computed_tokens):
    passes, counting = computed_tokens
    first = Segmenter("test-tiny", tiny_checkpoint, device="cpu")
    counting.first = first.model.clip.transformer.resblocks[0]
    cat = first.encode_classes(["cat"])[0]
    assert len(passes) == 2   # the beginnings, then the class
    saved = list((tmp_path / "cache" / "text-embeddings").glob("beginnings-*.npz"))
    assert len(saved) == 1
    path = saved[0]
    with np.load(path) as stored:
        assert len(stored["lengths"]) == len({t.split("{}")[0] for t in IMAGENET_TEMPLATES}) + 1  # and the start

    def fresh_session(name: str) -> tuple[torch.Tensor, list]:
        segmenter = Segmenter("test-tiny", tiny_checkpoint, device="cpu")
        counting.first = segmenter.model.clip.transformer.resblocks[0]
        passes.clear()
        got = segmenter.encode_classes([name])[0]
        torch.testing.assert_close(got, reference_embedding(segmenter, name), atol=2e-6, rtol=0)
        return got, list(passes)

    (tmp_path / "cache" / "text-embeddings" / f"{first.text.key('cat', IMAGENET_TEMPLATES)}.npy").unlink()
    again, computed = fresh_session("cat")
    assert len(computed) == 1 and computed[0] < 0.5 * whole_prompt_tokens(first, "cat")  # the class alone
    assert torch.equal(again, cat)   # the very same features as in the session that encoded the beginnings
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])   # truncated: a miss, recomputed and rewritten
    assert len(fresh_session("bird")[1]) == 2
    assert path.read_bytes() == good
    with np.load(path) as stored:
        arrays = {name: stored[name] for name in stored.files}
    assert len(fresh_session("fish")[1]) == 1
    # arrays that do not fit the model: other shapes, token ids out of range, values not finite
    model = first.model.clip
    damages = ({"keys": arrays["keys"][..., :-1]}, {"tokens": arrays["tokens"] + 10**6},
               {"lengths": arrays["lengths"] + 1},
               {"values": np.full_like(arrays["values"], np.nan)}, {"keys": arrays["keys"].astype(np.float64)})
    for name, damage in zip(["horse", "cow", "goat", "sheep", "hen"], damages):
        assert not text_prefixes.PromptPrefixes(model).restore({**arrays, **damage})
        np.savez(path, **{**arrays, **damage})
        assert len(fresh_session(name)[1]) == 2
    assert text_prefixes.PromptPrefixes(model).restore(arrays)


def test_threads_sharing_a_segmenter_encode_classes_at_once(tiny_checkpoint):
    from concurrent.futures import ThreadPoolExecutor

    segmenter = Segmenter("test-tiny", tiny_checkpoint, device="cpu", disk_cache=False)
    names = ["cat", "dog", "bird", "fish", "horse", "cell nucleus", "tree", "road"]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda name: segmenter.encode_classes([name])[0], names))
    for name, embedding in zip(names, got):
        torch.testing.assert_close(embedding, reference_embedding(segmenter, name), atol=2e-6, rtol=0)


def test_a_name_glued_to_its_template_and_towers_encoded_whole_give_the_same_features(tiny_checkpoint, monkeypatch):
    templates = ("a photo of a{}.", "{} under the microscope", "itap of a {}.", "a photo of a {}.")
    segmenter = Segmenter("test-tiny", tiny_checkpoint, device="cpu", disk_cache=False)
    for name in ["cat", "cell nucleus"]:
        got = segmenter.encode_classes([name], templates)[0]
        torch.testing.assert_close(got, reference_embedding(segmenter, name, templates), atol=2e-6, rtol=0)
    # a tower pooled otherwise is encoded whole, with the same result
    monkeypatch.setattr(prompts, "supports", lambda clip: False)
    whole = Segmenter("test-tiny", tiny_checkpoint, device="cpu", disk_cache=False)
    assert whole.text._prefixes is None
    torch.testing.assert_close(whole.encode_classes(["dog"], templates)[0],
                               reference_embedding(whole, "dog", templates), atol=2e-6, rtol=0)
    monkeypatch.undo()
    # past the number of beginnings kept, prompts start from the start token, with the same features
    monkeypatch.setattr(text_prefixes, "MAX_PREFIXES", 3)
    few = Segmenter("test-tiny", tiny_checkpoint, device="cpu", disk_cache=False)
    torch.testing.assert_close(few.encode_classes(["dog"])[0], reference_embedding(few, "dog"), atol=2e-6, rtol=0)
    assert len(few.text._prefixes) == 3
    monkeypatch.undo()
    clip = segmenter.model.clip
    monkeypatch.setattr(clip, "text_pool_type", "first")
    assert not text_prefixes.supports(clip)
