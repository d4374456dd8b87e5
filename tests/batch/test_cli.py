"""The clearclip-segment command: outputs per image, keeps going past bad inputs."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from skimage.io import imsave

from napari_clearclip import Segmenter
from napari_clearclip.batch.cli import main


def test_cli_writes_labels_and_table_and_skips_bad_inputs(tmp_path, tiny_checkpoint, rgb_image, capsys):
    good_png = tmp_path / "photo.png"
    imsave(good_png, rgb_image)
    good_tif = tmp_path / "scan.tif"
    tifffile.imwrite(good_tif, rgb_image[..., 1])
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    stack = tmp_path / "stack.tif"
    planes = np.stack([rgb_image[:64, :64, c] for c in range(3)] * 2).reshape(2, 3, 64, 64)
    tifffile.imwrite(stack, planes, photometric="minisblack")
    out = tmp_path / "out"

    code = main([str(good_png), str(broken), str(tmp_path / "missing.png"), str(stack), str(good_tif),
                 "--classes", "sky; horse, pony; grass", "--out", str(out),
                 "--model", "test-tiny", "--pretrained", tiny_checkpoint, "--device", "cpu", "--save-probabilities"])
    assert code == 1
    err = capsys.readouterr().err
    assert "broken.png: Could not read" in err and "missing.png: No such file" in err
    assert "3 of 5 images segmented" in err
    stacked = tifffile.imread(out / "stack_labels.tif")             # a multi-plane TIFF: one labels stack
    assert stacked.shape == (2, 3, 64, 64)
    engine = Segmenter("test-tiny", tiny_checkpoint, device="cpu")
    np.testing.assert_array_equal(stacked[1, 2], engine.segment(planes[1, 2], ["sky", "horse, pony", "grass"],
                                                                refine="pamr").labels)          # snapped, as the widget
    assert not (out / ".clearclip-parts").exists()

    labels = tifffile.imread(out / "photo_labels.tif")
    expected = Segmenter("test-tiny", tiny_checkpoint, device="cpu").segment(rgb_image, ["sky", "horse, pony", "grass"],
                                                                              refine="pamr")
    np.testing.assert_array_equal(labels, expected.labels)
    assert labels.dtype == np.uint16
    with open(out / "photo_classes.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["name"] for r in rows] == ["unassigned", "sky", "horse", "grass"]
    assert rows[2]["synonyms"] == "horse, pony"
    assert sum(int(r["pixels"]) for r in rows) == labels.size
    assert tifffile.imread(out / "photo_probabilities.tif").shape == (3, *rgb_image.shape[:2])
    assert tifffile.imread(out / "scan_labels.tif").shape == rgb_image.shape[:2]
    assert not list(out.glob("*.partial"))


def test_cli_rejects_bad_classes_and_models_before_work(tmp_path, capsys):
    image = tmp_path / "a.png"
    imsave(image, np.zeros((32, 32, 3), np.uint8))
    assert main([str(image), "--classes", "cat;;cat", "--out", str(tmp_path)]) == 2
    assert "'cat' appears twice" in capsys.readouterr().err
    assert main([str(image), "--classes", "cat", "--model", "ViT-Q-99", "--out", str(tmp_path)]) == 2
    assert "Unknown model 'ViT-Q-99'" in capsys.readouterr().err
    assert main([str(image), "--classes", "cat", "--model", "nosuchmodel", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err          # no name alike: the common ones, and where every one is listed
    assert "Unknown model 'nosuchmodel'" in err and "'ViT-B-16'" in err and "'synthetic-tiny' offline" in err


def test_cli_entry_point_help():
    completed = subprocess.run([sys.executable, "-m", "napari_clearclip.batch.cli", "--help"], capture_output=True, text=True)
    assert completed.returncode == 0
    assert "--classes" in completed.stdout and "synonyms" in completed.stdout


TINY = ["--model", "test-tiny", "--device", "cpu"]


def _pngs(folder, names, image):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        imsave(folder / name, image)
    return [folder / n for n in names]


def test_outputs_get_unique_names_even_against_real_names(tmp_path, tiny_checkpoint, rgb_image, capsys):
    a = _pngs(tmp_path / "a", ["x.png"], rgb_image)[0]
    b = _pngs(tmp_path / "b", ["x.png"], rgb_image[::-1].copy())[0]
    c = _pngs(tmp_path, ["x_2.png"], rgb_image[:, ::-1].copy())[0]
    out = tmp_path / "out"
    assert main([str(a), str(b), str(c), "--classes", "sky; grass", "--out", str(out), "--pretrained", tiny_checkpoint,
                 *TINY]) == 0
    segmenter = Segmenter("test-tiny", tiny_checkpoint, device="cpu")
    for stem, source in [("x", rgb_image), ("x_3", rgb_image[::-1]), ("x_2", rgb_image[:, ::-1])]:
        np.testing.assert_array_equal(tifffile.imread(out / f"{stem}_labels.tif"),
                                      segmenter.segment(source, ["sky", "grass"], refine="pamr").labels)
    with open(out / "clearclip_report.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["status"] for r in rows] == ["done"] * 3 and rows[0]["file"] == str(a)


def test_existing_outputs_are_skipped_unless_overwrite(tmp_path, tiny_checkpoint, rgb_image, capsys):
    image = _pngs(tmp_path, ["cells.png"], rgb_image)[0]
    out = tmp_path / "out"
    out.mkdir()
    corrected = np.full(rgb_image.shape[:2], 7, np.uint16)      # labels the user corrected by hand
    tifffile.imwrite(out / "cells_labels.tif", corrected)
    (out / "cells_classes.csv").write_text("label,name\n")
    args = [str(image), "--classes", "sky; grass", "--out", str(out), "--pretrained", tiny_checkpoint, *TINY]
    assert main(args) == 0
    assert "skipped: " in capsys.readouterr().err
    np.testing.assert_array_equal(tifffile.imread(out / "cells_labels.tif"), corrected)
    assert main(args + ["--overwrite"]) == 0
    assert tifffile.imread(out / "cells_labels.tif").max() <= 2


def test_outputs_of_another_run_are_kept_and_the_exit_status_says_they_are_not_this_runs(tmp_path, tiny_checkpoint,
                                                                                           rgb_image, capsys):
    """A script that runs the command again with other classes, or on a changed file, must not take the labels kept
    from before as its own: they stay (they may hold corrections), and the exit status is 1."""
    first, second = _pngs(tmp_path, ["a.png", "b.png"], rgb_image)
    out = tmp_path / "out"
    args = [str(first), str(second), "--out", str(out), "--pretrained", tiny_checkpoint, *TINY]
    assert main(args + ["--classes", "sky; grass"]) == 0
    written = {name: (out / name).read_bytes() for name in ("a_labels.tif", "b_labels.tif")}
    assert main(args + ["--classes", "sky; grass"]) == 0                      # resumed: nothing left to do
    assert "not this run's labels" not in capsys.readouterr().err

    assert main(args + ["--classes", "grass; sky"]) == 1                      # other classes: kept, not this run's
    err = capsys.readouterr().err
    assert f"not this run's labels: {first}, {second}" in err, err
    assert {name: (out / name).read_bytes() for name in written} == written

    imsave(second, rgb_image[::-1])                                           # b.png changed since its outputs
    assert main(args + ["--classes", "sky; grass"]) == 1
    err = capsys.readouterr().err
    assert f"not this run's labels: {second} (" in err, err
    assert "outputs exist for an earlier version of this file" in err
    assert main(args + ["--classes", "sky; grass", "--overwrite"]) == 0
    assert (out / "b_labels.tif").read_bytes() != written["b_labels.tif"]


def test_bad_output_folder_and_options_fail_once_before_any_work(tmp_path, tiny_checkpoint, rgb_image, capsys, monkeypatch):
    images = _pngs(tmp_path, ["a.png", "b.png"], rgb_image)
    import napari_clearclip.batch.runs as batch

    calls = []
    monkeypatch.setattr(batch, "read_image", lambda path: calls.append(path) or rgb_image)
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("x")
    common = ["--classes", "sky", "--pretrained", tiny_checkpoint, *TINY]
    assert main([*map(str, images), "--out", str(not_a_folder), *common]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main([*map(str, images), "--out", str(not_a_folder / "sub"), *common]) == 2
    assert "Cannot write to the output folder" in capsys.readouterr().err
    assert main([*map(str, images), "--out", str(tmp_path / "o"), "--short-side", "0", *common]) == 2
    err = capsys.readouterr().err
    assert err.count("--short-side 0 must be") == 1 and "short_side=" not in err and calls == []


def test_folders_and_patterns_expand_to_their_images(tmp_path, tiny_checkpoint, rgb_image, capsys):
    _pngs(tmp_path / "plate", ["w1.png", "w2.png"], rgb_image)
    (tmp_path / "plate" / "notes.txt").write_text("not an image")
    _pngs(tmp_path / "more", ["m1.png"], rgb_image)
    out = tmp_path / "out"
    code = main([str(tmp_path / "plate"), str(tmp_path / "more" / "*.png"), str(tmp_path / "empty*.png"),
                 "--classes", "sky", "--out", str(out), "--pretrained", tiny_checkpoint, *TINY])
    assert code == 1                                   # the pattern that matched nothing is reported
    assert sorted(p.name for p in out.glob("*_labels.tif")) == ["m1_labels.tif", "w1_labels.tif", "w2_labels.tif"]
    assert "empty*.png: No image matches the pattern" in capsys.readouterr().err


def test_a_folder_that_is_also_the_output_folder_gives_its_images_not_the_labels_written_there(tmp_path, rgb_image,
                                                                                               capsys):
    """Run twice on a folder that is its own output folder (or on a pattern over it): the labels and probabilities
    written the first time are not segmented as images the second time; named as files, they are taken as given.
    A pattern matches zarr stores too, and only images."""
    import zarr

    from napari_clearclip.batch.files import expand_inputs

    plate = tmp_path / "plate"
    images = _pngs(plate, ["w1.png", "w2.png"], rgb_image)
    zarr.open_array(str(plate / "w3.zarr"), mode="w", shape=rgb_image.shape, chunks=(64, 64, 3),
                    dtype=np.uint8)[:] = rgb_image
    args = [str(plate), "--classes", "red; background", "--out", str(plate), "--model", "synthetic-tiny",
            "--device", "cpu", "--no-snap"]
    assert main(args + ["--save-probabilities"]) == 0, capsys.readouterr().err
    written = sorted(p.name for p in plate.glob("*_labels.tif")) + sorted(p.name for p in plate.glob("*_prob*"))
    assert written == ["w1_labels.tif", "w2_labels.tif", "w3_labels.tif", "w1_probabilities.tif",
                       "w2_probabilities.tif", "w3_probabilities.tif"]
    (plate / "notes.txt").write_text("not an image")
    inputs = [*images, plate / "w3.zarr"]
    assert expand_inputs([plate]) == inputs
    assert expand_inputs([plate / "*"]) == inputs
    assert expand_inputs([plate / "w*.zarr"]) == [plate / "w3.zarr"]
    assert expand_inputs([plate / "w1_labels.tif"]) == [plate / "w1_labels.tif"]      # named: taken as given
    # one file named twice (a folder and a pattern over it, a relative and an absolute path) is one input
    relative = Path(os.path.relpath(images[0]))
    assert expand_inputs([relative, plate, plate / "*.png", images[0]]) == [relative, images[1], plate / "w3.zarr"]
    (plate / "link.png").symlink_to(images[0])                                       # a link of another name: its own
    assert expand_inputs([images[0], plate / "link.png"]) == [images[0], plate / "link.png"]
    (plate / "link.png").unlink()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "0 of 3 images segmented" in err and "_labels" not in err.replace("_labels.tif", ""), err
    assert not list(plate.glob("*_labels_labels*"))
    # labels of another program's, without this command's record, are images like any other
    tifffile.imwrite(plate / "w4_labels.tif", rgb_image)
    assert plate / "w4_labels.tif" in expand_inputs([plate])
    # but labels this command wrote, corrected and saved over in napari (which keeps no record), are still its
    # outputs, by the class table beside them: never segmented as images, never replaced unasked
    corrected = tifffile.imread(plate / "w1_labels.tif")
    corrected[:8, :8] = 1
    tifffile.imwrite(plate / "w1_labels.tif", corrected)
    (plate / "w4_labels.tif").unlink()
    assert expand_inputs([plate]) == inputs
    assert main(args) == 0
    assert "0 of 3 images segmented" in capsys.readouterr().err
    assert not list(plate.glob("*_labels_*"))
    np.testing.assert_array_equal(tifffile.imread(plate / "w1_labels.tif"), corrected)


def test_interrupted_write_leaves_no_partial_file(tmp_path, tiny_checkpoint, rgb_image, capsys, monkeypatch):
    images = _pngs(tmp_path, ["a.png", "b.png"], rgb_image)
    out = tmp_path / "out"
    real = tifffile.imwrite
    written = []

    def interrupted(path, data, **kwargs):
        if written:
            with open(path, "wb") as handle:
                handle.write(b"half a file")
            raise KeyboardInterrupt
        written.append(path)
        return real(path, data, **kwargs)

    monkeypatch.setattr(tifffile, "imwrite", interrupted)
    code = main([*map(str, images), "--classes", "sky", "--out", str(out), "--pretrained", tiny_checkpoint, *TINY])
    assert code == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if "partial" in n or n.startswith(".")], names     # whole files only
    assert "a_labels.tif" in names and "b_labels.tif" not in names
    monkeypatch.setattr(tifffile, "imwrite", real)
    assert main([*map(str, images), "--classes", "sky", "--out", str(out), "--pretrained", tiny_checkpoint, *TINY]) == 0
    assert "skipped: " in capsys.readouterr().err and (out / "b_labels.tif").exists()


def test_snap_option_gives_the_engines_edge_snapped_labels(tmp_path, tiny_checkpoint, rgb_image, capsys):
    image = _pngs(tmp_path, ["cells.png"], rgb_image)[0]
    out = tmp_path / "out"
    common = [str(image), "--classes", "sky; grass", "--pretrained", tiny_checkpoint, *TINY]
    assert main([*common, "--out", str(out)]) == 0                       # snapped by default, as in the widget
    assert main([*common, "--out", str(tmp_path / "paper"), "--no-snap"]) == 0
    engine = Segmenter("test-tiny", tiny_checkpoint, device="cpu")
    snapped = engine.segment(rgb_image, ["sky", "grass"], refine="pamr").labels
    official = engine.segment(rgb_image, ["sky", "grass"]).labels
    assert not np.array_equal(snapped, official)
    np.testing.assert_array_equal(tifffile.imread(out / "cells_labels.tif"), snapped)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "paper" / "cells_labels.tif"), official)
    from napari_clearclip.options import SNAP_IN_TOOLS
    from napari_clearclip.batch.cli import build_parser

    assert build_parser().parse_args(["x", "--classes", "a"]).snap is SNAP_IN_TOOLS is True
    with pytest.raises(ValueError, match="refine='crf'"):
        engine.check_options(refine="crf")
    with pytest.raises(ValueError, match="pamr_dilations"):
        engine.check_options(refine="pamr", pamr_dilations=(0,))


def test_messages_speak_the_command_lines_language(tmp_path, capsys, monkeypatch):
    image = tmp_path / "a.png"
    imsave(image, np.zeros((32, 32, 3), np.uint8), check_contrast=False)
    assert main([str(image), "--classes", " ; ", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert 'name at least one with --classes, separated by ";"' in err and "['cell'" not in err
    assert main([str(image), "--classes", "cell", "--out", str(tmp_path / "o"), "--model", "ViT-B-16",
                 "--pretrained", "openai"]) == 2                          # offline: the weights cannot come
    err = capsys.readouterr().err
    assert "--model ViT-B-16-quickgelu --pretrained FILE" in err and "--model synthetic-tiny" in err
    assert "Segmenter(" not in err
    assert main([str(image), "--features-only", "--model", "ViT-B-16",
                 "--pretrained", "openai"]) == 2                          # the same when only encoding
    err = capsys.readouterr().err
    assert "--model ViT-B-16-quickgelu --pretrained FILE" in err and "--model synthetic-tiny" in err
    assert "Segmenter(" not in err
    demo = [str(image), "--classes", "cell; background", "--out", str(tmp_path / "o"), "--model", "synthetic-tiny",
            "--device", "cpu"]
    for options, said in ((["--stride", "999"], "--stride 999 must be a whole number between 1 and the window size"),
                          (["--short-side", "3"], "--short-side 3 must be a whole number of at least 8 pixels; or "
                                                  "--native keeps the image's own size."),
                          (["--logit-scale", "-5"], "--logit-scale -5.0 must be a finite positive number"),
                          (["--keep-aspect"], "--keep-aspect applies to CLIP-DIY's crops; the method is clearclip")):
        assert main(demo + options) == 2                  # options out of range: said as the command line's options
        err = capsys.readouterr().err
        assert said in err and "=" not in err and "None" not in err, err


def test_help_needs_no_model_library():
    code = ("import sys; from napari_clearclip.batch.cli import build_parser; build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'open_clip', 'distributed') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"                    # --help answers at once (it took 9 s with torch)


def test_objects_beside_each_image_get_a_class_each(tmp_path, capsys):
    from skimage.measure import label as connected

    from napari_clearclip.demo.scenes import DEMO_CLASSES, held_out_scenes

    classes = DEMO_CLASSES.split("\n")
    scene = held_out_scenes(1, sizes=(192,))[0]
    imsave(tmp_path / "cells.tif", scene.image, check_contrast=False)
    objects = connected(np.any(np.stack(list(scene.masks.values())), axis=0)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "cells_cp_masks.tif", objects)
    imsave(tmp_path / "lonely.png", scene.image, check_contrast=False)        # no objects file beside it
    out = tmp_path / "out"
    code = main([str(tmp_path), "--classes", "; ".join(classes), "--out", str(out), "--model", "synthetic-tiny",
                 "--device", "cpu", "--objects", "_cp_masks", "--no-snap"])
    assert code == 1 and "No objects file lonely_cp_masks.tif" in capsys.readouterr().err
    assert not (out / "cells_cp_masks_labels.tif").exists()                      # the masks are not an input
    with open(out / "cells_objects.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    expected = Segmenter("synthetic-tiny", device="cpu").segment(scene.image, classes, objects=objects, maps=False)
    assert [int(r["id"]) for r in rows] == list(expected.objects["id"]) and len(rows) == objects.max()
    assert [r["class"] for r in rows] == list(expected.objects["class"])
    np.testing.assert_array_equal(tifffile.imread(out / "cells_labels.tif"), expected.labels)


def test_cli_lesson_for_other_classes_stops_before_any_image(tmp_path, capsys):
    import numpy as np

    from napari_clearclip import Segmenter
    from napari_clearclip.batch.cli import main
    from napari_clearclip.demo.scenes import make_scene
    from skimage.io import imsave

    scene = make_scene(3, size=256, objects=(3, 3))
    strokes = np.zeros(scene.image.shape[:2], np.int32)
    strokes[scene.masks["red"]] = 1
    lesson = Segmenter("synthetic-tiny", device="cpu", disk_cache=False).make_lesson(
        ["red", "background"], [(scene.image, strokes)]).save(tmp_path / "lesson")
    imsave(tmp_path / "a.png", scene.image, check_contrast=False)
    code = main([str(tmp_path / "a.png"), "--classes", "red;green;background", "--model", "synthetic-tiny",
                 "--lesson", str(lesson), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "does not know green" in err
    assert not (tmp_path / "out" / "a_labels.tif").exists()
    code = main([str(tmp_path / "a.png"), "--classes", "red;background", "--model", "synthetic-tiny",
                 "--lesson", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "out")])
    assert code == 2 and "No lesson file" in capsys.readouterr().err


def test_cli_features_only_fills_the_store_and_needs_no_classes(tmp_path, capsys):
    from napari_clearclip.batch.cli import main
    from napari_clearclip.demo.scenes import make_scene
    from skimage.io import imsave

    imsave(tmp_path / "a.png", make_scene(3, size=128).image, check_contrast=False)
    code = main([str(tmp_path / "a.png"), "--features-only", "--model", "synthetic-tiny",
                 "--feature-store", str(tmp_path / "store"), "--out", str(tmp_path / "out")])
    assert code == 0 and "1 of 1 images' features stored" in capsys.readouterr().err
    assert len(list((tmp_path / "store").glob("*.zarr"))) == 1
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*_labels.tif"))


def test_cli_features_only_says_when_the_user_caches_bounded_store_is_full(tmp_path, capsys, monkeypatch):
    """Encoding a folder into the user cache, bounded, removes the least used stores as it goes: said, with the
    way out (a folder of one's own is never trimmed)."""
    from napari_clearclip.batch.cli import main
    from napari_clearclip.demo.scenes import make_scene
    from napari_clearclip.cache import cache_dir
    from skimage.io import imsave

    for seed in (3, 4, 5):
        imsave(tmp_path / f"{seed}.png", make_scene(seed, size=128).image, check_contrast=False)
    import time

    monkeypatch.setenv("NAPARI_CLEARCLIP_FEATURE_STORE_BYTES", "1G")
    used = cache_dir() / "features" / "in-use.zarr"          # a store read just now, 0.95 GiB (a sparse file)
    used.mkdir(parents=True)
    with open(used / "batch_00000", "wb") as handle:
        handle.truncate(int(0.95 * (1 << 30)))
    os.utime(used, (time.time() + 3600, time.time() + 3600))
    images = [str(tmp_path / f"{seed}.png") for seed in (3, 4, 5)]
    assert main([*images, "--features-only", "--model", "synthetic-tiny"]) == 0
    err = capsys.readouterr().err
    assert f"3 of 3 images' features stored in the user cache ({cache_dir() / 'features'})" in err
    assert "is bounded to 1 GiB and is full" in err and "--feature-store DIR (never trimmed)" in err, err
    monkeypatch.delenv("NAPARI_CLEARCLIP_FEATURE_STORE_BYTES")                  # (it bounds a named folder too)
    assert main([*images, "--features-only", "--model", "synthetic-tiny", "--feature-store", str(tmp_path / "mine")]) == 0
    err = capsys.readouterr().err
    assert "is full" not in err and len(list((tmp_path / "mine").glob("*.zarr"))) == 3


def test_clipdiy_with_foreground_maps_beside_each_image(tmp_path, capsys):
    from napari_clearclip.demo.scenes import held_out_scenes

    classes = ["background", "red", "green", "blue", "yellow"]
    scenes = held_out_scenes(2, sizes=(192, 160))
    masks = []
    for number, scene in enumerate(scenes):
        imsave(tmp_path / f"img{number}.tif", scene.image, check_contrast=False)
        masks.append(np.any(np.stack(list(scene.masks.values())), axis=0).astype(np.uint8))
    tifffile.imwrite(tmp_path / "img0_fg.tif", masks[0])
    tifffile.imwrite(tmp_path / "img1_fg.tif", masks[1].astype(np.float32) * 0.8)   # a probability map
    out = tmp_path / "out"
    code = main([str(tmp_path), "--classes", "; ".join(classes), "--out", str(out), "--model", "synthetic-tiny",
                 "--device", "cpu", "--method", "clipdiy", "--foreground", "_fg", "--no-snap"])
    assert code == 0, capsys.readouterr().err
    assert not (out / "img0_fg_labels.tif").exists()                              # the maps are not inputs
    segmenter = Segmenter("synthetic-tiny", method="clipdiy", device="cpu")
    for number, scene in enumerate(scenes):
        fg = masks[number] if number == 0 else masks[number].astype(np.float32) * 0.8
        expected = segmenter.segment(scene.image, classes, foreground=fg, maps=False)
        plain = segmenter.segment(scene.image, classes, maps=False)
        written = tifffile.imread(out / f"img{number}_labels.tif")
        np.testing.assert_array_equal(written, expected.labels)
        assert not np.array_equal(written, plain.labels)                          # the map was used
    code = main([str(tmp_path / "img0.tif"), "--classes", "red; blue", "--out", str(tmp_path / "out2"),
                 "--model", "synthetic-tiny", "--device", "cpu", "--method", "clipdiy", "--foreground", "_fg"])
    assert code == 2 and "background class" in capsys.readouterr().err
    code = main([str(tmp_path / "img0.tif"), "--classes", "red; background", "--out", str(tmp_path / "out3"),
                 "--model", "synthetic-tiny", "--method", "clipdiy", "--foreground", "found",
                 "--found-weights", str(tmp_path / "dino.pth"), str(tmp_path / "decoder.pt")])
    assert code == 2 and "dino.pth" in capsys.readouterr().err and not (tmp_path / "out3" / "img0_labels.tif").exists()


def test_format_zarr_segments_an_ome_zarr_tile_by_tile(tmp_path, capsys):
    import zarr

    from napari_clearclip.demo.scenes import make_scene

    classes = ["red", "green", "blue", "yellow", "background"]
    image = make_scene(21, size=300, objects=(4, 6)).image
    store = tmp_path / "slide.zarr"                      # OME-Zarr: channels first, a full-resolution level "0"
    group = zarr.open_group(str(store), mode="w")
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": "c", "type": "channel"},
                                                               {"name": "y", "type": "space"},
                                                               {"name": "x", "type": "space"}],
                                   "datasets": [{"path": "0"}]}]
    level = group.create_array("0", shape=(3, 300, 300), chunks=(3, 128, 128), dtype=np.uint8)
    level[:] = np.moveaxis(image, -1, 0)
    out = tmp_path / "out"
    argv = [str(tmp_path), "--classes", "; ".join(classes), "--out", str(out), "--model", "synthetic-tiny",
            "--device", "cpu", "--format", "zarr", "--no-snap"]
    assert main(argv) == 0, capsys.readouterr().err
    labels = zarr.open_group(str(out / "slide_labels.zarr"), mode="r")["labels"][:]
    expected = Segmenter("synthetic-tiny", device="cpu").segment(image, classes, maps=False, short_side=None).labels
    np.testing.assert_array_equal(labels, expected)
    with open(out / "slide_classes.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["pixels"]) for r in rows] == np.bincount(expected.ravel(), minlength=6).tolist()
    with open(out / "clearclip_report.csv", newline="") as handle:    # the report names the zarr labels
        (report,) = list(csv.DictReader(handle))
    assert report["status"] == "done" and report["labels"] == str(out / "slide_labels.zarr")
    assert main(argv) == 0 and "skipped" in capsys.readouterr().err              # a finished output is kept
    assert main(argv + ["--save-probabilities"]) == 2
    assert "--save-probabilities cannot be used" in capsys.readouterr().err
    # a lesson made at native resolution teaches every tile as it teaches the whole image
    segmenter = Segmenter("synthetic-tiny", device="cpu")
    scene = make_scene(22, size=256, objects=(4, 5))
    strokes = np.zeros(scene.image.shape[:2], np.int32)
    for number, name in enumerate(classes, start=1):
        if name in scene.masks:
            ys, xs = np.nonzero(scene.masks[name])
            strokes[ys[::5][:80], xs[::5][:80]] = number
    native = segmenter.make_lesson(classes, [(scene.image, strokes)], short_side=None).save(tmp_path / "native")
    resized = segmenter.make_lesson(classes, [(scene.image, strokes)]).save(tmp_path / "resized")
    taught = segmenter.segment(image, classes, maps=False, short_side=None, lesson=native).labels
    assert not np.array_equal(taught, expected)
    assert main(argv + ["--lesson", str(native), "--out", str(tmp_path / "taught")]) == 0, capsys.readouterr().err
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "taught" / "slide_labels.zarr"))["labels"][:], taught)
    assert main(argv + ["--lesson", str(native)]) == 1                           # not this run's labels: kept, said
    assert "from a run with other classes, model or options" in capsys.readouterr().err
    assert main(argv + ["--lesson", str(resized), "--out", str(tmp_path / "other")]) == 2
    assert "other window settings" in capsys.readouterr().err
    assert not (tmp_path / "other" / "slide_labels.zarr").exists()


def test_format_zarr_with_objects_classifies_objects_across_tiles_from_a_zarr_or_a_tiff_beside(tmp_path, capsys):
    """--format zarr --objects: the objects beside a zarr slide (a zarr array, or a tiled TIFF), read a tile at a
    time, get the classes and labels a whole-image run gives them; the objects are no input of their own."""
    import zarr
    from skimage.measure import label as connected

    from napari_clearclip.demo.scenes import make_scene

    classes = ["red", "green", "blue", "yellow", "background"]
    scene = make_scene(24, size=300, objects=(6, 8))
    objects = connected(scene.label_image()).astype(np.uint32)          # one object per shape (and piece)
    objects[:, 150:] = np.where(objects[:, 150:] > 0, objects[:, 150:] + 50, 0)   # objects cut in two, renumbered
    expected = Segmenter("synthetic-tiny", device="cpu").segment(scene.image, classes, maps=False, short_side=None,
                                                                 objects=objects)
    for beside in ("zarr", "tif"):
        folder = tmp_path / beside
        folder.mkdir()
        zarr.create_array(str(folder / "slide.zarr"), data=scene.image, chunks=(128, 128, 3))
        if beside == "zarr":
            zarr.create_array(str(folder / "slide_cells.zarr"), data=objects, chunks=(100, 100))
        else:
            tifffile.imwrite(folder / "slide_cells.tif", objects, tile=(64, 64), compression="zlib")
        out = folder / "out"
        argv = [str(folder), "--classes", "; ".join(classes), "--out", str(out), "--model", "synthetic-tiny",
                "--device", "cpu", "--format", "zarr", "--no-snap", "--objects", "_cells"]
        assert main(argv) == 0, capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == ["clearclip_report.csv", "slide_classes.csv",
                                                         "slide_labels.zarr", "slide_objects.csv"]
        with open(out / "slide_objects.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert [int(r["id"]) for r in rows] == list(expected.objects["id"]) and len(rows) > 8
        assert [r["class"] for r in rows] == list(expected.objects["class"])
        assert [int(r["area"]) for r in rows] == list(expected.objects["area"])
        labels = zarr.open_group(str(out / "slide_labels.zarr"), mode="r")["labels"][:]
        np.testing.assert_array_equal(labels, expected.labels)
    (tmp_path / "tif" / "slide_cells.tif").unlink()
    assert main([str(tmp_path / "tif" / "slide.zarr"), "--classes", "; ".join(classes), "--out",
                 str(tmp_path / "none"), "--model", "synthetic-tiny", "--device", "cpu", "--format", "zarr",
                 "--objects", "_cells"]) == 1
    assert "No objects file slide_cells.tif or slide_cells.zarr beside slide.zarr" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "none").iterdir()) == ["clearclip_report.csv"]


def test_a_zarr_input_that_lacks_a_chunk_fails_by_name_unless_absent_chunks_are_read_as_the_fill_value(tmp_path,
                                                                                                        capsys):
    import zarr

    from napari_clearclip.demo.scenes import make_scene

    classes = ["red", "green", "blue", "yellow", "background"]
    image = make_scene(22, size=200, objects=(3, 5)).image
    stored = zarr.create_array(str(tmp_path / "slide.zarr"), shape=image.shape, chunks=(100, 100, 3), dtype=np.uint8)
    stored[:] = image
    (tmp_path / "slide.zarr" / "c" / "0" / "1" / "0").unlink()            # rows 0-99, columns 100-199: lost
    holed = image.copy()
    holed[:100, 100:] = 0
    segmenter = Segmenter("synthetic-tiny", device="cpu")
    expected = {"zarr": segmenter.segment(holed, classes, maps=False, short_side=None).labels,   # native resolution
                "tif": segmenter.segment(holed, classes, maps=False).labels}
    for output_format in ("zarr", "tif"):
        out = tmp_path / f"out-{output_format}"
        argv = [str(tmp_path / "slide.zarr"), "--classes", "; ".join(classes), "--out", str(out), "--model",
                "synthetic-tiny", "--device", "cpu", "--format", output_format, "--no-snap"]
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "slide.zarr lacks 1 of its 4 chunks" in err and "--absent-chunks fill" in err, err
        assert sorted(p.name for p in out.iterdir()) == ["clearclip_report.csv"]        # no labels, no partial store
        assert main(argv + ["--absent-chunks", "fill"]) == 0, capsys.readouterr().err
        if output_format == "zarr":
            labels = zarr.open_group(str(out / "slide_labels.zarr"), mode="r")["labels"][:]
        else:
            labels = tifffile.imread(out / "slide_labels.tif")
        np.testing.assert_array_equal(labels, expected[output_format])
    flags = zarr.create_array(str(tmp_path / "flags.zarr"), shape=(200, 200), chunks=(100, 100), dtype=bool)
    flags[:] = False                               # zarr 3 writes no chunk of the fill value alone: all "absent"
    for output_format in ("zarr", "tif"):       # a type no run takes is said first, not the chunks
        out = tmp_path / f"flags-{output_format}"
        assert main([str(tmp_path / "flags.zarr"), "--classes", "red; background", "--out", str(out), "--model",
                     "synthetic-tiny", "--device", "cpu", "--format", output_format]) == 1
        err = capsys.readouterr().err
        assert "flags.zarr holds bool values: not supported; use uint8, uint16 or float" in err and "chunks" not in err
        assert sorted(p.name for p in out.iterdir()) == ["clearclip_report.csv"]


def test_a_zarr_input_with_a_damaged_chunk_fails_by_name_and_the_batch_goes_on(tmp_path, capsys):
    """A chunk that cannot be decompressed (a disk error, a copy cut short): that image fails, said in the report and
    the exit code, and the other images of the batch are segmented (the run stopped with a traceback before)."""
    import csv

    import zarr

    from napari_clearclip.demo.scenes import make_scene

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name, seed in (("damaged", 22), ("whole", 23)):
        image = make_scene(seed, size=200, objects=(3, 5)).image
        zarr.create_array(str(inputs / f"{name}.zarr"), shape=image.shape, chunks=(100, 100, 3),
                          dtype=np.uint8)[:] = image
    (inputs / "damaged.zarr" / "c" / "1" / "0" / "0").write_bytes(b"not a chunk")
    for output_format in ("tif", "zarr"):
        out = tmp_path / f"out-{output_format}"
        assert main([str(inputs), "--classes", "red; green; background", "--out", str(out), "--model",
                     "synthetic-tiny", "--device", "cpu", "--format", output_format, "--no-snap"]) == 1
        err = capsys.readouterr().err
        assert "damaged.zarr: could not be read or segmented (RuntimeError: " in err, err
        assert "a chunk may be damaged: copy the store again" in err and "Traceback" not in err
        rows = {Path(row["file"]).name: row for row in csv.DictReader(open(out / "clearclip_report.csv"))}
        assert rows["damaged.zarr"]["status"] == "failed" and rows["whole.zarr"]["status"] == "done", rows
        assert (out / f"whole_labels.{output_format}").exists()
        assert not (out / f"damaged_labels.{output_format}").exists()


def test_a_zarr_slide_too_large_to_hold_is_segmented_at_its_level_when_the_run_resizes(tmp_path, capsys,
                                                                                     monkeypatch, served):
    """As in napari with Resize on: an OME-Zarr level (or block means of a plain array) that holds what the model
    sees is segmented instead of the whole slide, the labels have its size, and a note says so; the same for the
    slide at an address (its level alone read over the network)."""
    import zarr

    import napari_clearclip.reduced as reduced
    from napari_clearclip.demo.scenes import make_scene

    monkeypatch.setattr(reduced, "LARGE_PIXELS", 200 * 200)          # "too large to hold" from 200 x 200 on
    classes = ["red", "green", "blue", "yellow", "background"]
    image = make_scene(23, size=320, objects=(4, 6)).image
    half = image.reshape(160, 2, 160, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)
    store = tmp_path / "in" / "slide.zarr"                           # OME-Zarr, channels first, two levels
    group = zarr.open_group(str(store), mode="w")
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": "c", "type": "channel"},
                                                               {"name": "y", "type": "space", "unit": "micrometer"},
                                                               {"name": "x", "type": "space", "unit": "micrometer"}],
                                   "datasets": [{"path": "0", "coordinateTransformations": [
                                                     {"type": "scale", "scale": [1.0, 0.5, 0.25]}]},
                                                {"path": "1", "coordinateTransformations": [
                                                     {"type": "scale", "scale": [1.0, 1.0, 0.5]}]}]}]
    for name, level in (("0", image), ("1", half)):
        group.create_array(name, shape=(3, *level.shape[:2]), chunks=(3, 64, 64), dtype=np.uint8)[:] = \
            np.moveaxis(level, -1, 0)
    plain = zarr.create_array(str(tmp_path / "in" / "plain.zarr"), shape=image.shape, chunks=(64, 64, 3),
                              dtype=np.uint8)
    plain[:] = image
    segmenter = Segmenter("synthetic-tiny", device="cpu")
    out = tmp_path / "out"
    argv = [str(tmp_path / "in"), "--classes", "; ".join(classes), "--out", str(out), "--model", "synthetic-tiny",
            "--device", "cpu", "--no-snap", "--large-side", "160"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "slide.zarr: 320 x 320 pixels, too large to hold: segmented at pyramid level 1 (160 x 160, 1/2 of " \
           "full size)" in err and "--format zarr segments at full resolution" in err, err
    assert "plain.zarr: 320 x 320 pixels, too large to hold: segmented at a copy reduced by block means (160 x " \
           "160, 1/2 of full size)" in err, err
    expected = segmenter.segment(half, classes, maps=False).labels
    np.testing.assert_array_equal(tifffile.imread(out / "slide_labels.tif"), expected)
    np.testing.assert_array_equal(tifffile.imread(out / "plain_labels.tif"), expected)   # 2 x 2 means, rounded
    with tifffile.TiffFile(out / "slide_labels.tif") as tif:       # the level's pixels: 1 x 0.5 um, per cm
        tags = tif.pages[0].tags
        assert (tags["XResolution"].value, tags["YResolution"].value, tags["ResolutionUnit"].value) == \
            ((20000, 1), (10000, 1), 3)
    address = served(tmp_path / "in", listing=False) + "/slide.zarr"
    assert main([address, *argv[1:], "--out", str(tmp_path / "remote")]) == 0
    assert f"note: {address}: 320 x 320 pixels, too large to hold: segmented at pyramid level 1" in \
        capsys.readouterr().err
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "remote" / "slide_labels.tif"), expected)
    assert [path for path in served.requested if path.startswith("/slide.zarr/1/c/")]
    assert not [path for path in served.requested if path.startswith("/slide.zarr/0/c/")]   # level 0 never read
    # --large-side is part of what the outputs are: a run with another keeps them, says why, and replaces them when
    # asked; at 320 (its whole side) the slide is segmented at full size
    wider = [a if a != "160" else "320" for a in argv]
    assert main(wider) == 1
    err = capsys.readouterr().err
    assert "slide.zarr: outputs exist from a run with other classes, model or options" in err, err
    assert tifffile.imread(out / "slide_labels.tif").shape == (160, 160)
    assert main(wider + ["--overwrite"]) == 0
    err = capsys.readouterr().err
    assert "too large to hold" not in err, err
    full = segmenter.segment(image, classes, maps=False).labels
    np.testing.assert_array_equal(tifffile.imread(out / "slide_labels.tif"), full)
    np.testing.assert_array_equal(tifffile.imread(out / "plain_labels.tif"), full)
    assert main(argv) == 1                                            # back to 160: the 320 run's outputs kept
    assert main(argv + ["--overwrite"]) == 0
    capsys.readouterr()
    np.testing.assert_array_equal(tifffile.imread(out / "slide_labels.tif"), expected)
    # objects of the full-size slide do not fit the level: the file fails with why and what to do
    tifffile.imwrite(tmp_path / "in" / "slide_cells.tif", np.ones((320, 320), np.uint16))
    assert main(argv + ["--objects", "_cells", "--out", str(tmp_path / "objects")]) == 1
    err = capsys.readouterr().err
    assert "its objects are (320, 320), but the image is 320 x 320 pixels, too large to hold: segmented at pyramid " \
           "level 1" in err and "--native to classify them at full size" in err, err
    # --features-only stores what such runs segment: a later run on the level finds its features
    store_dir = tmp_path / "store"
    assert main([str(store), "--features-only", "--model", "synthetic-tiny", "--device", "cpu",
                 "--feature-store", str(store_dir), "--large-side", "160"]) == 0
    assert "segmented at pyramid level 1" in capsys.readouterr().err
    assert len(list(store_dir.glob("*.zarr"))) == 1
    Segmenter("synthetic-tiny", device="cpu", feature_store=store_dir).segment(half, classes, maps=False)
    assert len(list(store_dir.glob("*.zarr"))) == 1                  # found, not stored again
    # at native resolution (no resizing) the whole image is read, as asked, and no note is given
    argv[argv.index(str(out))] = str(tmp_path / "native")
    assert main(argv + ["--native"]) == 0
    assert "note:" not in capsys.readouterr().err
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "native" / "slide_labels.tif"),
                                  segmenter.segment(image, classes, maps=False, short_side=None).labels)


def test_finished_labels_in_either_format_are_never_replaced_unasked(tmp_path, capsys):
    """A run in the other format, or one asking for more outputs, skips an input whose labels a run finished: it
    would replace the class table that describes those labels (or the labels themselves)."""
    import zarr

    from napari_clearclip.demo.scenes import make_scene

    store = tmp_path / "in" / "slide.zarr"
    array = zarr.open_array(str(store), mode="w", shape=(96, 96, 3), chunks=(64, 64, 3), dtype=np.uint8)
    array[:] = make_scene(5, size=96, objects=(2, 3)).image
    out = tmp_path / "out"
    common = [str(store), "--out", str(out), "--model", "synthetic-tiny", "--device", "cpu", "--no-snap"]
    assert main(common + ["--classes", "red; background"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "clearclip_report.csv"}
    assert set(files) == {"slide_labels.tif", "slide_classes.csv"}
    for later in (["--classes", "blue; red; background", "--format", "zarr"],      # the other format, other classes
                  ["--classes", "red; background", "--format", "zarr"],            # the other format, same classes
                  ["--classes", "red; background", "--save-probabilities"]):       # more outputs asked for
        other_labels = "--format" in later     # another resolution: not this run's labels (more outputs: the same)
        assert main(common + later) == (1 if other_labels else 0)
        err = capsys.readouterr().err
        assert "1 skipped" in err and ("not this run's labels" in err) == other_labels, later
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "clearclip_report.csv"} == files, later
    assert main(common + ["--classes", "blue; red; background", "--format", "zarr", "--overwrite"]) == 0
    capsys.readouterr()
    with open(out / "slide_classes.csv", newline="") as handle:          # asked: now this run's table and labels
        assert [r["name"] for r in csv.DictReader(handle)] == ["unassigned", "blue", "red", "background"]
    assert (out / "slide_labels.zarr").is_dir() and not (out / "slide_labels.tif").exists()   # no labels it misnames


def test_an_image_whose_outputs_would_have_too_long_a_name_fails_alone_before_any_work(tmp_path, rgb_image, capsys):
    """Outputs are written under a temporary name 18 bytes longer than theirs. Where that passes the file system's
    255 bytes, that image fails alone, said in a sentence (it was a traceback that stopped every image); a name that
    just fits is segmented."""
    fits, too_long = "y" * 225, "x" * 230  # 225 + len("_classes.csv") + 18 = 255
    _pngs(tmp_path / "in", ["short.png", f"{fits}.png", f"{too_long}.png"], rgb_image)
    out = tmp_path / "out"
    named = tmp_path / ("z" * 300 + ".png")  # named on the command line: a name no file system holds
    code = main([str(tmp_path / "in"), str(named), "--classes", "red; background", "--out", str(out), "--model",
                 "synthetic-tiny", "--device", "cpu", "--no-snap"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "would have a name of 259 bytes while it is written" in err and "give the image a shorter name" in err
    assert "would have a name of 329 bytes" in err
    assert "Traceback" not in err and "2 of 4 images segmented" in err
    assert sorted(p.name for p in out.iterdir()) == sorted(["clearclip_report.csv", "short_classes.csv",
                                                            "short_labels.tif", f"{fits}_classes.csv",
                                                            f"{fits}_labels.tif"])


def test_labels_and_probabilities_keep_the_pixel_size_the_image_declares(tmp_path, tiny_checkpoint, rgb_image, capsys):
    """Labels measure as their image does: the pixel size of ImageJ's (unit in its description), OME-TIFF's
    (in its XML) and plain resolution tags is written into the output TIFFs, per centimetre where the unit is a
    length; a TIFF without one, or a PNG, gives outputs without one."""
    grey = rgb_image[..., 1]
    tifffile.imwrite(tmp_path / "imagej.tif", grey, imagej=True, resolution=(2.0, 4.0), metadata={"unit": "um"})
    tifffile.imwrite(tmp_path / "ome.ome.tif", grey, ome=True,
                     metadata={"axes": "YX", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.5, "PhysicalSizeXUnit": "nm",
                               "PhysicalSizeYUnit": "nm"})
    tifffile.imwrite(tmp_path / "inch.tif", grey, resolution=(300, 150), resolutionunit=2)
    stack = np.stack([grey, grey[::-1]])
    tifffile.imwrite(tmp_path / "stack.tif", stack, imagej=True, resolution=(1 / 0.65, 1 / 0.65),
                     metadata={"unit": "micron", "axes": "ZYX"})
    tifffile.imwrite(tmp_path / "plain.tif", grey)
    imsave(tmp_path / "photo.png", rgb_image)
    out = tmp_path / "out"
    assert main([str(tmp_path), "--classes", "sky; grass", "--out", str(out), "--save-probabilities",
                 "--model", "test-tiny", "--pretrained", tiny_checkpoint, "--device", "cpu"]) == 0
    capsys.readouterr()

    def pixel_size(path):
        with tifffile.TiffFile(path) as tif:
            tags = tif.pages[0].tags
            x, y = (tags[name].value for name in ("XResolution", "YResolution"))
            return x[0] / x[1], y[0] / y[1], int(tags["ResolutionUnit"].value), len(tif.pages)
    expected = {"imagej": (2e4, 4e4, 3), "ome.ome": (4e7, 2e7, 3), "inch": (300, 150, 2),
                "stack": (1e4 / 0.65, 1e4 / 0.65, 3), "plain": (1, 1, 1), "photo": (1, 1, 1)}
    for stem, (x, y, unit) in expected.items():
        for output in ("labels", "probabilities"):
            if stem == "stack" and output == "probabilities":
                continue                                  # a stack's planes are written as labels only
            got = pixel_size(out / f"{stem}_{output}.tif")
            assert got[2] == unit and np.allclose(got[:2], (x, y), rtol=1e-6), (stem, output, got)
    assert pixel_size(out / "stack_labels.tif")[3] == 2
    # tile by tile into zarr: the labels placed as OME-Zarr, from an OME-Zarr image's own transformations, or in
    # micrometres from a TIFF's pixel size
    import zarr

    slide = zarr.open_group(str(tmp_path / "zarr" / "slide.zarr"), mode="w")
    slide.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": "y", "type": "space", "unit": "nanometer"},
                                                              {"name": "x", "type": "space", "unit": "nanometer"}],
                                   "datasets": [{"path": "0", "coordinateTransformations": [
                                       {"type": "scale", "scale": [0.5, 2.0]},
                                       {"type": "translation", "translation": [3.0, -4.0]}]}],
                                   "coordinateTransformations": [{"type": "scale", "scale": [10.0, 10.0]}]}]
    slide.create_array("0", data=grey)
    assert main([str(tmp_path / "zarr" / "slide.zarr"), str(tmp_path / "imagej.tif"), "--classes", "sky; grass",
                 "--out", str(out / "zarr"), "--format", "zarr", "--native", "--model", "test-tiny", "--pretrained",
                 tiny_checkpoint, "--device", "cpu"]) == 0

    def placement(store):
        (multiscale,) = dict(zarr.open_group(str(store), mode="r").attrs)["ome"]["multiscales"]
        (dataset,) = multiscale["datasets"]
        assert dataset["path"] == "labels"
        return [axis["unit"] for axis in multiscale["axes"]], dataset["coordinateTransformations"]
    assert placement(out / "zarr" / "slide_labels.zarr") == (
        ["nanometer", "nanometer"], [{"type": "scale", "scale": [5.0, 20.0]},
                                     {"type": "translation", "translation": [30.0, -40.0]}])
    assert placement(out / "zarr" / "imagej_labels.zarr") == (
        ["micrometer", "micrometer"], [{"type": "scale", "scale": [0.25, 0.5]}])


def test_an_rgb_tiff_with_separate_colour_planes_is_one_rgb_image(tmp_path, capsys):
    """A TIFF may keep an RGB image's colours in separate planes (tifffile's "SYX"): it is segmented as the same
    RGB image kept interleaved, into 2-D labels (it was taken for a stack of three grey planes, exit status 0),
    as a stack of such images is, plane by plane."""
    from napari_clearclip.demo.scenes import make_scene

    classes = ["red", "green", "blue", "yellow", "background"]
    image = make_scene(5, size=128, objects=(3, 3)).image
    tifffile.imwrite(tmp_path / "interleaved.tif", image, photometric="rgb")
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(image, -1, 0), photometric="rgb", planarconfig="separate")
    stack = np.stack([image, image[::-1]])
    tifffile.imwrite(tmp_path / "planar_stack.tif", np.moveaxis(stack, -1, 1), photometric="rgb",
                     planarconfig="separate")
    out = tmp_path / "out"
    assert main([str(tmp_path), "--classes", "; ".join(classes), "--out", str(out), "--model", "synthetic-tiny",
                 "--device", "cpu"]) == 0
    capsys.readouterr()
    segmenter = Segmenter("synthetic-tiny", device="cpu")
    expected = [segmenter.segment(plane, classes, maps=False, refine="pamr").labels for plane in stack]
    np.testing.assert_array_equal(tifffile.imread(out / "interleaved_labels.tif"), expected[0])
    np.testing.assert_array_equal(tifffile.imread(out / "planar_labels.tif"), expected[0])
    np.testing.assert_array_equal(tifffile.imread(out / "planar_stack_labels.tif"), np.stack(expected))


def test_a_tiff_slide_too_large_to_hold_is_read_at_its_level_or_tile_by_tile_never_whole(tmp_path, capsys,
                                                                                         monkeypatch):
    """A whole-slide TIFF (a pyramid, or one large tiled image) is treated as a zarr slide is: with resizing,
    segmented at its pyramid level (or block means read a band at a time), and with --format zarr tile by tile;
    the full-resolution image is never read whole (it was, for every TIFF: a 10 GB slide needed 10 GB)."""
    import zarr

    import napari_clearclip.batch.files as files
    import napari_clearclip.reduced as reduced
    from napari_clearclip.demo.scenes import make_scene

    monkeypatch.setattr(reduced, "LARGE_PIXELS", 200 * 200)          # "too large to hold" from 200 x 200 on
    classes = ["red", "green", "blue", "yellow", "background"]
    image = make_scene(23, size=320, objects=(4, 6)).image
    half = image.reshape(160, 2, 160, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)
    folder = tmp_path / "in"
    folder.mkdir()
    with tifffile.TiffWriter(folder / "slide.ome.tif") as tif:     # OME-TIFF pyramid: the full image and a half
        tif.write(image, subifds=1, tile=(64, 64), photometric="rgb", metadata={"axes": "YXS"})
        tif.write(half, subfiletype=1, tile=(64, 64), photometric="rgb")
    tifffile.imwrite(folder / "tiled.tif", np.moveaxis(image, -1, 0), tile=(64, 64), photometric="rgb",
                     planarconfig="separate")
    (folder / "scan.svs").write_bytes((folder / "slide.ome.tif").read_bytes())   # a whole-slide format on TIFF
    read_whole = files.read_image

    def read_image(path, *args, **kwargs):
        assert Path(path).parent != folder, f"{path} was read whole"
        return read_whole(path, *args, **kwargs)
    monkeypatch.setattr(files, "read_image", read_image)
    import napari_clearclip.batch.runs as runs
    monkeypatch.setattr(runs, "read_image", read_image)
    out = tmp_path / "out"
    common = ["--classes", "; ".join(classes), "--model", "synthetic-tiny", "--device", "cpu", "--no-snap"]
    assert main([str(folder), "--out", str(out), "--large-side", "160", *common]) == 0
    err = capsys.readouterr().err
    assert "slide.ome.tif: 320 x 320 pixels, too large to hold: segmented at pyramid level 1 (160 x 160, 1/2 of " \
           "full size)" in err, err
    assert "tiled.tif: 320 x 320 pixels, too large to hold: segmented at a copy reduced by block means" in err, err
    segmenter = Segmenter("synthetic-tiny", device="cpu")
    expected = segmenter.segment(half, classes, maps=False).labels
    np.testing.assert_array_equal(tifffile.imread(out / "slide.ome_labels.tif"), expected)
    np.testing.assert_array_equal(tifffile.imread(out / "scan_labels.tif"), expected)
    np.testing.assert_array_equal(tifffile.imread(out / "tiled_labels.tif"), expected)   # 2 x 2 means, rounded
    # tile by tile at full resolution: the labels of the whole image, read a region at a time
    assert main([str(folder), "--out", str(tmp_path / "native"), "--format", "zarr", "--native", *common]) == 0
    capsys.readouterr()
    full = segmenter.segment(image, classes, maps=False, short_side=None).labels
    for stem in ("slide.ome", "scan", "tiled"):
        np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "native" / f"{stem}_labels.zarr"),
                                                      mode="r")["labels"][:], full)


@pytest.mark.parametrize("compression", ["lzw", "jpeg", "jpeg2000", "zstd"])
def test_compressed_tiffs_as_microscopes_and_slide_scanners_write_them_are_read(tmp_path, capsys, compression):
    """LZW (common from microscopes and image editors), JPEG and JPEG 2000 (whole-slide scanners) and zstd TIFFs
    are segmented: they failed with "requires the 'imagecodecs' package"."""
    from napari_clearclip.demo.scenes import make_scene

    classes = ["red", "green", "blue", "yellow", "background"]
    image = make_scene(4, size=128, objects=(3, 3)).image
    tifffile.imwrite(tmp_path / "scan.tif", image, tile=(64, 64), photometric="rgb", compression=compression)
    out = tmp_path / "out"
    assert main([str(tmp_path / "scan.tif"), "--classes", "; ".join(classes), "--out", str(out), "--model",
                 "synthetic-tiny", "--device", "cpu"]) == 0, capsys.readouterr().err
    stored = tifffile.imread(tmp_path / "scan.tif")          # what the file holds (JPEG's are not the pixels given)
    expected = Segmenter("synthetic-tiny", device="cpu").segment(stored, classes, maps=False, refine="pamr").labels
    np.testing.assert_array_equal(tifffile.imread(out / "scan_labels.tif"), expected)


def test_pictures_in_their_common_forms_are_segmented_and_an_animation_is_said(tmp_path, capsys):
    """A one-frame GIF, a grey PNG with alpha and a 1-bit PNG are images (they failed: "(1, H, W, 3) is not
    supported", "(H, W, 2) is not supported", "dtype bool is not supported"); an animated GIF fails alone, saying
    what it is."""
    from PIL import Image
    from skimage.io import imread

    from napari_clearclip.demo.scenes import make_scene

    classes = ["red", "green", "blue", "yellow", "background"]
    image = make_scene(6, size=128, objects=(3, 3)).image
    Image.fromarray(image).save(tmp_path / "still.gif")
    Image.fromarray(image).convert("LA").save(tmp_path / "faded.png")
    Image.fromarray(image[..., 0] > 128).save(tmp_path / "mask.png")
    Image.fromarray(image).save(tmp_path / "moving.gif", save_all=True, append_images=[Image.fromarray(image[::-1])])
    out = tmp_path / "out"
    assert main([str(tmp_path), "--classes", "; ".join(classes), "--out", str(out), "--model", "synthetic-tiny",
                 "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "moving.gif is an animation of 2 frames: save the frame to segment as an image of its own" in err, err
    assert "3 of 4 images segmented" in err, err
    segmenter = Segmenter("synthetic-tiny", device="cpu")
    expected = {"still": imread(tmp_path / "still.gif")[0], "faded": imread(tmp_path / "faded.png")[..., 0],
                "mask": (image[..., 0] > 128).astype(np.uint8) * 255}
    for stem, pixels in expected.items():
        labels = segmenter.segment(pixels, classes, maps=False, refine="pamr").labels
        np.testing.assert_array_equal(tifffile.imread(out / f"{stem}_labels.tif"), labels, err_msg=stem)


def _ome_zarr(store, image: np.ndarray) -> None:
    """``image`` (RGB) written as a one-level OME-Zarr image, channels first, into a new store (a path) or a group."""
    import zarr

    group = zarr.open_group(str(store), mode="w") if isinstance(store, Path) else store
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": "c", "type": "channel"},
                                                               {"name": "y", "type": "space", "unit": "micrometer"},
                                                               {"name": "x", "type": "space", "unit": "micrometer"}],
                                   "datasets": [{"path": "0", "coordinateTransformations": [
                                       {"type": "scale", "scale": [1.0, 0.5, 0.5]}]}]}]
    level = group.create_array("0", shape=(3, *image.shape[:2]), chunks=(3, 128, 128), dtype=np.uint8)
    level[:] = np.moveaxis(image, -1, 0)


def test_a_zarr_store_at_an_address_is_segmented_as_its_local_copy_is(tmp_path, capsys, served):
    """An OME-Zarr store on a web server that lists no folder (as object stores serve them) is segmented by its address:
    the labels equal those of its local copy (whole, and tile by tile with --format zarr), named after the store and
    placed by its pixel size. A second run keeps them; once the store was written again with other pixels, the run
    says the outputs are of an earlier version. A missing store fails alone, by its address."""
    import zarr

    from napari_clearclip.demo.scenes import make_scene

    classes = ["red", "green", "blue", "yellow", "background"]
    image = make_scene(31, size=300, objects=(4, 6)).image
    _ome_zarr(tmp_path / "data" / "slide.zarr", image)
    address = served(tmp_path / "data", listing=False) + "/slide.zarr"
    base = ["--classes", "; ".join(classes), "--model", "synthetic-tiny", "--device", "cpu"]
    assert main([str(tmp_path / "data" / "slide.zarr"), *base, "--out", str(tmp_path / "local")]) == 0
    assert main([address, *base, "--out", str(tmp_path / "remote")]) == 0, capsys.readouterr().err
    local = tifffile.imread(tmp_path / "local" / "slide_labels.tif")
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "remote" / "slide_labels.tif"), local)
    expected = Segmenter("synthetic-tiny", device="cpu").segment(image, classes, maps=False, refine="pamr").labels
    np.testing.assert_array_equal(local, expected)                                 # snapped, as the widget
    with tifffile.TiffFile(tmp_path / "remote" / "slide_labels.tif") as tif:     # the store's pixel size: 0.5 um
        assert tif.pages[0].tags["XResolution"].value == (20000, 1)
    with open(tmp_path / "remote" / "clearclip_report.csv", newline="") as handle:
        (report,) = list(csv.DictReader(handle))
    assert report["file"] == address and report["status"] == "done", report

    tiled = [address, *base, "--out", str(tmp_path / "tiled"), "--format", "zarr", "--no-snap"]
    assert main(tiled) == 0, capsys.readouterr().err
    labels = zarr.open_group(str(tmp_path / "tiled" / "slide_labels.zarr"), mode="r")["labels"][:]
    np.testing.assert_array_equal(labels, Segmenter("synthetic-tiny", device="cpu").segment(
        image, classes, maps=False, short_side=None, refine=None).labels)

    capsys.readouterr()
    assert main([address, *base, "--out", str(tmp_path / "remote")]) == 0          # the same store: kept
    assert f"skipped: {address}: outputs exist (use --overwrite" in capsys.readouterr().err
    import napari_clearclip.zarr_images as zarr_images

    def unreachable(address):
        raise OSError(f"The zarr store at {address} cannot be read: Connection refused")

    with pytest.MonkeyPatch.context() as patched:   # the network down: not taken for a store written again
        patched.setattr(zarr_images, "remote_store_identity", unreachable)
        assert main([address, *base, "--out", str(tmp_path / "remote")]) == 1
    err = capsys.readouterr().err
    assert f"skipped: {address}: outputs exist, kept as they are, but the store could not be read now" in err, err
    assert "earlier version" not in err.split("not this run's labels")[0]
    changed = image.copy()
    changed[100:160, 100:160] = (255, 0, 0)
    _ome_zarr(tmp_path / "data" / "slide.zarr", changed)
    assert main([address, *base, "--out", str(tmp_path / "remote")]) == 1
    assert f"skipped: {address}: outputs exist for an earlier version" in capsys.readouterr().err

    code = main([address, "--features-only", "--model", "synthetic-tiny", "--device", "cpu",
                 "--feature-store", str(tmp_path / "features")])    # a cluster's encoding for napari to find
    assert code == 0 and "1 of 1 images' features stored" in capsys.readouterr().err
    assert len(list((tmp_path / "features").glob("*.zarr"))) == 1

    missing = served(tmp_path / "data", listing=False) + "/other.zarr"
    assert main([missing, address, *base, "--out", str(tmp_path / "two")]) == 1
    err = capsys.readouterr().err
    assert f"error: {missing}: No zarr store at {missing}" in err, err
    assert (tmp_path / "two" / "slide_labels.tif").is_file() and not (tmp_path / "two" / "other_labels.tif").exists()
    assert main([address, *base, "--out", str(tmp_path / "objects"), "--objects", "_cells"]) == 1
    assert f"--objects reads files beside the image on this computer, and {address} is an address" in \
        capsys.readouterr().err


@pytest.mark.parametrize("series_listed", [True, False])
def test_a_bioformats2raw_collection_is_segmented_by_its_first_image_and_says_so(tmp_path, capsys, served,
                                                                                series_listed):
    """A store as bioformats2raw converts a slide (images "0", "1" ... under a group marked ``bioformats2raw.layout``,
    listed by its OME group or not) is segmented by its first image, on disk or at an address, and a note names the
    others; one of them is segmented when named. At an address, the first image's pixels tell the store written again.
    A plate is refused, saying to name a field's image."""
    import zarr

    from napari_clearclip.demo.scenes import make_scene

    classes = ["red", "green", "blue", "yellow", "background"]
    image, macro = make_scene(41, size=256, objects=(4, 5)).image, make_scene(42, size=96).image

    def write(first: np.ndarray) -> None:
        root = zarr.open_group(str(tmp_path / "data" / "scan.zarr"), mode="w")
        root.attrs["bioformats2raw.layout"] = 3
        for name, picture in (("0", first), ("1", macro)):
            _ome_zarr(root.create_group(name), picture)
        if series_listed:
            root.create_group("OME").attrs["series"] = ["0", "1"]

    write(image)
    address = served(tmp_path / "data", listing=False) + "/scan.zarr"
    base = ["--classes", "; ".join(classes), "--model", "synthetic-tiny", "--device", "cpu"]
    engine = Segmenter("synthetic-tiny", device="cpu")
    for source, out in ((str(tmp_path / "data" / "scan.zarr"), "local"), (address, "remote")):
        assert main([source, *base, "--out", str(tmp_path / out)]) == 0
        err = capsys.readouterr().err
        assert (f"note: {source}: a collection of 2 images (0, 1): its first was segmented; name {source}/1 (and so "
                "on) to segment another") in err, err
        np.testing.assert_array_equal(tifffile.imread(tmp_path / out / "scan_labels.tif"),
                                      engine.segment(image, classes, maps=False, refine="pamr").labels)
    assert main([f"{address}/1", *base, "--out", str(tmp_path / "macro")]) == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "macro" / "scan_1_labels.tif"),   # named after both
                                  engine.segment(macro, classes, maps=False, refine="pamr").labels)
    assert main([address, *base, "--out", str(tmp_path / "tiled"), "--format", "zarr", "--no-snap"]) == 0
    assert "a collection of 2 images" in capsys.readouterr().err
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "tiled" / "scan_labels.zarr"))["labels"][:],
                                  engine.segment(image, classes, maps=False, short_side=None).labels)
    changed = image.copy()
    changed[40:90, 40:90] = (0, 0, 255)
    write(changed)
    assert main([address, *base, "--out", str(tmp_path / "remote")]) == 1
    assert f"skipped: {address}: outputs exist for an earlier version" in capsys.readouterr().err

    plate = zarr.open_group(str(tmp_path / "data" / "plate.zarr"), mode="w")
    plate.attrs["plate"] = {"version": "0.4", "rows": [{"name": "A"}], "columns": [{"name": "1"}],
                            "wells": [{"path": "A/1", "rowIndex": 0, "columnIndex": 0}]}
    assert main([str(tmp_path / "data" / "plate.zarr"), *base, "--out", str(tmp_path / "plate")]) == 1
    assert "plate.zarr is a plate (OME-Zarr HCS): name one field's image, e.g. " in capsys.readouterr().err


def test_a_server_that_stops_answering_fails_its_store_within_the_time_limit(tmp_path, capsys, monkeypatch):
    """A web server that takes connections and then says nothing fails the store it serves, by its address, once it has
    been silent for ``REMOTE_SILENCE_SECONDS`` (aiohttp would wait five minutes a request); the other inputs go on."""
    import socket
    import threading
    import time

    import napari_clearclip.zarr_images as zarr_images
    from napari_clearclip.demo.scenes import make_scene
    from napari_clearclip.errors import StoreUnreachableError
    from napari_clearclip.image_locations import RemoteStore

    monkeypatch.setattr(zarr_images, "REMOTE_SILENCE_SECONDS", 1.0)
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)    # takes connections, never answers
    stalled = f"http://127.0.0.1:{listener.getsockname()[1]}/slide.zarr"
    bound = threading.Timer(60, listener.close)    # (should the limit fail: connections reset, the test ends)
    bound.start()
    imsave(tmp_path / "scene.png", make_scene(3, size=96).image, check_contrast=False)
    start = time.monotonic()
    try:
        code = main([stalled, str(tmp_path / "scene.png"), "--classes", "red; background", "--out",
                     str(tmp_path / "out"), "--model", "synthetic-tiny", "--device", "cpu"])
    finally:
        bound.cancel()
        listener.close()
    err = capsys.readouterr().err
    assert code == 1 and f"error: {stalled}: The zarr store at {stalled} cannot be read" in err, err
    assert time.monotonic() - start < 30
    assert (tmp_path / "out" / "scene_labels.tif").is_file() and not (tmp_path / "out" / "slide_labels.tif").exists()
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)   # in Python: a ConnectionError, said as such
    stalled = f"http://127.0.0.1:{listener.getsockname()[1]}/slide.zarr"
    try:
        with pytest.raises(StoreUnreachableError, match=f"The zarr store at {stalled} cannot be read now") as raised:
            zarr_images.open_zarr_image(RemoteStore(stalled))
    finally:
        listener.close()
    assert isinstance(raised.value, ConnectionError)


def test_an_address_no_installed_package_can_read_is_refused_before_anything_runs(tmp_path, capsys):
    """An address whose protocol needs a package not installed (``s3://`` without s3fs) or that no package reads stops
    the command at once, saying which, not after the model loaded, nor once per input."""
    import importlib.util

    cases = [("foo://host/slide.zarr", "foo:// is not a protocol fsspec can read")]
    if importlib.util.find_spec("s3fs") is None:
        cases.append(("s3://bucket/slide.zarr", "reading s3:// addresses needs a package this Python lacks (Install s3fs"))
    for address, said in cases:
        code = main([address, "--classes", "cell; background", "--out", str(tmp_path / "out"),
                     "--model", "no-such-model", "--device", "cpu"])
        err = capsys.readouterr().err
        assert code == 2 and said in err, err
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("address", ["https://127.0.0.1:9/data/slide.tif", "http://127.0.0.1:9/slides/slide.png"])
def test_an_address_of_a_picture_file_is_refused_before_anything_runs_with_what_to_do_instead(tmp_path, capsys,
                                                                                             address):
    """Addresses are read as zarr stores: one of a TIFF or PNG is said as the address it is, with what to do, before any
    model loads or output is written (read as a path, its "//" folded into a name found nowhere). The Python function
    raises a ValueError."""
    from napari_clearclip.batch import segment_files
    from napari_clearclip.errors import InvalidOptionError

    out = tmp_path / "out"
    code = main([address, str(tmp_path / "other.png"), "--classes", "cell; background", "--out", str(out),
                 "--model", "no-such-model", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{address} is the address of a" in err and "Download the file" in err and "zarr stores" in err, err
    assert "No such file" not in err
    assert not out.exists() or not any(out.iterdir())
    with pytest.raises(InvalidOptionError, match="is the address of a") as raised:
        segment_files([address], "cell; background", out_dir=tmp_path / "api", model="no-such-model")
    assert isinstance(raised.value, ValueError)


def test_a_tiff_of_several_series_is_segmented_by_its_first_and_says_so(tmp_path, capsys):
    """An OME-TIFF of several positions: its first series is segmented, a note says the others are not, and the
    labels' record says which series they are (a TIFF of one series says nothing of series)."""
    from napari_clearclip.batch.labels_reading import read_labels_output
    from napari_clearclip.demo.scenes import make_scene

    classes = ["red", "green", "blue", "yellow", "background"]
    first, second = make_scene(51, size=160).image, make_scene(52, size=160).image
    with tifffile.TiffWriter(tmp_path / "positions.ome.tif", ome=True) as tiff:
        for picture in (first, second):
            tiff.write(picture, photometric="rgb")
    tifffile.imwrite(tmp_path / "single.tif", first, photometric="rgb")
    base = ["--classes", "; ".join(classes), "--model", "synthetic-tiny", "--device", "cpu", "--out", str(tmp_path / "out")]
    assert main([str(tmp_path / "positions.ome.tif"), str(tmp_path / "single.tif"), *base]) == 0
    err = capsys.readouterr().err
    assert (f"note: {tmp_path / 'positions.ome.tif'}: a TIFF of 2 series: its first was segmented, and this command "
            "segments no other") in err, err
    assert "single.tif: a TIFF" not in err
    engine = Segmenter("synthetic-tiny", device="cpu")
    saved = read_labels_output(tmp_path / "out" / "positions.ome_labels.tif")
    np.testing.assert_array_equal(saved.data, engine.segment(first, classes, maps=False, refine="pamr").labels)
    assert saved.record["array"] == "series 0"
    assert "array" not in read_labels_output(tmp_path / "out" / "single_labels.tif").record
