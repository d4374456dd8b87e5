"""Image features on disk: a new session does not encode an image again; bad stores heal; the folder stays bounded."""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pytest

from napari_clearclip import Segmenter
from napari_clearclip.demo.scenes import make_scene
from napari_clearclip.feature_store import FeatureStore

CLASSES = ["red", "green", "blue", "yellow", "background"]


def session(tmp_path, **keywords):
    return Segmenter("synthetic-tiny", device="cpu", disk_cache=False, feature_store=tmp_path / "features", **keywords)


def refuse_encoding(segmenter, monkeypatch):
    def refuse(*_):
        raise AssertionError("the image was encoded again")

    monkeypatch.setattr(segmenter, "_encode_crops", refuse)


def test_a_new_session_reads_the_features_instead_of_encoding(tmp_path, monkeypatch):
    image = make_scene(3, size=320).image
    first = session(tmp_path).segment(image, CLASSES, maps=False)
    FeatureStore.flush()                                                  # runs write in the background
    stores = list((tmp_path / "features").glob("*.zarr"))
    assert len(stores) == 1
    later = session(tmp_path)
    refuse_encoding(later, monkeypatch)
    again = later.segment(image, CLASSES, maps=False)
    np.testing.assert_array_equal(again.labels, first.labels)
    strokes = np.zeros(image.shape[:2], np.int32)
    strokes[100:110, 100:140] = 2
    taught = later.segment(image, CLASSES, strokes=strokes, maps=False)   # strokes too, from the stored features
    fresh = Segmenter("synthetic-tiny", device="cpu", disk_cache=False, feature_store=False)
    np.testing.assert_array_equal(taught.labels, fresh.segment(image, CLASSES, strokes=strokes, maps=False).labels)
    assert (taught.labels != again.labels).any()                         # the stroke taught something
    other = make_scene(4, size=320).image
    with pytest.raises(AssertionError, match="encoded again"):            # another image is another store
        later.segment(other, CLASSES, maps=False)


@pytest.mark.parametrize("store", ["as written", "written before guides were kept", "guide damaged"])
def test_a_new_session_snaps_to_the_stored_image_without_preparing_it_again(tmp_path, monkeypatch, store):
    import json

    from napari_clearclip import segmenter as segmenter_module

    image = make_scene(5, size=300).image
    first = session(tmp_path).segment(image, CLASSES, maps=False, refine="pamr")
    FeatureStore.flush()
    path = next((tmp_path / "features").glob("*.zarr"))
    written = json.loads((path / "zarr.json").read_text())["attributes"]["guide"]
    assert written == [3, 256, 256]                                      # the image at the model's working size
    assert (path / "guide" / "zarr.json").exists()
    if store != "as written":
        attributes = json.loads((path / "zarr.json").read_text())
        if store == "guide damaged":
            attributes["attributes"]["guide"] = [3, 7, 7]  # not the array stored
        else:
            del attributes["attributes"]["guide"]
            shutil.rmtree(path / "guide")
        (path / "zarr.json").write_text(json.dumps(attributes))
    prepared = []
    for name in ("prepare", "prepare_with_intensities"):
        monkeypatch.setattr(segmenter_module, name, counted(getattr(segmenter_module, name), prepared))
    later = session(tmp_path)
    if store != "guide damaged":
        refuse_encoding(later, monkeypatch)
        again = later.segment(image, CLASSES, maps=False, refine="pamr")
    else:
        with pytest.warns(RuntimeWarning, match="guide image is damaged"):
            again = later.segment(image, CLASSES, maps=False, refine="pamr")
    # read from the store with the features, or prepared from the image (once: by the encoding of a damaged store)
    assert len(prepared) == {"as written": 0, "written before guides were kept": 1, "guide damaged": 1}[store]
    np.testing.assert_array_equal(again.labels, first.labels)
    fresh = Segmenter("synthetic-tiny", device="cpu", disk_cache=False, feature_store=False)
    np.testing.assert_array_equal(again.labels, fresh.segment(image, CLASSES, maps=False, refine="pamr").labels)
    if store == "guide damaged":
        FeatureStore.flush()
        assert json.loads((path / "zarr.json").read_text())["attributes"]["guide"] == written  # healed


@pytest.mark.parametrize("kind", ["uint8", "float"])
def test_the_image_goes_into_the_store_as_whole_intensities_or_when_no_larger_than_its_features(tmp_path,
                                                                                               monkeypatch, kind):
    """A uint8 image keeps as uint8 intensities at the working size (a quarter of the bytes, normalised on reading to
    the very values); an image that is not whole values there keeps as float32, and only when no larger than its
    features. Either way a new session snaps to what was kept without preparing the image, to the same labels."""
    import json

    import zarr

    from napari_clearclip import segmenter as segmenter_module

    image = make_scene(5, size=300).image
    if kind == "float":  # scaled by its own range: not whole values once resized
        image = image.astype(np.float32) / 255 + np.random.default_rng(0).random(image.shape, np.float32) * 0.01
    seg = session(tmp_path)
    first = {short_side: seg.segment(image, CLASSES, maps=False, short_side=short_side, refine="pamr").labels
             for short_side in (256, 128)}  # at 128 px the demo model's features are smaller than the float image
    FeatureStore.flush()
    kept = {}
    for path in (tmp_path / "features").glob("*.zarr"):
        attributes = json.loads((path / "zarr.json").read_text())["attributes"]
        stored = str(zarr.open_group(str(path), mode="r")["guide"].dtype) if (path / "guide").exists() else None
        kept[attributes["identity"]["windows"][0]] = (attributes["guide"], stored)
    if kind == "uint8":
        assert kept == {256: ([3, 256, 256], "uint8"), 128: ([3, 128, 128], "uint8")}
    else:
        assert kept == {256: ([3, 256, 256], "float32"), 128: (None, None)}
    prepared = []
    for name in ("prepare", "prepare_with_intensities"):
        monkeypatch.setattr(segmenter_module, name, counted(getattr(segmenter_module, name), prepared))
    later = session(tmp_path)
    refuse_encoding(later, monkeypatch)
    fresh = Segmenter("synthetic-tiny", device="cpu", disk_cache=False, feature_store=False)
    for short_side, labels in first.items():
        prepared.clear()
        again = later.segment(image, CLASSES, maps=False, short_side=short_side, refine="pamr").labels
        assert len(prepared) == (0 if kept[short_side][1] else 1)
        np.testing.assert_array_equal(again, labels)
        np.testing.assert_array_equal(again, fresh.segment(image, CLASSES, maps=False, short_side=short_side,
                                                           refine="pamr").labels)


def test_whole_intensities_give_back_the_prepared_image_bit_for_bit():
    """What the store keeps of a uint8 image: checked against the model's own preparation on sizes that resize up,
    down and not at all, with the official CLIP mean and std."""
    import torch

    from napari_clearclip.image import normalise, prepare, prepare_with_intensities, whole_rgb

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    rng = np.random.default_rng(3)
    for shape in ((300, 200, 3), (448, 448, 3), (97, 131), (1000, 700, 4)):
        image = rng.integers(0, 256, shape, np.uint8)
        pixels = prepare(image, mean, std, 448)
        for rows_at_once in (7, 256):  # checked a few rows at a time: the same whatever the rows
            whole = whole_rgb(pixels, mean, std, rows_at_once)
            assert whole is not None and whole.dtype == torch.uint8
            assert torch.equal(normalise(whole, mean, std), pixels)
        for short_side in (448, None):  # what the preparing knows of a uint8 image: the same intensities, unchecked
            again, intensities = prepare_with_intensities(image, mean, std, short_side)
            assert torch.equal(again, prepare(image, mean, std, short_side))
            assert torch.equal(intensities, whole_rgb(again, mean, std))
        rgb = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image[..., :3], -1, 0) if image.ndim == 3
                                                    else np.stack([image] * 3))).float()
        assert torch.equal(prepare(image, mean, std, None),
                           (rgb - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1))
    assert prepare_with_intensities(rng.random((300, 200, 3), np.float32), mean, std, 448)[1] is None
    off_by_one = pixels.clone()
    off_by_one[1, -1, -1] += 1e-3                                           # one value in the last rows
    assert whole_rgb(off_by_one, mean, std, 7) is None
    scaled = prepare(rng.random((300, 200, 3), np.float32), mean, std, 448)   # float, resized: not whole values
    assert whole_rgb(scaled, mean, std) is None
    assert whole_rgb(torch.full((3, 4, 4), float("nan")), mean, std) is None


def test_another_model_method_or_window_setting_never_reads_the_store(tmp_path):
    image = make_scene(3, size=256).image
    seg = session(tmp_path)
    seg.segment(image, CLASSES, maps=False)
    seg.segment(image, CLASSES, maps=False, stride=16)
    seg.method = "naclip"
    seg.segment(image, CLASSES, maps=False)
    FeatureStore.flush()
    assert len(list((tmp_path / "features").glob("*.zarr"))) == 3


@pytest.mark.parametrize("damage", ["truncated", "foreign", "other image"])
def test_a_damaged_or_foreign_store_is_a_miss_said_once_and_written_again(tmp_path, damage):
    import zarr

    image = make_scene(3, size=256).image
    expected = session(tmp_path).segment(image, CLASSES, maps=False).labels
    FeatureStore.flush()
    store = next((tmp_path / "features").glob("*.zarr"))
    if damage == "truncated":
        for chunk in [p for p in store.rglob("*") if p.is_file() and "batch_00000" in str(p) and p.name != "zarr.json"]:
            chunk.write_bytes(chunk.read_bytes()[:10])
    elif damage == "foreign":
        shutil.rmtree(store)
        zarr.open_group(str(store), mode="w").attrs.update({"format": "something else"})
    else:
        other = session(tmp_path / "other")
        other.segment(make_scene(4, size=256).image, CLASSES, maps=False)
        FeatureStore.flush()
        shutil.rmtree(store)
        shutil.copytree(next((tmp_path / "other" / "features").glob("*.zarr")), store)
    later = session(tmp_path)
    with pytest.warns(RuntimeWarning, match="computed again"):
        labels = later.segment(image, CLASSES, maps=False).labels
    np.testing.assert_array_equal(labels, expected)
    reread = session(tmp_path)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")                                    # healed: no warning any more
        np.testing.assert_array_equal(reread.segment(image, CLASSES, maps=False).labels, expected)


def test_the_store_folder_is_bounded_and_a_dead_writer_leaves_nothing_readable(tmp_path):
    seg = session(tmp_path)
    seg.segment(make_scene(3, size=256).image, CLASSES, maps=False)
    FeatureStore.flush()
    one = sum(f.stat().st_size for f in (tmp_path / "features").rglob("*") if f.is_file())
    bounded = session(tmp_path, feature_store_bytes=int(2.5 * one))
    dead = tmp_path / "features" / ".abc.partial-1-1"                     # killed mid-write long ago
    dead.mkdir()
    (dead / "zarr.json").write_text("{}")
    os.utime(dead, (time.time() - 7200, time.time() - 7200))
    for seed in range(4, 8):
        bounded.segment(make_scene(seed, size=256).image, CLASSES, maps=False)
        FeatureStore.flush()
        time.sleep(0.01)
    stores = list((tmp_path / "features").glob("*.zarr"))
    assert len(stores) == 2                                               # the two read most recently
    assert not dead.exists()
    off = Segmenter("synthetic-tiny", device="cpu", disk_cache=False, feature_store=False)
    off.segment(make_scene(9, size=256).image, CLASSES, maps=False)
    assert off.feature_store is None


@pytest.mark.skipif(os.name == "nt", reason="whether a process runs is not asked on Windows")
def test_a_writer_killed_on_this_machine_leaves_no_partial_folder_after_the_next_write(tmp_path):
    import socket
    import subprocess
    import sys

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname().replace("-", "_")
    folder = tmp_path / "features"
    folder.mkdir()
    dead = folder / f".abc.partial-{host}-{int(finished.stdout)}-7"         # killed a moment ago
    running = folder / f".def.partial-{host}-{os.getpid()}-7"              # this process, still writing
    elsewhere = folder / f".ghi.partial-another_machine-{int(finished.stdout)}-7"
    for partial in (dead, running, elsewhere):
        partial.mkdir()
        (partial / "zarr.json").write_text("{}")
    seg = session(tmp_path)
    seg.segment(make_scene(3, size=128).image, CLASSES, maps=False)
    FeatureStore.flush()
    assert len(list(folder.glob("*.zarr"))) == 1
    assert not dead.exists() and running.is_dir() and elsewhere.is_dir()


def test_cache_features_stores_without_segmenting(tmp_path, monkeypatch):
    image = make_scene(5, size=256).image
    seg = session(tmp_path)
    assert seg.cache_features(image)
    assert FeatureStore(tmp_path / "features").path(next(iter(seg._identities))).is_dir()
    later = session(tmp_path)
    refuse_encoding(later, monkeypatch)
    later.segment(image, CLASSES, maps=False)
    from napari_clearclip import segmenter as segmenter_module

    def refuse_preparing(*_, **__):
        raise AssertionError("the image was prepared again")

    monkeypatch.setattr(segmenter_module, "prepare", refuse_preparing)  # stored with the features: snapping reads it
    snapped = session(tmp_path)
    refuse_encoding(snapped, monkeypatch)
    snapped.segment(image, CLASSES, maps=False, refine="pamr")


def test_a_full_disk_while_storing_leaves_no_store_and_the_run_goes_on(tmp_path, monkeypatch):
    import errno

    import zarr

    image = make_scene(6, size=256).image
    seg = session(tmp_path)
    real = zarr.Group.create_array
    written, refused = [], []

    def full(self, name, *args, **kwargs):
        if written:
            refused.append(name)
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(name)
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(zarr.Group, "create_array", full)
    result = seg.segment(image, CLASSES, maps=False, stride=16)           # several batches: the second write fails
    FeatureStore.flush()
    assert result.labels.shape == image.shape[:2] and written and refused
    folder = tmp_path / "features"
    assert not list(folder.glob("*.zarr")) and not list(folder.glob(".*partial*"))
    monkeypatch.setattr(zarr.Group, "create_array", real)
    later = session(tmp_path)
    np.testing.assert_array_equal(later.segment(image, CLASSES, maps=False, stride=16).labels, result.labels)
    FeatureStore.flush()
    assert len(list(folder.glob("*.zarr"))) == 1                          # written whole the next time


def test_a_run_does_not_wait_for_the_disk_and_a_new_session_waits_for_the_write(tmp_path, monkeypatch):
    import threading

    image = make_scene(7, size=256).image
    seg = session(tmp_path)
    release = threading.Event()
    real = FeatureStore.save

    def slow_disk(self, *args):
        assert release.wait(30)
        return real(self, *args)

    monkeypatch.setattr(FeatureStore, "save", slow_disk)
    first = seg.segment(image, CLASSES, maps=False)                       # returns while the disk is held up
    assert not list((tmp_path / "features").glob("*.zarr"))
    later = session(tmp_path)
    refuse_encoding(later, monkeypatch)
    threading.Timer(0.2, release.set).start()
    again = later.segment(image, CLASSES, maps=False)                     # waits for the write, then reads it
    np.testing.assert_array_equal(again.labels, first.labels)


def test_a_script_that_ends_right_after_a_run_exits_with_its_store_written(tmp_path):
    import subprocess
    import sys

    script = ("import sys, numpy as np\n"
              "from napari_clearclip import Segmenter\n"
              "from napari_clearclip.demo.scenes import make_scene\n"
              "seg = Segmenter('synthetic-tiny', device='cpu', disk_cache=False, feature_store=sys.argv[1])\n"
              "seg.segment(make_scene(8, size=256).image, ['red', 'green', 'background'], maps=False)\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "features")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list((tmp_path / "features").glob("*.zarr"))) == 1
    assert not list((tmp_path / "features").glob(".*partial*"))


def test_trimming_a_folder_that_another_process_changes_meanwhile_never_fails(tmp_path, monkeypatch):
    from pathlib import Path

    seg = session(tmp_path)
    seg.segment(make_scene(3, size=256).image, CLASSES, maps=False)
    FeatureStore.flush()
    folder = tmp_path / "features"
    gone = folder / ".abc.partial-2-2"                                     # another process renames it away
    gone.mkdir()
    real_stat = Path.stat

    def renamed_meanwhile(self, *args, **kwargs):
        if self.name == gone.name:
            raise FileNotFoundError(2, "No such file or directory", str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", renamed_meanwhile)
    FeatureStore(folder).trim()
    assert len(list(folder.glob("*.zarr"))) == 1


def test_a_second_ctrl_c_while_writes_finish_at_exit_ends_the_wait_quietly(monkeypatch):
    """A batch run stopped with Ctrl+C waits at exit for its pending store; Ctrl+C again must end that wait
    without a traceback (the unfinished store stays a partial folder, never read)."""
    from napari_clearclip import feature_store

    class Interrupted:
        def wait(self, timeout=None):
            raise KeyboardInterrupt

    monkeypatch.setitem(feature_store._PENDING, "pending-store", Interrupted())
    started = time.monotonic()
    feature_store._finish_writes(timeout=30)            # returns instead of raising KeyboardInterrupt
    assert time.monotonic() - started < 5


def test_a_ctrl_c_shortens_the_exit_wait_for_a_write_that_does_not_finish_even_mid_wait(monkeypatch):
    """A store write that never finishes (the writer stuck) must not hold a stopped command for the full exit wait:
    the first Ctrl+C shortens it to seconds, also when it comes while the process already waits."""
    import threading

    from napari_clearclip import feature_store
    from napari_clearclip.batch import cli

    monkeypatch.setitem(feature_store._PENDING, "stuck-store", threading.Event())   # never set
    monkeypatch.setattr(feature_store, "_exit_wait", [feature_store.EXIT_WAIT])
    monkeypatch.setattr(cli, "INTERRUPTED_EXIT_WAIT", 0.5)
    stop = cli.StopOnce()
    started = time.monotonic()
    waiter = threading.Thread(target=feature_store._finish_writes)
    waiter.start()
    time.sleep(0.3)                              # the process is waiting at exit ...
    with pytest.raises(KeyboardInterrupt):       # ... when the first Ctrl+C comes (the handler, called directly)
        stop._first(2, None)
    waiter.join(timeout=10)
    assert not waiter.is_alive() and time.monotonic() - started < 5
    assert feature_store._exit_wait[0] == 0.5


def test_pixel_digests_are_sha256_of_the_bytes_or_of_fixed_chunks_and_see_every_byte():
    """Large arrays are hashed in 4 MiB chunks on threads: the digest must not depend on the threads or the machine
    (stores are shared), must equal the documented scheme, and must change with any one byte."""
    import hashlib

    from napari_clearclip import hashing

    small = np.arange(3000, dtype=np.uint16).reshape(50, 60)
    assert hashing.pixel_digest(small) == hashlib.sha256(small.tobytes()).digest()[:20]
    assert hashing.pixel_digest(small, 32) == hashlib.sha256(small.tobytes()).digest()
    large = np.random.default_rng(0).integers(0, 255, (1500, 1400, 3), np.uint8)   # 6.3 MB: two chunks
    data = large.tobytes()
    reference = hashlib.sha256(b"napari-clearclip pixels in 4 MiB chunks")
    reference.update(len(data).to_bytes(8, "little"))
    for start in range(0, len(data), 4 << 20):
        reference.update(hashlib.sha256(data[start : start + (4 << 20)]).digest())
    expected = reference.digest()[:20]
    assert hashing.pixel_digest(large) == expected
    assert hashing.pixel_digest(np.asfortranarray(large)) == expected                # C order, whatever the layout
    for index in ((0, 0, 0), (700, 900, 1), (1499, 1399, 2)):                          # first, middle, last chunk
        changed = large.copy()
        changed[index] ^= 1
        assert hashing.pixel_digest(changed) != expected
    assert hashing.pixel_digest(large.reshape(1400, 1500, 3)) == expected             # the bytes: shape is keyed apart
    with pytest.raises(ValueError, match="digest_size"):
        hashing.pixel_digest(small, 33)


def test_pixel_keys_are_xxh3_of_the_bytes_in_c_order_and_see_every_byte():
    """The features' keys: XXH3-128 of the bytes, as the xxhash package computes it over the whole array at once
    (whatever the layout), changed by any one byte."""
    import xxhash

    from napari_clearclip import hashing

    image = np.random.default_rng(2).integers(0, 255, (1500, 1400, 3), np.uint8)
    expected = xxhash.xxh3_128(image.tobytes()).digest()
    assert hashing.pixel_key(image) == expected and len(expected) == 16
    assert hashing.pixel_key(np.asfortranarray(image)) == expected
    assert hashing.pixel_key(image[::-1][::-1]) == expected
    assert hashing.pixel_key(image.astype(np.uint16)) != expected          # the bytes: other values, other key
    for index in ((0, 0, 0), (750, 700, 1), (1499, 1399, 2)):
        changed = image.copy()
        changed[index] ^= 1
        assert hashing.pixel_key(changed) != expected
    assert hashing.pixel_key(image) != hashing.pixel_digest(image, 16)     # not the digest of the records


def test_within_one_run_the_same_pixels_are_hashed_once_and_never_after_it(monkeypatch):
    from napari_clearclip import hashing

    hashed = []
    real = hashing._digest
    monkeypatch.setattr(hashing, "_digest", lambda array, size: hashed.append(array.shape) or real(array, size))
    image = np.random.default_rng(1).integers(0, 255, (40, 30, 3), np.uint8)
    other = image.copy()
    other[5, 5, 0] ^= 1
    with hashing.digests_kept():
        first = hashing.pixel_digest(image)
        assert hashing.pixel_digest(image[:]) == first                  # another view of the same pixels
        assert hashing.pixel_digest(other) != first                     # other memory: hashed
        assert hashing.pixel_digest(image[:20]) != first                # part of them: hashed
        with hashing.digests_kept():                                    # nested: the same memo
            assert hashing.pixel_digest(image) == first
    assert len(hashed) == 3
    image[5, 5, 0] ^= 1                                                 # after the run, the image changes
    assert hashing.pixel_digest(image) == hashing.pixel_digest(other) != first
    assert len(hashed) == 5

    keyed = []
    real_key = hashing._fast_digest
    monkeypatch.setattr(hashing, "_fast_digest", lambda array: keyed.append(array.shape) or real_key(array))
    with hashing.digests_kept():
        key = hashing.pixel_key(image)
        assert hashing.pixel_key(image[:]) == key and hashing.pixel_key(other) == key   # equal pixels, other memory
        assert hashing.pixel_digest(image) != key                         # the two digests are kept apart
    assert len(keyed) == 2 and len(hashed) == 6


def test_a_live_rerun_hashes_its_image_once(monkeypatch):
    """The widget's run collects the strokes' exemplars and labels the image: one digest of the image, not two."""
    from napari_clearclip import Segmenter, hashing
    from napari_clearclip.annotate import LayerRequest, segment_layer
    from napari_clearclip.demo.scenes import DEMO_CLASSES, make_scene
    from napari_clearclip.planes import ImageLayout
    from napari_clearclip.progress import run_to_end

    segmenter = Segmenter("synthetic-tiny", device="cpu", disk_cache=False)
    classes = DEMO_CLASSES.split("\n")
    image = make_scene(4, size=192).image
    baseline = segmenter.segment(image, classes, maps=False).labels.astype(np.uint8)
    current = baseline.copy()
    current[20:30, 40:60] = 5
    hashed = []
    real = hashing._fast_digest
    monkeypatch.setattr(hashing, "_fast_digest", lambda array: hashed.append(array.shape) or real(array))
    layout = ImageLayout(image.shape, rgb=True)
    request = LayerRequest(image, layout, layout.planes(), classes, {}, current=current, baseline=baseline,
                           baseline_names=classes, learn_from_edits=True, found={(): current.copy()})
    update = run_to_end(segment_layer(segmenter, request)).update
    assert hashed.count(image.shape) == 1
    expected = segmenter.segment(image, classes, maps=False, strokes=np.where(current != baseline, current, 0)).labels
    np.testing.assert_array_equal(update.planes[0].labels, expected)


def counted(function, calls: list):
    """``function``, noting each call in ``calls``."""
    return lambda *args, **keywords: calls.append(1) or function(*args, **keywords)


def _cluster_store(folder, gib: int = 3):
    """A store another machine wrote long ago, of ``gib`` GiB (a sparse file: no disk is used)."""
    store = folder / "from-the-cluster.zarr"
    store.mkdir(parents=True)
    with open(store / "batch_00000", "wb") as handle:
        handle.truncate(gib << 30)
    os.utime(store, (time.time() - 86400, time.time() - 86400))
    return store


def test_a_folder_the_user_names_is_never_trimmed_unless_they_bound_it_and_the_user_cache_is(tmp_path, monkeypatch,
                                                                                              capsys):
    """A shared folder a cluster filled (hours of encoding) lost all but 2 GiB at the first write of napari or of
    clearclip-segment --features-only there: the user cache's bound applied to every folder."""
    from napari_clearclip.batch.cli import main

    image = make_scene(3, size=256).image
    shared = tmp_path / "shared"
    kept = _cluster_store(shared)
    monkeypatch.setenv("NAPARI_CLEARCLIP_FEATURE_STORE", str(shared))        # napari pointed at the folder
    Segmenter("synthetic-tiny", device="cpu", disk_cache=False).segment(image, CLASSES, maps=False)
    FeatureStore.flush()
    assert kept.is_dir() and len(list(shared.glob("*.zarr"))) == 2
    monkeypatch.delenv("NAPARI_CLEARCLIP_FEATURE_STORE")
    Segmenter("synthetic-tiny", device="cpu", disk_cache=False, feature_store=shared).segment(
        make_scene(4, size=256).image, CLASSES, maps=False)                   # a script naming it
    FeatureStore.flush()
    assert kept.is_dir() and len(list(shared.glob("*.zarr"))) == 3
    from skimage.io import imsave

    imsave(tmp_path / "slide.png", make_scene(5, size=256).image, check_contrast=False)
    assert main(["--features-only", "--feature-store", str(shared), str(tmp_path / "slide.png"),
                 "--model", "synthetic-tiny", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert kept.is_dir() and len(list(shared.glob("*.zarr"))) == 4

    # bounded when the user says so: the oldest go first
    monkeypatch.setenv("NAPARI_CLEARCLIP_FEATURE_STORE_BYTES", "1G")
    Segmenter("synthetic-tiny", device="cpu", disk_cache=False, feature_store=shared).segment(
        make_scene(6, size=256).image, CLASSES, maps=False)
    FeatureStore.flush()
    assert not kept.exists() and len(list(shared.glob("*.zarr"))) == 4
    monkeypatch.delenv("NAPARI_CLEARCLIP_FEATURE_STORE_BYTES")

    # the user cache keeps its bound of 2 GiB
    from napari_clearclip.cache import cache_dir

    cached = _cluster_store(cache_dir() / "features")
    Segmenter("synthetic-tiny", device="cpu", disk_cache=False).segment(image, CLASSES, maps=False)
    FeatureStore.flush()
    assert not cached.exists() and len(list((cache_dir() / "features").glob("*.zarr"))) == 1


def test_a_feature_store_bound_is_read_as_people_write_sizes():
    from napari_clearclip.errors import InvalidOptionError
    from napari_clearclip.feature_store import parse_bytes

    assert parse_bytes("500G") == 500 << 30
    assert parse_bytes("2 GiB") == 2 << 30
    assert parse_bytes("1.5t") == int(1.5 * (1 << 40))
    assert parse_bytes("1048576") == 1 << 20
    assert parse_bytes("none") is None and parse_bytes("0") is None
    with pytest.raises(InvalidOptionError, match="NAPARI_CLEARCLIP_FEATURE_STORE_BYTES='lots' is not a size"):
        parse_bytes("lots")
    with pytest.raises(ValueError):
        parse_bytes("12Q")


def test_the_same_pixels_seen_in_napari_and_by_the_command_line_share_their_features(tmp_path, monkeypatch):
    """napari passes a layer's contrast limits (0-255 for uint8, the data's range by default otherwise); the command
    line none. Limits that change nothing must not make another key: a laptop never found what a cluster stored."""
    scene = make_scene(3, size=256).image
    wide = (scene.astype(np.uint16) * 257 + 3).astype(np.uint16)               # a 16-bit image
    first = session(tmp_path)
    for image in (scene, wide):
        first.segment(image, CLASSES, maps=False)                               # as the command line does
    FeatureStore.flush()
    assert len(list((tmp_path / "features").glob("*.zarr"))) == 2
    second = session(tmp_path)
    refuse_encoding(second, monkeypatch)
    as_napari = [second.segment(scene, CLASSES, maps=False, contrast_limits=(0, 255)).labels,
                 second.segment(wide, CLASSES, maps=False, contrast_limits=(int(wide.min()), int(wide.max()))).labels]
    monkeypatch.undo()
    np.testing.assert_array_equal(as_napari[0], first.segment(scene, CLASSES, maps=False).labels)
    np.testing.assert_array_equal(as_napari[1], first.segment(wide, CLASSES, maps=False).labels)
    # limits that do change the image are another image for the model: encoded, and stored apart
    session(tmp_path).segment(wide, CLASSES, maps=False, contrast_limits=(0, 65535))
    FeatureStore.flush()
    assert len(list((tmp_path / "features").glob("*.zarr"))) == 3
