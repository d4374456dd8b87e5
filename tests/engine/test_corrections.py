"""Corrections that teach: strokes as exemplars, and PAMR edge snapping against a loop-based reference."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from napari_clearclip import Segmenter
from napari_clearclip.demo.scenes import look_alike_squares, make_scene
from napari_clearclip.errors import InvalidOptionError
from napari_clearclip.refine import pamr


def reference_pamr(scores: np.ndarray, guide: np.ndarray, iterations: int, dilations) -> np.ndarray:
    """PAMR written out pixel by pixel, from its definition (Araslanov & Roth, CVPR 2020)."""
    channels, height, width = guide.shape

    def at(array, y, x):  # replicate padding
        return array[:, min(max(y, 0), height - 1), min(max(x, 0), width - 1)]

    neighbours = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    weights = np.zeros((len(dilations) * 8, height, width))
    offsets = [(dy * d, dx * d) for d in dilations for dy, dx in neighbours]
    for y in range(height):
        for x in range(width):
            window = [at(guide, y + dy * d, x + dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
            std = np.std(np.stack(window), axis=0, ddof=1)                        # per channel
            logits = []
            for oy, ox in offsets:
                diff = np.abs(guide[:, y, x] - at(guide, y + oy, x + ox))
                logits.append(np.mean(-diff / (1e-8 + 0.1 * std)))
            logits = np.array(logits)
            e = np.exp(logits - logits.max())
            weights[:, y, x] = e / e.sum()
    current = scores.astype(np.float64)
    for _ in range(iterations):
        new = np.zeros_like(current)
        for y in range(height):
            for x in range(width):
                for n, (oy, ox) in enumerate(offsets):
                    new[:, y, x] += weights[n, y, x] * at(current, y + oy, x + ox)
        current = new
    return current


def test_pamr_matches_the_loop_reference():
    rng = np.random.default_rng(0)
    guide = rng.normal(size=(3, 13, 11)).astype(np.float32)
    guide[:, :, 6:] += 2.0                                   # an edge to snap to
    scores = rng.normal(size=(4, 13, 11)).astype(np.float32) * 0.1
    for iterations, dilations in ((10, (8, 16)), (3, (1, 2)), (1, (1,)), (2, (3, 1, 3))):  # a dilation twice too
        got = pamr(torch.from_numpy(scores), torch.from_numpy(guide), iterations, dilations).numpy()
        expected = reference_pamr(scores, guide, iterations, dilations)
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_pamr_averaged_a_few_rows_at_a_time_gives_the_values_of_whole_planes_bit_for_bit(monkeypatch):
    """On the CPU the neighbours are summed over blocks of rows that stay in the cache, every iteration following
    the one before down the image as soon as the rows it reads are ready; neither the blocks nor that order may
    change a bit (the labels of a re-run are checked against a run from scratch)."""
    import napari_clearclip.refine as refine

    rng = np.random.default_rng(3)
    guide = torch.from_numpy(rng.normal(size=(3, 61, 47)).astype(np.float32))
    guide[:, 30:] += 2.0
    scores = torch.from_numpy(rng.normal(size=(3, 61, 47)).astype(np.float32))
    for iterations, dilations in ((4, (1, 3)), (10, (1, 2)), (3, (5,))):
        monkeypatch.setattr(refine, "AVERAGED_AT_ONCE_BYTES", 1 << 40)    # whole planes, one iteration at a time
        whole = pamr(scores, guide, iterations, dilations).numpy()
        np.testing.assert_allclose(whole, reference_pamr(scores.numpy(), guide.numpy(), iterations, dilations),
                                   atol=1e-5)
        for rows in (1, 2, 7, 20):  # the iterations advance together down the rows, a block of ``rows`` at a time
            monkeypatch.setattr(refine, "AVERAGED_AT_ONCE_BYTES", rows * 3 * 47 * 4)
            np.testing.assert_array_equal(pamr(scores, guide, iterations, dilations).numpy(), whole)
    small_guide, small_scores = guide[:, :13, :11].contiguous(), scores[:, :13, :11].contiguous()
    np.testing.assert_allclose(pamr(small_scores, small_guide, 3, (1, 2)).numpy(),
                               reference_pamr(small_scores.numpy(), small_guide.numpy(), 3, (1, 2)), atol=1e-5)


def test_snapping_weights_computed_a_few_rows_at_a_time_are_those_of_whole_planes_bit_for_bit(monkeypatch):
    """The weights are computed over blocks of rows that stay in the cache; every block reads the guide's rows
    around it (and the repeated border at the image's edges), so no block size may change a bit, and the weights
    stay those of the loop reference."""
    import napari_clearclip.refine as refine

    rng = np.random.default_rng(11)
    guide = torch.from_numpy(rng.normal(size=(3, 53, 41)).astype(np.float32))
    guide[:, 20:, 17:] += 3.0
    for dilations in ((8, 16), (1, 3), (2, 2, 5)):
        monkeypatch.setattr(refine, "AFFINITIES_AT_ONCE_BYTES", 1 << 40)    # all the rows at once
        whole = refine.pamr_affinities(guide, dilations)
        for rows in (1, 2, 7, 16, 52):
            width = 41 + 2 * max(dilations)
            monkeypatch.setattr(refine, "AFFINITIES_AT_ONCE_BYTES", rows * 4 * 8 * len(dilations) * width)
            got = refine.pamr_affinities(guide, dilations)
            assert torch.equal(got, whole), (dilations, rows)
        scores = torch.from_numpy(rng.normal(size=(2, 53, 41)).astype(np.float32))
        np.testing.assert_allclose(pamr(scores, guide, 2, dilations).numpy(),
                                   reference_pamr(scores.numpy(), guide.numpy(), 2, dilations), atol=1e-5)


def test_classes_resized_and_snapped_together_get_the_values_each_gets_alone():
    """Classes competing over the same region are resized and snapped as one stack (the weights read once for
    all); each must get the very values it gets alone, or labels would depend on which classes compete where."""
    from napari_clearclip.refine import _finish, _refine_whole
    from napari_clearclip.tiled_labels import bilinear_taps, upsample

    rng = np.random.default_rng(5)
    coarse = torch.from_numpy(rng.normal(size=(4, 9, 13)).astype(np.float32))
    taps = bilinear_taps(9, 150), bilinear_taps(13, 211)
    together = upsample(coarse, *taps)
    for q in range(4):
        np.testing.assert_array_equal(upsample(coarse[q : q + 1], *taps)[0].numpy(), together[q].numpy())
    guide = torch.from_numpy(rng.normal(size=(3, 150, 211)).astype(np.float32))

    def snap(values):
        steps = _refine_whole(values, guide, 3, (2, 5))
        for _ in range(3):
            next(steps)
        return _finish(steps)
    snapped = snap(together)
    for q in range(4):
        np.testing.assert_array_equal(snap(together[q : q + 1])[0].numpy(), snapped[q].numpy())


def test_edge_snapping_stays_on_the_device_of_its_inputs():
    """Every buffer follows the guide's device (PyTorch's meta device stands in for a GPU here)."""
    from napari_clearclip.refine import pamr_affinities

    guide = torch.empty((3, 20, 24), device="meta")
    assert pamr_affinities(guide, (1, 2)).device.type == "meta"
    assert pamr(torch.empty((2, 20, 24), device="meta"), guide, 3, (1, 2)).device.type == "meta"


def two_blobs(colour_a=(40, 70, 215), colour_b=(215, 35, 35)):
    image = np.full((128, 192, 3), 128, np.uint8)
    image[20:60, 20:60] = colour_a          # object 1
    image[70:110, 130:170] = colour_a       # object 2, same kind, far away
    image[70:110, 20:60] = colour_b         # something else
    return image


def test_pamr_option_is_pamr_on_the_full_size_scores_guided_by_the_image(tiny_segmenter, rgb_image):
    import torch.nn.functional as F

    from napari_clearclip.image import prepare

    plain = tiny_segmenter.segment(rgb_image, ["a", "b"])
    snapped = tiny_segmenter.segment(rgb_image, ["a", "b"], refine="pamr")
    size = rgb_image.shape[:2]
    model = tiny_segmenter.model
    guide = F.interpolate(prepare(rgb_image, model.mean, model.std, 448)[None], size=size, mode="bilinear",
                          align_corners=False)[0]
    refined = pamr(torch.from_numpy(plain.similarity), guide, 10, (8, 16))
    expected = torch.softmax(refined * 50.0, dim=0).numpy()
    np.testing.assert_allclose(snapped.probabilities, expected, atol=1e-4)
    assert (snapped.labels == expected.argmax(0) + 1).mean() >= 0.999
    assert not np.array_equal(snapped.labels, plain.labels)


def test_snapping_follows_the_objects_edges_on_the_demo_scenes():
    from napari_clearclip.demo.scenes import DEMO_CLASSES, held_out_scenes

    demo = Segmenter("synthetic-tiny", device="cpu")
    classes = DEMO_CLASSES.split("\n")
    accuracy = {}
    for refine in (None, "pamr"):
        right = total = 0
        for scene in held_out_scenes(4, sizes=(192, 256)):
            truth = scene.label_image(tuple(classes[:4]))
            truth[truth == 0] = 5                               # background is the fifth class
            labels = demo.segment(scene.image, classes, refine=refine, maps=False).labels
            right, total = right + int((labels == truth).sum()), total + truth.size
        accuracy[refine] = right / total
    assert accuracy["pamr"] > accuracy[None] + 0.01, accuracy   # snapping puts the boundaries on the edges


def test_bad_refine_options_are_refused(tiny_segmenter, rgb_image):
    with pytest.raises(InvalidOptionError, match="refine='crf'"):
        tiny_segmenter.segment(rgb_image, ["a"], refine="crf")
    with pytest.raises(InvalidOptionError, match="pamr_dilations"):
        tiny_segmenter.segment(rgb_image, ["a"], refine="pamr", pamr_dilations=(0,))


@pytest.mark.parametrize("strokes, message", [
    (np.zeros((5, 5), np.int32), "do not match"),
    (np.zeros((128, 192), np.float32), "integer array"),
    (np.full((128, 192), 4, np.int32), "only 0 .no hint. to 3"),
    (np.full((128, 192), -1, np.int32), "only 0"),
])
def test_bad_scribbles_are_refused(tiny_segmenter, strokes, message):
    with pytest.raises(ValueError, match=message):
        tiny_segmenter.segment(two_blobs(), ["a", "b", "c"], strokes=strokes)


def test_painted_pixels_keep_their_class_and_features_are_reused(tiny_checkpoint, monkeypatch):
    segmenter = Segmenter("test-tiny", tiny_checkpoint, device="cpu")
    image = two_blobs()
    segmenter.segment(image, ["a", "b"])
    import napari_clearclip.segmenter as engine

    monkeypatch.setattr(engine, "encode_dense", lambda *a, **k: pytest.fail("features should come from the cache"))
    strokes = np.zeros(image.shape[:2], np.int32)
    strokes[30:35, 30:35] = 2
    strokes[0:3, 0:3] = 1
    result = segmenter.segment(image, ["a", "b"], strokes=strokes)
    assert np.all(result.labels[30:35, 30:35] == 2) and np.all(result.labels[0:3, 0:3] == 1)
    import napari_clearclip.strokes as strokes_module

    monkeypatch.setattr(strokes_module.FeatureStats, "add", lambda *a: pytest.fail("the whitening should be kept"))
    strokes[60:64, 60:64] = 2
    again = segmenter.segment(image, ["a", "b"], strokes=strokes)                 # another stroke: only scoring
    assert np.all(again.labels[60:64, 60:64] == 2)


@pytest.fixture(scope="module")
def demo():
    return Segmenter("synthetic-tiny", device="cpu")


def shapes_scene():
    """Grey with two blue squares far apart and a red one; "debris" is a word the demo model never learnt."""
    return look_alike_squares()


@pytest.fixture(scope="module", params=["synthetic-tiny", "synthetic-tiny-b"])
def either_model(request, second_model_options):
    """The demo model, on which the exemplar strength was chosen, and a second one that played no part in it."""
    if request.param == "synthetic-tiny":
        return Segmenter("synthetic-tiny", device="cpu"), "debris"
    return Segmenter(**second_model_options), "dust"   # a word this model does not place on blue either


def test_a_stroke_on_one_blue_object_turns_the_other_blue_object_too(either_model):
    demo, word = either_model
    image, truth = shapes_scene()
    classes = [word, "red", "background"]           # the text alone does not call the blue squares that
    before = demo.segment(image, classes, maps=False).labels
    other = (slice(128, 160), slice(128, 160))                      # inside the unpainted blue square
    assert np.mean(before[other] == 1) < 0.5                         # the text alone does not find it
    strokes = np.zeros(truth.shape, np.int32)
    strokes[44:52, 44:52] = 1                                        # one small stroke on the first square
    after = demo.segment(image, classes, strokes=strokes, maps=False).labels
    assert np.mean(after[other] == 1) > 0.9                          # the other square follows the stroke
    assert np.all(after[44:52, 44:52] == 1)
    unlike = truth != 1                                              # red square and background: unlike the stroke
    kept = np.mean(after[unlike] == before[unlike])
    assert kept > 0.97          # the target, on the model the settings were chosen on and on the held-out one


def test_with_edge_snapping_a_stroke_turns_the_other_blue_object_and_keeps_the_grey_around_both(either_model):
    """Snapping averages scores through the uniform grey: a taught lead as large as the bonus spread a stroke's
    class far into it (synthetic-tiny-b kept 94.2% of the unlike pixels with "dust"), hence the cap."""
    demo, word = either_model
    image, truth = shapes_scene()
    classes = [word, "red", "background"]
    before = demo.segment(image, classes, maps=False, refine="pamr").labels
    strokes = np.zeros(truth.shape, np.int32)
    strokes[44:52, 44:52] = 1
    after = demo.segment(image, classes, strokes=strokes, maps=False, refine="pamr").labels
    assert np.mean(after[128:160, 128:160] == 1) > 0.9
    unlike = truth != 1
    assert np.mean(after[unlike] == before[unlike]) > 0.97


def test_the_snapped_lead_cap_holds_on_the_model_held_out_from_choosing_it(small_models):
    """synthetic-tiny-c played no part in choosing the cap: with snapping, a "junk" stroke kept 98.8% of the unlike
    pixels before it and 98.9% with it, and the carried exemplars of the widget still teach as strokes do."""
    segmenter = Segmenter(**small_models("synthetic-tiny-c"))
    image, truth = shapes_scene()
    classes = ["junk", "red", "background"]
    before = segmenter.segment(image, classes, maps=False, refine="pamr").labels
    strokes = np.zeros(truth.shape, np.int32)
    strokes[44:52, 44:52] = 1
    after = segmenter.segment(image, classes, strokes=strokes, maps=False, refine="pamr").labels
    assert np.mean(after[128:160, 128:160] == 1) > 0.9
    unlike = truth != 1
    assert np.mean(after[unlike] == before[unlike]) > 0.97
    carried = segmenter.segment(image, classes, maps=False, refine="pamr",
                                exemplars=segmenter.collect_exemplars(image, strokes, classes)).labels
    np.testing.assert_array_equal(carried[strokes == 0], after[strokes == 0])


def window_features(grid, content: torch.Tensor, added: torch.Tensor) -> torch.Tensor:
    """(windows, P, E): each window's patches hold the image patch they see plus what their position adds."""
    rows, cols = grid.patch_grid
    return torch.stack([content[y1 // grid.patch[0]: y1 // grid.patch[0] + rows,
                                x1 // grid.patch[1]: x1 // grid.patch[1] + cols].reshape(rows * cols, -1) + added
                        for y1, _, x1, _ in grid.windows]).float()


def test_what_window_positions_add_is_measured_free_of_what_the_image_holds():
    from napari_clearclip.strokes import FeatureStats
    from napari_clearclip.windows import WindowGrid

    grid = WindowGrid(64, 64, 32, 16, (8, 8))                  # 3 x 3 windows of 4 x 4 patches, half overlapping
    added = torch.zeros(16, 6, dtype=torch.float64)
    added[0, 2] = 4.0                                          # the first position of every window: a part of its own
    estimates, naive = [], []
    for seed in (1, 2):                                        # two images, the same positions
        content = torch.from_numpy(np.random.default_rng(seed).normal(size=(8, 8, 6)) * 3)
        stats = FeatureStats()
        features = window_features(grid, content, added)
        stats.add(grid, grid.windows[:4], features[:4])        # in batches, as windows are encoded
        stats.add(grid, grid.windows[4:], features[4:])
        estimates.append(stats.position_offsets)
        naive.append(features.double().mean(0) - features.double().mean((0, 1)))  # position's mean less the image's
    np.testing.assert_allclose(estimates[0].numpy(), estimates[1].numpy(), atol=1e-5)
    assert float((naive[0] - naive[1]).norm(dim=-1).max()) > 1.0  # that one holds what the image holds too
    offsets = estimates[0].double()
    assert int(offsets.norm(dim=-1).argmax()) == 0
    assert float(torch.nn.functional.cosine_similarity(offsets[0], added[0], dim=0)) > 0.9999
    assert 2.0 < float(offsets[0].norm()) <= 4.0
    # an image one window covers gives nothing to take off
    alone = WindowGrid(32, 32, 32, 16, (8, 8))
    stats = FeatureStats()
    stats.add(alone, alone.windows, window_features(alone, torch.ones(4, 4, 6, dtype=torch.float64), added))
    assert float(stats.position_offsets.abs().max()) == 0.0


def test_a_window_shifted_off_the_patch_grid_is_left_out_of_what_positions_add():
    from napari_clearclip.strokes import FeatureStats
    from napari_clearclip.windows import WindowGrid

    grid = WindowGrid(64, 68, 32, 16, (8, 8))                  # the last column of windows starts at x = 36
    assert any(x1 % 8 for _, _, x1, _ in grid.windows)
    rng = np.random.default_rng(4)
    features = torch.from_numpy(rng.normal(size=(len(grid.windows), 16, 6))).float()
    everything, on_grid = FeatureStats(), FeatureStats()
    everything.add(grid, grid.windows, features)
    keep = [i for i, (_, _, x1, _) in enumerate(grid.windows) if x1 % 8 == 0]
    on_grid.add(grid, [grid.windows[i] for i in keep], features[keep])
    np.testing.assert_array_equal(everything.position_offsets.numpy(), on_grid.position_offsets.numpy())


def test_patch_sums_too_large_for_memory_go_to_a_temporary_file_with_the_same_offsets(monkeypatch, tmp_path):
    """An image too large to hold, taught tile by tile, sums every patch over the windows that see it: above
    SUMS_IN_MEMORY_BYTES in a file of the cache folder (unnamed: nothing is left behind), with the very offsets."""
    import napari_clearclip.strokes as strokes
    from napari_clearclip.windows import WindowGrid

    monkeypatch.setenv("NAPARI_CLEARCLIP_CACHE_DIR", str(tmp_path))
    grid = WindowGrid(96, 80, 32, 16, (8, 8))
    rng = np.random.default_rng(7)
    features = torch.from_numpy(rng.normal(size=(len(grid.windows), 16, 6))).float()
    import tempfile

    opened = []
    temporary_file = tempfile.TemporaryFile
    monkeypatch.setattr(tempfile, "TemporaryFile", lambda **kw: opened.append(kw["dir"]) or temporary_file(**kw))
    offsets = []
    for limit in (1 << 30, 0):
        monkeypatch.setattr(strokes, "SUMS_IN_MEMORY_BYTES", limit)
        stats = strokes.FeatureStats()
        stats.add(grid, grid.windows[:5], features[:5])
        stats.add(grid, grid.windows[5:], features[5:])
        assert opened == ([] if limit else [tmp_path])
        offsets.append(stats.position_offsets.numpy())
    np.testing.assert_array_equal(offsets[0], offsets[1])
    assert float(np.abs(offsets[0]).max()) > 0
    assert list(tmp_path.iterdir()) == []


def test_a_patch_that_is_mostly_its_positions_part_is_not_made_alike_by_taking_it_off():
    from napari_clearclip.strokes import Exemplars

    identity = (torch.zeros(3), torch.eye(3))                   # whitening that changes nothing
    offsets = torch.tensor([[0.0, 0.0, 0.0], [0.0, 2.0, 0.0]])  # position 1 adds (0, 2, 0)
    exemplars = Exemplars(torch.tensor([[1.0, 0.0, 1.0]]), torch.tensor([0]), 2, positions=torch.tensor([0]))
    exemplars = exemplars.centred(offsets).whitened(identity)
    exemplars.position_offsets = offsets
    patches = torch.tensor([[[1.0, 0.0, 0.9],                   # at position 0, alike to the exemplar
                             [1.0, 2.0, 0.0]]])                 # at position 1: mostly that position's part
    centred_cosine = float(torch.nn.functional.cosine_similarity(patches[0, 1] - offsets[1],
                                                                 torch.tensor([1.0, 0.0, 1.0]), dim=0))
    assert centred_cosine > 0.7                                 # alike, once shortened to (1, 0, 0)
    bonus = exemplars.bonus(patches, alpha=0.3)
    assert float(bonus[0, 0, 0]) > 0.2 and float(bonus[0, 1, 0]) == 0.0
    assert float(bonus[..., 1].abs().max()) == 0.0


def test_strokes_compare_patches_without_what_their_window_position_adds(small_models, monkeypatch):
    """synthetic-tiny-c gives the patches at some positions of every window a part of their own that grey and
    blue share there: with snapping, one "debris" stroke on a blue square turned 8.7% of the grey before patches
    and strokes were compared without it."""
    from napari_clearclip import strokes as strokes_module

    image, truth = shapes_scene()
    classes = ["debris", "red", "background"]
    strokes = np.zeros(truth.shape, np.int32)
    strokes[44:52, 44:52] = 1
    unlike = truth != 1
    kept = {}
    for centring in (False, True):
        monkeypatch.setattr(strokes_module, "CENTRE_WINDOW_POSITIONS", centring)
        segmenter = Segmenter(**small_models("synthetic-tiny-c"))
        before = segmenter.segment(image, classes, maps=False, refine="pamr").labels
        after = segmenter.segment(image, classes, strokes=strokes, maps=False, refine="pamr").labels
        assert np.mean(after[128:160, 128:160] == 1) > 0.9     # the other blue square follows either way
        kept[centring] = np.mean(after[unlike] == before[unlike])
    assert kept[False] < 0.95 and kept[True] > 0.97
    carried = segmenter.segment(image, classes, maps=False, refine="pamr",   # the widget's carried exemplars
                                exemplars=segmenter.collect_exemplars(image, strokes, classes)).labels
    np.testing.assert_array_equal(carried[strokes == 0], after[strokes == 0])


def test_a_capped_lead_changes_no_patchs_leader_and_leaves_untaught_patches_alone():
    from napari_clearclip.strokes import Exemplars, FeatureStats

    rng = np.random.default_rng(11)
    patches = torch.from_numpy(rng.normal(size=(3, 40, 8)).astype(np.float32)) + 2.0
    stats = FeatureStats()
    stats.add(None, None, patches)
    whitening = stats.whitening("cpu")
    text = torch.from_numpy(rng.normal(size=(5, 8)).astype(np.float32))
    query_classes = torch.tensor([0, 0, 1, 2, 3])                              # class 0 has two synonyms
    exemplars = Exemplars(patches[0, :6].clone(), torch.tensor([0, 0, 1, 1, 2, 2]), 4)
    plain = exemplars.for_image(whitening, text)
    capped = exemplars.for_image(whitening, text, snapping=True)
    for copy in (plain, capped):
        copy.query_classes = query_classes
    assert plain.lead_cap is None and capped.lead_cap > 0
    logits = patches @ text.T * 0.05
    taught, limited = plain.teach(logits, patches), capped.teach(logits, patches)
    bonus = plain.bonus(patches)[..., query_classes]
    np.testing.assert_allclose(taught.numpy(), (logits + bonus).numpy(), rtol=0, atol=1e-6)
    for b, p in np.ndindex(3, 40):                                               # a reference, patch by patch
        per_class = [max(float(taught[b, p, q]) for q in range(5) if query_classes[q] == k) for k in range(4)]
        for q in range(5):
            k = int(query_classes[q])
            if float(bonus[b, p, q]) == 0:
                assert float(limited[b, p, q]) == float(logits[b, p, q])      # untaught: its text score, exactly
                continue
            best_other = max(v for j, v in enumerate(per_class) if j != k)
            expected = min(float(taught[b, p, q]), max(float(logits[b, p, q]), best_other + capped.lead_cap))
            assert float(limited[b, p, q]) == pytest.approx(expected, abs=1e-6)
        leaders = [int(query_classes[int(t.argmax())]) for t in (taught[b, p], limited[b, p])]
        assert leaders[0] == leaders[1]
    assert (limited < taught - 1e-4).any() and (bonus > 0).any()              # some leads were cut
    # a lesson (exemplars from other images, with their covariance) keeps its whole bonus, alone or beside strokes
    lesson = Exemplars(patches[1, :6].clone(), torch.tensor([0, 1, 1, 2, 3, 3]), 4, covariance=stats.covariance,
                       images=1)
    alone = lesson.for_image(whitening, text, snapping=True)
    alone.query_classes = query_classes
    np.testing.assert_array_equal(alone.teach(logits, patches).numpy(),
                                  (logits + alone.bonus(patches)[..., query_classes]).numpy())
    both = Exemplars.combine([exemplars, lesson]).for_image(whitening, text, snapping=True)
    both.query_classes = query_classes
    np.testing.assert_allclose(both.teach(logits, patches).numpy(),
                               torch.maximum(limited, logits + alone.bonus(patches)[..., query_classes]).numpy(),
                               rtol=0, atol=1e-6)


def test_strokes_with_edge_snapping_reach_the_object_edges(demo):
    image, truth = shapes_scene()
    classes = ["debris", "red", "background"]
    strokes = np.zeros(truth.shape, np.int32)
    strokes[44:52, 44:52] = 1
    plain = demo.segment(image, classes, strokes=strokes, maps=False).labels
    snapped = demo.segment(image, classes, strokes=strokes, maps=False, refine="pamr").labels
    assert np.mean(snapped == truth) >= np.mean(plain == truth)
    assert np.mean(snapped == truth) > 0.95


def test_strokes_on_one_slice_teach_every_slice_of_a_stack(demo):
    from napari_clearclip.planes import ImageLayout, segment_planes
    from napari_clearclip.segmenter import run_to_end

    image, truth = shapes_scene()
    stack = np.stack([image, np.ascontiguousarray(image[::-1, ::-1])])      # slice 2: the scene turned around
    layout = ImageLayout(stack.shape, rgb=True)
    classes = ["debris", "red", "background"]
    strokes = np.zeros(layout.label_shape, np.int32)
    strokes[0, 44:52, 44:52] = 1                                           # one stroke, on slice 1 only
    strokes[0, 0:4, 0:4] = 3
    results = dict(run_to_end(segment_planes(demo, stack, layout, [(0,), (1,)], classes, strokes=strokes,
                                             maps=False)))
    turned = truth[::-1, ::-1] == 1
    alone = demo.segment(stack[1], classes, maps=False).labels
    assert np.mean(alone[turned] == 1) < 0.5                                # the text alone misses them
    assert np.mean(results[(1,)].labels[turned] == 1) > 0.9                # blue squares of the unpainted slice
    became_debris = (results[(1,)].labels == 1) & (alone != 1)
    assert np.mean(became_debris[~turned]) < 0.03                           # nothing unlike the stroke follows it
    assert np.all(results[(0,)].labels[44:52, 44:52] == 1) and np.all(results[(0,)].labels[0:4, 0:4] == 3)
    with pytest.raises(ValueError, match="labels' shape"):
        run_to_end(segment_planes(demo, stack, layout, [(0,)], classes, strokes=strokes[0]))
    with pytest.raises(ValueError, match="only 0"):
        run_to_end(segment_planes(demo, stack, layout, [(0,)], classes, strokes=strokes * 2))


def test_painted_pixels_become_hints_for_the_new_class_list():
    from napari_clearclip.annotate import LayerRequest, painted_strokes
    from napari_clearclip.planes import ImageLayout

    baseline = np.array([[[1, 1, 2, 2], [3, 3, 1, 1]]], np.int32)         # one slice; classes a, b, c
    current = baseline.copy()
    current[0, 0, 0] = 3        # painted c
    current[0, 0, 2] = 0        # erased
    current[0, 1, 0] = 2        # painted b, a class the new list drops
    current[0, 1, 2] = 7        # a label of the user's own
    edited = np.zeros_like(baseline, bool)
    edited[0, 0, 1] = True      # painted a in an earlier round, as the model now also says
    request = LayerRequest(data=None, layout=ImageLayout(baseline.shape), planes=[(0,)], classes=["c", "a"],
                           options={}, current=current, baseline=baseline, baseline_names=["a", "b", "c"],
                           edited=edited)
    hints = painted_strokes(request, ["c", "a"])
    expected = np.zeros((2, 4), np.int32)
    expected[0, 0] = 1          # c is class 1 now
    expected[0, 1] = 2          # a is class 2 now: earlier strokes still teach
    np.testing.assert_array_equal(hints[(0,)], expected)
    request.current = baseline.copy()
    request.edited = None
    assert painted_strokes(request, ["c", "a"]) == {}                       # nothing painted, no hints


@pytest.mark.parametrize("seed", range(4))
def test_strokes_found_in_blocks_of_rows_are_those_a_whole_plane_comparison_finds(seed):
    """Painted rows are found a block of rows at a time: strokes in any block, on the blocks' edges, in earlier
    rounds or not, give the hints a comparison of the whole plane gives."""
    from napari_clearclip.annotate import LayerRequest, painted_strokes
    from napari_clearclip.planes import ImageLayout

    rng = np.random.default_rng(seed)
    shape = (2, 700, 2048) if seed % 2 else (1100, 1024)      # blocks of 512 and 1024 rows
    planes = [(0,), (1,)] if seed % 2 else [()]
    baseline = rng.integers(1, 4, shape).astype(np.uint8)
    current = baseline.copy()
    rows = rng.choice(shape[-2], 6, replace=False)
    rows[:2] = (511, 512) if seed % 2 else (1023, 1024)       # both sides of a block's edge
    for row in rows:
        cols = rng.integers(0, shape[-1], 20)
        current[..., row, cols] = rng.integers(0, 5, 20).astype(np.uint8)   # 4: a label of the user's own
    edited = (rng.random(shape) < 2e-6) if seed < 2 else None
    request = LayerRequest(data=None, layout=ImageLayout(shape), planes=planes, classes=["c", "a", "b"], options={},
                           current=current, baseline=baseline, baseline_names=["a", "b", "c"], edited=edited)
    hints = painted_strokes(request, ["c", "a", "b"])
    lookup = np.array([0, 2, 3, 1, 0])                        # a, b, c -> 2, 3, 1; 0 and 4 are no hint
    for plane in planes:
        painted = current[plane] != baseline[plane]
        if edited is not None:
            painted |= edited[plane]
        expected = np.where(painted, lookup[current[plane]], 0)
        if expected.any():
            np.testing.assert_array_equal(hints[plane], expected)
        else:
            assert plane not in hints


def test_pixels_of_each_class_are_counted_per_cell_as_one_count_per_pixel_would():
    from napari_clearclip.strokes import class_counts_per_cell

    rng = np.random.default_rng(8)
    for case in range(60):
        height, width = (int(v) for v in rng.integers(1, 90, 2))
        cells = (int(rng.integers(1, height + 1)), int(rng.integers(1, 2 * width + 1)))   # fewer rows, any columns
        n_classes = int(rng.integers(1, 6))
        strokes = np.zeros((height, width), np.uint8 if case % 2 else np.int32)
        for _ in range(int(rng.integers(0, 4))):                    # a few filled boxes and scattered dabs
            y, x = int(rng.integers(0, height)), int(rng.integers(0, width))
            strokes[y : y + int(rng.integers(1, 40)), x : x + int(rng.integers(1, 40))] = rng.integers(1, n_classes + 1)
        strokes[rng.random((height, width)) < 0.02] = rng.integers(0, n_classes + 1)
        expected = np.zeros((n_classes + 1, *cells), np.int64)
        for y, x in zip(*np.nonzero(strokes)):
            expected[strokes[y, x], y * cells[0] // height, x * cells[1] // width] += 1
        np.testing.assert_array_equal(class_counts_per_cell(strokes, n_classes, cells), expected)


def test_a_filled_region_keeps_an_even_sample_of_exemplars(tiny_segmenter, monkeypatch):
    import napari_clearclip.strokes as strokes
    from napari_clearclip.strokes import thinned

    classes = torch.tensor([0] * 50 + [1] * 5 + [0] * 50)
    features = torch.arange(len(classes), dtype=torch.float32)[:, None].repeat(1, 4)
    kept, kept_classes = thinned(features, classes, limit=20)
    assert (kept_classes == 0).sum() == 20 and (kept_classes == 1).sum() == 5      # small classes stay whole
    again, _ = thinned(features, classes, limit=20)
    assert torch.equal(kept, again)                                                  # the same on every run
    assert kept[:, 0].min() < 20 and kept[:, 0].max() > 60                           # drawn from the whole fill
    image = two_blobs()
    fill = np.zeros(image.shape[:2], np.int32)
    fill[:, :96] = 1                                                                 # the bucket over half the image
    fill[60:64, 150:154] = 2                                                         # and a small stroke
    monkeypatch.setattr(strokes, "MAX_EXEMPLARS_PER_CLASS", 100)
    exemplars = tiny_segmenter.collect_exemplars(image, fill, ["a", "b"], short_side=None, crop=32, stride=8)
    assert (exemplars.classes == 0).sum() == 100 and 0 < (exemplars.classes == 1).sum() < 100
    result = tiny_segmenter.segment(image, ["a", "b"], strokes=fill, short_side=None, crop=32, stride=8)
    assert np.all(result.labels[fill == 1] == 1) and np.all(result.labels[fill == 2] == 2)


def test_exemplar_bonus_is_the_whitened_cosine_to_the_nearest_exemplar():
    from napari_clearclip.strokes import FeatureStats, Exemplars, comparison_norms

    rng = np.random.default_rng(3)
    patches = torch.from_numpy(rng.normal(size=(2, 50, 6)).astype(np.float32)) + 3.0    # a large common part
    stats = FeatureStats()
    stats.add(None, None, patches)
    whitening = stats.whitening("cpu")
    exemplars = Exemplars(patches[0, :5].clone(), torch.tensor([0, 0, 1, 1, 1]), 3).whitened(whitening)
    mean, transform = (t.double() for t in whitening)

    def white(x):
        x = (x.double() - mean) @ transform
        return x / x.norm(dim=-1, keepdim=True)

    sims = white(patches) @ white(exemplars.features).T                                  # (2, 50, 5)
    expected = torch.zeros(2, 50, 3, dtype=torch.float64)
    for k, nearest in ((0, sims[..., :2].amax(-1)), (1, sims[..., 2:].amax(-1))):
        expected[..., k] = 0.3 * ((nearest - 0.55) / 0.45).clamp(min=0)                # unlike patches: exactly nothing
    assert (expected[..., :2] == 0).any() and (expected[..., :2] > 0).any()
    got = exemplars.bonus(patches)
    kept_norms = exemplars.bonus(patches, comparison_norms(patches, whitening))
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(kept_norms.numpy(), expected.numpy(), atol=1e-5)
    assert float(got[0, 0, 0]) == pytest.approx(0.3, abs=1e-5)                          # an exemplar matches itself


def test_edge_snapping_reports_progress_and_can_be_stopped(tiny_segmenter, monkeypatch):
    image = two_blobs()
    steps = list(tiny_segmenter.segment_steps(image, ["a", "b"], refine="pamr", pamr_iterations=4))
    edges = [s for s in steps if s.stage == "edges"]
    assert [s.done for s in edges] == [0, 1, 2, 3, 4] and edges[-1].message == "snapping to edges: 4/4"
    fractions = [s.fraction for s in steps if s.stage != "text"]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert max(f for s, f in zip([s for s in steps if s.stage != "text"], fractions) if s.stage == "windows") <= 0.5
    import napari_clearclip.refine as refine

    rounds = []                                              # rows averaged, in whole iterations
    real = refine._average_rows
    monkeypatch.setattr(refine, "_average_rows",
                        lambda *a, **k: rounds.append((a[7] - a[6]) / image.shape[0]) or real(*a, **k))
    run = tiny_segmenter.segment_steps(image, ["a", "b"], refine="pamr", pamr_iterations=10)
    for step in run:
        if step.stage == "edges" and step.done == 2:
            run.close()                                      # cancelled while snapping
            break
    assert sum(rounds) == 2                                  # 2 of 10 iterations, then nothing more


def test_pamr_in_bands_equals_pamr_at_once(monkeypatch):
    import napari_clearclip.refine as refine

    rng = np.random.default_rng(1)
    guide = torch.from_numpy(rng.normal(size=(3, 97, 40)).astype(np.float32))
    guide[:, 50:] += 2.0
    scores = torch.from_numpy(rng.normal(size=(4, 97, 40)).astype(np.float32))
    whole = pamr(scores, guide, 3, (1, 2))
    for rows in (10, 31, 96):
        np.testing.assert_allclose(pamr(scores, guide, 3, (1, 2), band_rows=rows).numpy(), whole.numpy(), atol=1e-6)
    monkeypatch.setattr(refine, "PAMR_MEMORY_BYTES", 40 * refine._bytes_per_row(40, 4, 3, (1, 2)))
    steps = list(refine.pamr_steps(scores, guide, 3, (1, 2)))           # too big for memory: bands by themselves
    assert steps[-1][0] == steps[-1][1] and steps[-1][1] > 3


def test_the_old_name_scribbles_still_works_and_says_it_is_now_strokes(tiny_segmenter, rgb_image):
    strokes = np.zeros(rgb_image.shape[:2], np.int32)
    strokes[40:50, 60:70] = 2
    with pytest.warns(DeprecationWarning, match="now called strokes="):
        old = tiny_segmenter.segment(rgb_image, ["a", "b"], scribbles=strokes)
    new = tiny_segmenter.segment(rgb_image, ["a", "b"], strokes=strokes)
    np.testing.assert_array_equal(old.labels, new.labels)
    assert (new.labels[40:50, 60:70] == 2).all()


@pytest.mark.parametrize("seed", range(6))
def test_snapping_in_bands_gives_the_labels_of_snapping_the_whole_image(seed):
    """Large images are snapped and labelled a band of rows at a time (the full-size scores never exist):
    the labels equal those of one band, whatever the band size, classes, synonyms or threshold."""
    from napari_clearclip.prompts import ClassQuery
    from napari_clearclip.progress import run_to_end
    from napari_clearclip.refine import _bytes_per_row
    from napari_clearclip.scoring import snapped_postprocess_steps

    rng = np.random.default_rng(seed)
    height, width = int(rng.integers(90, 160)), int(rng.integers(60, 140))
    classes = [ClassQuery("a", ("a", "b")), ClassQuery("c", ("c",)), ClassQuery("d", ("d",))][: int(rng.integers(2, 4))]
    queries = sum(len(c.synonyms) for c in classes)
    small = (int(rng.integers(20, 50)), int(rng.integers(20, 50)))
    scores = torch.from_numpy(rng.normal(0, 0.05, (queries, *small)).astype(np.float32))
    guide = torch.from_numpy(rng.normal(0, 1, (3, *small)).astype(np.float32))
    iterations, dilations = int(rng.integers(1, 4)), (1, int(rng.integers(2, 5)))
    threshold = float(rng.choice([0.0, 0.5]))
    args = ((height, width), classes, 50.0, threshold, "clearclip", True, iterations, dilations)
    whole = run_to_end(snapped_postprocess_steps(scores, guide, *args, budget=1 << 40))
    rows = int(rng.integers(1, 6)) * max(dilations) * (iterations + 1)          # a few margins: several bands
    banded = run_to_end(snapped_postprocess_steps(scores, guide, *args,
                                                  budget=rows * _bytes_per_row(width, queries, 3, dilations)))
    np.testing.assert_allclose(banded.probabilities, whole.probabilities, atol=1e-5)
    assert (banded.labels == whole.labels).mean() >= 0.999
    near_tie = np.sort(whole.probabilities, axis=0)
    margin = near_tie[-1] - near_tie[-2]
    assert np.array_equal(banded.labels[margin > 1e-4], whole.labels[margin > 1e-4])   # equal except at near-ties


def test_a_thin_stroke_on_a_large_image_still_teaches():
    """At 2048 px the demo model sees one pixel per 8: a 3-pixel stroke must still mark the patches it crosses."""
    from napari_clearclip.demo.scenes import make_scene

    segmenter = Segmenter("synthetic-tiny", device="cpu", disk_cache=False)
    image = np.kron(make_scene(4, size=256, objects=(3, 3)).image, np.ones((8, 8, 1), np.uint8))
    strokes = np.zeros(image.shape[:2], np.int32)
    strokes[1001:1004, 500:1500] = 2                         # 3 rows: 1001 is not a multiple of 8
    exemplars = segmenter.collect_exemplars(image, strokes, ["red", "green", "blue", "yellow", "background"])
    assert exemplars is not None and len(exemplars.features) >= 8
    assert set(exemplars.classes.tolist()) == {1}


def test_the_exemplar_strength_is_measured_on_the_image_from_its_text_score_spread():
    """An exact match adds EXEMPLAR_SPREADS times how much text cosines vary across the image's patches."""
    from napari_clearclip.strokes import EXEMPLAR_SPREADS, FeatureStats, image_strength

    rng = np.random.default_rng(5)
    text = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(3, 8))), dim=-1).float()
    for scale in (1.0, 0.05):                               # a backbone whose cosines spread twenty times less
        patches = torch.from_numpy(rng.normal(size=(4, 500, 8)) * scale + 1.0).float()
        stats = FeatureStats()
        stats.add(None, None, patches)
        flat = patches.reshape(-1, 8).double()
        spread = np.mean([float((flat @ t.double()).std(unbiased=False)) for t in text])   # measured directly
        assert image_strength(text, stats.whitening("cpu")) == pytest.approx(EXEMPLAR_SPREADS * spread, rel=2e-3)


def test_a_first_run_with_snapping_prepares_the_image_once_and_snaps_as_a_cached_run_does(monkeypatch):
    """Encoding and edge snapping follow the same normalised image: a first run prepares it once (on a
    4096 x 4096 image each preparation is 0.15 s), and labels as a run on cached features does."""
    from napari_clearclip import segmenter as segmenter_module

    image = make_scene(31, size=192, objects=(3, 3)).image
    classes = ["red", "green", "blue", "yellow", "background"]
    reference = Segmenter("synthetic-tiny", device="cpu", disk_cache=False, feature_store=False)
    reference.segment(image, classes, maps=False)                           # features cached, no guide yet
    expected = reference.segment(image, classes, maps=False, refine="pamr").labels
    calls = []
    for name in ("prepare", "prepare_with_intensities"):
        monkeypatch.setattr(segmenter_module, name, counted(getattr(segmenter_module, name), calls))
    fresh = Segmenter("synthetic-tiny", device="cpu", disk_cache=False, feature_store=False)  # encodes
    got = fresh.segment(image, classes, maps=False, refine="pamr").labels
    assert len(calls) == 1
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("seed", range(10))
def test_painted_pixels_are_pasted_as_a_full_scan_would(seed):
    from napari_clearclip.strokes import paste_strokes

    rng = np.random.default_rng(seed)
    strokes = np.zeros((int(rng.integers(1, 300)), int(rng.integers(1, 300))), np.uint16)
    for _ in range(int(rng.integers(0, 6))):
        y, x = int(rng.integers(0, strokes.shape[0])), int(rng.integers(0, strokes.shape[1]))
        strokes[y : y + int(rng.integers(1, 12)), x : x + int(rng.integers(1, 40))] = int(rng.integers(1, 5))
    labels = rng.integers(0, 5, strokes.shape).astype(np.int32 if seed % 2 else np.uint8)
    expected = labels.copy()
    expected[strokes > 0] = strokes[strokes > 0]
    paste_strokes(labels, strokes)
    np.testing.assert_array_equal(labels, expected)


@pytest.mark.parametrize("name", ["synthetic-tiny-b", "synthetic-tiny-c"])
def test_strokes_carried_as_exemplars_teach_their_own_plane_as_strokes_and_other_planes_as_a_lesson(small_models,
                                                                                                     name):
    """The widget and stacks collect each plane's strokes as exemplars with their plane's covariance and carry them
    to every plane. On the plane painted they must teach exactly as ``strokes=`` does (whitened with the plane's
    own statistics, the setting held to a stroke's safety), not as another image's exemplars (regularised more)."""
    from napari_clearclip.demo.scenes import DEMO_CLASSES
    from napari_clearclip.planes import ImageLayout, segment_planes
    from napari_clearclip.progress import run_to_end

    segmenter = Segmenter(**small_models(name))
    classes = DEMO_CLASSES.split("\n")
    rng = np.random.default_rng(11)
    for seed in (3, 8, 21):
        stack = np.stack([make_scene(seed, size=192).image, make_scene(seed + 100, size=192).image])
        strokes = np.zeros(stack.shape[:3], np.int32)
        for _ in range(4):                                   # a few dabs of random classes on the first plane
            y, x = (int(v) for v in rng.integers(10, 180, 2))
            strokes[0, y - 4 : y + 4, x - 4 : x + 4] = int(rng.integers(1, len(classes) + 1))
        own = segmenter.segment(stack[0], classes, strokes=strokes[0], maps=False).labels
        lesson = segmenter.make_lesson(classes, [(stack[0], strokes[0])])
        elsewhere = segmenter.segment(stack[1], classes, lesson=lesson, maps=False).labels
        results = dict(run_to_end(segment_planes(segmenter, stack, ImageLayout(stack.shape, rgb=True), [(0,), (1,)], classes,
                                                 strokes=strokes, maps=False)))
        np.testing.assert_array_equal(results[(0,)].labels, own)
        np.testing.assert_array_equal(results[(1,)].labels, elsewhere)
        carried = segmenter.segment(stack[0], classes, maps=False,
                                    exemplars=segmenter.collect_exemplars(stack[0], strokes[0], classes)).labels
        painted = strokes[0] > 0
        np.testing.assert_array_equal(carried[~painted], own[~painted])


def test_the_widgets_run_after_strokes_equals_strokes_given_to_the_engine_beside_a_lesson(small_models):
    """What the widget runs (edits on the result layer become strokes, collected as exemplars and combined with the
    lessons of other images) labels the image exactly as ``segment(strokes=, lesson=)`` does."""
    from napari_clearclip.annotate import LayerRequest, segment_layer
    from napari_clearclip.demo.scenes import DEMO_CLASSES
    from napari_clearclip.planes import ImageLayout
    from napari_clearclip.progress import run_to_end

    segmenter = Segmenter(**small_models("synthetic-tiny-b"))
    classes = DEMO_CLASSES.split("\n")
    image, elsewhere = make_scene(5, size=192).image, make_scene(6, size=192).image
    painted_elsewhere = np.zeros(elsewhere.shape[:2], np.int32)
    painted_elsewhere[90:100, 20:40] = 5
    lesson = segmenter.make_lesson(classes, [(elsewhere, painted_elsewhere)])
    baseline = segmenter.segment(image, classes, maps=False).labels.astype(np.uint8)
    strokes = np.zeros(baseline.shape, np.int32)
    strokes[30:38, 40:60], strokes[150:156, 100:130] = 3, 5
    current = baseline.copy()
    current[strokes > 0] = strokes[strokes > 0]
    layout = ImageLayout(image.shape, rgb=True)
    request = LayerRequest(image, layout, layout.planes(), classes, {}, current=current, baseline=baseline,
                           baseline_names=classes, learn_from_edits=True, lessons=[lesson],
                           found={(): current.copy()})
    update = run_to_end(segment_layer(segmenter, request)).update
    (plane,) = update.planes
    merged = plane.labels
    changed = np.where(current != baseline, current, 0)     # a stroke of the class already shown changes nothing
    assert changed.any()
    expected = segmenter.segment(image, classes, maps=False, strokes=changed, lesson=lesson).labels
    np.testing.assert_array_equal(merged, expected)


def _two_class_space(seed: int = 5):
    """Patches, their whitening, and text for classes object (0) and background (1): one query each."""
    from napari_clearclip.strokes import FeatureStats

    rng = np.random.default_rng(seed)
    patches = torch.from_numpy(rng.normal(size=(3, 60, 8)).astype(np.float32)) + 1.0
    stats = FeatureStats()
    stats.add(None, None, patches)
    text = torch.from_numpy(rng.normal(size=(3, 8)).astype(np.float32))
    return patches, stats.whitening("cpu"), text


def test_a_class_painted_in_two_places_that_still_trails_there_is_raised_on_every_patch():
    """Two background strokes, each on a patch the text gives to the object and unlike the other: the text
    under-scores background on this image, so background rises everywhere, also on patches unlike any stroke.
    A class painted once (a word the text may not know) is not raised: it stays on what it painted."""
    from napari_clearclip.strokes import Exemplars

    patches, whitening, text = _two_class_space()
    logits = patches @ text.T                      # classes object 0, background 1, debris 2
    flat = patches.reshape(-1, 8)
    lead = (logits[..., 0] - logits[..., 1]).reshape(-1)
    query_classes = torch.tensor([0, 1, 2])
    candidates = torch.nonzero((lead > 0) & (logits.reshape(-1, 3)[:, 0] > logits.reshape(-1, 3)[:, 2])).flatten()
    first, second = int(candidates[0]), int(candidates[-1])
    painted = flat[[first, second, int(torch.argmax(lead))]].clone()

    def taught(classes, strokes):
        exemplars = Exemplars(painted, torch.tensor(classes), 3, strokes=torch.tensor(strokes))
        copy = exemplars.for_image(whitening, text, query_classes=query_classes, logit_scale=50.0)
        return copy, copy.teach(logits, patches)

    copy, scores = taught([1, 1, 0], [1, 2, 3])
    untaught = copy.bonus(patches).amax(-1) == 0
    offsets = copy._stroke_offsets
    assert offsets is not None and offsets[1] > offsets[0] and offsets[1] > offsets[2]
    np.testing.assert_allclose(scores[untaught].numpy(), (logits + offsets[query_classes])[untaught].numpy(),
                               rtol=0, atol=1e-6)
    before, after = logits.argmax(-1), scores.argmax(-1)
    assert ((before == 0) & (after == 1) & untaught).any()          # background won patches no stroke is like
    assert not ((after == 2) & (before != 2)).any()

    # one stroke of background (both patches painted at once) and one of object: nothing says the text errs
    copy, scores = taught([1, 1, 0], [1, 1, 2])
    assert copy._stroke_offsets is None
    untaught = copy.bonus(patches).amax(-1) == 0
    np.testing.assert_array_equal(scores[untaught].numpy(), logits[untaught].numpy())

    # debris painted once beside two background strokes: debris is not raised, and wins no patch it did not
    copy, scores = taught([1, 1, 2], [1, 2, 3])
    assert copy._stroke_offsets[2] < copy._stroke_offsets[1]
    untaught = copy.bonus(patches).amax(-1) == 0
    assert not ((scores.argmax(-1) == 2) & (logits.argmax(-1) != 2) & untaught).any()


def test_a_change_within_reach_moves_a_boundary_by_a_patch_and_removes_no_region():
    from napari_clearclip.strokes import within_reach

    rows = cols = 6
    before = torch.zeros(1, rows * cols, 3)                      # queries: object, background, background again
    inside = torch.zeros(rows, cols, dtype=torch.bool)
    inside[1:5, 1:5] = True                                      # a 4 x 4 object in background
    before[0, inside.flatten(), 0] = 0.5
    before[0, ~inside.flatten(), 1] = 0.5
    after = before + torch.tensor([0.0, 1.0, 1.0])               # background raised beyond the object's lead
    assert bool((after[0].argmax(-1) != 0).all())                # on its own, the object would vanish
    got = within_reach(before, after, torch.tensor([0, 1, 1]), 2, (rows, cols), 1)
    ring = inside.clone()
    ring[2:4, 2:4] = False
    labels = got[0].argmax(-1).reshape(rows, cols)
    assert bool((labels[ring] != 0).all()) and bool((labels[2:4, 2:4] == 0).all())   # eroded by one patch
    kept = torch.zeros(rows, cols, dtype=torch.bool)
    kept[2:4, 2:4] = True                                        # only where the object's class would be lost
    np.testing.assert_array_equal(got[0][kept.flatten()].numpy(), before[0][kept.flatten()].numpy())
    np.testing.assert_array_equal(got[0][(~kept).flatten()].numpy(), after[0][(~kept).flatten()].numpy())
    wide = within_reach(before, after, torch.tensor([0, 1, 1]), 2, (rows, cols), 2)
    assert bool((wide[0].argmax(-1) != 0).all())                 # two patches of reach take the whole object


def test_a_taught_lead_beside_another_class_is_cut_to_a_few_times_that_neighbours_margin():
    from napari_clearclip.strokes import balanced_edges

    rng = np.random.default_rng(5)
    rows, cols, margins = 6, 7, 3.0
    query_classes = torch.tensor([0, 0, 1, 2])                   # class 0 has two synonyms
    cut_somewhere = False
    for _ in range(20):
        text = torch.from_numpy(rng.normal(0, 0.05, (2, rows * cols, 4)).astype(np.float32))
        boosted = torch.from_numpy(rng.random((2, rows * cols, 4)) < 0.3)
        taught = text + boosted * torch.from_numpy(rng.uniform(0, 0.5, (2, rows * cols, 4)).astype(np.float32))
        got = balanced_edges(text, taught, boosted, query_classes, 3, (rows, cols), margins)
        for b, y, x in np.ndindex(2, rows, cols):                # a reference, patch by patch
            p = y * cols + x

            def best(scores, patch, k, b=b):
                return max(float(scores[b, patch, q]) for q in range(4) if query_classes[q] == k)

            per_class = [best(taught, p, k) for k in range(3)]
            leader = int(np.argmax(per_class))
            lead = per_class[leader] - max(v for k, v in enumerate(per_class) if k != leader)
            margins_near = []
            for dy, dx in np.ndindex(3, 3):
                ny, nx = y + dy - 1, x + dx - 1
                if (dy, dx) == (1, 1) or not (0 <= ny < rows and 0 <= nx < cols):
                    continue
                near = [best(taught, ny * cols + nx, k) for k in range(3)]
                if int(np.argmax(near)) != leader:
                    margins_near.append(max(near) - near[leader])
            text_class = [best(text, p, k) for k in range(3)]
            text_lead = text_class[leader] - max(v for k, v in enumerate(text_class) if k != leader)
            expected = taught[b, p].clone()
            taught_leader = bool(boosted[b, p][query_classes == leader].any())
            if taught_leader and margins_near:
                allowed = max(margins * max(min(margins_near), 0.0), text_lead, 1e-6)
                excess = max(lead - allowed, 0.0)
                expected[query_classes == leader] -= excess
                cut_somewhere |= excess > 1e-4
            np.testing.assert_allclose(got[b, p].numpy(), expected.numpy(), rtol=0, atol=1e-6)
            got_class = [best(got, p, k) for k in range(3)]
            assert int(np.argmax(got_class)) == leader               # no patch changes class
    assert cut_somewhere


@pytest.mark.parametrize("model, word", [("synthetic-tiny-c", "debris"), ("synthetic-tiny-d", "junk")])
def test_a_stroke_of_a_new_word_leaves_no_ring_around_the_objects_it_turns(small_models, monkeypatch, model, word):
    """Without snapping, the taught class ran 2-3 px past both blue squares' edges into the grey, where the text
    barely prefers background over the new word: 96.1% of the unlike pixels kept on synthetic-tiny-c, 96.9% on
    synthetic-tiny-d (which played no part in choosing the cut)."""
    from napari_clearclip import strokes as strokes_module

    image, truth = shapes_scene()
    classes = [word, "red", "background"]
    strokes = np.zeros(truth.shape, np.int32)
    strokes[44:52, 44:52] = 1
    unlike = truth != 1
    segmenter = Segmenter(**small_models(model))
    before = segmenter.segment(image, classes, maps=False).labels
    kept = {}
    for margins in (None, strokes_module.EDGE_LEAD_MARGINS):
        monkeypatch.setattr(strokes_module, "EDGE_LEAD_MARGINS", margins)
        after = segmenter.segment(image, classes, strokes=strokes, maps=False).labels
        assert np.mean(after[128:160, 128:160] == 1) > 0.9     # the other blue square follows either way
        kept[margins] = np.mean(after[unlike] == before[unlike])
    assert kept[None] < 0.97 and kept[strokes_module.EDGE_LEAD_MARGINS] > 0.985


def test_a_run_limits_the_strokes_offsets_to_a_patch_of_each_windows_boundaries(monkeypatch):
    from napari_clearclip import strokes as strokes_module
    from napari_clearclip.demo.scenes import DEMO_CLASSES

    classes = DEMO_CLASSES.split("\n")
    layouts = []
    real = strokes_module.within_reach

    def recording(before, after, query_classes, n_classes, layout, reach):
        layouts.append((tuple(layout), reach))
        return real(before, after, query_classes, n_classes, layout, reach)

    monkeypatch.setattr(strokes_module, "within_reach", recording)
    segmenter = Segmenter("synthetic-tiny", device="cpu")
    scene = make_scene(4, size=256)
    strokes = np.zeros(scene.image.shape[:2], np.int32)
    background = len(classes)
    strokes[2:8, 2:8] = background                                 # two separate background strokes: offsets
    strokes[248:254, 248:254] = background
    segmenter.segment(scene.image, classes, strokes=strokes, maps=False)
    assert layouts and set(layouts) == {((8, 8), 1)}              # 64 px windows of 8 px patches
    monkeypatch.setattr(strokes_module, "STROKE_OFFSET_REACH", None)
    layouts.clear()
    segmenter.segment(scene.image, classes, strokes=strokes, maps=False)
    assert not layouts                                             # on every patch, as a lesson's are not
    layouts.clear()
    segmenter.segment(scene.image, classes, strokes=strokes, maps=False, refine="pamr")
    assert not layouts                                             # no stroke offsets before snapping


def test_exemplars_know_which_stroke_they_are_under():
    """Each connected piece of one class's paint is one stroke; a piece of another class touching it is another."""
    segmenter = Segmenter("synthetic-tiny", device="cpu")
    image = make_scene(4, size=256).image
    strokes = np.zeros(image.shape[:2], np.int32)
    strokes[20:40, 20:40] = 1
    strokes[200:220, 200:220] = 1
    strokes[20:40, 40:60] = 2                                    # touches the first piece, another class
    exemplars = segmenter.collect_exemplars(image, strokes, ["red", "background"])
    pieces = {}
    for klass, stroke in zip(exemplars.classes.tolist(), exemplars.strokes.tolist()):
        pieces.setdefault(stroke, set()).add(klass)
    assert len(pieces) == 3 and all(len(classes) == 1 for classes in pieces.values())
    assert sorted(next(iter(c)) for c in pieces.values()) == [0, 0, 1]


def counted(function, calls: list):
    """``function``, noting each call in ``calls``."""
    return lambda *args, **keywords: calls.append(1) or function(*args, **keywords)
