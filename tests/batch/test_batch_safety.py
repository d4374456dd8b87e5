"""Batch runs that are interrupted, resumed, re-run with other settings or given odd inputs never
return another run's or another file's labels, and stop cleanly on Ctrl-C (synthetic-tiny, offline)."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile
from skimage.io import imsave

import napari_clearclip.batch.runs as batch
from napari_clearclip.batch import segment_files
from napari_clearclip.files import PARTIAL_SUFFIX
from napari_clearclip.demo.scenes import DEMO_CLASSES, make_scene

CLASSES = DEMO_CLASSES.split("\n")
OPTIONS = dict(model="synthetic-tiny", device="cpu")


@pytest.fixture(scope="module")
def stack_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("stack") / "cells.tif"
    tifffile.imwrite(path, np.stack([make_scene(700 + i, size=96).image for i in range(8)]), photometric="rgb")
    return path


def labels_and_names(out, stem):
    with open(out / f"{stem}_classes.csv", newline="") as handle:
        names = [row["name"] for row in csv.DictReader(handle)]
    return tifffile.imread(out / f"{stem}_labels.tif"), names


def interrupt_after(monkeypatch, planes: int) -> dict:
    """Make the batch stop with Ctrl-C once ``planes`` planes are done (as a user would)."""
    real = batch.segment_plane
    calls = {"n": 0}

    def counting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > planes:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(batch, "segment_plane", counting)
    return calls


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_interrupted_stack_rerun_with_other_classes_uses_none_of_the_old_planes(stack_file, tmp_path, monkeypatch,
                                                                                    overwrite):
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    interrupt_after(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        segment_files(stack_file, CLASSES, out, **OPTIONS)
    monkeypatch.undo()
    assert not (out / "cells_labels.tif").exists()
    other_order = CLASSES[::-1]
    reports = segment_files(stack_file, other_order, out, overwrite=overwrite, **OPTIONS)
    assert [r.status for r in reports] == ["done"]
    segment_files(stack_file, other_order, fresh, **OPTIONS)
    labels, names = labels_and_names(out, "cells")
    expected, expected_names = labels_and_names(fresh, "cells")
    assert names == expected_names == ["unassigned", *other_order]
    np.testing.assert_array_equal(labels, expected)
    assert not (out / batch.PARTS_DIR).exists()


def test_an_interrupted_stack_resumes_from_its_own_planes(stack_file, tmp_path, monkeypatch):
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    interrupt_after(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        segment_files(stack_file, CLASSES, out, **OPTIONS)
    monkeypatch.undo()
    read = []
    real_read = batch.read_plane
    monkeypatch.setattr(batch, "read_plane", lambda path, index, count: read.append(index) or real_read(path, index, count))
    segment_files(stack_file, CLASSES, out, **OPTIONS)
    assert sorted(read) == [5, 6, 7]                     # only the planes the interrupted run had not finished
    monkeypatch.undo()
    segment_files(stack_file, CLASSES, fresh, **OPTIONS)
    np.testing.assert_array_equal(labels_and_names(out, "cells")[0], labels_and_names(fresh, "cells")[0])
    assert not (out / batch.PARTS_DIR).exists()


def test_a_plane_run_again_after_its_stack_was_assembled_leaves_nothing(stack_file, tmp_path):
    from napari_clearclip.models import ModelSpec

    out = tmp_path / "out"
    segment_files(stack_file, CLASSES, out, **OPTIONS)
    spec = ModelSpec("synthetic-tiny", None, "clearclip", "cpu", "auto")
    run = "late"
    late = batch.Task(stack_file, "cells", 3, 8, run, batch.parts_key(run, stack_file))
    report = batch.run_task(spec, late, CLASSES, out, {}, False, False)   # as a lost worker's task re-run late
    assert report.status == "failed" and batch.RUN_OVER in report.error
    assert not (out / batch.PARTS_DIR).exists()


def test_a_rerun_with_a_same_named_input_never_takes_anothers_output(tmp_path):
    a, b = tmp_path / "a" / "x.png", tmp_path / "b" / "x.png"
    for path, seed in ((a, 801), (b, 802)):
        path.parent.mkdir()
        imsave(path, make_scene(seed, size=128).image, check_contrast=False)
    out = tmp_path / "out"
    segment_files([b], CLASSES, out, **OPTIONS)
    reports = segment_files([a, b], CLASSES, out, **OPTIONS)
    by_file = {r.path: r for r in reports}
    assert by_file[a].status == "done" and by_file[b].status == "skipped"
    assert by_file[a].outputs[0].name == "x_2_labels.tif"
    for path, stem in ((a, "x_2"), (b, "x")):
        alone = tmp_path / f"alone-{stem}"
        segment_files([path], CLASSES, alone, **OPTIONS)
        np.testing.assert_array_equal(tifffile.imread(out / f"{stem}_labels.tif"),
                                      tifffile.imread(alone / "x_labels.tif"))
    again = segment_files([a, b], CLASSES, out, **OPTIONS)      # both outputs now known to be theirs
    assert [r.status for r in again] == ["skipped", "skipped"]
    assert sorted(p.name for p in out.glob("*_labels.tif")) == ["x_2_labels.tif", "x_labels.tif"]


def test_outputs_without_a_record_are_still_taken_as_their_inputs(tmp_path):
    image = tmp_path / "cells.png"
    imsave(image, make_scene(803, size=128).image, check_contrast=False)
    out = tmp_path / "out"
    out.mkdir()
    edited = np.full((128, 128), 3, np.uint16)          # corrected by hand and saved by another program
    tifffile.imwrite(out / "cells_labels.tif", edited)
    (out / "cells_classes.csv").write_text("label,name\n")
    reports = segment_files([image], CLASSES, out, **OPTIONS)
    assert [r.status for r in reports] == ["skipped"]
    np.testing.assert_array_equal(tifffile.imread(out / "cells_labels.tif"), edited)


def test_a_skip_says_when_the_outputs_come_from_other_classes_or_an_older_file(tmp_path):
    image = tmp_path / "cells.png"
    imsave(image, make_scene(804, size=128).image, check_contrast=False)
    out = tmp_path / "out"
    segment_files([image], CLASSES, out, **OPTIONS)
    assert segment_files([image], CLASSES, out, **OPTIONS)[0].error == batch.SKIPPED
    assert segment_files([image], CLASSES[::-1], out, **OPTIONS)[0].error == batch.SKIPPED_OTHER_RUN
    imsave(image, make_scene(805, size=128).image, check_contrast=False)
    assert segment_files([image], CLASSES, out, **OPTIONS)[0].error == batch.SKIPPED_CHANGED
    assert segment_files([image], CLASSES, out, overwrite=True, **OPTIONS)[0].status == "done"


def test_one_path_as_a_string_is_one_input(tmp_path):
    image = tmp_path / "img.png"
    imsave(image, make_scene(806, size=96).image, check_contrast=False)
    reports = segment_files(str(image), CLASSES, tmp_path / "out", **OPTIONS)
    assert [(r.path.name, r.status) for r in reports] == [("img.png", "done")]
    with pytest.raises(ValueError, match="Inputs must be paths"):
        segment_files([image, 3], CLASSES, tmp_path / "out", **OPTIONS)


def test_maps_and_unknown_options_are_refused_before_any_image(tmp_path):
    image = tmp_path / "img.png"
    imsave(image, make_scene(807, size=96).image, check_contrast=False)
    with pytest.raises(ValueError, match="save_probabilities"):
        segment_files([image], CLASSES, tmp_path / "out", maps=False, **OPTIONS)
    with pytest.raises(ValueError, match="Unknown option colour: the options are short_side, crop"):
        segment_files([image], CLASSES, tmp_path / "out", colour="red", **OPTIONS)
    assert not list((tmp_path / "out").glob("*_labels.tif"))


def test_empty_and_foreign_files_say_what_is_wrong_with_the_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("these are my notes, not a picture")
    (tmp_path / "cut.tif").write_bytes(b"II*\x00" + bytes(range(12)))   # a TIFF header, its pages lost
    reports = segment_files([tmp_path / "empty.png", tmp_path / "notes.png", tmp_path / "cut.tif"], CLASSES,
                            tmp_path / "out", **OPTIONS)
    errors = {r.path.name: r.error for r in reports}
    assert "empty (0 bytes)" in errors["empty.png"]
    assert "is not a PNG image, or it is damaged" in errors["notes.png"]
    assert "cut.tif as an image: it holds no pixels" in errors["cut.tif"] and "damaged" in errors["cut.tif"]
    assert not any("pip install" in e or "backend" in e for e in errors.values())


def test_a_second_ctrl_c_while_stopping_raises_nothing():
    from napari_clearclip.batch.cli import StopOnce

    with StopOnce() as stop:
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
            time.sleep(1)
        signal.raise_signal(signal.SIGINT)      # pressed again while cleaning up: acknowledged, not raised
        time.sleep(0.05)
    assert stop.interrupted
    signal.signal(signal.SIGINT, signal.default_int_handler)


def test_a_dropped_keyboardinterrupt_prints_no_traceback_and_other_errors_still_do(capsys):
    from napari_clearclip.batch.cli import StopOnce

    class RaisesWhenCollected:
        def __init__(self, error):
            self.error = error

        def __del__(self):
            raise self.error

    before = sys.unraisablehook
    seen = []
    sys.unraisablehook = lambda unraisable: seen.append(type(unraisable.exc_value))
    try:
        with StopOnce() as stop:
            RaisesWhenCollected(KeyboardInterrupt())          # not pressed yet: passed on
            stop.interrupted = True
            RaisesWhenCollected(KeyboardInterrupt())          # after a press: dropped quietly
            RaisesWhenCollected(ValueError("a real error"))   # passed on
        assert seen == [KeyboardInterrupt, ValueError]
    finally:
        sys.unraisablehook = before
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert "Traceback" not in capsys.readouterr().err
    with StopOnce():
        pass
    assert sys.unraisablehook is before                         # put back when no Ctrl+C came


def test_ctrl_c_twice_stops_the_command_cleanly(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(30):
        imsave(inputs / f"s{i:02d}.png", make_scene(900 + i, size=160).image, check_contrast=False)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "napari_clearclip.batch.cli", str(inputs), "--classes", "; ".join(CLASSES),
               "--out", str(out), "--model", "synthetic-tiny", "--device", "cpu"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("*_labels.tif")) and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    # 130, or ended by the second SIGINT while the interpreter shuts down (a shell shows 130 for both)
    assert process.returncode in (130, -signal.SIGINT), err
    assert "Traceback" not in err and "run the same command again to resume" in err
    assert not [p for p in out.rglob("*") if p.name.endswith(PARTIAL_SUFFIX)]
    for labels in out.glob("*_labels.tif"):          # whatever was written is whole
        assert tifffile.imread(labels).shape == (160, 160)


@pytest.mark.parametrize("features_only", [False, True])
def test_a_ctrl_c_whose_keyboardinterrupt_python_dropped_still_stops_the_command(tmp_path, monkeypatch, capsys,
                                                                                   features_only):
    """Python raises a signal's KeyboardInterrupt wherever the process is; inside some callbacks (one of the import
    machinery's, in one CI run) it is printed and dropped, and the command went on to the last image with exit
    code 0. The press is recorded: the command stops after the image in hand, with 130."""
    from napari_clearclip.batch import cli

    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(3):
        imsave(inputs / f"s{i}.png", make_scene(300 + i, size=96).image, check_contrast=False)
    real_enter = cli.StopOnce.__enter__

    def pressed_and_dropped(self):   # the first press came, and its KeyboardInterrupt was lost
        entered = real_enter(self)
        self.interrupted = True
        return entered

    monkeypatch.setattr(cli.StopOnce, "__enter__", pressed_and_dropped)
    monkeypatch.setenv("NAPARI_CLEARCLIP_FEATURE_STORE", str(tmp_path / "store"))
    argv = [str(inputs), "--model", "synthetic-tiny", "--device", "cpu"]
    argv += ["--features-only"] if features_only else ["--classes", "; ".join(CLASSES), "--out", str(tmp_path / "out")]
    try:
        assert cli.main(argv) == 130
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    err = capsys.readouterr().err
    assert "interrupted:" in err and "again" in err and "Traceback" not in err
    assert ("the images encoded so far are stored" if features_only else "1 finished image is kept;") in err
    if not features_only:
        assert len(list((tmp_path / "out").glob("*_labels.tif"))) == 1      # the image in hand, not the others


def test_the_report_keeps_earlier_runs_timings_when_resumed(tmp_path):
    images = []
    for i in range(2):
        images.append(tmp_path / f"img{i}.png")
        imsave(images[-1], make_scene(820 + i, size=96).image, check_contrast=False)
    out = tmp_path / "out"
    segment_files(images[:1], CLASSES, out, **OPTIONS)
    with open(out / batch.REPORT_NAME, newline="") as handle:
        first = list(csv.DictReader(handle))
    segment_files(images, CLASSES, out, **OPTIONS)                     # resumed with one more image
    with open(out / batch.REPORT_NAME, newline="") as handle:
        rows = {row["file"]: row for row in csv.DictReader(handle)}
    assert rows[str(images[0])] == first[0]                             # its first run's row and timing
    assert rows[str(images[0])]["status"] == "done" and float(rows[str(images[0])]["seconds"]) > 0
    assert rows[str(images[1])]["status"] == "done"
    assert rows[str(images[1])]["labels"].endswith("img1_labels.tif")


def test_a_finished_batch_run_again_on_a_cluster_starts_no_cluster(tmp_path, monkeypatch, capsys):
    import napari_clearclip.batch.cluster as cluster
    from napari_clearclip.batch.cli import main

    image = tmp_path / "img.png"
    imsave(image, make_scene(830, size=96).image, check_contrast=False)
    out = tmp_path / "out"
    segment_files([image], CLASSES, out, refine="pamr", **OPTIONS)
    started = []
    monkeypatch.setattr(cluster, "start_client", lambda *a: started.append(a) or pytest.fail("a cluster started"))
    assert main([str(image), "--classes", "; ".join(CLASSES), "--out", str(out), "--model", "synthetic-tiny",
                 "--device", "cpu", "--cluster", "local:1"]) == 0
    assert started == [] and "skipped" in capsys.readouterr().err


def test_stale_partial_files_are_removed_beside_the_outputs_and_in_the_parts_and_nothing_else_is_looked_through(
        tmp_path, monkeypatch):
    """A killed writer's temporary files go; zarr stores and caches inside the output folder are not walked (their
    folders may come and go meanwhile: a features cache written by other processes once made the walk fail)."""
    import os

    from napari_clearclip.batch.files import PARTS_DIR, remove_stale_partials

    stale = [tmp_path / ".a_labels.tif.x1.partial", tmp_path / PARTS_DIR / "stack" / "key" / ".0.tif.x2.partial"]
    kept = [tmp_path / "a_labels.tif", tmp_path / "cache" / "features" / ".b.partial",
            tmp_path / "slide_labels.zarr.partial" / ".zgroup.x3.partial", tmp_path / PARTS_DIR / "stack" / "0.tif"]
    for path in stale + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    walked = []
    real_walk = os.walk

    def watched(top, *args, **kwargs):
        walked.append(os.fspath(top))
        for root, folders, files in real_walk(top, *args, **kwargs):
            walked.append(root)
            yield root, folders, files
    monkeypatch.setattr(os, "walk", watched)
    remove_stale_partials(tmp_path)
    assert not any(path.exists() for path in stale) and all(path.exists() for path in kept)
    assert not any("cache" in root or "zarr" in root for root in walked)
    remove_stale_partials(tmp_path / "gone")                    # a folder that is not there: nothing to do
