"""The clearclip-segment command: outputs per image, keeps going past bad inputs."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import tifffile
from skimage.io import imsave

from napari_clearclip import Segmenter
from napari_clearclip.cli import main


def test_cli_writes_labels_and_table_and_skips_bad_inputs(tmp_path, tiny_checkpoint, rgb_image, capsys):
    good_png = tmp_path / "photo.png"
    imsave(good_png, rgb_image)
    good_tif = tmp_path / "scan.tif"
    tifffile.imwrite(good_tif, rgb_image[..., 1])
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.zeros((2, 3, 40, 40), np.uint8))
    out = tmp_path / "out"

    code = main([str(good_png), str(broken), str(tmp_path / "missing.png"), str(stack), str(good_tif),
                 "--classes", "sky; horse, pony; grass", "--out", str(out),
                 "--model", "test-tiny", "--pretrained", tiny_checkpoint, "--device", "cpu", "--save-probabilities"])
    assert code == 1
    err = capsys.readouterr().err
    assert "broken.png: Could not read" in err and "missing.png: No such file" in err
    assert "stack.tif: Image of shape (2, 3, 40, 40) is not supported" in err
    assert "2 of 5 images segmented" in err

    labels = tifffile.imread(out / "photo_labels.tif")
    expected = Segmenter("test-tiny", tiny_checkpoint, device="cpu").segment(rgb_image, ["sky", "horse, pony", "grass"])
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


def test_cli_entry_point_help():
    completed = subprocess.run([sys.executable, "-m", "napari_clearclip.cli", "--help"], capture_output=True, text=True)
    assert completed.returncode == 0
    assert "--classes" in completed.stdout and "synonyms" in completed.stdout
