"""Labels too large to hold, painted without writing the user's store: reads equal the store with the strokes over it."""

from __future__ import annotations

import numpy as np
import pytest


def _store(path, labels, chunks):
    import zarr

    array = zarr.create_array(str(path), shape=labels.shape, chunks=chunks, dtype=labels.dtype, fill_value=0)
    array[:] = labels
    return zarr.open_array(str(path), mode="r")


def _region(rng, size):
    start = int(rng.integers(-size, size))
    stop = int(rng.integers(-size, size + 5))
    step = int(rng.choice([1, 1, 1, 2, 3]))
    return slice(start, stop, step) if rng.random() < 0.8 else slice(None, None, step)


@pytest.mark.parametrize("seed", range(6))
def test_an_editable_copy_reads_as_the_store_with_every_stroke_painted_and_never_writes_the_store(tmp_path, seed):
    from napari_clearclip.editable_copy import EditableCopy

    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(20, 90)), int(rng.integers(20, 90)))
    chunks = (int(rng.integers(4, 24)), int(rng.integers(4, 24)))
    original = rng.integers(0, 5, shape).astype(np.uint16)
    source = _store(tmp_path / "slide_labels.zarr", original, chunks)
    files_before = {p: p.read_bytes() for p in (tmp_path / "slide_labels.zarr").rglob("*") if p.is_file()}
    copy = EditableCopy(source, tmp_path / "cache" / "edits.zarr")
    expected = original.copy()
    np.testing.assert_array_equal(copy[:, :], expected)
    assert not copy.edited and not (tmp_path / "cache").exists()        # nothing made before the first stroke
    for _ in range(40):
        what = rng.integers(0, 4)
        if what == 0:      # a region painted (as napari's fill and scripts do)
            key = (_region(rng, shape[0]), _region(rng, shape[1]))
            value = int(rng.integers(0, 7))
            copy[key] = value
            expected[key] = value
        elif what == 1:    # coordinates painted (as napari's brush does), with a value each
            count = int(rng.integers(1, 60))
            rows, cols = rng.integers(0, shape[0], count), rng.integers(0, shape[1], count)
            rows, cols = np.unique(np.stack([rows, cols]), axis=1)
            values = rng.integers(0, 7, rows.size).astype(np.uint16)
            copy[(rows, cols)] = values
            expected[rows, cols] = values
        elif what == 2:    # coordinates read (napari's undo history)
            rows, cols = rng.integers(0, shape[0], 30), rng.integers(0, shape[1], 30)
            np.testing.assert_array_equal(copy[(rows, cols)], expected[rows, cols])
        else:              # a region read, with an axis dropped sometimes
            if rng.random() < 0.3:
                row = int(rng.integers(-shape[0], shape[0]))
                np.testing.assert_array_equal(copy[row], expected[row])
                np.testing.assert_array_equal(copy[..., row % shape[1]], expected[..., row % shape[1]])
            else:
                key = (_region(rng, shape[0]), _region(rng, shape[1]))
                np.testing.assert_array_equal(copy[key], expected[key])
    np.testing.assert_array_equal(np.asarray(copy), expected)
    files_after = {p: p.read_bytes() for p in (tmp_path / "slide_labels.zarr").rglob("*") if p.is_file()}
    assert files_after == files_before                                   # the user's store, byte for byte
    np.testing.assert_array_equal(source[:], original)


def test_an_editable_copy_refuses_what_labels_are_not():
    from napari_clearclip.editable_copy import EditableCopy

    class Stack:
        shape, dtype, chunks = (3, 8, 8), np.uint8, (1, 8, 8)

    with pytest.raises(ValueError, match="2-D"):
        EditableCopy(Stack(), "edits.zarr")


def _labels_store(path, labels, chunks):
    import zarr

    group = zarr.open_group(str(path), mode="w")
    group.create_array("labels", shape=labels.shape, chunks=chunks, dtype=labels.dtype, fill_value=0)[:] = labels
    return zarr.open_group(str(path), mode="r")["labels"]


def _labels_store_read(path):
    import zarr

    return zarr.open_group(str(path), mode="r")["labels"]


def _opened(store_path, source):
    from napari_clearclip.editable_copy import EditableCopy

    return EditableCopy.open(source, store_path, name="slide_labels.zarr")


@pytest.mark.parametrize("seed", range(4))
def test_strokes_not_saved_are_there_again_when_the_store_is_opened_again_and_saved_ones_are_cleared(tmp_path, seed):
    """napari closed with strokes not saved: opening the same store again gives them back, exactly (a chunk erased
    whole included), also after its folder was moved; a store opened twice at once is painted in one working copy;
    once saved (and not painted since),
    the working copy is removed at the next opening; a store written again since is opened as it is now."""
    import gc

    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(20, 70)), int(rng.integers(20, 70)))
    chunks = (int(rng.integers(4, 16)), int(rng.integers(4, 16)))
    original = rng.integers(1, 5, shape).astype(np.uint8)       # no chunk holds only zeros
    store = tmp_path / "slide_labels.zarr"
    source = _labels_store(store, original, chunks)
    files_before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    copy, earlier = _opened(store, source)
    assert earlier is None and not copy.resumed
    expected = original.copy()
    for _ in range(15):
        key = (_region(rng, shape[0]), _region(rng, shape[1]))
        value = int(rng.integers(0, 6))
        copy[key] = value
        expected[key] = value
    copy[0 : chunks[0], 0 : chunks[1]] = 0                         # a chunk erased whole: nothing left to store
    expected[0 : chunks[0], 0 : chunks[1]] = 0
    edits = copy.edits_path
    twice, _ = _opened(store, source)                               # opened again while the first is open:
    assert twice is copy                                            # one working copy, never two writing it
    del copy, twice
    gc.collect()                                                    # napari closed

    again, earlier = _opened(store, source)
    assert again.resumed and again.edits_path == edits and earlier["source"] == str(store.resolve())
    np.testing.assert_array_equal(np.asarray(again), expected)
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == files_before   # the store untouched
    version = again.version
    again[2, 2] = 7                                                 # painted while the save went
    expected[2, 2] = 7
    again.mark_saved(version, tmp_path / "fixed_labels.zarr")
    del again
    gc.collect()
    third, earlier = _opened(store, source)                         # that stroke was not saved: kept
    assert third.resumed
    np.testing.assert_array_equal(np.asarray(third), expected)
    third.mark_saved(third.version, tmp_path / "fixed_labels.zarr")
    del third
    gc.collect()
    fourth, earlier = _opened(store, source)                        # all saved: cleared, the store as it is
    assert earlier is None and not fourth.resumed and not edits.exists()
    np.testing.assert_array_equal(np.asarray(fourth), original)
    fourth[3, 3] = 8
    kept = fourth.edits_path
    del fourth
    gc.collect()
    import zarr

    moved = tmp_path / "elsewhere" / "slide_labels.zarr"               # its folder renamed: the same store
    moved.parent.mkdir()
    store.rename(moved)
    at_new, earlier = _opened(moved, _labels_store_read(moved))
    assert at_new.resumed and at_new.edits_path == kept and earlier is not None
    assert at_new[3, 3] == 8
    del at_new
    gc.collect()
    moved.rename(store)                                                # and back
    again, earlier = _opened(store, source)
    assert again.resumed and again.edits_path == kept
    del again
    gc.collect()
    zarr.open_group(str(store), mode="r+").attrs["rewritten"] = True   # the store written again since
    fifth, earlier = _opened(store, source)
    assert earlier is None and fifth.edits_path != kept and kept.exists()
    np.testing.assert_array_equal(np.asarray(fifth), original)


PAINT_AND_EXIT = """
import sys
import zarr
from napari_clearclip.editable_copy import EditableCopy

store = sys.argv[1]
copy, earlier = EditableCopy.open(zarr.open_group(store, mode="r")["labels"], store, name="slide_labels.zarr")
print(earlier is not None, flush=True)
copy[5:9, 3:30] = 4
copy[40, :] = 0
"""


def test_strokes_of_a_process_that_ended_are_there_when_another_opens_the_store(tmp_path):
    """As napari does: one process paints and exits without saving; the next one opening the store gets them."""
    import os
    import subprocess
    import sys

    import zarr

    rng = np.random.default_rng(9)
    original = rng.integers(1, 4, (50, 60)).astype(np.uint8)
    store = tmp_path / "slide_labels.zarr"
    _labels_store(store, original, (16, 16))
    env = dict(os.environ)
    done = subprocess.run([sys.executable, "-c", PAINT_AND_EXIT, str(store)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["False"], done.stderr[-2000:]
    copy, earlier = _opened(store, zarr.open_group(str(store), mode="r")["labels"])
    expected = original.copy()
    expected[5:9, 3:30], expected[40, :] = 4, 0
    assert copy.resumed and earlier is not None
    np.testing.assert_array_equal(np.asarray(copy), expected)


def test_a_damaged_working_copy_is_left_as_it_is_and_the_store_opens_as_saved(tmp_path, caplog):
    """A working copy whose chunks' array is gone (or of another shape): the store opens as saved, the strokes go
    into a new working copy, the damaged one is kept, and the log says so."""
    import gc
    import shutil

    original = np.arange(40 * 50, dtype=np.uint16).reshape(40, 50) % 7 + 1
    store = tmp_path / "slide_labels.zarr"
    source = _labels_store(store, original, (16, 16))
    copy, _ = _opened(store, source)
    copy[0:5, 0:5] = 3
    damaged = copy.edits_path
    del copy
    gc.collect()
    shutil.rmtree(damaged / "labels")
    with caplog.at_level("WARNING"):
        fresh, earlier = _opened(store, source)
    assert earlier is None and fresh.edits_path != damaged and damaged.exists()
    np.testing.assert_array_equal(np.asarray(fresh), original)
    assert "cannot be read" in caplog.text and str(damaged) in caplog.text
    fresh[1, 1] = 6
    assert fresh.edits_path.exists() and fresh[1, 1] == 6
