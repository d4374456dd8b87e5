"""Edge snapping's loops compiled with numba: the very values of the element-wise path, to the last bit."""

from __future__ import annotations

import functools
import threading

import numpy as np
import pytest
import torch

from napari_clearclip import compiled_labels, compiled_snapping, refine
from napari_clearclip.refine import NEIGHBOURS, pamr, pamr_affinities


@pytest.fixture(autouse=True)
def compiled_ready():
    """The loops compiled before each test (a segmenter made earlier may be compiling them in the background)."""
    compiled_snapping.available()


@pytest.fixture
def without_compiled(monkeypatch):
    """A function that runs its argument with the compiled loop turned off (as without numba)."""
    assert compiled_snapping.available()  # waits for a compiling in the background
    compiled = compiled_snapping._loops()

    def run(function):
        monkeypatch.setattr(compiled_snapping, "_compiled", False)
        try:
            return function()
        finally:
            monkeypatch.setattr(compiled_snapping, "_compiled", compiled)
    return run


def test_the_compiled_loop_is_there():
    """numba is a dependency: the compiled sums run wherever the package is installed as asked."""
    assert compiled_snapping.available()


@pytest.mark.parametrize("seed", range(6))
def test_compiled_sums_of_any_block_equal_the_element_wise_path_bit_for_bit(seed, without_compiled):
    """Random channels, widths (not multiples of the vector length), dilations, blocks of rows, thread counts, and
    weights cut out of a larger region (rows not contiguous with each other, as a region's weights are)."""
    rng = np.random.default_rng(seed)
    channels = int(rng.integers(1, 6))
    height, width = int(rng.integers(5, 90)), int(rng.integers(3, 700))
    dilations = tuple(int(d) for d in rng.choice([1, 2, 3, 8, 16], size=int(rng.integers(1, 3)), replace=False))
    pad = max(dilations)
    offsets = [(dy * d, dx * d) for d in dilations for dy, dx in NEIGHBOURS]
    current = torch.from_numpy(rng.normal(size=(channels, height + 2 * pad, width + 2 * pad)).astype(np.float32))
    larger = torch.from_numpy(rng.random((len(offsets), height + 9, width + 13)).astype(np.float32))
    weights = larger[:, 4 : 4 + height, 5 : 5 + width]
    assert not weights.is_contiguous()
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        try:
            for _ in range(4):
                first = int(rng.integers(0, height))
                last = int(rng.integers(first + 1, height + 1))
                expected = torch.full_like(current, float("nan"))
                without_compiled(lambda e=expected, a=first, b=last: refine._average_rows(
                    current, e, weights, offsets, pad, width, a, b))
                got = torch.full_like(current, float("nan"))
                with _shared_from(1 if threads > 1 else 1 << 40):
                    assert compiled_snapping.weighted_rows(current, got, weights, offsets, pad, width, first, last)
                # the block's rows equal; nothing outside them written
                assert torch.equal(got[:, pad + first : pad + last, pad : pad + width],
                                   expected[:, pad + first : pad + last, pad : pad + width]), (threads, first, last)
                outside = torch.ones_like(got, dtype=torch.bool)
                outside[:, pad + first : pad + last, pad : pad + width] = False
                assert got[outside].isnan().all()
        finally:
            torch.set_num_threads(2)


@pytest.mark.parametrize("channels", [2, 3, 6])
def test_classes_snapped_together_get_the_values_each_gets_alone(channels):
    """The loop adds two classes a pass (each weight read once for both): every class's values equal those it
    gets snapped on its own, over narrowed columns and spans of rows too, and nothing outside them is written."""
    rng = np.random.default_rng(channels)
    pad, height, width = 16, 37, 301
    offsets = [(dy * d, dx * d) for d in (8, 16) for dy, dx in NEIGHBOURS]
    current = torch.from_numpy(rng.normal(size=(channels, height + 2 * pad, width + 2 * pad)).astype(np.float32))
    weights = torch.from_numpy(rng.random((len(offsets), height + 3, width + 7)).astype(np.float32))[:, 1 : 1 + height,
                                                                                                    2 : 2 + width]
    starts = rng.integers(0, width // 2, size=height)
    spans = np.stack([starts, starts + rng.integers(1, width // 2, size=height)], axis=1).astype(np.int64)
    columns = (5, width - 9)

    def snapped(planes: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(planes, float("nan"))
        compiled_snapping.averaging(planes, out, weights, offsets, pad, width)(2, height - 3, columns, spans)
        return out

    together = snapped(current)
    for c in range(channels):
        assert torch.equal(together[c].nan_to_num(7.0), snapped(current[c : c + 1].clone())[0].nan_to_num(7.0)), c
    written = ~together[0].isnan()
    rows, cols = np.nonzero(written.numpy())
    assert rows.min() == pad + 2 and rows.max() == pad + height - 4
    low = np.maximum(columns[0], spans[rows - pad, 0]) + pad
    high = np.minimum(columns[1], spans[rows - pad, 1]) + pad
    assert ((cols >= low) & (cols < high)).all()


@pytest.mark.parametrize("count", [1, 5, 8, 11, 16, 19, 24])
def test_any_number_of_neighbours_sums_as_the_element_wise_path(count, without_compiled):
    """The loop adds neighbours eight to a pass: counts that are not multiples of eight, and several passes of
    eight, give the element-wise path's values bit for bit, over rows cut out of a wider region."""
    rng = np.random.default_rng(count)
    pad, height, width = 6, 23, 517
    offsets = [(int(rng.integers(-pad, pad + 1)), int(rng.integers(-pad, pad + 1))) for _ in range(count)]
    current = torch.from_numpy(rng.normal(size=(3, height + 2 * pad, width + 2 * pad)).astype(np.float32))
    weights = torch.from_numpy(rng.random((count, height + 4, width + 9)).astype(np.float32))[:, 2 : 2 + height,
                                                                                               4 : 4 + width]
    expected = torch.full_like(current, float("nan"))
    without_compiled(lambda: refine._average_rows(current, expected, weights, offsets, pad, width, 3, 20))
    got = torch.full_like(current, float("nan"))
    assert compiled_snapping.weighted_rows(current, got, weights, offsets, pad, width, 3, 20)
    inside = (slice(None), slice(pad + 3, pad + 20), slice(pad, pad + width))
    assert torch.equal(got[inside], expected[inside])
    assert not got[inside].isnan().any()


def test_blocks_meant_for_other_threads_are_done_here_when_no_thread_can_start(monkeypatch):
    """While Python exits, no new thread starts (a background job may still be averaging): the shares meant for
    other threads are computed by the calling one, with the same values."""
    rng = np.random.default_rng(1)
    pad, offsets = 2, [(dy * 2, dx * 2) for dy, dx in NEIGHBOURS]
    current = torch.from_numpy(rng.normal(size=(2, 40 + 2 * pad, 300 + 2 * pad)).astype(np.float32))
    weights = torch.from_numpy(rng.random((len(offsets), 40, 300)).astype(np.float32))
    torch.set_num_threads(3)
    try:
        expected = torch.zeros_like(current)
        with _shared_from(1):
            assert compiled_snapping.weighted_rows(current, expected, weights, offsets, pad, 300, 0, 40)

        class Exiting:
            def submit(self, *args):
                raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        monkeypatch.setattr(compiled_snapping, "_threads", lambda count: Exiting())
        got = torch.zeros_like(current)
        with _shared_from(1):
            assert compiled_snapping.weighted_rows(current, got, weights, offsets, pad, 300, 0, 40)
    finally:
        torch.set_num_threads(2)
    assert torch.equal(got, expected) and expected.abs().sum() > 0


def test_shares_on_threads_of_their_own_cover_the_rows_once_and_end_with_the_call():
    """The weights' loops call PyTorch's parallel steps, which give a lasting thread OpenMP threads of its own (and
    slow every later small parallel operation): their other shares run on threads that end before the call returns."""
    seen = []

    def loop(low, high):
        seen.append((low, high, threading.current_thread()))

    torch.set_num_threads(3)
    try:
        with _shared_from(1):
            compiled_snapping.shared_rows(loop, 0, 30, 1 << 10, threads_of_their_own=True)
    finally:
        torch.set_num_threads(2)
    rows = sorted(row for low, high, _ in seen for row in range(low, high))
    assert rows == list(range(30))
    others = [thread for _, _, thread in seen if thread is not threading.current_thread()]
    assert len(others) == 2 and not any(thread.is_alive() for thread in others)


def test_an_error_on_a_thread_of_its_own_is_raised_once_every_share_has_ended():
    done, others = [], []

    def loop(low, high):
        if threading.current_thread() is not threading.main_thread():
            others.append(threading.current_thread())
            raise ValueError(f"rows {low}-{high}")
        done.append((low, high))

    with _shared_from(1), pytest.raises(ValueError, match="rows 15-30"):
        compiled_snapping.shared_rows(loop, 0, 30, 1 << 10, threads_of_their_own=True)
    assert done == [(0, 15)] and others and not others[0].is_alive()


def test_the_weights_are_shared_on_threads_of_their_own(monkeypatch):
    calls = []
    real = compiled_snapping._on_threads_of_their_own
    monkeypatch.setattr(compiled_snapping, "_on_threads_of_their_own",
                        lambda *args: calls.append(args[2]) or real(*args))
    guide = torch.from_numpy(np.random.default_rng(0).random((3, 40, 60), dtype=np.float32))
    with _shared_from(1):
        refine.pamr_affinities(guide, (1, 2))
    assert calls and calls[0][0] == 0 and calls[0][-1] == 40


class _shared_from:
    """Blocks shared between threads from this many output values (1: any block is shared)."""

    def __init__(self, values: int):
        self.values = values

    def __enter__(self):
        self.before = compiled_snapping.SHARED_FROM
        compiled_snapping.SHARED_FROM = self.values

    def __exit__(self, *exc):
        compiled_snapping.SHARED_FROM = self.before


def test_pamr_and_tiled_snapping_give_the_same_values_with_and_without_the_compiled_loop(without_compiled):
    """Whole images, blocks of rows and bands all give the values of the element-wise path (so a run gives the same
    labels whether numba is there or not), and they stay those of PAMR's definition."""
    from tests.engine.test_corrections import reference_pamr

    rng = np.random.default_rng(5)
    guide = torch.from_numpy(rng.normal(size=(3, 70, 53)).astype(np.float32))
    guide[:, 35:, 20:] += 2.5
    scores = torch.from_numpy(rng.normal(size=(4, 70, 53)).astype(np.float32))
    for iterations, dilations in ((10, (8, 16)), (3, (1, 2)), (2, (3, 1, 3))):
        compiled = pamr(scores, guide, iterations, dilations)
        plain = without_compiled(lambda i=iterations, d=dilations: pamr(scores, guide, i, d))
        assert torch.equal(compiled, plain), (iterations, dilations)
        banded = pamr(scores, guide, iterations, dilations, band_rows=17)
        assert torch.equal(banded, plain)
    small_guide, small_scores = guide[:, :12, :9].contiguous(), scores[:, :12, :9].contiguous()
    np.testing.assert_allclose(pamr(small_scores, small_guide, 4, (1, 2)).numpy(),
                               reference_pamr(small_scores.numpy(), small_guide.numpy(), 4, (1, 2)), atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_compiled_weights_equal_the_element_wise_path_bit_for_bit(seed, without_compiled, monkeypatch):
    """Random guides (1 to 4 channels, flat areas where the spread is 0, edges), sizes, dilations (one given twice
    too) and blocks of rows: the weights are those of the element-wise path to the last bit, and sum to 1."""
    rng = np.random.default_rng(seed)
    channels = int(rng.integers(1, 5))
    height, width = int(rng.integers(3, 120)), int(rng.integers(3, 400))
    guide = rng.normal(size=(channels, height, width)).astype(np.float32)
    guide[:, : height // 3] = 0.5                                   # flat: a spread of 0
    guide[:, :, width // 2 :] += 3.0
    guide = torch.from_numpy(guide)
    dilations = [(8, 16), (1, 2), (2, 2, 5), (3,)][seed]
    expected = without_compiled(lambda: refine.pamr_affinities(guide, dilations))
    for rows in (1, 5, 512):   # rows each thread takes through every step at a time
        monkeypatch.setattr(compiled_snapping, "WEIGHT_PIXELS_AT_ONCE", rows * width)
        with _shared_from(1):
            got = refine.pamr_affinities(guide, dilations)
        assert torch.equal(got, expected), (rows, dilations)
    np.testing.assert_allclose(got.sum(0).numpy(), 1.0, atol=1e-5)
    # in inference mode, as the segmenter runs: the other threads write the same weights in place
    with _shared_from(1), torch.inference_mode():
        inferred = refine.pamr_affinities(guide, dilations)
    assert inferred.is_inference() and torch.equal(inferred, expected)


@pytest.mark.parametrize("seed", range(3))
def test_weights_of_a_region_written_into_a_view_of_the_whole_equal_the_whole_images(seed, without_compiled):
    """A region's weights computed from the image's own pixels around it (its edges repeated only at the image's
    sides), written into the matching view of an image-sized tensor: every value is the whole image's, compiled or
    not, and nothing outside the view is touched."""
    rng = np.random.default_rng(seed)
    height, width = int(rng.integers(40, 140)), int(rng.integers(40, 300))
    guide = torch.from_numpy(rng.normal(size=(3, height, width)).astype(np.float32))
    dilations = [(1, 2), (2, 5), (3, 3)][seed]
    pad = max(dilations)
    expected = refine.pamr_affinities(guide, dilations)
    for compiled in (True, False):
        for _ in range(6):
            top, left = int(rng.integers(0, height - 1)), int(rng.integers(0, width - 1))
            bottom, right = int(rng.integers(top + 1, height + 1)), int(rng.integers(left + 1, width + 1))
            inside = (max(0, top - pad), min(height, bottom + pad), max(0, left - pad), min(width, right + pad))
            padded = torch.empty((3, bottom - top + 2 * pad, right - left + 2 * pad))
            y, x = pad - (top - inside[0]), pad - (left - inside[2])
            h, w = inside[1] - inside[0], inside[3] - inside[2]
            padded[:, y : y + h, x : x + w] = guide[:, inside[0] : inside[1], inside[2] : inside[3]]
            refine.repeat_sides(padded, y, padded.shape[1] - y - h, x, padded.shape[2] - x - w)
            whole = torch.full(expected.shape, float("nan"))
            out = whole[:, top:bottom, left:right]
            if compiled:
                refine.padded_affinities(padded, dilations, out)
            else:
                without_compiled(lambda padded=padded, out=out: refine.padded_affinities(padded, dilations, out))
            assert torch.equal(out, expected[:, top:bottom, left:right]), (compiled, top, bottom, left, right)
            outside = torch.ones(whole.shape[1:], dtype=torch.bool)
            outside[top:bottom, left:right] = False
            assert torch.isnan(whole[:, outside]).all()


def test_a_run_with_snapping_gives_the_labels_of_the_element_wise_path(without_compiled):
    """The whole engine (first run tile by tile, then a stroke's re-run) with and without the compiled loop."""
    from napari_clearclip import Segmenter
    from napari_clearclip.demo.scenes import make_scene

    scene = make_scene(4, size=192, objects=(4, 4))
    classes = ["red", "green", "blue", "yellow", "background"]
    strokes = np.zeros(scene.image.shape[:2], np.int32)
    strokes[40:44, 30:90] = 2

    def runs():
        segmenter = Segmenter("synthetic-tiny", device="cpu", disk_cache=False)
        first = segmenter.segment(scene.image, classes, refine="pamr", maps=False)
        again = segmenter.segment(scene.image, classes, refine="pamr", maps=False, strokes=strokes)
        return first.labels, again.labels

    compiled = runs()
    plain = without_compiled(runs)
    for got, expected in zip(compiled, plain):
        np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(compiled[0], compiled[1])  # the stroke changed something


def test_inputs_the_compiled_loop_does_not_take_are_left_to_the_element_wise_path():
    """float64 scores (and weights made for them): nothing written, False returned, and PAMR still right."""
    current = torch.zeros((2, 12, 12), dtype=torch.float64)
    spare = torch.full_like(current, 7.0)
    weights = torch.ones((8, 10, 10), dtype=torch.float64) / 8
    offsets = [(dy, dx) for dy, dx in NEIGHBOURS]
    assert not compiled_snapping.weighted_rows(current, spare, weights, offsets, 1, 10, 0, 10)
    assert (spare == 7.0).all()
    rng = np.random.default_rng(2)
    guide = torch.from_numpy(rng.normal(size=(3, 20, 16)))
    scores = torch.from_numpy(rng.normal(size=(2, 20, 16)))
    got = pamr(scores, guide, 3, (1, 2))
    expected = pamr(scores.float(), guide.float(), 3, (1, 2))
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-5)


def test_refine_uses_the_compiled_loop_on_the_cpu(monkeypatch):
    """Every block of every iteration goes through the compiled loop when it is there (a change that skipped it
    would only be slower, which no other test sees)."""
    prepared, blocks = [], []
    real = compiled_snapping.averaging

    def counted(*args, **kwargs):
        rows = real(*args, **kwargs)
        prepared.append(rows)

        def counted_rows(first, last, *columns):
            blocks.append((first, last))
            rows(first, last, *columns)
        return None if rows is None else counted_rows
    monkeypatch.setattr(compiled_snapping, "averaging", counted)
    rng = np.random.default_rng(1)
    guide = torch.from_numpy(rng.normal(size=(3, 30, 20)).astype(np.float32))
    scores = torch.from_numpy(rng.normal(size=(2, 30, 20)).astype(np.float32))
    refined = refine._refine_whole(scores, guide, 2, (1, 2))
    for _ in range(2):
        next(refined)
    assert len(prepared) == 2 and all(rows is not None for rows in prepared)
    assert sum(last - first for first, last in blocks) == 2 * 30   # every row of both iterations


@pytest.mark.parametrize("seed", range(3))
def test_compiled_resizing_equals_the_element_wise_path_bit_for_bit(seed, without_compiled):
    """Any region of any output size, into a new tensor or the inside of a padded buffer (nothing else written)."""
    from napari_clearclip.tiled_labels import bilinear_taps, upsample

    rng = np.random.default_rng(seed)
    for _ in range(10):
        queries, height, width = int(rng.integers(1, 6)), int(rng.integers(2, 40)), int(rng.integers(2, 40))
        out_height, out_width = int(rng.integers(2, 400)), int(rng.integers(2, 400))
        source = torch.from_numpy(rng.normal(size=(queries, height, width)).astype(np.float32))
        top, bottom = sorted(int(v) for v in rng.choice(out_height + 1, 2, replace=False))
        left, right = sorted(int(v) for v in rng.choice(out_width + 1, 2, replace=False))
        rows = tuple(t[top:bottom] for t in bilinear_taps(height, out_height))
        cols = tuple(t[left:right] for t in bilinear_taps(width, out_width))
        expected = without_compiled(lambda r=rows, c=cols, s=source: upsample(s, r, c))
        assert torch.equal(upsample(source, rows, cols), expected)
        padded = torch.full((queries, bottom - top + 6, right - left + 6), float("nan"))
        inside = upsample(source, rows, cols, out=padded[:, 3:-3, 3:-3])
        assert torch.equal(inside, expected)
        padded[:, 3:-3, 3:-3] = 0
        assert padded.isnan().sum() == padded.numel() - inside.numel()


def test_while_the_loops_compile_in_the_background_runs_take_the_element_wise_path(monkeypatch):
    """The first compiling on a machine takes seconds: a run meanwhile does not wait for it, and gets the same
    values; once compiled, the loops run."""
    import threading

    assert compiled_snapping.available()
    compiled = compiled_snapping._loops()
    release = threading.Event()
    compiling = threading.Thread(target=release.wait, daemon=True)
    compiling.start()
    monkeypatch.setattr(compiled_snapping, "_compiled", None)
    monkeypatch.setattr(compiled_snapping, "_warming", compiling)
    rng = np.random.default_rng(8)
    guide = torch.from_numpy(rng.normal(size=(3, 40, 30)).astype(np.float32))
    scores = torch.from_numpy(rng.normal(size=(2, 40, 30)).astype(np.float32))
    taken = []
    real = compiled_snapping.averaging

    def counted(*args, **kwargs):
        rows = real(*args, **kwargs)
        taken.append(rows is not None)
        return rows
    monkeypatch.setattr(compiled_snapping, "averaging", counted)
    try:
        meanwhile = pamr(scores, guide, 3, (1, 2))
        assert taken and not any(taken)                       # the element-wise path, without waiting
    finally:
        release.set()
        compiling.join()
    monkeypatch.setattr(compiled_snapping, "_compiled", compiled)
    taken.clear()
    assert torch.equal(pamr(scores, guide, 3, (1, 2)), meanwhile)
    assert taken and all(taken)


def test_loops_numba_cannot_compile_leave_the_element_wise_path(monkeypatch):
    """A numba that fails on these loops (a new release, an odd processor) costs speed, not runs."""
    from types import SimpleNamespace

    def broken(*args):
        raise RuntimeError("numba could not compile this loop")

    monkeypatch.setattr(compiled_snapping, "_load", lambda: SimpleNamespace(
        weighted_rows=broken, guide_spread=broken, weight_logits=broken, normalised=broken, resized_rows=broken))
    monkeypatch.setattr(compiled_snapping, "_compiled", None)
    monkeypatch.setattr(compiled_snapping, "_warming", None)
    assert not compiled_snapping.available()
    rng = np.random.default_rng(4)
    guide = torch.from_numpy(rng.normal(size=(3, 25, 20)).astype(np.float32))
    scores = torch.from_numpy(rng.normal(size=(2, 25, 20)).astype(np.float32))
    from tests.engine.test_corrections import reference_pamr

    np.testing.assert_allclose(pamr(scores, guide, 3, (1, 2)).numpy(),
                               reference_pamr(scores.numpy(), guide.numpy(), 3, (1, 2)), atol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_labels_present_per_tile_equal_a_count_per_tile(seed, monkeypatch):
    """Which labels occur in each tile of a box (tiles at its far edges cut short), on any split between threads,
    against np.unique per tile; types the loop does not take are left to the caller."""
    rng = np.random.default_rng(seed)
    for _ in range(20):
        tile = int(rng.choice([1, 3, 8, 64]))
        height, width = int(rng.integers(1, 5 * tile + 3)), int(rng.integers(1, 5 * tile + 3))
        labels = int(rng.integers(1, 9))
        block = rng.integers(0, labels, (height, width)).astype(np.uint8)
        block[rng.random((height, width)) < 0.7] = rng.integers(0, labels)   # mostly one label, as in real tiles
        rows, across = -(-height // tile), -(-width // tile)
        occurs = np.zeros((rows, across, labels), bool)
        monkeypatch.setattr(compiled_snapping, "SHARED_FROM", int(rng.choice([1, 1 << 15])))
        assert compiled_labels.labels_present(block, tile, occurs)
        expected = np.zeros_like(occurs)
        for ty in range(rows):
            for tx in range(across):
                expected[ty, tx, np.unique(block[ty * tile : (ty + 1) * tile, tx * tile : (tx + 1) * tile])] = True
        assert np.array_equal(occurs, expected)
    untouched = np.zeros((1, 1, 3), bool)
    assert not compiled_labels.labels_present(np.zeros((2, 2), np.int32), 2, untouched) and not untouched.any()


@pytest.mark.parametrize("seed", range(3))
def test_values_present_equal_numpy_unique(seed, monkeypatch):
    """The distinct values of uint8 labels of any size, on any split between threads; the layer's values as
    editing counts them, with and without the compiled pass."""
    from napari_clearclip.editing import present_values

    rng = np.random.default_rng(seed)
    for _ in range(20):
        size = int(rng.choice([0, 1, 7, 1000, 100_000]))
        array = rng.choice(rng.integers(0, 256, int(rng.integers(1, 12))), size).astype(np.uint8)
        monkeypatch.setattr(compiled_snapping, "SHARED_FROM", int(rng.choice([1, 100, 1 << 15])))
        expected = np.unique(array).astype(np.int64)
        if size:
            assert np.array_equal(compiled_labels.values_present(array), expected)
        assert np.array_equal(present_values(array.reshape(-1, 1) if size else array), expected)
    assert compiled_labels.values_present(np.zeros(4, np.int32)) is None
    assert compiled_labels.values_present(np.zeros((4, 4), np.uint8)[:, ::2]) is None   # not contiguous
    read_only = np.arange(5, dtype=np.uint8)
    read_only.flags.writeable = False
    assert compiled_labels.values_present(read_only) is None
    assert np.array_equal(present_values(read_only), np.arange(5))


@pytest.mark.parametrize("compiled", [True, False])
def test_weights_of_some_rows_are_those_of_the_whole(compiled, without_compiled):
    """``pamr_affinities(rows=)`` computes those rows alone, with the very values the whole gives them, and writes
    nothing else (as a region's rows its neighbour kept are then filled from the kept tiles)."""
    rng = np.random.default_rng(3)
    guide = torch.from_numpy(rng.normal(size=(3, 70, 50)).astype(np.float32))

    def run():
        whole = pamr_affinities(guide, (2, 5))
        for first, last in ((0, 70), (0, 1), (13, 41), (69, 70), (30, 200)):
            buffers = refine.Buffers()   # whatever buffer the weights are written into holds NaN
            for _ in range(2):
                buffers.take((16, 70, 50)).fill_(float("nan"))
            buffers.give_back()
            part = pamr_affinities(guide, (2, 5), buffers, rows=(first, last))
            assert torch.equal(part[:, first:last], whole[:, first:last])
            assert part[:, :first].isnan().all() and part[:, last:].isnan().all()
    run() if compiled else without_compiled(run)


def test_float16_bits_equal_numpy_rounding_for_every_exponent_and_the_ties():
    """The compiled float16 rounding (margins are kept at half size) against NumPy's, ties to even: every exponent,
    both signs, mantissas at, below and above each halfway point (normal and subnormal float16), and random ones."""
    from numba import njit

    from napari_clearclip._compiled_loops import half_bits

    @njit
    def convert(bits, out):
        for i in range(bits.shape[0]):
            out[i] = half_bits(bits[i])

    rng = np.random.default_rng(0)
    exponents = np.arange(256, dtype=np.uint32)
    drops = np.arange(1, 25, dtype=np.int64)        # bits dropped: 13 for normal float16, more for subnormal
    halves = np.concatenate([(1 << (drops - 1)) + d for d in (-1, 0, 1)] + [(1 << (drops - 1)) | (1 << drops)])
    mantissas = np.concatenate([halves, np.zeros(1), np.full(1, 0x7FFFFF), rng.integers(0, 1 << 23, 3000)])
    mantissas = (mantissas.astype(np.int64) & 0x7FFFFF).astype(np.uint32)
    bits = ((exponents[:, None] << 23) | mantissas[None, :]).ravel()
    bits = np.concatenate([bits, bits | np.uint32(0x80000000)])
    numbers = bits.view(np.float32)
    bits = bits[~np.isnan(numbers)]
    out = np.empty(len(bits), np.uint16)
    convert(bits, out)
    with np.errstate(over="ignore"):
        expected = bits.view(np.float32).astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(out, expected)


def _random_tiles_to_label(rng):
    """Inputs of ``_label_tiles`` as runs make them: query planes around their own tiles (their values exact only
    there), synonyms, a reference query, gaps, and image-sized labels, margins and winners holding earlier values."""
    from napari_clearclip.tiled_labels import _Geometry, _rectangle

    tile = int(rng.choice([1, 3, 8, 16]))
    size = (int(rng.integers(1, 6 * tile + 5)), int(rng.integers(1, 6 * tile + 5)))
    geometry = _Geometry((4, 4), size, 0, tile)
    counts = rng.integers(1, 4, int(rng.integers(1, 6)))            # queries per class
    owner = np.repeat(np.arange(len(counts)), counts)
    queries = len(owner)
    reference = int(rng.integers(queries))
    every = [(y, x) for y in range(geometry.shape[0]) for x in range(geometry.shape[1])]
    tiles = [every[i] for i in rng.choice(len(every), int(rng.integers(1, len(every) + 1)), replace=False)]
    competing = rng.random((*geometry.shape, queries)) < 0.7
    values = {}
    image = (0, size[0], 0, size[1])
    for q in range(queries):
        own = [t for t in tiles if competing[t[0], t[1], q]]
        if q == reference or not own or rng.random() < 0.15:
            continue
        halo = int(rng.integers(0, 4))
        top, bottom, left, right = _rectangle(own, geometry, halo, image)
        plane = torch.from_numpy((rng.integers(-6, 7, (bottom - top + 2, right - left + 3)) / 4).astype(np.float32))
        plane += torch.from_numpy(rng.normal(0, 0.3, plane.shape).astype(np.float32)) * float(rng.random() < 0.5)
        values[q] = (plane[1:-1, 2:-1], top, left, _rectangle(own, geometry, 0, image))   # a strided view
    gaps = np.where(rng.random(geometry.shape) < 0.6, np.inf,
                    rng.normal(0.5, 1.0, geometry.shape)).astype(np.float32)
    classes = len(counts)
    labels = rng.integers(0, classes + 1, size).astype(np.uint8)
    margins = rng.normal(0, 2, size).astype(np.float16)
    winners = rng.normal(0, 2, size).astype(np.float32)
    present = rng.random((*geometry.shape, classes + 1)) < 0.5
    tolerance = float(rng.choice([0.0, 1e-5, 0.3]))
    return values, tiles, reference, gaps, owner, geometry, labels, margins, tolerance, present, winners


@pytest.mark.parametrize("seed", range(4))
def test_compiled_labelling_of_tiles_equals_the_element_wise_path_bit_for_bit(seed, without_compiled, monkeypatch):
    """Labels (first class on ties), float16 margins, winners' values and labels present of random tiles, on any
    split between threads, equal the PyTorch path's to the last bit, and nothing outside the tiles is written."""
    from napari_clearclip.tiled_labels import _label_tiles

    rng = np.random.default_rng(seed)
    calls = []
    original = compiled_labels.label_tiles
    monkeypatch.setattr(compiled_labels, "label_tiles", lambda *a: calls.append(original(*a)) or calls[-1])
    for _ in range(40):
        inputs = _random_tiles_to_label(rng)
        monkeypatch.setattr(compiled_snapping, "SHARED_FROM", int(rng.choice([1, 1 << 15])))
        compiled = [a.copy() for a in inputs[6:8]] + [inputs[9].copy(), inputs[10].copy()]
        plain = [a.copy() for a in compiled]
        calls.clear()
        _label_tiles(*inputs[:6], compiled[0], compiled[1], inputs[8], compiled[2], compiled[3])
        assert calls == [True]   # the compiled loop ran
        without_compiled(lambda inputs=inputs, plain=plain: _label_tiles(*inputs[:6], plain[0], plain[1], inputs[8],
                                                                         plain[2], plain[3]))
        for got, expected in zip(compiled, plain):
            np.testing.assert_array_equal(got.view(np.uint8), expected.view(np.uint8))
        assert not np.array_equal(compiled[1].view(np.uint16), inputs[7].view(np.uint16))   # the tiles were written


def test_labelling_types_the_compiled_loop_does_not_take_are_left_to_the_element_wise_path():
    inputs = _random_tiles_to_label(np.random.default_rng(1))
    values, tiles, reference, gaps, owner, geometry, labels, margins, tolerance, present, winners = inputs
    wide = labels.astype(np.uint16)
    assert not compiled_labels.label_tiles(values, tiles, owner, reference, present.shape[-1] - 1, gaps,
                                           geometry.tile, wide, margins, tolerance, present, winners)
    assert np.array_equal(wide, labels)


def _random_challenged_tiles(rng, typed: bool):
    """Inputs of ``_typed_label_tiles`` (classes added) or ``_risen_label_tiles`` (scores that rose) as runs make
    them: the previous run's labels, margins and winners' values; where the winners' values are not kept, every
    query of the classes kept is computed (a labelled pixel's own class always has a value)."""
    from napari_clearclip.tiled_labels import _Geometry, _rectangle

    tile = int(rng.choice([1, 3, 8, 16]))
    size = (int(rng.integers(1, 6 * tile + 5)), int(rng.integers(1, 6 * tile + 5)))
    geometry = _Geometry((4, 4), size, 0, tile)
    counts = rng.integers(1, 4, int(rng.integers(2, 7)))
    classes = len(counts)
    owner = np.repeat(np.arange(classes), counts)
    reference = int(rng.integers(len(owner)))
    mapping = [None if typed and rng.random() < 0.4 else k for k in range(classes)]
    if all(m is None for m in mapping):
        mapping[0] = 0
    if mapping[owner[reference]] is None:
        mapping[owner[reference]] = owner[reference]
    kept_classes = np.array([m is not None for m in mapping])
    every = [(y, x) for y in range(geometry.shape[0]) for x in range(geometry.shape[1])]
    tiles = [every[i] for i in rng.choice(len(every), int(rng.integers(1, len(every) + 1)), replace=False)]
    exact = rng.random(geometry.shape) < (0.5 if typed else 0.0)
    competing = rng.random((*geometry.shape, len(owner))) < 0.7
    if typed:
        for ty, tx in tiles:
            if not exact[ty, tx]:
                competing[ty, tx, kept_classes[owner]] = True
    values = {}
    image = (0, size[0], 0, size[1])
    for q in range(len(owner)):
        own = [t for t in tiles if competing[t[0], t[1], q]]
        if q == reference or not own or (rng.random() < 0.15 and not (typed and kept_classes[owner[q]])):
            continue
        halo = int(rng.integers(0, 4))
        top, bottom, left, right = _rectangle(own, geometry, halo, image)
        plane = torch.from_numpy((rng.integers(-6, 7, (bottom - top + 2, right - left + 3)) / 4).astype(np.float32))
        plane += torch.from_numpy(rng.normal(0, 0.3, plane.shape).astype(np.float32)) * float(rng.random() < 0.5)
        values[q] = (plane[1:-1, 2:-1], top, left, _rectangle(own, geometry, 0, image))
    gaps = np.where(rng.random(geometry.shape) < 0.6, np.inf,
                    rng.normal(0.5, 1.0, geometry.shape)).astype(np.float32)
    labelled = np.flatnonzero(kept_classes) + 1
    labels = rng.choice(labelled, size).astype(np.uint8)
    margins = np.abs(rng.normal(0, 1, size)).astype(np.float16)
    margins[rng.random(size) < 0.1] = np.inf
    winners = (rng.integers(-6, 7, size) / 4).astype(np.float32)
    present = rng.random((*geometry.shape, classes + 1)) < 0.5
    tolerance = float(rng.choice([0.0, 1e-5, 0.3]))
    return dict(values=values, tiles=tiles, competing=competing, gaps=gaps, owner=owner, reference=reference,
                mapping=mapping, geometry=geometry, labels=labels, margins=margins, winners=winners, exact=exact,
                tolerance=tolerance, present=present)


@pytest.mark.parametrize("typed", [True, False], ids=["classes added", "scores rose"])
@pytest.mark.parametrize("seed", range(3))
def test_compiled_challenged_tiles_equal_the_element_wise_path_bit_for_bit(typed, seed, without_compiled,
                                                                          monkeypatch):
    """A run that starts from the previous labels (classes typed, or a stroke that only raised scores): labels,
    float16 margins, winners' values, labels present and tiles marked exact equal the PyTorch path's to the last
    bit, on any split between threads, and nothing outside the tiles is written."""
    from napari_clearclip.tiled_labels import _risen_label_tiles, _typed_label_tiles

    rng = np.random.default_rng(seed)
    calls = []
    original = compiled_labels.challenge_tiles
    monkeypatch.setattr(compiled_labels, "challenge_tiles", lambda *a: calls.append(original(*a)) or calls[-1])
    for _ in range(40):
        case = _random_challenged_tiles(rng, typed)
        monkeypatch.setattr(compiled_snapping, "SHARED_FROM", int(rng.choice([1, 1 << 15])))
        changing = ("labels", "margins", "winners", "present", "exact")

        def run(case=case, changing=changing):
            state = {name: case[name].copy() for name in changing}
            c = {**case, **state}
            if typed:
                _typed_label_tiles(c["values"], c["tiles"], c["gaps"], c["owner"], c["reference"], c["mapping"],
                                   c["geometry"], c["labels"], c["margins"], c["winners"], c["exact"], c["tolerance"],
                                   c["present"])
            else:
                _risen_label_tiles(c["values"], c["tiles"], c["competing"], c["gaps"], c["owner"], c["reference"],
                                   c["geometry"], c["labels"], c["margins"], c["winners"], c["exact"], c["tolerance"],
                                   c["present"])
            return state
        calls.clear()
        compiled = run()
        assert calls == [True]   # the compiled loop ran
        plain = without_compiled(run)
        for name in changing:
            np.testing.assert_array_equal(compiled[name].view(np.uint8), plain[name].view(np.uint8), err_msg=name)
        assert not np.array_equal(compiled["margins"].view(np.uint16), case["margins"].view(np.uint16))


@pytest.mark.parametrize("seed", range(4))
def test_compiled_judging_of_kept_tiles_equals_the_numpy_path_bit_for_bit(seed, monkeypatch):
    """Which whole tiles keep their labels, and the float16 margins the kept ones are lowered to (new classes'
    leads, classes that rose, winners rescued or not), on any split between threads: the NumPy path's values."""
    from napari_clearclip.tiled_labels import _tile_blocks, _TileBounds

    rng = np.random.default_rng(seed)
    kept_tiles = dirty_tiles = 0
    for _ in range(30):
        tile = int(rng.choice([1, 2, 8]))
        rows, cols, classes, new = int(rng.integers(1, 6)), int(rng.integers(1, 6)), int(rng.integers(1, 5)), int(
            rng.integers(0, 3))
        shape = (rows, cols, classes + 1)
        threshold = rng.choice([-np.inf, np.inf, -0.5, 0.0, 0.25, 1.0], shape) + rng.normal(0, 0.01, shape) * (
            rng.random(shape) < 0.5)
        shrinks = (rng.integers(0, 4, shape) / 8).astype(np.float32)
        leads = np.where(rng.random((new, *shape)) < 0.2, -np.inf, rng.normal(0, 1, (new, *shape))).astype(np.float32)
        others = np.where(rng.random((new, *shape)) < 0.3, -np.inf, rng.normal(0, 1, (new, *shape))).astype(np.float32)
        highest = None if rng.random() < 0.3 else np.where(rng.random(shape) < 0.3, np.inf,
                                                             rng.normal(0, 1, shape)).astype(np.float32)
        bounds = _TileBounds(threshold, shrinks, leads, others, float(rng.choice([0.0, 1e-5, 0.01])), highest)
        size = (rows * tile, cols * tile)
        labels = rng.integers(0, classes + 1, size).astype(np.uint8)
        margins = np.where(rng.random(size) < 0.05, np.inf, rng.integers(-4, 12, size) / 4 +
                           rng.normal(0, 0.2, size) * (rng.random(size) < 0.5)).astype(np.float16)
        winners = (rng.integers(-8, 8, size) / 4).astype(np.float32)
        given = winners if rng.random() < 0.8 else None
        ys, xs = np.nonzero(rng.random((rows, cols)) < 0.8)
        monkeypatch.setattr(compiled_snapping, "SHARED_FROM", int(rng.choice([1, 1 << 15])))
        got_margins, got_dirty = margins.copy(), np.zeros((rows, cols), bool)
        assert compiled_labels.judge_tiles(bounds, ys, xs, labels, got_margins, given, tile, got_dirty)
        expected_margins, expected_dirty = margins.copy(), np.zeros((rows, cols), bool)
        blocks = (_tile_blocks(labels, tile), _tile_blocks(expected_margins, tile), _tile_blocks(winners, tile))
        judged, kept = bounds.judge(ys, xs, blocks[0][ys, xs], blocks[1][ys, xs],
                                    None if given is None else blocks[2][ys, xs])
        expected_dirty[ys, xs] = judged
        blocks[1][ys[~judged], xs[~judged]] = kept
        np.testing.assert_array_equal(got_dirty, expected_dirty)
        np.testing.assert_array_equal(got_margins.view(np.uint16), expected_margins.view(np.uint16))
        kept_tiles, dirty_tiles = kept_tiles + int((~judged).sum()), dirty_tiles + int(judged.sum())
    assert kept_tiles > 10 and dirty_tiles > 10   # both outcomes judged many times


@pytest.mark.parametrize("device, where, prepared_first", [("cpu", "main", True), ("auto", "main", True),
                                                          ("cuda:7", "main", False), ("cpu", "worker", False)])
def test_the_loops_are_read_while_the_model_loads_not_after(device, where, prepared_first, monkeypatch):
    """Reading the loops from numba's cache takes about 0.6 s of a new session; started after a CLIP model's
    seconds of loading, it slowed that session's first run (hashing, labelling) by as much. A device that is not
    there starts nothing: loading the model says why. A segmenter made in a worker thread (as napari's widget
    makes it) reads them after the model, so that the GUI's main thread does not share Python's lock with both.
    On a GPU too ('auto' where there is one): labels alone are snapped on the host."""
    import threading

    import napari_clearclip.segmenter as segmenter_module
    from napari_clearclip import Segmenter

    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("a CUDA device is there")
    events = []
    monkeypatch.setattr(compiled_snapping, "prepare", lambda: events.append("loops"))
    real_load = segmenter_module.load_model

    def load(*args, **kwargs):
        events.append("model")
        return real_load(*args, **kwargs)
    monkeypatch.setattr(segmenter_module, "load_model", load)

    def make():
        return Segmenter("synthetic-tiny", device=device, disk_cache=False, feature_store=False)
    if device.startswith("cuda"):
        with pytest.raises(ValueError, match="no CUDA GPU"):
            make()
        assert events == ["model"]
        return
    if where == "worker":
        worker = threading.Thread(target=make)
        worker.start()
        worker.join(60)
    else:
        make()
    assert events == (["loops", "model", "loops"] if prepared_first else ["model", "loops"])


@pytest.mark.parametrize("seed", range(3))
def test_tiles_of_one_class_are_filled_as_tile_by_tile_assignment(seed, without_compiled, monkeypatch):
    """Filling the tiles of one class throughout (each with its label and its margin rounded down to float16) gives
    what assigning each tile in turn gives, on any split between threads, with and without the compiled loop,
    whole tiles and those the image's far edges cut short, uint8 and wider labels; pixels outside the filled tiles
    keep their values."""
    from napari_clearclip.tiled_labels import _fill_tiles, _Geometry, lower_half

    rng = np.random.default_rng(seed)
    for _ in range(12):
        tile = int(rng.choice([1, 4, 16, 64]))
        size = (int(rng.integers(1, 6 * tile + 5)), int(rng.integers(1, 6 * tile + 5)))
        geometry = _Geometry((4, 4), size, 0, tile)
        fill = rng.random(geometry.shape) < rng.choice([0.1, 0.6, 1.0])
        dtype = np.uint8 if rng.random() < 0.8 else np.uint16
        tile_labels = rng.integers(0, 250, geometry.shape)
        tile_margins = rng.random(geometry.shape).astype(np.float32) * 3
        before_labels = rng.integers(0, 250, size).astype(dtype)
        before_margins = rng.random(size).astype(np.float16)
        expected_labels, expected_margins = before_labels.copy(), before_margins.copy()
        for ty, tx in zip(*np.nonzero(fill)):
            where = slice(ty * tile, (ty + 1) * tile), slice(tx * tile, (tx + 1) * tile)
            expected_labels[where] = tile_labels[ty, tx]
            expected_margins[where] = lower_half(np.float32(tile_margins[ty, tx]))
        monkeypatch.setattr(compiled_snapping, "SHARED_FROM", int(rng.choice([1, 1 << 15])))
        for compiled in (True, False):
            labels, margins = before_labels.copy(), before_margins.copy()
            run = functools.partial(_fill_tiles, labels, margins, fill, tile_labels, tile_margins, geometry)
            run() if compiled else without_compiled(run)
            assert np.array_equal(labels, expected_labels) and labels.dtype == dtype
            assert np.array_equal(margins.view(np.uint16), expected_margins.view(np.uint16))
    untouched = np.zeros((4, 4), np.uint16)
    assert not compiled_labels.fill_tiles(untouched, np.zeros((4, 4), np.float16), np.ones((2, 2), bool),
                                          np.ones((2, 2), np.uint8), np.ones((2, 2), np.float16), 2)
    assert not untouched.any()


def test_tensors_the_loops_do_not_take_never_wait_for_them_to_be_compiled(monkeypatch):
    """A GPU's tensors (here on PyTorch's meta device, which holds no data) and other types take the element-wise
    path at once: asking for the loops there would compile them in the run (11 s on a 2-core CPU) for nothing."""
    monkeypatch.setattr(compiled_snapping, "_loops", lambda: pytest.fail("the loops were asked for"))
    for device, dtype in (("meta", torch.float32), ("cpu", torch.float64)):
        def tensor(*shape, device=device, dtype=dtype):
            return torch.zeros(shape, device=device, dtype=dtype)
        assert compiled_snapping.averaging(tensor(1, 5, 5), tensor(1, 5, 5), tensor(8, 3, 3), [(0, 0)] * 8, 1, 3) \
            is None
        assert not compiled_snapping.weights_of_rows(tensor(1, 5, 5), 1, (1,), tensor(8, 3, 3), 0, 3)
        assert not compiled_snapping.resized_rows(tensor(1, 1, 3), np.zeros(3, np.int64), np.zeros(3, np.int64),
                                                  tensor(3), tensor(1, 3, 3))
