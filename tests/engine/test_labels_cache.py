"""The user cache's results and working copies: what can no longer be used goes, what holds corrections stays."""

from __future__ import annotations

import gc
import os
import time

import numpy as np
import zarr

from napari_clearclip.editable_copy import EditableCopy
from napari_clearclip.labels_cache import (KEEP_UNUSED_DAYS, discard_result, discarded_results, in_labels_folder,
                                           labels_folder, remove_stores, stale_stores)
from napari_clearclip.tiled_edits import keep_baseline, keep_result_record, kept_results

DAY = 86400.0
#: How this cache names a store made on 1 November 2026 at 10:00 (nothing named otherwise is removed).
STAMP = "-20261101-100000.zarr"


def _age(path, days):
    """Make everything in ``path`` look last written ``days`` ago."""
    when = time.time() - days * DAY
    for item in [*path.rglob("*"), path]:
        os.utime(item, (when, when))


def _result(name, session=None, image_file=None):
    store = labels_folder() / name
    group = zarr.open_group(str(store), mode="w")
    group.create_array("labels", data=np.arange(64, dtype=np.uint8).reshape(8, 8) % 3, chunks=(4, 4))
    keep_baseline(store)
    keep_result_record(store, image_file, ["cell", "background"])
    if session is not None:   # a result of another napari (closed since)
        group = zarr.open_group(str(store), mode="r+")
        record = dict(group.attrs["napari-clearclip tiled result"])
        group.attrs["napari-clearclip tiled result"] = {**record, "session": session}
    return store


def _users_store(path, fill=1):
    group = zarr.open_group(str(path), mode="w")
    group.create_array("labels", data=np.full((8, 8), fill, np.uint8), chunks=(4, 4))
    return zarr.open_group(str(path), mode="r")["labels"]


def _working_copy(users_store, saved=False):
    copy, _ = EditableCopy.open(_users_store(users_store), users_store, name=users_store.name)
    copy[2:5, 2:5] = 7
    if saved:
        copy.mark_saved(copy.version, users_store.with_name("saved_labels.zarr"))
    path = copy.edits_path
    del copy
    gc.collect()
    return path


def test_results_go_when_discarded_or_unused_for_long_and_never_while_shown_or_this_napari_s(tmp_path):
    recent_left = _result("recent-left" + STAMP, session="closed-napari")
    old_left = _result("old-left" + STAMP, session="closed-napari")
    old_left_no_file = _result("no-file" + STAMP, session="closed-napari", image_file=None)
    old_shown = _result("old-shown" + STAMP, session="closed-napari")
    old_mine = _result("old-mine" + STAMP)
    discarded = _result("discarded" + STAMP)
    for store in (old_left, old_left_no_file, old_shown, old_mine):
        _age(store, KEEP_UNUSED_DAYS + 1)
    _age(recent_left, KEEP_UNUSED_DAYS - 1)
    assert discarded_results() == []
    assert discard_result(discarded)
    assert discarded_results() == [discarded]
    assert {path.name for path, _ in kept_results()} == {"recent-left" + STAMP, "old-left" + STAMP, "no-file" + STAMP,
                                                         "old-shown" + STAMP, "old-mine" + STAMP}   # not the discarded
    stale = stale_stores(shown=[old_shown])
    assert {path.name for path in stale} == {"old-left" + STAMP, "no-file" + STAMP, "discarded" + STAMP}
    remove_stores(stale)
    assert sorted(path.name for path in labels_folder().iterdir()) == [
        "old-mine" + STAMP, "old-shown" + STAMP, "recent-left" + STAMP]


def test_working_copies_go_once_nothing_can_open_them_and_strokes_not_saved_wait(tmp_path):
    import shutil

    kept_store, rewritten_store = tmp_path / "a_labels.zarr", tmp_path / "c_labels.zarr"
    saved_store, unsaved_store = tmp_path / "b_labels.zarr", tmp_path / "e_labels.zarr"
    of_kept_unsaved = _working_copy(kept_store)                 # its store unchanged: strokes come back
    _age(of_kept_unsaved, KEEP_UNUSED_DAYS + 5)
    of_deleted_saved = _working_copy(saved_store, saved=True)
    of_deleted_unsaved = _working_copy(unsaved_store)
    shutil.rmtree(saved_store)
    shutil.rmtree(unsaved_store)
    of_rewritten_unsaved = _working_copy(rewritten_store)
    time.sleep(0.05)
    _users_store(rewritten_store, fill=2)                        # written again since
    assert stale_stores() == [of_deleted_saved]                  # strokes saved: nothing to bring back
    _age(of_deleted_unsaved, KEEP_UNUSED_DAYS - 1)
    _age(of_rewritten_unsaved, KEEP_UNUSED_DAYS - 1)
    assert stale_stores() == [of_deleted_saved]                  # not saved: they wait
    _age(of_deleted_unsaved, KEEP_UNUSED_DAYS + 1)
    _age(of_rewritten_unsaved, KEEP_UNUSED_DAYS + 1)
    assert set(stale_stores()) == {of_deleted_saved, of_deleted_unsaved, of_rewritten_unsaved}
    remove_stores(stale_stores())
    assert [path.name for path in labels_folder().iterdir()] == [of_kept_unsaved.name]
    reopened, earlier = EditableCopy.open(zarr.open_group(str(kept_store), mode="r")["labels"], kept_store,
                                          name=kept_store.name)
    assert earlier is not None and reopened.resumed and int(reopened[3, 3]) == 7   # the old strokes come back


def test_a_working_copy_in_use_stays_even_when_its_store_is_gone(tmp_path):
    store = tmp_path / "d_labels.zarr"
    copy, _ = EditableCopy.open(_users_store(store), store, name=store.name)
    copy[0, 0] = 5
    copy.mark_saved(copy.version, tmp_path / "saved.zarr")
    import shutil

    shutil.rmtree(store)
    assert stale_stores() == []
    path = copy.edits_path
    del copy
    gc.collect()
    assert stale_stores() == [path]


def test_unfinished_and_unreadable_stores_go_after_a_while_and_nothing_outside_the_cache_is_removed(tmp_path):
    folder = labels_folder()
    folder.mkdir(parents=True, exist_ok=True)
    killed_run, running = folder / f"slide{STAMP}.partial", folder / f"slide{STAMP[:-5]}-2.zarr.partial"
    cut_short, foreign, unrecorded = folder / f"cut{STAMP}", folder / f"foreign{STAMP}", folder / f"old-version{STAMP}"
    for path in (killed_run, running, cut_short, foreign):
        (path / "c" / "0").mkdir(parents=True)
        (path / "c" / "0" / "0").write_bytes(b"chunk")
    (foreign / "zarr.json").write_text("{not json")
    _users_store(unrecorded)
    (folder / "notes.txt").write_text("the user's")
    users = folder / "my-labels.zarr"                                  # a user's own store, in a shared cache folder
    _users_store(users)
    (users / "zarr.json").write_text("{not json")
    _age(users, KEEP_UNUSED_DAYS + 100)
    _age(killed_run, 1.5)
    _age(cut_short, 0.1)
    _age(foreign, KEEP_UNUSED_DAYS + 1)
    _age(unrecorded, KEEP_UNUSED_DAYS + 1)
    assert set(stale_stores()) == {killed_run, cut_short, foreign, unrecorded}
    outside = tmp_path / "mine.zarr"
    _users_store(outside)
    assert not in_labels_folder(outside) and not discard_result(outside)
    assert not in_labels_folder(users) and not discard_result(users)
    remove_stores([*stale_stores(), outside, folder / "notes.txt", users])
    assert sorted(path.name for path in folder.iterdir()) == ["my-labels.zarr", "notes.txt",
                                                              "slide" + STAMP[:-5] + "-2.zarr.partial"]
    assert (outside / "zarr.json").exists()
