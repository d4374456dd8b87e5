"""Labels computed only where they can differ equal those computed at every pixel, on many random cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_clearclip import Segmenter, tiled_labels
from napari_clearclip.affinity_tiles import AffinityTiles
from napari_clearclip.choices import METHOD_NAMES
from napari_clearclip.demo.scenes import make_scene
from napari_clearclip.planes import ImageLayout, segment_stack
from napari_clearclip.progress import Progress, run_to_end
from napari_clearclip.tiled_labels import label_steps


def smooth_scores(rng, queries: int, height: int, width: int, blur: int) -> torch.Tensor:
    base = torch.from_numpy(rng.normal(size=(queries, max(2, height // blur), max(2, width // blur))).astype(np.float32))
    return F.interpolate(base[None], size=(height, width), mode="bilinear", align_corners=False)[0] * 0.1


def labels_of(scores, guide, size, spans, names, snap, previous=None, dense=False, tile=16, affinities=None):
    return run_to_end(label_steps(scores, guide, size, spans, names, snap, previous, dense, tile, affinities))


def spy_on_computed_queries(monkeypatch) -> list:
    """The list of queries the runs resize and snap, filled as they go."""
    computed: list = []
    real = tiled_labels._channels_near

    def spy(tiles, bounds, queries, *args, **kwargs):
        computed.extend(queries)
        return (yield from real(tiles, bounds, queries, *args, **kwargs))
    monkeypatch.setattr(tiled_labels, "_channels_near", spy)
    return computed


def assert_as_from_scratch(state, scores, guide, size, spans, names, snap, tile) -> None:
    """A re-run's labels are a full computation's, its margins lower bounds of that one's, and the winners' values it
    calls kept are that one's bit for bit."""
    full = labels_of(scores, guide, size, spans, names, snap, dense=True, tile=tile)
    np.testing.assert_array_equal(state.labels, full.labels)
    bound, actual = state.margins.astype(np.float32), full.margins.astype(np.float32)
    assert np.all(bound <= actual + 2.0 ** -9 * np.abs(actual) + 1e-5)
    exact = np.repeat(np.repeat(state.exact, tile, 0), tile, 1)[: size[0], : size[1]]
    np.testing.assert_array_equal(state.winners[exact], full.winners[exact])


def random_case(rng):
    h, w = (int(v) for v in rng.integers(8, 40, 2))
    size = (int(h * rng.uniform(1, 6)), int(w * rng.uniform(1, 6)))
    queries = int(rng.integers(1, 6))
    if queries >= 3 and rng.random() < 0.4:  # a class with two synonyms
        spans = [(0, 2)] + [(i, i + 1) for i in range(2, queries)]
    else:
        spans = [(i, i + 1) for i in range(queries)]
    names = [tuple(f"q{j}" for j in range(a, b)) for a, b in spans]
    scores = smooth_scores(rng, queries, h, w, int(rng.integers(1, 6)))
    if rng.random() < 0.3:  # a few values only: queries tie exactly, and rounding settles the ties
        scores = (scores * 40).round() / 40
    guide = torch.from_numpy(rng.normal(size=(3, h, w)).astype(np.float32))
    snap = (int(rng.integers(1, 4)), (1, int(rng.integers(1, 4)))) if rng.random() < 0.6 else ()
    return scores, guide, size, spans, names, snap, int(rng.choice([8, 16, 32]))


@pytest.mark.parametrize("seed", range(6))
def test_skipping_gives_every_label_of_a_full_computation(seed):
    """First runs, local rises and falls (strokes), a class added, a class removed: each equal to from scratch."""
    rng = np.random.default_rng(seed)
    for _ in range(8):
        scores, guide, size, spans, names, snap, tile = random_case(rng)
        # the snapping weights kept between runs, sometimes in too little memory for all of them
        kept = AffinityTiles(int(rng.choice([1 << 30, 1 << 16])))
        case = dict(guide=guide, size=size, snap=snap, tile=tile, kept=kept)

        def run(s, sp, nm, prev=None, case=case):
            return labels_of(s, case["guide"], case["size"], sp, nm, case["snap"], prev, tile=case["tile"],
                             affinities=case["kept"])

        def full(s, sp, nm, case=case):
            return labels_of(s, case["guide"], case["size"], sp, nm, case["snap"], dense=True, tile=case["tile"])
        first = run(scores, spans, names)
        np.testing.assert_array_equal(first.labels, full(scores, spans, names).labels)

        changed = scores.clone()
        h, w = scores.shape[1:]
        k, y, x = int(rng.integers(0, len(scores))), int(rng.integers(0, h)), int(rng.integers(0, w))
        changed[k, y : y + 3, x : x + 3] += float(rng.uniform(0, 0.2))
        if rng.random() < 0.4:
            changed[(k + 1) % len(scores), y : y + 2, x : x + 5] -= float(rng.uniform(0, 0.1))
        second = run(changed, spans, names, first)
        np.testing.assert_array_equal(second.labels, full(changed, spans, names).labels)

        added = torch.cat([changed, smooth_scores(rng, 1, h, w, 3) - 0.05])
        spans3, names3 = spans + [(len(changed), len(changed) + 1)], names + [("new",)]
        third = run(added, spans3, names3, second)
        np.testing.assert_array_equal(third.labels, full(added, spans3, names3).labels)

        if len(spans3) > 1:
            cut = spans3[0][1]
            spans4 = [(a - cut, b - cut) for a, b in spans3[1:]]
            fourth = run(added[cut:], spans4, names3[1:], third)
            np.testing.assert_array_equal(fourth.labels, full(added[cut:], spans4, names3[1:]).labels)


@pytest.mark.parametrize("seed", range(4))
def test_successive_changes_and_classes_typed_one_after_another_stay_exact(seed):
    """Each run starts from the last one's state: kept pixels' margins must stay lower bounds (a series of
    small rises once flipped pixels that no single run could)."""
    rng = np.random.default_rng(100 + seed)
    for _ in range(5):
        scores, guide, size, spans, names, snap, tile = random_case(rng)
        kept = AffinityTiles(int(rng.choice([1 << 30, 1 << 16])))
        state = labels_of(scores, guide, size, spans, names, snap, tile=tile, affinities=kept)
        rising = int(rng.integers(0, len(scores)))
        for step in range(6):
            scores = scores.clone()
            if step % 3 == 2:  # a class typed (sometimes with a synonym), scoring near the others
                extra = int(rng.integers(1, 3))
                offset = float(rng.uniform(-0.1, 0.02))
                scores = torch.cat([scores, smooth_scores(rng, extra, *scores.shape[1:], 3) + offset])
                spans = spans + [(len(scores) - extra, len(scores))]
                names = names + [tuple(f"typed{step}-{j}" for j in range(extra))]
            else:  # one query rises again and another falls, everywhere or in a patch, as repeated strokes make
                y, x = int(rng.integers(0, scores.shape[1])), int(rng.integers(0, scores.shape[2]))
                area = (slice(None), slice(None)) if rng.random() < 0.5 else (slice(y, y + 8), slice(x, x + 8))
                scores[(rising % len(scores), *area)] += float(rng.uniform(0, 0.015))
                scores[((rising + 1) % len(scores), *area)] -= float(rng.uniform(0, 0.005))
            state = labels_of(scores, guide, size, spans, names, snap, state, tile=tile, affinities=kept)
            full = labels_of(scores, guide, size, spans, names, snap, dense=True, tile=tile)
            np.testing.assert_array_equal(state.labels, full.labels)


@pytest.mark.parametrize("seed", range(4))
def test_previews_of_a_rerun_show_only_final_labels_and_the_focus_comes_first(seed, monkeypatch):
    """A re-run with a focus yields parts of its labels before it ends: every pixel a preview calls final holds
    the finished run's label, the previews together with the previous labels give the finished labels, the
    tiles around the focus come before any other tiles computed per pixel, and the labels equal a full
    computation's (the order changes nothing)."""
    rng = np.random.default_rng(300 + seed)
    monkeypatch.setattr(tiled_labels, "FOCUS_SIDE", 40)  # a focus region smaller than these images
    computed: list = []   # the tiles of each region computed, in order
    for labelling in ("_label_tiles", "_risen_label_tiles"):   # strokes here only raise scores: both paths
        real = getattr(tiled_labels, labelling)
        monkeypatch.setattr(tiled_labels, labelling, lambda values, tiles, *rest, real=real:
                            computed.append(list(tiles)) or real(values, tiles, *rest))
    previews_seen = focused = 0
    for _ in range(6):
        scores, guide, size, spans, names, snap, tile = random_case(rng)
        if not snap:
            snap = (2, (1, 2))
        kept = AffinityTiles(1 << 30)
        state = labels_of(scores, guide, size, spans, names, snap, tile=tile, affinities=kept)
        for _ in range(3):
            previous_labels = state.labels.copy()
            scores = scores.clone()
            k, y, x = (int(rng.integers(0, len(scores))), int(rng.integers(0, scores.shape[1])),
                       int(rng.integers(0, scores.shape[2])))
            if rng.random() < 0.5:
                scores[k, y : y + 6, x : x + 6] += float(rng.uniform(0, 0.3))
            else:  # a class rising everywhere, as a stroke that teaches the whole image: many regions
                scores[k] += float(rng.uniform(0, 0.05))
            if rng.random() < 0.5:
                focus = (float(rng.uniform(0, size[0])), float(rng.uniform(0, size[1])))
            else:  # a view
                top, left = float(rng.uniform(0, size[0])), float(rng.uniform(0, size[1]))
                focus = (top, top + float(rng.uniform(1, 60)), left, left + float(rng.uniform(1, 60)))
            steps = label_steps(scores, guide, size, spans, names, snap, state, tile=tile, affinities=kept,
                                focus=focus)
            shown, previews = previous_labels.copy(), []
            computed.clear()
            while True:
                try:
                    step = next(steps)
                except StopIteration as stop:
                    state = stop.value
                    break
                if len(step) > 2:
                    previews.append(step[2])
                    np.copyto(shown[step[2].slices], step[2].labels, where=step[2].final)
            order = list(computed)
            full = labels_of(scores, guide, size, spans, names, snap, dense=True, tile=tile)
            np.testing.assert_array_equal(state.labels, full.labels)
            np.testing.assert_array_equal(shown, full.labels)
            for preview in previews:
                np.testing.assert_array_equal(preview.labels[preview.final], full.labels[preview.slices][preview.final])
            previews_seen += len(previews)
            # the tiles that meet the focus box are computed first, in regions of their own
            box = tiled_labels._focus_box(focus)

            def near(t, box=box, tile=tile):
                return (t[0] * tile < box[1] and (t[0] + 1) * tile > box[0]
                        and t[1] * tile < box[3] and (t[1] + 1) * tile > box[2])
            kinds = [{near(t) for t in tiles} for tiles in order]
            assert all(len(k) == 1 for k in kinds), (box, order)   # a region is near the focus or apart from it
            flags = [k.pop() for k in kinds]
            if any(flags):
                assert flags == sorted(flags, reverse=True), (box, flags)   # the near ones first
                focused += 1
    assert previews_seen > 0 and focused > 0


def test_buffers_mapped_and_given_back_piecewise_give_the_labels_of_a_full_computation(monkeypatch):
    """With every working buffer mapped by the plugin (as large ones are) and given back a page range at a time,
    first runs and re-runs still equal the computation of every pixel."""
    from napari_clearclip import refine

    monkeypatch.setattr(refine, "MAPPED_FROM", 0)
    monkeypatch.setattr(refine, "RELEASED_AT_ONCE", 1 << 12)
    rng = np.random.default_rng(77)
    for _ in range(6):
        scores, guide, size, spans, names, snap, tile = random_case(rng)
        snap = snap or (2, (1, 2))
        kept = AffinityTiles(1 << 30)
        state = labels_of(scores, guide, size, spans, names, snap, tile=tile, affinities=kept)
        np.testing.assert_array_equal(state.labels, labels_of(scores, guide, size, spans, names, snap, dense=True,
                                                              tile=tile).labels)
        scores = scores.clone()
        scores[int(rng.integers(0, len(scores))), :6, :6] += 0.3
        again = labels_of(scores, guide, size, spans, names, snap, state, tile=tile, affinities=kept)
        np.testing.assert_array_equal(again.labels, labels_of(scores, guide, size, spans, names, snap, dense=True,
                                                              tile=tile).labels)


def test_a_mapped_buffer_is_reused_and_its_pages_go_back_to_the_system_when_released(monkeypatch):
    from napari_clearclip import refine

    monkeypatch.setattr(refine, "MAPPED_FROM", 1 << 20)
    monkeypatch.setattr(refine, "RELEASED_AT_ONCE", 1 << 16)
    buffers = refine.Buffers()
    small = buffers.take((100,))            # below MAPPED_FROM: PyTorch's own memory
    large = buffers.take((512, 1024))       # 2 MB: mapped here
    large.fill_(3.0)
    pointer = large.data_ptr()
    buffers.give_back()
    assert buffers.take((256, 1024)).data_ptr() == pointer   # reused, not mapped anew
    still_held = large                                       # a view the run no longer uses
    buffers.release()
    assert float(still_held.abs().max()) == 0.0              # its pages were handed back (they read as zeros)
    assert not buffers._mappings and small.numel() == 100


def test_a_mapped_buffer_has_room_for_a_larger_region_later(monkeypatch):
    """A region with a halo on both sides is larger than the first one: it reuses the first one's buffer (its pages
    already in use) rather than a fresh mapping, and only what it asks for is used."""
    from napari_clearclip import refine

    monkeypatch.setattr(refine, "MAPPED_FROM", 1 << 20)
    buffers = refine.Buffers()
    first = buffers.take((512, 1024))
    pointer = first.data_ptr()
    buffers.give_back()
    larger = buffers.take((int(512 * refine.MAPPED_ROOM), 1024))
    assert larger.data_ptr() == pointer and larger.shape == (int(512 * refine.MAPPED_ROOM), 1024)
    buffers.give_back()
    assert buffers.take((1024, 1024)).data_ptr() != pointer   # beyond its room: mapped anew
    buffers.release()


def test_tiles_of_one_class_throughout_are_shown_first_only_where_their_label_changes():
    """A class taking over a block of the image: the whole tiles inside it, of that class throughout, are shown
    before any tile is computed per pixel, in the smallest box of tiles around them; the tiles of one class
    throughout that keep their class are not shown (nothing to show there), whether near the focus or not."""
    tile, snap = 32, (2, (1, 2))
    scores = torch.zeros((2, 40, 40))
    scores[0] += 1.0                                   # class 1 leads everywhere
    guide = torch.from_numpy(np.random.default_rng(0).normal(size=(3, 40, 40)).astype(np.float32))
    size, spans, names = (320, 320), [(0, 1), (1, 2)], [("a",), ("b",)]
    state = labels_of(scores, guide, size, spans, names, snap, tile=tile)
    assert (state.labels == 1).all()
    scores = scores.clone()
    scores[1, 4:20, 4:20] += 3.0                         # class 2 takes over pixels 40..160 a side
    steps = label_steps(scores, guide, size, spans, names, snap, state, tile=tile, focus=(300.0, 300.0))
    first = next(step for step in steps if len(step) > 2)[2]
    assert first.box == (2 * tile, 4 * tile, 2 * tile, 4 * tile)   # the four tiles wholly inside the block
    assert first.final.all() and (first.labels == 2).all()
    full = labels_of(scores, guide, size, spans, names, snap, dense=True, tile=tile)
    assert (full.labels[first.slices] == 2).all()


@pytest.mark.parametrize("snap", [(), (2, (1, 2))])
def test_ties_far_from_a_change_get_a_fresh_runs_labels_when_another_class_leads_most_of_the_image(snap):
    """Labels are computed on each query's scores minus those of the query leading most of the image, so
    an exact tie rounds one way or the other depending on that query. A change far away that makes another
    class lead most of the image changes how a fresh run settles ties: the re-run must settle them alike."""
    differing = []
    for seed in range(6):
        rng = np.random.default_rng(seed)
        height, left, right = 20, 20, 40
        scores = torch.full((3, height, left + right), -1.0)
        # on the left, b and c take a few values only: many exact ties, where a crosses neither
        scores[1:, :, :left] = torch.from_numpy(rng.integers(0, 5, (2, height, left)) / 40).float()
        scores[0, :, left:] = 0.05      # a leads the right, most of the image
        scores[2, :, left:] = 0.0375
        size = (int(height * 7.3), int((left + right) * 7.3))
        guide = torch.from_numpy(rng.normal(size=(3, height, left + right)).astype(np.float32))
        spans, names = [(0, 1), (1, 2), (2, 3)], [("a",), ("b",), ("c",)]
        first = labels_of(scores, guide, size, spans, names, snap, tile=16)
        changed = scores.clone()
        changed[2, :, left + 8 :] += 0.025    # c now leads most of the right, and of the image
        again = labels_of(changed, guide, size, spans, names, snap, first, tile=16)
        fresh = labels_of(changed, guide, size, spans, names, snap, dense=True, tile=16)
        differing.append(int((again.labels != fresh.labels).sum()))
        assert again.computed < 1  # the right's far columns were kept
    assert differing == [0] * 6


def test_typing_a_class_that_scores_low_recomputes_nothing():
    rng = np.random.default_rng(5)
    scores = smooth_scores(rng, 3, 48, 48, 6)
    guide = torch.from_numpy(rng.normal(size=(3, 48, 48)).astype(np.float32))
    size, spans, names, snap = (384, 384), [(0, 1), (1, 2), (2, 3)], [("a",), ("b",), ("c",)], (2, (1, 2))
    first = labels_of(scores, guide, size, spans, names, snap)
    # the new class follows the image's overall level (as CLIP's cosines do) but stays below every class
    typed = torch.cat([scores, scores.amin(0, keepdim=True) - 0.01])
    second = labels_of(typed, guide, size, spans + [(3, 4)], names + [("d",)], snap, first)
    assert second.computed == 0.0
    np.testing.assert_array_equal(second.labels, first.labels)


def test_a_class_typed_alone_is_snapped_in_bands_sized_for_every_class(monkeypatch):
    """Regions are sized by every query, not by the few they snap: sized for one class typed among thirty, a re-run at
    6000 x 6000 peaked at 3.76 GiB against 2.75 GiB, and a first run at 2.88 GiB against 2.42 GiB. The labels are
    a full computation's."""
    from napari_clearclip.refine import _bytes_per_row

    rng = np.random.default_rng(21)
    scores = smooth_scores(rng, 5, 48, 48, 4)
    guide = torch.from_numpy(rng.normal(size=(3, 48, 48)).astype(np.float32))
    size, snap, tile = (768, 384), (2, (1, 2)), 16
    spans, names = [(i, i + 1) for i in range(5)], [(f"c{i}",) for i in range(5)]
    # memory for bands of 160 rows (and their halos) snapping one class, of 112 rows snapping five
    monkeypatch.setattr(tiled_labels, "REGION_MEMORY_BYTES", 168 * _bytes_per_row(size[1], 1, 3, snap[1]))
    first = labels_of(scores, guide, size, spans, names, snap, dense=True, tile=tile)
    sized = []
    real = tiled_labels._regions

    def regions(dirty, geometry, halo, n_queries, dilations):
        found = real(dirty, geometry, halo, n_queries, dilations)
        sized.append((n_queries, len(found)))
        return found
    monkeypatch.setattr(tiled_labels, "_regions", regions)
    # close below the leader everywhere: most tiles are computed, and the class takes a tenth of the pixels
    added = scores.amax(0, keepdim=True) + smooth_scores(rng, 1, 48, 48, 3) * 0.2 - 0.02
    typed = torch.cat([scores, added])
    second = labels_of(typed, guide, size, spans + [(5, 6)], names + [("new",)], snap, first, tile=tile)
    assert sized[-1][0] == 6                                     # sized for every class, the one snapped too
    everywhere, geometry = np.ones((size[0] // tile, size[1] // tile), bool), tiled_labels._Geometry((48, 48), size, 4, tile)
    assert len(real(everywhere, geometry, 4, 1, snap[1])) < len(real(everywhere, geometry, 4, 6, snap[1]))  # it matters
    assert second.computed > 0.5 and 0 < (second.labels == 6).mean() < 1
    full = labels_of(typed, guide, size, spans + [(5, 6)], names + [("new",)], snap, dense=True, tile=tile)
    np.testing.assert_array_equal(second.labels, full.labels)


def _typed(rng, scores, spans, names, step):
    """One or two classes typed (sometimes with a synonym, sometimes before earlier classes), scoring near the
    others, sometimes on a coarse grid of values (exact ties)."""
    for number in range(int(rng.integers(1, 3))):
        extra = 2 if rng.random() < 0.3 else 1
        added = smooth_scores(rng, extra, *scores.shape[1:], int(rng.integers(1, 5))) + float(rng.uniform(-0.1, 0.03))
        if rng.random() < 0.3:
            added = (added * 40).round() / 40
        at = int(rng.integers(0, len(spans) + 1))      # the new class's place among the classes
        first = spans[at][0] if at < len(spans) else len(scores)
        scores = torch.cat([scores[:first], added, scores[first:]])
        spans = spans[:at] + [(first, first + extra)] + [(a + extra, b + extra) for a, b in spans[at:]]
        names = names[:at] + [tuple(f"typed{step}.{number}.{j}" for j in range(extra))] + names[at:]
    return scores, spans, names


@pytest.mark.parametrize("seed", range(5))
def test_classes_typed_on_the_same_scores_are_computed_alone_against_the_winners_kept(seed, monkeypatch):
    """Typing classes, one run after another (a stroke and a class removed between), with the earlier classes' scores
    unchanged: only the new classes (and, where the previous run never computed the winners' values, the labelled
    classes) are resized and snapped, and the labels equal a computation from scratch; the margins stay lower bounds
    and the winners' values kept are bit for bit those of a computation from scratch."""
    rng = np.random.default_rng(300 + seed)
    typed_runs = 0
    computed_queries = spy_on_computed_queries(monkeypatch)
    real_typed = tiled_labels._typed_tiles
    monkeypatch.setattr(tiled_labels, "_typed_tiles", lambda *a, **k: (calls.append(1), real_typed(*a, **k))[1])
    for _ in range(6):
        scores, guide, size, spans, names, snap, tile = random_case(rng)
        kept = AffinityTiles(int(rng.choice([1 << 30, 1 << 16])))
        state = labels_of(scores, guide, size, spans, names, snap, tile=tile, affinities=kept)
        for step in range(3):
            if step == 1:  # a stroke between two classes typed: the winners' values kept are partly stale
                scores = scores.clone()
                k, y = int(rng.integers(0, len(scores))), int(rng.integers(0, scores.shape[1]))
                scores[k, y : y + 4] += float(rng.uniform(0, 0.1))
                state = labels_of(scores, guide, size, spans, names, snap, state, tile=tile, affinities=kept)
            if step == 2 and len(spans) > 2:  # a class removed: the others' winners' values still hold
                gone = int(rng.integers(0, len(spans)))
                a, b = spans[gone]
                scores = torch.cat([scores[:a], scores[b:]])
                spans = spans[:gone] + [(c - (b - a), d - (b - a)) for c, d in spans[gone + 1 :]]
                names = names[:gone] + names[gone + 1 :]
                state = labels_of(scores, guide, size, spans, names, snap, state, tile=tile, affinities=kept)
                full = labels_of(scores, guide, size, spans, names, snap, dense=True, tile=tile)
                np.testing.assert_array_equal(state.labels, full.labels)
                exact = np.repeat(np.repeat(state.exact, tile, 0), tile, 1)[: size[0], : size[1]]
                np.testing.assert_array_equal(state.winners[exact], full.winners[exact])
            old_names = set(names)
            scores, spans, names = _typed(rng, scores, spans, names, step)
            calls, computed_queries[:] = [], []
            state = labels_of(scores, guide, size, spans, names, snap, state, tile=tile, affinities=kept)
            computed = list(computed_queries)   # this run's, not the full computation's below
            assert_as_from_scratch(state, scores, guide, size, spans, names, snap, tile)
            if calls:
                typed_runs += 1
                new_queries = {q for (a, b), name in zip(spans, names) if name not in old_names for q in range(a, b)}
                assert new_queries & set(computed) or state.computed == 0
    assert typed_runs >= 12   # most typing runs took the path of classes added alone


@pytest.mark.parametrize("seed", range(5))
def test_scores_that_only_rise_are_computed_alone_against_the_winners_kept(seed, monkeypatch):
    """Strokes with edge snapping only raise scores (of the painted class, and of those whose lead cap it lifts): a
    re-run computes only the classes that rose (and, where the winners' values are not kept, the labelled ones),
    and its labels equal a computation from scratch, its margins stay lower bounds and the winners' values kept are
    bit for bit those of a computation from scratch; a stroke on the reference, a fall or a class typed between
    takes the other paths and leaves the winners right for the next rise."""
    rng = np.random.default_rng(500 + seed)
    risen_runs = strict = 0
    computed_queries = spy_on_computed_queries(monkeypatch)
    real_risen = tiled_labels._only_risen
    monkeypatch.setattr(tiled_labels, "_only_risen", lambda *a, **k: calls.append(real_risen(*a, **k)) or calls[-1])
    for _ in range(8):
        scores, guide, size, spans, names, snap, tile = random_case(rng)
        while len(scores) < 2:
            scores, guide, size, spans, names, snap, tile = random_case(rng)
        kept = AffinityTiles(int(rng.choice([1 << 30, 1 << 16])))
        # a first run that keeps every winner's value, or the usual one (tiles of one class filled)
        state = labels_of(scores, guide, size, spans, names, snap, tile=tile, affinities=kept,
                          dense=bool(rng.random() < 0.3))
        coarse = len(scores.unique()) < 200   # values on a grid: exact ties that rounding must settle alike
        for step in range(5):
            scores = scores.clone()
            h, w = scores.shape[1:]
            if step == 3 and rng.random() < 0.5:   # a fall or a class typed between rises
                if rng.random() < 0.5:
                    scores[int(rng.integers(0, len(scores)))] -= 0.01
                else:
                    scores, spans, names = _typed(rng, scores, spans, names, step)
            else:
                # the query leading most of the image (the one others are computed against) rises now and then
                reference = tiled_labels._reference_query(tiled_labels.leading_query(scores), len(scores))
                others = [q for q in range(len(scores)) if q != reference]
                for _ in range(int(rng.integers(1, 3))):   # one or two queries rise, in a patch or everywhere
                    k = int(rng.choice(others)) if rng.random() < 0.85 else reference
                    y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
                    area = ((slice(y, y + int(rng.integers(2, 8))), slice(x, x + int(rng.integers(2, 8))))
                            if rng.random() < 0.7 else (slice(None), slice(None)))
                    rise = float(rng.uniform(0, 0.15))
                    scores[(k, *area)] += round(rise * 40) / 40 if coarse else rise
            calls, computed_queries[:] = [], []
            before, all_kept = state.scores, bool(state.exact.all())
            if rng.random() < 0.3:
                focus = (float(rng.uniform(0, size[0])), float(rng.uniform(0, size[1])))
                state = run_to_end(label_steps(scores, guide, size, spans, names, snap, state, tile=tile,
                                               affinities=kept, focus=focus))
            else:
                state = labels_of(scores, guide, size, spans, names, snap, state, tile=tile, affinities=kept)
            computed = list(computed_queries)
            assert_as_from_scratch(state, scores, guide, size, spans, names, snap, tile)
            if calls and calls[0]:
                risen_runs += 1
                owner = np.repeat(np.arange(len(spans)), [b - a for a, b in spans])
                rose = {int(owner[q]) for q in range(len(scores)) if bool((scores[q] != before[q]).any())}
                if all_kept:   # every winner's value kept: only the classes that rose are computed
                    assert {int(owner[q]) for q in computed} <= rose
                    strict += bool(computed)
    assert risen_runs >= 8   # a third of the runs or more took the path of risen classes alone
    assert strict >= 1


def class_maxima_per_tile(scores, guide, size, spans, snap, tile) -> np.ndarray:
    """(tiles_y, tiles_x, classes) each class's highest value over each tile, relative to the query leading most of
    the image, computed here apart from the engine: PyTorch's bilinear resize, then PAMR on the whole image."""
    from napari_clearclip.refine import pamr

    reference = int(np.bincount(scores.max(0).indices.numpy().ravel(), minlength=len(scores)).argmax())
    resized = F.interpolate((scores - scores[reference])[None].double(), size=size, mode="bilinear",
                            align_corners=False)[0].float()
    if snap:
        big_guide = F.interpolate(guide[None], size=size, mode="bilinear", align_corners=False)[0]
        resized = pamr(resized, big_guide, snap[0], snap[1])
    values = torch.stack([resized[a:b].amax(0) for a, b in spans]).numpy()
    pad_y, pad_x = -size[0] % tile, -size[1] % tile
    values = np.pad(values, ((0, 0), (0, pad_y), (0, pad_x)), constant_values=-np.inf)
    blocks = values.reshape(len(spans), values.shape[1] // tile, tile, values.shape[2] // tile, tile)
    return blocks.max(axis=(2, 4)).transpose(1, 2, 0)


@pytest.mark.parametrize("seed", range(4))
def test_each_classs_highest_value_per_tile_carried_between_rises_bounds_its_values(seed):
    """A re-run keeps, per tile, a bound of each class's highest value (those it computed, and the previous run's plus
    the class's rise within reach); the bound never falls below the values an independent computation gives, and it
    is known (finite) in many tiles, so re-runs can use it."""
    rng = np.random.default_rng(700 + seed)
    checked = finite = 0
    for _ in range(6):
        scores, guide, size, spans, names, snap, tile = random_case(rng)
        while len(scores) < 2 or not snap:
            scores, guide, size, spans, names, snap, tile = random_case(rng)
        state = labels_of(scores, guide, size, spans, names, snap, tile=tile, dense=bool(rng.random() < 0.3))
        tolerance = tiled_labels.ROUNDING * max(1.0, float(scores.abs().max()))
        for _ in range(4):
            scores = scores.clone()
            reference = tiled_labels._reference_query(tiled_labels.leading_query(scores), len(scores))
            k = int(rng.choice([q for q in range(len(scores)) if q != reference]))
            y, x = int(rng.integers(0, scores.shape[1])), int(rng.integers(0, scores.shape[2]))
            scores[k, y : y + int(rng.integers(2, 8)), x : x + int(rng.integers(2, 8))] += float(rng.uniform(0, 0.15))
            state = labels_of(scores, guide, size, spans, names, snap, state, tile=tile)
            assert_as_from_scratch(state, scores, guide, size, spans, names, snap, tile)
            truth = class_maxima_per_tile(scores, guide, size, spans, snap, tile)
            known = np.isfinite(state.highest)
            assert np.all(truth[known] <= state.highest[known] + 2 * tolerance)
            checked += 1
            finite += int(known.sum())
    assert checked == 24 and finite > 0


@pytest.mark.parametrize("seed", range(3))
def test_a_rise_recomputes_fewer_tiles_with_each_classs_highest_value_carried(seed, monkeypatch):
    """The same sequences of rises, with and without the bounds carried between runs: the same labels, and fewer tiles
    computed with them over the sequences."""
    def sequence(carry: bool):
        if not carry:
            real = tiled_labels._carried_highest

            def nothing_carried(previous, *args):
                return real(None, *args)
            monkeypatch.setattr(tiled_labels, "_carried_highest", nothing_carried)
        rng = np.random.default_rng(800 + seed)
        out = []
        for _ in range(6):
            scores, guide, size, spans, names, snap, tile = random_case(rng)
            while len(scores) < 3 or not snap:
                scores, guide, size, spans, names, snap, tile = random_case(rng)
            state = labels_of(scores, guide, size, spans, names, snap, tile=tile)
            for _ in range(4):
                scores = scores.clone()
                reference = tiled_labels._reference_query(tiled_labels.leading_query(scores), len(scores))
                k = int(rng.choice([q for q in range(len(scores)) if q != reference]))
                y, x = int(rng.integers(0, scores.shape[1])), int(rng.integers(0, scores.shape[2]))
                scores[k, y : y + 6, x : x + 6] += float(rng.uniform(0.02, 0.1))
                state = labels_of(scores, guide, size, spans, names, snap, state, tile=tile)
                out.append((state.labels.copy(), state.computed))
        monkeypatch.undo()
        return out

    with_bounds, without = sequence(True), sequence(False)
    for (labels, _), (plain_labels, _) in zip(with_bounds, without):
        np.testing.assert_array_equal(labels, plain_labels)
    assert sum(c for _, c in with_bounds) < sum(c for _, c in without)


def test_a_stroke_computes_only_the_class_it_raised_where_the_winners_are_kept(monkeypatch):
    rng = np.random.default_rng(9)
    scores = smooth_scores(rng, 3, 40, 40, 5)
    scores[0] += 0.05   # the first class leads most of the image: the reference
    guide = torch.from_numpy(rng.normal(size=(3, 40, 40)).astype(np.float32))
    size, spans, names, snap = (320, 320), [(0, 1), (1, 2), (2, 3)], [("a",), ("b",), ("c",)], (2, (1, 2))
    first = labels_of(scores, guide, size, spans, names, snap, dense=True)   # every winner's value kept
    assert first.exact.all()
    computed = spy_on_computed_queries(monkeypatch)
    stroked = scores.clone()
    stroked[2, 10:30, 10:30] += 0.08
    second = labels_of(stroked, guide, size, spans, names, snap, first)
    assert set(computed) == {2}                       # the class the stroke raised, alone
    assert 0 < second.computed < 1
    full = labels_of(stroked, guide, size, spans, names, snap, dense=True)
    np.testing.assert_array_equal(second.labels, full.labels)
    assert (second.labels != first.labels).any()


def test_a_class_typed_is_resized_and_snapped_alone_where_the_winners_are_kept(monkeypatch):
    rng = np.random.default_rng(8)
    scores = smooth_scores(rng, 3, 40, 40, 5)
    guide = torch.from_numpy(rng.normal(size=(3, 40, 40)).astype(np.float32))
    size, spans, names, snap = (320, 320), [(0, 1), (1, 2), (2, 3)], [("a",), ("b",), ("c",)], (2, (1, 2))
    first = labels_of(scores, guide, size, spans, names, snap, dense=True)   # every winner's value kept
    assert first.exact.all()
    computed = spy_on_computed_queries(monkeypatch)
    typed = torch.cat([scores, scores[1:2] + 0.02 * torch.from_numpy(rng.normal(size=(1, 40, 40)).astype(np.float32))])
    second = labels_of(typed, guide, size, spans + [(3, 4)], names + [("d",)], snap, first)
    assert set(computed) == {3}                       # the new class alone
    assert 0 < second.computed < 1
    full = labels_of(typed, guide, size, spans + [(3, 4)], names + [("d",)], snap, dense=True)
    np.testing.assert_array_equal(second.labels, full.labels)
    assert (second.labels == 4).any()


def test_a_local_change_recomputes_only_near_it():
    rng = np.random.default_rng(3)
    scores = smooth_scores(rng, 3, 64, 64, 8)
    guide = torch.from_numpy(rng.normal(size=(3, 64, 64)).astype(np.float32))
    size, spans, names, snap = (512, 512), [(0, 1), (1, 2), (2, 3)], [("a",), ("b",), ("c",)], (2, (1, 2))
    first = labels_of(scores, guide, size, spans, names, snap)
    changed = scores.clone()
    changed[1, 5:8, 5:8] += 0.3
    second = labels_of(changed, guide, size, spans, names, snap, first)
    assert second.computed < 0.1
    np.testing.assert_array_equal(second.labels, labels_of(changed, guide, size, spans, names, snap, dense=True).labels)
    unchanged = labels_of(changed, guide, size, spans, names, snap, second)
    assert unchanged.computed == 0.0


def test_uniform_images_compute_nothing_per_pixel():
    scores = torch.zeros((2, 16, 16))
    scores[0] += 0.3
    result = labels_of(scores, torch.zeros((3, 16, 16)), (256, 256), [(0, 1), (1, 2)], [("a",), ("b",)], (10, (8, 16)))
    assert result.computed == 0.0
    assert (result.labels == 1).all()


def test_a_boundary_between_two_classes_is_snapped_as_one_channel(monkeypatch):
    """Only the queries that can win near a tile are resized and snapped there, relative to the query leading
    most of the image: an object on the background costs one channel, not one per class."""
    from napari_clearclip import refine

    rng = np.random.default_rng(11)
    scores = torch.full((5, 48, 48), 0.2) + torch.from_numpy(rng.normal(size=(5, 48, 48)).astype(np.float32)) * 0.005
    scores[4] += 0.1                                   # the background leads most of the image
    scores[1, 12:30, 14:34] += 0.2                     # one object of class 1; classes 0, 2, 3 stay far below
    guide = torch.from_numpy(rng.normal(size=(3, 48, 48)).astype(np.float32))
    size, spans = (384, 384), [(i, i + 1) for i in range(5)]
    names, snap = [(f"c{i}",) for i in range(5)], (2, (1, 2))
    snapped = []
    for name in ("_refine_whole", "_refine_padded"):
        real = getattr(refine, name)

        def counting(values, *args, real=real, **kwargs):
            snapped.append(values.shape[0])
            return (yield from real(values, *args, **kwargs))
        monkeypatch.setattr(refine, name, counting)
    fast = labels_of(scores, guide, size, spans, names, snap)
    assert snapped and set(snapped) == {1} and len(snapped) <= 2
    assert set(np.unique(fast.labels)) == {2, 5}
    snapped.clear()
    full = labels_of(scores, guide, size, spans, names, snap, dense=True)
    assert sum(snapped) >= 4                           # the full computation snaps every query
    np.testing.assert_array_equal(fast.labels, full.labels)


@pytest.mark.parametrize("seed", range(20))
def test_passes_snap_each_query_once_over_at_least_its_rectangle(seed):
    """Every query is snapped in one pass, over a rectangle that holds its own, with at most SNAPPED_TOGETHER
    queries a pass; without snapping nothing is merged."""
    rng = np.random.default_rng(seed)
    size = (int(rng.integers(200, 2000)), int(rng.integers(200, 2000)))
    rectangles = {}
    for q in range(int(rng.integers(1, 12))):
        top, left = int(rng.integers(0, size[0] - 50)), int(rng.integers(0, size[1] - 50))
        rectangles[q] = (top, int(rng.integers(top + 50, size[0] + 1)), left, int(rng.integers(left + 50, size[1] + 1)))
        if q and rng.random() < 0.3:
            rectangles[q] = rectangles[q - 1]
    snap = (int(rng.integers(1, 11)), (8, 16))
    passes = tiled_labels._snapped_together(rectangles, size, snap)
    snapped = [q for _, queries in passes for q in queries]
    assert sorted(snapped) == sorted(rectangles)
    for (top, bottom, left, right), queries in passes:
        assert 1 <= len(queries) <= tiled_labels.SNAPPED_TOGETHER
        assert 0 <= top < bottom <= size[0] and 0 <= left < right <= size[1]
        for q in queries:
            a, b, c, d = rectangles[q]
            assert top <= a and b <= bottom and left <= c and d <= right
    alone = tiled_labels._snapped_together(rectangles, size, (0, ()))
    assert all(rectangles[q] == rectangle for rectangle, queries in alone for q in queries)


def test_queries_over_overlapping_rectangles_share_a_pass_and_distant_ones_do_not():
    """A pass reads its weights once for all its queries: two queries whose rectangles nearly coincide are snapped
    in one pass over both; two small rectangles far apart are snapped apart (one box over both would snap far more
    pixels than it saves)."""
    size, snap = (4096, 4096), (10, (8, 16))
    near = {0: (1000, 2000, 1000, 2000), 1: (1064, 2064, 1000, 2000), 2: (1000, 2000, 1064, 2000)}
    passes = tiled_labels._snapped_together(near, size, snap)
    assert [(rectangle, sorted(queries)) for rectangle, queries in passes] == [((1000, 2064, 1000, 2000), [0, 1, 2])]
    far = {0: (0, 400, 0, 400), 1: (3600, 4000, 3600, 4000)}
    assert sorted(q for _, q in tiled_labels._snapped_together(far, size, snap)) == [[0], [1]]
    six = {q: (1000, 2000, 1000, 2000) for q in range(6)}                 # seven classes: one pass
    assert [len(q) for _, q in tiled_labels._snapped_together(six, size, snap)] == [6]
    many = {q: (1000, 2000, 1000, 2000) for q in range(10)}               # at most eight a pass
    assert sorted(len(q) for _, q in tiled_labels._snapped_together(many, size, snap)) == [2, 8]


@pytest.mark.parametrize("seed", range(3))
def test_margins_left_for_the_next_run_never_exceed_the_true_margins(seed):
    """A re-run keeps a pixel's label on the strength of its stored margin, so that margin must never be more
    than the winner's true lead over every other class, including classes that were never computed there."""
    rng = np.random.default_rng(100 + seed)
    checked = 0
    for _ in range(6):
        h, w = (int(v) for v in rng.integers(24, 48, 2))
        size, queries = (h * 6, w * 6), int(rng.integers(3, 7))
        scores = smooth_scores(rng, queries, h, w, int(rng.integers(2, 8)))
        scores[int(rng.integers(0, queries))] += 0.1          # one query leads most of the image
        guide = torch.from_numpy(rng.normal(size=(3, h, w)).astype(np.float32))
        spans, names = [(i, i + 1) for i in range(queries)], [(f"q{i}",) for i in range(queries)]
        snap = (int(rng.integers(1, 4)), (1, 2)) if rng.random() < 0.7 else ()
        fast = labels_of(scores, guide, size, spans, names, snap, tile=16)
        true = labels_of(scores, guide, size, spans, names, snap, dense=True, tile=16)
        np.testing.assert_array_equal(fast.labels, true.labels)
        bound, actual = fast.margins.astype(np.float32), true.margins.astype(np.float32)
        # the reference's margins are stored at half size too, lowered by up to 2^-10 and a half step (2^-11)
        assert np.all(bound <= actual + 2.0 ** -9 * np.abs(actual) + 1e-5)
        checked += int((bound < actual).sum())
    assert checked  # some margins were bounds, not the true values


def test_many_classes_typed_are_compared_only_with_those_that_lead_or_come_close_somewhere(monkeypatch):
    """Forty words of which three lead somewhere: each query is bounded against the few queries among the best
    three somewhere, not all forty (work in proportion to the classes seen), and the labels are still those
    of a full computation."""
    rng = np.random.default_rng(21)
    scores = smooth_scores(rng, 40, 40, 40, 5) * 0.2
    scores[:3] += smooth_scores(rng, 3, 40, 40, 8) + 0.3
    guide = torch.from_numpy(rng.normal(size=(3, 40, 40)).astype(np.float32))
    spans, names, snap = [(i, i + 1) for i in range(40)], [(f"w{i}",) for i in range(40)], (2, (1, 2))
    assert len(np.unique(scores.argmax(0).numpy())) == 3
    calls = []
    real = tiled_labels._Geometry.reduce

    def counted(self, coarse, how, within=None):
        calls.append(coarse.shape)
        return real(self, coarse, how, within)
    monkeypatch.setattr(tiled_labels._Geometry, "reduce", counted)
    fast = labels_of(scores, guide, (320, 320), spans, names, snap)
    rivals = tiled_labels._rivals(scores)
    assert {0, 1, 2} <= set(rivals.tolist()) and len(rivals) <= 12
    assert sum(1 for shape in calls if len(shape) == 3) == len(rivals)         # one pass: their bounds are kept
    assert len(tiled_labels._rivals(scores, limit=4)) == 4
    full = labels_of(scores, guide, (320, 320), spans, names, snap, dense=True).labels
    np.testing.assert_array_equal(fast.labels, full)
    calls.clear()                              # too many to keep: two passes over the rivals, the same labels
    monkeypatch.setattr(tiled_labels, "KEPT_BOUNDS_BYTES", 0)
    np.testing.assert_array_equal(labels_of(scores, guide, (320, 320), spans, names, snap).labels, full)
    assert sum(1 for shape in calls if len(shape) == 3) == 2 * len(rivals)


@pytest.fixture(scope="module")
def demo():
    return Segmenter("synthetic-tiny", device="cpu", disk_cache=False)


def scene_strokes(rng, shape, classes: int, count: int) -> np.ndarray:
    strokes = np.zeros(shape, np.int32)
    for _ in range(count):
        y, x = int(rng.integers(0, shape[0] - 8)), int(rng.integers(0, shape[1] - 30))
        strokes[y : y + 4, x : x + int(rng.integers(5, 30))] = int(rng.integers(1, classes + 1))
    return strokes


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_live_reruns_equal_fresh_runs_with_every_method(demo, method, monkeypatch):
    """Strokes one after another, a class typed, snapping on and off, the focus of a view or a stroke: each re-run
    equals a from-scratch one."""
    rng = np.random.default_rng(abs(hash(method)) % 1000)
    monkeypatch.setattr(tiled_labels, "FOCUS_SIDE", 64)
    image = make_scene(int(rng.integers(0, 1000)), size=320, objects=(3, 4)).image
    classes = ["red", "green", "blue", "yellow", "background"]
    demo.method = method
    try:
        for refine in ("pamr", None):
            strokes = np.zeros(image.shape[:2], np.int32)
            for step in range(4):
                names = classes if step < 3 else classes[:4] + ["purple", "background"]
                strokes = np.maximum(strokes, scene_strokes(rng, image.shape[:2], len(classes), 1))
                strokes[strokes > len(names)] = 0
                if step == 3:
                    strokes[strokes == 5] = 6  # background moved to the sixth class
                options = dict(maps=False, refine=refine, pamr_iterations=3, strokes=strokes)
                # shown around a point or a view first, as the widget asks: the labels are the same
                focus = (tuple(float(v) for v in rng.uniform(0, 320, 2)) if step % 2 else
                         (float(rng.uniform(0, 200)), 260.0, float(rng.uniform(0, 200)), 300.0))
                fast = demo.segment(image, names, focus=focus, **options)
                monkeypatch.setattr(tiled_labels, "SKIPPING", False)
                full = Segmenter.segment(demo, image, names, **options)
                monkeypatch.setattr(tiled_labels, "SKIPPING", True)
                np.testing.assert_array_equal(fast.labels, full.labels)
    finally:
        demo.method = "clearclip"


def test_labels_alone_agree_with_the_maps_path_and_confidence_is_computed_when_read(demo):
    image = make_scene(5, size=256, objects=(3, 3)).image
    classes = ["red", "green", "blue", "yellow", "background"]
    for refine in (None, "pamr"):
        alone = demo.segment(image, classes, maps=False, refine=refine)
        maps = demo.segment(image, classes, maps=True, refine=refine)
        assert (alone.labels == maps.labels).mean() >= 0.999
        assert alone.probabilities is None
        np.testing.assert_allclose(alone.confidence, maps.confidence, atol=1e-5)


def test_stacks_rerun_each_plane_from_what_changed(demo, monkeypatch):
    frames = np.stack([make_scene(s, size=192, objects=(2, 3)).image for s in (1, 2, 3)])
    layout = ImageLayout(frames.shape, rgb=True)
    classes = ["red", "green", "blue", "yellow", "background"]
    rng = np.random.default_rng(0)

    def run(strokes):
        out = {}
        for item in segment_stack(demo, frames, layout, layout.planes(), classes, {"refine": "pamr", "pamr_iterations": 2},
                                  strokes_by_plane=strokes, maps=False):
            if not isinstance(item, Progress):
                out[item[0]] = item[1].labels
        return out

    run({})
    strokes = {(1,): scene_strokes(rng, frames.shape[1:3], 5, 2)}
    fast = run(strokes)
    monkeypatch.setattr(tiled_labels, "SKIPPING", False)
    full = run(strokes)
    assert len(fast) == 3
    for plane in fast:
        np.testing.assert_array_equal(fast[plane], full[plane])


@pytest.mark.parametrize("own_weights", [False, True], ids=["image-weights", "region-weights"])
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "element-wise"])
@pytest.mark.parametrize("seed", range(4))
def test_pamr_on_a_region_leaving_out_its_cut_sides_gives_the_whole_image_values_bit_for_bit(seed, compiled,
                                                                                          own_weights, monkeypatch):
    """A region cut out of an image (random sides cut): iterations that leave out the bands next to the cut sides
    give every value farther than iterations x max(dilations) from the cuts the whole image's, bit for bit,
    whichever rows are computed at a time; also with weights made from the region's own guide, wrong within
    max(dilations) of its cut sides (the first iteration leaves that band out)."""
    from napari_clearclip import compiled_snapping, refine
    from napari_clearclip.progress import run_to_end
    from napari_clearclip.refine import _finish, _refine_padded, _replicate, pamr, pamr_affinities

    rng = np.random.default_rng(seed)
    if not compiled:
        monkeypatch.setattr(compiled_snapping, "_compiled", False)
    iterations, dilations = int(rng.integers(1, 5)), tuple(int(d) for d in rng.choice([1, 2, 3], 2, replace=False))
    pad, halo = max(dilations), max(dilations) * iterations
    height, width = int(rng.integers(2 * halo + 13, 2 * halo + 60)), int(rng.integers(2 * halo + 13, 2 * halo + 80))
    scores = torch.from_numpy(rng.normal(size=(int(rng.integers(1, 4)), height, width)).astype(np.float32))
    guide = torch.from_numpy(rng.normal(size=(3, height, width)).astype(np.float32))
    whole = run_to_end(refine.pamr_steps(scores, guide, iterations, dilations))
    np.testing.assert_array_equal(whole.numpy(), pamr(scores, guide, iterations, dilations).numpy())
    cut = tuple(bool(c) for c in rng.random(4) < 0.7)
    top = int(rng.integers(1, 6)) if cut[0] else 0
    bottom = height - int(rng.integers(1, 6)) if cut[1] else height
    left = int(rng.integers(1, 6)) if cut[2] else 0
    right = width - int(rng.integers(1, 6)) if cut[3] else width
    if own_weights:
        affinity = pamr_affinities(guide[:, top:bottom, left:right].contiguous(), dilations)
    else:
        affinity = pamr_affinities(guide, dilations)[:, top:bottom, left:right]
    monkeypatch.setattr(refine, "COMPILED_AT_ONCE_BYTES", int(rng.choice([4, 4096, 1 << 24])) * scores.shape[0] * width)
    monkeypatch.setattr(refine, "AVERAGED_AT_ONCE_BYTES", int(rng.choice([4, 4096, 1 << 24])) * scores.shape[0] * width)
    # blocks of rows bound by their weights' bytes too: 1 or 3 rows, or no bound
    monkeypatch.setattr(refine, "WEIGHTS_AT_ONCE_BYTES", int(rng.choice([1, 3, 1 << 20])) * 8 * len(dilations) * width * 4)
    padded = _replicate(scores[:, top:bottom, left:right].contiguous(), pad)
    spare = torch.full_like(padded, float("nan"))   # values never computed: any one read would show
    steps = _refine_padded(padded, spare, iterations, dilations, affinity, cut)
    for _ in range(iterations):
        next(steps)
    region = _finish(steps)
    inner = (slice(None), slice(halo * cut[0], region.shape[1] - halo * cut[1]),
             slice(halo * cut[2], region.shape[2] - halo * cut[3]))
    expected = whole[:, top:bottom, left:right][inner]
    assert expected.numel()
    assert torch.equal(region[inner], expected)


@pytest.mark.parametrize("seed", range(10))
def test_snapping_only_the_columns_some_iteration_needs_gives_the_tiles_read_the_whole_image_values(seed,
                                                                                                  monkeypatch):
    """Scattered tiles of a region, its rectangle their box with the halo: each iteration computes only the columns
    of each row within (iterations left) x max(dilations) of the tiles, and the tiles still get the whole image's
    values bit for bit, whichever rows are computed at a time; with the tiles scattered, less is computed."""
    from napari_clearclip import compiled_snapping, refine
    from napari_clearclip.refine import _finish, _refine_padded, _replicate, pamr, pamr_affinities

    assert compiled_snapping.available()
    rng = np.random.default_rng(seed)
    iterations, dilations = int(rng.integers(1, 5)), tuple(int(d) for d in rng.choice([1, 2, 3, 5], 2, replace=False))
    pad, halo, tile = max(dilations), max(dilations) * iterations, int(rng.choice([4, 8, 16]))
    height, width = int(rng.integers(60, 140)), int(rng.integers(60, 160))
    scores = torch.from_numpy(rng.normal(size=(int(rng.integers(1, 4)), height, width)).astype(np.float32))
    guide = torch.from_numpy(rng.normal(size=(3, height, width)).astype(np.float32))
    whole = pamr(scores, guide, iterations, dilations)
    geometry = tiled_labels._Geometry((8, 8), (height, width), halo, tile)
    grid = np.argwhere(rng.random(geometry.shape) < rng.choice([0.05, 0.15, 0.4]))
    tiles = [(int(y), int(x)) for y, x in grid] or [(0, 0)]
    rectangle = tiled_labels._rectangle(tiles, geometry, halo, (0, height, 0, width))
    top, bottom, left, right = rectangle
    cut = (top > 0, bottom < height, left > 0, right < width)
    needed = tiled_labels._needed_columns(tiles, rectangle, geometry, iterations, pad)
    monkeypatch.setattr(refine, "COMPILED_AT_ONCE_BYTES", int(rng.choice([4, 4096, 1 << 24])) * scores.shape[0] * width)
    monkeypatch.setattr(refine, "WEIGHTS_AT_ONCE_BYTES", int(rng.choice([1, 3, 1 << 20])) * 8 * len(dilations) * width * 4)
    padded = _replicate(scores[:, top:bottom, left:right].contiguous(), pad)
    spare = torch.full_like(padded, float("nan"))
    affinity = pamr_affinities(guide, dilations)[:, top:bottom, left:right]
    steps = _refine_padded(padded, spare, iterations, dilations, affinity, cut, needed)
    for _ in range(iterations):
        next(steps)
    region = _finish(steps)
    for ty, tx in tiles:
        rows, cols = geometry.tile_slices(ty, tx)
        inside = (slice(None), slice(rows.start - top, rows.stop - top), slice(cols.start - left, cols.stop - left))
        assert torch.equal(region[inside], whole[:, rows, cols]), (ty, tx)
    # the last iteration computes the spans of the tiles' rows alone: less than the rectangle, whose halo it leaves
    last = needed[iterations]
    if tiled_labels._rectangle(tiles, geometry, 0, (0, height, 0, width)) != rectangle:
        assert (last[:, 1] - last[:, 0]).sum() < (bottom - top) * (right - left)
    for ty, tx in tiles:
        rows, cols = geometry.tile_slices(ty, tx)
        assert (last[rows.start - top : rows.stop - top, 0] <= cols.start - left).all()
        assert (last[rows.start - top : rows.stop - top, 1] >= cols.stop - left).all()


@pytest.mark.parametrize("seed", range(6))
def test_what_a_cut_edge_spoils_reaches_iterations_times_the_largest_dilation_and_no_farther(seed):
    """PAMR on a region cut out of an image, its edges repeated and its weights made from its own guide (wrong
    within max(dilations) of the edges), every value computed: after t iterations the values farther than
    t x max(dilations) from the cut edges are the whole image's, bit for bit; nearer, some are not. The halo of a
    recomputed region is that wide: the weights' own error adds nothing, as the first iteration's reach already
    holds it."""
    from napari_clearclip.refine import pamr

    rng = np.random.default_rng(seed)
    iterations, dilations = int(rng.integers(1, 5)), tuple(int(d) for d in rng.choice([1, 2, 3], 2, replace=False))
    reach = max(dilations) * iterations
    height, width = int(rng.integers(4 * reach + 20, 4 * reach + 60)), int(rng.integers(4 * reach + 20, 4 * reach + 60))
    scores = torch.from_numpy(rng.normal(size=(2, height, width)).astype(np.float32))
    guide = torch.from_numpy(rng.normal(size=(3, height, width)).astype(np.float32))
    whole = pamr(scores, guide, iterations, dilations)
    top, bottom, left, right = reach + 3, height - reach - 4, reach + 5, width - reach - 2
    region = pamr(scores[:, top:bottom, left:right].contiguous(), guide[:, top:bottom, left:right].contiguous(),
                  iterations, dilations)
    expected = whole[:, top:bottom, left:right]
    assert torch.equal(region[:, reach:-reach, reach:-reach], expected[:, reach:-reach, reach:-reach])
    nearer = reach - 1
    assert not torch.equal(region[:, nearer:-nearer, nearer:-nearer], expected[:, nearer:-nearer, nearer:-nearer])


def test_compiled_blocks_of_rows_are_bound_by_their_weights_as_well_as_their_output():
    """A wide region with few classes averages blocks whose weights stay within WEIGHTS_AT_ONCE_BYTES (the wave's
    next iteration finds them in the cache); a narrow one with many classes, blocks of COMPILED_AT_ONCE_BYTES of
    output; the element-wise path its own blocks."""
    from napari_clearclip import refine

    wide = torch.zeros(2, 1, 1)
    rows = refine._rows_at_once(wide, 4096, 4096, compiled=True, neighbours=16)
    assert rows == refine.WEIGHTS_AT_ONCE_BYTES // (16 * 4096 * 4) < refine.COMPILED_AT_ONCE_BYTES // (2 * 4096 * 4)
    many = torch.zeros(40, 1, 1)
    assert refine._rows_at_once(many, 512, 4096, compiled=True) == refine.COMPILED_AT_ONCE_BYTES // (40 * 512 * 4)
    assert refine._rows_at_once(wide, 4096, 4096) == refine.AVERAGED_AT_ONCE_BYTES // (2 * 4096 * 4)


@pytest.mark.parametrize("seed", range(6))
def test_regions_hold_their_tiles_with_a_full_halo_and_no_rows_beyond(seed):
    """Each recomputed region is its tiles' bounding box plus the halo (clipped at the image), never a whole
    band of tile rows: scattered changed tiles cost their own neighbourhoods only."""
    rng = np.random.default_rng(seed)
    size, halo = (int(rng.integers(300, 900)), int(rng.integers(300, 900))), 40
    geometry = tiled_labels._Geometry((32, 32), size, reach=32, tile=16)
    dirty = rng.random(geometry.shape) < rng.choice([0.01, 0.05, 0.3])
    regions = tiled_labels._regions(dirty, geometry, halo, 5, (4, 8))
    covered = np.zeros(geometry.shape, bool)
    for (top, bottom, left, right), tiles in regions:
        ys = [geometry.tile_rows[y] for y, _ in tiles]
        xs = [geometry.tile_cols[x] for _, x in tiles]
        assert top == max(0, min(ys) - halo) and bottom == min(size[0], max(ys) + 16 + halo)
        assert left == max(0, min(xs) - halo) and right == min(size[1], max(xs) + 16 + halo)
        for y, x in tiles:
            assert dirty[y, x] and not covered[y, x]
            covered[y, x] = True
    np.testing.assert_array_equal(covered, dirty)                      # every changed tile, once


@pytest.mark.parametrize("offset", [0, 3, 7, 10])
def test_a_patch_no_taller_than_a_band_is_one_region_wherever_it_lies(offset):
    """The tiles around the view or a stroke, wherever they lie, are computed as one region with one halo and shown
    as one part, not split at a fixed band boundary into two regions that each compute the halo."""
    geometry = tiled_labels._Geometry((256, 256), (4096, 4096), reach=160, tile=64)
    dirty = np.zeros(geometry.shape, bool)
    band_tiles = max(4 * 176, 8 * 64) // 64               # at most four halos of 176 px
    top = band_tiles * 2 + offset                          # straddling a multiple of the band for most offsets
    dirty[top : top + 7, 30:37] = True                     # a 448 x 448 px view
    regions = tiled_labels._regions(dirty, geometry, 176, 5, (8, 16))
    assert len(regions) == 1
    (region_top, region_bottom, _, _), tiles = regions[0]
    assert (region_top, region_bottom) == (top * 64 - 176, (top + 7) * 64 + 176) and len(tiles) == 49


def test_margins_stored_at_half_size_are_never_above_the_margin():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(size=20000) * 10.0 ** rng.integers(-9, 4, 20000),
                             [0.0, 1e-30, -1e-30, 6.1e-5, 65504.0, 1e6, np.inf]]).astype(np.float32)
    half = tiled_labels._half_below(torch.from_numpy(values)).astype(np.float32)
    assert np.all(half <= values)
    finite = np.abs(values) < 60000
    nearest = values[finite].astype(np.float16).astype(np.float32)
    steps = np.abs(np.spacing(values[finite].astype(np.float16))).astype(np.float32)
    assert np.all(half[finite] >= nearest - 4 * steps)          # at most a few float16 steps below
    assert half[-1] == np.inf


def test_bounds_over_some_tiles_equal_those_over_all_tiles():
    rng = np.random.default_rng(4)
    for _ in range(5):
        h, w = (int(v) for v in rng.integers(10, 60, 2))
        geometry = tiled_labels._Geometry((h, w), (h * 7, w * 5), int(rng.integers(0, 40)), tile=16)
        coarse = rng.normal(size=(h, w, 3)).astype(np.float32)
        ty, tx = geometry.shape
        y0, x0 = int(rng.integers(0, ty)), int(rng.integers(0, tx))
        within = (y0, int(rng.integers(y0 + 1, ty + 1)), x0, int(rng.integers(x0 + 1, tx + 1)))
        for how in ("min", "max"):
            np.testing.assert_array_equal(geometry.reduce(coarse, how, within),
                                          geometry.reduce(coarse, how)[within[0] : within[1], within[2] : within[3]])


def test_bounds_over_each_tile_cover_every_coarse_pixel_its_labels_can_depend_on():
    """Each tile's bound is the min / max over a window of the largest size anchored where its own window starts."""
    rng = np.random.default_rng(11)
    for case in range(40):
        h, w = (int(v) for v in rng.integers(2, 50, 2))
        size = (int(h * rng.uniform(1, 9)), int(w * rng.uniform(1, 9)))
        reach = int(rng.integers(0, 60))
        geometry = tiled_labels._Geometry((h, w), size, reach, tile=int(rng.choice([8, 16, 64])))
        coarse = rng.normal(size=(h, w, 2)).astype(np.float32)
        if case % 4 == 0:
            coarse[rng.integers(0, h), rng.integers(0, w)] = np.inf
        if case % 3 == 0:
            coarse = rng.integers(0, 4, (h, w)).astype(np.int64)
        spans = [min(int((last - first).max()) + 1, n) for (first, last), n in
                 ((geometry.row_window, h), (geometry.col_window, w))]
        for how, reducer in (("min", np.min), ("max", np.max)):
            bounds = geometry.reduce(coarse, how)
            assert bounds.shape[:2] == geometry.shape and bounds.dtype == coarse.dtype
            for ty, tx in zip(rng.integers(0, geometry.shape[0], 6), rng.integers(0, geometry.shape[1], 6)):
                # the rows and columns the tile's pixels (and those within reach) take their values from
                rows, cols = geometry.tile_slices(ty, tx)
                top, bottom = max(rows.start - reach, 0), min(rows.stop + reach, size[0]) - 1
                left, right = max(cols.start - reach, 0), min(cols.stop + reach, size[1]) - 1
                first_y, last_y = geometry.rows[0][top], geometry.rows[1][bottom]
                first_x, last_x = geometry.cols[0][left], geometry.cols[1][right]
                assert first_y >= 0 and last_y < h and first_x >= 0 and last_x < w
                y0, x0 = min(first_y, h - spans[0]), min(first_x, w - spans[1])
                window = coarse[y0 : y0 + spans[0], x0 : x0 + spans[1]]
                assert y0 <= first_y and last_y < y0 + spans[0] and x0 <= first_x and last_x < x0 + spans[1]
                np.testing.assert_array_equal(bounds[ty, tx], reducer(window, axis=(0, 1)))


def test_bounds_over_windows_of_many_coarse_pixels_are_taken_over_whole_blocks_that_cover_them():
    """Scores at the output size (native resolution): windows span hundreds of coarse pixels, and each bound is the
    min / max over the largest window in whole blocks, anchored at the block where the tile's window starts: a
    superset of what the tile's labels depend on."""
    rng = np.random.default_rng(12)
    for case in range(30):
        h, w = (int(v) for v in rng.integers(40, 400, 2))
        reach, tile = int(rng.integers(0, 200)), int(rng.choice([16, 64]))
        geometry = tiled_labels._Geometry((h, w), (h, w), reach, tile=tile)
        coarse = rng.normal(size=(h, w, 2)).astype(np.float32) if case % 2 else rng.integers(0, 5, (h, w))
        windows = []
        for (first, last), n in ((geometry.row_window, h), (geometry.col_window, w)):
            span = min(int((last - first).max()) + 1, n)
            block = tiled_labels.bound_block(span)
            blocks = -(-n // block)
            span_blocks = min(int((last // block - first // block).max()) + 1, blocks)
            windows.append((first, last, block, span_blocks, blocks))
        assert max(window[2] for window in windows) >= (4 if min(h, w) > 150 and reach > 100 else 1)
        for how, reducer in (("min", np.min), ("max", np.max)):
            bounds = geometry.reduce(coarse, how)
            assert bounds.shape[:2] == geometry.shape and bounds.dtype == coarse.dtype
            for ty, tx in zip(rng.integers(0, geometry.shape[0], 6), rng.integers(0, geometry.shape[1], 6)):
                cut = []
                for index, (first, last, block, span_blocks, blocks) in zip((ty, tx), windows):
                    start = min(first[index] // block, blocks - span_blocks) * block
                    stop = (min(first[index] // block, blocks - span_blocks) + span_blocks) * block
                    assert start <= first[index] and last[index] < stop      # covers the tile's window
                    cut.append(slice(start, stop))
                np.testing.assert_array_equal(bounds[ty, tx], reducer(coarse[cut[0], cut[1]], axis=(0, 1)))


@pytest.mark.parametrize("seed", range(3))
def test_runs_with_scores_at_the_output_size_give_every_label_of_a_full_computation(seed):
    """Native resolution (no resize; bounds over whole blocks), snapping's reach of dozens of pixels: first runs and
    re-runs after a local change equal a full computation."""
    rng = np.random.default_rng(300 + seed)
    for _ in range(3):
        h, w = (int(v) for v in rng.integers(250, 400, 2))
        queries = int(rng.integers(2, 5))
        scores = smooth_scores(rng, queries, h, w, int(rng.integers(80, 120)))
        spans, names = [(i, i + 1) for i in range(queries)], [(f"q{i}",) for i in range(queries)]
        guide = torch.from_numpy(rng.normal(size=(3, h, w)).astype(np.float32))
        snap = (int(rng.integers(2, 5)), (2, int(rng.integers(6, 12)))) if rng.random() < 0.7 else ()
        tile = int(rng.choice([16, 32]))
        first = labels_of(scores, guide, (h, w), spans, names, snap, tile=tile)
        np.testing.assert_array_equal(first.labels, labels_of(scores, guide, (h, w), spans, names, snap, dense=True,
                                                              tile=tile).labels)
        assert first.computed < 1.0                                   # tiles of one class throughout were skipped
        changed = scores.clone()
        y, x = int(rng.integers(0, h - 30)), int(rng.integers(0, w - 30))
        changed[int(rng.integers(0, queries)), y : y + 30, x : x + 30] += 0.05
        second = labels_of(changed, guide, (h, w), spans, names, snap, first, tile=tile)
        np.testing.assert_array_equal(second.labels, labels_of(changed, guide, (h, w), spans, names, snap,
                                                               dense=True, tile=tile).labels)


def test_the_leading_query_is_the_first_highest_as_argmax_gives_it():
    rng = np.random.default_rng(3)
    for _ in range(50):
        scores = torch.from_numpy(rng.integers(0, 3, (int(rng.integers(1, 7)), 17, 23)).astype(np.float32))
        scores[:, 0, :4] = float("nan") if rng.random() < 0.3 else scores[:, 0, :4]
        np.testing.assert_array_equal(tiled_labels.leading_query(scores), scores.argmax(0).numpy())


def test_labels_kept_compact_are_int32_when_read_and_what_a_caller_does_to_them_never_reaches_the_next_run():
    """Labels-only results hold the kept state's compact labels read-only and make int32 labels when read: a
    caller writing into ``labels`` (as pasting strokes does) must not change what the next run starts from."""
    from napari_clearclip.results import SegmentationResult

    segmenter = Segmenter("synthetic-tiny", device="cpu", disk_cache=False)
    image = make_scene(3, size=160).image
    classes = ["red", "green", "blue", "yellow", "background"]
    first = segmenter.segment(image, classes, maps=False, refine="pamr")
    stored = first.stored_labels()
    assert stored.dtype == np.uint8 and not stored.flags.writeable
    with pytest.raises(ValueError):
        stored[0, 0] = 1
    labels = first.labels
    assert labels.dtype == np.int32 and labels.flags.writeable
    np.testing.assert_array_equal(labels, stored)
    expected = labels.copy()
    labels[:] = 0                                       # a caller's own use of its result
    assert first.labels is labels and (first.stored_labels() == 0).all()
    again = segmenter.segment(image, classes, maps=False, refine="pamr")
    np.testing.assert_array_equal(again.labels, expected)
    strokes = np.zeros(image.shape[:2], np.int32)
    strokes[40:48, 40:48] = 2
    taught = segmenter.segment(image, classes, maps=False, refine="pamr", strokes=strokes)
    pasted = taught.stored_labels()
    assert pasted.dtype == np.uint8 and not pasted.flags.writeable and (pasted[40:48, 40:48] == 2).all()
    assert taught.labels.dtype == np.int32 and (taught.labels[40:48, 40:48] == 2).all()   # strokes are pasted
    unpainted = segmenter.segment(image, classes, maps=False, refine="pamr")     # the paste stayed in its result
    np.testing.assert_array_equal(unpainted.labels, expected)
    kept = np.ones((6, 5), np.uint8)                                     # a kept state's labels, pasted on
    result = SegmentationResult(None, None, None, ["a", "b"])
    result.keep_compact_labels(kept)
    painted = np.zeros((6, 5), np.int32)
    painted[2, 3] = 2
    result.paste(painted)
    assert (kept == 1).all() and result.stored_labels().dtype == np.uint8 and result.stored_labels()[2, 3] == 2
    assert result.labels.sum() == 31
    fresh = Segmenter("synthetic-tiny", device="cpu", disk_cache=False)
    np.testing.assert_array_equal(
        taught.labels, fresh.segment(image, classes, maps=False, refine="pamr", strokes=strokes).labels)


def test_a_view_first_rerun_of_a_large_scene_equals_a_fresh_run(demo, monkeypatch):
    """A 890 x 900 scene, strokes one after another, ResCLIP with snapping, a point or a view to show first: the
    tiles there, then the others in many regions (each with its own queries), give a fresh run's labels."""
    rng = np.random.default_rng(323)
    size = int(rng.choice([320, 480, 640, 900]))
    image = make_scene(int(rng.integers(0, 10**6)), size=size, objects=(2, int(rng.integers(3, 9)))).image
    image = image[: int(size * rng.uniform(0.6, 1))]
    method = str(rng.choice(["clearclip", "clearclip", "maskclip", "sclip", "naclip", "resclip", "vanilla"]))
    monkeypatch.setattr(tiled_labels, "FOCUS_SIDE", int(rng.choice([64, 128, 384])))
    classes = ["red", "green", "blue", "yellow", "background"]
    strokes = np.zeros(image.shape[:2], np.int32)
    demo.method = method
    try:
        for _ in range(3):
            strokes = np.maximum(strokes, scene_strokes(rng, image.shape[:2], len(classes), 1))
            height, width = image.shape[:2]
            if rng.random() < 0.5:
                focus = (float(rng.uniform(0, height)), float(rng.uniform(0, width)))
            else:
                top, left = float(rng.uniform(0, height)), float(rng.uniform(0, width))
                focus = (top, top + float(rng.uniform(10, height)), left, left + float(rng.uniform(10, width)))
            options = dict(maps=False, refine="pamr", strokes=strokes)
            fast = demo.segment(image, classes, focus=focus, **options)
            monkeypatch.setattr(tiled_labels, "SKIPPING", False)
            full = Segmenter.segment(demo, image, classes, **options)
            monkeypatch.setattr(tiled_labels, "SKIPPING", True)
            np.testing.assert_array_equal(fast.labels, full.labels)
    finally:
        demo.method = "clearclip"


def test_tiles_stored_from_a_box_hold_its_values_and_the_labels_each_holds():
    """Storing a region's labels tile by tile, in one copy or one gather per array: the same values and the same
    labels present per tile as a loop over the tiles, for boxes of every tile, of some, and cut by the image's edge."""
    rng = np.random.default_rng(11)
    cases = 0
    for trial in range(40):
        height, width = int(rng.integers(100, 700)), int(rng.integers(100, 700))
        tile = int(rng.choice([8, 16, 64]))
        geometry = tiled_labels._Geometry((20, 20), (height, width), 5, tile)
        rows, cols = geometry.shape
        chosen = rng.random((rows, cols)) < (1.0 if trial % 3 == 0 else 0.4)
        y0, y1 = sorted(int(v) for v in rng.integers(0, rows, 2))
        x0, x1 = sorted(int(v) for v in rng.integers(0, cols, 2))
        tiles = [(int(y), int(x)) for y, x in np.argwhere(chosen) if y0 <= y <= y1 and x0 <= x <= x1]
        if not tiles:
            continue
        box = tiled_labels._TilesBox(tiles, geometry)
        classes = int(rng.integers(1, 40))
        block = rng.integers(0, classes + 1, box.shape).astype(np.uint8)
        if trial % 2:   # a few labels in large patches: most tiles hold one
            block = np.kron(rng.integers(0, classes + 1, (-(-box.shape[0] // 50), -(-box.shape[1] // 50))),
                            np.ones((50, 50), int))[: box.shape[0], : box.shape[1]].astype(np.uint8)
        values = rng.random(box.shape).astype(np.float32)
        labels, stored = np.zeros((height, width), np.uint8), np.zeros((height, width), np.float32)
        present = np.zeros((rows, cols, classes + 1), bool)
        box.store(present, block, ((labels, block), (stored, values), (None, values)))
        expected_labels, expected_values = np.zeros_like(labels), np.zeros_like(stored)
        expected_present = np.zeros_like(present)
        for y, x in tiles:
            r, c = geometry.tile_slices(y, x)
            inner = (slice(r.start - box.top, r.stop - box.top), slice(c.start - box.left, c.stop - box.left))
            expected_labels[r, c], expected_values[r, c] = block[inner], values[inner]
            expected_present[y, x] = np.bincount(block[inner].ravel(), minlength=classes + 1) > 0
        np.testing.assert_array_equal(labels, expected_labels)
        np.testing.assert_array_equal(stored, expected_values)
        np.testing.assert_array_equal(present, expected_present)
        cases += 1
    assert cases >= 30


def test_labels_a_result_still_holds_are_never_written_by_a_later_run():
    """A replaced state's labels are reused only where no result reads them: a result kept while strokes re-run keeps
    its labels, those of a fresh segmenter's run."""
    from napari_clearclip import Segmenter
    from napari_clearclip.demo.scenes import make_scene

    scene = make_scene(4, size=160, objects=(4, 4))
    classes = ["red", "green", "blue", "yellow", "background"]
    segmenter = Segmenter("synthetic-tiny", device="cpu", disk_cache=False)
    kept = segmenter.segment(scene.image, classes, refine="pamr", maps=False)     # held, its labels not yet read
    painted = np.zeros(scene.image.shape[:2], np.int32)
    painted[20:140, 20:140] = 5                       # a large stroke: most labels change
    changed = segmenter.segment(scene.image, classes, refine="pamr", maps=False, strokes=painted).labels
    painted[60:70, 60:70] = 2
    segmenter.segment(scene.image, classes, refine="pamr", maps=False, strokes=painted)
    expected = Segmenter("synthetic-tiny", device="cpu", disk_cache=False).segment(
        scene.image, classes, refine="pamr", maps=False).labels
    assert (expected != changed).mean() > 0.05        # the later runs' labels differ from the first's
    np.testing.assert_array_equal(kept.labels, expected)


def test_a_replaced_states_arrays_are_reused_by_the_next_run_and_the_labels_do_not_change(monkeypatch):
    """A segmenter keeps the margins and winners' values of the state a run replaced, and the next stroke's run copies
    into them: the same labels as runs that allocate afresh, stroke after stroke; a state something else still holds
    is left whole, and a state emptied that way starts the next run afresh."""
    from napari_clearclip import Segmenter
    from napari_clearclip.demo.scenes import make_scene

    scene = make_scene(4, size=160, objects=(4, 4))
    classes = ["red", "green", "blue", "yellow", "background"]
    rng = np.random.default_rng(3)
    strokes = []
    painted = np.zeros(scene.image.shape[:2], np.int32)
    for _ in range(4):
        y, x = (int(v) for v in rng.integers(10, 140, 2))
        painted[y : y + 6, x : x + 12] = int(rng.integers(1, 6))
        strokes.append(painted.copy())

    def runs(pooled: bool):
        segmenter = Segmenter("synthetic-tiny", device="cpu", disk_cache=False)
        taken, labels_taken = [], []
        if not pooled:
            monkeypatch.setattr(segmenter._spare_label_arrays, "donate", lambda *a, **k: False)
        real_take = segmenter._spare_label_arrays.take

        def take(shape, dtype, written_whole=False):
            spares = {id(a) for a in segmenter._spare_label_arrays._arrays.values()}
            array = real_take(shape, dtype, written_whole)
            taken.append(id(array) in spares)
            labels_taken.append(id(array) in spares and np.dtype(dtype).kind == "u")
            return array
        monkeypatch.setattr(segmenter._spare_label_arrays, "take", take)
        out = [segmenter.segment(scene.image, classes, refine="pamr", maps=False).labels]
        out += [segmenter.segment(scene.image, classes, refine="pamr", maps=False, strokes=s).labels for s in strokes]
        return out, (taken, labels_taken), segmenter

    pooled, (taken, labels_taken), segmenter = runs(True)
    plain, (plain_taken, _), _ = runs(False)
    assert sum(taken) >= 4 and not any(plain_taken)   # later runs copied into the replaced state's arrays
    assert sum(labels_taken) >= 2                     # the labels too, where no result held them
    for a, b in zip(pooled, plain):
        np.testing.assert_array_equal(a, b)
    # a state held elsewhere (as a run in flight holds the one it started from) is not emptied
    (key, (held, _)), = segmenter._label_states._items.items()
    margins, winners = held.margins.copy(), held.winners.copy()
    segmenter.segment(scene.image, classes, refine="pamr", maps=False, strokes=np.zeros_like(painted))
    np.testing.assert_array_equal(held.margins, margins)
    np.testing.assert_array_equal(held.winners, winners)
    # a state emptied by the pool seeds nothing: the run starts afresh, with the labels of a fresh segmenter
    (_, (latest, _)), = segmenter._label_states._items.items()
    latest.labels = latest.margins = latest.winners = None
    fresh = Segmenter("synthetic-tiny", device="cpu", disk_cache=False)
    expected = fresh.segment(scene.image, classes, refine="pamr", maps=False, strokes=strokes[-1]).labels
    np.testing.assert_array_equal(
        segmenter.segment(scene.image, classes, refine="pamr", maps=False, strokes=strokes[-1]).labels, expected)
