"""Stacks, channels and edit-preserving merges (engine side, no Qt)."""

from __future__ import annotations

from dataclasses import dataclass

import dask.array as da
import numpy as np
import pytest

from napari_clearclip.colours import PALETTE, UNKNOWN_LABEL, class_colours, colormap_dict
from napari_clearclip.editing import LabelsMerger, apply_update
from napari_clearclip.errors import InvalidImageError
from napari_clearclip.planes import ImageLayout, segment_planes


@dataclass
class MergedLabels:
    """The labels to show, their class names, and the baseline that marks later edits."""

    labels: np.ndarray
    names: list[str]
    baseline: np.ndarray
    kept_pixels: int


def merge_keeping_edits(current, baseline, baseline_names, new, new_names, region: tuple = ()):
    """One-shot merge of ``new`` into ``current[region]``, as a run of the widget does it."""
    merger = LabelsMerger(current.shape, new_names, current, baseline, baseline_names,
                          found={region: np.array(current[region], copy=True)})
    merger.add(region, new)
    update = merger.finish()
    labels = np.array(current, copy=True)
    apply_update(labels, update)
    return MergedLabels(labels, update.names, update.baseline, update.kept_pixels)


def test_layouts_of_stacks_channels_and_rgb():
    stack = ImageLayout((5, 3, 40, 50), channel_axis=1, channel=2)
    assert stack.label_shape == (5, 40, 50)
    assert stack.planes() == [(i,) for i in range(5)]
    assert stack.image_index((3,)) == (3, 2)
    assert stack.plane_of_point((3.2, 1.0, 10, 10)) == (3,)
    rgb = ImageLayout((4, 40, 50, 3), rgb=True)
    assert rgb.label_shape == (4, 40, 50) and rgb.plane_of_point((9.0, 1, 1)) == (3,)
    assert ImageLayout((40, 50)).planes() == [()]
    with pytest.raises(InvalidImageError, match="Channel 4 does not exist"):
        ImageLayout((3, 40, 50), channel_axis=0, channel=4)
    with pytest.raises(InvalidImageError, match="Channel axis 2"):
        ImageLayout((3, 40, 50), channel_axis=2)


def test_segment_planes_reads_lazily_and_matches_single_images(tiny_segmenter, rgb_image):
    grey = rgb_image[..., 0]
    volume = np.stack([grey, grey[::-1], grey[:, ::-1]])
    lazy = da.from_array(volume, chunks=(1, 90, 130))
    layout = ImageLayout(lazy.shape)
    steps = segment_planes(tiny_segmenter, lazy, layout, [(0,), (2,)], ["a", "b"], contrast_limits=(0, 255))
    progress = []
    while True:
        try:
            progress.append(next(steps))
        except StopIteration as stop:
            results = stop.value
            break
    assert [plane for plane, _ in results] == [(0,), (2,)]
    assert progress[-1].fraction == pytest.approx(1.0) and progress[0].planes == 2
    expected = tiny_segmenter.segment(volume[2], ["a", "b"], contrast_limits=(0, 255))
    np.testing.assert_array_equal(results[1][1].labels, expected.labels)
    assert "slice 2/2" in progress[-1].message


def test_merge_keeps_painted_pixels_with_their_class():
    baseline = np.array([[1, 1, 2, 2], [1, 1, 2, 2]], np.int32)
    current = baseline.copy()
    current[0, 0] = 2   # the user painted a "nucleus" pixel
    current[1, 3] = 3   # and a new label of their own
    new = np.array([[1, 1, 1, 2], [2, 2, 1, 1]], np.int32)  # new run: classes reordered
    merged = merge_keeping_edits(current, baseline, ["cell", "nucleus"], new, ["nucleus", "cell"])
    # painted "nucleus" is now label 1; the user's own label 3 survives as an extra class
    assert merged.names == ["nucleus", "cell", "label 3"]
    expected = new.copy()
    expected[0, 0] = 1
    expected[1, 3] = 3
    np.testing.assert_array_equal(merged.labels, expected)
    assert merged.kept_pixels == 2
    # the baseline remembers the pure result, so the edits stay protected on the next run
    again = merge_keeping_edits(merged.labels, merged.baseline, merged.names, new, ["nucleus", "cell"])
    np.testing.assert_array_equal(again.labels, expected)



def test_a_class_no_longer_asked_for_leaves_the_names_once_no_pixel_holds_it():
    """Classes a, b, c; the next run asks for a and b: where c was only the model's answer, the run replaces it and c
    leaves the legend; where the user painted c, it stays, and so does every name before a label still in use. On a
    stack of which one slice was segmented, the other slices may still hold c: it stays."""
    baseline = np.array([[1, 2, 3, 3], [1, 2, 3, 3]], np.uint8)
    new = np.array([[1, 2, 2, 2], [1, 2, 1, 1]], np.uint8)
    merged = merge_keeping_edits(baseline.copy(), baseline, ["a", "b", "c"], new, ["a", "b"])
    assert merged.names == ["a", "b"]
    np.testing.assert_array_equal(merged.labels, new)
    painted = baseline.copy()
    painted[0, 0] = 3                                                    # the user's c
    merged = merge_keeping_edits(painted, baseline, ["a", "b", "c"], new, ["a", "b"])
    assert merged.names == ["a", "b", "c"] and merged.labels[0, 0] == 3
    own = baseline.copy()
    own[0, 1] = 4                                                        # a label of the user's, after c
    merged = merge_keeping_edits(own, baseline, ["a", "b", "c"], new, ["a", "b"])
    assert merged.names == ["a", "b", "c", "label 4"] and merged.labels[0, 1] == 4
    stack = np.stack([baseline, baseline])
    merged = merge_keeping_edits(stack.copy(), stack, ["a", "b", "c"], new, ["a", "b"], region=(0,))
    assert merged.names == ["a", "b", "c"]
    np.testing.assert_array_equal(merged.labels[1], baseline)


def test_the_merger_renumbers_every_value_of_the_layer_its_baseline_and_the_planes_found():
    """Values are gathered from the layer and only where the baseline and the planes found differ from it: the
    names and renumbering equal those of counting all three arrays whole, on random stacks and edits."""
    from napari_clearclip.editing import present_values, renumbering

    rng = np.random.default_rng(4)
    for _ in range(40):
        shape = (int(rng.integers(1, 4)), int(rng.integers(3, 30)), int(rng.integers(3, 30)))
        old_names = [f"c{i}" for i in range(int(rng.integers(1, 6)))]
        baseline = rng.integers(0, len(old_names) + 1, shape).astype(np.uint8)
        current = baseline.copy()
        painted = rng.random(shape) < rng.choice([0.0, 0.01, 0.2])
        current[painted] = rng.integers(0, len(old_names) + 4, int(painted.sum()))   # classes and labels of one's own
        current[current == int(rng.integers(0, len(old_names) + 1))] = 0              # a class erased everywhere
        planes = [tuple([int(i)]) for i in rng.choice(shape[0], int(rng.integers(1, shape[0] + 1)), replace=False)]
        found = {plane: current[plane].copy() for plane in planes}
        for plane in planes:                                                          # strokes made during the run
            found[plane][rng.random(shape[1:]) < 0.05] = int(rng.integers(0, len(old_names) + 6))
        new_names = list(rng.permutation(old_names + ["n1", "n2"])[: int(rng.integers(1, len(old_names) + 3))])
        merger = LabelsMerger(shape, new_names, current, baseline, old_names, found)
        values = np.union1d(present_values(current), present_values(baseline))
        for plane in found.values():
            values = np.union1d(values, present_values(plane))
        lookup, names = renumbering(values, old_names, new_names)
        assert merger.names == names
        assert (merger.lookup is None) == (lookup is None)
        if lookup is not None:
            np.testing.assert_array_equal(merger.lookup, lookup.astype(merger.lookup.dtype))

def test_merge_into_one_plane_renumbers_the_others():
    baseline = np.zeros((2, 2, 2), np.int32)
    baseline[0] = 1
    current = baseline.copy()
    merged = merge_keeping_edits(current, baseline, ["cell"], np.full((2, 2), 1), ["debris", "cell"], region=(1,))
    assert merged.names == ["debris", "cell"]
    np.testing.assert_array_equal(merged.labels[0], 2)   # earlier "cell" pixels follow their class
    np.testing.assert_array_equal(merged.labels[1], 1)
    assert merged.kept_pixels == 0


def test_class_colours_follow_names_not_positions():
    names = ["cell", "nucleus", "debris", "background", "membrane"]
    colours = class_colours(names)
    assert colours[4] == "transparent"                                 # background does not tint the image
    others = [colours[i] for i in (1, 2, 3, 5)]
    assert len(set(others)) == 4 and set(others) <= set(PALETTE)
    reordered = class_colours(names[::-1])
    for index, name in enumerate(names[::-1], start=1):
        assert reordered[index] == colours[names.index(name) + 1]      # same class, same colour
    named = class_colours(["background", "green", "red", "blue cells"])
    assert named[2] == "#3CB44B" and named[3] == "#E6194B" and named[4] == "#2F5BEA"
    cmap = colormap_dict(["a"])
    assert cmap[0] == "transparent" and cmap[None] == UNKNOWN_LABEL    # labels painted beyond the classes stay visible


def test_background_classes_are_transparent_and_others_stay_apart():
    from napari_clearclip.colours import ALIKE, difference

    for names in (["person", "background"], ["cell", "grey background", "other"], ["sky", "nothing"]):
        colours = class_colours(names)
        assert [colours[i] == "transparent" for i in range(1, len(names) + 1)] == [n != names[0] for n in names]
    assert class_colours(["cell", "junk"], background=("junk",))[2] == "transparent"   # one the user marks so
    rng = np.random.default_rng(0)
    words = ["cell", "nucleus", "debris", "membrane", "axon", "vessel", "tumour", "stroma", "fat", "bone", "sky",
             "car", "tree", "road", "dog", "cat", "grass", "water", "building", "person", "horse", "boat"]
    for _ in range(40):                                                # no two of the first eight alike
        names = list(rng.choice(words, size=8, replace=False))
        colours = list(class_colours(names).values())
        assert min(difference(a, b) for i, a in enumerate(colours) for b in colours[i + 1:]) >= ALIKE, names
    many = class_colours([f"class {i}" for i in range(40)])
    assert len(set(many.values())) == 40                               # no repeat before 40 classes


def test_merger_writes_planes_in_place_and_spares_strokes_made_during_the_run():
    volume = np.zeros((3, 4, 4), np.int32)
    baseline = volume.copy()
    volume[0] = 1
    baseline[0] = 1
    merger = LabelsMerger(volume.shape, ["cell", "debris"], volume, baseline, ["cell"],
                          found={(1,): volume[1].copy(), (2,): volume[2].copy()})
    merger.add((1,), np.full((4, 4), 2))
    merger.add((2,), np.full((4, 4), 1))
    update = merger.finish()
    volume[2, 0, 0] = 7          # painted while the run was computing
    kept = apply_update(volume, update)
    assert kept == 1 and volume[2, 0, 0] == 7
    assert np.all(volume[1] == 2) and np.all(volume[0] == 1) and np.sum(volume[2] == 1) == 15
    assert update.names == ["cell", "debris"] and update.lookup is None
    assert update.counts[1] == 16 and update.counts[2] == 16
    assert update.colours[0] == "transparent"


def test_segment_layer_merges_each_plane_and_keeps_maps_only_when_asked(tiny_segmenter, rgb_image, monkeypatch):
    from napari_clearclip.annotate import LayerRequest, segment_layer

    grey = rgb_image[..., 0]
    volume = np.stack([grey, grey[::-1], grey[:, ::-1]])
    layout = ImageLayout(volume.shape)
    asked = []
    real = tiny_segmenter.segment_steps

    def spy(image, classes, options=None, **keywords):
        asked.append(keywords["maps"])
        return real(image, classes, options, **keywords)

    monkeypatch.setattr(tiny_segmenter, "segment_steps", spy)
    for mode, maps in (("none", False), ("winning class", False), ("all classes", True)):
        request = LayerRequest(volume, layout, layout.planes(), ["a", "b"], {"contrast_limits": (0, 255)},
                               image_name="stack", probability_output=mode)
        steps = segment_layer(tiny_segmenter, request)
        while True:
            try:
                next(steps)
            except StopIteration as stop:
                result = stop.value
                break
        assert asked[-3:] == [maps] * 3
        expected = [_finish(real(volume[i], ["a", "b"], contrast_limits=(0, 255))) for i in range(3)]
        np.testing.assert_array_equal(result.update.full, np.stack([e.labels for e in expected]))
        assert result.update.full.dtype == np.uint8
        if mode == "none":
            assert result.maps == {}
        elif mode == "winning class":
            np.testing.assert_allclose(result.maps["stack probability"],
                                       np.stack([e.probabilities.max(0) for e in expected]), atol=1e-6)
        else:
            np.testing.assert_allclose(result.maps["stack P(b)"], np.stack([e.probabilities[1] for e in expected]),
                                       atol=1e-6)


def _finish(steps):
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def test_labels_that_do_not_fit_the_layer_say_what_to_do():
    from napari_clearclip.errors import ClearClipError

    current = np.arange(256, dtype=np.uint8).reshape(16, 16)   # 255 classes of an earlier run, all still painted
    names = [f"class {i}" for i in range(3)]                   # three new ones push them past uint8
    with pytest.raises(OverflowError, match="tick 'Result in a new layer'") as info:
        LabelsMerger(current.shape, names, current, current.copy(), [f"old {i}" for i in range(255)],
                     found={(): current.copy()})
    assert isinstance(info.value, ClearClipError)        # shown as a message, not as an unexpected error


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.int32, np.int64, np.uint32])
def test_label_counts_and_present_values_equal_numpy_on_every_label_type(dtype):
    from napari_clearclip.editing import present_values, value_counts

    rng = np.random.default_rng(int(np.dtype(dtype).itemsize))
    labels = rng.choice([0, 1, 2, 5, 200], size=(37, 53)).astype(dtype)
    np.testing.assert_array_equal(value_counts(labels), np.bincount(labels.ravel().astype(np.int64)))
    np.testing.assert_array_equal(present_values(labels), [0, 1, 2, 5, 200])
    np.testing.assert_array_equal(present_values(labels[:, ::2]), np.unique(labels[:, ::2]))


@pytest.mark.parametrize("seed", range(20))
def test_previews_never_touch_the_users_pixels_and_leave_what_the_finished_run_leaves(seed):
    """Parts of a run's labels written before it ends: never over a pixel the user painted (before the run, in an
    earlier round, or during it, even back to its old value over a preview); the finished run then leaves exactly
    what it leaves without previews; a run that does not finish leaves the layer and its baseline as they were,
    but for what the user painted."""
    from napari_clearclip.editing import apply_preview, layer_preview, revert_previews
    from napari_clearclip.tiled_labels import LabelsPreview as EnginePreview

    rng = np.random.default_rng(seed)
    shape = (2, 24, 32) if seed % 2 else (24, 32)
    planes = [(0,), (1,)] if seed % 2 else [()]
    names = ["cell", "debris", "background"]
    baseline = rng.integers(1, 4, shape).astype(np.uint8)
    data = baseline.copy()
    painted = rng.random(shape) < 0.1                        # painted since the last result
    data[painted] = rng.integers(1, 4, int(painted.sum()))
    painted = data != baseline                               # painting a pixel's own value is no edit
    edited = rng.random(shape) < 0.05                         # painted in earlier rounds
    found = {p: np.array(data[p], copy=True) for p in planes}
    new = {p: rng.integers(1, 4, shape[-2:]).astype(np.uint8) for p in planes}

    def finished(with_previews: bool):
        rng = np.random.default_rng(1000 + seed)   # the same previews and strokes in both runs
        layer, base = data.copy(), baseline.copy()
        merger = LabelsMerger(shape, names, layer, base, names, found, edited)
        expected: dict = {}
        during = np.zeros(shape, bool)
        for plane in planes:
            for _ in range(3):                               # a few previews of random boxes, partly final
                top, left = int(rng.integers(0, 20)), int(rng.integers(0, 28))
                box = (top, top + int(rng.integers(1, 8)), left, left + int(rng.integers(1, 8)))
                sl = (slice(box[0], box[1]), slice(box[2], box[3]))
                final = rng.random(new[plane][sl].shape) < 0.8
                stale = np.where(final, new[plane][sl], found[plane][sl])
                preview = layer_preview(merger, plane, EnginePreview(box, stale, final))
                if with_previews and preview is not None:
                    exp = expected.setdefault(plane, found[plane].copy())
                    apply_preview(layer, base, exp, preview)
            # the user paints during the run: some pixels a new value, some back to what the run found
            strokes = rng.random(shape[-2:]) < 0.05
            values = np.where(rng.random(shape[-2:]) < 0.5, found[plane], rng.integers(1, 4, shape[-2:]))
            layer[plane][strokes] = values[strokes]
            during[plane][strokes] = values[strokes] != found[plane][strokes]   # a visible change either way
            merger.add(plane, new[plane])
        update = merger.finish()
        apply_update(layer, update, expected if with_previews else None)
        return layer, during, update

    without, during, update = finished(False)
    with_previews, during2, update2 = finished(True)
    np.testing.assert_array_equal(during, during2)
    # a pixel painted during the run back to the value the run found shows as painted only over a preview, where it
    # is kept (without previews it is no change, and the run's label goes there): elsewhere the same pixels
    repainted = (with_previews != without) & ~during
    assert np.all(with_previews[repainted] == np.stack([found[p] for p in planes]).reshape(shape)[repainted])
    np.testing.assert_array_equal(np.where(repainted, 0, with_previews), np.where(repainted, 0, without))
    np.testing.assert_array_equal(update2.baseline, update.baseline)
    user = painted | edited | during | repainted
    for plane in planes:   # what the user painted stays; everything else is the new labels
        np.testing.assert_array_equal(np.where(user[plane], 0, with_previews[plane]),
                                      np.where(user[plane], 0, new[plane]))

    # a run that does not finish: its previews are taken back, the user's strokes stay
    layer, base = data.copy(), baseline.copy()
    merger = LabelsMerger(shape, names, layer, base, names, found, edited)
    expected = {}
    for plane in planes:
        preview = layer_preview(merger, plane, EnginePreview((0, shape[-2], 0, shape[-1]), new[plane],
                                                             np.ones(shape[-2:], bool)))
        if preview is not None:
            apply_preview(layer, base, expected.setdefault(plane, found[plane].copy()), preview)
            assert not np.any(preview.writable & (painted | edited)[plane])
    stroke = np.zeros(shape, bool)
    stroke[..., 3:6, 3:9] = True
    layer[stroke] = 7
    revert_previews(layer, base, expected, found)
    np.testing.assert_array_equal(np.where(stroke, 0, layer), np.where(stroke, 0, data))
    np.testing.assert_array_equal(np.where(stroke, 0, base), np.where(stroke, 0, baseline))
    assert np.all(layer[stroke] == 7)


@pytest.mark.parametrize("seed", range(6))
def test_where_a_preview_writes_is_found_in_blocks_as_over_the_whole_part(seed):
    """The pixels a preview may write (final, new, not painted, unchanged since the run found them), found a block of
    rows at a time, are those of one whole-part mask; a part with none writes nothing."""
    from napari_clearclip.editing import _writable

    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(1, 700)), int(rng.choice([3, 2048, 4096])))   # one block or many, a ragged last one
    labels = rng.integers(0, 3, shape).astype(np.uint8)
    expected = rng.integers(0, 3, shape).astype(np.uint8)
    baseline = np.where(rng.random(shape) < 0.9, expected, 9).astype(np.uint8)
    edited = rng.random(shape) < 0.1
    final = rng.random(shape) < 0.7
    whole = final & (labels != expected) & (expected == baseline) & ~edited
    np.testing.assert_array_equal(_writable(final, labels, expected, baseline, edited), whole)
    assert _writable(final, expected, expected, baseline, edited) is None       # nothing new anywhere


def test_spare_planes_are_taken_only_from_arrays_no_one_else_holds():
    """Copies of planes a finished run no longer uses are kept for the next run's copies, only where nothing else
    references them (a view, another holder: a later run's writes would reach it); within the size bound."""
    from napari_clearclip.editing import SparePlanes

    spares = SparePlanes(max_bytes=3 << 20, min_bytes=1 << 20)
    free, held, viewed = (np.zeros((1024, 1024), np.uint8) for _ in range(3))
    small = np.zeros(10, np.uint8)
    holder = [held]
    view = viewed[2:]
    planes = {"free": free, "held": held, "viewed": viewed, "small": small}
    free_id = id(free)
    del free, held, viewed      # each held by one other reference only: a list, a view
    assert spares.keep_from(planes) == 1 and planes == {}
    assert spares.nbytes == 1 << 20
    source = np.arange(1 << 20, dtype=np.uint8).reshape(1024, 1024)
    copy = spares.copy_of(source)
    assert id(copy) == free_id and spares.nbytes == 0                   # the spare, not a new array
    np.testing.assert_array_equal(copy, source)
    other = spares.copy_of(source)                                      # none left: a new copy
    assert id(other) != free_id and not np.shares_memory(other, source)
    np.testing.assert_array_equal(other, source)
    # an array taken back is written only by whoever takes it: the holder's and the view's arrays are untouched
    assert (holder[0] == 0).all() and (view == 0).all()
    arrays = {i: np.zeros((1024, 1024), np.uint8) for i in range(5)}
    assert spares.keep_from(arrays) == 3 and spares.nbytes == 3 << 20   # the bound


def test_spare_planes_readied_ahead_are_those_the_next_copies_take():
    """Readying makes spares of the layer's plane up to the count asked (those already there count), within the bound,
    and skips planes too small to matter; a copy then goes into one of them."""
    from napari_clearclip.editing import SparePlanes

    spares = SparePlanes(max_bytes=3 << 20, min_bytes=1 << 20)
    assert spares.prepare((1024, 1024), np.uint8, 2) == 2 and spares.nbytes == 2 << 20
    assert spares.prepare((1024, 1024), np.uint8, 2) == 0                 # there already
    assert spares.prepare((1024, 1024), np.uint16, 2) == 0                # 2 MiB more would pass the bound
    assert spares.prepare((10, 10), np.uint8, 2) == 0 and spares.nbytes == 2 << 20   # too small to keep
    readied = {id(a) for a in spares._arrays}
    source = np.arange(1 << 20, dtype=np.uint8).reshape(1024, 1024)
    copies = [spares.copy_of(source) for _ in range(2)]
    assert {id(c) for c in copies} == readied and spares.nbytes == 0
    for copy in copies:
        np.testing.assert_array_equal(copy, source)


@pytest.mark.parametrize("seed", range(4))
def test_a_merge_into_spare_planes_equals_one_into_new_arrays_and_gives_them_back_once_written(seed):
    """The merged plane (the run's labels, the plane as found where the user painted) is written into a spare plane
    where there is one: the same values as a merge into a new array, renumbering or not; once written into the
    layer, the update hands its planes back."""
    from napari_clearclip.editing import SparePlanes

    rng = np.random.default_rng(seed)
    shape = (2, 600, 700)
    baseline = rng.integers(1, 4, shape).astype(np.uint8)
    current = baseline.copy()
    current[rng.random(shape) < 0.01] = 2                           # painted
    edited = rng.random(shape) < 0.002                              # painted in an earlier round
    names = ["a", "b", "c"] if seed % 2 else ["c", "a", "b", "d"]   # the same classes, or renumbered
    found = {(p,): current[p].copy() for p in range(2)}
    runs = [rng.integers(1, len(names) + 1, shape[1:]).astype(np.uint8) for _ in range(2)]
    results = []
    for spares in (None, SparePlanes(min_bytes=1)):
        readied = set()
        if spares is not None:
            spares.prepare(shape[1:], np.uint8, 2)
            readied = {id(a) for a in spares._arrays}
        merger = LabelsMerger(shape, names, current, baseline, ["a", "b", "c"], dict(found), edited, spares)
        for p in range(2):
            merger.add((p,), runs[p])
        update = merger.finish()
        if spares is not None:
            assert {id(plane.labels) for plane in update.planes} == readied   # into the spares
        results.append(update)
    plain, spared = results
    for a, b in zip(plain.planes, spared.planes):
        np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(plain.counts, spared.counts)
    arrays = spared.written()
    assert len(arrays) == 2 and all(plane.labels is None for plane in spared.planes)


def test_previews_wait_while_the_layer_is_renumbered_or_new():
    """Only a run that keeps the layer's numbers previews into it: a class typed or removed renumbers the layer,
    which only the finished run does; a new layer has nothing to preview into."""
    from napari_clearclip.editing import layer_preview
    from napari_clearclip.tiled_labels import LabelsPreview as EnginePreview

    data = np.ones((8, 8), np.uint8)
    engine = EnginePreview((0, 8, 0, 8), np.full((8, 8), 2, np.uint8), np.ones((8, 8), bool))
    same = LabelsMerger(data.shape, ["a", "b"], data, data.copy(), ["a", "b"], {(): data.copy()})
    assert layer_preview(same, (), engine) is not None
    renumbered = LabelsMerger(data.shape, ["b", "a"], data, data.copy(), ["a", "b"], {(): data.copy()})
    assert layer_preview(renumbered, (), engine) is None
    assert layer_preview(LabelsMerger(data.shape, ["a", "b"]), (), engine) is None


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int32, np.uint32, np.int64, np.uint64])
def test_masked_writes_equal_numpys_masked_copy_on_every_label_type_and_view(dtype):
    from napari_clearclip.editing import write_where

    rng = np.random.default_rng(3)
    info = np.iinfo(dtype)
    for case in range(20):
        shape = tuple(int(v) for v in rng.integers(1, 60, 2))
        whole = rng.integers(info.min, info.max, (shape[0] + 7, shape[1] + 9), dtype=dtype, endpoint=True)
        reference = whole.copy()
        rows, cols = slice(3, 3 + shape[0]), slice(int(rng.integers(0, 9)), None, 1 + case % 2)
        target, expected_target = whole[rows, cols], reference[rows, cols]
        values = rng.integers(info.min, info.max, target.shape, dtype=dtype, endpoint=True)
        where = rng.random(target.shape) < rng.random()
        np.copyto(expected_target, values, where=where)
        write_where(target, values, where)
        assert np.array_equal(whole, reference)   # the view written exactly, nothing around it touched
    # values or a mask to broadcast: numpy's own masked copy
    target = np.zeros((4, 5), dtype)
    write_where(target, np.full((4, 5), 3, dtype), np.eye(4, 5, dtype=bool))
    write_where(target, np.full(5, 1, dtype), np.array([True, False, False, False, True]))
    assert target[:, 0].tolist() == [1, 1, 1, 1] and target[1, 1] == 3 and target[:, 4].tolist() == [1] * 4
    assert target[1, 2] == 0 and target[2, 2] == 3


@pytest.mark.parametrize("seed", range(3))
def test_a_finished_run_written_in_blocks_of_rows_equals_one_write_of_each_plane(seed, monkeypatch):
    """The GUI thread writes a finished run in blocks of rows (small masks): the layer and the pixels kept as painted
    are those of a whole-plane write, for any block size, 2-D and stacks, with and without previews' planes."""
    from napari_clearclip import editing

    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(1, 4)), int(rng.integers(1, 40)), int(rng.integers(1, 50)))
    planes = [(z,) for z in range(shape[0])]
    found = {p: rng.integers(0, 4, shape[1:]).astype(np.uint8) for p in planes}
    layer = np.stack([found[p] for p in planes])
    layer[rng.random(shape) < 0.1] = 3                        # painted while the run computed
    merger = LabelsMerger(shape, ["a", "b", "c"], layer, layer.copy(), ["a", "b", "c"], found)
    for p in planes:
        merger.add(p, rng.integers(1, 4, shape[1:]).astype(np.uint8))
    update = merger.finish()
    expected = {p: np.where(rng.random(shape[1:]) < 0.3, 2, found[p]).astype(np.uint8) for p in planes[:1]}

    def written(block_bytes):
        monkeypatch.setattr(editing, "WRITTEN_AT_ONCE_BYTES", block_bytes)
        data = layer.copy()
        return data, apply_update(data, update, expected)
    whole, whole_kept = written(1 << 40)
    for block_bytes in (1, 7, int(rng.integers(1, 3000))):
        data, kept = written(block_bytes)
        np.testing.assert_array_equal(data, whole)
        assert kept == whole_kept
    assert whole_kept > 0 and not np.array_equal(whole, layer)
