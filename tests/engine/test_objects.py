"""Classes for objects that already exist (instance labels from cellpose, StarDist, micro-sam)."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.measure import label as connected

from napari_clearclip import Segmenter
from napari_clearclip.demo.scenes import DEMO_CLASSES, held_out_scenes
from napari_clearclip.errors import InvalidOptionError

CLASSES = DEMO_CLASSES.split("\n")


@pytest.fixture(scope="module")
def demo():
    return Segmenter("synthetic-tiny", device="cpu")


def instances(scene) -> tuple[np.ndarray, dict[int, str]]:
    """Every shape of a scene as an object (its own id), and each id's true colour."""
    objects = np.zeros(scene.image.shape[:2], np.int32)
    truth = {}
    for colour, mask in scene.masks.items():
        parts = connected(mask)
        for part in range(1, parts.max() + 1):
            new_id = objects.max() + 1
            objects[parts == part] = new_id
            truth[int(new_id)] = colour
    return objects, truth


def test_objects_take_the_class_of_their_summed_probabilities(demo):
    scene = held_out_scenes(1, sizes=(256,))[0]
    objects, truth = instances(scene)
    full = demo.segment(scene.image, CLASSES)                             # per-class maps, for the reference
    result = demo.segment(scene.image, CLASSES, objects=objects, maps=False)
    table = result.objects
    assert sorted(table) == ["area", "class", "confidence", "id"]
    assert len(table["id"]) == len(truth) and set(table["id"]) == set(truth)
    for row, object_id in enumerate(table["id"]):
        pixels = objects == object_id
        sums = full.probabilities[:, pixels].sum(1)                    # the independent computation
        assert table["class"][row] == CLASSES[int(sums.argmax())]
        assert table["confidence"][row] == pytest.approx(sums.max() / pixels.sum(), abs=1e-5)
        assert table["area"][row] == pixels.sum()
        assert (result.labels[pixels] == CLASSES.index(table["class"][row]) + 1).all()
    assert (result.labels[objects == 0] == 0).all()                    # nothing outside the objects


def test_objects_get_their_colour_zero_shot_on_the_demo_scenes(demo):
    right = total = 0
    for scene in held_out_scenes(16, sizes=(192, 256)):
        objects, truth = instances(scene)
        table = demo.segment(scene.image, CLASSES, objects=objects, maps=False).objects
        right += sum(truth[int(i)] == c for i, c in zip(table["id"], table["class"]))
        total += len(truth)
    assert total > 20 and right / total >= 0.95, (right, total)


def test_objects_with_snapping_and_sparse_ids(demo):
    scene = held_out_scenes(1, sizes=(192,))[0]
    objects, truth = instances(scene)
    sparse = np.where(objects > 0, objects * 1_000_003, 0).astype(np.int64)   # ids far apart
    dense = demo.segment(scene.image, CLASSES, objects=objects, refine="pamr", maps=False)
    spread = demo.segment(scene.image, CLASSES, objects=sparse, refine="pamr", maps=False)
    np.testing.assert_array_equal(spread.labels, dense.labels)
    assert list(spread.objects["id"]) == [i * 1_000_003 for i in dense.objects["id"]]
    assert list(spread.objects["class"]) == list(dense.objects["class"])


@pytest.mark.parametrize("objects, message", [
    (np.zeros((192, 192), np.float32), "integer array"),
    (np.zeros((10, 10), np.int32), "do not match"),
    (np.full((192, 192), -1, np.int32), "negative ids"),
])
def test_bad_objects_are_value_errors(demo, objects, message):
    image = held_out_scenes(1, sizes=(192,))[0].image
    with pytest.raises(InvalidOptionError, match=message):
        demo.segment(image, CLASSES, objects=objects)


def test_no_objects_and_very_many_objects(demo):
    image = held_out_scenes(1, sizes=(512,))[0].image
    empty = demo.segment(image, CLASSES, objects=np.zeros((512, 512), np.uint16), maps=False)
    assert len(empty.objects["id"]) == 0 and not empty.labels.any()
    many = (np.arange(512 * 512).reshape(512, 512) // 2 + 1).astype(np.int64)   # 131,072 two-pixel objects
    result = demo.segment(image, CLASSES, objects=many, maps=False)
    assert len(result.objects["id"]) == 131_072 and result.objects["area"].sum() == 512 * 512
