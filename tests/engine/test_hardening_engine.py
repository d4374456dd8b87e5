"""Engine behaviour at the edges: errors in Python's terms, caches that heal, no silent wrong results."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_clearclip import ClearClipError, InvalidClassesError, Segmenter
from napari_clearclip.errors import InvalidOptionError, OutOfMemoryError, WeightsUnavailableError


# -- errors a user can cause, as the matching built-ins ------------------------------------------------

def test_checkpoint_problems_say_what_they_are(tmp_path, tiny_checkpoint):
    with pytest.raises(FileNotFoundError, match="Checkpoint file not found"):
        Segmenter("test-tiny", str(tmp_path / "missing.pt"), device="cpu")
    with pytest.raises(ValueError, match="is a folder, not a checkpoint file"):
        Segmenter("test-tiny", str(tmp_path), device="cpu")
    empty = tmp_path / "empty.pt"
    empty.touch()
    with pytest.raises(ValueError, match=r"is empty \(0 bytes\)"):
        Segmenter("test-tiny", str(empty), device="cpu")


@pytest.mark.parametrize("wrap", [lambda sd: {"model": sd}, lambda sd: {"state_dict": sd, "epoch": 3, "lr": 0.1},
                                  lambda sd: {"model_state_dict": {"module." + k: v for k, v in sd.items()}}])
def test_wrapped_training_checkpoints_load(tmp_path, tiny_checkpoint, rgb_image, wrap):
    state = torch.load(tiny_checkpoint, weights_only=True)
    path = tmp_path / "wrapped.pt"
    torch.save(wrap(state), path)
    wrapped = Segmenter("test-tiny", str(path), device="cpu").segment(rgb_image, ["a", "b"])
    plain = Segmenter("test-tiny", tiny_checkpoint, device="cpu").segment(rgb_image, ["a", "b"])
    np.testing.assert_array_equal(wrapped.labels, plain.labels)


def test_unknown_names_are_value_errors(tiny_checkpoint):
    for kwargs in (dict(model="ViT-Q-99"), dict(model="ViT-B-16", pretrained="opneai"),
                   dict(model="test-tiny", pretrained=tiny_checkpoint, method="clearclop")):
        with pytest.raises(ValueError) as info:
            Segmenter(device="cpu", **kwargs)
        assert isinstance(info.value, ClearClipError)


def test_offline_weights_are_a_connection_error_naming_the_quickgelu_model():
    with pytest.raises(ConnectionError) as info:
        Segmenter("ViT-B-16", "openai", device="cpu")
    assert isinstance(info.value, OSError) and isinstance(info.value, WeightsUnavailableError)
    message = str(info.value)
    assert "Segmenter(model='ViT-B-16-quickgelu', pretrained='/path/to/checkpoint.pt')" in message
    assert info.value.model == "ViT-B-16" and info.value.tag == "openai"


def test_running_out_of_memory_is_a_memory_error_with_advice():
    from napari_clearclip.prompts import ClassQuery
    from napari_clearclip.scoring import postprocess

    scores = torch.zeros((3, 4, 4))
    classes = [ClassQuery(n, (n,)) for n in "abc"]
    with pytest.raises(MemoryError) as info:
        postprocess(scores, (400_000, 400_000), classes, 50.0, 0.0, "clearclip", maps=True)
    assert isinstance(info.value, OutOfMemoryError) and "maps=False" in str(info.value)


@pytest.mark.parametrize("options, message", [
    (dict(prob_threshold=None), "prob_threshold=None must be a number"),
    (dict(prob_threshold="0.5"), "prob_threshold='0.5' must be a number"),
    (dict(logit_scale=float("inf")), "logit_scale=inf must be a finite"),
    (dict(logit_scale=float("nan")), "logit_scale=nan must be a finite"),
    (dict(contrast_limits=(1,)), r"contrast_limits=\(1,\) must be two numbers"),
    (dict(contrast_limits="0 255"), "must be two numbers"),
    (dict(contrast_limits=5), "must be two numbers"),
    (dict(contrast_limits=(0, float("nan"))), "must be finite"),
    (dict(short_side=0), "short_side=0"),
])
def test_bad_options_are_value_errors_with_a_clear_message(tiny_segmenter, rgb_image, options, message):
    with pytest.raises(InvalidOptionError, match=message) as info:
        tiny_segmenter.segment(rgb_image, ["cat"], **options)
    assert isinstance(info.value, ValueError)


def test_unordered_or_one_shot_class_collections_are_refused(tiny_segmenter, rgb_image):
    with pytest.raises(InvalidClassesError, match="no fixed order"):
        tiny_segmenter.segment(rgb_image, {"cat", "dog"})
    with pytest.raises(InvalidClassesError, match="wrap a generator in list"):
        tiny_segmenter.segment(rgb_image, (c for c in ["cat", "dog"]))


def test_missing_image_file_is_a_file_not_found_error(tmp_path):
    from napari_clearclip.batch import read_image

    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "nope.tif")


# -- no silent wrong results ---------------------------------------------------------------------------

def test_huge_float64_pixels_are_rescaled_safely(tiny_segmenter, rgb_image):
    reference = tiny_segmenter.segment(rgb_image.astype(np.float32), ["a", "b"])
    huge = tiny_segmenter.segment(rgb_image.astype(np.float64) * 1e300, ["a", "b"])
    assert np.all(np.isfinite(huge.probabilities))
    np.testing.assert_allclose(huge.probabilities, reference.probabilities, atol=1e-5)
    spanning = np.where(rgb_image > 127, 1.7e308, -1.7e308).astype(np.float64)   # max - min overflows float64
    result = tiny_segmenter.segment(spanning, ["a", "b"])
    assert np.all(np.isfinite(result.probabilities))


def test_names_made_identical_by_the_text_context_are_refused(tiny_segmenter, rgb_image):
    long = "a cell with " + "very " * 80
    with pytest.raises(InvalidClassesError, match="become identical after the model's 77-token limit"):
        tiny_segmenter.segment(rgb_image, [long + "round nucleus", long + "oval nucleus"])
    with pytest.warns(UserWarning, match="cut at the model's 77-token limit"):
        tiny_segmenter.segment(rgb_image, [long + "round nucleus", "background"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_segmenter.segment(rgb_image, ["cell", "background"])


def test_class_names_are_checked_against_the_text_limit_on_every_run_but_tokenized_once(tiny_segmenter, rgb_image,
                                                                                         monkeypatch):
    model = tiny_segmenter.model
    tokenized = []
    tokenizer = model.tokenizer
    monkeypatch.setattr(model, "tokenizer", lambda texts, *a, **k: tokenized.extend(texts) or tokenizer(texts, *a, **k))
    tiny_segmenter.segment(rgb_image, ["cell", "background"])
    assert tokenized  # the first run encodes the names and checks them
    del tokenized[:]
    tiny_segmenter.segment(rgb_image, ["background", "cell"])
    assert tokenized == []  # known names: neither encoded nor tokenized again
    long = "a cell with " + "very " * 80 + "round nucleus"
    for _ in range(3):  # a cut name is said on every run, though checked once
        with pytest.warns(UserWarning, match="1 class name"):
            tiny_segmenter.segment(rgb_image, [long, "background"])
    with pytest.raises(InvalidClassesError, match="become identical"):
        tiny_segmenter.segment(rgb_image, [long, long.replace("round", "oval")])


def test_method_is_fixed_per_run_so_a_shared_segmenter_stays_consistent(tiny_checkpoint, rgb_image):
    shared = Segmenter("test-tiny", tiny_checkpoint, device="cpu", window_batch_size=1)
    expected = {m: Segmenter("test-tiny", tiny_checkpoint, method=m, device="cpu").segment(rgb_image, ["a", "b"])
                for m in ("clearclip", "vanilla")}
    steps = shared.segment_steps(rgb_image, ["a", "b"], short_side=None, crop=128, stride=64)
    next(steps)
    next(steps)
    shared.method = "vanilla"                        # another thread switches the method mid-run
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            mid_run = stop.value
            break
    native = Segmenter("test-tiny", tiny_checkpoint, device="cpu").segment(rgb_image, ["a", "b"], short_side=None,
                                                                           crop=128, stride=64)
    np.testing.assert_array_equal(mid_run.labels, native.labels)
    assert mid_run.method == "clearclip"
    # and the feature cache holds each method's own features
    for method in ("vanilla", "clearclip", "vanilla"):
        shared.method = method
        np.testing.assert_allclose(shared.segment(rgb_image, ["a", "b"]).probabilities,
                                   expected[method].probabilities, atol=1e-6)


def test_threads_sharing_a_segmenter_get_their_own_method(tiny_checkpoint, rgb_image):
    shared = Segmenter("test-tiny", tiny_checkpoint, device="cpu")
    expected = {m: Segmenter("test-tiny", tiny_checkpoint, method=m, device="cpu").segment(rgb_image, ["a", "b"]).labels
                for m in ("clearclip", "maskclip")}
    results, errors = {}, []
    lock = threading.Lock()

    def work(method):
        try:
            for _ in range(3):
                with lock:
                    shared.method = method
                    steps = shared.segment_steps(rgb_image, ["a", "b"])
                    next(steps)
                while True:
                    try:
                        next(steps)
                    except StopIteration as stop:
                        results.setdefault(method, []).append(stop.value)
                        break
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(m,)) for m in ("clearclip", "maskclip")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for method, runs in results.items():
        for run in runs:
            assert run.method == method
            np.testing.assert_array_equal(run.labels, expected[method])


# -- the text cache heals ------------------------------------------------------------------------------

@pytest.mark.parametrize("poison", ["empty", "shape", "float64", "nan", "zero", "garbage"])
def test_invalid_cached_text_embeddings_are_recomputed_and_rewritten(tiny_checkpoint, rgb_image, poison):
    first = Segmenter("test-tiny", tiny_checkpoint, device="cpu")
    clean = first.segment(rgb_image, ["cat", "dog"])
    path = first.text._disk_path(first.text.key("cat", first.text.key.__self__ and __import__(
        "napari_clearclip.prompts", fromlist=["IMAGENET_TEMPLATES"]).IMAGENET_TEMPLATES))
    assert path.is_file()
    good = np.load(path)
    if poison == "empty":
        path.write_bytes(b"")
    elif poison == "garbage":
        path.write_bytes(b"\x93NUMPY garbage")
    else:
        bad = {"shape": np.ones(7, np.float32), "float64": good.astype(np.float64), "nan": np.full_like(good, np.nan),
               "zero": np.zeros_like(good)}[poison]
        with open(path, "wb") as handle:
            np.save(handle, bad)
    again = Segmenter("test-tiny", tiny_checkpoint, device="cpu").segment(rgb_image, ["cat", "dog"])
    np.testing.assert_allclose(again.probabilities, clean.probabilities, atol=1e-6)
    np.testing.assert_array_equal(np.load(path), good)          # rewritten with the valid embedding
    assert not list(path.parent.glob("*.tmp"))


def test_an_unusable_cache_folder_is_skipped_with_a_warning(tmp_path, monkeypatch, tiny_checkpoint, rgb_image):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("NAPARI_CLEARCLIP_CACHE_DIR", str(blocker))
    segmenter = Segmenter("test-tiny", tiny_checkpoint, device="cpu")
    with pytest.warns(UserWarning, match="cannot be written"):
        result = segmenter.segment(rgb_image, ["cat", "dog"])
    assert result.labels.shape == rgb_image.shape[:2]


# -- outputs and geometry ------------------------------------------------------------------------------

def test_maps_are_kept_only_when_asked(tiny_segmenter, rgb_image):
    full = tiny_segmenter.segment(rgb_image, ["a", "b", "c"])
    lean = tiny_segmenter.segment(rgb_image, ["a", "b", "c"], maps=False)
    assert lean.probabilities is None and lean.similarity is None
    np.testing.assert_array_equal(lean.labels, full.labels)
    np.testing.assert_allclose(lean.confidence, full.probabilities.max(0), atol=1e-7)


def test_chunked_resize_equals_pytorch_bilinear():
    from napari_clearclip.prompts import ClassQuery
    from napari_clearclip.scoring import postprocess

    scores = torch.randn(4, 37, 53) * 0.1
    classes = [ClassQuery("a", ("a", "b")), ClassQuery("c", ("c",)), ClassQuery("d", ("d",))]
    result = postprocess(scores, (301, 199), classes, 50.0, 0.0, "clearclip", chunk_bytes=10_000)
    full = F.interpolate(scores[None], size=(301, 199), mode="bilinear", align_corners=False)[0]
    probs = torch.softmax(full * 50, 0)
    expected = torch.stack([probs[:2].amax(0), probs[2], probs[3]])
    np.testing.assert_allclose(result.probabilities, expected.numpy(), atol=2e-5)   # the project's bar is 1e-4
    assert np.mean(result.labels == expected.argmax(0).numpy() + 1) >= 0.9999
    whole = postprocess(scores, (301, 199), classes, 50.0, 0.0, "clearclip")             # one chunk: exact
    np.testing.assert_array_equal(whole.probabilities, expected.numpy())


def test_positions_are_interpolated_for_non_square_grids_with_the_pretraining_count(tiny_checkpoint):
    from napari_clearclip.methods import interpolated_positions

    visual = Segmenter("test-tiny", tiny_checkpoint, device="cpu").model.visual
    pos = visual.positional_embedding
    assert visual.grid_size == (14, 14)
    assert interpolated_positions(visual, 14, 14) is pos
    got = interpolated_positions(visual, 7, 28)                   # 196 tokens, like 14 x 14
    grid = pos[1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, scale_factor=(7.1 / 14, 28.1 / 14), mode="bicubic")
    np.testing.assert_allclose(got[1:].numpy(), expected.permute(0, 2, 3, 1).reshape(196, -1).numpy(), atol=1e-6)
    np.testing.assert_array_equal(got[0].numpy(), pos[0].numpy())
    assert not torch.allclose(got, pos)


def test_loading_weights_leaves_logging_alone(tiny_checkpoint, caplog):
    import logging

    from napari_clearclip.models import _quiet_random_init

    Segmenter("test-tiny", tiny_checkpoint, device="cpu")
    assert logging.root.manager.disable == logging.NOTSET
    seen = []
    with caplog.at_level(logging.WARNING), _quiet_random_init():
        logging.getLogger("someone.else").warning("still heard")
        logging.warning("No pretrained weights loaded for model 'x'. Model initialized randomly.")
        worker = threading.Thread(target=lambda: logging.warning("No pretrained weights loaded (another thread)"))
        worker.start()
        worker.join()
        seen = [r.getMessage() for r in caplog.records]
    assert "still heard" in seen and "No pretrained weights loaded (another thread)" in seen
    assert not any("Model initialized randomly" in m for m in seen)


# -- options a stranger could pass: bounded, typed, numpy numbers welcome ------------------------------

@pytest.mark.parametrize("options, message", [
    (dict(pamr_dilations=(10**12,)), r"pamr_dilations=\(1000000000000,\) must be whole numbers from 1 to 1024"),
    (dict(pamr_dilations=(10**5,)), "must be whole numbers from 1 to 1024"),
    (dict(pamr_dilations=(261,)), r"reach past this 180 x 260 image: each must be at most its longer side \(260"),
    (dict(pamr_iterations=10**9), "pamr_iterations=1000000000 must be a whole number from 0 to 100"),
    (dict(pamr_iterations=2.5), "must be a whole number"),
    (dict(pamr_dilations="8"), "must be whole numbers"),
])
def test_edge_snapping_options_are_bounded_before_any_work(tiny_segmenter, rgb_image, options, message):
    with pytest.raises(InvalidOptionError, match=message):
        tiny_segmenter.segment(rgb_image, ["cat", "dog"], refine="pamr", **options)
    if "reach past" not in message:                       # checked up front too, as the CLI and batches do
        with pytest.raises(InvalidOptionError, match=message):
            tiny_segmenter.check_options(refine="pamr", **options)


def test_numpy_integers_are_as_good_as_python_ones(tiny_segmenter, rgb_image):
    plain = tiny_segmenter.segment(rgb_image, ["cat", "dog"], refine="pamr", pamr_iterations=3,
                                   pamr_dilations=(8, 16), crop=224, maps=False)
    numpy = tiny_segmenter.segment(rgb_image, ["cat", "dog"], refine="pamr", pamr_iterations=np.int64(3),
                                   pamr_dilations=np.array([8, 16]), crop=np.int64(224), maps=np.bool_(False))
    np.testing.assert_array_equal(numpy.labels, plain.labels)


@pytest.mark.parametrize("options, message", [
    (dict(exemplars="foo"), "exemplars='foo' is not a set of exemplars"),
    (dict(strokes=[[1, 2], [1]]), "rows of different lengths"),
    (dict(maps="no"), "maps='no' must be True or False"),
    (dict(maps=None), "maps=None must be True or False"),
])
def test_wrong_kinds_of_values_are_value_errors_that_name_the_option(tiny_segmenter, rgb_image, options, message):
    with pytest.raises(InvalidOptionError, match=message):
        tiny_segmenter.segment(rgb_image, ["cat", "dog"], **options)


def test_strokes_of_classes_that_do_not_exist_are_named_and_empty_strokes_are_none():
    from napari_clearclip.strokes import check_strokes

    strokes = np.zeros((40, 30), np.int32)
    assert check_strokes(strokes, (40, 30), 2) is None
    strokes[17, 3:5] = 2
    assert check_strokes(strokes, (40, 30), 2) is strokes
    for value, shown in ((3, "0..3"), (-1, "-1..2")):
        wrong = strokes.copy()
        wrong[39, 29] = value
        with pytest.raises(InvalidOptionError, match=rf"strokes hold values {shown}, but only 0 \(no hint\) to 2"):
            check_strokes(wrong, (40, 30), 2)
    with pytest.raises(InvalidOptionError, match="do not match"):
        check_strokes(strokes, (30, 40), 2)


def test_planes_outside_a_stack_are_named_not_an_index_error(tiny_segmenter, rgb_image):
    from napari_clearclip.planes import ImageLayout, segment_planes
    from napari_clearclip import run_to_end

    stack = np.stack([rgb_image, rgb_image[::-1]])
    layout = ImageLayout(stack.shape, rgb=True)
    for planes in ([(5,)], [(0, 0)], [(-1,)], [("a",)], 7):
        with pytest.raises(InvalidOptionError, match=r"planes are indexed by 1 number\(s\) within \(2,\)|planes=7"):
            run_to_end(segment_planes(tiny_segmenter, stack, layout, planes, ["cat"]))
    results = run_to_end(segment_planes(tiny_segmenter, stack, layout, [1, (np.int64(0),)], ["cat", "dog"]))
    assert [plane for plane, _ in results] == [(1,), (0,)]


def test_an_array_of_class_names_is_a_list_of_class_names(tiny_segmenter, rgb_image):
    listed = tiny_segmenter.segment(rgb_image, ["cat", "dog, puppy"])
    arrayed = tiny_segmenter.segment(rgb_image, np.array(["cat", "dog, puppy"]))
    np.testing.assert_array_equal(arrayed.labels, listed.labels)
    assert arrayed.class_names == ["cat", "dog"]
    with pytest.raises(InvalidClassesError, match="not a ndarray of int64") as info:
        tiny_segmenter.segment(rgb_image, np.array([[1, 2]]))
    assert "generator" not in str(info.value)


@pytest.mark.parametrize("blocker", ["empty folder", "folder with a file"])
def test_a_folder_where_a_cache_entry_goes_spoils_that_entry_only(tiny_checkpoint, rgb_image, blocker):
    from napari_clearclip.cache import cache_dir

    Segmenter("test-tiny", tiny_checkpoint, device="cpu").segment(rgb_image, ["cat", "dog"])
    entries = sorted((cache_dir() / "text-embeddings").glob("*.npy"))
    assert len(entries) == 2
    spoilt = entries[0]
    spoilt.unlink()
    spoilt.mkdir()
    if blocker == "folder with a file":
        (spoilt / "keep.txt").write_text("x")
    fresh = Segmenter("test-tiny", tiny_checkpoint, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # no "cannot be written" for the whole cache
        fresh.segment(rgb_image, ["cat", "dog", "bird"])
    written = sorted((cache_dir() / "text-embeddings").glob("*.npy"))
    assert len([p for p in written if p.is_file()]) == (3 if blocker == "empty folder" else 2)  # healed, or skipped alone
    assert fresh.text.disk_cache
    assert not list((cache_dir() / "text-embeddings").glob("*.tmp"))
