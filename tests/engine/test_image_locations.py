"""Images read from remote zarr stores: known by their address, whichever folder napari was started from."""

from __future__ import annotations

import os

import numpy as np
import pytest

from napari_clearclip.image_locations import image_location, location_name, remote_address


def test_addresses_are_kept_as_they_are_and_local_paths_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert remote_address("https://host/data/slide.zarr/") == "https://host/data/slide.zarr"
    assert remote_address("S3://bucket/slide.zarr") == "S3://bucket/slide.zarr"
    assert remote_address("simplecache::s3://bucket/slide.zarr") == "simplecache::s3://bucket/slide.zarr"
    for local in ("slide.zarr", str(tmp_path / "slide.zarr"), "file:///data/slide.zarr", "memory://slide.zarr",
                  "C:\\data\\slide.tif", None, tmp_path):
        assert remote_address(local) is None, local
    assert image_location("https://host/data/slide.zarr/") == "https://host/data/slide.zarr"
    assert image_location("slide.zarr") == str(tmp_path.resolve() / "slide.zarr")
    assert image_location("file:///data/my%20slide.zarr") == str(os.path.realpath("/data/my slide.zarr"))
    assert location_name("https://host/data/slide.zarr/") == "slide.zarr"
    assert location_name(tmp_path / "slide.tif") == "slide.tif"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)   # (an address read as a path would name another place in each folder)
    assert image_location("https://host/data/slide.zarr") == "https://host/data/slide.zarr"


def test_a_zarr_array_read_over_http_is_known_by_its_store_s_address(tmp_path, served):
    """The store of an array read from a web server (as a script or napari's console opens a remote OME-Zarr), by
    zarr or by ``dask.array.from_zarr`` as it is, is the image's file; a dask array changed since has none."""
    import dask.array as da
    import zarr

    from napari_clearclip.zarr_images import local_store_root, store_location

    pytest.importorskip("aiohttp")
    stored = zarr.create_array(str(tmp_path / "slide.zarr"), shape=(8, 8), chunks=(4, 4), dtype=np.uint8)
    stored[:] = np.arange(64, dtype=np.uint8).reshape(8, 8)
    group = zarr.open_group(str(tmp_path / "pyramid.zarr"), mode="w")
    group.create_array("0", shape=(1, 8, 8), chunks=(1, 4, 4), dtype=np.uint8)
    address = served(tmp_path)
    remote = zarr.open_array(f"{address}/slide.zarr/", mode="r")
    assert np.array_equal(remote[:], stored[:])
    assert store_location(remote) == f"{address}/slide.zarr"
    assert local_store_root(remote) is None          # (not a folder here)
    assert store_location(da.from_zarr(f"{address}/slide.zarr")) == f"{address}/slide.zarr"
    assert store_location(zarr.open_group(f"{address}/pyramid.zarr", mode="r")["0"]) == f"{address}/pyramid.zarr"
    assert store_location(da.from_zarr(f"{address}/slide.zarr") + 1) is None
    assert store_location(zarr.open_array("memory://slide.zarr", mode="w", shape=(4, 4), dtype=np.uint8)) is None
    assert store_location(zarr.open_array(str(tmp_path / "slide.zarr"), mode="r")) == str(tmp_path / "slide.zarr")


def test_a_remote_store_s_result_is_found_by_its_address_from_any_folder(tmp_path, monkeypatch):
    """A result's record keeps a remote store's address as it is: a later napari started in another folder finds it
    (read as a path, the address named a folder under the one napari was started from); nothing tells whether the
    store was written again, so its strokes teach; another address is another image."""
    import zarr

    from napari_clearclip.tiled_edits import (another_file, image_changed_since, keep_result_record, result_record,
                                              same_image_file)

    address = "https://data.example.org/idr/slide.zarr"
    store = tmp_path / "result.zarr"
    zarr.open_group(str(store), mode="w")
    first = tmp_path / "first"
    first.mkdir()
    monkeypatch.chdir(first)
    keep_result_record(store, address + "/", ["cell", "background"])
    record = result_record(store)
    assert record["source"] == address and record["size"] is None
    monkeypatch.chdir(tmp_path)
    assert same_image_file(record, address) and same_image_file(record, address + "/")
    assert not image_changed_since(store, address)
    assert not same_image_file(record, "https://data.example.org/idr/other/slide.zarr")
    assert another_file(record, "https://mirror.example.org/idr/slide.zarr")
    assert not same_image_file(record, str(first / "https:" / "data.example.org" / "idr" / "slide.zarr"))


def test_labels_saved_from_a_remote_store_s_image_record_its_address(tmp_path, monkeypatch):
    """Save labels... writes the address of a remote image's store in the labels' record (no size or digest: nothing
    is read from it), so that the labels opened again are that image's result; a labels store gets no calibration
    from it."""
    import zarr

    from napari_clearclip.batch.files import write_labels_file, write_labels_store_steps
    from napari_clearclip.batch.labels_reading import read_labels_output
    from napari_clearclip.progress import run_to_end
    from napari_clearclip.tiled_edits import same_image_file

    monkeypatch.chdir(tmp_path)
    address = "https://data.example.org/idr/slide.zarr"
    labels = np.zeros((16, 16), np.uint8)
    labels[4:8, 4:8] = 1
    written, _ = write_labels_file(tmp_path / "slide_labels.tif", labels, ["cell", "background"], address)
    read = read_labels_output(written)
    assert read.record["source"] == address and "size" not in read.record
    assert same_image_file(read.record, address)
    store, _ = run_to_end(write_labels_store_steps(tmp_path / "stores" / "slide_labels.zarr", labels, ["cell", "background"],
                                                   address))
    attributes = dict(zarr.open_group(str(store), mode="r").attrs)
    assert address in str(attributes) and not (tmp_path / "https:").exists()
