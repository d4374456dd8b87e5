"""Arrays a run writes whole: in small pages, mapped at once where asked, otherwise NumPy's."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from napari_clearclip import fresh_memory

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux") or not Path("/proc/self/smaps").exists(),
                                reason="reads Linux's account of this process's memory")


def mapping_of(array: np.ndarray) -> dict:
    """The kB figures (Rss, AnonHugePages, ...) Linux gives for the mappings over ``array``'s memory, summed (asking
    for huge pages for part of a mapping splits it), and under "VmFlags" the set of their flags ("hg": huge pages
    asked for, "nh": refused)."""
    first = array.__array_interface__["data"][0]
    last = first + array.nbytes
    figures: dict = {"VmFlags": set()}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):       # a mapping's first line: start-end perms ...
            start, end = (int(part, 16) for part in head.split("-"))
            inside = start < last and first < end
        elif inside and head == "VmFlags:":
            figures["VmFlags"] |= set(line.split()[1:])
        elif inside and line.split()[-1] == "kB":
            figures[head.rstrip(":")] = figures.get(head.rstrip(":"), 0) + int(line.split()[1])
    return figures


def huge_pages_offered() -> bool:
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[never]" not in mode


@pytest.mark.parametrize("written_whole", [False, True])
def test_large_arrays_have_the_shape_and_type_asked_and_hold_what_is_written(written_whole):
    array = fresh_memory.empty((3000, 2100), np.float16, written_whole=written_whole)
    assert array.shape == (3000, 2100) and array.dtype == np.float16
    assert array.flags.c_contiguous and array.flags.writeable
    values = np.random.default_rng(0).random((3000, 2100)).astype(np.float16)
    array[...] = values
    np.testing.assert_array_equal(array, values)
    assert fresh_memory.empty(4096, np.uint8).shape == (4096,)
    small = fresh_memory.empty((10, 20), np.int32)
    assert small.shape == (10, 20) and small.flags.owndata                 # small arrays: NumPy's own


@linux_only
def test_large_arrays_are_written_in_small_pages_where_numpy_would_take_huge_ones():
    if not huge_pages_offered():
        pytest.skip("this system has no transparent huge pages: every page is small")
    shape = (4096, 4096)
    numpy_own = np.empty(shape, np.uint8)
    numpy_own.fill(1)
    if "hg" not in mapping_of(numpy_own)["VmFlags"]:                # NumPy asks for them at this size, unless told not
        pytest.skip("NumPy is set to ask for no huge pages here: nothing to tell apart")
    for written_whole in (False, True):
        mine = fresh_memory.empty(shape, np.uint8, written_whole=written_whole)
        mine.fill(1)
        mapping = mapping_of(mine)
        assert "hg" not in mapping["VmFlags"] and mapping["AnonHugePages"] == 0
        if not written_whole or fresh_memory._huge_pages_always():
            assert "nh" in mapping["VmFlags"]                         # refused outright


@linux_only
def test_arrays_written_whole_are_mapped_at_once_and_others_as_they_are_written():
    size = 8 << 20
    whole = fresh_memory.empty(size, np.uint8, written_whole=True)
    assert mapping_of(whole)["Rss"] * 1024 >= size                         # every page, before any write
    lazy = fresh_memory.empty(size, np.uint8)
    assert mapping_of(lazy)["Rss"] * 1024 < size // 4
    lazy[: size // 2] = 1
    assert size // 2 <= mapping_of(lazy)["Rss"] * 1024 < size


def test_spare_arrays_mapped_ahead_are_the_ones_taken_and_a_take_waits_for_them(monkeypatch):
    import threading

    from napari_clearclip.tiled_labels import SpareArrays

    release, made = threading.Event(), []
    real = fresh_memory.empty

    def slow_empty(shape, dtype, written_whole=False):
        release.wait(10)
        array = real(shape, dtype, written_whole)
        made.append((threading.current_thread().name, array))
        return array
    monkeypatch.setattr(fresh_memory, "empty", slow_empty)
    spare = SpareArrays()
    spare.map_ahead((2048, 2048), (np.uint8, np.float16))
    spare.map_ahead((2048, 2048), (np.uint8,))                 # already being mapped: nothing more
    spare.map_ahead((100, 100), (np.uint8,))                   # small: NumPy's own, when taken
    taken = []
    taker = threading.Thread(target=lambda: taken.append(spare.take((2048, 2048), np.float16, written_whole=True)))
    taker.start()
    taker.join(0.3)
    assert taker.is_alive()                                    # waits for the mapping under way...
    release.set()
    taker.join(10)
    labels = spare.take((2048, 2048), np.uint8, written_whole=True)
    assert [name for name, _ in made] == ["clearclip-map-ahead"] * 2
    assert taken[0] is made[1][1] and labels is made[0][1]     # ... and takes what it mapped
    assert spare.take((2048, 2048), np.uint8) is not labels    # taken once: the next one is new
    assert len(made) == 3 and made[2][0] == threading.current_thread().name


def test_a_new_session_maps_its_labels_ahead_while_it_reads_the_stored_features(monkeypatch, tmp_path):
    """Re-opening a stored image, a fresh labelling's labels and margins are mapped while the features are read; a
    run that encodes its image maps nothing ahead (that memory would add to the encoding's own), nor does a re-run
    on the same image, which starts from the kept state."""
    import threading

    from napari_clearclip import Segmenter
    from napari_clearclip.demo.scenes import DEMO_CLASSES, make_scene

    made = []
    real = fresh_memory.empty

    def noted(shape, dtype, written_whole=False):
        made.append((threading.current_thread().name, tuple(shape), np.dtype(dtype).name, written_whole))
        return real(shape, dtype, written_whole)
    monkeypatch.setattr(fresh_memory, "empty", noted)

    def ahead():
        return sorted(entry[1:] for entry in made if entry[0] == "clearclip-map-ahead")
    image = np.kron(make_scene(3, size=256).image, np.ones((8, 8, 1), np.uint8))      # 2048 x 2048
    classes = DEMO_CLASSES.split("\n")
    encoded = Segmenter("synthetic-tiny", device="cpu", disk_cache=False, feature_store=tmp_path / "features")
    first = encoded.segment(image, classes, maps=False).labels
    assert ahead() == []
    reopened = Segmenter("synthetic-tiny", device="cpu", disk_cache=False, feature_store=tmp_path / "features")
    made.clear()
    np.testing.assert_array_equal(reopened.segment(image, classes, maps=False).labels, first)
    assert ahead() == [((2048, 2048), "float16", True), ((2048, 2048), "uint8", True)]
    assert not [entry for entry in made if entry[0] != "clearclip-map-ahead" and entry[3]]   # none mapped twice
    made.clear()
    strokes = np.zeros(image.shape[:2], np.int32)
    strokes[100:110, 100:140] = 2
    again = reopened.segment(image, classes, maps=False, strokes=strokes).labels
    assert ahead() == []
    fresh = Segmenter("synthetic-tiny", device="cpu", disk_cache=False)
    np.testing.assert_array_equal(again, fresh.segment(image, classes, maps=False, strokes=strokes).labels)


@linux_only
def test_a_re_runs_copies_equal_the_previous_arrays_in_memory_mapped_whole_or_in_spares(monkeypatch):
    """A re-run copies the previous state's arrays (which stay intact for a run in flight) row-shared between threads:
    every value equal, the copy its own, mapped before it is written where no spare is at hand, a spare where one is."""
    import torch

    from napari_clearclip.tiled_labels import SpareArrays, _copied

    real, asked = fresh_memory.empty, []

    def recorded_empty(shape, dtype, written_whole=False):
        asked.append(written_whole)
        return real(shape, dtype, written_whole)
    monkeypatch.setattr(fresh_memory, "empty", recorded_empty)
    rng = np.random.default_rng(3)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for shape, dtype in (((1531, 1777), np.uint8), ((1531, 1777), np.float16), ((1024, 2048), np.float32),
                             ((3, 5), np.float32), ((0, 7), np.uint8)):
            source = (rng.random(shape) * 200).astype(dtype)
            copy = _copied(source, SpareArrays())
            assert copy.shape == source.shape and copy.dtype == source.dtype
            assert np.array_equal(copy, source) and not np.shares_memory(copy, source)
            if source.nbytes >= fresh_memory.SMALL_PAGES_FROM:
                figures = mapping_of(copy)
                assert fresh_memory.owns_its_memory(copy) and "hg" not in figures["VmFlags"]
                assert figures.get("AnonHugePages", 0) == 0
            assert asked.pop() is True                 # mapped whole before the copy writes it
            if source.size:
                copy.flat[0] += 1
                assert not np.array_equal(copy, source)
        spare = SpareArrays()
        kept = np.full((1024, 2048), -1.0, np.float32)
        spare._arrays[(kept.shape, kept.dtype)] = kept
        source = rng.random((1024, 2048)).astype(np.float32)
        copy = _copied(source, spare)
        assert copy is kept and np.array_equal(kept, source) and not asked
    finally:
        torch.set_num_threads(threads)
